"""One sharpness-aware step over its pieces: the parts both forms share, and the one-call form.

`Engine` holds one transformation's pieces and options and builds the parts of a step from
them: which steps take the perturbed pass (`decide`), the ascent (`perturb`), the descent
correction (`correct`), the exact select at a zero perturbation and the non-finite guard.
`one_call_update` runs a whole step in one `update` call: this is where the perturbed gradient
is taken (`OneCallStep.one_chunk`). The two-call form splits the same step over two calls
(two_call.py); gradients are evaluated and averaged over devices in evaluation.py.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from sam_optax._src import ascents
from sam_optax._src import cadences
from sam_optax._src import checks
from sam_optax._src import chunking
from sam_optax._src import control
from sam_optax._src import masks
from sam_optax._src import tree
from sam_optax._src.evaluation import DataParallel
from sam_optax._src.evaluation import GradientEvaluator
from sam_optax._src.evaluation import Perturbation
from sam_optax._src.evaluation import evaluate_points
from sam_optax._src.evaluation import masked_grad_fn
from sam_optax._src.evaluation import nan_unless_finite
from sam_optax._src.transformation import CadenceState
from sam_optax._src.transformation import Decision
from sam_optax._src.transformation import SharpnessAwareState

# The step count's increment, one compiled call eagerly (see control.eager_jit).
increment = control.eager_jit(numerics.safe_increment)


class Engine:
  """One transformation's pieces and options, and the parts of a step built from them."""

  def __init__(self, *, inner, ascent, correction, window, cadence, mask, has_aux,
               chunk_size, chunk_strategy, parallel: DataParallel, param_axis_name,
               linearize, exact_at_zero, decoupled, point_evaluation="sequential",
               point_axis_name=None):
    # Without a correction the direction is g_adv itself, which carries any NaN or Inf of
    # g_adv: only a correction (which may drop it) makes the engine check g_adv too.
    self.checks_grads_adv = correction is not None
    self.inner = optax.with_extra_args_support(inner)
    # A GradientFreeAscent (Momentum-SAM, random SAM, bSAM) ignores g: the perturbed pass then
    # leaves g unread (dead code under jit) and out of the non-finite check.
    self.ascent_reads_grads = ascents.ascent_reads_grads(ascent)
    ascent = optax.with_extra_args_support(ascent)
    # A Mask piece (element-wise, stateful) masks the ascent's input and output; a static mask
    # (a tree of bools or a function of params) hands the ascent the selected leaves only.
    self.mask_piece = mask if isinstance(mask, masks.Mask) else None
    if mask is not None:
      ascent = _without_points(ascent)
    mask = None if self.mask_piece is not None else mask
    self.ascent = ascent if mask is None else optax.masked(ascent, mask)
    self.correction = optax.with_extra_args_support(
        correction if correction is not None else optax.identity())
    self.window, self.cadence, self.mask, self.has_aux = window, cadence, mask, has_aux
    self.chunk_size, self.chunk_strategy = chunk_size, chunk_strategy
    self.parallel, self.param_axis_name = parallel, param_axis_name
    # Options kept as flags, as no general piece covers them yet:
    # - linearize: how g_adv is obtained (g + H eps by one HVP instead of grad_fn at w + eps),
    #   used by penalty SAM only; its natural home is an evaluation piece beside
    #   GradientEvaluator, which no second variant needs yet.
    # - exact_at_zero: a cost choice, not a rule: keep g through the pass to hand it back bit
    #   for bit at eps = 0, decided by build_variant from the concreteness of the radii.
    # - decoupled: WSAM's term added after the inner optimizer, the one piece acting there.
    self.linearize = linearize
    self.exact_at_zero, self.decoupled = exact_at_zero, decoupled
    # How the perturbed point and an ascent's extra points (a `Perturbation`) are evaluated.
    self.point_evaluation, self.point_axis_name = point_evaluation, point_axis_name
    # Whether some steps skip the perturbed pass (then decided at run time, in a lax.cond).
    self.scheduled = window is not None or cadence is not None

  # -- which steps take the perturbed pass ---------------------------------------------------

  def init_cadences(self, params) -> CadenceState:
    return CadenceState(
        window=None if self.window is None else self.window.init(params),
        cadence=None if self.cadence is None else self.cadence.init(params))

  def reads_clean_gradient(self) -> bool:
    """Whether a window, cadence or mask piece reads the clean gradient to decide."""
    pieces = (self.window, self.cadence, self.mask_piece)
    return any(p is not None and p.reads_grads for p in pieces)

  def decide(self, mean_grads, state, params) -> tuple[Decision | None, CadenceState]:
    """This step's decision and the cadences' next state (None when every step is perturbed).

    `mean_grads` is the clean gradient averaged over devices (None when no piece reads it,
    see `reads_clean_gradient`), so that every replica decides alike.
    """
    if not self.scheduled:
      return None, state.cadence_state

    def run(piece, piece_state):
      if piece is None:
        return jnp.asarray(True), piece_state
      read = mean_grads if piece.reads_grads else None
      take, piece_state = piece.update(read, piece_state, params, count=state.count,
                                       param_axis_name=self.param_axis_name)
      return jnp.asarray(take, jnp.bool_), piece_state

    inside, window_state = run(self.window, state.cadence_state.window)
    take, cadence_state = run(self.cadence, state.cadence_state.cadence)
    decision = Decision(inside=inside, perturbed=inside & take)
    return decision, CadenceState(window=window_state, cadence=cadence_state)

  # -- an element-wise mask -------------------------------------------------------------------

  def mask_entries(self, mean_grads, state, params):
    """This step's element-wise mask (None without a Mask piece) and the piece's next state;
    `mean_grads` as in `decide`."""
    if self.mask_piece is None:
      return None, state.mask_state
    read = mean_grads if self.mask_piece.reads_grads else None
    return self.mask_piece.update(read, state.mask_state, params, count=state.count,
                                  param_axis_name=self.param_axis_name)

  # -- the pieces ----------------------------------------------------------------------------

  def perturb(self, grads, ascent_state, params, extra, entries=None):
    """eps = A(g), zero outside the mask (`entries`: this step's element-wise mask)."""
    if entries is not None:
      return self.perturb_entries(grads, ascent_state, params, extra, entries)
    mask_tree = self.mask(params) if callable(self.mask) else self.mask
    if self.mask is not None:
      checks.check_mask(mask_tree, params)
    if self.mask is not None and extra.get("grad_fn") is not None:
      # optax.masked hands the ascent the masked leaves only: so must its gradient function.
      extra = dict(extra, grad_fn=masked_grad_fn(extra["grad_fn"], mask_tree, params))
    eps, ascent_state = self.ascent.update(grads, ascent_state, params,
                                           param_axis_name=self.param_axis_name, **extra)
    if self.mask is not None:
      eps = jax.tree.map(lambda keep, e: e if keep else optax.tree.zeros_like(e),
                         mask_tree, eps)
    return eps, ascent_state

  def perturb_entries(self, grads, ascent_state, params, extra, entries):
    """eps = A(g masked), zero outside the element-wise mask: the ascent and its norms see the
    selected entries only (the others are zero in its input and in what grad_fn returns)."""
    if extra.get("grad_fn") is not None:
      grad_fn = extra["grad_fn"]
      extra = dict(extra, grad_fn=lambda p: masks.apply(entries, grad_fn(p)))
    eps, ascent_state = self.ascent.update(masks.apply(entries, grads), ascent_state, params,
                                           param_axis_name=self.param_axis_name, **extra)
    return masks.apply(entries, eps), ascent_state

  def correct(self, grads, grads_adv, correction_state, params, perturbed, extra,
              ascent_state, point_grads=(), carry=None):
    """d = C(g_adv, clean=g); the gradients at an ascent's extra points and its carry (a
    `Perturbation`'s), when it returned some, as the keywords `point_grads` and `ascent_carry`
    (corrections of other variants never see them)."""
    if point_grads:
      extra = dict(extra, point_grads=point_grads)
    if carry is not None:
      extra = dict(extra, ascent_carry=carry)
    return self.correction.update(grads_adv, correction_state, params, clean_grads=grads,
                                  perturbed=perturbed, param_axis_name=self.param_axis_name,
                                  ascent_state=ascent_state, **extra)

  def add_decoupled(self, updates, correction_state, params, count, decision):
    """The inner optimizer's update plus the decoupled term, on steps with a perturbed pass."""
    if self.decoupled is None:
      return updates
    term = self.decoupled(correction_state, params, count)
    if decision is not None:
      term = tree.select(decision.perturbed, term, optax.tree.zeros_like(term))
    return jax.tree.map(lambda u, v: (u + v.astype(u.dtype)).astype(u.dtype), updates, term)

  # -- exactness and non-finite gradients ----------------------------------------------------

  def nonfinite_through(self, values, *gradients):
    """`values`, made NaN everywhere when one of `gradients` holds a NaN or an infinity.

    A traced step cannot raise, so a non-finite gradient must reach the updates for
    `skip_if_nonfinite` and `optax.apply_if_finite` to see it; the rules alone may drop it (a
    perturbed gradient that saturates to a finite value at a NaN point, a leaf ESAM did not
    draw, a correction's ratio). The test reads `||g||`, which is non-finite exactly when an
    entry is (`tree.norm` does not overflow): the reduction the normalized ascents already make
    on `g`, which XLA computes once.
    """
    if not gradients:
      return values
    return nan_unless_finite(values, gradients, axis_name=self.param_axis_name)

  def read_gradients(self, clean_grads, grads_adv):
    """The gradients a perturbed step's direction must carry the non-finite entries of: g when
    the ascent reads it (a variant that ignores g, e.g. Momentum-SAM, must not make the caller
    compute it), and g_adv when a correction comes between it and the direction."""
    return (((clean_grads,) if self.ascent_reads_grads else ())
            + ((grads_adv,) if self.checks_grads_adv else ()))

  def keep_clean_at_zero(self, eps, clean_grads, grads_adv):
    """A zero perturbation (rho = 0, a zero gradient) leaves the clean gradient: select it, so
    that the step equals the inner optimizer's bit for bit whatever order XLA reduces in."""
    if not (self.ascent_reads_grads and self.exact_at_zero) or clean_grads is None:
      # Reading g here would keep the caller's clean gradient alive; the two-call form keeps
      # it only for a correction or cadence (see keeps_clean_grads in engine.py).
      return grads_adv
    return tree.select(self.zero_everywhere(eps), clean_grads, grads_adv)

  def zero_everywhere(self, eps):
    """Whether the perturbation is zero on every shard of the params."""
    zero = tree.all_zero(eps)
    if self.param_axis_name is None:
      return zero
    return jax.lax.pmin(zero.astype(jnp.int32), self.param_axis_name).astype(jnp.bool_)


def one_call_update(engine: Engine, grads, state, params, returns_aux, *, grad_fn, batch=None,
                    chunks=None, **extra):
  """One whole step in one call: `(updates, state, aux)`."""
  checks.refuse_wrappers(False)
  checks.check_state(state, False)
  chunked = checks.chunked_batch(engine.chunk_size, batch, chunks)
  checks.check_params_and_grads(grads, params, optional=chunked is not None)
  checks.check_grad_fn(grad_fn, chunked is not None)
  checks.refuse_reserved_keywords(extra)
  grad_fn = engine.parallel.at_varying(checks.explained_signature(grad_fn, chunked is not None))
  # One average over devices for every piece that decides from the clean gradient.
  mean_grads = engine.parallel.mean(grads) if engine.reads_clean_gradient() else None
  decision, cadence_state = engine.decide(mean_grads, state, params)
  entries, mask_state = engine.mask_entries(mean_grads, state, params)
  step = OneCallStep(engine, grads, state, params, grad_fn, chunked, extra, entries)
  if decision is None:
    direction, ascent_state, correction_state, aux = step.perturbed_step(None)
  else:
    step.eager = control.is_concrete(decision.perturbed)
    step.returns_aux = returns_aux
    direction, ascent_state, correction_state, aux = control.cond(
        decision.perturbed, step.perturbed_step, lambda _: step.plain_step(decision), None)
  updates, inner_state = engine.inner.update(direction, state.inner_state, params, **extra)
  updates = engine.add_decoupled(updates, correction_state, params, state.count, decision)
  new_state = SharpnessAwareState(
      count=increment(state.count), ascent_state=ascent_state,
      correction_state=correction_state, inner_state=inner_state,
      cadence_state=cadence_state, mask_state=mask_state, pending=state.pending)
  return updates, new_state, aux


class OneCallStep:
  """The branches of one one-call step: with the perturbed pass, and without it."""

  def __init__(self, engine: Engine, grads, state, params, grad_fn, chunked, extra, entries):
    self.engine, self.grads, self.state, self.params = engine, grads, state, params
    self.grad_fn, self.chunked, self.extra, self.entries = grad_fn, chunked, extra, entries
    self.eager, self.returns_aux = False, False
    # Called with concrete arrays (not under a trace), the sequential strategy loops in Python
    # rather than compiling a lax.scan over a fresh closure on every call.
    self.eager_chunks = chunked is not None and control.is_concrete_tree(
        (chunked, params, state))

  def reduce(self, fn):
    return chunking.reduce(fn, self.chunked, self.engine.chunk_strategy,
                           eager=self.eager_chunks)

  def one_chunk(self, batch_grad_fn: Callable, clean_grads):
    """The perturbed pass on one (chunk of the) batch: (g, g_adv, ascent state, point grads),
    aux.

    Here the perturbed gradient is taken: eps = A(g), g_adv = grad_fn(w + eps); with the
    gradients at the ascent's extra points (a `Perturbation`), evaluated together with it.
    """
    engine, state, params = self.engine, self.state, self.params
    evaluate = GradientEvaluator(batch_grad_fn, engine.has_aux, params)
    if clean_grads is None:
      clean_grads, _ = evaluate(params)
    ascent_grad_fn = lambda p: engine.parallel.ascent_input(evaluate.grads_only(p))
    eps, ascent_state = engine.perturb(
        engine.parallel.ascent_input(clean_grads), state.ascent_state, params,
        dict(self.extra, grad_fn=ascent_grad_fn, count=state.count,
             inner_state=state.inner_state, correction_state=state.correction_state),
        self.entries)
    eps, offsets, carry = split_perturbation(eps, engine)
    point_grads = ()
    if engine.linearize:
      grads_adv, aux, grads_at_params = evaluate.linearized(params, clean_grads, eps)
      # What grad_fn returned is not in g + H eps (a constant NaN has no derivative): carry
      # its NaN or Inf there, as the other variants' perturbed gradient carries its own.
      grads_adv = engine.nonfinite_through(grads_adv, grads_at_params)
    else:
      points = [tree.add(params, eps)] + [tree.add(params, o) for o in offsets]
      all_grads, aux = evaluate_points(evaluate, points, engine.point_evaluation,
                                       engine.point_axis_name)
      grads_adv, point_grads = all_grads[0], tuple(all_grads[1:])
    grads_adv = engine.keep_clean_at_zero(eps, clean_grads, grads_adv)
    return (clean_grads, grads_adv, ascent_state, point_grads, carry), aux

  def perturbed_pass(self):
    if self.chunked is None:
      return self.one_chunk(self.grad_fn, self.grads)
    return self.reduce(lambda b: self.one_chunk(lambda p: self.grad_fn(p, b), None))

  def clean_gradient(self):
    if self.chunked is None:
      return self.grads
    def clean(b):
      evaluate = GradientEvaluator(lambda p: self.grad_fn(p, b), self.engine.has_aux,
                                   self.params)
      return evaluate(self.params)[0], None
    return self.reduce(clean)[0]

  def perturbed_step(self, _):
    engine, state = self.engine, self.state
    (clean_grads, grads_adv, ascent_state, point_grads, carry), aux = self.perturbed_pass()
    clean_grads, grads_adv = engine.parallel.mean(clean_grads), engine.parallel.mean(grads_adv)
    point_grads = engine.parallel.mean(point_grads)
    # A per-device ascent's carry is averaged like its state, so replicas correct alike.
    ascent_state, carry = engine.parallel.synced((ascent_state, carry))
    direction, correction_state = engine.correct(clean_grads, grads_adv, state.correction_state,
                                                 self.params, True, self.extra, ascent_state,
                                                 point_grads, carry)
    # The extra points' gradients reach the direction through the correction, which may drop
    # a non-finite entry: carried like g_adv's.
    direction = engine.nonfinite_through(
        direction, *engine.read_gradients(clean_grads, grads_adv), *point_grads)
    return direction, ascent_state, correction_state, aux

  def plain_step(self, decision: Decision):
    """A step without the perturbed pass: one gradient evaluation, `d = C(g, g)` inside the
    window (a cadence's off step: LookSAM reuses its stored component there), the inner
    optimizer's own step on `g` outside it."""
    engine, state = self.engine, self.state
    clean_grads = engine.parallel.mean(self.clean_gradient())

    def corrected(_):
      direction, correction_state = engine.correct(
          clean_grads, clean_grads, state.correction_state, self.params, False, self.extra,
          state.ascent_state)
      return engine.nonfinite_through(direction, clean_grads), correction_state

    def uncorrected(_):
      return clean_grads, state.correction_state

    if engine.window is None:
      direction, correction_state = corrected(None)
    else:
      direction, correction_state = control.cond(decision.inside, corrected, uncorrected, None)
    return direction, state.ascent_state, correction_state, self.zero_aux()

  def zero_aux(self):
    """Zeros shaped like grad_fn's aux, for a step without the perturbed pass.

    Under a trace, from a trace of the perturbed pass, whose output the lax.cond branches must
    match exactly. Eagerly, only when the caller reads the aux (update_with_aux; tx.update
    drops it), and from a trace of grad_fn alone: a trace of the whole pass per step
    (LookSAM's reuse steps, 4 in 5) cost 20x the step itself.
    """
    if not self.engine.has_aux:
      return None
    if not self.eager:
      aux_shape = jax.eval_shape(self.perturbed_step, None)[3]
    elif self.returns_aux:
      aux_shape = self.grad_fn_aux_shape()
    else:
      return None
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)

  def grad_fn_aux_shape(self):
    """The shape of the perturbed pass's aux, from grad_fn alone: the perturbed point has the
    params' shapes and dtypes (and a linearized pass returns the aux at the params)."""
    params, chunked = self.params, self.chunked

    def aux_at(point, b=None):
      batch_grad_fn = self.grad_fn if chunked is None else (lambda p: self.grad_fn(p, b))
      return GradientEvaluator(batch_grad_fn, self.engine.has_aux, params)(point)[1]

    if chunked is None:
      return jax.eval_shape(aux_at, params)
    first = jax.tree.map(lambda x: x[0], chunked)
    k = chunking.num_chunks(chunked)  # the aux is stacked over chunks
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct((k,) + s.shape, s.dtype),
                        jax.eval_shape(aux_at, params, first))


def split_perturbation(out, engine: Engine, two_call: bool = False):
  """`(eps, offsets, carry)` from what an ascent returned: `eps`, or a `Perturbation`."""
  if not isinstance(out, Perturbation):
    return out, (), None
  offsets = tuple(out.points)
  if out.carry is not None and two_call:
    raise ValueError(
        "This ascent hands a carry to the correction (a Perturbation with carry), which in "
        "the two-call form runs in the next call: it would have to be kept in the state. Use "
        "the one-call form: tx.update(grads, state, params, grad_fn=...).")
  if offsets and two_call:
    raise ValueError(
        "This ascent asks for gradients at extra points (a Perturbation with points, e.g. "
        "SAMPa's auxiliary point), which the engine evaluates with grad_fn: the two-call form "
        "has no grad_fn. Use the one-call form: tx.update(grads, state, params, "
        "grad_fn=lambda p: jax.grad(loss)(p, batch)).")
  if offsets and engine.linearize:
    raise ValueError("linearize=True replaces the perturbed pass by a Hessian-vector product; "
                     "it cannot also evaluate an ascent's extra points.")
  if offsets and (engine.mask is not None or engine.mask_piece is not None):
    raise ValueError("mask= restricts eps to some entries, but this ascent's extra points "
                     "would be left unmasked: a mask cannot be combined with an ascent that "
                     "asks for gradients at extra points.")
  return out.eps, offsets, out.carry


def as_cadence(cadence) -> cadences.Cadence | None:
  """A `Cadence` piece from what `cadence=` accepts (None, a piece, a function of the count)."""
  if cadence is None or isinstance(cadence, cadences.Cadence):
    return cadence
  if not callable(cadence):
    raise TypeError("cadence must be a function of the step count returning a bool.")
  return cadences.from_function(cadence)


def _without_points(ascent):
  """`ascent`, refusing at its first trace to return extra points (a `Perturbation`): a mask
  restricts `eps` only, and would leave the extra points and their gradients unmasked."""
  def update(updates, state, params=None, **extra):
    out, state = ascent.update(updates, state, params, **extra)
    if isinstance(out, Perturbation):
      raise ValueError(
          "this ascent returns a sam_optax.Perturbation (extra points to evaluate, e.g. "
          "SAMPa's), which a mask cannot restrict: drop mask=, or build the mask into the "
          "ascent's own points.")
    return out, state
  return optax.GradientTransformationExtraArgs(ascent.init, update)
