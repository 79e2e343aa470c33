"""Dynamic loss scaling for float16 training, carried through both passes of a step.

float16 gradients underflow to zero below 2^-24 and overflow above 65504. Loss scaling
multiplies the loss by a scale `S` before differentiating, so that the backward pass runs in
float16's range, and divides the gradients by `S` (in float32) before they are used. A
sharpness-aware step differentiates twice, at `w` and at `w + eps`: both passes must use the
same scale, both gradients must be unscaled before the ascent normalizes `g` and before the
correction and the inner optimizer read them, and an overflow in either pass must skip the
whole step and lower the scale. PyTorch's gradient scalers cannot drive the two passes of the
popular two-step SAM wrappers ("can't unscale twice"); here the scale lives in the optimizer's
state, one value per step.

The scale and its bookkeeping are Flax's `flax.training.dynamic_scale.DynamicScale` (a
`flax.struct` pytree, so it is saved and restored with the rest of the optimizer state), and the
skipping is `sam_optax.skip_if_nonfinite`, which sees a non-finite gradient of either pass in
the step's updates.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import checks
from sam_optax._src import control
from sam_optax._src import engine
from sam_optax._src import nonfinite
from sam_optax._src.evaluation import nan_unless_finite
from sam_optax._src.hyperparams import check_positive_int

if TYPE_CHECKING:  # the core does not import Flax; only dynamic_loss_scale's default does
  from flax.training.dynamic_scale import DynamicScale

# A never-reached count of consecutive skipped steps: skip_if_nonfinite then applies no
# non-finite step, as a loop driven by Flax's DynamicScale never does.
_NEVER = int(jnp.iinfo(jnp.int32).max)


class DynamicLossScaleState(NamedTuple):
  """State of `dynamic_loss_scale`."""
  dynamic_scale: Any  # flax.training.dynamic_scale.DynamicScale: `scale` (float32 scalar) and
                      # `fin_steps` (int32 scalar: finite steps since the scale last changed).
  inner_state: nonfinite.SkipIfNonfiniteState  # skip_if_nonfinite's state over the wrapped tx:
                      # its counters (`total_notfinite`, ...) count the skipped steps.


def dynamic_loss_scale(tx: optax.GradientTransformation,
                       dynamic_scale: DynamicScale | None = None, *,
                       max_consecutive_errors: int | None = None
                       ) -> engine.SharpnessAwareTransformation:
  r"""Dynamic loss scaling through both passes of a sharpness-aware step (float16 training).

  The caller differentiates the scaled loss `S L` in both passes, with `S = loss_scale(state)`
  read from this transformation's state; the wrapper unscales both gradients in float32 before
  the wrapped step sees them, and adjusts `S` once per step:

  .. math::
    g = \frac{\nabla (S\,L)(w)}{S}, \quad
    g^{adv} = \frac{\nabla (S\,L)(w + \epsilon)}{S}, \quad
    (u, s') = \begin{cases} \mathrm{tx}(g, g^{adv}) & \text{finite} \\
    (0, s) & \text{otherwise (step skipped)} \end{cases}

  .. math::
    S' = \begin{cases} \max(\beta S, S_{min}) & \text{step not finite} \\
    \min(\gamma S, F_{max}) & \text{finite and } n = N \\
    S & \text{otherwise} \end{cases} \qquad
    n' = \begin{cases} 0 & \text{not finite, or } n = N \\ n + 1 & \text{otherwise}
    \end{cases}

  with `beta` the backoff factor, `gamma` the growth factor, `N` the growth interval, `n` the
  count of finite steps since the scale last changed and `F_max` float32's largest value: the
  rule of Flax's `DynamicScale.value_and_grad`, applied once per step to both passes together
  (Flax's method adjusts the scale at every call, so calling it once per pass would adjust it
  twice, and from one pass only). One scale multiplies both passes: in the two-call form it
  changes only after the descent call that ends a pair.

  A step is skipped when a gradient of either pass holds a NaN or an infinity (an overflow of
  `S L`'s backward pass): this is `sam_optax.skip_if_nonfinite` around `tx`, which judges the
  step by its updates. The wrapper makes an unscaled gradient with a non-finite entry NaN
  everywhere, so that it reaches the updates through any inner optimizer, sign-based ones
  (Lion) included, which would turn an infinite entry into a finite update. The
  skipped step leaves the wrapped state (inner optimizer, ascent, correction, step count) and
  the params as they were, and the Flax helpers (`sam_optax.flax.sam_step`,
  `linen_sam_step`) the model's state too (BatchNorm statistics). In the two-call form the
  unit skipped is the pair of calls, as `skip_if_nonfinite` skips it.

  One-call form::

    @jax.jit
    def train_step(params, state, batch):
      scale = sam_optax.loss_scale(state)
      grad_fn = jax.grad(lambda p: scale * loss(p, batch))
      updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

  Two-call form (`tx` built with `two_call=True`): each call's gradient is that of
  `loss_scale(state) * L` at the params it is given; the scale is the same in the two calls
  of a pair. With m-sharpness (`chunk_size`), `grad_fn(params, batch)` is unscaled alike.

  Unscaling: each gradient leaf is cast to float32 (or kept in float64) and divided by `S`
  there; the unscaled gradient stays in that dtype (float16 gradients become float32, as in
  Flax; Flax also casts float64 gradients to float32, which this keeps in float64), so a value
  below float16's range is not flushed again. With `S` a power of two (the default scale and
  factors keep it one) and gradients in float32's normal range, scaling and unscaling are
  exact: the wrapped step receives the unscaled gradients bit for bit, and op by op the step
  equals the unscaled one bit for bit (a jitted step is a larger program, whose fusions may
  round the last bit of a step differently).

  Deviation from Flax: the step is judged by its updates (see above), so an inner optimizer
  that makes finite gradients non-finite also skips the step and lowers the scale.

  Clipping belongs in the inner optimizer (`sam_optax.sam(optax.chain(
  optax.clip_by_global_norm(1.0), optax.adam(1e-3)))`), which sees unscaled gradients; a
  clipping transformation chained before this wrapper would clip the scaled ones.

  Why Flax's `DynamicScale`: it is maintained with Flax (`sam_optax.flax`'s dependency; the
  same fields and rule from flax 0.12.0, sam_optax's floor, on), it is a pytree that orbax
  checkpoints with the optimizer state, and Flax users know it. DeepMind's `jmp` has the same
  rule (`jmp.DynamicLossScale`), but it would be an extra dependency, and its last release
  (0.0.4) is from January 2023. Only `DynamicScale`'s fields and rule are used, not its
  `value_and_grad`, which differentiates one pass.

  Args:
    tx: the transformation to scale for, e.g. `sam_optax.sam(optax.adam(1e-3))` (any
      sharpness-aware one, in either form, or a plain optax optimizer). It must not skip
      non-finite steps itself (`skip_if_nonfinite`, `optax.apply_if_finite`): the wrapper
      must see them to lower the scale.
    dynamic_scale: a `flax.training.dynamic_scale.DynamicScale` with the initial scale and the
      rule's hyperparameters (default `DynamicScale()`: scale 2^16, growth factor 2 after 2000
      finite steps, backoff 0.5, minimum float32's smallest normal number). The default needs
      Flax (`pip install 'sam_optax[flax]'`).
    max_consecutive_errors: None (default) to skip every non-finite step, however many in a
      row, as a loop driven by `DynamicScale` does; or a count after which a non-finite step
      is applied anyway (as in `skip_if_nonfinite`), so that a run that diverges for good
      does not stall silently.

  Returns:
    A `SharpnessAwareTransformation` (with `update_with_aux` when `tx` has one) whose state
    is a `DynamicLossScaleState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from flax.training.dynamic_scale import DynamicScale
    >>> tx = sam_optax.dynamic_loss_scale(sam_optax.sam(optax.sgd(0.1), rho=0.05),
    ...                                   DynamicScale(scale=2.0 ** 15))
    >>> loss = lambda p: jnp.sum(p['w'].astype(jnp.float16) ** 2).astype(jnp.float32)
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> scale = sam_optax.loss_scale(state)
    >>> grad_fn = jax.grad(lambda p: scale * loss(p))
    >>> updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    >>> float(scale), updates['w'].dtype
    (32768.0, dtype('float32'))

  References:
    Micikevicius et al., *Mixed Precision Training*, ICLR 2018,
    https://arxiv.org/abs/1710.03740 (loss scaling, float32 master weights);
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412. The scale's rule follows Flax's
    `flax/training/dynamic_scale.py`.
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"dynamic_loss_scale wraps an optax.GradientTransformation (e.g. "
                    f"sam_optax.sam(optax.adam(1e-3))), got {type(tx).__name__}.")
  if dynamic_scale is None:
    dynamic_scale = _default_dynamic_scale()
  _check_dynamic_scale(dynamic_scale)
  if max_consecutive_errors is None:
    max_consecutive_errors = _NEVER
  else:
    max_consecutive_errors = check_positive_int("max_consecutive_errors",
                                                max_consecutive_errors, minimum=0)
  has_aux = getattr(tx, "has_aux", False)
  two_call = getattr(tx, "two_call", False)
  skipping = nonfinite.skip_if_nonfinite(tx, max_consecutive_errors)

  def init(params):
    _refuse_apply_if_finite_around()
    inner_state = cast(nonfinite.SkipIfNonfiniteState, skipping.init(params))
    _refuse_skipping_inside(inner_state.inner_state)
    return DynamicLossScaleState(dynamic_scale=_as_arrays(dynamic_scale),
                                 inner_state=inner_state)

  def step(call, grads, state, params=None, **extra):
    _refuse_apply_if_finite_around()
    scale = jnp.asarray(state.dynamic_scale.scale)
    grads = _unscaled_or_nan(grads, scale)
    if extra.get("grad_fn") is not None:
      extra["grad_fn"] = _unscaled_grad_fn(extra["grad_fn"], scale, has_aux)
    skip_state = state.inner_state
    # The two-call form's pair ends with this call when it is a descent call, or the descent
    # call of a pair whose ascent call was skipped; the one-call form's step ends every call.
    ends_step = (jnp.asarray(True) if skip_state.skip_descent is None
                 else skip_state.skip_descent | skip_state.inner_state.pending.descending)
    out = call(grads, skip_state, params, **extra)
    new_skip_state = out[1]
    adjusted = adjust(state.dynamic_scale, new_skip_state.last_finite)
    new_scale = jax.tree.map(lambda a, b: jnp.where(ends_step, a, b), adjusted,
                             state.dynamic_scale)
    return (out[0], DynamicLossScaleState(new_scale, new_skip_state)) + tuple(out[2:])

  update = functools.partial(step, skipping.update)
  update_with_aux = None
  if getattr(tx, "update_with_aux", None) is not None and has_aux:
    update_with_aux = functools.partial(step, skipping.update_with_aux)
  return engine.SharpnessAwareTransformation(init, update, update_with_aux, has_aux,
                                             two_call=two_call)


def loss_scale(state: Any) -> jax.Array:
  r"""The current loss scale `S` in a state holding a `dynamic_loss_scale`'s (float32 scalar).

  .. math::
    \nabla_{scaled} = \nabla (S\,L)

  Multiply the loss by it in every gradient the step hands to the transformation: the clean
  gradient and `grad_fn`'s (`dynamic_loss_scale` divides both by the same `S`).

  Args:
    state: the state of a `dynamic_loss_scale` transformation, or any optimizer state that
      holds exactly one (e.g. under `optax.inject_hyperparams` or `optax.chain`, or an
      `nnx.Optimizer`'s `opt_state`).

  Returns:
    The scale, a float32 scalar (traced under `jax.jit`: reading it costs no host sync).

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> from flax.training.dynamic_scale import DynamicScale
    >>> tx = sam_optax.dynamic_loss_scale(sam_optax.sam(optax.sgd(0.1)),
    ...                                   DynamicScale(scale=1024.0))
    >>> float(sam_optax.loss_scale(tx.init({'w': jnp.zeros(2)})))
    1024.0

  References:
    Micikevicius et al., *Mixed Precision Training*, ICLR 2018,
    https://arxiv.org/abs/1710.03740
  """
  found = find_loss_scale_state(state)
  if found is None:
    raise ValueError(
        "This state holds no dynamic loss scale: build the optimizer with "
        "sam_optax.dynamic_loss_scale(tx) and pass its state (or a state that contains it).")
  scale = found.dynamic_scale.scale
  scale = getattr(scale, "value", scale)  # an nnx.Optimizer wraps state leaves in Variables
  return jnp.asarray(scale, jnp.float32)


def find_loss_scale_state(state: Any) -> DynamicLossScaleState | None:
  """The `DynamicLossScaleState` inside `state`, or None; a ValueError when there are several
  (one scale must multiply every pass of a step)."""
  is_scaled = lambda x: isinstance(x, DynamicLossScaleState)
  found = [x for x in jax.tree.leaves(state, is_leaf=is_scaled) if is_scaled(x)]
  if len(found) > 1:
    raise ValueError("This state holds several dynamic loss scales (dynamic_loss_scale applied "
                     "more than once): wrap the whole transformation once.")
  return found[0] if found else None


def unscale(grads: Any, scale: jax.Array) -> Any:
  """`grads / scale`, leaf by leaf, in float32 (float64 leaves in float64); other leaves as
  they are (an integer leaf is an error for the engine to explain)."""
  def leaf(g):
    g = jnp.asarray(g)
    if not jnp.issubdtype(g.dtype, jnp.floating):
      return g
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    return g.astype(dtype) / scale.astype(dtype)
  return None if grads is None else jax.tree.map(leaf, grads)


@control.eager_jit
def adjust(dynamic_scale: Any, finite: jax.Array) -> Any:
  """Flax's `DynamicScale` rule, given whether the step's gradients (both passes) were finite:
  back off on a non-finite step, grow after `growth_interval` finite ones in a row."""
  ds = dynamic_scale
  scale, fin_steps = jnp.asarray(ds.scale, jnp.float32), jnp.asarray(ds.fin_steps, jnp.int32)
  grow = fin_steps == ds.growth_interval
  fin_scale = jnp.where(grow & finite,
                        jnp.minimum(scale * ds.growth_factor, jnp.finfo(jnp.float32).max),
                        scale)
  inf_scale = scale * ds.backoff_factor
  if ds.minimum_scale is not None:
    inf_scale = jnp.maximum(inf_scale, ds.minimum_scale)
  new_scale = jnp.where(finite, fin_scale, inf_scale).astype(jnp.float32)
  new_fin_steps = jnp.where(grow | jnp.logical_not(finite), 0, fin_steps + 1).astype(jnp.int32)
  return ds.replace(scale=new_scale, fin_steps=new_fin_steps)


def _unscaled_grad_fn(grad_fn, scale, has_aux):
  """`grad_fn` (of the scaled loss) with its gradient unscaled, its aux untouched; wraps it so
  that the engine's signature messages still name the user's function."""
  @functools.wraps(grad_fn)
  def unscaled(*args):
    out = grad_fn(*args)
    if has_aux and isinstance(out, tuple) and len(out) == 2:
      return _unscaled_or_nan(out[0], scale), out[1]
    return _unscaled_or_nan(out, scale)
  return unscaled


def _unscaled_or_nan(grads, scale):
  """`unscale(grads, scale)`, NaN everywhere when an entry is not finite.

  An overflow reaches the updates through most inner optimizers, but a sign-based one (Lion,
  signSGD) turns an infinite entry of the perturbed gradient into a finite update, and the step
  would be taken with an infinity in its state. A whole NaN gradient gives NaN updates through
  any of them; the test is one norm of the gradient (which the normalized ascents take anyway
  on `g`).
  """
  unscaled = unscale(grads, scale)
  if unscaled is None or not jax.tree.leaves(unscaled):
    return unscaled
  return nan_unless_finite(unscaled, (unscaled,), axis_name=None)


def _default_dynamic_scale():
  try:
    from flax.training.dynamic_scale import DynamicScale  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        "dynamic_loss_scale keeps the scale in Flax's DynamicScale: install Flax (pip install "
        "'sam_optax[flax]') or pass dynamic_scale=flax.training.dynamic_scale.DynamicScale(...)."
    ) from error
  return DynamicScale()


_SCALE_FIELDS = ("scale", "fin_steps", "growth_factor", "backoff_factor", "growth_interval",
                 "minimum_scale", "replace")


def _check_dynamic_scale(ds: Any) -> None:
  """A `DynamicScale` with a usable scale and rule, checked at construction."""
  if not all(hasattr(ds, name) for name in _SCALE_FIELDS):
    raise TypeError(f"dynamic_scale must be a flax.training.dynamic_scale.DynamicScale (e.g. "
                    f"DynamicScale(scale=2.0 ** 15)), got {type(ds).__name__}.")
  check_positive_int("growth_interval", ds.growth_interval, minimum=1)
  if not (isinstance(ds.growth_factor, (int, float)) and ds.growth_factor >= 1):
    raise ValueError(f"DynamicScale's growth_factor must be a number >= 1, got "
                     f"{ds.growth_factor!r}.")
  if not (isinstance(ds.backoff_factor, (int, float)) and 0 < ds.backoff_factor < 1):
    raise ValueError(f"DynamicScale's backoff_factor must be a number in (0, 1), got "
                     f"{ds.backoff_factor!r}.")
  if control.is_concrete_tree(ds.scale):  # a number, or an array restored from a checkpoint
    scale = float(np.asarray(ds.scale))
    if not (math.isfinite(scale) and scale > 0):
      raise ValueError(f"DynamicScale's scale must be positive and finite, got {scale}.")


def _as_arrays(ds: Any) -> Any:
  """The scale and count as float32 and int32 arrays: the state's dtypes never change, so a
  jitted step compiles once (Flax's defaults are Python numbers)."""
  return ds.replace(scale=jnp.asarray(ds.scale, jnp.float32),
                    fin_steps=jnp.asarray(ds.fin_steps, jnp.int32))


def _refuse_skipping_inside(state: Any) -> None:
  skips = lambda x: isinstance(x, (nonfinite.SkipIfNonfiniteState, optax.ApplyIfFiniteState))
  if any(skips(x) for x in jax.tree.leaves(state, is_leaf=skips)):
    raise ValueError(
        "dynamic_loss_scale skips non-finite steps itself (it wraps skip_if_nonfinite) and must "
        "see them to lower the scale: pass the transformation without skip_if_nonfinite or "
        "optax.apply_if_finite (dynamic_loss_scale(sam_optax.sam(...), ...)).")


def _refuse_apply_if_finite_around() -> None:
  """optax.apply_if_finite around the wrapper would skip an overflowing step before the wrapper
  sees it, so the scale would never be lowered: detected from the call stack, as
  `checks.refuse_wrappers` detects it (at trace time under jit)."""
  wrappers = checks._wrapper_codes()  # pylint: disable=protected-access
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    if wrappers.get(frame.f_code) == "apply_if_finite":
      raise ValueError(
          "optax.apply_if_finite cannot wrap dynamic_loss_scale: it would skip a step whose "
          "scaled gradient overflowed before dynamic_loss_scale sees it, so the scale would "
          "never be lowered. dynamic_loss_scale skips non-finite steps itself: drop "
          "apply_if_finite.")
    frame = frame.f_back
