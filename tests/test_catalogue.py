"""Shared tests: every variant in tests/catalogue.py runs through each of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import problems, references
from tests.catalogue import CATALOGUE

STEPS = 20
TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}


# The MLP in both precisions, the quadratic in float64 (its float32 run adds compile time, not
# strength: the float64 comparison at 1e-12 is the stricter one). Every step also checks that
# float32 and float64 params keep their dtype.
REFERENCE_CASES = [("mlp", jnp.float32), ("mlp", jnp.float64), ("quadratic", jnp.float64)]


# Every variant's exactness on the MLP in float64 stays in the fast tier; its float32 and
# quadratic cases (and all of the FAST_TIER variants') run in the full suite.
@pytest.mark.whole_catalogue(
    when=lambda p: p["problem_name"] == "mlp" and jnp.dtype(p["dtype"]) == jnp.float64)
@pytest.mark.parametrize("problem_name, dtype", REFERENCE_CASES,
                         ids=[f"{p}-{jnp.dtype(d).name}" for p, d in REFERENCE_CASES])
@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_matches_plain_jnp_reference(variant, problem_name, dtype):
  problem = problems.PROBLEMS[problem_name](dtype)
  tx = variant.make(optax.sgd(0.1, momentum=0.9), **variant.hparams)
  ours, _, _ = problems.run(tx, problem, STEPS)
  expected = references.run(problem, variant.reference(variant.hparams), STEPS)
  for t, (a, e) in enumerate(zip(ours, expected)):
    assert jax.tree.all(jax.tree.map(lambda x, y: x.dtype == y.dtype, a, problem.params))
    problems.assert_trees_close(a, e, TOL[dtype]), t
  # The trajectory moved: the comparison is not between two stationary points.
  assert not np.allclose(jax.tree.leaves(ours[-1])[0], jax.tree.leaves(problem.params)[0])


@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_jit_compiles_once_and_state_is_stable(variant):
  problem = problems.mlp(jnp.float32)
  tx = variant.make(optax.adam(1e-2), **variant.hparams)
  _, state, step = problems.run(tx, problem, 5)
  assert step._cache_size() == 1
  init_state = tx.init(problem.params)
  assert jax.tree.structure(state) == jax.tree.structure(init_state)
  # A user's jitted step may donate the state: no two leaves of a fresh state share a buffer
  # (XLA refuses to donate one twice).
  jax.jit(lambda s: jax.tree.map(lambda x: x + 0, s), donate_argnums=0)(tx.init(problem.params))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(init_state)):
    assert a.dtype == b.dtype and a.shape == b.shape


@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_inject_hyperparams_matches_plain(variant):
  # Against the plain-jnp reference that the plain variant matches to 1e-12 (above): the same
  # check as comparing with the plain variant, without compiling it a second time.
  problem = problems.mlp(jnp.float64)
  injected_tx = optax.inject_hyperparams(variant.make, static_args=variant.static_args)(
      optax.sgd(0.1, momentum=0.9), **variant.hparams)
  injected, state, _ = problems.run(injected_tx, problem, 5)
  expected = references.run(problem, variant.reference(variant.hparams), 5)
  problems.assert_trees_close(injected[-1], expected[-1], 1e-12)
  assert set(variant.hparams) <= set(state.hyperparams)


@pytest.mark.parametrize("two_call", [False, True], ids=["one_call", "two_call"])
@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_zero_gradient_gives_finite_updates(variant, two_call):
  params = problems.mlp(jnp.float32).params
  zeros = jax.tree.map(jnp.zeros_like, params)
  if two_call and not variant.two_call:  # one-call-only variants refuse at construction
    with pytest.raises(ValueError, match="one-call form"):
      variant.make(optax.adam(1e-2), **variant.hparams, two_call=True)
    return
  tx = variant.make(optax.adam(1e-2), **variant.hparams, two_call=two_call)
  state = tx.init(params)
  zero_grad_fn = lambda p: zeros  # one function: one compilation for both steps
  for _ in range(2):
    if two_call:
      updates, state = jax.jit(tx.update)(zeros, state, params)
    else:
      updates, state = jax.jit(tx.update, static_argnames="grad_fn")(
          zeros, state, params, grad_fn=zero_grad_fn)
    assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))
    assert all(jnp.all(jnp.isfinite(s)) for s in jax.tree.leaves(state)
               if jnp.issubdtype(s.dtype, jnp.floating))


@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_mixed_shapes_and_empty_subtree(variant):
  params = {"scalar": jnp.asarray(0.5, jnp.float32), "empty": {},
            "matrix": jnp.ones((2, 3), jnp.float32), "nothing": jnp.zeros((0, 4), jnp.float32),
            "nested": [jnp.arange(3.0, dtype=jnp.float32), (jnp.ones((1, 1, 2), jnp.float32),)]}
  loss = lambda p: (p["scalar"] ** 2 + jnp.sum(p["matrix"] ** 2) + jnp.sum(p["nothing"])
                    + jnp.sum(jnp.sin(p["nested"][0])) + jnp.sum(p["nested"][1][0] ** 4))
  tx = variant.make(optax.sgd(0.1), **variant.hparams)
  state = tx.init(params)
  updates, state = jax.jit(tx.update, static_argnames="grad_fn")(
      jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.shape == p.shape and bool(jnp.all(jnp.isfinite(u)))


# float64 only: tests/test_properties.py checks the bit-for-bit half in every float dtype.
@pytest.mark.parametrize("variant", [v for v in CATALOGUE if v.rho_zero_is_inner], ids=str)
def test_rho_zero_is_the_inner_optimizer(variant):
  dtype = jnp.float64
  problem = problems.mlp(dtype)
  hparams = dict(variant.hparams, **{name: 0.0 for name in variant.rho_names})
  # Inside one program the direction handed to the inner optimizer is the clean gradient, bit
  # for bit (the inner optimizer here is the identity, so updates = direction).
  tx = variant.make(optax.identity(), **hparams)

  @jax.jit
  def direction_and_grad(params):
    grads = jax.grad(problem.loss)(params, problem.batch)
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=problem.grad_fn())
    return updates, grads

  updates, grads = direction_and_grad(problem.params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    if variant.exact_at_rho_zero:
      np.testing.assert_array_equal(np.asarray(u), np.asarray(g))
    else:
      np.testing.assert_allclose(np.asarray(u), np.asarray(g), rtol=TOL[dtype], atol=TOL[dtype])

  # Over a run, the trajectory is AdamW's. Two different XLA programs may round differently
  # (fusion, reduction order), so across programs the comparison is to the dtype's precision.
  inner = optax.adamw(1e-2, weight_decay=1e-2)
  ours, _, _ = problems.run(variant.make(inner, **hparams), problem, 10)
  params, state = problem.params, inner.init(problem.params)

  @jax.jit
  def inner_step(params, state):
    grads = jax.grad(problem.loss)(params, problem.batch)
    updates, state = inner.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(10):
    params, state = inner_step(params, state)
    problems.assert_trees_close(ours[t], params, TOL[dtype])


@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_window_is_the_inner_optimizer_outside(variant):
  """window=(0, 2): grad_fn runs (at run time) only inside; outside, plain SGD on g."""
  problem = problems.mlp(jnp.float32)
  tx = variant.make(optax.sgd(0.1), **variant.hparams, window=(0, 2))
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return problem.grad_fn()(p)

  @jax.jit
  def step(params, state):
    grads = jax.grad(problem.loss)(params, problem.batch)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return updates, grads, state

  params, state = problem.params, tx.init(problem.params)
  for t in range(4):
    updates, grads, state = step(params, state)
    jax.effects_barrier()
    if t == 1:
      assert calls, "no gradient evaluation inside the window"
    if t >= 2:
      assert len(calls) == calls_in_window, f"grad_fn evaluated outside the window (step {t})"
      for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(u), -0.1 * np.asarray(g), rtol=1e-6, atol=1e-7)
    calls_in_window = len(calls)
    params = optax.apply_updates(params, updates)


# float64 only: the stricter comparison (the two forms share their dtype handling, and the
# float32 two-call form runs in test_zero_gradient_gives_finite_updates).
@pytest.mark.parametrize("dtype", [jnp.float64], ids=["f64"])
@pytest.mark.parametrize("variant", [v for v in CATALOGUE if v.two_call], ids=str)
def test_two_call_equals_one_call(variant, dtype):
  problem = problems.mlp(dtype)
  inner = optax.sgd(0.1, momentum=0.9)
  one, _, _ = problems.run(variant.make(inner, **variant.hparams), problem, 10)
  tx = variant.make(inner, **variant.hparams, two_call=True)
  params, state = problem.params, tx.init(problem.params)
  update = jax.jit(tx.update)
  grad = jax.jit(jax.grad(problem.loss))
  for t in range(10):
    inner_count = jax.tree.leaves(state.inner_state)
    updates, state = update(grad(params, problem.batch), state, params)  # ascent call
    for before, after in zip(inner_count, jax.tree.leaves(state.inner_state)):
      np.testing.assert_array_equal(before, after)  # inner state waits for the descent call
    params = optax.apply_updates(params, updates)
    updates, state = update(grad(params, problem.batch), state, params)  # descent call
    params = optax.apply_updates(params, updates)
    problems.assert_trees_close(params, one[t], 10 * TOL[dtype])
