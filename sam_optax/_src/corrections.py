"""Descent corrections: maps from `(g, g_adv)` to the direction handed to the inner optimizer.

A correction is an `optax.GradientTransformationExtraArgs` whose `update` receives the descent
gradient `g_adv` as its updates and the clean gradient as the keyword `clean_grads`; it returns
the direction `d`. Corrections chain with `optax.chain` (every member sees the same keywords).

The engine also calls the correction on steps without a perturbed pass (outside a SAM window,
between LookSAM's full steps), with `g_adv = g` and the keyword `perturbed=False`, so a
correction that keeps state (LookSAM) can act on those steps; for the others `g_adv = g` makes
them the identity.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from sam_optax._src import tree
from sam_optax._src.hyperparams import ScalarOrSchedule, check_hparam, is_constant, value_at

# Elementwise weights `T(params)` that define a norm `||T x||` (ASAM's adaptive metric).
Metric = Callable[[Any], Any]


def _correction(init: optax.TransformInitFn, update: Callable[..., Any]
                ) -> optax.GradientTransformationExtraArgs:
  """The correction `(init, update)`. Its `update` requires the engine's keywords (`clean_grads`),
  which optax's `TransformUpdateExtraArgsFn` protocol (`**extra_args` only) cannot express."""
  return optax.GradientTransformationExtraArgs(init, cast(optax.TransformUpdateExtraArgsFn, update))


def _increment(count: jax.Array) -> jax.Array:
  """`count + 1`, saturating at the int32 maximum (optax's `safe_increment`, typed as an array)."""
  return cast(jax.Array, numerics.safe_increment(count))


def renormalize(metric: Metric | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Stable SAM's renormalization: the direction keeps the clean gradient's norm.

  .. math::
    d = \frac{\|T g\|}{\|T\, g_{adv}\|}\, g_{adv}

  with `T = 1` by default and `T = metric(params)` for adaptive variants (ASAM), so that both
  norms are the adaptive ones. A zero `g_adv` is passed through unchanged. The norms are
  finite for finite gradients of any magnitude (float32 ones of 1e30 or 1e-25 included), so the
  factor never degenerates to 0 or inf through an overflow of `||g||^2`.

  Args:
    metric: optional function from params to elementwise weights `T` (a tree like params).

  Returns:
    A descent correction (`optax.GradientTransformationExtraArgs`).

  Example:
    >>> import jax.numpy as jnp
    >>> fix = renormalize()
    >>> d, _ = fix.update({'w': jnp.array([0.0, 10.0])}, fix.init(None), None,
    ...                   clean_grads={'w': jnp.array([3.0, 4.0])})
    >>> d['w']
    Array([0., 5.], dtype=float32)

  References:
    Tan et al., *Stabilizing Sharpness-Aware Minimization Through A Simple
    Renormalization Strategy*, JMLR 2025, https://arxiv.org/abs/2401.07250
  """

  def update(updates, state, params=None, *, clean_grads, param_axis_name=None, **extra):
    del extra
    if metric is None:
      weighted_clean, weighted_adv = clean_grads, updates
    else:
      weights = metric(params)
      weighted_clean = optax.tree.mul(weights, clean_grads)
      weighted_adv = optax.tree.mul(weights, updates)
    factor = tree.safe_ratio(tree.norm(weighted_clean, axis_name=param_axis_name),
                             tree.norm(weighted_adv, axis_name=param_axis_name))
    # Where g_adv is zero the factor is 0 and the (zero) direction stays zero. Where g_adv is g
    # (rho = 0, steps without a perturbed pass) the two norms are equal in exact arithmetic but
    # XLA may reduce them in different orders; take the factor as exactly 1 there, so that
    # rho = 0 reproduces the inner optimizer bit for bit.
    unchanged = tree.all_zero(tree.sub(updates, clean_grads))
    if param_axis_name is not None:  # the same decision on every shard
      unchanged = jax.lax.pmin(unchanged.astype(jnp.int32), param_axis_name).astype(jnp.bool_)
    factor = jnp.where(unchanged, jnp.ones_like(factor), factor)
    return tree.scale(factor, updates), state

  return _correction(lambda params: optax.EmptyState(), update)


# ------------------------------------------------------------------ the wider field


class CorrectionCountState(NamedTuple):
  """State of a correction whose hyperparameters may follow a schedule."""
  count: jax.Array  # int32 scalar: corrections applied (every step, with or without ascent).


def surrogate_gap(alpha: ScalarOrSchedule = 0.4, *, minimize_fp: bool = True
                  ) -> optax.GradientTransformationExtraArgs:
  r"""GSAM's correction: descend the perturbed loss and the surrogate gap together.

  .. math::
    g_\perp = g - \frac{\langle g, g_{adv} \rangle}{\|g_{adv}\|^2}\, g_{adv}, \qquad
    d = g_{adv} - \alpha\, g_\perp

  The clean gradient `g` is split into its components parallel and orthogonal to the
  perturbed gradient `g_adv`; stepping against `-g_perp` (i.e. along `+alpha g_perp`
  subtracted) lowers the surrogate gap `L(w + eps) - L(w)` without changing the perturbed
  loss to first order. This is the convention of the paper's Algorithm 1 and of the authors'
  code (`g` decomposed relative to `g_adv`, `d = g_adv - alpha g_perp`). Where `g_adv = g`
  (`rho = 0`, steps without a perturbed pass) `g_perp = 0` exactly and `d = g`. The
  coefficient is finite for finite gradients of any magnitude (no overflow of `||g_adv||^2`).

  With `minimize_fp=False` (big_vision's option of that name: minimize the clean loss and the
  surrogate gap, `min(f, h)`, instead of the perturbed loss and the gap, `min(f_p, h)`) the
  roles swap: the clean gradient is kept and the part of `g_adv` orthogonal to it is added,

  .. math::
    g_{adv,\perp} = g_{adv} - \frac{\langle g_{adv}, g \rangle}{\|g\|^2}\, g, \qquad
    d = g + \alpha\, g_{adv,\perp}

  as `gsam_gradient` computes it (`google-research/big_vision`,
  `big_vision/trainers/proj/gsam/gsam.py`, read for this rule); big_vision: "closer to
  conventional training, often more stable (fewer loss spikes)". `alpha = 0` is then the
  inner optimizer on `g`, and `d = g` exactly where `g_adv = g`. Where `g = 0` the projection
  is taken as zero (big_vision divides by `||g||` unguarded).

  Args:
    alpha: the weight of the orthogonal component, >= 0 (the authors' example 0.4; the paper
      tunes it in [0, 0.5]; big_vision's ViT config 0.6); a float or a schedule of the step.
    minimize_fp: True for GSAM (`d = g_adv - alpha g_perp`), False for big_vision's
      `d = g + alpha g_adv_perp`.

  Returns:
    A descent correction (`optax.GradientTransformationExtraArgs`).

  Example:
    >>> import jax.numpy as jnp
    >>> fix = surrogate_gap(alpha=0.5)
    >>> d, _ = fix.update({'w': jnp.array([1.0, 0.0])}, fix.init(None), None,
    ...                   clean_grads={'w': jnp.array([1.0, 2.0])})
    >>> d['w']
    Array([ 1., -1.], dtype=float32)
    >>> fix = surrogate_gap(alpha=0.5, minimize_fp=False)
    >>> d, _ = fix.update({'w': jnp.array([1.0, 2.0])}, fix.init(None), None,
    ...                   clean_grads={'w': jnp.array([1.0, 0.0])})
    >>> d['w']
    Array([1., 1.], dtype=float32)

  References:
    Zhuang et al., *Surrogate Gap Minimization Improves Sharpness-Aware Training*, ICLR 2022,
    https://arxiv.org/abs/2203.08065 (code: https://github.com/google-research/big_vision)
  """
  alpha = check_hparam("alpha", alpha,
                      hint="alpha weighs GSAM's orthogonal component (e.g. 0.4).")
  if not isinstance(minimize_fp, bool):
    raise TypeError(f"minimize_fp must be a Python bool, got {type(minimize_fp).__name__}.")

  def init(params):
    del params
    return CorrectionCountState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, clean_grads, param_axis_name=None, **extra):
    del params, extra
    g, g_adv = tree.in_accumulation_dtype(clean_grads), tree.in_accumulation_dtype(updates)
    a = value_at(alpha, state.count)
    count = _increment(state.count)
    if not minimize_fp:
      # g_adv_perp = delta - (<delta, g> / ||g||^2) g with delta = g_adv - g: the same vector
      # without cancellation, and exactly zero where g_adv is g.
      delta = optax.tree.sub(g_adv, g)
      coef = tree.projection_coefficient(delta, g, axis_name=param_axis_name)
      residual = jax.tree.map(lambda e, b: e - coef * b, delta, g)
      d = jax.tree.map(lambda b, r: b + a.astype(b.dtype) * r, g, residual)
      return optax.tree.cast_like(d, updates), CorrectionCountState(count)
    # g_perp = delta - (<delta, g_adv> / ||g_adv||^2) g_adv with delta = g - g_adv: the same
    # vector without cancellation, and exactly zero where g_adv is g.
    delta = optax.tree.sub(g, g_adv)
    coef = tree.projection_coefficient(delta, g_adv, axis_name=param_axis_name)
    g_perp = jax.tree.map(lambda e, b: e - coef * b, delta, g_adv)
    d = jax.tree.map(lambda b, p: b - a.astype(b.dtype) * p, g_adv, g_perp)
    return optax.tree.cast_like(d, updates), CorrectionCountState(count)

  return _correction(init, update)


class LookAheadState(NamedTuple):
  """State of LookSAM's correction."""
  count: jax.Array  # int32 scalar: steps corrected.
  g_v: Any          # tree like params: the component of g_adv orthogonal to g, at the last
                    # perturbed step.


def look_ahead_reuse(alpha: ScalarOrSchedule = 0.7) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM's correction: store the sharpness direction, reuse it between full steps.

  On a perturbed step (keyword `perturbed=True`)

  .. math::
    g_v = g_{adv} - \frac{\langle g_{adv}, g \rangle}{\|g\|^2}\, g, \qquad d = g_{adv}

  and `g_v` is kept; on the other steps (`perturbed=False`, `g_adv = g`)

  .. math::
    d = g + \alpha\, \frac{\|g\|}{\|g_v\|}\, g_v.

  Norms and inner products are global over the tree (the authors' code works per tensor), and
  finite for finite gradients of any magnitude (no overflow of `||g||^2`). A zero `g_v` adds
  nothing. One param-sized buffer of state.

  Args:
    alpha: the weight of the reused component (paper 0.7); a float or a schedule.

  Returns:
    A descent correction (`optax.GradientTransformationExtraArgs`) for a cadence such as
    `sam_optax.cadences.every(k)`.

  Example:
    >>> import jax.numpy as jnp
    >>> fix = look_ahead_reuse(alpha=1.0)
    >>> g = {'w': jnp.array([1.0, 0.0])}
    >>> state = fix.init(g)
    >>> d, state = fix.update({'w': jnp.array([1.0, 1.0])}, state, clean_grads=g)
    >>> d, state = fix.update(g, state, clean_grads=g, perturbed=False)
    >>> d['w']
    Array([1., 1.], dtype=float32)

  References:
    Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*, CVPR 2022,
    https://arxiv.org/abs/2203.02714
  """
  alpha = check_hparam("alpha", alpha, hint="alpha weighs LookSAM's reused component (paper 0.7).")

  def init(params):
    return LookAheadState(count=jnp.zeros([], jnp.int32), g_v=optax.tree.zeros_like(params))

  def update(updates, state, params=None, *, clean_grads, perturbed=True, param_axis_name=None,
             **extra):
    del params, extra
    count = _increment(state.count)
    g, g_adv = tree.in_accumulation_dtype(clean_grads), tree.in_accumulation_dtype(updates)
    if perturbed:
      # g_v = delta - (<delta, g> / ||g||^2) g with delta = g_adv - g: the same vector, without
      # the cancellation of subtracting two nearly equal large vectors (g_v is small next to
      # g_adv, and the reuse step rescales it to ||g||); exactly zero where g_adv is g.
      delta = optax.tree.sub(g_adv, g)
      coef = tree.projection_coefficient(delta, g, axis_name=param_axis_name)
      g_v = jax.tree.map(lambda e, b: e - coef * b, delta, g)
      return updates, LookAheadState(count, optax.tree.cast_like(g_v, state.g_v))
    g_v = optax.tree.cast_like(state.g_v, g)
    scale = value_at(alpha, state.count) * tree.safe_ratio(
        tree.norm(g, axis_name=param_axis_name), tree.norm(g_v, axis_name=param_axis_name))
    d = jax.tree.map(lambda x, v: x + scale.astype(x.dtype) * v, g, g_v)
    return optax.tree.cast_like(d, updates), LookAheadState(count, state.g_v)

  return _correction(init, update)


class WeightedSharpnessState(NamedTuple):
  """State of WSAM's correction in its decoupled form."""
  count: jax.Array  # int32 scalar: steps corrected.
  sharpness: Any    # tree like params: gamma/(1 - gamma) (g_adv - g) of this step (0 when the
                    # step had no perturbed pass), for the decoupled update.


def weighted_sharpness(gamma: ScalarOrSchedule = 0.9, decoupled: bool = False
                       ) -> optax.GradientTransformationExtraArgs:
  r"""WSAM's correction: the loss plus a weighted sharpness term.

  .. math::
    L_{WSAM} = L + \frac{\gamma}{1 - \gamma}\big(L(w + \epsilon) - L(w)\big), \qquad
    d = g + \frac{\gamma}{1 - \gamma}\,(g_{adv} - g)

  With `decoupled=False` the inner optimizer sees `d`. With `decoupled=True` it sees the clean
  gradient `g`, and the sharpness term `gamma/(1 - gamma) (g_adv - g)` is left in the state
  for `decoupled_sharpness_step`, which the engine adds after the inner optimizer (its
  `decoupled=` hook), scaled by `-lr`: the authors' default. `gamma = 0` is the inner
  optimizer, `gamma = 1/2` is SAM (coupled). Where `g_adv = g`, `d = g` exactly.

  Args:
    gamma: the sharpness weight in [0, 1) (authors' default 0.9, i.e. `d = 9 g_adv - 8 g`); a
      float or a schedule.
    decoupled: keep the sharpness term out of the inner optimizer (see above).

  Returns:
    A descent correction (`optax.GradientTransformationExtraArgs`).

  Example:
    >>> import jax.numpy as jnp
    >>> fix = weighted_sharpness(gamma=0.5)
    >>> d, _ = fix.update({'w': jnp.array([2.0])}, fix.init(None), None,
    ...                   clean_grads={'w': jnp.array([1.0])})
    >>> d['w']
    Array([2.], dtype=float32)

  References:
    Yue et al., *Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term*, KDD 2023, https://arxiv.org/abs/2305.15817
  """
  if is_constant(gamma, 1.0):
    raise ValueError("gamma must be < 1 (the sharpness weight is gamma / (1 - gamma)).")
  gamma = check_hparam("gamma", gamma, high=1.0, high_open=True,
                       hint="gamma in [0, 1) weighs the sharpness term.")
  if not isinstance(decoupled, bool):
    raise TypeError(f"decoupled must be a Python bool, got {type(decoupled).__name__}.")

  def init(params):
    if decoupled:
      return WeightedSharpnessState(count=jnp.zeros([], jnp.int32),
                                    sharpness=optax.tree.zeros_like(params))
    return CorrectionCountState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, clean_grads, **extra):
    del params, extra
    g, g_adv = tree.in_accumulation_dtype(clean_grads), tree.in_accumulation_dtype(updates)
    gam = value_at(gamma, state.count)
    weight = gam / (1 - gam)
    count = _increment(state.count)
    if decoupled:
      sharpness = jax.tree.map(lambda x, a: weight.astype(x.dtype) * (a - x), g, g_adv)
      sharpness = optax.tree.cast_like(sharpness, state.sharpness)
      return clean_grads, WeightedSharpnessState(count, sharpness)
    d = jax.tree.map(lambda x, a: x + weight.astype(x.dtype) * (a - x), g, g_adv)
    return optax.tree.cast_like(d, updates), CorrectionCountState(count)

  return _correction(init, update)


def decoupled_sharpness_step(learning_rate):
  r"""WSAM's decoupled update, :math:`-\eta_t \frac{\gamma}{1-\gamma}(g_{adv} - g)`.

  For the engine's `decoupled=` hook: reads the term `weighted_sharpness(...,
  decoupled=True)` left in the correction state (the first member of a chained correction).

  Args:
    learning_rate: `eta_t`, a float or a schedule of the step count (the inner optimizer's).

  Returns:
    `f(correction_state, params, count) -> update`.

  Example:
    >>> import jax.numpy as jnp
    >>> state = WeightedSharpnessState(jnp.zeros([], jnp.int32), {'w': jnp.array([2.0])})
    >>> decoupled_sharpness_step(0.1)(state, None, jnp.asarray(0))['w']
    Array([-0.2], dtype=float32)

  References:
    Yue et al., *Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term*, KDD 2023, https://arxiv.org/abs/2305.15817
  """
  learning_rate = check_hparam("learning_rate", learning_rate,
                               hint="the inner optimizer's learning rate.")

  def step(correction_state, params, count):
    del params
    state = correction_state
    while isinstance(state, tuple) and not isinstance(state, WeightedSharpnessState):
      state = state[0]  # optax.chain(weighted_sharpness(...), renormalize()) and the like
    if not isinstance(state, WeightedSharpnessState):
      raise ValueError("decoupled_sharpness_step reads the state of "
                       "weighted_sharpness(gamma, decoupled=True); pair them, as "
                       "sam_optax.wsam(..., decouple=True) does.")
    lr = value_at(learning_rate, count)
    return jax.tree.map(lambda x: (-lr * x).astype(x.dtype), state.sharpness)

  return step


class BayesianDescentState(NamedTuple):
  """State of bSAM's descent."""
  count: jax.Array  # int32 scalar: steps taken.
  momentum: Any     # tree like params: g_m.


def bayesian_descent(b1: ScalarOrSchedule = 0.9, weight_decay: ScalarOrSchedule = 0.0,
                     init_precision: float = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""bSAM's descent direction: momentum of the perturbed gradient, scaled by the precision.

  .. math::
    g_m \leftarrow \beta_1 g_m + (1 - \beta_1)(g_{adv} + \delta w), \qquad d = g_m / s

  with `s` the posterior precision that `sam_optax.bayesian_ascent` updated this step, read
  from the engine's `ascent_state` keyword. With the inner optimizer `optax.sgd(lr)` the step
  is bSAM's mean update `w <- w - lr g_m / s`. Under a mask (the ascent wrapped in
  `optax.masked`), leaves outside it keep `s = init_precision`.

  Args:
    b1: the momentum `beta_1` in [0, 1] (0.9).
    weight_decay: `delta`, the L2 strength (the same as the ascent's).
    init_precision: the ascent's initial `s`, used for leaves outside a mask.

  Returns:
    A descent correction (`optax.GradientTransformationExtraArgs`) for `bayesian_ascent`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax._src import ascents
    >>> fix = bayesian_descent(b1=0.0)
    >>> s = ascents.BayesianState(jnp.zeros([], jnp.int32), jnp.zeros(2, jnp.uint32),
    ...                           {'w': jnp.array([2.0])})
    >>> d, _ = fix.update({'w': jnp.array([1.0])}, fix.init({'w': jnp.zeros(1)}),
    ...                   {'w': jnp.zeros(1)}, clean_grads=None, ascent_state=s)
    >>> d['w']
    Array([0.5], dtype=float32)

  References:
    Mollenhoff & Khan, *SAM as an Optimal Relaxation of Bayes*, ICLR 2023,
    https://arxiv.org/abs/2210.01620
  """
  b1 = check_hparam("b1", b1, high=1.0, high_open=True,
                    hint="b1 is bSAM's gradient momentum (0.9).")
  weight_decay = check_hparam("weight_decay", weight_decay,
                              hint="weight_decay is delta, the L2 strength.")

  def init(params):
    return BayesianDescentState(count=jnp.zeros([], jnp.int32),
                                momentum=optax.tree.zeros_like(params))

  def update(updates, state, params=None, *, ascent_state=None, **extra):
    del extra
    if isinstance(ascent_state, optax.MaskedState):
      ascent_state = ascent_state.inner_state
    precision = getattr(ascent_state, "precision", None)
    if precision is None:
      raise ValueError(
          "bayesian_descent reads the posterior precision from bayesian_ascent's state (the "
          "engine's ascent_state keyword); pair them, as sam_optax.bsam does.")
    # Leaves outside a mask (MaskedNode in the masked ascent's state) keep the initial s.
    precision = jax.tree.map(
        lambda s, a: (jax.tree.map(lambda x: jnp.full(x.shape, init_precision, x.dtype), a)
                      if isinstance(s, optax.MaskedNode) else s),
        precision, updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    if params is None:
      raise ValueError("bayesian_descent needs the params (the L2 term delta * w).")
    beta1 = value_at(b1, state.count)
    delta = value_at(weight_decay, state.count)
    momentum = jax.tree.map(
        lambda m, a, w: (beta1 * m + (1 - beta1) * (a + delta * w)).astype(m.dtype),
        state.momentum, updates, params)
    d = jax.tree.map(lambda m, s, a: (m / s).astype(a.dtype), momentum, precision, updates)
    return d, BayesianDescentState(_increment(state.count), momentum)

  return _correction(init, update)


# ------------------------------------------------------------------ modern variants


def average_with_clean(weight: float = 0.5) -> optax.GradientTransformationExtraArgs:
  r"""SAGM's correction: the perturbed gradient moved toward the clean one.

  .. math::
    d = g_{adv} + (\omega\, g - \omega\, g_{adv})

  `weight = 1/2` (the default) is SAGM's `d = (g + g_adv) / 2`, computed as the authors' code
  does (`Wang-pengfei/SAGM`, `domainbed/sagm/sagm.py`, `gradient_decompose`:
  `grad += old_g/2 - grad/2`), so that `d = g` exactly where `g_adv = g` (`rho = 0`, steps
  without a perturbed pass). `weight = 0` is SAM's `d = g_adv`, `weight = 1` the inner
  optimizer on `g`; in WSAM's terms `weight = 1 - gamma / (1 - gamma)`.

  Args:
    weight: the clean gradient's share `omega` in [0, 1], a number.

  Returns:
    A descent correction (`optax.GradientTransformationExtraArgs`).

  Example:
    >>> import jax.numpy as jnp
    >>> fix = average_with_clean()
    >>> d, _ = fix.update({'w': jnp.array([3.0])}, fix.init(None), None,
    ...                   clean_grads={'w': jnp.array([1.0])})
    >>> d['w']
    Array([2.], dtype=float32)

  References:
    Wang et al., *Sharpness-Aware Gradient Matching for Domain Generalization*, CVPR 2023,
    https://arxiv.org/abs/2303.10353
  """
  if isinstance(weight, bool) or not isinstance(weight, (int, float)):
    raise TypeError(f"weight must be a number in [0, 1], got {type(weight).__name__}.")
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"weight must be in [0, 1] (0.5 is SAGM's average), got {weight}.")

  def update(updates, state, params=None, *, clean_grads, **extra):
    del params, extra

    def leaf(a, x):
      acc = jnp.promote_types(jnp.promote_types(a.dtype, x.dtype), jnp.float32)
      a_, x_ = a.astype(acc), x.astype(acc)
      return (a_ + (weight * x_ - weight * a_)).astype(a.dtype)

    return jax.tree.map(leaf, updates, clean_grads), state

  return _correction(lambda params: optax.EmptyState(), update)
