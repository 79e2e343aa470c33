"""Flax integration: one-call sharpness-aware train steps for NNX and Linen.

Flax is an optional dependency of `sam_optax`; this module needs it (`pip install "sam_optax[flax]"`) and is
not imported by `import sam_optax`::

  import sam_optax.flax

NNX: `sam_step(model, optimizer, loss_fn, batch)` runs one step for an `nnx.Optimizer` whose
transformation is a `sam_optax` one, with `loss_fn(model, batch)` as you would write it for
`nnx.value_and_grad`; no splitting or merging of state on your side, and it works inside
`nnx.jit`.

Linen: `SAMTrainState` is a `flax.training.train_state.TrainState` with a `batch_stats` field,
an `apply_gradients` that also accepts `grad_fn=`, and a `sam_step(loss_fn)` method;
`linen_sam_step(state, loss_fn)` does the same for any `TrainState`.

Mutable state (BatchNorm statistics, NNX RNG counters, other non-trainable variables), the
conventions of the field guide:

* Both passes start from the state before the step, so they see the same BatchNorm running
  statistics and, by default, the same dropout randomness (the same key).
* The step keeps the clean pass's state updates and discards the perturbed pass's
  (`keep_perturbed_state=True` keeps the perturbed pass's instead, on steps that take it).
* The perturbed pass's loss is returned for logging (`StepMetrics.perturbed_loss`).

Transformations with a cadence or a window (e.g. LookSAM) skip the perturbed pass on some
steps; on those steps `perturbed_loss` is the clean loss (the perturbation is zero) and the
clean pass's state is kept whatever the option.

float16 training: with an optimizer built by `sam_optax.dynamic_loss_scale`, both steps
differentiate the loss times the state's loss scale in both passes (the transformation unscales
the gradients), report the unscaled losses, and leave the model's state untouched on a step
that overflowed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

try:
  from flax import nnx
  from flax.training import train_state as flax_train_state
except ImportError as error:  # pragma: no cover - exercised only without flax installed
  raise ImportError(
      "sam_optax.flax needs Flax: install it with `pip install 'sam_optax[flax]'` (or "
      "`pip install flax`). The rest of sam_optax works without it.") from error

# flax 0.12.7 renamed `nnx.pure` to `nnx.as_pure` (and deprecated the old name).
_as_pure = getattr(nnx, "as_pure", None) or nnx.pure

from sam_optax._src.engine import SharpnessAwareState, SharpnessAwareTransformation
from sam_optax._src.loss_scaling import find_loss_scale_state, loss_scale

__all__ = ["StepMetrics", "sam_step", "SAMTrainState", "linen_sam_step"]


class StepMetrics(NamedTuple):
  """What a sharpness-aware train step reports (all arrays; safe to return from `jit`)."""
  loss: jax.Array            # the clean loss L(w), before the step.
  perturbed_loss: jax.Array  # L(w + eps); the clean loss on steps without a perturbed pass,
                             # NaN when the transformation cannot report it (see `sam_step`).
  aux: Any                   # the clean pass's aux (`has_aux=True`), else None.


# --------------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------------


def sam_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[..., Any],
    batch: Any,
    *,
    has_aux: bool = False,
    keep_perturbed_state: bool = False,
    fresh_rngs: bool = False,
) -> StepMetrics:
  r"""One sharpness-aware train step of an NNX model, in place.

  .. math::
    g = \nabla_w L(w), \quad \epsilon = A(g), \quad
    w \leftarrow w + \mathrm{Opt}\big(C(g, \nabla_w L(w + \epsilon))\big)

  with `L(w) = loss_fn(model, batch)` evaluated with the model's parameters (the variables
  selected by the optimizer's `wrt` filter) set to `w`, and `A`, `C`, `Opt` the ascent,
  correction and inner optimizer of `optimizer.tx`. Two forward-backward passes per step (one
  on steps a cadence skips). The params, the optimizer state and step, and the model's other
  state (BatchNorm statistics, RNG counters) are updated in place, as `optimizer.update` does.

  Both passes start from the model's state before the step: the perturbed pass sees the same
  BatchNorm running statistics and, unless `fresh_rngs=True`, draws the same dropout masks as
  the clean pass (its RNG counters are reset to their values before the clean pass). The clean
  pass's state updates are kept and the perturbed pass's discarded, unless
  `keep_perturbed_state=True`. Under `fresh_rngs=True` the perturbed pass continues the RNG
  streams where the clean pass left them, and the model's streams end after the perturbed pass.

  A step that `sam_optax.skip_if_nonfinite` (or `optax.apply_if_finite`) skips, e.g. on a NaN
  batch, leaves every model variable as it was: the params, and also the BatchNorm statistics
  and RNG counters its clean pass computed (the optimizer's `step` still counts it, as
  `nnx.Optimizer.update` does). The skip is read from the step count of the sharpness-aware
  state inside `optimizer.opt_state`, which a skipped step does not advance; with a plain
  optax optimizer the state is written as usual.

  float16 compute: with `optimizer.tx` built by `sam_optax.dynamic_loss_scale`, both passes
  differentiate `S * loss_fn(model, batch)`, `S = sam_optax.loss_scale(optimizer.opt_state)`
  (the transformation unscales both gradients in float32), the losses reported are unscaled,
  and a step whose gradient overflowed in either pass is skipped with the model's state and the
  scale lowered, as above.

  `optimizer.tx` should be a `sam_optax` transformation built with `has_aux=True` (e.g.
  `sam_optax.sam(optax.sgd(0.1), has_aux=True)`): the step then passes the perturbed pass's
  loss and state through `tx.update_with_aux`. Any other optax transformation also works (a
  plain optimizer takes an ordinary step; a wrapped sharpness-aware one, e.g. under
  `optax.inject_hyperparams`, gets `grad_fn=` through `update`), but then the perturbed pass
  cannot report back: `perturbed_loss` is NaN, its state is discarded, and
  `keep_perturbed_state` and `fresh_rngs` are refused. m-sharpness (`chunk_size=`) splits the
  batch inside the engine and needs a gradient function of `(params, batch)`: call
  `tx.update(None, state, params, batch=..., grad_fn=...)` directly for that.

  Without this helper, the minimal path is Flax's own `optimizer.update(model, grads,
  grad_fn=...)`, which forwards `grad_fn` to `tx.update`; there `grad_fn` receives a pure
  `nnx.State` of the `wrt` variables and must return one::

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)       # a snapshot of the state before the clean pass
    grads = nnx.grad(loss_fn)(model, batch)
    def grad_fn(p):
      return nnx.as_pure(nnx.grad(loss_fn)(nnx.merge(graphdef, p, rest), batch))
    optimizer.update(model, grads, grad_fn=grad_fn)

  (the perturbed pass runs on a merged copy from the snapshot: same dropout keys, its state
  changes discarded; without `as_pure` the snapshot would share the model's variables and see
  the clean pass's updates). Before flax 0.12.7, `nnx.as_pure` is spelled `nnx.pure`.

  Args:
    model: the `nnx.Module` to train (the one `optimizer` was built for).
    optimizer: an `nnx.Optimizer` over `model`.
    loss_fn: `loss_fn(model, batch) -> loss` (a scalar), or `(loss, aux)` with `has_aux=True`.
    batch: anything `loss_fn` takes as its second argument.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    keep_perturbed_state: keep the perturbed pass's updates of the non-trainable state (e.g.
      BatchNorm statistics computed at `w + eps`) instead of the clean pass's.
    fresh_rngs: draw fresh randomness (e.g. new dropout masks) in the perturbed pass instead
      of reusing the clean pass's.

  Returns:
    `StepMetrics(loss, perturbed_loss, aux)`: the clean loss, the loss at the perturbed
    params, and the clean pass's aux.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import sam_optax, sam_optax.flax
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05, has_aux=True)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
    >>> batch = (jnp.ones((4, 3)), jnp.zeros((4, 1)))
    >>> train_step = nnx.jit(lambda m, o, b: sam_optax.flax.sam_step(m, o, loss_fn, b))
    >>> metrics = train_step(model, optimizer, batch)
    >>> bool(metrics.perturbed_loss >= metrics.loss)
    True

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412 (BatchNorm and dropout handling follows their
    implementation: one set of statistics per step, the same randomness in both passes).
  """
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(f"optimizer must be an nnx.Optimizer (nnx.Optimizer(model, tx, "
                    f"wrt=nnx.Param)), got {type(optimizer).__name__}.")
  if not callable(loss_fn):
    raise TypeError("loss_fn must be a function (model, batch) -> loss.")
  tx = optimizer.tx
  reports = _reports_aux(tx)
  if not reports and (keep_perturbed_state or fresh_rngs):
    raise ValueError(_NEEDS_AUX.format(what="keep_perturbed_state and fresh_rngs",
                                       example="nnx.Optimizer(model, sam_optax.sam(optax.sgd("
                                               "0.1), has_aux=True), wrt=nnx.Param)"))
  graph = getattr(optimizer, "graph", None)
  graph_kw = {} if graph is None else {"graph": graph}
  wrt = optimizer.wrt

  graphdef, params, rngs_before, other_before = nnx.split(model, wrt, nnx.RngState, ...,
                                                          **graph_kw)
  params = _as_pure(params)
  rngs_before = _as_pure(rngs_before)
  other_before = _as_pure(other_before)
  opt_state = _as_pure(optimizer.opt_state)
  scale = _loss_scale_or_none(opt_state)

  def run(p, rng_state):
    """loss_fn at params p, from the pre-step state: (loss times the loss scale, (loss, aux,
    rng state, other state))."""
    copy = nnx.merge(graphdef, p, rng_state, other_before)
    out = loss_fn(copy, batch)
    loss, aux = _split_loss(out, has_aux, "loss_fn(model, batch)")
    _, _, rng_after, other_after = nnx.split(copy, wrt, nnx.RngState, ..., **graph_kw)
    return _scaled(loss, scale), (loss, aux, _as_pure(rng_after), _as_pure(other_after))

  value_and_grad = jax.value_and_grad(run, has_aux=True)
  (_, (loss, aux, rngs_clean, other_clean)), grads = value_and_grad(params, rngs_before)
  rngs_perturbed_start = rngs_clean if fresh_rngs else rngs_before

  param_arrays = params
  if reports:
    def grad_and_aux(p):
      (_, (p_loss, _, p_rngs, p_other)), p_grads = value_and_grad(p, rngs_perturbed_start)
      # The flag is True here and zero (False) on steps where the engine skips this pass.
      return p_grads, (jnp.ones([], jnp.bool_), p_loss, _keys_to_data((p_rngs, p_other)))

    sam_tx = cast(SharpnessAwareTransformation, tx)  # what _reports_aux found
    updates, new_opt_state, (ran, perturbed_loss, perturbed_state) = sam_tx.update_with_aux(
        grads, opt_state, param_arrays, grad_fn=grad_and_aux)
    rngs_perturbed, other_perturbed = _data_to_keys(perturbed_state, (rngs_clean, other_clean))
    perturbed_loss = jnp.where(ran, perturbed_loss, loss)
    # Default randomness: both passes leave the streams at the same place. Fresh randomness:
    # the streams end after the perturbed pass, so the next step draws new keys.
    new_rngs = optax.tree.where(ran, rngs_perturbed, rngs_clean)
    new_other = (optax.tree.where(ran, other_perturbed, other_clean) if keep_perturbed_state
                 else other_clean)
  else:
    def grad_fn(p):
      return value_and_grad(p, rngs_perturbed_start)[1]

    updates, new_opt_state = optax.with_extra_args_support(tx).update(
        grads, opt_state, param_arrays, grad_fn=grad_fn)
    perturbed_loss = jnp.full_like(loss, jnp.nan)
    new_rngs, new_other = rngs_clean, other_clean

  applied = _step_applied(opt_state, new_opt_state)
  if applied is not None:
    # A step that skip_if_nonfinite or optax.apply_if_finite skipped (a NaN batch) leaves every
    # model variable as it was: not only the params, also the BatchNorm statistics and RNG
    # counters the clean pass of the bad batch wrote.
    new_rngs = optax.tree.where(applied, new_rngs, rngs_before)
    new_other = optax.tree.where(applied, new_other, other_before)
  new_params = optax.apply_updates(param_arrays, updates)
  nnx.update(model, new_params, new_rngs, new_other)
  nnx.update(optimizer.opt_state, nnx.state(new_opt_state, **graph_kw))
  optimizer.step[...] += 1
  return StepMetrics(loss=loss, perturbed_loss=perturbed_loss, aux=aux)


# --------------------------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------------------------


def linen_sam_step(
    state: flax_train_state.TrainState,
    loss_fn: Callable[..., Any],
    *,
    mutable: bool = False,
    has_aux: bool = False,
    keep_perturbed_state: bool = False,
    perturbed_loss_fn: Callable[..., Any] | None = None,
) -> tuple[flax_train_state.TrainState, StepMetrics]:
  r"""One sharpness-aware step of a Linen `TrainState` (any subclass), functionally.

  .. math::
    g = \nabla L(w), \quad \epsilon = A(g), \quad
    w \leftarrow w + \mathrm{Opt}\big(C(g, \nabla L(w + \epsilon))\big)

  with `L = loss_fn` and `A`, `C`, `Opt` the pieces of `state.tx` (a `sam_optax`
  transformation built with `has_aux=True`; other transformations as in `sam_step`: the
  perturbed loss is then NaN). Two forward-backward passes per step.

  `loss_fn(params)` is the closure you would hand to `jax.value_and_grad`: it reads the
  BatchNorm statistics and the dropout key from the enclosing scope, so the perturbed pass,
  which calls it again at `w + eps`, sees the same statistics and the same dropout key. What it
  returns:

  * `loss` (a scalar), with `mutable=False, has_aux=False`;
  * `(loss, updates)` with `mutable=True`, where `updates` maps collection names to their new
    values, as `apply(..., mutable=['batch_stats'])` returns them; the step writes them into
    the state's fields of the same names (`state.replace(**updates)`);
  * `(loss, aux)` with `has_aux=True`, `(loss, (updates, aux))` with both.

  The clean pass's `updates` are written and the perturbed pass's discarded, unless
  `keep_perturbed_state=True`. For fresh randomness in the perturbed pass, pass
  `perturbed_loss_fn`, the same function with another dropout key. A step that
  `sam_optax.skip_if_nonfinite` (or `optax.apply_if_finite`) skips leaves the collections
  (e.g. `batch_stats`) as they were, with the params; `step` still counts it. With `state.tx`
  built by `sam_optax.dynamic_loss_scale`, both passes differentiate `S * loss_fn(params)`,
  `S = sam_optax.loss_scale(state.opt_state)`, and the losses reported are unscaled.

  Args:
    state: a `flax.training.train_state.TrainState` (or subclass, e.g. `SAMTrainState`) whose
      `tx` is a sharpness-aware transformation.
    loss_fn: `params -> loss` (see above for `mutable` and `has_aux`).
    mutable: whether `loss_fn` also returns the updated mutable collections.
    has_aux: whether `loss_fn` also returns an aux.
    keep_perturbed_state: write the perturbed pass's `updates` instead of the clean pass's.
    perturbed_loss_fn: the function evaluated at the perturbed params (default `loss_fn`),
      with the same return convention.

  Returns:
    `(new_state, StepMetrics(loss, perturbed_loss, aux))`: `step` incremented, `params` and
    `opt_state` updated, the mutable collections replaced.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import sam_optax, sam_optax.flax
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> state = sam_optax.flax.SAMTrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=sam_optax.sam(optax.sgd(0.1), has_aux=True))
    >>> @jax.jit
    ... def train_step(state):
    ...   loss_fn = lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2)
    ...   return sam_optax.flax.linen_sam_step(state, loss_fn)
    >>> state, metrics = train_step(state)
    >>> int(state.step)
    1

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412
  """
  if not callable(loss_fn):
    raise TypeError("loss_fn must be a function params -> loss.")
  if perturbed_loss_fn is None:
    perturbed_loss_fn = loss_fn
  elif not callable(perturbed_loss_fn):
    raise TypeError("perturbed_loss_fn must be a function params -> loss, like loss_fn.")
  tx = state.tx
  reports = _reports_aux(tx)
  if not reports and keep_perturbed_state:
    raise ValueError(_NEEDS_AUX.format(what="keep_perturbed_state",
                                       example="sam_optax.sam(optax.sgd(0.1), has_aux=True)"))
  if isinstance(state.params, dict) and _OVERWRITE_WITH_GRADIENT in state.params:
    raise ValueError("linen_sam_step does not support overwrite-with-gradient params "
                     f"({_OVERWRITE_WITH_GRADIENT!r}); use apply_gradients for those models.")

  scale = _loss_scale_or_none(state.opt_state)

  def pure(fn):
    def wrapped(p):
      out = fn(p)
      loss, rest = _split_loss(out, mutable or has_aux, "loss_fn(params)")
      if mutable and has_aux:
        if not (isinstance(rest, tuple) and len(rest) == 2):
          raise ValueError("With mutable=True and has_aux=True, loss_fn must return "
                           "(loss, (updates, aux)).")
        updates, aux = rest
      elif mutable:
        updates, aux = rest, None
      else:
        updates, aux = {}, rest
      if not hasattr(updates, "keys"):
        raise ValueError(f"With mutable=True, loss_fn must return (loss, updates) with updates "
                         f"a dict of collections, e.g. {{'batch_stats': ...}}, as apply(..., "
                         f"mutable=['batch_stats']) returns; got {type(updates).__name__}.")
      # a mapping: checked just above
      return _scaled(loss, scale), (loss, dict(cast(Any, updates)), aux)
    return jax.value_and_grad(wrapped, has_aux=True)

  (_, (loss, updates_clean, aux)), grads = pure(loss_fn)(state.params)
  perturbed_grad = pure(perturbed_loss_fn)
  if reports:
    def grad_and_aux(p):
      (_, (p_loss, p_updates, _)), p_grads = perturbed_grad(p)
      return p_grads, (jnp.ones([], jnp.bool_), p_loss, _keys_to_data(p_updates))

    sam_tx = cast(SharpnessAwareTransformation, tx)  # what _reports_aux found
    step_updates, new_opt_state, (ran, perturbed_loss, p_updates) = sam_tx.update_with_aux(
        grads, state.opt_state, state.params, grad_fn=grad_and_aux)
    perturbed_loss = jnp.where(ran, perturbed_loss, loss)
    new_collections = updates_clean
    if keep_perturbed_state:
      perturbed_collections = _data_to_keys(p_updates, updates_clean)
      new_collections = optax.tree.where(ran, perturbed_collections, updates_clean)
  else:
    step_updates, new_opt_state = optax.with_extra_args_support(tx).update(
        grads, state.opt_state, state.params, grad_fn=lambda p: perturbed_grad(p)[1])
    perturbed_loss = jnp.full_like(loss, jnp.nan)
    new_collections = updates_clean

  applied = _step_applied(state.opt_state, new_opt_state)
  if applied is not None:
    # A skipped step (skip_if_nonfinite, optax.apply_if_finite) keeps the collections too.
    new_collections = {name: _select_like(applied, value, getattr(state, name, None))
                       for name, value in new_collections.items()}
  new_params = optax.apply_updates(state.params, step_updates)
  try:
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                              **new_collections)
  except TypeError as error:
    raise ValueError(
        f"loss_fn returned updates for {sorted(new_collections)}, but {type(state).__name__} "
        f"has no field of that name: use sam_optax.flax.SAMTrainState (it has batch_stats) or "
        f"a TrainState subclass with one field per mutable collection.") from error
  return new_state, StepMetrics(loss=loss, perturbed_loss=perturbed_loss, aux=aux)


class SAMTrainState(flax_train_state.TrainState):
  """A Linen `TrainState` for sharpness-aware training, with BatchNorm statistics.

  A drop-in `flax.training.train_state.TrainState` (create it with `SAMTrainState.create(
  apply_fn=..., params=..., tx=..., batch_stats=...)`), with:

  * `batch_stats`: the BatchNorm statistics (None for models without them);
  * `apply_gradients(grads=..., grad_fn=None, **kwargs)`: as Flax's, and `grad_fn` (params ->
    gradient, or `(gradient, aux)` for a transformation built with `has_aux=True`) is
    forwarded to `tx.update`, which a one-call `sam_optax` transformation needs;
  * `sam_step(loss_fn, ...)`: the whole step, see `linen_sam_step`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import sam_optax, sam_optax.flax
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> state = sam_optax.flax.SAMTrainState.create(
    ...     apply_fn=model.apply, params=model.init(jax.random.key(0), x)['params'],
    ...     tx=sam_optax.sam(optax.sgd(0.1)))
    >>> loss = lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2)
    >>> state = state.apply_gradients(grads=jax.grad(loss)(state.params),
    ...                               grad_fn=jax.grad(loss))
    >>> int(state.step)
    1
  """
  batch_stats: Any = None

  def apply_gradients(self, *, grads, grad_fn=None, **kwargs):
    """Updates `step`, `params` and `opt_state`, forwarding `grad_fn` to `tx.update`.

    Args:
      grads: the gradient at `self.params`.
      grad_fn: the gradient function sharpness-aware transformations evaluate at the
        perturbed params (None: Flax's behaviour).
      **kwargs: other fields to replace (e.g. `batch_stats=`).

    Returns:
      The updated state.
    """
    if grad_fn is None:
      return super().apply_gradients(grads=grads, **kwargs)
    updates, new_opt_state = optax.with_extra_args_support(self.tx).update(
        grads, self.opt_state, self.params, grad_fn=grad_fn)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=new_opt_state, **kwargs)

  def sam_step(self, loss_fn, **options):
    """`linen_sam_step(self, loss_fn, **options)`: returns `(new_state, StepMetrics)`."""
    return linen_sam_step(self, loss_fn, **options)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_OVERWRITE_WITH_GRADIENT = "_overwrite_with_gradient"

_NEEDS_AUX = (
    "{what} need(s) the perturbed pass to report back, which takes a sam_optax transformation "
    "built with has_aux=True, e.g. {example}.")


def _reports_aux(tx) -> bool:
  """Whether tx is a one-call sam_optax transformation whose grad_fn returns (grads, aux)."""
  if not isinstance(tx, SharpnessAwareTransformation):
    return False
  if tx.two_call:
    raise ValueError("The sam_optax.flax steps use the one-call form: build the transformation "
                     "without two_call=True.")
  if not getattr(tx, "has_aux", False):
    raise ValueError("The sam_optax.flax steps pass the perturbed pass's loss and state through "
                     "the transformation: build it with has_aux=True, e.g. "
                     "sam_optax.sam(optax.sgd(0.1), rho=0.05, has_aux=True).")
  return True


def _loss_scale_or_none(opt_state):
  """The loss scale of a `sam_optax.dynamic_loss_scale` in the optimizer state, or None."""
  return None if find_loss_scale_state(opt_state) is None else loss_scale(opt_state)


def _scaled(loss, scale):
  """The loss both passes differentiate: times the loss scale, when the optimizer has one."""
  return loss if scale is None else loss * scale


def _split_loss(out, has_aux, what):
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(f"{what} must return a pair (loss, aux) here, got "
                       f"{type(out).__name__}.")
    loss, aux = out
  else:
    if isinstance(out, tuple):
      raise ValueError(f"{what} returned a tuple: pass has_aux=True if it returns (loss, aux)"
                       f"{' (or mutable=True for (loss, updates))' if 'params' in what else ''}.")
    loss, aux = out, None
  loss = jnp.asarray(loss)
  if loss.shape != ():
    raise ValueError(f"{what} must return a scalar loss, got shape {loss.shape}.")
  return loss, aux


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  """PRNG key arrays as their raw data: the engine builds zeros of the aux on skipped steps."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, like):
  return jax.tree.map(
      lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
      if _is_key(ref) else x, tree, like)


def _select_like(pred, new, old):
  """`new` where pred, else `old` (e.g. a collection before the step), leaf by leaf; `new`
  when `old` does not have its leaves' shapes (a collection the step creates)."""
  new_leaves, treedef = jax.tree.flatten(new)
  old_leaves = jax.tree.leaves(old)
  if len(old_leaves) != len(new_leaves) or any(
      jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b)
      for a, b in zip(new_leaves, old_leaves)):
    return new
  return jax.tree.unflatten(treedef, [jax.lax.select(pred, a, b)
                                      for a, b in zip(new_leaves, old_leaves)])


def _step_applied(old_opt_state, new_opt_state):
  """Whether the optimizer applied the step, or None when that cannot be told.

  A wrapper that skips a non-finite step (`sam_optax.skip_if_nonfinite`,
  `optax.apply_if_finite`) hands back the sharpness-aware state it was given, so the step
  count of every `SharpnessAwareState` in the optimizer state stays put; an applied step
  advances it. Optimizer states without one (plain optax optimizers) give None.
  """
  is_sam = lambda x: isinstance(x, SharpnessAwareState)
  old = [x for x in jax.tree.leaves(old_opt_state, is_leaf=is_sam) if is_sam(x)]
  new = [x for x in jax.tree.leaves(new_opt_state, is_leaf=is_sam) if is_sam(x)]
  if not old or len(old) != len(new):
    return None
  moved = [jnp.asarray(n.count) != jnp.asarray(o.count) for o, n in zip(old, new)]
  return jnp.any(jnp.stack(moved))
