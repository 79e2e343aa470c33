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

import collections.abc
import functools
import inspect
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from sam_optax._src import chunking
from sam_optax._src import control
from sam_optax._src import tree
from sam_optax._src.hyperparams import check_positive_int
from sam_optax._src.transformation import PendingDescent
from sam_optax._src.transformation import SharpnessAwareState
from sam_optax._src.transformation import SharpnessAwareTransformation

# Keywords the engine consumes; every other keyword of `update` is forwarded to the ascent, the
# correction and the inner optimizer.
_ENGINE_KEYWORDS = ("grad_fn", "batch", "chunks")

AxisName = Any  # a mapped axis name, or a tuple of them
Cadence = Callable[[jax.Array], jax.Array]
Window = tuple  # (start, end): the perturbed pass runs on steps start <= t < end (end may be None)
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
    ascent_reads_grads: bool = True,
    exact_at_zero: bool = True,
    decoupled: Callable[[Any, Any, jax.Array], Any] | None = None,
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
    correction: optional optax transformation mapping `g_adv` (its updates) and the keyword
      `clean_grads=g` to the descent direction (see `sam_optax.renormalize`).
    cadence: optional function of the step count returning whether this step takes the
      perturbed pass; other steps take one gradient evaluation (`d = C(g, g)`).
    window: optional `(start, end)`: sharpness-aware steps only for `start <= t < end` (`end`
      None for no end); outside the window the step is the inner optimizer's on `g`, with one
      gradient evaluation at run time.
    mask: optional tree of bools (or function of params returning one) selecting the leaves
      that are perturbed; norms are taken over those leaves only (SAM-ON).
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
    ascent_reads_grads: False for ascents that do not read the clean gradient `g` (they take
      no gradient, like Momentum-SAM, or evaluate their own, like random SAM and bSAM). The
      engine then does not substitute `g` for the perturbed gradient when `eps = 0`, so the
      perturbed pass never reads `g`: under `jax.jit` a clean gradient the caller computed only
      for this update is dead code, and the caller may pass zeros (a correction that reads
      `clean_grads`, e.g. renormalization, or steps outside a window still use it).
    decoupled: optional `f(correction_state, params, count) -> update`, added to the inner
      optimizer's update on steps with a perturbed pass (zero on the others), like AdamW's
      decoupled weight decay: the correction leaves a term in its state that bypasses the
      inner optimizer (WSAM's decoupled sharpness step `-lr gamma/(1-gamma) (g_adv - g)`).

  The ascent also receives the keywords `count` (the engine's step count, the argument of
  schedules tied to the training step, e.g. GSAM's rho) and `inner_state` (the inner
  optimizer's state before this step's update, e.g. for a perturbation preconditioned by
  Adam's second moment); the correction receives
  `ascent_state`, the ascent's state after this step's ascent (bSAM's descent reads the
  posterior precision kept there).

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
  that ignore `g` (`ascent_reads_grads=False`) leave it unread. Finite gradients of any
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
  for name, piece in (("inner", inner), ("ascent", ascent), ("correction", correction)):
    if piece is not None and not isinstance(piece, optax.GradientTransformation):
      raise TypeError(f"{name} must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), "
                      f"got {type(piece).__name__}.")
  if cadence is not None and not callable(cadence):
    raise TypeError("cadence must be a function of the step count returning a bool.")
  if decoupled is not None and not callable(decoupled):
    raise TypeError("decoupled must be a function (correction_state, params, count) -> update.")
  window = _check_window(window)
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
  if two_call and linearize:
    raise ValueError("linearize=True takes a Hessian-vector product of grad_fn, which the "
                     "two-call form does not have: use the one-call form (pass grad_fn=...).")
  # The two-call form's descent call reads the ascent call's gradient only for a correction and
  # the off steps of a cadence or window. Otherwise it is not kept: one param-sized buffer less
  # in the state, and none written by each call. The exact select at a zero perturbation does
  # not need it there: the descent call then receives the caller's own gradient at w + 0 = w,
  # computed as g was. So the state's structure depends on these structural choices only,
  # never on the values of the hyperparameters (`exact_at_zero` follows them): a state built
  # with a float rho fits a schedule's or `optax.inject_hyperparams`' traced rho.
  keeps_clean_grads = correction is not None or cadence is not None or window is not None
  inner = optax.with_extra_args_support(inner)
  ascent = optax.with_extra_args_support(ascent)
  # Without a correction the direction is g_adv itself, which carries any NaN or Inf of g_adv:
  # only a correction (which may drop it) makes the engine check g_adv too.
  checks_grads_adv = correction is not None
  correction = optax.with_extra_args_support(correction if correction is not None
                                             else optax.identity())
  if mask is not None:
    ascent = optax.masked(ascent, mask)

  def init(params):
    _refuse_wrappers(two_call)
    if mask is not None:
      _check_mask(mask(params) if callable(mask) else mask, params)
    pending = None
    if two_call:
      pending = PendingDescent(descending=jnp.zeros([], jnp.bool_),
                               clean_grads=(optax.tree.zeros_like(params)
                                            if keeps_clean_grads else None),
                               clean_params=jax.tree.map(jnp.copy, params))
    return _on_params_mesh(SharpnessAwareState(
        count=jnp.zeros([], jnp.int32),
        ascent_state=ascent.init(params),
        correction_state=correction.init(params),
        inner_state=inner.init(params),
        pending=pending), params)

  def perturb(grads, ascent_state, params, extra):
    """eps = A(g), zero outside the mask."""
    mask_tree = mask(params) if callable(mask) else mask
    if mask is not None:
      _check_mask(mask_tree, params)
    if mask is not None and extra.get("grad_fn") is not None:
      # optax.masked hands the ascent the masked leaves only: so must its gradient function.
      extra = dict(extra, grad_fn=_masked_grad_fn(extra["grad_fn"], mask_tree, params))
    eps, ascent_state = ascent.update(grads, ascent_state, params,
                                      param_axis_name=param_axis_name, **extra)
    if mask is not None:
      eps = jax.tree.map(lambda keep, e: e if keep else optax.tree.zeros_like(e),
                         mask_tree, eps)
    return eps, ascent_state

  def correct(grads, grads_adv, correction_state, params, perturbed, extra, ascent_state):
    return correction.update(grads_adv, correction_state, params, clean_grads=grads,
                             perturbed=perturbed, param_axis_name=param_axis_name,
                             ascent_state=ascent_state, **extra)

  def add_decoupled(updates, correction_state, params, count):
    """The inner optimizer's update plus the decoupled term, on steps with a perturbed pass."""
    if decoupled is None:
      return updates
    term = decoupled(correction_state, params, count)
    if cadence is not None or window is not None:
      term = tree.select(takes_perturbed_pass(count), term, optax.tree.zeros_like(term))
    return jax.tree.map(lambda u, v: (u + v.astype(u.dtype)).astype(u.dtype), updates, term)

  def nonfinite_through(values, *gradients):
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
    return _nan_unless_finite(values, gradients, axis_name=param_axis_name)

  def read_gradients(clean_grads, grads_adv):
    """The gradients a perturbed step's direction must carry the non-finite entries of: g when
    the ascent reads it (a variant that ignores g, e.g. Momentum-SAM, must not make the caller
    compute it), and g_adv when a correction comes between it and the direction."""
    return (((clean_grads,) if ascent_reads_grads else ())
            + ((grads_adv,) if checks_grads_adv else ()))

  def keep_clean_at_zero(eps, clean_grads, grads_adv):
    """A zero perturbation (rho = 0, a zero gradient) leaves the clean gradient: select it, so
    that the step equals the inner optimizer's bit for bit whatever order XLA reduces in."""
    if not (ascent_reads_grads and exact_at_zero) or clean_grads is None:
      # Reading g here would keep the caller's clean gradient alive; the two-call form keeps
      # it only for a correction or cadence (see keeps_clean_grads).
      return grads_adv
    return tree.select(zero_everywhere(eps), clean_grads, grads_adv)

  def zero_everywhere(eps):
    """Whether the perturbation is zero on every shard of the params."""
    zero = tree.all_zero(eps)
    if param_axis_name is None:
      return zero
    return jax.lax.pmin(zero.astype(jnp.int32), param_axis_name).astype(jnp.bool_)

  def data_mean(tree_):
    """The average over the data-parallel axis (identity without one)."""
    return tree_ if axis_name is None else _pmean(tree_, axis_name)

  def ascent_input(grads):
    if axis_name is not None and not average_ascent:
      _check_per_device(grads, axis_name)
    return data_mean(grads) if average_ascent else grads

  def synced(ascent_state):
    """Per-device ascents leave replicas' states apart: average their floating leaves."""
    if axis_name is None or average_ascent:
      return ascent_state
    return jax.tree.map(
        lambda x: _pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        ascent_state)

  def in_window(count):
    if window is None:
      return jnp.asarray(True)
    start, end = window
    inside = count >= start
    return inside if end is None else inside & (count < end)

  def takes_perturbed_pass(count):
    on = in_window(count)
    return on if cadence is None else on & cadence(count)

  def take_step(grads, state, params, returns_aux, *, grad_fn, batch=None, chunks=None,
                **extra):
    _refuse_wrappers(two_call)
    _check_state(state, two_call)
    chunked = _chunked_batch(chunk_size, batch, chunks)
    _check_params_and_grads(grads, params, optional=chunked is not None)
    _check_grad_fn(grad_fn, chunked is not None)
    _refuse_reserved_keywords(extra)
    grad_fn = _explained_signature(grad_fn, chunked is not None)
    if axis_name is not None:
      # Inside shard_map, gradients at params marked varying over the data axis are each
      # device's own (not summed over the axis), which the averaging below expects.
      grad_fn = functools.partial(_at_varying_params, grad_fn, axis_name)

    def one_chunk(batch_grad_fn):
      """The perturbed pass on one (chunk of the) batch: (g, g_adv, ascent state), aux."""
      def run(clean_grads):
        evaluate = _GradientEvaluator(batch_grad_fn, has_aux, params)
        if clean_grads is None:
          clean_grads, _ = evaluate(params)
        ascent_grad_fn = lambda p: ascent_input(evaluate.grads_only(p))
        eps, ascent_state = perturb(ascent_input(clean_grads), state.ascent_state, params,
                                    dict(extra, grad_fn=ascent_grad_fn, count=state.count,
                                         inner_state=state.inner_state))
        if linearize:
          grads_adv, aux, grads_at_params = evaluate.linearized(params, clean_grads, eps)
          # What grad_fn returned is not in g + H eps (a constant NaN has no derivative): carry
          # its NaN or Inf there, as the other variants' perturbed gradient carries its own.
          grads_adv = nonfinite_through(grads_adv, grads_at_params)
        else:
          grads_adv, aux = evaluate(tree.add(params, eps))
        grads_adv = keep_clean_at_zero(eps, clean_grads, grads_adv)
        return (clean_grads, grads_adv, ascent_state), aux
      return run

    # Called with concrete arrays (not under a trace), the sequential strategy loops in Python
    # rather than compiling a lax.scan over a fresh closure on every call.
    eager_chunks = chunked is not None and control.is_concrete_tree((chunked, params, state))

    def perturbed_pass():
      if chunked is None:
        return one_chunk(grad_fn)(grads)
      return chunking.reduce(lambda b: one_chunk(lambda p: grad_fn(p, b))(None), chunked,
                             chunk_strategy, eager=eager_chunks)

    def clean_gradient():
      if chunked is None:
        return grads
      def clean(b):
        return _GradientEvaluator(lambda p: grad_fn(p, b), has_aux, params)(params)[0], None
      return chunking.reduce(clean, chunked, chunk_strategy, eager=eager_chunks)[0]

    def perturbed_step(_):
      (clean_grads, grads_adv, ascent_state), aux = perturbed_pass()
      clean_grads, grads_adv = data_mean(clean_grads), data_mean(grads_adv)
      ascent_state = synced(ascent_state)
      direction, correction_state = correct(clean_grads, grads_adv, state.correction_state,
                                            params, True, extra, ascent_state)
      direction = nonfinite_through(direction, *read_gradients(clean_grads, grads_adv))
      return direction, ascent_state, correction_state, aux

    def plain_step(_):
      clean_grads = data_mean(clean_gradient())

      def corrected(_):
        direction, correction_state = correct(clean_grads, clean_grads, state.correction_state,
                                              params, False, extra, state.ascent_state)
        return nonfinite_through(direction, clean_grads), correction_state

      def uncorrected(_):
        return clean_grads, state.correction_state

      # Inside the window a cadence's off steps still go through the correction (LookSAM
      # reuses its stored component there); outside the window the step is the inner one's.
      if window is None:
        direction, correction_state = corrected(None)
      else:
        direction, correction_state = control.cond(in_window(state.count), corrected,
                                                   uncorrected, None)
      # Zeros shaped like grad_fn's aux. Under a trace, from a trace of the perturbed pass, whose
      # output the lax.cond branches must match exactly. Eagerly, only when the caller reads the
      # aux (update_with_aux; tx.update drops it), and from a trace of grad_fn alone: a trace
      # of the whole pass per step (LookSAM's reuse steps, 4 in 5) cost 20x the step itself.
      zero_aux = None
      if has_aux and not eager:
        aux_shape = jax.eval_shape(perturbed_step, None)[3]
        zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
      elif has_aux and returns_aux:
        zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grad_fn_aux_shape())
      return direction, state.ascent_state, correction_state, zero_aux

    def grad_fn_aux_shape():
      """The shape of the perturbed pass's aux, from grad_fn alone: the perturbed point has the
      params' shapes and dtypes (and a linearized pass returns the aux at the params)."""
      def aux_at(point, b=None):
        batch_grad_fn = grad_fn if chunked is None else (lambda p: grad_fn(p, b))
        return _GradientEvaluator(batch_grad_fn, has_aux, params)(point)[1]
      if chunked is None:
        return jax.eval_shape(aux_at, params)
      first = jax.tree.map(lambda x: x[0], chunked)
      k = chunking.num_chunks(chunked)  # the aux is stacked over chunks
      return jax.tree.map(lambda s: jax.ShapeDtypeStruct((k,) + s.shape, s.dtype),
                          jax.eval_shape(aux_at, params, first))

    if cadence is None and window is None:
      direction, ascent_state, correction_state, aux = perturbed_step(None)
    else:
      perturbed = takes_perturbed_pass(state.count)
      eager = control.is_concrete(perturbed)
      direction, ascent_state, correction_state, aux = control.cond(
          perturbed, perturbed_step, plain_step, None)
    updates, inner_state = inner.update(direction, state.inner_state, params, **extra)
    updates = add_decoupled(updates, correction_state, params, state.count)
    new_state = SharpnessAwareState(
        count=_increment(state.count), ascent_state=ascent_state,
        correction_state=correction_state, inner_state=inner_state, pending=state.pending)
    return updates, new_state, aux

  def update_with_aux(grads, state, params=None, *, grad_fn=None, **extra):
    if two_call:
      raise ValueError(
          "update_with_aux belongs to the one-call form, and this transformation was built "
          "with two_call=True: there you compute the perturbed gradient (and its aux) "
          "yourself, at the params the ascent call returned, and pass it to tx.update. To get "
          "the perturbed pass's aux from the engine, build it without two_call=True and with "
          "has_aux=True.")
    if not has_aux:
      raise ValueError(
          "update_with_aux returns the aux of grad_fn's perturbed pass, but this "
          "transformation was built without has_aux=True, so grad_fn returns no aux. Build it "
          "with has_aux=True and a grad_fn returning (grads, aux), e.g. "
          "grad_fn=jax.grad(loss, has_aux=True); or call tx.update.")
    return take_step(grads, state, params, True, grad_fn=grad_fn, **extra)

  def update_one_call(grads, state, params=None, *, grad_fn=None, **extra):
    updates, state, _ = take_step(grads, state, params, False, grad_fn=grad_fn, **extra)
    return updates, state

  def update_two_call(grads, state, params=None, **extra):
    _refuse_wrappers(two_call)
    _check_state(state, two_call)
    _check_params_and_grads(grads, params)
    _refuse_one_call_keywords(extra)
    _refuse_reserved_keywords(extra)
    extra = {k: v for k, v in extra.items() if k not in _ENGINE_KEYWORDS}
    pending = state.pending
    mean_grads = data_mean(grads)

    def ascent_call(_):
      def with_perturbation(_):
        eps, ascent_state = perturb(ascent_input(grads), state.ascent_state, params,
                                    dict(extra, count=state.count, inner_state=state.inner_state))
        if ascent_reads_grads:
          # A NaN eps reaches the descent call's updates, w - (w + eps) + Opt(d), whatever the
          # gradient at w + eps: the pair's updates carry a non-finite g.
          eps = nonfinite_through(eps, mean_grads)
        return eps, synced(ascent_state)

      def without_perturbation(_):
        return optax.tree.zeros_like(grads), state.ascent_state

      if cadence is None and window is None:
        eps, ascent_state = with_perturbation(None)
      else:
        eps, ascent_state = control.cond(takes_perturbed_pass(state.count), with_perturbation,
                                         without_perturbation, None)
      updates = tree.cast_like(eps, params)
      return updates, state._replace(ascent_state=ascent_state, pending=None)

    def descent_call(_):
      clean_grads, clean_params = pending.clean_grads, pending.clean_params

      def corrected(perturbed):
        def branch(_):
          grads_adv = mean_grads if perturbed else clean_grads
          eps = tree.sub(params, clean_params)
          grads_adv = keep_clean_at_zero(eps, clean_grads, grads_adv)
          direction, correction_state = correct(clean_grads, grads_adv, state.correction_state,
                                                clean_params, perturbed, extra,
                                                state.ascent_state)
          if checks_grads_adv:
            direction = nonfinite_through(direction, grads_adv)
          return direction, correction_state
        return branch

      def uncorrected(_):
        return clean_grads, state.correction_state

      if cadence is None and window is None:
        direction, correction_state = corrected(True)(None)
      else:
        off_step = corrected(False) if window is None else (
            lambda _: control.cond(in_window(state.count), corrected(False), uncorrected, None))
        direction, correction_state = control.cond(takes_perturbed_pass(state.count),
                                                   corrected(True), off_step, None)
      step, inner_state = inner.update(direction, state.inner_state, clean_params, **extra)
      step = add_decoupled(step, correction_state, clean_params, state.count)
      # Back to w, then the inner step: the params end at w + Opt(d), as in the one-call form.
      updates = jax.tree.map(lambda w, p, u: (w - p + u).astype(p.dtype),
                             clean_params, params, step)
      new_state = SharpnessAwareState(
          count=_increment(state.count), ascent_state=state.ascent_state,
          correction_state=correction_state, inner_state=inner_state, pending=None)
      return updates, new_state

    updates, new_state = control.cond(pending.descending, descent_call, ascent_call, None)
    # The next descent call needs this call's gradient and params. A descent call writes its own
    # too (the ascent call that follows never reads them): written outside the conditional, the
    # pending buffers are not copied through its branches (on a CPU MLP benchmark this halved
    # the two-call form's overhead over the hand-written step, benchmarks/overhead.py).
    new_pending = PendingDescent(descending=jnp.logical_not(pending.descending),
                                 clean_grads=mean_grads if keeps_clean_grads else None,
                                 clean_params=params)
    return updates, new_state._replace(pending=new_pending)

  if two_call:
    return SharpnessAwareTransformation(init, _entry_point(update_two_call, init),
                                        _entry_point(update_with_aux, init), has_aux,
                                        two_call=True)
  return SharpnessAwareTransformation(init, _entry_point(update_one_call, init),
                                      _entry_point(update_with_aux, init), has_aux)


# The step count's increment, one compiled call eagerly (see control.eager_jit).
_increment = control.eager_jit(numerics.safe_increment)


@control.eager_jit(static_argnames=("axis_name",))
def _nan_unless_finite(values, gradients, *, axis_name):
  """`values`, NaN everywhere unless every tree in `gradients` has a finite norm."""
  finite = jnp.asarray(True)
  for grads_ in gradients:
    finite = finite & jnp.isfinite(tree.norm(grads_, axis_name=axis_name))
  return jax.tree.map(lambda v: jnp.where(finite, v, jnp.nan).astype(v.dtype), values)


def _pmean(tree_, axis_name):
  try:
    return jax.lax.pmean(tree_, axis_name)
  except NameError as error:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound here: a transformation built with axis_name "
        f"must be updated inside jax.pmap(..., axis_name={axis_name!r}) or a shard_map over "
        f"that mesh axis. Under plain jax.jit (with or without sharded arrays) build it "
        f"without axis_name.") from error


def _on_params_mesh(state, params):
  """Called eagerly on params placed on a mesh: state leaves left on one device join it.

  Param-shaped leaves made with `zeros_like` already carry their param's sharding; scalars
  (counts, the inner optimizer's included) and other leaves `init` creates from nothing would
  sit on the default device. They are replicated over the params' mesh, so that the state's
  shardings can serve as a jitted step's in/out shardings. Under `jit` (traced params) and for
  unsharded params the state is returned as is.
  """
  meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(params)
            if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
            and isinstance(leaf.sharding, jax.sharding.NamedSharding)}
  if len(meshes) != 1:
    return state
  replicated = jax.sharding.NamedSharding(meshes.pop(), jax.sharding.PartitionSpec())
  if replicated.num_devices == 1:
    return state

  def place(leaf):
    if (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        and isinstance(leaf.sharding, jax.sharding.SingleDeviceSharding)):
      return jax.device_put(leaf, replicated)
    return leaf
  return jax.tree.map(place, state)


def _at_varying_params(grad_fn, axis_name, params, *rest):
  """`grad_fn` evaluated at `params` marked varying over the data axis (see `tree.vary`)."""
  return grad_fn(tree.vary(params, axis_name), *rest)


def _check_per_device(grads, axis_name):
  """Per-device ascent needs per-device gradients: refuse ones shard_map already reduced.

  Inside `jax.shard_map` (check_vma=True), `jax.grad` with respect to params replicated over the
  data axis returns their gradient summed over that axis (invariant there); a per-device ascent
  on it would silently be a global one.
  """
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  for path, leaf in jax.tree.leaves_with_path(grads):
    reduced = [n for n in names if n not in tree.sharded_axes(leaf, names)]
    if reduced and jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
          f"average_ascent=False (per-device ascent) needs each device's own gradient, but the "
          f"gradient at {jax.tree_util.keystr(path)} is already reduced over axis "
          f"{reduced[0]!r}: inside shard_map, jax.grad with respect to params replicated over "
          f"that axis sums over it. Differentiate at params marked as varying, e.g. "
          f"jax.grad(loss)(jax.lax.pcast(params, {reduced[0]!r}, to='varying'), batch) "
          f"(jax.lax.pvary in older JAX), in grad_fn and for the clean gradient; or use "
          f"average_ascent=True.")


def _check_state(state, two_call):
  """The state must be this kind of transformation's (a restored checkpoint may lose its types)."""
  if not all(hasattr(state, field) for field in SharpnessAwareState._fields):
    raise TypeError(
        f"update() got a state of type {type(state).__name__}, not the SharpnessAwareState that "
        f"this transformation's init returns. Pass tx.init(params) or the state the previous "
        f"update returned; a checkpoint restored without a target comes back as plain "
        f"dicts/lists: restore it with the target's structure, e.g. "
        f"checkpointer.restore(path, jax.eval_shape(tx.init, params)).")
  if two_call and state.pending is None:
    raise ValueError("This transformation was built with two_call=True but got the state of a "
                     "one-call transformation (no pending descent): initialize it with this "
                     "transformation's own init.")


def _refuse_one_call_keywords(extra):
  """The two-call form takes gradients, not functions: a grad_fn there would be ignored."""
  given = [k for k in _ENGINE_KEYWORDS if extra.get(k) is not None]
  if given:
    raise ValueError(
        f"This transformation was built with two_call=True, which ignores {given[0]}=: each "
        f"step is two update calls (the clean gradient at w, then the gradient at the params "
        f"the first call returned). To pass grad_fn (and batch) in one call per step, build it "
        f"without two_call=True.")


# Keywords the engine itself passes to the ascent and the correction: a caller's keyword of the
# same name would collide with them (or be silently replaced).
_RESERVED_KEYWORDS = ("count", "clean_grads", "perturbed", "param_axis_name", "ascent_state",
                      "inner_state")


def _refuse_reserved_keywords(extra):
  given = [k for k in _RESERVED_KEYWORDS if k in extra]
  if given:
    raise ValueError(
        f"update() got {given[0]}=, a keyword the engine passes to the ascent and the "
        f"correction itself (reserved: {', '.join(_RESERVED_KEYWORDS)}). Rename your keyword "
        f"argument; the other keywords of update() are forwarded to the ascent, the correction "
        f"and the inner optimizer.")


def _entry_point(update, init):
  """`update` with Python-scalar leaves accepted and a foreign state explained.

  Python numbers among the leaves of `grads` and `params` become arrays (JAX's default float
  type). When the step fails, the state is compared with this transformation's own `init`
  (traced with `jax.eval_shape`, on the failure path only: nothing is added to a good step),
  so that the state of another variant or inner optimizer gets an error saying so, not
  whatever attribute or tree error the mismatch raised first.
  """
  @functools.wraps(update)
  def wrapped(grads, state, params=None, **kwargs):
    grads, params = _scalars_as_arrays(grads), _scalars_as_arrays(params)
    try:
      return update(grads, state, params, **kwargs)
    except Exception as error:  # pylint: disable=broad-except
      _explain_foreign_state(error, init, state, params)
      raise
  return wrapped


def _scalars_as_arrays(tree_):
  if tree_ is None:
    return None
  leaves = jax.tree.leaves(tree_)
  if all(hasattr(leaf, "dtype") for leaf in leaves):
    return tree_
  return jax.tree.map(lambda x: x if hasattr(x, "dtype") else jnp.asarray(x), tree_)


def _explain_foreign_state(error, init, state, params):
  """Raises a TypeError from `error` when `state` is not shaped like `init(params)`'s."""
  if params is None or not all(hasattr(state, f) for f in SharpnessAwareState._fields):
    return
  try:
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                          params)
    expected = jax.eval_shape(init, shapes)
  except Exception:  # pylint: disable=broad-except
    return  # the diagnosis is best effort: the original error stands
  for field in ("ascent_state", "correction_state", "inner_state"):
    got, want = getattr(state, field), getattr(expected, field)
    if jax.tree.structure(got) != jax.tree.structure(want):
      raise TypeError(
          f"The state's {field} has type {type(got).__name__}, but this transformation's "
          f"init makes one of type {type(want).__name__} (tree {jax.tree.structure(want)}, got "
          f"{jax.tree.structure(got)}): the state comes from another transformation (another "
          f"variant, its hyperparameters' structure, or another inner optimizer). Initialize "
          f"it with this transformation's own init, state = tx.init(params); a checkpoint "
          f"restores only into the transformation that wrote it. (Original error: "
          f"{type(error).__name__}: {str(error)[:200]})") from error


def _explained_signature(grad_fn, chunked):
  """`grad_fn`, whose TypeError for a wrong number of arguments names the expected signature.

  Only the failure path inspects the signature: a good call costs one Python frame.
  """
  def call(*args):
    try:
      return grad_fn(*args)
    except TypeError as error:
      try:
        inspect.signature(grad_fn).bind(*args)
      except TypeError:
        raise TypeError(_signature_message(grad_fn, chunked, error)) from error
      except ValueError:  # no signature to inspect (some builtins): keep the original error
        pass
      raise
  return call


def _signature_message(grad_fn, chunked, error):
  try:
    signature = f"{getattr(grad_fn, '__name__', 'grad_fn')}{inspect.signature(grad_fn)}"
  except (TypeError, ValueError):
    signature = "grad_fn"
  if chunked:
    return (f"With chunk_size (m-sharpness) the engine calls grad_fn(params, batch) on each "
            f"chunk of the batch, but grad_fn is {signature} ({error}). Pass a gradient "
            f"function of the params and a batch, e.g. grad_fn=lambda p, b: "
            f"jax.grad(loss)(p, b).")
  return (f"The engine calls grad_fn(params) (one argument: the perturbed params), but "
          f"grad_fn is {signature} ({error}). optax.contrib.sam's grad_fn(params, i) signature "
          f"is not this one: close over the batch instead, e.g. grad_fn=lambda p: "
          f"jax.grad(loss)(p, batch) (or lambda p: your_grad_fn(p, 0)); for one gradient per "
          f"chunk of the batch, build the transformation with chunk_size and pass "
          f"grad_fn(params, batch).")


def _keys_not_in_both(a, b):
  """The keys that one of two nested dicts has and the other lacks, at the first level where
  they differ (found here: JAX's error names them only in recent versions), or None."""
  if isinstance(a, collections.abc.Mapping) and isinstance(b, collections.abc.Mapping):
    keys = sorted(map(str, set(a) ^ set(b)))
    if keys:
      return keys
    for key in a:
      keys = _keys_not_in_both(a[key], b[key])
      if keys:
        return keys
  return None


def _check_mask(mask_tree, params):
  """The mask must be a tree of bools shaped like the params (or a prefix): checked at trace
  time, so that a missing or extra key is named here rather than inside optax.masked."""
  try:
    jax.tree.map(lambda *_: None, mask_tree, params)
  except (ValueError, TypeError) as error:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    keys = _keys_not_in_both(mask_tree, params)
    if keys:
      first += f"; keys in one and not the other: {', '.join(keys)}"
    raise ValueError(
        f"mask= does not match the params: mask has structure {jax.tree.structure(mask_tree)} "
        f"and params {jax.tree.structure(params)} ({first}). mask must be a tree of bools "
        f"with the keys and nesting of params (or a prefix of it: one bool for a whole "
        f"subtree), every key present, e.g. jax.tree.map(lambda _: False, params) with the "
        f"perturbed leaves set to True, or a function of params returning one, such as "
        f"sam_optax.normalization_mask.") from error


def _check_params_and_grads(grads, params, optional=False):
  if params is None:
    raise ValueError("Sharpness-aware transformations need the params: call "
                     "tx.update(grads, state, params, ...).")
  if grads is None and optional:
    return
  if grads is None:
    raise ValueError("update() got grads=None: pass the gradient at params (None is only "
                     "accepted with chunk_size, where each chunk's gradient is computed inside).")
  tree.check_same_structure(params, grads, what="The gradient passed to update()")
  _check_float_dtypes(params, grads, what="The gradient passed to update()")


def _check_float_dtypes(params, grads, *, what):
  """Params and gradients must be real floating point (any width; they may differ).

  Anything else would be cast silently: an integer gradient truncates the perturbation to zero,
  and complex leaves would get a norm without conjugation. Checked at trace time (dtypes are
  static), so it costs nothing at run time; eagerly, on every call, where leaves that are
  arrays of a floating dtype take the fast path (no key paths built).
  """
  leaves = jax.tree.leaves(grads) + jax.tree.leaves(params)
  if all(_is_float_dtype(getattr(leaf, "dtype", None)) for leaf in leaves):
    return
  for (path, grad), param in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(params)):
    where = jax.tree_util.keystr(path) or "the root"
    param_dtype, grad_dtype = jnp.result_type(param), jnp.result_type(grad)
    if not jnp.issubdtype(param_dtype, jnp.floating):
      raise TypeError(
          f"The params have dtype {param_dtype} at {where}: sharpness-aware methods perturb and "
          f"update real floating-point params only. Keep integer, boolean or complex leaves out "
          f"of the tree you optimize (store them beside the params, or split the tree with "
          f"optax.partition and give those leaves optax.set_to_zero()).")
    if not jnp.issubdtype(grad_dtype, jnp.floating):
      raise TypeError(
          f"{what} has dtype {grad_dtype} at {where}, where the params are {param_dtype}: "
          f"gradients must be real floating point (an integer gradient would truncate the "
          f"perturbation to zero). Differentiate a floating-point loss with respect to the params "
          f"with jax.grad, or cast the gradient to the params' dtypes: "
          f"jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params).")


@functools.lru_cache(maxsize=None)
def _is_float_dtype(dtype) -> bool:
  """Whether `dtype` (None for a leaf without one, e.g. a Python float) is a real float."""
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _check_grad_fn(grad_fn, chunked):
  signature = "(params, batch) -> grads" if chunked else "params -> grads"
  example = ("grad_fn=lambda p, b: jax.grad(loss)(p, b)" if chunked
             else "grad_fn=lambda p: jax.grad(loss)(p, batch)")
  if grad_fn is None:
    raise ValueError(
        f"This sharpness-aware transformation needs grad_fn=..., a function {signature} giving "
        f"the gradient at the perturbed params, e.g. {example}. For a loop that cannot pass a "
        f"function, build it with two_call=True.")
  if not callable(grad_fn):
    raise TypeError(f"grad_fn must be callable ({signature}), got {type(grad_fn).__name__}.")


def _chunked_batch(chunk_size, batch, chunked):
  """The batch with a leading chunk axis, or None when m-sharpness is off."""
  if chunked is not None:
    if batch is not None:
      raise ValueError("Pass either batch= (split by chunk_size) or chunks= (already split), "
                       "not both.")
    chunking.check_chunks(chunked)
    return chunked
  if batch is None:
    if chunk_size is not None:
      raise ValueError(f"chunk_size={chunk_size} needs the batch: call update(..., batch=batch, "
                       f"grad_fn=lambda p, b: jax.grad(loss)(p, b)).")
    return None
  if chunk_size is None:
    raise ValueError("batch= is for m-sharpness: build the transformation with chunk_size=m "
                     "(examples per chunk), or drop batch= and pass grad_fn=lambda p: ...")
  return chunking.split(batch, chunk_size)


def _check_window(window):
  if window is None:
    return None
  if not (isinstance(window, (tuple, list)) and len(window) == 2):
    raise ValueError(f"window must be a pair (start, end) of step counts (end may be None), "
                     f"got {window!r}.")
  start, end = window
  start = check_positive_int("window start", start, minimum=0)
  if end is not None:
    end = check_positive_int("window end", end, minimum=0)
    if end < start:
      raise ValueError(f"window end ({end}) must be >= its start ({start}).")
  return (start, end)


class _GradientEvaluator:
  """Calls the user's grad_fn, checks what it returns, and splits off the aux."""

  def __init__(self, grad_fn, has_aux, params):
    self._grad_fn, self._has_aux, self._params = grad_fn, has_aux, params

  def grads_only(self, params):
    """grad_fn without its aux: what an ascent that evaluates gradients itself receives."""
    return self(params)[0]

  def __call__(self, perturbed_params):
    out = self._grad_fn(perturbed_params)
    if self._has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("With has_aux=True, grad_fn must return a pair (grads, aux), e.g. "
                         "jax.grad(loss, has_aux=True).")
      grads, aux = out
    else:
      if _looks_like_grads_and_aux(out, self._params):
        raise ValueError(
            "grad_fn returned a pair (grads, aux), but this transformation was built without "
            "has_aux=True, so it takes grad_fn's output for the gradient. Build it with "
            "has_aux=True (e.g. sam_optax.sam(optax.sgd(0.1), has_aux=True)) and read the aux "
            "with tx.update_with_aux, or return the gradient alone (jax.grad without "
            "has_aux).")
      grads, aux = out, None
    tree.check_same_structure(self._params, grads, what="The output of grad_fn")
    _check_float_dtypes(self._params, grads, what="The output of grad_fn")
    return grads, aux

  def linearized(self, params, clean_grads, eps):
    """`(g + H(params) eps, aux at params, grad_fn's value at params)`: one forward-over-reverse
    Hessian-vector product."""
    (grads, aux), (hessian_eps, _) = jax.jvp(self, (params,), (tree.cast_like(eps, params),))
    return tree.add(clean_grads, hessian_eps), aux, grads


def _looks_like_grads_and_aux(out, params):
  """Whether `out` is a pair whose first entry, not `out` itself, is shaped like `params`."""
  if not (isinstance(out, tuple) and len(out) == 2):
    return False
  structure = jax.tree.structure(params)
  return jax.tree.structure(out) != structure and jax.tree.structure(out[0]) == structure


def _masked_grad_fn(grad_fn, mask_tree, params):
  """`grad_fn` as a function of the masked leaves (the others held at `params`)."""
  def masked(point):
    full = jax.tree.map(lambda keep, p, q: q if keep else p, mask_tree, params, point)
    return jax.tree.map(lambda keep, g: g if keep else optax.MaskedNode(), mask_tree,
                        grad_fn(full))
  return masked


def _refuse_wrappers(two_call: bool):
  """Raises when called from inside an optax wrapper that would silently break the step.

  The wrapper is built around this transformation after it, so it is detected from the call
  stack, by the code objects of its functions (at trace time under `jax.jit`: no run-time
  cost):

  - `optax.MultiSteps` (its `update`) calls the wrapped transformation on every micro-batch
    with the running mean of the clean gradients and that micro-batch's keywords, and keeps the
    result of the last one: the perturbation would come from the accumulated gradient but the
    descent gradient from the last micro-batch alone. A constant `every_k_schedule` of 1 is
    harmless and allowed.
  - `optax.apply_if_finite` (its `init` and `update`) around the two-call form skips one call,
    not the ascent/descent pair: after one non-finite gradient the calls are out of phase for
    the rest of the run, and every step ends at `w + eps`. It composes with the one-call form.
  """
  wrappers = _wrapper_codes()
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    wrapper = wrappers.get(frame.f_code)
    if wrapper == "MultiSteps":
      k_steps = frame.f_locals.get("k_steps")
      if not (isinstance(k_steps, int) and k_steps == 1):
        raise ValueError(
            "optax.MultiSteps cannot accumulate a sharpness-aware step: it calls this "
            "transformation on every micro-batch with the running mean of the clean gradients "
            "and that micro-batch's grad_fn, so the perturbation would use the accumulated "
            "gradient but the descent gradient only the last micro-batch (and every micro-step "
            "would pay for a discarded perturbed pass). For SAM with gradient accumulation, "
            "build it with chunk_size=<micro-batch size>, chunk_strategy=\"sequential\" and "
            "pass the whole batch: tx.update(None, state, params, batch=batch, grad_fn=lambda "
            "p, b: jax.grad(loss)(p, b)) (one perturbation per chunk, the memory of one chunk). "
            "For one perturbation from the whole batch's gradient, pass a grad_fn that itself "
            "averages micro-batch gradients (e.g. with jax.lax.map).")
    elif wrapper == "apply_if_finite" and two_call:
      raise ValueError(
          "optax.apply_if_finite cannot wrap the two-call form: it skips one update call, not "
          "the ascent/descent pair, so after one non-finite gradient every later call would be "
          "out of phase (each step ending at the perturbed params w + eps). Use "
          "sam_optax.skip_if_nonfinite(tx, max_consecutive_errors) instead: it skips the pair, "
          "and also catches a non-finite perturbed gradient. (optax.apply_if_finite does wrap "
          "the one-call form.)")
    frame = frame.f_back


@functools.lru_cache(maxsize=None)
def _wrapper_codes() -> dict:
  """{code object: wrapper name} for the functions of the optax wrappers `_refuse_wrappers`
  detects: `MultiSteps.update`, and `apply_if_finite` with the closures it defines."""
  codes = {}
  multisteps_update = getattr(getattr(optax, "MultiSteps", None), "update", None)
  if getattr(multisteps_update, "__code__", None) is not None:
    codes[multisteps_update.__code__] = "MultiSteps"
  apply_if_finite = getattr(optax, "apply_if_finite", None)
  pending = [apply_if_finite.__code__] if hasattr(apply_if_finite, "__code__") else []
  while pending:  # the function and its nested closures (init, update, their branches)
    code = pending.pop()
    codes[code] = "apply_if_finite"
    pending.extend(c for c in code.co_consts if isinstance(c, type(code)))
  return codes
