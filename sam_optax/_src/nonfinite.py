"""Skipping a step whose result is not finite: a NaN batch, an overflow in the perturbed pass.

The engine never hides a non-finite value: a NaN or Inf in the clean gradient `g` or in the
perturbed gradient `g_adv` reaches the updates (the zero-guards of the norms only catch zero
vectors). `optax.apply_if_finite` wrapped around a sharpness-aware transformation looks at the
incoming `g` only, before the perturbed pass exists, so a batch whose perturbed pass overflows
gets through it. `skip_if_nonfinite` judges the step by its result instead, which carries both.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from sam_optax._src import control
from sam_optax._src import engine
from sam_optax._src.hyperparams import check_positive_int


class SkipIfNonfiniteState(NamedTuple):
  """State of `skip_if_nonfinite`; the first four fields are those of `optax.apply_if_finite`."""
  notfinite_count: jax.Array  # int32 scalar: consecutive skipped steps.
  last_finite: jax.Array      # bool scalar: whether the last step's updates were finite
                              # (two-call: the ascent call's, then the whole pair's).
  total_notfinite: jax.Array  # int32 scalar: steps skipped so far.
  inner_state: Any            # the wrapped transformation's state.
  # Two-call form only (None otherwise):
  skip_descent: jax.Array | None  # bool scalar: the next call ends a pair whose ascent was skipped.
  saved_before_pair: Any  # what the pending pair's ascent call changed, as it was before it
                          # (see _changed_by_ascent_call), restored if the pair is rejected.


def skip_if_nonfinite(tx: optax.GradientTransformation, max_consecutive_errors: int
                      ) -> engine.SharpnessAwareTransformation:
  r"""Skips a step whose updates are not finite, leaving the whole state untouched.

  .. math::
    (u_t, s_{t+1}) = \begin{cases} \mathrm{tx}(g_t, s_t) & \text{if } u_t \text{ is finite} \\
    (0, s_t) & \text{otherwise} \end{cases}

  The counterpart of `optax.apply_if_finite` that judges the step by its result rather than by
  the incoming gradient. Sharpness-aware steps propagate every non-finite value they read into
  their updates, so this catches a NaN or Inf in the clean gradient `g` and in the perturbed
  gradient `g_adv` (which `optax.apply_if_finite(tx, n)` cannot see). A skipped step returns
  zero updates and the state it was given (step count, ascent, correction and inner states):
  training goes on with the next batch as if the bad one had not been drawn. After more than
  `max_consecutive_errors` consecutive bad steps the step is applied anyway, as in optax, so a
  run that diverges for good does not stall silently. The state keeps optax's counters
  (`notfinite_count`, `last_finite`, `total_notfinite`) for logging.

  Two-call form (`tx` built with `two_call=True`, wrapped directly): the unit skipped is the
  pair of calls. A non-finite ascent call returns zero updates and the next (descent) call is
  skipped too; a non-finite descent call returns the params to the clean `w` (exactly where
  `|eps| <= |w|`, otherwise within one rounding, as the engine's own descent call) and restores
  the state from before the pair, including the ascent state, of which the wrapper keeps one
  copy (one counter for SAM, one param-sized buffer for EMA ascents). The counters count
  pairs: a pair with a bad call counts once, and only a good pair resets the consecutive
  count, so a run whose perturbed pass keeps failing is applied anyway after
  `max_consecutive_errors` skipped pairs, as in the one-call form. `optax.apply_if_finite`
  cannot do this (it skips one call, shifting every later pair): the two-call form refuses it.

  Cost: none on good steps beyond one finiteness check of the updates; the bad step's work is
  done and discarded. States may hold infinities legitimately (e.g. a best-loss-so-far), so only
  the updates are checked.

  Args:
    tx: the transformation to protect, e.g. `sam_optax.sam(optax.adamw(1e-3))`. Put it
      outermost, or under `optax.inject_hyperparams` only (which wraps this, not the reverse,
      in the two-call form).
    max_consecutive_errors: how many consecutive non-finite steps (pairs, in the two-call
      form) are skipped before one is applied anyway; >= 0.

  Returns:
    A `SharpnessAwareTransformation` with `update` (and `update_with_aux` when `tx` has one)
    and state `SkipIfNonfiniteState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> tx = sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1), rho=0.05), 3)
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> nan_grad_fn = lambda p: jax.tree.map(lambda x: x * jnp.nan, p)
    >>> updates, state = tx.update(params, state, params, grad_fn=nan_grad_fn)
    >>> updates['w'], int(state.total_notfinite)
    (Array([0., 0.], dtype=float32), 1)

  References:
    Micikevicius et al., *Mixed Precision Training* (skipping steps whose gradients overflow),
    ICLR 2018, https://arxiv.org/abs/1710.03740;
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"skip_if_nonfinite wraps an optax.GradientTransformation (e.g. "
                    f"sam_optax.sam(optax.sgd(0.1))), got {type(tx).__name__}.")
  max_consecutive_errors = check_positive_int("max_consecutive_errors", max_consecutive_errors,
                                              minimum=0)
  with_aux = getattr(tx, "update_with_aux", None)
  has_aux = getattr(tx, "has_aux", False)
  tx = optax.with_extra_args_support(tx)

  def plain_step(grads, inner_state, params=None, **extra):
    updates, inner_state = tx.update(grads, inner_state, params, **extra)
    return updates, inner_state, None

  def update(grads, state, params=None, **extra):
    if _is_two_call(state.inner_state):
      return _skip_pair(tx, max_consecutive_errors, grads, state, params, **extra)
    updates, state, _ = _skip_step(plain_step, max_consecutive_errors, grads, state, params,
                                   **extra)
    return updates, state

  update_with_aux = None
  if with_aux is not None:
    update_with_aux = functools.partial(_skip_step, with_aux, max_consecutive_errors)
  return engine.SharpnessAwareTransformation(functools.partial(_init, tx), update,
                                             update_with_aux, has_aux)


def _init(tx: optax.GradientTransformation, params: Any) -> SkipIfNonfiniteState:
  inner_state = tx.init(params)
  two_call = _is_two_call(inner_state)
  return SkipIfNonfiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.ones([], jnp.bool_),
      total_notfinite=jnp.zeros([], jnp.int32),
      inner_state=inner_state,
      skip_descent=jnp.zeros([], jnp.bool_) if two_call else None,
      # _is_two_call found a SharpnessAwareState (the two-call form) in inner_state.
      saved_before_pair=(jax.tree.map(jnp.copy, _changed_by_ascent_call(inner_state))
                         if two_call else None))


def _skip_step(step, max_consecutive_errors, grads, state, params=None, **extra):
  """One call of the one-call form: `step` (-> updates, state, aux), kept or skipped whole."""
  updates, inner_state, aux = step(grads, state.inner_state, params, **extra)
  finite = _all_finite(updates)
  # As optax.apply_if_finite: apply a good step, or a bad one after too many in a row.
  consecutive = jnp.where(finite, jnp.zeros([], jnp.int32),
                          numerics.safe_increment(state.notfinite_count))
  total = jnp.where(finite, state.total_notfinite,
                    numerics.safe_increment(state.total_notfinite))
  accept = finite | (consecutive > max_consecutive_errors)
  updates, inner_state = control.cond(
      accept, lambda: (updates, inner_state),
      lambda: (optax.tree.zeros_like(updates), state.inner_state))
  new_state = SkipIfNonfiniteState(consecutive, finite, total, inner_state, None, None)
  return updates, new_state, aux


def _skip_pair(tx, max_consecutive_errors, grads, state, params=None, **extra):
  """One call of the two-call form: the unit kept or skipped is the pair of calls."""
  sam_state = state.inner_state
  descending = sam_state.pending.descending

  def rest_of_skipped_pair():
    # The ascent call of this pair was skipped (params never moved): skip its descent call.
    return optax.tree.zeros_like(params), state._replace(skip_descent=jnp.zeros([], jnp.bool_))

  def live_call():
    updates, new_sam_state = tx.update(grads, sam_state, params, **extra)
    finite = _all_finite(updates)
    accept, consecutive, total = _pair_counters(finite, descending, state,
                                                max_consecutive_errors)
    # last_finite: the ascent call's own, then (after the descent call) the pair's.
    finite = finite & (state.last_finite | jnp.logical_not(descending))

    def accepted():
      saved = control.cond(descending, lambda: state.saved_before_pair,
                           lambda: _changed_by_ascent_call(sam_state))
      return updates, new_sam_state, jnp.zeros([], jnp.bool_), saved

    def ascent_rejected():
      return (optax.tree.zeros_like(updates), sam_state, jnp.ones([], jnp.bool_),
              state.saved_before_pair)

    def descent_rejected():
      back, before_pair = _back_before_pair(sam_state, state.saved_before_pair, params, updates)
      return back, before_pair, jnp.zeros([], jnp.bool_), state.saved_before_pair

    updates, new_sam_state, skip_descent, saved = control.cond(
        accept, accepted,
        lambda: control.cond(descending, descent_rejected, ascent_rejected))
    return updates, SkipIfNonfiniteState(consecutive, finite, total, new_sam_state,
                                         skip_descent, saved)

  return control.cond(state.skip_descent, rest_of_skipped_pair, live_call)


def _pair_counters(finite, descending, state, max_consecutive_errors):
  """(apply this call?, consecutive count, total count), counting pairs as the one-call form
  counts steps.

  A good ascent call leaves the counters to the descent call, which ends the pair (resetting
  the consecutive count only when the pair was good). A pair whose bad ascent call was applied
  anyway (after too many bad pairs) was counted then, and its descent call is applied without
  counting.
  """
  ascent_applied_bad = descending & jnp.logical_not(state.last_finite)
  bad = jnp.logical_not(finite) & jnp.logical_not(ascent_applied_bad)
  pair_ends_well = descending & finite & state.last_finite
  consecutive = jnp.where(bad, numerics.safe_increment(state.notfinite_count),
                          jnp.where(pair_ends_well, jnp.zeros([], jnp.int32),
                                    state.notfinite_count))
  total = jnp.where(bad, numerics.safe_increment(state.total_notfinite), state.total_notfinite)
  accept = finite | ascent_applied_bad | (consecutive > max_consecutive_errors)
  return accept, consecutive, total


def _back_before_pair(sam_state, saved_before_pair, params, updates):
  """A rejected descent call: the updates that return the params to the pair's clean `w`, and
  the state from before the pair (what its ascent call changed, restored)."""
  pending = sam_state.pending
  back = jax.tree.map(lambda w, p, u: (w - p).astype(u.dtype), pending.clean_params, params,
                      updates)
  fields, decision = saved_before_pair
  before_pair = sam_state._replace(
      **fields, pending=pending._replace(descending=jnp.zeros([], jnp.bool_),
                                         decision=decision))
  return back, before_pair


# The fields of a two-call state that only descent calls advance.
_DESCENT_FIELDS = ("count", "inner_state", "correction_state", "pending")


def _changed_by_ascent_call(sam_state: Any) -> tuple[dict[str, Any], Any]:
  """What an ascent call changes in a two-call state: every field but `_DESCENT_FIELDS` (the
  ascent's, the cadence's, ... states), and the pending decision (None without window or
  cadence). Saved before the call, so that a rejected pair leaves the state as it was, as a
  skipped one-call step does (a random cadence's key, for one, does not advance)."""
  fields = {name: value for name, value in sam_state._asdict().items()
            if name not in _DESCENT_FIELDS}
  return fields, sam_state.pending.decision


def _all_finite(tree_: Any) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree_)]
  return jnp.all(jnp.asarray(flags, jnp.bool_)) if flags else jnp.asarray(True)


def _is_two_call(state: Any) -> bool:
  """Whether `state` is a two-call sharpness-aware state (refusing one nested deeper)."""
  if isinstance(state, engine.SharpnessAwareState):
    return state.pending is not None
  nested = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, engine.SharpnessAwareState))
  if any(isinstance(x, engine.SharpnessAwareState) and x.pending is not None for x in nested):
    raise ValueError(
        "skip_if_nonfinite must wrap a two-call sharpness-aware transformation directly (it "
        "skips ascent and descent calls in pairs, which it cannot do through another wrapper): "
        "use skip_if_nonfinite(sam_optax.sam(..., two_call=True), n), and put "
        "optax.inject_hyperparams or optax.chain around that.")
  return False
