"""Stateful cadences: custom pieces written here, against plain-jnp references.

A cadence decides from the step count, a PRNG key in its state and statistics of the clean
gradient; the one-call and two-call forms must take the same decisions (the two-call ascent
call decides, the descent call follows), and off steps must evaluate no second gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems

Cadence = sam_optax.cadences.Cadence

RHO, LR, STEPS = 0.1, 0.05, 8
# float32 joins float64 in the full suite; the fast tier keeps float64 (the tighter tolerance).
DTYPES = pytest.mark.parametrize("dtype", [
    pytest.param(jnp.float32, id="f32", marks=pytest.mark.slow),
    pytest.param(jnp.float64, id="f64")])
FORMS = pytest.mark.parametrize("two_call", [False, True], ids=["one_call", "two_call"])


def random_cadence(probability, seed):
  """Perturbed with a fixed probability: a draw from fold_in(key, count), the key in state."""
  def init(params):
    del params
    return jax.random.PRNGKey(seed)

  def update(grads, key, params, *, count, **_):
    del grads, params
    return jax.random.uniform(jax.random.fold_in(key, count)) < probability, key

  return Cadence(init, update)


def above_mean_cadence(decay):
  """Perturbed when ||g||^2 is above its moving mean (before this step's update)."""
  def init(params):
    del params
    return jnp.zeros([], jnp.float32)

  def update(grads, mean, params, *, count, **_):
    del params, count
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
    return sq > mean, decay * mean + (1 - decay) * sq

  return Cadence(init, update, reads_grads=True)


loss, initial = problems.two_leaf_loss, problems.two_leaf_params


def reference(dtype, decide):
  """SAM with SGD, d = grad L(w + rho g/||g||) on the steps `decide` takes, d = g otherwise."""
  grad = jax.jit(jax.grad(loss))
  w, state, taken = initial(dtype), None, []
  for t in range(STEPS):
    g = grad(w)
    take, state = decide(t, g, state)
    taken.append(bool(take))
    if take:
      norm = jnp.sqrt(sum(jnp.sum(x.astype(jnp.float64) ** 2) for x in jax.tree.leaves(g)))
      d = grad(jax.tree.map(lambda x, gx: x + (RHO * gx / norm).astype(dtype), w, g))
    else:
      d = g
    w = jax.tree.map(lambda x, dx: x - LR * dx, w, d)
  return w, taken


def run(cadence, dtype, two_call):
  """STEPS steps of sharpness_aware with `cadence`; returns the params and grad_fn's count."""
  tx = sam_optax.sharpness_aware(optax.sgd(LR), sam_optax.normalized_ascent(RHO),
                                 cadence=cadence, two_call=two_call)
  calls = []

  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(loss)(p)

  @jax.jit
  def step(p, s):
    if two_call:
      for _ in range(2):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        p = optax.apply_updates(p, u)
      return p, s
    u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=counted)
    return optax.apply_updates(p, u), s

  p = initial(dtype)
  s = tx.init(p)
  for _ in range(STEPS):
    p, s = step(p, s)
  jax.effects_barrier()
  return p, len(calls)


def close(actual, expected, dtype):
  tol = 1e-5 if dtype == jnp.float32 else 1e-12
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)


@DTYPES
@FORMS
def test_random_cadence_with_a_fixed_probability(dtype, two_call):
  key = jax.random.PRNGKey(3)
  draws = lambda t, g, s: (jax.random.uniform(jax.random.fold_in(key, t)) < 0.5, s)
  expected, taken = reference(dtype, draws)
  assert 0 < sum(taken) < STEPS  # both kinds of step occur
  params, calls = run(random_cadence(0.5, 3), dtype, two_call)
  close(params, expected, dtype)
  if not two_call:
    assert calls == sum(taken)  # off steps evaluate no second gradient


@DTYPES
@FORMS
def test_cadence_reading_gradient_statistics(dtype, two_call):
  def above_mean(t, g, mean):
    mean = jnp.zeros([], jnp.float32) if mean is None else mean
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g))
    return sq > mean, 0.5 * mean + 0.5 * sq

  expected, taken = reference(dtype, above_mean)
  assert 0 < sum(taken) < STEPS
  params, calls = run(above_mean_cadence(0.5), dtype, two_call)
  close(params, expected, dtype)
  if not two_call:
    assert calls == sum(taken)


def test_cadence_state_lives_in_the_engine_state_and_advances_once_per_pair():
  tx = sam_optax.sharpness_aware(optax.sgd(LR), sam_optax.normalized_ascent(RHO),
                                 cadence=above_mean_cadence(0.5), two_call=True)
  p = initial(jnp.float32)
  s = tx.init(p)
  assert float(s.cadence_state.cadence) == 0.0
  g = jax.grad(loss)(p)
  u, s = tx.update(g, s, p)  # ascent call: decides, advances the mean
  mean = float(s.cadence_state.cadence)
  assert mean > 0 and bool(s.pending.decision.perturbed)
  p = optax.apply_updates(p, u)
  _, s = tx.update(jax.grad(loss)(p), s, p)  # descent call: follows, leaves the mean
  assert float(s.cadence_state.cadence) == mean


def test_plain_functions_and_every_are_cadences():
  every = sam_optax.cadences.every(3)
  assert isinstance(every, Cadence) and [bool(every(t)) for t in range(4)] == [
      True, False, False, True]
  fn = sam_optax.cadences.from_function(lambda t: t % 2 == 1)
  assert [bool(fn(t)) for t in range(3)] == [False, True, False]
  inside = sam_optax.cadences.window(1, 3)
  assert [bool(inside(t)) for t in range(4)] == [False, True, True, False]
  with pytest.raises(ValueError, match="window end"):
    sam_optax.cadences.window(3, 1)


def test_a_cadence_reading_gradients_refuses_chunking():
  with pytest.raises(ValueError, match="reads the clean gradient"):
    sam_optax.sharpness_aware(optax.sgd(LR), sam_optax.normalized_ascent(RHO),
                              cadence=above_mean_cadence(0.5), chunk_size=2)
