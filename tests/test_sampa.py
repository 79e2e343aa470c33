"""SAMPa (issue 15): its two forms of the auxiliary point, the ways of evaluating the two
points, and what it refuses. The catalogue entry (tests/catalogue.py) runs the shared tests on
the code's form with heavy-ball SGD; the trajectory over 2 devices is checked by the smoke run
of benchmarks/sampa_devices.py (tests/test_benchmarks.py), which needs its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import field_references as fref
from tests import problems
from tests import references

LR, MOMENTUM, STEPS = 0.1, 0.9, 12
TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}


def scanned(tx, problem, steps=STEPS, grad_fn=None, clean=None):
  """The params after each of `steps` steps, one jitted `lax.scan` (a step traced once). The
  clean gradient handed to `update` is zeros unless `clean` (a function of the params)."""
  grad_fn = problem.grad_fn() if grad_fn is None else grad_fn

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      grads = optax.tree.zeros_like(p) if clean is None else clean(p)
      u, s = tx.update(grads, s, p, grad_fn=grad_fn)
      p = optax.apply_updates(p, u)
      return (p, s), p
    _, out = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return out

  out = run(problem.params)
  return [jax.tree.map(lambda x, t=t: x[t], out) for t in range(steps)]


def peek_with_decay_direction(rho, lam, wd):
  """SAMPa with y = w - lr (g_y + wd w + momentum v), written out (weight decay in the peek)."""
  kept = {"g_y": None}

  def direction(grad, w, t, v):
    g_y = jnp.zeros_like(w) if kept["g_y"] is None else kept["g_y"]
    y = w - LR * (g_y + wd * w + MOMENTUM * v)
    g_aux = grad(y)
    n = jnp.linalg.norm(g_y)
    unit = jnp.where(n > 0, g_y / jnp.where(n > 0, n, 1.0), 0.0)
    kept["g_y"] = g_aux
    return (1 - lam) * grad(w + rho * unit) + lam * g_aux + wd * w
  direction.needs_velocity = True
  return direction


CASES = [("mlp", jnp.float64), ("mlp", jnp.float32)]


@pytest.mark.slow
@pytest.mark.parametrize("problem_name, dtype", CASES, ids=["mlp-f64", "mlp-f32"])
def test_learning_rate_form_matches_its_reference(problem_name, dtype):
  """y = x - lr g_y (the paper's form), lr a schedule of the step count."""
  problem = problems.PROBLEMS[problem_name](dtype)
  # Piecewise constant: a schedule whose values do not depend on how XLA fuses its arithmetic
  # (a linear schedule's float32 value differs by an ulp between jit and eager evaluation).
  schedule = lambda count: jnp.where(count < STEPS // 2, 0.2, 0.05)
  tx = sam_optax.sampa(optax.sgd(LR, momentum=MOMENTUM), rho=0.15, lam=0.3,
                       learning_rate=schedule)
  ours = scanned(tx, problem)
  kept = {"g_y": None}

  def direction(grad, w, t):
    g_y = jnp.zeros_like(w) if kept["g_y"] is None else kept["g_y"]
    # The schedule at an int32 count, as the engine's step count evaluates it.
    g_aux = grad(w - float(schedule(jnp.int32(t))) * g_y)
    d = 0.7 * grad(w + 0.15 * fref._unit(g_y)) + 0.3 * g_aux
    kept["g_y"] = g_aux
    return d

  expected = references.run(problem, direction, STEPS, lr=LR, momentum=MOMENTUM)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[dtype])
  assert not np.allclose(jax.tree.leaves(ours[-1])[0], jax.tree.leaves(problem.params)[0])


@pytest.mark.slow
def test_peek_includes_the_inner_weight_decay():
  """The code's y is the inner optimizer's whole update at g_y: momentum and weight decay."""
  problem = problems.mlp(jnp.float64)
  wd = 0.05
  inner = optax.chain(optax.add_decayed_weights(wd), optax.sgd(LR, momentum=MOMENTUM))
  ours = scanned(sam_optax.sampa(inner, rho=0.1, lam=0.2), problem)
  expected = references.run(problem, peek_with_decay_direction(0.1, 0.2, wd), STEPS, lr=LR,
                            momentum=MOMENTUM)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[jnp.float64])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_vmap_and_sequential_give_the_same_trajectory(dtype):
  """The two points batched into one pass or evaluated one after the other: same values."""
  problem = problems.mlp(dtype)
  inner = optax.adamw(1e-2, weight_decay=1e-2)
  runs = [scanned(sam_optax.sampa(inner, evaluation=e), problem, 6)
          for e in ("sequential", "vmap")]
  for a, b in zip(*runs):
    problems.assert_trees_close(a, b, TOL[dtype])


@pytest.mark.slow
def test_two_gradients_per_step_and_the_clean_gradient_is_dead_code():
  """grad_fn runs twice per step at run time, and a clean gradient computed in the jitted step
  is dead code: the compiled step holds SAMPa's two evaluations (one tanh of the MLP's forward
  each), SAM's two with its clean one."""
  problem = problems.mlp(jnp.float32)
  tx = sam_optax.sampa(optax.sgd(LR, momentum=MOMENTUM))
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return problem.grad_fn()(p)

  scanned(tx, problem, 4, grad_fn=grad_fn)
  jax.effects_barrier()
  assert len(calls) == 8

  assert problems.compiled_tanh_count(tx, problem) == 2
  assert problems.compiled_tanh_count(sam_optax.sam(optax.sgd(LR), rho=0.05), problem) == 2


@pytest.mark.slow
def test_first_step_is_the_inner_optimizers():
  """g_y = 0 before the first step (the code): both points are x_0, the step is SGD's."""
  problem = problems.mlp(jnp.float64)
  inner = optax.sgd(LR, momentum=MOMENTUM)
  tx = sam_optax.sampa(inner)
  updates, state = jax.jit(tx.update, static_argnames="grad_fn")(
      optax.tree.zeros_like(problem.params), tx.init(problem.params), problem.params,
      grad_fn=problem.grad_fn())
  g = problem.grad_fn()(problem.params)
  expected, _ = inner.update(g, inner.init(problem.params), problem.params)
  problems.assert_trees_close(updates, expected, 1e-12)
  # g_y is now the gradient at y_1 = x_0 (zero momentum, g_y = 0).
  problems.assert_trees_close(state.correction_state.grads_at_y, g, 1e-12)


def test_refusals():
  inner = optax.sgd(0.1)
  with pytest.raises(ValueError, match="one-call form"):
    sam_optax.sampa(inner, two_call=True)
  with pytest.raises(ValueError, match="mask"):
    sam_optax.sampa(inner, mask={"w": True})
  with pytest.raises(ValueError, match="point_evaluation"):
    sam_optax.sampa(inner, evaluation="parallel")  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="lam"):
    sam_optax.sampa(inner, lam=1.5)
  # A user's ascent asking for extra points in the two-call form: refused at the ascent call.
  params = {"w": jnp.ones(2)}
  ascent = sam_optax.sampa_ascent(0.1, learning_rate=0.1)
  tx = sam_optax.sharpness_aware(inner, ascent, correction=sam_optax.sampa_correction(0.2),
                                 two_call=True)
  with pytest.raises(ValueError, match="two-call form has no grad_fn"):
    tx.update(params, tx.init(params), params)
  # The device axis must be bound (shard_map) and have one device group per point.
  tx = sam_optax.sampa(inner, point_axis_name="points")
  with pytest.raises(ValueError, match="not bound"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


@pytest.mark.slow  # a subprocess: 2 host devices need XLA flags set before JAX starts
def test_two_devices_follow_the_one_device_trajectory():
  """point_axis_name over a shard_map axis of 2 host devices, each evaluating one point, gives
  sequential and vmapped SAMPa's trajectory (benchmarks/sampa_devices.py --check)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, os.path.join(root, "benchmarks", "sampa_devices.py"), "--check"],
      cwd=root, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "'sampa_2dev': " in result.stdout and "'sampa_vmap': " in result.stdout


def test_a_carry_reaches_the_correction_for_one_step():
  """The Perturbation's carry (issue 16's GAM will hand its intermediate gradients this way)
  reaches the correction as ascent_carry, and is not in the state."""
  params = {"w": jnp.asarray([1.0, -2.0])}
  loss = lambda p: jnp.sum(p["w"] ** 2)

  def ascent_update(grads, state, params=None, *, grad_fn=None, **extra):
    g2 = grad_fn(jax.tree.map(lambda w, g: w + 0.1 * g, params, grads))
    return sam_optax.Perturbation(eps=optax.tree.zeros_like(params), carry=g2), state

  def correction_update(updates, state, params=None, *, ascent_carry=None, **extra):
    return jax.tree.map(lambda u, c: u + c, updates, ascent_carry), state

  tx = sam_optax.sharpness_aware(
      optax.identity(), optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                                              ascent_update),
      correction=optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                                       correction_update))
  g = jax.grad(loss)(params)
  state = tx.init(params)
  d, new_state = jax.jit(tx.update, static_argnames="grad_fn")(g, state, params,
                                                               grad_fn=jax.grad(loss))
  expected = 2 * params["w"] + 2 * (params["w"] + 0.1 * g["w"])
  np.testing.assert_allclose(np.asarray(d["w"]), np.asarray(expected), rtol=1e-6)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


# Data parallelism over "data" and the two points over "points" on a 2 x 2 mesh of host devices,
# against SAMPa on the whole batch on one device (float64).
_DATA_AND_POINTS = r'''
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, PartitionSpec as P
jax.config.update("jax_enable_x64", True)
import sam_optax
shard_map = getattr(jax, "shard_map", None)
if shard_map is None:
  from jax.experimental.shard_map import shard_map
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.zeros(3)}
batch = (jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=(8, 3))))
def loss(p, b):
  return 0.5 * jnp.mean(jnp.sum((jnp.tanh(b[0] @ p["w"] + p["b"]) - b[1]) ** 2, -1))
inner = optax.sgd(0.1, momentum=0.9)
calls = []
def counted(q, b):
  jax.debug.callback(lambda: calls.append(1))
  return jax.grad(loss)(q, b)
def stepper(tx):
  def step(p, s, b):
    u, s = tx.update(optax.tree.zeros_like(p), s, p, grad_fn=lambda q: counted(q, b))
    return optax.apply_updates(p, u), s
  return step
one = sam_optax.sampa(inner)
many = sam_optax.sampa(inner, axis_name="data", average_ascent=True, point_axis_name="points")
mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "points"))
one_step = jax.jit(stepper(one))
many_step = jax.jit(shard_map(stepper(many), mesh=mesh, in_specs=(P(), P(), P("data")),
                              out_specs=(P(), P())))
(p1, s1), (p2, s2) = (params, one.init(params)), (params, many.init(params))
for _ in range(4):
  p1, s1 = one_step(p1, s1, batch)
  jax.effects_barrier()
  before = len(calls)
  p2, s2 = many_step(p2, s2, batch)
  jax.effects_barrier()
  # One gradient per device per step: each of the 4 devices took one of the two points.
  assert len(calls) - before == 4, len(calls) - before
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
assert not np.allclose(np.asarray(p1["w"]), np.asarray(params["w"]))
print("ok")
'''


@pytest.mark.slow  # a subprocess with 4 host devices
def test_data_parallel_and_point_axes_compose():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _DATA_AND_POINTS], cwd=root,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0 and "ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
