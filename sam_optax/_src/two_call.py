"""How the two-call form splits a step over two `update` calls.

Successive calls alternate (`state.pending.descending` says which comes next):

  ascent call  (gradient g at w):        decide, eps = A(g); returns eps (params move to w + eps)
  descent call (gradient g_adv at w+eps): d = C(g_adv, clean=g); returns w + Opt(d) - (w + eps)

The ascent call stores what the descent call needs in `PendingDescent`: the params `w`, the
gradient `g` (only when a correction or a cadence reads it) and the decision of the window and
the cadence, which the descent call follows; the cadences' state advances once per pair. The
branch not taken is never evaluated (`lax.cond`), so a NaN in it cannot leak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import checks
from sam_optax._src import control
from sam_optax._src import tree
from sam_optax._src.step import Engine
from sam_optax._src.step import increment
from sam_optax._src.step import split_perturbation
from sam_optax._src.transformation import PendingDescent
from sam_optax._src.transformation import SharpnessAwareState


def two_call_update(engine: Engine, keeps_clean_grads: bool, grads, state, params=None,
                    **extra):
  """One call of the two-call form: the ascent or the descent half of a step."""
  checks.refuse_wrappers(True)
  checks.check_state(state, True)
  checks.check_params_and_grads(grads, params)
  checks.refuse_one_call_keywords(extra)
  checks.refuse_reserved_keywords(extra)
  extra = {k: v for k, v in extra.items() if k not in checks.ENGINE_KEYWORDS}
  pending = state.pending
  mean_grads = engine.parallel.mean(grads)
  updates, new_state, decision = control.cond(
      pending.descending,
      lambda _: _descent_call(engine, mean_grads, state, params, extra),
      lambda _: _ascent_call(engine, grads, mean_grads, state, params, extra), None)
  # The next descent call needs this call's gradient and params. A descent call writes its own
  # too (the ascent call that follows never reads them): written outside the conditional, the
  # pending buffers are not copied through its branches (on a CPU MLP benchmark this halved
  # the two-call form's overhead over the hand-written step, benchmarks/overhead.py).
  new_pending = PendingDescent(descending=jnp.logical_not(pending.descending),
                               clean_grads=mean_grads if keeps_clean_grads else None,
                               clean_params=params, decision=decision)
  return updates, new_state._replace(pending=new_pending)


def _ascent_call(engine: Engine, grads, mean_grads, state, params, extra):
  """eps = A(g) on a perturbed step, zero on the others; the inner state does not move."""
  decision, cadence_state = engine.decide(mean_grads, state, params)
  entries, mask_state = engine.mask_entries(mean_grads, state, params)

  def with_perturbation(_):
    eps, ascent_state = engine.perturb(
        engine.parallel.ascent_input(grads), state.ascent_state, params,
        dict(extra, count=state.count, inner_state=state.inner_state,
             correction_state=state.correction_state), entries)
    # An ascent asking for extra points (grad_fn) or handing a carry to the correction (which
    # runs in the next call) is refused here.
    eps, _, _ = split_perturbation(eps, engine, two_call=True)
    if engine.ascent_reads_grads:
      # A NaN eps reaches the descent call's updates, w - (w + eps) + Opt(d), whatever the
      # gradient at w + eps: the pair's updates carry a non-finite g.
      eps = engine.nonfinite_through(eps, mean_grads)
    return eps, engine.parallel.synced(ascent_state)

  def without_perturbation(_):
    return optax.tree.zeros_like(grads), state.ascent_state

  if decision is None:
    eps, ascent_state = with_perturbation(None)
  else:
    eps, ascent_state = control.cond(decision.perturbed, with_perturbation,
                                     without_perturbation, None)
  new_state = state._replace(ascent_state=ascent_state, cadence_state=cadence_state,
                             mask_state=mask_state, pending=None)
  return optax.tree.cast_like(eps, params), new_state, decision


def _descent_call(engine: Engine, mean_grads, state, params, extra):
  """d = C(g_adv, clean=g) (the ascent call's decision says which), then the inner step from
  the clean params: the updates take the params from w + eps back to w and on to w + Opt(d)."""
  pending = state.pending
  clean_grads, clean_params, decision = (pending.clean_grads, pending.clean_params,
                                         pending.decision)

  def corrected(perturbed):
    def branch(_):
      grads_adv = mean_grads if perturbed else clean_grads
      eps = tree.sub(params, clean_params)
      grads_adv = engine.keep_clean_at_zero(eps, clean_grads, grads_adv)
      direction, correction_state = engine.correct(clean_grads, grads_adv,
                                                   state.correction_state, clean_params,
                                                   perturbed, extra, state.ascent_state)
      if engine.checks_grads_adv:
        direction = engine.nonfinite_through(direction, grads_adv)
      return direction, correction_state
    return branch

  def uncorrected(_):
    return clean_grads, state.correction_state

  if decision is None:
    direction, correction_state = corrected(True)(None)
  else:
    off_step = corrected(False) if engine.window is None else (
        lambda _: control.cond(decision.inside, corrected(False), uncorrected, None))
    direction, correction_state = control.cond(decision.perturbed, corrected(True), off_step,
                                               None)
  step, inner_state = engine.inner.update(direction, state.inner_state, clean_params, **extra)
  step = engine.add_decoupled(step, correction_state, clean_params, state.count, decision)
  # Back to w, then the inner step: the params end at w + Opt(d), as in the one-call form.
  updates = jax.tree.map(lambda w, p, u: (w - p + u).astype(p.dtype),
                         clean_params, params, step)
  new_state = SharpnessAwareState(
      count=increment(state.count), ascent_state=state.ascent_state,
      correction_state=correction_state, inner_state=inner_state,
      cadence_state=state.cadence_state, mask_state=state.mask_state, pending=None)
  return updates, new_state, decision
