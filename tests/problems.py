"""Small test problems: a loss over an MLP-shaped pytree and a quadratic over two leaves."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Problem:
  name: str
  params: Any                          # initial params
  loss: Callable[[Any, Any], Any]      # loss(params, batch)
  batch: Any

  def grad_fn(self, batch=None):
    batch = self.batch if batch is None else batch
    return lambda p: jax.grad(self.loss)(p, batch)


def mlp(dtype=jnp.float32, n=16, seed=0) -> Problem:
  """Two-layer tanh MLP with a scalar output scale: leaves of shapes (4,8), (8,), (8,3), (3,), ()."""
  rng = np.random.default_rng(seed)
  params = {
      "layer0": {"w": rng.normal(size=(4, 8)) / 2, "b": rng.normal(size=(8,)) / 10},
      "layer1": {"w": rng.normal(size=(8, 3)) / 3, "b": np.zeros(3)},
      "scale": np.array(1.2),
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  batch = (jnp.asarray(rng.normal(size=(n, 4)), dtype), jnp.asarray(rng.normal(size=(n, 3)), dtype))

  def loss(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["layer0"]["w"] + p["layer0"]["b"])
    out = (h @ p["layer1"]["w"] + p["layer1"]["b"]) * p["scale"]
    return jnp.mean((out - y) ** 2)

  return Problem("mlp", params, loss, batch)


def quadratic(dtype=jnp.float32) -> Problem:
  """L = 1/2 sum_i a_i x_i^2 + 1/2 z^T B z over a vector leaf and a matrix leaf."""
  a = jnp.asarray([0.5, 1.0, 2.0, 4.0], dtype)
  b = jnp.asarray([[3.0, 0.5], [0.5, 1.0]], dtype)
  params = {"x": jnp.asarray([1.0, -1.0, 0.5, 0.25], dtype),
            "z": jnp.asarray([[0.3, -0.2], [0.1, 0.4]], dtype)}

  def loss(p, batch):
    del batch
    return 0.5 * jnp.sum(a * p["x"] ** 2) + 0.5 * jnp.sum(p["z"] * (b @ p["z"]))

  return Problem("quadratic", params, loss, None)


PROBLEMS = {"mlp": mlp, "quadratic": quadratic}


def run(tx, problem, steps, *, grad_fn=None, clean=True, **update_kwargs):
  """Runs `steps` jitted one-call steps of `tx` on `problem`.

  Each step passes the clean gradient at the current params (zeros with `clean=False`, for
  variants that must not read it) and `grad_fn` (the problem's by default). Returns the params
  after each step, the final state and the jitted step.
  """
  grad_fn = problem.grad_fn() if grad_fn is None else grad_fn

  @jax.jit
  def step(params, state):
    grads = (jax.grad(problem.loss)(params, problem.batch) if clean
             else optax.tree.zeros_like(params))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn, **update_kwargs)
    return optax.apply_updates(params, updates), state

  params, state, path = problem.params, tx.init(problem.params), []
  for _ in range(steps):
    params, state = step(params, state)
    path.append(params)
  return path, state, step


def form_step(tx, grad_fn, two_call):
  """One jitted step `(params, state) -> (params, state)` of `tx` on the gradient `grad_fn`: one
  call with `grad_fn=` (one-call form), or the ascent call at w then the descent call at w + eps
  (two-call form)."""
  @jax.jit
  def step(params, state):
    if two_call:
      for _ in range(2):
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
      return params, state
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state
  return step


def two_leaf_loss(p):
  """A non-convex loss on two leaves ("a": 5 entries, "b": 3) that couples them."""
  return (jnp.sum(jnp.cos(1.3 * p["a"]) * p["a"] ** 2)
          + jnp.sum(jnp.tanh(p["b"]) ** 2) * (1.0 + jnp.sum(p["a"] ** 2)))


def two_leaf_params(dtype):
  """The starting point of `two_leaf_loss`."""
  return {"a": jnp.linspace(-1.0, 1.5, 5, dtype=dtype),
          "b": jnp.arange(3, dtype=dtype) * 0.4 - 0.3}


def trajectory(tx, problem, steps, **kwargs):
  """The params after each of `steps` jitted steps (see `run`)."""
  return run(tx, problem, steps, **kwargs)[0]


def assert_trees_close(actual, expected, tol):
  """Leaf by leaf, to `tol` relative and absolute."""
  actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)


def counting(grad_fn):
  """`grad_fn` wrapped to count its evaluations at run time (one host callback each, inside
  jit and conditionals alike), and the list the count lands in (read after
  `jax.effects_barrier()`)."""
  calls = []

  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return grad_fn(p)
  return counted, calls


def compiled_tanh_count(tx, problem):
  """How many tanh the compiled jitted step holds: on the MLP, one per gradient evaluation (a
  clean gradient the step never reads is dead code, compiled away)."""
  def step(params, state):
    grads = jax.grad(problem.loss)(params, problem.batch)
    updates, state = tx.update(grads, state, params, grad_fn=problem.grad_fn())
    return optax.apply_updates(params, updates), state
  hlo = jax.jit(step).lower(problem.params, tx.init(problem.params)).compile().as_text()
  return hlo.count(" tanh(")
