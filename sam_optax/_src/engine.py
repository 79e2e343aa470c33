"""The engine every variant is built from: ascent, perturbed gradient, correction, inner step.

One step of a sharpness-aware method, given the clean gradient `g` at the params `w`:

  eps   = ascent(g)                      # an optax transformation mapping g to eps
  g_adv = grad_fn(w + eps)               # the user's gradient function at the perturbed point
  d     = correction(g_adv, clean=g)     # optional, e.g. GSAM, renormalization
  u     = inner(d)                       # the user's optax optimizer, at the clean params

A cadence (a function of the step count) may turn the perturbed pass off on some steps (SAM
windows, LookSAM); those steps run `d = correction(g, clean=g)` with one gradient evaluation.
A mask restricts the perturbation (and its norms) to some leaves (SAM-ON).

The same pieces run in a one-call form (`update` evaluates `grad_fn`) and a two-call form
(successive `update` calls alternate ascent and descent, for loops that cannot pass a function).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.core import Tracer

from sam_optax._src import cadences
from sam_optax._src import checks
from sam_optax._src import chunking
from sam_optax._src import masks
from sam_optax._src.evaluation import DataParallel
from sam_optax._src.evaluation import check_point_evaluation
from sam_optax._src.hyperparams import check_positive_int
from sam_optax._src.step import Engine
from sam_optax._src.step import as_cadence
from sam_optax._src.step import one_call_update
from sam_optax._src.transformation import Decision
from sam_optax._src.transformation import PendingDescent
from sam_optax._src.transformation import SharpnessAwareState
from sam_optax._src.transformation import SharpnessAwareTransformation
from sam_optax._src.two_call import two_call_update

__all__ = ["PendingDescent", "SharpnessAwareState", "SharpnessAwareTransformation",
           "sharpness_aware"]

AxisName = Any  # a mapped axis name, or a tuple of them
Cadence = cadences.Cadence | Callable[[jax.Array], jax.Array]  # a piece, or a function of count
Window = tuple | cadences.Cadence  # (start, end): perturbed on steps start <= t < end (end may
# be None); or a cadence piece, whose off steps are the inner optimizer's own
Mask = Any  # a tree of bools (a prefix of params), or a function params -> such a tree


def sharpness_aware(
    inner: optax.GradientTransformation,
    ascent: optax.GradientTransformation,
    *,
    correction: optax.GradientTransformation | None = None,
    cadence: Cadence | None = None,
    window: Window | None = None,
    mask: Mask | None = None,
    has_aux: bool = False,
    two_call: bool = False,
    chunk_size: int | None = None,
    chunk_strategy: str = "vectorized",
    axis_name: AxisName = None,
    average_ascent: bool | None = None,
    param_axis_name: AxisName = None,
    linearize: bool = False,
    exact_at_zero: bool = True,
    decoupled: Callable[[Any, Any, jax.Array], Any] | None = None,
    point_evaluation: str = "sequential",
    point_axis_name: AxisName = None,
) -> SharpnessAwareTransformation:
  r"""Builds a sharpness-aware optimizer from its pieces.

  .. math::
    \epsilon_t = A(g_t), \quad g^{adv}_t = \nabla L(w_t + \epsilon_t), \quad
    d_t = C(g_t, g^{adv}_t), \quad w_{t+1} = w_t + \mathrm{Opt}(d_t)

  with `A` the ascent, `C` the descent correction (identity when None) and `Opt` the inner
  optimizer, which sees the clean params `w_t`.

  One-call form (default)::

    updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))

  `grad_fn` maps params to gradients at those params. With `has_aux=True` it returns
  `(grads, aux)`, and `tx.update_with_aux(...)` returns `(updates, state, aux)` with the aux of
  the perturbed pass (e.g. its loss or BatchNorm statistics); `tx.update` drops it.

  m-sharpness (`chunk_size=m`): pass the batch and a per-batch gradient function::

    updates, state = tx.update(None, state, params, batch=batch,
                               grad_fn=lambda p, b: jax.grad(loss)(p, b))

  The batch's leading axis is split into chunks of `m` examples (or pass `chunks=` with a
  leading chunk axis already). Each chunk gets its own clean gradient `g_J` (so the `grads`
  argument is not used and may be None), its own perturbation `eps_J = A(g_J)` and descent
  gradient `grad L_J(w + eps_J)`; the descent gradients are averaged, and the correction sees the
  averages of `g_J` and `g_adv_J`. `chunk_strategy="vectorized"` maps over chunks with
  `jax.vmap`; `"sequential"` scans them with the memory of one chunk (SAM with gradient
  accumulation). The ascent's state advances by the chunk average of its floating leaves (counts
  and keys from the first chunk). With `has_aux`, the aux is stacked over chunks.

  Data parallelism (`axis_name`, inside `pmap` or `shard_map`): the descent gradient is
  averaged over the axis, and the ascent gradient is either averaged first
  (`average_ascent=True`: global SAM, equal to SAM on the whole batch) or kept per device
  (`average_ascent=False`: m-sharpness with m the per-device batch, Foret et al.'s default);
  the choice is required. The correction sees the averaged clean and descent gradients, and the
  ascent state's floating leaves are averaged so replicas stay identical. Inside `shard_map`,
  which sums the gradient with respect to a replicated input over the axis, the engine calls
  `grad_fn` at params marked varying over the data axis, so that its gradients are each
  device's own; the clean gradient you pass must be too:
  `jax.grad(loss)(jax.lax.pcast(params, axis, to='varying'), batch)` (`average_ascent=False`
  refuses an already-reduced one; with `chunk_size` the engine computes it). When the params
  themselves are sharded over an axis (FSDP-style, inside `shard_map`), name it
  `param_axis_name`: norms and inner products are then summed over it, for the leaves
  sharded over it (leaves left replicated count once; with
  `check_vma=False` or under `pmap` every leaf is taken as sharded). Under plain `jax.jit`
  with sharded arrays no axis is needed: XLA partitions the global computation, and
  `tx.init(params)` called eagerly gives a state with the params' shardings (scalars
  replicated over their mesh).

  Two-call form (`two_call=True`): call `update` twice per step, first with the clean gradient
  `g` at `w` (it returns `eps`, moving the params to `w + eps`), then with the gradient at the
  updated params (it returns `w + Opt(d) - (w + eps)`). The branch not taken is never
  evaluated (`lax.cond`), so a NaN in it cannot leak, and the inner state advances only on the
  descent call. To skip non-finite steps, wrap it in `sam_optax.skip_if_nonfinite`, which skips
  the pair of calls: `optax.apply_if_finite` would skip one call and shift the ascent/descent
  phase for the rest of the run, so `init` (or the first update) under it raises.

  Args:
    inner: the optimizer to wrap, e.g. `optax.sgd(0.1, momentum=0.9)`.
    ascent: an optax transformation mapping the clean gradient to the perturbation `eps`
      (see `sam_optax.normalized_ascent`); it receives the params and the update keywords.
      A `sam_optax.GradientFreeAscent` (Momentum-SAM's, random SAM's, bSAM's) ignores `g`:
      the engine then leaves `g` unread in the perturbed pass (no substitution at `eps = 0`,
      no non-finite test), so under `jax.jit` a clean gradient the caller computed only for
      this update is dead code, and the caller may pass zeros (a correction that reads
      `clean_grads`, e.g. renormalization, or steps outside a window still use it).
    correction: optional optax transformation mapping `g_adv` (its updates) and the keyword
      `clean_grads=g` to the descent direction (see `sam_optax.renormalize`).
    cadence: optional `sam_optax.cadences.Cadence` (a piece with a state, which may read the
      step count, a PRNG key, statistics of the clean gradient), or a function of the step
      count, deciding whether this step takes the perturbed pass; other steps take one
      gradient evaluation (`d = C(g, g)`, the correction called with `perturbed=False`).
    window: optional `(start, end)`: sharpness-aware steps only for `start <= t < end` (`end`
      None for no end), or a `Cadence`; outside the window the step is the inner optimizer's
      on `g`, without correction, with one gradient evaluation at run time.
    mask: optional tree of bools (or function of params returning one) selecting the leaves
      that are perturbed; norms are taken over those leaves only (SAM-ON). Or a
      `sam_optax.masks.Mask` piece: an element-wise mask recomputed at every step from the
      clean gradient, the step count and its state (e.g. the top entries by a score).
    has_aux: whether `grad_fn` returns `(grads, aux)`.
    two_call: use the two-call form instead of the one-call form.
    chunk_size: examples per chunk for m-sharpness (None: the whole batch is one chunk).
    chunk_strategy: `"vectorized"` or `"sequential"` (see above).
    axis_name: the data-parallel axis name (or tuple of names) of an enclosing `pmap` or
      `shard_map`; gradients are averaged over it.
    average_ascent: with `axis_name`, True for global SAM (ascent on the averaged gradient),
      False for per-device ascent (m-sharpness).
    param_axis_name: the axis the params are sharded over (FSDP inside `shard_map`), over which
      norms and inner products are reduced.
    linearize: take the descent gradient from its first-order expansion
      `g_adv = g + H(w) eps` instead of evaluating `grad_fn` at `w + eps`: one Hessian-vector
      product (forward-over-reverse, `jax.jvp` of `grad_fn`) replaces the perturbed gradient
      evaluation. With the unnormalized ascent this is the gradient of the penalized loss
      `L + rho/2 ||grad L||^2` (penalty SAM), with the normalized one that of
      `L + rho ||grad L||`. The aux of `grad_fn` is then the one at `w`. One-call form only.
    exact_at_zero: True to return the clean gradient `g` itself, bit for bit, as the descent
      gradient when the perturbation is zero (`rho = 0`), so that the step is the inner
      optimizer's exactly. This keeps `g` alive through the perturbed pass: one extra
      param-sized buffer of peak memory, and a select over the params. False drops both; a zero
      perturbation then gives the gradient re-evaluated at `w + 0 = w`, equal to `g` up to the
      rounding of a second compilation. The named variants pass False when every radius
      (`rho`, `rho_max`, `rho_min`) is a concrete positive number, so that a zero perturbation
      can only come from a zero gradient; with `rho = 0`, a schedule or an injected
      hyperparameter they keep True. One-call form only, where `grad_fn` runs in the same
      program as the caller's `g`: in the two-call form the descent call's gradient at
      `w + 0 = w` is the caller's own, computed as `g` was (by the same jitted function, it is
      `g` bit for bit), so `g` is not kept for this and the state's structure never depends
      on the radii (a correction or cadence that keeps `g` still selects it).
    decoupled: optional `f(correction_state, params, count) -> update`, added to the inner
      optimizer's update on steps with a perturbed pass (zero on the others), like AdamW's
      decoupled weight decay: the correction leaves a term in its state that bypasses the
      inner optimizer (WSAM's decoupled sharpness step `-lr gamma/(1-gamma) (g_adv - g)`).
    point_evaluation: how the perturbed point and the extra points of an ascent that returns a
      `sam_optax.Perturbation` (SAMPa's auxiliary point) are evaluated: `"sequential"`
      (`grad_fn` once per point) or `"vmap"` (the points stacked and mapped over in one
      batched pass; the memory of all points at once). The same values either way.
    point_axis_name: a `shard_map` mesh axis with one device group per point: each group
      evaluates the point of its index and the gradients are exchanged by one `psum`, so that
      k + 1 points cost the wall time of one gradient on k + 1 devices (the batch is the same
      on every group of this axis; data parallelism goes over `axis_name`). Overrides
      `point_evaluation`.

  The ascent also receives the keywords `count` (the engine's step count, the argument of
  schedules tied to the training step, e.g. GSAM's rho) and `inner_state` (the inner
  optimizer's state before this step's update, e.g. for a perturbation preconditioned by
  Adam's second moment); the correction receives
  `ascent_state`, the ascent's state after this step's ascent (bSAM's descent reads the
  posterior precision kept there). The ascent also receives `correction_state`, the
  correction's state before this step (SAMPa's ascent reads the gradient its correction kept).

  Extra points: an ascent may return `sam_optax.Perturbation(eps, points, carry)` instead of
  `eps`, asking for the gradients at `w + points[j]` (j = 1..k) as well; the engine evaluates
  them together with the perturbed point (`point_evaluation`, `point_axis_name`) and hands them
  to the correction as the keyword `point_grads` (a tuple, averaged over `axis_name` like
  `g_adv`), and `carry` (e.g. an ascent's intermediate gradients) as `ascent_carry`, for this
  step only (not in the state). One-call form only; points not with `mask` or `linearize`.

  Ascents that evaluate gradients themselves (multi-step ascent, USAM2, HUSAM) find `grad_fn`
  (params -> grads, aux dropped) among their update keywords, one-call form only. It is the
  chunk's gradient under m-sharpness, the device-averaged one with `average_ascent=True`, and
  a function of the masked leaves only under `mask`. `optax.MultiSteps` cannot wrap a
  sharpness-aware transformation (it would perturb with the accumulated gradient but descend
  along the last micro-batch's): `update` raises, pointing to `chunk_size=...,
  chunk_strategy="sequential"`, which accumulates with the memory of one chunk.

  Clipping: put `optax.clip_by_global_norm` in the inner optimizer, where it clips the descent
  direction. `optax.chain(optax.clip_by_global_norm(c), tx)` is accepted but clips only the
  clean gradient `g` handed to `update`: a normalized ascent divides its length out, and the
  descent gradient comes from `grad_fn`, unclipped, so it clips nothing the step uses.

  Invalid input: every check on the call (structures, shapes, dtypes, keywords, the mask, the
  batch) runs at trace time, on static information, and costs nothing in a jitted step; the
  state is compared with this transformation's `init` only when the step fails. Hyperparameters
  of the named variants that arrive at run time (schedules, values injected by
  `optax.inject_hyperparams` under `jit`) are checked at every step: out of range or not
  finite, they make the updates NaN, for `sam_optax.skip_if_nonfinite` or
  `optax.apply_if_finite` to catch. Python numbers among the leaves of `grads` and `params`
  are taken as arrays.

  Non-finite gradients: a traced step cannot raise, so a NaN or Inf in the clean gradient `g`
  (when the ascent reads it) or in the perturbed gradient (when a correction comes between it
  and the direction, or in `g + H eps` with `linearize`) makes the whole direction NaN (in the
  two-call form, the ascent call's `eps` and so the pair's updates), even where the rule alone
  would drop it (a loss whose gradient saturates to a finite value at a NaN point, a leaf
  ESAM's draw leaves out); `sam_optax.skip_if_nonfinite` then skips the step. The test reads
  `||g||`, the reduction a normalized ascent already makes, so it costs nothing there. Ascents
  that ignore `g` (a `GradientFreeAscent`) leave it unread. Finite gradients of any
  magnitude (float32 ones of 1e30 or 1e-25 included) give finite norms and ratios: where a sum
  of squares over- or underflows, it is recomputed with the entries divided by a power of two
  near their largest magnitude (inside a `lax.cond`: one scalar test in the normal range).

  Returns:
    A `SharpnessAwareTransformation` (an `optax.GradientTransformationExtraArgs`) whose state
    is a `SharpnessAwareState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sam_optax
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> tx = sam_optax.sharpness_aware(optax.sgd(0.1), sam_optax.normalized_ascent(0.05))
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            grad_fn=jax.grad(loss))
    >>> params = optax.apply_updates(params, updates)

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412
  """
  cadence, window, chunk_size = _checked_options(
      inner, ascent, correction, cadence=cadence, window=window, mask=mask,
      two_call=two_call, chunk_size=chunk_size, chunk_strategy=chunk_strategy,
      axis_name=axis_name, average_ascent=average_ascent, linearize=linearize,
      decoupled=decoupled)
  check_point_evaluation(point_evaluation, point_axis_name)
  # The two-call form's descent call reads the ascent call's gradient only for a correction and
  # the off steps of a cadence or window. Otherwise it is not kept: one param-sized buffer less
  # in the state, and none written by each call. The exact select at a zero perturbation does
  # not need it there: the descent call then receives the caller's own gradient at w + 0 = w,
  # computed as g was. So the state's structure depends on these structural choices only,
  # never on the values of the hyperparameters (`exact_at_zero` follows them): a state built
  # with a float rho fits a schedule's or `optax.inject_hyperparams`' traced rho.
  keeps_clean_grads = correction is not None or cadence is not None or window is not None

  engine = Engine(
      inner=inner, ascent=ascent, correction=correction, window=window, cadence=cadence,
      mask=mask, has_aux=has_aux, chunk_size=chunk_size, chunk_strategy=chunk_strategy,
      parallel=DataParallel(axis_name, average_ascent), param_axis_name=param_axis_name,
      linearize=linearize, exact_at_zero=exact_at_zero, decoupled=decoupled,
      point_evaluation=point_evaluation, point_axis_name=point_axis_name)
  init = functools.partial(_init, engine, two_call, keeps_clean_grads)
  update_with_aux = functools.partial(_update_with_aux, engine, two_call)
  if two_call:
    update = functools.partial(two_call_update, engine, keeps_clean_grads)
  else:
    update = functools.partial(_update_one_call, engine)
  return SharpnessAwareTransformation(
      init, checks.entry_point(update, init), checks.entry_point(update_with_aux, init),
      has_aux, two_call=two_call)


def _checked_options(inner, ascent, correction, *, cadence, window, mask, two_call,
                     chunk_size, chunk_strategy, axis_name, average_ascent, linearize,
                     decoupled):
  """Checks the options of `sharpness_aware` at construction; returns the cadence and
  window pieces they describe and the checked chunk size."""
  for name, piece in (("inner", inner), ("ascent", ascent), ("correction", correction)):
    if piece is not None and not isinstance(piece, optax.GradientTransformation):
      raise TypeError(f"{name} must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), "
                      f"got {type(piece).__name__}.")
  cadence = as_cadence(cadence)
  if decoupled is not None and not callable(decoupled):
    raise TypeError("decoupled must be a function (correction_state, params, count) -> update.")
  window = cadences.as_window(window)
  if axis_name is not None and average_ascent is None:
    raise ValueError(
        f"With axis_name={axis_name!r}, choose how the ascent gradient is formed: "
        f"average_ascent=True for global SAM (ascent on the gradient averaged over devices) or "
        f"average_ascent=False for per-device ascent (m-sharpness, Foret et al.'s default).")
  if axis_name is None and average_ascent is not None:
    raise ValueError("average_ascent only has a meaning with axis_name (data parallelism).")
  if chunk_size is not None:
    chunk_size = check_positive_int("chunk_size", chunk_size)
  if chunk_strategy not in chunking.STRATEGIES:
    raise ValueError(f"chunk_strategy must be one of {chunking.STRATEGIES}, got {chunk_strategy!r}.")
  if two_call and chunk_size is not None:
    raise ValueError("The two-call form cannot split a batch into chunks: use the one-call form "
                     "(pass grad_fn and batch) for m-sharpness.")
  if chunk_size is not None and any(p is not None and p.reads_grads for p in (cadence, window)):
    raise ValueError("A cadence that reads the clean gradient decides before the perturbed "
                     "pass, but with chunk_size the clean gradient is computed per chunk inside "
                     "it: use a cadence that does not read gradients, or drop chunk_size.")
  if chunk_size is not None and isinstance(mask, masks.Mask) and mask.reads_grads:
    raise ValueError("A mask that reads the clean gradient is computed before the perturbed "
                     "pass, but with chunk_size the clean gradient is computed per chunk inside "
                     "it: use a mask that does not read gradients, or drop chunk_size.")
  if two_call and linearize:
    raise ValueError("linearize=True takes a Hessian-vector product of grad_fn, which the "
                     "two-call form does not have: use the one-call form (pass grad_fn=...).")
  return cadence, window, chunk_size

def _init(engine: Engine, two_call: bool, keeps_clean_grads: bool, params):
  checks.refuse_wrappers(two_call)
  if engine.mask is not None and engine.mask_piece is None:
    checks.check_mask(engine.mask(params) if callable(engine.mask) else engine.mask, params)
  pending = None
  if two_call:
    decision = None
    if engine.scheduled:
      decision = Decision(inside=jnp.zeros([], jnp.bool_), perturbed=jnp.zeros([], jnp.bool_))
    pending = PendingDescent(descending=jnp.zeros([], jnp.bool_),
                             clean_grads=(optax.tree.zeros_like(params)
                                          if keeps_clean_grads else None),
                             clean_params=jax.tree.map(jnp.copy, params), decision=decision)
  return _on_params_mesh(SharpnessAwareState(
      count=jnp.zeros([], jnp.int32),
      ascent_state=engine.ascent.init(params),
      correction_state=engine.correction.init(params),
      inner_state=engine.inner.init(params),
      cadence_state=engine.init_cadences(params),
      mask_state=None if engine.mask_piece is None else engine.mask_piece.init(params),
      pending=pending), params)


def _update_one_call(engine: Engine, grads, state, params=None, *, grad_fn=None, **extra):
  updates, state, _ = one_call_update(engine, grads, state, params, False, grad_fn=grad_fn,
                                      **extra)
  return updates, state


def _update_with_aux(engine: Engine, two_call: bool, grads, state, params=None, *,
                     grad_fn=None, **extra):
  if two_call:
    raise ValueError(
        "update_with_aux belongs to the one-call form, and this transformation was built "
        "with two_call=True: there you compute the perturbed gradient (and its aux) "
        "yourself, at the params the ascent call returned, and pass it to tx.update. To get "
        "the perturbed pass's aux from the engine, build it without two_call=True and with "
        "has_aux=True.")
  checks.require_aux(engine.has_aux)
  return one_call_update(engine, grads, state, params, True, grad_fn=grad_fn, **extra)


def _on_params_mesh(state, params):
  """Called eagerly on params placed on a mesh: state leaves left on one device join it.

  Param-shaped leaves made with `zeros_like` already carry their param's sharding; scalars
  (counts, the inner optimizer's included) and other leaves `init` creates from nothing would
  sit on the default device. They are replicated over the params' mesh, so that the state's
  shardings can serve as a jitted step's in/out shardings. Under `jit` (traced params) and for
  unsharded params the state is returned as is.
  """
  meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(params)
            if isinstance(leaf, jax.Array) and not isinstance(leaf, Tracer)
            and isinstance(leaf.sharding, jax.sharding.NamedSharding)}
  if len(meshes) != 1:
    return state
  replicated = jax.sharding.NamedSharding(meshes.pop(), jax.sharding.PartitionSpec())
  if replicated.num_devices == 1:
    return state

  def place(leaf):
    if (isinstance(leaf, jax.Array) and not isinstance(leaf, Tracer)
        and isinstance(leaf.sharding, jax.sharding.SingleDeviceSharding)):
      return jax.device_put(leaf, replicated)
    return leaf
  return jax.tree.map(place, state)
