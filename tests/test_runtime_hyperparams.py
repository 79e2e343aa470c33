"""Hyperparameters that arrive at run time are checked there (issue 13, items 9 and 10).

Construction rejects a negative radius, a weight outside [0, 1] or a non-finite value given as
a number. The same values can arrive inside the step: from a schedule, or injected by
`optax.inject_hyperparams` and traced under `jax.jit`. There they cannot raise, so the step's
updates become NaN (which `skip_if_nonfinite` and `optax.apply_if_finite` catch) instead of
the value being used. Every variant of the catalogue, every hyperparameter it injects, both
forms. The expected outcome needs no reference: NaN, or finite with valid values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems
from tests.catalogue import CATALOGUE, BY_NAME

PROBLEM = problems.quadratic(jnp.float32)
STEPS = 3  # LookSAM reads alpha from its second step; EMA decays reach eps one step later

# Hyperparameters with an upper bound (the others are only bounded below, by 0).
UPPER_BOUNDED = {("unified_sam", "lam"), ("dnsam", "decay"), ("friendly_sam", "lam"),
                 ("vasso", "theta"), ("esam", "beta"), ("wsam", "gamma"), ("bsam", "b1"),
                 ("bsam", "b2"), ("rst", "probability"), ("ae_sam", "decay"),
                 ("ae_looksam", "decay"), ("sampa", "lam"), ("sparse_sam", "sparsity"),
                 ("sparse_sam", "drop_rate"),
                 ("lookbehind_sam", "alpha")}
# Hyperparameters valid at any finite value (AE-SAM's threshold c_t may be negative).
UNBOUNDED = {("ae_sam", "threshold"), ("ae_looksam", "threshold")}


def invalid_values(variant, name):
  if (variant.name, name) in UNBOUNDED:
    return [float("nan")]
  values = [-1.0, float("nan")]
  if (variant.name, name) in UPPER_BOUNDED:
    values.append(1.5)
  return values


def loss_grad(params):
  return jax.grad(PROBLEM.loss)(params, None)


def finite(tree_):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree_)]))


def stepper(tx, two_call):
  """One jitted step: (params, state) -> (params, state, whether the updates were finite)."""
  @jax.jit
  def step(params, state):
    if not two_call:
      updates, state = tx.update(loss_grad(params), state, params, grad_fn=loss_grad)
      return optax.apply_updates(params, updates), state, finite(updates)
    ascent, state = tx.update(loss_grad(params), state, params)
    perturbed = optax.apply_updates(params, ascent)
    descent, state = tx.update(loss_grad(perturbed), state, perturbed)
    return optax.apply_updates(perturbed, descent), state, finite(ascent) & finite(descent)
  return step


def finite_steps(step, state, steps=STEPS):
  params, flags = PROBLEM.params, []
  for _ in range(steps):
    params, state, ok = step(params, state)
    flags.append(bool(ok))
  return flags


def forms():
  for v in CATALOGUE:
    yield pytest.param(v, False, id=f"{v.name}-one_call")
    if v.two_call:
      yield pytest.param(v, True, id=f"{v.name}-two_call")


@pytest.mark.parametrize("variant, two_call", forms())
def test_invalid_injected_hyperparameters_give_nan_updates(variant, two_call):
  """Each injected hyperparameter set out of range (or NaN) in the state makes the updates
  NaN, from the first step for the radius; the valid values stay finite. One compilation:
  the values are state leaves."""
  make = functools.partial(variant.make, two_call=True) if two_call else variant.make
  tx = optax.inject_hyperparams(make, static_args=variant.static_args)(
      optax.sgd(0.1), **variant.hparams)
  step = stepper(tx, two_call)
  state = tx.init(PROBLEM.params)
  assert finite_steps(step, state) == [True] * STEPS
  for name in variant.hparams:
    for bad in invalid_values(variant, name):
      hyperparams = dict(state.hyperparams)
      hyperparams[name] = jnp.asarray(bad, jnp.asarray(hyperparams[name]).dtype)
      flags = finite_steps(step, state._replace(hyperparams=hyperparams))
      assert not all(flags), (name, bad, flags)
      if name in variant.rho_names:
        assert not flags[0], (name, bad, flags)


def invalid_from_step_one(value):
  """A schedule that is `value` at step 0 and -value (invalid: negative) from step 1 on."""
  return lambda count: jnp.where(count < 1, value, -value)


@pytest.mark.parametrize("name, two_call", [
    ("sam", False), ("sam", True), ("usam", True), ("unified_sam", False), ("dnsam", False),
    ("looksam", False), ("friendly_sam", True), ("bsam", False)])
def test_a_radius_schedule_going_negative_gives_nan_updates(name, two_call):
  variant = BY_NAME[name]
  hparams = dict(variant.hparams, rho=invalid_from_step_one(variant.hparams["rho"]))
  make = functools.partial(variant.make, two_call=True) if two_call else variant.make
  tx = make(optax.sgd(0.1), **hparams)
  flags = finite_steps(stepper(tx, two_call), tx.init(PROBLEM.params), steps=6)
  assert flags[0] and not all(flags[1:]), flags
  if name != "looksam":  # LookSAM's steps 1 to 4 reuse, without a perturbation
    assert not flags[1], flags


@pytest.mark.parametrize("schedule", [lambda t: 2.0 + 0.0 * t, lambda t: jnp.nan + 0.0 * t],
                         ids=["two", "nan"])
def test_a_lam_schedule_out_of_range_gives_nan_updates(schedule):
  tx = sam_optax.unified_sam(optax.sgd(0.1), rho=0.05, lam=schedule)
  assert finite_steps(stepper(tx, False), tx.init(PROBLEM.params), steps=1) == [False]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_dnsam_invalid_full_grad_norm_gives_nan_updates_under_jit(bad):
  """A traced full_grad_norm that is negative, not finite, or zero while the gradient is not:
  NaN, not the plain inner step that a zero perturbation would give. A valid one gives a
  finite step, and a zero one at a zero gradient the zero perturbation (eps = 0)."""
  tx = sam_optax.dnsam(optax.sgd(0.1), rho=0.05)

  @jax.jit
  def step(norm, params):
    updates, _ = tx.update(loss_grad(params), tx.init(params), params, grad_fn=loss_grad,
                           full_grad_norm=norm)
    return finite(updates), updates

  assert bool(step(jnp.float32(2.0), PROBLEM.params)[0])
  assert not bool(step(jnp.float32(bad), PROBLEM.params)[0])
  at_minimum = jax.tree.map(jnp.zeros_like, PROBLEM.params)  # the quadratic's gradient is 0
  ok, updates = step(jnp.float32(0.0), at_minimum)
  assert bool(ok) and all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


def test_skip_if_nonfinite_skips_a_step_with_an_invalid_injected_rho():
  """The composition the docs recommend: the bad step is skipped, the params do not move."""
  make = lambda rho: sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1), rho=rho), 3)
  tx = optax.inject_hyperparams(make)(rho=0.05)
  state = tx.init(PROBLEM.params)
  state.hyperparams["rho"] = jnp.asarray(-0.05, jnp.asarray(state.hyperparams["rho"]).dtype)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(loss_grad(params), state, params, grad_fn=loss_grad)
    return optax.apply_updates(params, updates), state

  params, state = step(PROBLEM.params, state)
  problems.assert_trees_close(params, PROBLEM.params, 0.0)
  assert int(state.inner_state.total_notfinite) == 1


def test_checked_schedules_keep_valid_values_bit_for_bit():
  """A valid schedule's value passes through the check unchanged (dtype and weak type too)."""
  from sam_optax._src import hyperparams  # pylint: disable=g-import-not-at-top
  for value in (jnp.float32(0.05), jnp.asarray(0.05), jnp.float64(0.3)):
    checked = hyperparams.check_hparam("rho", lambda t, v=value: v)
    out = hyperparams.value_at(checked, jnp.asarray(0))
    assert out.dtype == value.dtype and out.weak_type == value.weak_type
    np.testing.assert_array_equal(out, value)
