"""Ascents: maps from the clean gradient `g` to the perturbation `eps`.

Each ascent is an `optax.GradientTransformationExtraArgs`: `update(g, state, params, **extra)`
returns `eps` where optax would return updates. The engine adds `eps` to the params and takes the
descent gradient there. Users can chain their own pre-processing in front of an ascent with
`optax.chain`, or write a new ascent in the same shape.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Union, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import tree
from sam_optax._src.hyperparams import ScalarOrSchedule, check_hparam, value_at
from sam_optax._src.hyperparams import check_positive_int, check_run_time_value, is_constant


# A radius: one number or schedule, or a pytree prefix of the params holding one per leaf or
# subtree (e.g. `{'encoder': 0.05, 'head': 0.0}`). Lists and tuples rather than `Sequence`, so
# that a string (`rho="big"`) stays a type error.
Radius = Union[ScalarOrSchedule, Mapping[Any, Any], list[Any], tuple[Any, ...]]


def _increment(count: jax.Array) -> jax.Array:
  """`count + 1`, saturating at the int32 maximum (`optax.safe_increment`, typed as an array)."""
  return cast(jax.Array, optax.safe_increment(count))


def _ascent(init, update) -> optax.GradientTransformationExtraArgs:
  """The ascent `(init, update)`. `update`'s first parameter is named `grads` (the clean
  gradient) where optax's protocol says `updates`: the same positional argument."""
  return optax.GradientTransformationExtraArgs(init, update)


def _gradient_free_ascent(init, update) -> GradientFreeAscent:
  """The ascent `(init, update)` that ignores `g`; `update`'s parameters as in `_ascent`."""
  return GradientFreeAscent(init, update)


class GradientFreeAscent(optax.GradientTransformationExtraArgs):
  r"""An ascent whose perturbation does not read the clean gradient `g` it is handed.

  .. math::
      \epsilon_t = A(\text{state}_t, w_t) \quad \text{(independent of } g_t)

  Momentum-SAM (the last step), random SAM (Gaussian noise and its own gradient) and bSAM (a
  posterior sample) build their perturbation without `g`. Built as
  `GradientFreeAscent(init, update)`, like an `optax.GradientTransformationExtraArgs`, such an
  ascent tells the engine (`reads_grads = False`) to leave `g` unread: the perturbed pass then
  never substitutes `g` at `eps = 0` nor tests it for non-finite entries, so under `jax.jit` a
  clean gradient the caller computed only for this update is dead code and the caller may pass
  zeros. Any other ascent reads `g` (`sam_optax.ascent_reads_grads` says which).

  Example:
    >>> import jax, optax, sam_optax
    >>> noise = sam_optax.GradientFreeAscent(
    ...     lambda params: optax.EmptyState(),
    ...     lambda grads, state, params=None, **extra: (
    ...         jax.tree.map(lambda w: 0.01 * jax.numpy.ones_like(w), params), state))
    >>> tx = sam_optax.sharpness_aware(optax.sgd(0.1), noise)
    >>> sam_optax.ascent_reads_grads(noise)
    False

  References:
    Becker, Altrock & Risse, *Momentum-SAM*, https://arxiv.org/abs/2401.12033
  """
  __slots__ = ()
  reads_grads: ClassVar[bool] = False


def ascent_reads_grads(ascent: optax.GradientTransformation) -> bool:
  r"""Whether `ascent` reads the clean gradient it is handed: False for a `GradientFreeAscent`.

  .. math::
      \text{reads}(A) = \neg\, [A \text{ is a GradientFreeAscent}]

  Args:
    ascent: an ascent transformation.

  Returns:
    False when `ascent` is a `GradientFreeAscent`, True otherwise.

  Example:
    >>> import sam_optax
    >>> sam_optax.ascent_reads_grads(sam_optax.normalized_ascent(0.05))
    True

  References:
    Foret et al., *Sharpness-Aware Minimization*, https://arxiv.org/abs/2010.01412
  """
  return getattr(ascent, "reads_grads", True)


class AscentCountState(NamedTuple):
  """State of an ascent whose hyperparameters may follow a schedule."""
  count: jax.Array  # int32 scalar: ascents taken so far, the schedules' argument.


def _count_init(params) -> AscentCountState:
  """The initial state of an ascent that keeps only its step count."""
  del params
  return AscentCountState(count=jnp.zeros([], jnp.int32))


def unified_ascent(rho: Radius, lam: ScalarOrSchedule = 1.0, *, layerwise: bool = False
                   ) -> optax.GradientTransformationExtraArgs:
  r"""Unified SAM's ascent, which covers the normalized and the unnormalized one.

  .. math::
    \epsilon_l = \rho_{l,t}\, s_l \left(1 - \lambda_t + \frac{\lambda_t}{\|g\|}\right) g_l,
    \qquad s_l = \|w_l\| \text{ (layerwise) or } 1

  for every leaf `l`, with `||g||` the global L2 norm over all leaves, accumulated in float32
  or wider and finite for any finite `g` (float32 entries of 1e30 or 1e-25 included: no
  overflow of `||g||^2`); `1/||g||` is taken as 0 when `g = 0`, so a zero gradient gives a zero
  perturbation. `lam = 1` is SAM's `rho g / ||g||` and `lam = 0` is USAM's `rho g`, both
  exactly.

  Per-leaf radii: `rho` may be a pytree prefix of the params holding one radius (a float or a
  schedule) per leaf or per subtree, e.g. `{'encoder': 0.05, 'head': 0.0}`; `rho_l` is the
  radius of the subtree holding leaf `l`. The norm stays global, so the direction within each
  leaf is SAM's and only the lengths change: `||eps|| = sqrt(sum_l rho_l^2 ||g_l||^2) / ||g||`
  (for `lam = 1`). A zero radius leaves its leaves unperturbed, while they still count in
  `||g||` (to leave them out of the norm as well, use the engine's `mask=`).

  Layer-wise scaling (`layerwise=True`): each leaf's radius is multiplied by that leaf's weight
  norm `||w_l||` (LAMB's trust ratio applied to the ascent; the leaf-level analogue of
  big_vision GSAM's elementwise `rho |w| g / ||g||`), so that `rho` is a radius relative to
  each leaf's scale: for `lam = 1`, `||eps_l|| / ||w_l|| = rho_l ||g_l|| / ||g||`, whose squares
  sum to `rho^2` for a scalar `rho`. The norm stays global (rather than each leaf normalized by
  its own `||g_l||`, which would perturb every leaf by the same relative amount however small
  its gradient): within each leaf the direction is SAM's, and with equal `||w_l|| = c` the
  ascent is SAM's with radius `rho c`. Leaves with zero weights (biases at initialization) are
  not perturbed; `||w_l||` is accumulated in float32 or wider. Radii are then relative sizes
  (of order 0.01 to 0.1 of each leaf's norm), not SAM's absolute 0.05.

  Args:
    rho: the perturbation radius, >= 0; a float or a schedule of the ascent count, or a pytree
      prefix of the params holding one per leaf or subtree. Numbers are checked here (a
      negative or non-finite one raises a ValueError); schedules and traced values at every
      step, as the scalar `rho` is; a tree that is not a prefix of the params raises a
      ValueError at the first `update`.
    lam: the normalization weight in [0, 1]; a float or a schedule.
    layerwise: multiply each leaf's radius by its weight norm `||w_l||` (needs `params`).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent = unified_ascent(rho=0.5, lam=0.5)  # 0.5 (0.5 + 0.5 / 2) g
    >>> g = {'w': jnp.array([0.0, 2.0])}
    >>> eps, _ = ascent.update(g, ascent.init(g))
    >>> eps['w']
    Array([0.  , 0.75], dtype=float32)

  References:
    Oikonomou & Loizou, *Sharpness-Aware Minimization: General Analysis and Improved Rates*,
    ICLR 2025, https://arxiv.org/abs/2503.02225;
    You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76 minutes*
    (LAMB's layer-wise trust ratio), ICLR 2020, https://arxiv.org/abs/1904.00962;
    Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization* (layer-wise
    scaling of the perturbation in Look-LayerSAM), CVPR 2022, https://arxiv.org/abs/2203.02714
  """
  rho = check_radius(rho, hint="rho is the radius of the perturbation ball.")
  lam = check_hparam("lam", lam, high=1.0, hint="lam=1 is SAM, lam=0 is USAM.")
  _check_layerwise(layerwise)

  init = _count_init

  def update(grads, state, params=None, *, param_axis_name=None, **extra):
    del extra
    lam_t = value_at(lam, state.count)
    grad_norm = tree.norm(grads, axis_name=param_axis_name)
    common = (1.0 - lam_t) + lam_t * tree.safe_inverse(grad_norm)
    eps = scale_by_radius(rho, state.count, common, grads, params, layerwise=layerwise,
                          axis_name=param_axis_name)
    return eps, AscentCountState(_increment(state.count))

  return _ascent(init, update)


_LEAF = jax.tree.structure(0.0)


def _is_radius_tree(rho) -> bool:
  """Whether `rho` is a tree of radii (a dict, list, tuple, ...) rather than one radius."""
  return rho is not None and jax.tree.structure(rho) != _LEAF


def check_radius(rho: Radius, *, name: str = "rho", hint: str = "") -> Any:
  """Validates a radius: one number or schedule (`check_hparam`), or a tree of them.

  Every number of a tree is checked now (a negative or non-finite one raises a ValueError
  naming its path, e.g. `rho['head']`), every schedule or traced value wrapped to be checked at
  each step, as a scalar radius is.

  Returns:
    The checked radius, or tree of radii, to resolve with `scale_by_radius`.
  """
  if not _is_radius_tree(rho):
    return check_hparam(name, cast(ScalarOrSchedule, rho), hint=hint)
  if not jax.tree.leaves(rho):
    raise ValueError(f"{name} is an empty tree ({rho!r}): give one radius per leaf or subtree "
                     f"of the params, or one number.")
  return jax.tree_util.tree_map_with_path(
      lambda path, r: check_hparam(f"{name}{jax.tree_util.keystr(path)}", r, hint=hint), rho)


def _check_layerwise(layerwise):
  if not isinstance(layerwise, (bool, np.bool_)):
    raise TypeError(f"layerwise must be a Python bool, got {type(layerwise).__name__} (it is "
                    f"structural: list it in static_args under optax.inject_hyperparams).")


def _radii_per_leaf(rho, count, values, name):
  """The radius of each leaf of `values` (a list in leaf order), from a prefix tree `rho`."""
  rho_def = jax.tree.structure(rho)
  try:
    subtrees = rho_def.flatten_up_to(values)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"{name} is a tree of radii that is not a prefix of the params: {name} has structure "
        f"{rho_def}, the params (as the ascent sees them) {jax.tree.structure(values)}. Give "
        f"one radius per leaf or per subtree with the params' keys and nesting, e.g. "
        f"{{'dense': 0.05, 'bias': 0.0}} for params {{'dense': ..., 'bias': ...}}.") from error
  radii = []
  for r, subtree in zip(jax.tree.leaves(rho), subtrees):
    value = value_at(r, count)
    radii.extend(value for _ in jax.tree.leaves(subtree))
  return radii


def scale_by_radius(rho: Any, count: jax.Array, common: jax.Array, values: Any,
                    params: Any = None, *, layerwise: bool = False, axis_name=None,
                    name: str = "rho") -> Any:
  r"""`rho_l s_l common values_l` for every leaf `l`: the radius applied to a direction.

  `s_l = ||w_l||` (accumulated in float32 or wider) with `layerwise`, else 1. A scalar `rho`
  without `layerwise` is `tree.scale(rho_t * common, values)`: one product per leaf, bit for bit
  the scalar rule.

  Args:
    rho: a checked radius or tree of radii (`check_radius`).
    count: the schedules' argument.
    common: the factor every leaf shares (e.g. `1/||g||`).
    values: the direction, a tree like the params.
    params: the params (needed with `layerwise`).
    layerwise: scale each leaf's radius by its weight norm.
    axis_name: the mapped axis of sharded params, for the weight norms.
    name: the radius' name, for error messages.

  Returns:
    A tree like `values`, each leaf in its own dtype.
  """
  if not layerwise and not _is_radius_tree(rho):
    return tree.scale(value_at(rho, count) * common, values)
  leaves, treedef = jax.tree.flatten(values)
  if _is_radius_tree(rho):
    radii = _radii_per_leaf(rho, count, values, name)
  else:
    radii = [value_at(rho, count)] * len(leaves)
  if layerwise:
    if params is None:
      raise ValueError("layerwise=True scales each leaf's radius by its weight norm ||w_l||: "
                       "it needs the params, call update(g, state, params).")
    weights = treedef.flatten_up_to(params)
    radii = [r * tree.norm(w, axis_name=axis_name) for r, w in zip(radii, weights)]
  return jax.tree.unflatten(
      treedef, [tree.scale(r * common, x) for r, x in zip(radii, leaves)])


def normalized_ascent(rho: Radius, *, layerwise: bool = False
                      ) -> optax.GradientTransformationExtraArgs:
  r"""SAM's ascent, :math:`\epsilon = \rho\, g / \|g\|` (zero when `g = 0`).

  Per leaf, :math:`\epsilon_l = \rho_l s_l\, g_l / \|g\|` with a tree of radii `rho_l` and
  `s_l = ||w_l||` under `layerwise=True` (see `unified_ascent`); the norm stays global.

  Args:
    rho: the perturbation radius, >= 0; a float or a schedule of the ascent count, or a pytree
      prefix of the params holding one per leaf or subtree.
    layerwise: multiply each leaf's radius by its weight norm `||w_l||`.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent, g = normalized_ascent(0.5), {'w': jnp.array([0.0, 2.0])}
    >>> eps, _ = ascent.update(g, ascent.init(g))
    >>> eps['w']
    Array([0. , 0.5], dtype=float32)

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412
  """
  return unified_ascent(rho, lam=1.0, layerwise=layerwise)


def unnormalized_ascent(rho: Radius, *, layerwise: bool = False
                        ) -> optax.GradientTransformationExtraArgs:
  r"""USAM's ascent, :math:`\epsilon = \rho\, g`.

  Per leaf, :math:`\epsilon_l = \rho_l s_l\, g_l` with a tree of radii `rho_l` and
  `s_l = ||w_l||` under `layerwise=True` (see `unified_ascent`).

  Args:
    rho: the perturbation scale, >= 0; a float or a schedule of the ascent count, or a pytree
      prefix of the params holding one per leaf or subtree.
    layerwise: multiply each leaf's scale by its weight norm `||w_l||`.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent, g = unnormalized_ascent(0.5), {'w': jnp.array([0.0, 2.0])}
    >>> eps, _ = ascent.update(g, ascent.init(g))
    >>> eps['w']
    Array([0., 1.], dtype=float32)

  References:
    Andriushchenko & Flammarion, *Towards Understanding Sharpness-Aware Minimization*,
    ICML 2022, https://arxiv.org/abs/2206.06232
  """
  return unified_ascent(rho, lam=0.0, layerwise=layerwise)


# ------------------------------------------------------------------ seed ascents, part two


class NormEstimateState(NamedTuple):
  """State of the deterministic-normalization ascent (DNSAM)."""
  count: jax.Array        # int32 scalar: ascents taken so far.
  sq_norm_ema: jax.Array  # float scalar (float32 or wider): EMA of ||g||^2, not bias-corrected
                          # (each ||g||^2 capped at the dtype's largest value: always finite).


def deterministic_normalized_ascent(rho: Radius, decay: ScalarOrSchedule = 0.99
                                    ) -> optax.GradientTransformationExtraArgs:
  r"""DNSAM's ascent: the stochastic gradient, normalized by the full-batch gradient norm.

  .. math::
    \epsilon = \rho\, \frac{g}{\|\nabla L(w)\|}

  `g` is the (stochastic) clean gradient. The full-batch norm is the keyword
  `full_grad_norm=` of `update` when the caller passes it (a scalar, e.g. from a pass over the
  training set every few hundred steps). Without it, the norm is estimated as the root of a
  bias-corrected exponential moving average of the squared stochastic norm,

  .. math::
    v_t = \beta v_{t-1} + (1 - \beta) \|g_t\|^2, \qquad
    \widehat{\|\nabla L\|} = \sqrt{v_t / (1 - \beta^t)},

  which includes the current gradient (the first step is exactly SAM's). A squared norm beyond
  the dtype's range (a float32 gradient spike of 1e20: `||g||^2 = 1e40`) enters the average as
  the largest finite value (3.4e38), so the average stays finite and the spike's weight decays
  by `beta` per step, instead of the average becoming infinite and every later perturbation
  zero (the estimate on such a step is then below the true one). Why the squared norm:
  `E ||g_B||^2 = ||grad L||^2 + tr(Sigma)/B` splits additively into the full-batch part and
  the gradient noise, so the estimate is the full-batch norm plus a known, batch-size-dependent
  excess (it converges to `||grad L||` when the noise is small against the gradient, or with
  full batches), and normalizing by its root gives a perturbation whose root-mean-square length
  is exactly `rho`, SAM's radius, while its direction and relative length stay stochastic, which
  is the point of DNSAM. It costs one scalar of state and no extra gradient. Pass
  `full_grad_norm` for the exact rule: a finite scalar >= 0 (a negative or non-finite Python
  number raises a ValueError; a JAX array, e.g. traced under `jax.jit`, makes the perturbation,
  and so the step's updates, NaN). A full-batch norm of 0 with a nonzero stochastic gradient
  also gives NaN; with a zero gradient, as a zero estimated norm, a zero perturbation.

  Args:
    rho: the perturbation scale, >= 0; a float or a schedule of the ascent count, or a pytree
      prefix of the params holding one per leaf or subtree (`eps_l = rho_l g_l / ||grad L||`).
    decay: the moving average's decay `beta` in [0, 1); `decay=0` normalizes by the current
      stochastic norm (SAM).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`) whose `update`
    accepts `full_grad_norm=`.

  Example:
    >>> import jax.numpy as jnp
    >>> ascent = deterministic_normalized_ascent(rho=0.1)
    >>> g = {'w': jnp.array([3.0, 4.0])}
    >>> eps, state = ascent.update(g, ascent.init(g), full_grad_norm=10.0)
    >>> eps['w']
    Array([0.03, 0.04], dtype=float32)

  References:
    Compagnoni et al., *An SDE for Modeling SAM: Theory and Insights*, ICML 2023,
    https://arxiv.org/abs/2301.08203
  """
  rho = check_radius(rho, hint="rho is the radius of the perturbation ball.")
  if is_constant(decay, 1.0):
    raise ValueError("decay must be < 1 (decay=1 would never update the norm estimate); "
                     "use e.g. 0.99.")
  decay = check_hparam("decay", decay, high=1.0, high_open=True,
                       hint="decay is the moving average's, e.g. 0.99.")

  def init(params):
    return NormEstimateState(count=jnp.zeros([], jnp.int32),
                             sq_norm_ema=jnp.zeros([], tree.accumulation_dtype(params)))

  def update(grads, state, params=None, *, full_grad_norm=None, param_axis_name=None, **extra):
    del params, extra
    dtype = state.sq_norm_ema.dtype
    beta = value_at(decay, state.count).astype(dtype)
    count = _increment(state.count)
    # Linear in ||g||^2 (m-sharpness averages the state over chunks), finite for any finite g:
    # where ||g||^2 overflows and the (overflow-safe) norm is finite, the largest finite value.
    # NaN and inf (a non-finite g) stay.
    sq_norm = tree.vdot(grads, grads, axis_name=param_axis_name).astype(dtype)
    grad_norm = tree.norm(grads, axis_name=param_axis_name).astype(dtype)
    capped = jnp.where(jnp.isfinite(grad_norm), jnp.finfo(dtype).max, grad_norm)
    sq_norm = jnp.where(jnp.isfinite(sq_norm), sq_norm, capped)
    ema = (beta * state.sq_norm_ema + (1 - beta) * sq_norm).astype(dtype)
    if full_grad_norm is None:
      # The roots first: the bias-corrected average may exceed the largest value, its root not.
      norm = jnp.sqrt(ema) / jnp.sqrt(1 - beta ** count.astype(dtype))
    else:
      if jnp.ndim(full_grad_norm) != 0:
        raise ValueError(f"full_grad_norm must be a scalar (the norm of the full-batch "
                         f"gradient), got shape {jnp.shape(full_grad_norm)}.")
      # A negative or non-finite full-batch norm cannot normalize: it gives a NaN
      # perturbation (a ValueError for a Python number), never a silent plain step. A zero one
      # is a stationary point: consistent with a zero gradient (a zero perturbation, as SAM's),
      # not with a nonzero one (NaN).
      norm = check_run_time_value(
          "full_grad_norm", full_grad_norm, low=0.0,
          hint="It is the norm of the full-batch gradient; omit it to use the estimate."
      ).astype(dtype)
      norm = jnp.where((norm == 0) & (grad_norm != 0), jnp.nan, norm)
    # NaN-preserving where safe_inverse is not: a NaN norm (an invalid decay or full_grad_norm)
    # gives a NaN perturbation; a zero or infinite one still gives zero.
    inverse = jnp.where(jnp.isnan(norm), jnp.nan, tree.safe_inverse(norm))
    eps = scale_by_radius(rho, state.count, inverse, grads)
    return eps, NormEstimateState(count=count, sq_norm_ema=ema)

  return _ascent(init, update)


def hessian_ascent(rho: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  r"""HUSAM's ascent: the clean gradient mapped by the Hessian, :math:`\epsilon = \rho H(w) g`.

  `H(w) g` is one Hessian-vector product, forward-over-reverse: `jax.jvp` of the user's
  gradient function (the engine's `grad_fn` keyword) at `w` along `g`, at about the cost of
  two to three gradient evaluations and without forming `H`. One-call form only.

  Args:
    rho: the perturbation scale, >= 0; a float or a schedule of the ascent count.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`); its `update`
    needs the keyword `grad_fn` (params -> grads), which the engine supplies.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p['w'] ** 2)
    >>> params = {'w': jnp.array([1.0, 1.0])}
    >>> ascent = hessian_ascent(rho=0.5)
    >>> eps, _ = ascent.update(jax.grad(loss)(params), ascent.init(params), params,
    ...                        grad_fn=jax.grad(loss))
    >>> eps['w']
    Array([0.5, 4.5], dtype=float32)

  References:
    Bolte, Le & Pauwels, https://arxiv.org/abs/2510.09034
  """
  rho = check_hparam("rho", rho, hint="rho scales the perturbation rho * H g.")

  init = _count_init

  def update(grads, state, params=None, *, grad_fn=None, **extra):
    del extra
    grad_fn = _check_gradient_access("hessian_ascent (HUSAM)", grad_fn, params)
    tangent = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    _, hessian_grads = jax.jvp(grad_fn, (params,), (tangent,))
    eps = tree.scale(value_at(rho, state.count), hessian_grads)
    eps = jax.tree.map(lambda e, g: e.astype(g.dtype), eps, grads)
    return eps, AscentCountState(_increment(state.count))

  return _ascent(init, update)


def multistep_ascent(rho: ScalarOrSchedule, steps: int = 2, *, normalized: bool = True,
                     step_size: ScalarOrSchedule | None = None, project: bool = True,
                     nested: bool = False) -> optax.GradientTransformationExtraArgs:
  r"""`steps` ascent steps, each from the gradient at the previous iterate, kept in the rho-ball.

  .. math::
    e_0 = 0, \quad h_j = \nabla L(w + e_j) \;(h_0 = g), \quad
    e_{j+1} = P_\rho\big(e_j + a\, N(h_j)\big), \quad \epsilon = e_k

  with `a = step_size` (default `rho`), `N(h) = h / ||h||` (`normalized=True`) or `h`, and
  `P_rho` the projection onto the ball `||e|| <= rho` (`project=True`) or the identity: the
  projected gradient ascent of Andriushchenko & Flammarion's code. `nested=True` drops the
  `e_j` inside the projection, so each iterate replaces the previous one instead of adding to
  it: `e_{j+1} = P(a N(grad L(w + e_j)))`, the nested form
  `grad L(w + rho grad L(w + rho grad L(...)))`; USAM2 is `steps=2, normalized=False,
  project=False, nested=True`. With `steps=1` both forms are SAM (`normalized=True`) or USAM
  (`normalized=False, project=False`).

  The `steps - 1` gradients after the clean one come from the engine's `grad_fn` keyword
  (one-call form only), unrolled. Zero gradients give a zero perturbation.

  Args:
    rho: the radius of the ball (and the default step size), >= 0; a float or a schedule.
    steps: the number of ascent steps `k` >= 1 (structural: list it in `static_args` under
      `optax.inject_hyperparams`).
    normalized: normalize each step's gradient.
    step_size: the step `a`, >= 0; None for `rho`. A float or a schedule.
    project: project every iterate onto the rho-ball.
    nested: each iterate replaces the previous one rather than adding to it.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`); its `update`
    needs the keyword `grad_fn` when `steps > 1`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda p: jnp.sum(jnp.cos(p['w']))
    >>> params = {'w': jnp.array([0.5, -1.0])}
    >>> ascent = multistep_ascent(rho=0.1, steps=3)
    >>> eps, _ = ascent.update(jax.grad(loss)(params), ascent.init(params), params,
    ...                        grad_fn=jax.grad(loss))
    >>> bool(jnp.linalg.norm(eps['w']) <= 0.1 + 1e-6)
    True

  References:
    Andriushchenko & Flammarion, *Towards Understanding Sharpness-Aware Minimization*,
    ICML 2022, https://arxiv.org/abs/2206.06232;
    Bolte, Le & Pauwels, https://arxiv.org/abs/2510.09034
  """
  rho = check_hparam("rho", rho, hint="rho is the radius of the perturbation ball.")
  steps = check_positive_int("steps", steps)
  if step_size is not None:
    step_size = check_hparam("step_size", step_size,
                             hint="step_size is the length of each ascent step.")
  for name, flag in (("normalized", normalized), ("project", project), ("nested", nested)):
    if not isinstance(flag, bool):
      raise TypeError(f"{name} must be a Python bool, got {type(flag).__name__} (it is "
                      f"structural: list it in static_args under optax.inject_hyperparams).")

  init = _count_init

  def update(grads, state, params=None, *, grad_fn=None, param_axis_name=None, **extra):
    del extra
    if steps > 1:
      grad_fn = _check_gradient_access("multistep_ascent", grad_fn, params)
    radius = value_at(rho, state.count)
    a = radius if step_size is None else value_at(step_size, state.count)

    def advance(e, h):
      if normalized:
        h = tree.scale(tree.safe_inverse(tree.norm(h, axis_name=param_axis_name)), h)
      step = jax.tree.map(lambda s, x: s.astype(x.dtype), tree.scale(a, h), e)
      e = step if nested else tree.add(e, step)
      if not project:
        return e
      n = tree.norm(e, axis_name=param_axis_name)
      outside = jnp.logical_not(n <= radius)  # True for a NaN radius: NaN eps, not unprojected
      return tree.scale(jnp.where(outside, radius / jnp.where(outside, n, 1.0), 1.0), e)

    eps = advance(optax.tree.zeros_like(grads), grads)
    # Unrolled: XLA:CPU runs convolutions inside a loop body several times slower than outside
    # (jax-ml/jax#12868), and `steps` is small (2-5), so straight-line code costs little compile
    # time.
    for _ in range(steps - 1):
      eps = advance(eps, cast(Callable[[Any], Any], grad_fn)(tree.add(params, eps)))
    return eps, AscentCountState(_increment(state.count))

  return _ascent(init, update)


def _check_gradient_access(name, grad_fn, params) -> Callable[[Any], Any]:
  """`grad_fn`, which an ascent that evaluates gradients needs, with the params."""
  if grad_fn is None:
    raise ValueError(
        f"{name} evaluates gradients inside the ascent: it needs the one-call form, where the "
        f"engine passes grad_fn (call tx.update(grads, state, params, grad_fn=...)); it cannot "
        f"run with two_call=True. Called directly, pass grad_fn=jax.grad(loss).")
  if params is None:
    raise ValueError(f"{name} needs the params: call update(grads, state, params, ...).")
  return grad_fn


# ------------------------------------------------------------------ the wider field


def _step(own_count, count):
  """The argument of schedules: the engine's step count when it passes one, else our own."""
  return own_count if count is None else count


def _split_per_leaf(key, like):
  """One PRNG key per leaf of `like` (a tree of arrays), as a list in leaf order."""
  n = len(jax.tree.leaves(like))
  return list(jax.random.split(key, n)) if n else []


def _check_seed(seed):
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise TypeError(f"seed must be a Python int (it seeds the ascent's PRNG key at init), got "
                    f"{type(seed).__name__}.")


class AdaptiveWeights(NamedTuple):
  """ASAM's elementwise metric `T(w) = |w| + eta`, as a function of params."""
  eta: ScalarOrSchedule
  bias_convention: str

  def __call__(self, params):
    """`T(params)`: a tree like params (leaves given `T = 1` by the convention hold ones)."""
    # A number, or an injected value checked at run time: no schedule, so no count to pass.
    eta = value_at(self.eta, None)  # pyright: ignore[reportArgumentType]

    def leaf(path, w):
      if _has_unit_metric(path, w, self.bias_convention):
        return jnp.ones_like(w)
      return (jnp.abs(w) + eta.astype(w.dtype)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


ASAM_BIAS_CONVENTIONS = ("adaptive", "identity", "no_bias")


def _has_unit_metric(path, w, convention):
  if convention == "adaptive":
    return False
  if convention == "identity":  # vectors and scalars: biases and normalization scales/offsets
    return jnp.ndim(w) <= 1
  last = path[-1] if path else None
  name = getattr(last, "key", getattr(last, "name", None))
  return name == "bias"  # "no_bias": only leaves named `bias`, as the authors' name filter


def adaptive_ascent(rho: ScalarOrSchedule = 0.5, eta: ScalarOrSchedule = 0.01,
                    bias_convention: str = "adaptive") -> optax.GradientTransformationExtraArgs:
  r"""ASAM's ascent: the SAM step in the scale-invariant (adaptive) metric.

  .. math::
    T_w = |w| + \eta \;(\text{elementwise}), \qquad
    \epsilon = \rho\, \frac{T_w^2\, g}{\|T_w\, g\|}

  the maximizer of the linearized loss over the ellipsoid `||T_w^{-1} eps|| <= rho`. A zero
  gradient gives a zero perturbation; `g` enters divided by a power of two near its largest
  entry (`eps` does not depend on its scale), so that gradients of any finite magnitude (float32
  ones of 1e30 or 1e-25 included) give a finite `eps`. `bias_convention` picks the leaves whose
  metric is the identity (`T = 1`): `"adaptive"` none (the paper's formula on every leaf),
  `"identity"` every leaf with at most one dimension (biases and normalization scales and
  offsets), `"no_bias"` the leaves whose last key is `bias` (the authors' code adapts only
  tensors named `weight`).

  Args:
    rho: the radius in the adaptive metric, >= 0 (the paper uses 0.5 to 2, 10x SAM's); a float
      or a schedule of the step count.
    eta: the offset `eta` >= 0 keeping `T` away from zero (paper 0.01).
    bias_convention: `"adaptive"`, `"identity"` or `"no_bias"` (see above).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent = adaptive_ascent(rho=0.5, eta=0.0)
    >>> params, g = {'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([1.0, 0.0])}
    >>> eps, _ = ascent.update(g, ascent.init(params), params)
    >>> eps['w']
    Array([0.5, 0. ], dtype=float32)

  References:
    Kwon et al., *ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
    Deep Neural Networks*, ICML 2021, https://arxiv.org/abs/2102.11600
  """
  rho = check_hparam("rho", rho,
                     hint="rho is the radius in the adaptive metric (paper: 0.5 to 2).")
  eta = check_hparam("eta", eta, hint="eta keeps |w| + eta away from zero (paper: 0.01).")
  if bias_convention not in ASAM_BIAS_CONVENTIONS:
    raise ValueError(f"bias_convention must be one of {ASAM_BIAS_CONVENTIONS}, got "
                     f"{bias_convention!r}.")
  weights = AdaptiveWeights(eta, bias_convention)

  init = _count_init

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del extra
    if params is None:
      raise ValueError("adaptive_ascent (ASAM) needs the params: call update(g, state, params).")
    g = tree.in_accumulation_dtype(grads)
    # eps does not change when g is scaled: take g / 2^e with 2^e <= max|g|, exact in the
    # normal range, so that T g neither overflows (|w| g at float32 |g| ~ 1e20) nor underflows.
    g = tree.times_power_of_two(g, -tree.max_exponent(g, axis_name=param_axis_name))
    t = jax.tree.map(lambda x, w: x.astype(w.dtype), weights(params), g)
    tg = jax.tree.map(lambda a, b: a * b, t, g)
    factor = value_at(rho, _step(state.count, count)) * tree.safe_inverse(
        tree.norm(tg, axis_name=param_axis_name))
    eps = tree.scale(factor, jax.tree.map(lambda a, b: a * b, t, tg))
    return optax.tree.cast_like(eps, grads), AscentCountState(_increment(state.count))

  return _ascent(init, update)


def lr_proportional_rho(learning_rate: ScalarOrSchedule | None, rho_max: float, rho_min: float,
                        lr_max: float | None = None, lr_min: float | None = None):
  r"""GSAM's radius schedule: rho moves with the learning rate between rho_min and rho_max.

  .. math::
    \rho_t = \mathrm{clip}\Big(\rho_{min} + (\rho_{max} - \rho_{min})
      \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}},\; \rho_{min}, \rho_{max}\Big)

  The clip keeps `rho_t` in `[rho_min, rho_max]` (never negative) during a warmup that starts
  below `lr_min`. A constant learning rate (or `lr_max == lr_min`) gives `rho_max`.

  Args:
    learning_rate: the inner optimizer's learning rate, a float or a schedule of the step.
    rho_max: the radius at `lr_max`.
    rho_min: the radius at `lr_min`.
    lr_max: the schedule's largest learning rate (required with a schedule).
    lr_min: the schedule's smallest learning rate after warmup (required with a schedule).

  Returns:
    A schedule `count -> rho_t`.

  Example:
    >>> import optax
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, end_value=0.001)
    >>> rho = lr_proportional_rho(lr, 0.05, 0.01, lr_max=0.1, lr_min=0.001)
    >>> [round(float(rho(t)), 4) for t in (0, 10, 100)]
    [0.01, 0.05, 0.01]

  References:
    Zhuang et al., *Surrogate Gap Minimization Improves Sharpness-Aware Training*, ICLR 2022,
    https://arxiv.org/abs/2203.08065
  """
  check_hparam("rho_max", rho_max, hint="rho_max is GSAM's radius at the peak learning rate.")
  check_hparam("rho_min", rho_min, hint="rho_min is GSAM's radius at the final learning rate.")
  from sam_optax._src.hyperparams import _concrete  # pylint: disable=g-import-not-at-top
  hi, lo = _concrete(rho_max), _concrete(rho_min)
  if hi is not None and lo is not None and lo > hi:
    raise ValueError(f"rho_min ({lo}) must be <= rho_max ({hi}).")
  if callable(learning_rate) and (lr_max is None or lr_min is None):
    raise ValueError("With a learning-rate schedule, pass lr_max and lr_min (its peak and its "
                     "final value), e.g. lr_max=peak_value, lr_min=end_value for "
                     "optax.warmup_cosine_decay_schedule: rho follows the learning rate "
                     "between them.")
  if learning_rate is None or lr_max is None or lr_min is None:
    return lambda count: jnp.asarray(rho_max)
  # The schedule's output is checked where it is used (the ascent's rho), at every step.
  check_hparam("lr_max", lr_max, hint="lr_max is the learning rate schedule's peak value.")
  check_hparam("lr_min", lr_min, hint="lr_min is the learning rate schedule's final value.")
  lr_hi, lr_lo = _concrete(lr_max), _concrete(lr_min)
  if lr_hi is not None and lr_lo is not None and lr_lo > lr_hi:
    raise ValueError(f"lr_min ({lr_lo}) must be <= lr_max ({lr_hi}).")

  def schedule(count):
    lr = value_at(learning_rate, count)
    # In the widest float available (optax schedules of an int32 count run in float32), so
    # that the result does not depend on the precision the learning rate arrives in.
    lr = lr.astype(jnp.promote_types(lr.dtype, jax.dtypes.canonicalize_dtype(jnp.float64)))
    span = jnp.asarray(lr_max) - jnp.asarray(lr_min)
    frac = tree.safe_ratio(lr - jnp.asarray(lr_min), span)
    frac = jnp.where(span > 0, frac, jnp.ones_like(frac))
    rho_t = rho_min + (rho_max - rho_min) * frac
    return jnp.clip(rho_t, jnp.minimum(rho_min, rho_max), rho_max)

  return schedule


def step_count_ascent(rho: Radius, *, layerwise: bool = False
                      ) -> optax.GradientTransformationExtraArgs:
  r"""SAM's ascent :math:`\epsilon = \rho_t\, g / \|g\|` with `rho_t` a schedule of the step.

  Unlike `normalized_ascent` (whose schedules count ascents), the schedule's argument is the
  engine's step count (the keyword `count`), so that a radius tied to the learning-rate
  schedule stays aligned with it under SAM windows and cadences (GSAM).

  A tree of radii and `layerwise=True` work as in `unified_ascent`.

  Args:
    rho: the radius, a float or a schedule of the step count, or a pytree prefix of the params
      holding one per leaf or subtree.
    layerwise: multiply each leaf's radius by its weight norm `||w_l||`.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent, g = step_count_ascent(lambda t: 0.1 * t), {'w': jnp.array([3.0, 4.0])}
    >>> eps, _ = ascent.update(g, ascent.init(g), count=jnp.asarray(5))
    >>> eps['w']
    Array([0.3, 0.4], dtype=float32)

  References:
    Zhuang et al., *Surrogate Gap Minimization Improves Sharpness-Aware Training*, ICLR 2022,
    https://arxiv.org/abs/2203.08065
  """
  rho = check_radius(rho, hint="rho is the radius of the perturbation ball.")
  _check_layerwise(layerwise)

  init = _count_init

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del extra
    inverse = tree.safe_inverse(tree.norm(grads, axis_name=param_axis_name))
    eps = scale_by_radius(rho, _step(state.count, count), inverse, grads, params,
                          layerwise=layerwise, axis_name=param_axis_name)
    return eps, AscentCountState(_increment(state.count))

  return _ascent(init, update)


class AverageState(NamedTuple):
  """State of an ascent that keeps an average of past gradients."""
  count: jax.Array  # int32 scalar: ascents taken so far.
  average: Any      # tree like params: the running average.


def friendly_ascent(rho: Radius = 0.05, sigma: ScalarOrSchedule = 1.0,
                    lam: ScalarOrSchedule = 0.9) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM's ascent: the gradient minus its full-batch component, estimated by an EMA.

  .. math::
    d_t = g_t - \sigma m_{t-1}, \qquad \epsilon = \rho\, \frac{d_t}{\|d_t\|}, \qquad
    m_t = \lambda m_{t-1} + (1 - \lambda) g_t

  with `m_0 = g_1` on the first step (so the first perturbation is SAM's), as in the authors'
  code: the perturbation subtracts the *previous* average, then the average is updated.

  Args:
    rho: the radius, >= 0; a float or a schedule of the step count, or a pytree prefix of the
      params holding one per leaf or subtree (`eps_l = rho_l d_l / ||d||`).
    sigma: the weight of the subtracted average (paper 1).
    lam: the EMA decay in [0, 1] (paper 0.6 to 0.95; the authors' default 0.9).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs`); its state holds `m`.

  Example:
    >>> import jax.numpy as jnp
    >>> ascent, g = friendly_ascent(rho=1.0), {'w': jnp.array([3.0, 4.0])}
    >>> eps, state = ascent.update(g, ascent.init(g))
    >>> eps['w']
    Array([0.6, 0.8], dtype=float32)

  References:
    Li et al., *Friendly Sharpness-Aware Minimization*, CVPR 2024,
    https://arxiv.org/abs/2403.12350
  """
  rho = check_radius(rho, hint="rho is the radius of the perturbation ball.")
  sigma = check_hparam("sigma", sigma,
                       hint="sigma weighs the subtracted gradient average (paper 1).")
  lam = check_hparam("lam", lam, high=1.0, hint="lam is the EMA decay (paper 0.6 to 0.95).")

  def init(params):
    return AverageState(count=jnp.zeros([], jnp.int32),
                        average=optax.tree.zeros_like(params))

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del params, extra
    step = _step(state.count, count)
    g = tree.in_accumulation_dtype(grads)
    m = jax.tree.map(lambda x, y: x.astype(y.dtype), state.average, g)
    s, decay = value_at(sigma, step), value_at(lam, step)
    direction = jax.tree.map(lambda x, y: x - s.astype(x.dtype) * y, g, m)
    inverse = tree.safe_inverse(tree.norm(direction, axis_name=param_axis_name))
    first = state.count == 0
    new_m = jax.tree.map(
        lambda x, y: jnp.where(first, x, decay.astype(x.dtype) * y
                               + (1 - decay).astype(x.dtype) * x), g, m)
    return (optax.tree.cast_like(scale_by_radius(rho, step, inverse, direction), grads),
            AverageState(_increment(state.count),
                         optax.tree.cast_like(new_m, state.average)))

  return _ascent(init, update)


def variance_suppressed_ascent(rho: Radius = 0.05, theta: ScalarOrSchedule = 0.9
                               ) -> optax.GradientTransformationExtraArgs:
  r"""VaSSO's ascent: the normalized exponential average of past gradients.

  .. math::
    d_t = (1 - \theta) d_{t-1} + \theta g_t, \qquad \epsilon = \rho\, \frac{d_t}{\|d_t\|}

  with `d_1 = g_1` (the first perturbation is SAM's), as in the authors' code.

  Args:
    rho: the radius, >= 0; a float or a schedule of the step count, or a pytree prefix of the
      params holding one per leaf or subtree (`eps_l = rho_l d_l / ||d||`).
    theta: the weight of the new gradient in (0, 1] (paper 0.9; theta = 1 is SAM).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs`); its state holds `d`.

  Example:
    >>> import jax.numpy as jnp
    >>> ascent, g = variance_suppressed_ascent(rho=1.0), {'w': jnp.array([3.0, 4.0])}
    >>> eps, state = ascent.update(g, ascent.init(g))
    >>> eps['w']
    Array([0.6, 0.8], dtype=float32)

  References:
    Li & Giannakis, *Enhancing Sharpness-Aware Optimization Through Variance Suppression*,
    NeurIPS 2023, https://arxiv.org/abs/2309.15639
  """
  rho = check_radius(rho, hint="rho is the radius of the perturbation ball.")
  # theta = 0 would freeze the average at the first gradient: the perturbation would never move.
  theta = check_hparam("theta", theta, low_open=True, high=1.0,
                       hint="theta weighs the new gradient (paper 0.9).")

  def init(params):
    return AverageState(count=jnp.zeros([], jnp.int32),
                        average=optax.tree.zeros_like(params))

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del params, extra
    step = _step(state.count, count)
    g = tree.in_accumulation_dtype(grads)
    th = value_at(theta, step)
    first = state.count == 0
    d = jax.tree.map(
        lambda x, y: jnp.where(first, x, (1 - th).astype(x.dtype) * y.astype(x.dtype)
                               + th.astype(x.dtype) * x), g, state.average)
    inverse = tree.safe_inverse(tree.norm(d, axis_name=param_axis_name))
    return (optax.tree.cast_like(scale_by_radius(rho, step, inverse, d), grads),
            AverageState(_increment(state.count), optax.tree.cast_like(d, state.average)))

  return _ascent(init, update)


class PreviousParamsState(NamedTuple):
  """State of Momentum-SAM's ascent."""
  count: jax.Array  # int32 scalar: ascents taken so far.
  previous: Any     # tree like params: the params at the previous ascent.


def momentum_ascent(rho: ScalarOrSchedule = 0.3) -> GradientFreeAscent:
  r"""Momentum-SAM's ascent: along the last step taken, without a gradient.

  .. math::
    \epsilon_t = \rho\, \frac{w_t - w_{t-1}}{\|w_t - w_{t-1}\|}

  For heavy-ball SGD, `w_t - w_{t-1} = -lr v_t`, so this is the paper's `-rho v / ||v||`
  (the perturbed point `w - rho v/||v||`), read from the params instead of the inner
  optimizer's momentum buffer, so it works with any inner optimizer (with Adam it follows the
  last preconditioned step). Zero on the first step (no previous step). The clean gradient is
  not read. One param-sized buffer of state (the previous params).

  Args:
    rho: the step length along the last update, >= 0 (the authors' default 0.3; their
      CIFAR configurations use up to 3).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs`) that ignores the gradient it is given.

  Example:
    >>> import jax.numpy as jnp
    >>> ascent = momentum_ascent(rho=0.5)
    >>> state = ascent.init({'w': jnp.array([0.0, 0.0])})
    >>> eps, state = ascent.update(None, state, {'w': jnp.array([3.0, 4.0])})
    >>> eps['w']
    Array([0.3, 0.4], dtype=float32)

  References:
    Becker, Altrock & Risse, *Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead*, https://arxiv.org/abs/2401.12033
  """
  rho = check_hparam("rho", rho, hint="rho is the step length along the last update.")

  def init(params):
    return PreviousParamsState(count=jnp.zeros([], jnp.int32),
                               previous=jax.tree.map(jnp.copy, params))

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del grads, extra
    if params is None:
      raise ValueError("momentum_ascent (Momentum-SAM) needs the params: call "
                       "update(g, state, params).")
    acc = tree.accumulation_dtype(params)
    delta = jax.tree.map(lambda w, p: w.astype(acc) - p.astype(acc), params, state.previous)
    factor = value_at(rho, _step(state.count, count)) * tree.safe_inverse(
        tree.norm(delta, axis_name=param_axis_name))
    eps = optax.tree.cast_like(tree.scale(factor, delta), params)
    return eps, PreviousParamsState(_increment(state.count),
                                    jax.tree.map(jnp.copy, params))

  return _gradient_free_ascent(init, update)


def fisher_ascent(rho: ScalarOrSchedule = 0.1, eta: ScalarOrSchedule = 1.0
                  ) -> optax.GradientTransformationExtraArgs:
  r"""Fisher-SAM's ascent: the SAM step in the diagonal Fisher metric.

  .. math::
    F = 1 + \eta\, g^2 \;(\text{elementwise}), \qquad
    \epsilon = \rho\, \frac{F^{-1} g}{\sqrt{g^\top F^{-1} g}}

  the maximizer of the linearized loss over the ellipsoid `eps^T F eps <= rho^2`, with the
  Fisher approximated by the squared mini-batch gradient. A zero gradient gives zero; finite
  gradients of any magnitude (float32 ones of 1e30 or 1e-25 included) give a finite `eps`.

  Args:
    rho: the radius in the Fisher metric, >= 0; a float or a schedule of the step count.
    eta: the weight of the Fisher term, >= 0 (`eta = 0` is SAM).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent, g = fisher_ascent(rho=1.0, eta=0.0), {'w': jnp.array([3.0, 4.0])}
    >>> eps, _ = ascent.update(g, ascent.init(g))
    >>> eps['w']
    Array([0.6, 0.8], dtype=float32)

  References:
    Kim et al., *Fisher SAM: Information Geometry and Sharpness Aware Minimisation*,
    ICML 2022, https://arxiv.org/abs/2206.04920
  """
  rho = check_hparam("rho", rho, hint="rho is the radius in the Fisher metric.")
  eta = check_hparam("eta", eta, hint="eta weighs the squared gradient in F = 1 + eta g^2.")

  init = _count_init

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del params, extra
    step = _step(state.count, count)
    g = tree.in_accumulation_dtype(grads)
    e = value_at(eta, step)

    def fisher_inverse_times(x):
      e_ = e.astype(x.dtype)
      denominator = 1 + e_ * x * x
      # Where e x^2 overflows (float32 |x| above ~1e19), x / (1 + e x^2) is 1 / (e x) to a
      # relative 1 / (e x^2): finite, where the plain quotient would be x / inf = 0. A
      # non-finite x keeps the plain quotient (NaN).
      return jnp.where(jnp.isinf(denominator) & jnp.isfinite(x), 1 / (e_ * x), x / denominator)

    f_inv_g = jax.tree.map(fisher_inverse_times, g)
    # sqrt(g^T F^-1 g) without over- or underflow: the plain inner product in the normal range.
    quad, scale_g, scale_f = tree.scaled_vdot(g, f_inv_g, axis_name=param_axis_name)
    root = jnp.sqrt(quad) * jnp.sqrt(scale_g) * jnp.sqrt(scale_f)
    factor = value_at(rho, step) * tree.safe_inverse(root)
    return (optax.tree.cast_like(tree.scale(factor, f_inv_g), grads),
            AscentCountState(_increment(state.count)))

  return _ascent(init, update)


class KeyState(NamedTuple):
  """State of a stochastic ascent."""
  count: jax.Array  # int32 scalar: ascents taken so far.
  key: jax.Array    # uint32[2]: a raw PRNG key (jax.random.PRNGKey), split once per ascent.


def random_smoothing_ascent(rho: ScalarOrSchedule = 0.05, sigma: ScalarOrSchedule = 0.01,
                            lam: ScalarOrSchedule = 1.0, seed: int = 0
                            ) -> GradientFreeAscent:
  r"""Random SAM's ascent: a Gaussian step, then SAM's step from the gradient there.

  .. math::
    \delta \sim \mathcal{N}(0, \sigma^2 I), \qquad \tilde g = \nabla L(w + \delta), \qquad
    \epsilon = \delta + \lambda \rho\, \frac{\tilde g}{\|\tilde g\|}

  One gradient step on the randomly smoothed loss (our reading of the paper's Algorithm 1:
  isotropic noise). The noise of leaf `i` at a step is
  `sigma * jax.random.normal(k_i, shape)` with `key, sub = split(state.key)` and
  `k_1..k_n = split(sub, n)` over the leaves in tree order. The clean gradient is not read: the
  ascent evaluates the gradient at the noisy point through the engine's `grad_fn` (one-call form
  only), so the step costs two gradient evaluations, like SAM.

  Args:
    rho: the radius of the adversarial step, >= 0; a float or a schedule of the step count.
    sigma: the standard deviation of the noise, >= 0.
    lam: the weight of the adversarial step, >= 0 (1: the full SAM step).
    seed: the seed of the PRNG key kept in the state (a Python int).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs`); `update` needs the keyword `grad_fn`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> params = {'w': jnp.array([3.0, 4.0])}
    >>> ascent = random_smoothing_ascent(rho=0.1, sigma=0.0)
    >>> eps, _ = ascent.update(None, ascent.init(params), params, grad_fn=jax.grad(loss))
    >>> [round(float(x), 4) for x in eps['w']]
    [0.06, 0.08]

  References:
    Liu et al., *Random Sharpness-Aware Minimization*, NeurIPS 2022,
    https://openreview.net/forum?id=htUvh7xPoa;
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412
  """
  rho = check_hparam("rho", rho, hint="rho is the radius of the adversarial step.")
  sigma = check_hparam("sigma", sigma, hint="sigma is the noise's standard deviation.")
  lam = check_hparam("lam", lam, hint="lam weighs the adversarial step.")
  _check_seed(seed)

  def init(params):
    del params
    return KeyState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed))

  def update(grads, state, params=None, *, grad_fn=None, count=None, param_axis_name=None,
             **extra):
    del grads, extra
    grad_fn = _check_gradient_access("random_smoothing_ascent (random SAM)", grad_fn, params)
    step = _step(state.count, count)
    key, sub = jax.random.split(state.key)
    s = value_at(sigma, step)
    leaves, treedef = jax.tree.flatten(params)
    noise = jax.tree.unflatten(treedef, [
        (s * jax.random.normal(k, w.shape, _at_least_float32(w.dtype))).astype(w.dtype)
        for k, w in zip(_split_per_leaf(sub, params), leaves)])
    g_noisy = grad_fn(tree.add(params, noise))
    g = tree.in_accumulation_dtype(g_noisy)
    factor = value_at(lam, step) * value_at(rho, step) * tree.safe_inverse(
        tree.norm(g, axis_name=param_axis_name))
    step_up = tree.scale(factor, g)
    eps = jax.tree.map(lambda n, u, w: (n.astype(u.dtype) + u).astype(w.dtype), noise, step_up,
                       params)
    return eps, KeyState(_increment(state.count), key)

  return _gradient_free_ascent(init, update)


def stochastic_weight_ascent(rho: ScalarOrSchedule = 0.05, beta: ScalarOrSchedule = 0.6,
                             seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""ESAM's stochastic weight perturbation: SAM's step on a random subset of the leaves.

  .. math::
    m_i \sim \mathrm{Bernoulli}(\beta) \text{ per leaf}, \qquad
    \epsilon = \frac{\rho}{\beta}\, \frac{m \odot g}{\|m \odot g\|}

  Each leaf (parameter tensor) joins the ascent with probability `beta`; the norm is over the
  kept leaves and the step is scaled by `1/beta`, as in the authors' code (which freezes whole
  tensors). The draws of a step come from `key, sub = split(state.key)`,
  `k_1..k_n = split(sub, n)` over the leaves in tree order, `m_i = bernoulli(k_i, beta)`.

  Args:
    rho: the radius, >= 0; a float or a schedule of the step count.
    beta: the probability in (0, 1] that a leaf is perturbed (paper 0.5 to 0.6; 1 is SAM).
    seed: the seed of the PRNG key kept in the state (a Python int).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent, g = stochastic_weight_ascent(rho=1.0, beta=1.0), {'w': jnp.array([3.0, 4.0])}
    >>> eps, _ = ascent.update(g, ascent.init(g))
    >>> eps['w']
    Array([0.6, 0.8], dtype=float32)

  References:
    Du et al., *Efficient Sharpness-aware Minimization for Improved Training of Neural
    Networks*, ICLR 2022, https://arxiv.org/abs/2110.03141
  """
  rho = check_hparam("rho", rho, hint="rho is the radius of the perturbation ball.")
  if is_constant(beta, 0.0):
    raise ValueError("beta must be > 0 (the probability that a leaf joins the ascent).")
  beta = check_hparam("beta", beta, high=1.0, low_open=True,
                      hint="beta is the probability that a leaf is perturbed.")
  _check_seed(seed)

  def init(params):
    del params
    return KeyState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed))

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del params, extra
    step = _step(state.count, count)
    key, sub = jax.random.split(state.key)
    b = value_at(beta, step)
    leaves, treedef = jax.tree.flatten(grads)
    kept = jax.tree.unflatten(treedef, [
        jnp.where(jax.random.bernoulli(k, b), x, jnp.zeros_like(x))
        for k, x in zip(_split_per_leaf(sub, grads), leaves)])
    factor = value_at(rho, step) / b * tree.safe_inverse(
        tree.norm(kept, axis_name=param_axis_name))
    return tree.scale(factor, kept), KeyState(_increment(state.count), key)

  return _ascent(init, update)


class BayesianState(NamedTuple):
  """State of bSAM's ascent."""
  count: jax.Array  # int32 scalar: ascents taken so far.
  key: jax.Array    # uint32[2]: raw PRNG key for the posterior sample.
  precision: Any    # tree like params: s, the posterior precision (variance 1 / (N s)).


def bayesian_ascent(rho: ScalarOrSchedule = 0.01, num_data: float | None = None,
                    b2: ScalarOrSchedule = 0.999, weight_decay: ScalarOrSchedule = 0.0,
                    damping: ScalarOrSchedule = 0.1, init_precision: float = 1.0,
                    seed: int = 0) -> GradientFreeAscent:
  r"""bSAM's ascent: a posterior sample, a precision-scaled SAM step, and the precision update.

  .. math::
    \theta = w + \frac{z}{\sqrt{N s}},\; z \sim \mathcal{N}(0, I), \quad
    g = \nabla L(\theta), \quad \epsilon = \rho\, \frac{g}{s}, \quad
    s \leftarrow \beta_2 s + (1 - \beta_2)\big(\sqrt{s}\, |g| + \delta + \gamma\big)

  (elementwise). The updated `s` is left in the state for bSAM's descent
  (`sam_optax.bayesian_descent`), which reads it through the engine's `ascent_state` keyword.
  The clean gradient is not read; the noisy gradient comes from the engine's `grad_fn`
  (one-call form only). Noise keys as in `random_smoothing_ascent`.

  Args:
    rho: the SAM radius, >= 0 (authors' CIFAR setting 0.01).
    num_data: `N`, the training-set size (the authors multiply it by the augmentation factor).
    b2: the precision's decay `beta_2` in [0, 1] (0.999).
    weight_decay: `delta`, the prior precision over `N` (the L2 strength).
    damping: `gamma` (0.1).
    init_precision: the initial `s` (1.0).
    seed: the seed of the PRNG key kept in the state.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs`); `update` needs `grad_fn`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> params = {'w': jnp.array([3.0, 4.0])}
    >>> ascent = bayesian_ascent(rho=0.1, num_data=1e12)
    >>> eps, state = ascent.update(None, ascent.init(params), params, grad_fn=jax.grad(loss))
    >>> [round(float(x), 3) for x in eps['w']]
    [0.6, 0.8]

  References:
    Mollenhoff & Khan, *SAM as an Optimal Relaxation of Bayes*, ICLR 2023,
    https://arxiv.org/abs/2210.01620
  """
  rho = check_hparam("rho", rho, hint="rho is bSAM's radius (authors: 0.01 on CIFAR).")
  if num_data is None:
    raise ValueError("bSAM needs num_data=N, the training-set size: the posterior sample has "
                     "variance 1/(N s).")
  data_size = check_hparam("num_data", num_data, low_open=True,
                           hint="num_data is the training-set size N.")
  b2 = check_hparam("b2", b2, high=1.0, high_open=True,
                    hint="b2 is the precision's decay (0.999).")
  weight_decay = check_hparam("weight_decay", weight_decay,
                              hint="weight_decay is delta, the L2 strength.")
  damping = check_hparam("damping", damping, hint="damping is gamma (0.1).")
  if is_constant(init_precision, 0.0):
    raise ValueError("init_precision must be > 0 (s divides the perturbation).")
  # Read by init only, which sees concrete values: checked here, not wrapped.
  check_hparam("init_precision", init_precision, low_open=True,
               hint="init_precision is the initial s.")
  _check_seed(seed)

  def init(params):
    return BayesianState(
        count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed),
        precision=jax.tree.map(
            lambda w: jnp.full(w.shape, init_precision, _at_least_float32(w.dtype)), params))

  def update(grads, state, params=None, *, grad_fn=None, count=None, param_axis_name=None,
             **extra):
    del grads, param_axis_name, extra
    grad_fn = _check_gradient_access("bayesian_ascent (bSAM)", grad_fn, params)
    step = _step(state.count, count)
    key, sub = jax.random.split(state.key)
    n = value_at(data_size, step)
    leaves, treedef = jax.tree.flatten(params)
    s_leaves = treedef.flatten_up_to(state.precision)
    sample = jax.tree.unflatten(treedef, [
        (w + jax.random.normal(k, w.shape, s.dtype) / jnp.sqrt(n.astype(s.dtype) * s)
         ).astype(w.dtype)
        for k, w, s in zip(_split_per_leaf(sub, params), leaves, s_leaves)])
    g = grad_fn(sample)
    r, beta2 = value_at(rho, step), value_at(b2, step)
    shift = value_at(weight_decay, step) + value_at(damping, step)
    eps = jax.tree.map(lambda x, s: (r * x.astype(s.dtype) / s).astype(x.dtype), g,
                       state.precision)
    precision = jax.tree.map(
        lambda s, x: (beta2 * s + (1 - beta2) * (jnp.sqrt(s) * jnp.abs(x) + shift)
                      ).astype(s.dtype), state.precision, g)
    return eps, BayesianState(_increment(state.count), key, precision)

  return _gradient_free_ascent(init, update)


def _at_least_float32(dtype):
  """Random draws and slowly moving statistics are kept in float32 for low-precision params:
  bfloat16 samples are coarse, and an EMA with decay 0.999 does not move in bfloat16."""
  return jnp.promote_types(dtype, jnp.float32)


# ------------------------------------------------------------------ modern variants


def _last_axis_but_one_dim(leaf) -> tuple[int, ...]:
  """Gradient centralization's default axes: every axis but the last (the output axis in Flax
  and Haiku layouts, `(in, out)` and `(kh, kw, in, out)`) on leaves with >= 2 dimensions."""
  ndim = jnp.ndim(leaf)
  return tuple(range(ndim - 1)) if ndim >= 2 else ()


def _centralize(x, axes):
  """`x - mean(x over axes)` in float32 or wider, cast back to `x`'s dtype (`x` unchanged when
  `axes` is empty)."""
  if not axes:
    return x
  acc = jnp.promote_types(x.dtype, jnp.float32)
  wide = x.astype(acc)
  return (wide - jnp.mean(wide, axis=axes, keepdims=True)).astype(x.dtype)


def _gc_axes(axes_fn, leaf) -> tuple[int, ...]:
  """The axes `axes_fn` picks for `leaf`, checked and made non-negative."""
  chosen = axes_fn(leaf)
  if chosen is None:
    return ()
  if isinstance(chosen, (int, np.integer)) and not isinstance(chosen, bool):
    chosen = (chosen,)
  ndim = jnp.ndim(leaf)
  if not isinstance(chosen, (tuple, list)) or not all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in chosen):
    raise TypeError(f"axes must return a tuple of ints (or None) for each leaf, got "
                    f"{chosen!r} for a leaf of shape {jnp.shape(leaf)}.")
  out = tuple(int(a) for a in chosen)
  if any(not -ndim <= a < ndim for a in out):
    raise ValueError(f"axes returned {out} for a leaf of shape {jnp.shape(leaf)}: each axis "
                     f"must lie in [-{ndim}, {ndim}).")
  return tuple(sorted({a % ndim for a in out}))


def centralized_ascent(rho: ScalarOrSchedule = 0.05,
                       axes: Callable[[Any], Any] | None = None
                       ) -> optax.GradientTransformationExtraArgs:
  r"""GCSAM's ascent: SAM's step along the centralized gradient, scaled by the raw norm.

  .. math::
    \mathrm{GC}(g)_l = g_l - \mathrm{mean}_{A_l}(g_l), \qquad
    \epsilon = \rho\, \frac{\mathrm{GC}(g)}{\|g\|}

  Gradient centralization (Yong et al.) subtracts from each leaf `l` its mean over the axes
  `A_l`: by default every axis but the last on leaves with at least two dimensions (the output
  axis is last in Flax and Haiku layouts, `(in, out)` and `(kh, kw, in, out)`; PyTorch's
  `(out, in, kh, kw)` averages over dims `1..`, the same axes), none on vectors and scalars,
  which are left as they are. The norm is that of the raw `g`, taken before centralizing, as
  in the authors' code (`Mohamed-Hassan22/GCSAM`, `cifar10_gcsam_resnet50.py`, read for this
  rule; the paper's abstract does not give it): `||eps|| <= rho`, with equality only where
  every centralized leaf has zero mean already. Only the ascent is centralized; the descent
  gradient `grad L(w + eps)` is handed on as it is (the code's line centralizing it is
  commented out). A zero gradient gives a zero perturbation. The means are taken in float32
  or wider.

  With params sharded over `param_axis_name`, each device centralizes its own shard: shard
  each leaf along an axis that is not averaged (its output axis, by default).

  Args:
    rho: the radius, >= 0 (the authors' 0.05); a float or a schedule of the step count.
    axes: None for the default above, or a function from a gradient leaf to the axes to
      average over (a tuple of ints, `()` or None to leave the leaf as it is); e.g.
      `lambda g: tuple(range(g.ndim - 1)) if g.ndim > 3 else ()` centralizes convolution
      kernels only (the code's `gc_conv_only`).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent = centralized_ascent(rho=1.0)
    >>> g = {'w': jnp.array([[0.0, 2.0], [4.0, 2.0]]), 'b': jnp.array([1.0, 0.0])}
    >>> eps, _ = ascent.update(g, ascent.init(g))  # ||g|| = 5; w's column means (2, 2)
    >>> eps['w']
    Array([[-0.4,  0. ],
           [ 0.4,  0. ]], dtype=float32)
    >>> eps['b']  # a vector: not centralized
    Array([0.2, 0. ], dtype=float32)

  References:
    Hassan, Vakanski, Zhang & Xian, *GCSAM: Gradient Centralized Sharpness Aware Minimization*,
    https://arxiv.org/abs/2501.11584;
    Yong et al., *Gradient Centralization: A New Optimization Technique for Deep Neural
    Networks*, ECCV 2020, https://arxiv.org/abs/2004.01461
  """
  rho = check_hparam("rho", rho, hint="rho is the radius of the perturbation ball.")
  if axes is not None and not callable(axes):
    raise TypeError(f"axes must be None or a function from a gradient leaf to the axes to "
                    f"average over, e.g. lambda g: tuple(range(1, g.ndim)); got "
                    f"{type(axes).__name__}.")
  axes_fn = _last_axis_but_one_dim if axes is None else axes

  init = _count_init

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del params, extra
    inverse = tree.safe_inverse(tree.norm(grads, axis_name=param_axis_name))
    centred = jax.tree.map(lambda x: _centralize(x, _gc_axes(axes_fn, x)), grads)
    factor = value_at(rho, _step(state.count, count)) * inverse
    return tree.scale(factor, centred), AscentCountState(_increment(state.count))

  return _ascent(init, update)


def sagm_ascent(rho: ScalarOrSchedule = 0.05, alpha: ScalarOrSchedule = 0.001
                ) -> optax.GradientTransformationExtraArgs:
  r"""SAGM's ascent: SAM's step and a small step back down the gradient.

  .. math::
    \epsilon = \left(\frac{\rho}{\|g\|} - \alpha\right) g
             = \rho\, \frac{g}{\|g\|} - \alpha\, g

  as in the authors' code (`Wang-pengfei/SAGM`, `domainbed/sagm/sagm.py`, `perturb_weights`:
  one factor `rho / ||g|| - alpha` times `g`). The gradient is then taken at
  `w + eps = w - alpha g + rho g/||g||`: the perturbed point seen from a gradient-descent step
  of size `alpha` (alpha is not tied to the learning rate). `alpha = 0` is SAM's ascent; a zero
  gradient gives a zero perturbation; `rho = alpha = 0` perturbs nothing.

  Args:
    rho: the radius, >= 0 (the authors' 0.05); a float or a schedule of the step count.
    alpha: the step back, >= 0 (the authors' runs: 0.001); a float or a schedule.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`).

  Example:
    >>> import jax.numpy as jnp
    >>> ascent, g = sagm_ascent(rho=1.0, alpha=0.1), {'w': jnp.array([3.0, 4.0])}
    >>> eps, _ = ascent.update(g, ascent.init(g))  # (1/5 - 0.1) g
    >>> eps['w']
    Array([0.3, 0.4], dtype=float32)

  References:
    Wang et al., *Sharpness-Aware Gradient Matching for Domain Generalization*, CVPR 2023,
    https://arxiv.org/abs/2303.10353
  """
  rho = check_hparam("rho", rho, hint="rho is the radius of the perturbation ball.")
  alpha = check_hparam("alpha", alpha, hint="alpha is SAGM's step back along g (e.g. 0.001).")

  init = _count_init

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del params, extra
    step = _step(state.count, count)
    inverse = tree.safe_inverse(tree.norm(grads, axis_name=param_axis_name))
    factor = value_at(rho, step) * inverse - value_at(alpha, step).astype(inverse.dtype)
    return tree.scale(factor, grads), AscentCountState(_increment(state.count))

  return _ascent(init, update)


def weight_scaled_ascent(rho: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  r"""big_vision GSAM's adaptive perturbation: SAM's step scaled by `|w|` element by element.

  .. math::
    \epsilon = \rho_t\, |w| \odot \frac{g}{\|g\|}

  with `||g||` the norm of the raw gradient, as `gsam_gradient` computes it under
  `adaptive_perturbation=True` (`google-research/big_vision`,
  `big_vision/trainers/proj/gsam/gsam.py`, read for this rule). Not ASAM's
  `rho T^2 g / ||T g||`: the norm is not reweighted, so `||eps|| <= rho max|w|`, and `rho` is a
  radius relative to the weights' scale (big_vision: it "can handle 10x larger rho"). Entries
  with zero weights (biases at initialization) are not perturbed; a zero gradient gives a zero
  perturbation. As in `step_count_ascent`, a schedule's argument is the engine's step count.

  Args:
    rho: the relative radius, >= 0; a float or a schedule of the step count.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`); it needs the
    params.

  Example:
    >>> import jax.numpy as jnp
    >>> ascent = weight_scaled_ascent(0.5)
    >>> params, g = {'w': jnp.array([2.0, 0.0])}, {'w': jnp.array([3.0, 4.0])}
    >>> eps, _ = ascent.update(g, ascent.init(params), params)
    >>> eps['w']
    Array([0.6, 0. ], dtype=float32)

  References:
    Zhuang et al., *Surrogate Gap Minimization Improves Sharpness-Aware Training*, ICLR 2022,
    https://arxiv.org/abs/2203.08065 (code: https://github.com/google-research/big_vision)
  """
  rho = check_hparam("rho", rho, hint="rho is the radius relative to |w|.")

  init = _count_init

  def update(grads, state, params=None, *, count=None, param_axis_name=None, **extra):
    del extra
    if params is None:
      raise ValueError("weight_scaled_ascent (GSAM's adaptive_perturbation) scales the "
                       "perturbation by |w|: it needs the params, call "
                       "update(g, state, params).")
    inverse = tree.safe_inverse(tree.norm(grads, axis_name=param_axis_name))
    factor = value_at(rho, _step(state.count, count)) * inverse

    def leaf(x, w):
      acc = jnp.promote_types(jnp.promote_types(x.dtype, w.dtype), factor.dtype)
      return (jnp.abs(w).astype(acc) * (factor.astype(acc) * x.astype(acc))).astype(x.dtype)

    return jax.tree.map(leaf, grads, params), AscentCountState(_increment(state.count))

  return _ascent(init, update)
