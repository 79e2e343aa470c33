"""Eager (un-jitted) updates: the same values as jitted ones, and no compilation per call.

Un-jitted, `jax.lax.cond` compiles on every call (its branches are fresh closures) and a helper
made of a few dozen operations dispatches each of them. The engine's conditionals
(`control.cond`) run the selected branch directly when the predicate is concrete, and the
pytree helpers (`control.eager_jit`) run as one cached compiled call. These tests pin down the
behaviour, not the speed: `benchmarks/eager.py` measures that, side by side with
optax.contrib.sam.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._src import control
from sam_optax._src import tree
from tests import problems
from tests.catalogue import BY_NAME, CATALOGUE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # LookSAM (k = 5): one full step, four reuse steps, the next full step
# Representative variants run in the fast tier (a cadence with a correction, random draws, a
# correction with a schedule, an ascent that ignores g); the rest of the catalogue is slow.
FAST = ("sam", "looksam", "esam", "gsam", "momentum_sam")


def _catalogue_cases():
  cases = []
  for variant in CATALOGUE:
    for two_call in ((False, True) if variant.two_call else (False,)):
      marks = () if variant.name in FAST else (pytest.mark.slow,)
      cases.append(pytest.param(variant, two_call, marks=marks,
                                id=f"{variant.name}-{'two' if two_call else 'one'}_call"))
  return cases


def _steps(tx, problem, two_call, update):
  """`STEPS` training steps with `update` (eager `tx.update` or its jitted version): the
  params after each step and the final state."""
  grad = jax.jit(jax.grad(problem.loss))
  grad_fn = problem.grad_fn()
  params, state, path = problem.params, tx.init(problem.params), []
  for _ in range(STEPS):
    if two_call:
      updates, state = update(grad(params, problem.batch), state, params)
      params = optax.apply_updates(params, updates)
      updates, state = update(grad(params, problem.batch), state, params)
    else:
      updates, state = update(grad(params, problem.batch), state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
    path.append(params)
  return path, state


def _assert_states_close(eager_state, jitted_state):
  assert jax.tree.structure(eager_state) == jax.tree.structure(jitted_state)
  for a, b in zip(jax.tree.leaves(eager_state), jax.tree.leaves(jitted_state)):
    assert a.dtype == b.dtype and a.shape == b.shape
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("variant, two_call", _catalogue_cases())
def test_eager_matches_jit(variant, two_call):
  """Eager and jitted runs agree at every step (float64: only rounding may differ)."""
  problem = problems.quadratic(jnp.float64)
  tx = variant.make(optax.sgd(0.1, momentum=0.9), **variant.hparams, two_call=two_call)
  eager_path, eager_state = _steps(tx, problem, two_call, tx.update)
  jitted = jax.jit(tx.update, static_argnames="grad_fn")
  jitted_path, jitted_state = _steps(tx, problem, two_call, jitted)
  for eager_params, jitted_params in zip(eager_path, jitted_path):
    problems.assert_trees_close(eager_params, jitted_params, 1e-12)
  _assert_states_close(eager_state, jitted_state)
  assert not np.allclose(eager_path[-1]["x"], problem.params["x"])  # the params moved


@pytest.mark.parametrize("two_call", [False, True], ids=["one_call", "two_call"])
@pytest.mark.parametrize("wrap", ["window", "skip_if_nonfinite"])
def test_eager_matches_jit_with_window_and_skip(wrap, two_call):
  """The conditionals outside the catalogue's defaults: a window (sharpness-aware on steps 2
  and 3 only) and `skip_if_nonfinite`."""
  problem = problems.quadratic(jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  if wrap == "window":
    tx = sam_optax.sam(inner, 0.05, window=(2, 4), two_call=two_call)
  else:
    tx = sam_optax.skip_if_nonfinite(sam_optax.sam(inner, 0.05, two_call=two_call), 3)
  eager_path, eager_state = _steps(tx, problem, two_call, tx.update)
  jitted_path, jitted_state = _steps(tx, problem, two_call,
                                     jax.jit(tx.update, static_argnames="grad_fn"))
  for eager_params, jitted_params in zip(eager_path, jitted_path):
    problems.assert_trees_close(eager_params, jitted_params, 1e-12)
  _assert_states_close(eager_state, jitted_state)


@pytest.mark.parametrize("strategy", [pytest.param("vectorized", marks=pytest.mark.slow),
                                      "sequential"])
def test_eager_matches_jit_chunked(strategy):
  """m-sharpness: eagerly, the sequential strategy loops in Python instead of compiling a scan
  per call; both strategies give the jitted values, stacked aux included."""
  problem = problems.mlp(jnp.float64, n=8)
  tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), 0.05, chunk_size=2, chunk_strategy=strategy,
                     has_aux=True)
  grad_fn = lambda p, b: (jax.grad(problem.loss)(p, b), problem.loss(p, b))
  jitted = jax.jit(tx.update_with_aux, static_argnames="grad_fn")
  params, state = problem.params, tx.init(problem.params)
  for _ in range(2):
    updates, eager_state, aux = tx.update_with_aux(None, state, params, batch=problem.batch,
                                                   grad_fn=grad_fn)
    jitted_updates, jitted_state, jitted_aux = jitted(None, state, params, batch=problem.batch,
                                                      grad_fn=grad_fn)
    problems.assert_trees_close(updates, jitted_updates, 1e-12)
    _assert_states_close(eager_state, jitted_state)
    assert aux.shape == jitted_aux.shape == (4,)
    np.testing.assert_allclose(aux, jitted_aux, rtol=1e-12)
    params, state = optax.apply_updates(params, updates), eager_state
  with _counting(BACKEND_COMPILE) as compiles:
    for _ in range(2):
      updates, state = tx.update(None, state, params, batch=problem.batch, grad_fn=grad_fn)
      params = jax.block_until_ready(optax.apply_updates(params, updates))
  assert compiles[0] == 0, f"{compiles[0]} compilations in 2 eager steps"


@pytest.mark.parametrize("chunked", [False, True], ids=["whole_batch", "chunked"])
def test_eager_aux_on_steps_without_perturbed_pass(chunked):
  """With has_aux and a cadence, a reuse step returns zeros shaped like grad_fn's aux (stacked
  over chunks under m-sharpness), eagerly as under jit."""
  problem = problems.mlp(jnp.float64, n=8)
  options = {"chunk_size": 4} if chunked else {}
  tx = sam_optax.looksam(optax.sgd(0.1), 0.1, k=2, has_aux=True, **options)

  def grad_fn(p, b=problem.batch):
    return jax.grad(problem.loss)(p, b), {"loss": problem.loss(p, b)}

  kwargs = {"batch": problem.batch} if chunked else {}
  params, state = problem.params, tx.init(problem.params)
  jitted = jax.jit(tx.update_with_aux, static_argnames="grad_fn")
  for t in range(3):
    grads = jax.grad(problem.loss)(params, problem.batch)
    updates, eager_state, aux = tx.update_with_aux(grads, state, params, grad_fn=grad_fn,
                                                   **kwargs)
    jitted_updates, _, jitted_aux = jitted(grads, state, params, grad_fn=grad_fn, **kwargs)
    problems.assert_trees_close(updates, jitted_updates, 1e-12)
    assert jax.tree.structure(aux) == jax.tree.structure(jitted_aux)
    assert aux["loss"].shape == jitted_aux["loss"].shape == ((2,) if chunked else ())
    np.testing.assert_allclose(aux["loss"], jitted_aux["loss"], rtol=1e-12)
    if t % 2:  # a reuse step: no perturbed pass, so a zero aux
      assert np.all(np.asarray(aux["loss"]) == 0.0)
    else:  # the loss at the perturbed point, above the clean loss (SAM's ascent)
      assert np.all(np.asarray(aux["loss"]) > 0.0)
    params, state = optax.apply_updates(params, updates), eager_state


@contextlib.contextmanager
def _counting(event_name):
  """Counts the JAX monitoring events named `event_name` recorded inside the block."""
  count = [0]
  active = [True]

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if active[0] and event == event_name:
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    active[0] = False
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is not None:
      unregister(listener)


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
JAXPR_TRACE = "/jax/core/compile/jaxpr_trace_duration"


@pytest.mark.parametrize("name, options", [
    ("sam", {}), ("sam", {"two_call": True}), ("looksam", {}), ("looksam", {"two_call": True}),
    ("sam", {"window": (1, 3)}), ("sam", {"window": (1, 3), "two_call": True}),
    ("looksam", {"has_aux": True}),
], ids=["sam", "sam-two_call", "looksam", "looksam-two_call", "window", "window-two_call",
        "looksam-has_aux"])
def test_eager_calls_do_not_compile(name, options):
  """After a warm-up that visits every branch, further eager updates trace and compile nothing
  (before control.cond, every un-jitted call compiled its lax.cond). With has_aux, `tx.update`
  drops the aux, so a reuse step does not trace grad_fn for the shape of a zero aux."""
  variant = BY_NAME[name]
  problem = problems.quadratic(jnp.float32)
  two_call = options.get("two_call", False)
  tx = variant.make(optax.sgd(0.1, momentum=0.9), **variant.hparams, **options)
  grad = jax.jit(jax.grad(problem.loss))
  if options.get("has_aux"):
    grad_fn = lambda p: (grad(p, None), {"x0": p["x"][0]})
  else:
    grad_fn = lambda p: grad(p, None)
  params, state = problem.params, tx.init(problem.params)

  def step(params, state):
    for _ in range(2 if two_call else 1):
      kwargs = {} if two_call else {"grad_fn": grad_fn}
      updates, state = tx.update(grad(params, None), state, params, **kwargs)
      params = optax.apply_updates(params, updates)
    return jax.block_until_ready((params, state))

  for _ in range(5):  # every branch: LookSAM's k = 5 cycle, in and out of the window
    params, state = step(params, state)
  with _counting(BACKEND_COMPILE) as compiles, _counting(JAXPR_TRACE) as traces:
    for _ in range(5):
      params, state = step(params, state)
  assert compiles[0] == 0, f"{compiles[0]} compilations in 5 eager steps"
  assert traces[0] == 0, f"{traces[0]} traces in 5 eager steps"


def test_cond_runs_one_branch_eagerly_and_is_lax_cond_under_jit():
  def boom(x):
    raise AssertionError("the branch not taken was called")

  x = jnp.arange(3.0)
  np.testing.assert_array_equal(control.cond(jnp.asarray(True), lambda v: v + 1, boom, x), x + 1)
  np.testing.assert_array_equal(control.cond(np.bool_(False), boom, lambda v: v - 1, x), x - 1)
  jaxpr = jax.make_jaxpr(lambda p, v: control.cond(p, lambda u: u + 1, lambda u: u - 1, v))(
      jnp.asarray(True), x)
  assert [e.primitive.name for e in jaxpr.eqns] == ["convert_element_type", "cond"]
  # Under vmap the predicate is batched: lax.cond (a select), never a host read.
  out = jax.vmap(lambda p, v: control.cond(p, lambda u: u + 1, lambda u: u - 1, v))(
      jnp.asarray([True, False, True]), x)
  np.testing.assert_array_equal(out, jnp.asarray([1.0, 0.0, 3.0]))


def test_eager_jit_is_cached_eagerly_and_plain_under_trace():
  t = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
  norm = tree.norm
  before = norm.jitted._cache_size()
  values = [norm(t) for _ in range(3)]
  assert norm.jitted._cache_size() - before <= 1  # compiled at most once for this signature
  np.testing.assert_allclose(values[-1], np.sqrt(5.0 + 4.0), rtol=1e-6)
  # Under a trace the function is inlined: no nested call of its compiled version.
  jaxpr = jax.make_jaxpr(lambda u: norm(u))(t)
  assert all(getattr(e.params.get("name"), "__str__", lambda: "")() != "norm"
             for e in jaxpr.eqns)
  # A Python number among the arguments keeps the plain path (no tracing of Python values).
  np.testing.assert_allclose(tree.scale(2.0 * jnp.ones(()), t)["b"], 2.0 * jnp.ones((2, 2)))


@pytest.mark.slow  # a benchmark run; the full suite runs it
def test_eager_benchmark_smoke(tmp_path):
  out = tmp_path / "eager.json"
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "eager.py"), "--smoke",
       "--json", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  import json  # pylint: disable=import-outside-toplevel
  report = json.loads(out.read_text())
  contenders = report["contenders"]
  for name in ("sam", "sam_two_call", "optax_sam", "optax_sam_two_call"):
    assert contenders[name]["median_s"] > 0 and contenders[name]["finite"], name
  assert contenders["sam_two_call"]["calls_per_step"] == 2
  assert report["targets"] == {}  # smoke mode judges no thresholds
  assert "| sam | one-call |" in result.stdout
