"""Cadences: which steps take the perturbed pass (the public module is `sam_optax.cadences`,
whose docstring says what a cadence is and how the engine uses it)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree
from sam_optax._src.hyperparams import ScalarOrSchedule, check_hparam, check_positive_int
from sam_optax._src.hyperparams import value_at

__all__ = ["AdaptiveCadenceState", "Cadence", "adaptive", "bernoulli", "every", "from_function",
           "window"]


class Cadence(NamedTuple):
  """A piece deciding which steps take the perturbed pass (see the module docstring).

  Calling a cadence that keeps no state on a step count gives its decision there:
  `every(3)(jnp.asarray(3))` is True.
  """
  init: Callable[[Any], Any]            # params -> state
  update: Callable[..., tuple[Any, Any]]  # (grads, state, params, *, count, param_axis_name)
  # -> (take: bool scalar, state)
  reads_grads: bool = False  # whether `update` reads `grads` (else the engine passes None)

  def __call__(self, count):
    take, _ = self.update(None, self.init(None), None, count=jnp.asarray(count),
                          param_axis_name=None)
    return take


def from_function(fn: Callable[[jax.Array], Any]) -> Cadence:
  r"""A stateless cadence from a function of the step count returning a boolean scalar.

  .. math::
    \mathrm{perturbed}(t) = f(t)

  Args:
    fn: `count -> bool`, e.g. `lambda t: t % 4 == 0`.

  Returns:
    A `Cadence` with an empty state.

  Example:
    >>> import jax.numpy as jnp
    >>> cadence = from_function(lambda t: t >= 2)
    >>> [bool(cadence(jnp.asarray(t))) for t in range(4)]
    [False, False, True, True]

  References:
    Zhao et al., *Randomized Sharpness-Aware Training for Boosting Computational Efficiency in
    Deep Learning*, 2022, https://arxiv.org/abs/2203.09962 (schedules of SAM steps)
  """
  def update(grads, state, params, *, count, **_):
    del grads, params
    return fn(count), state

  return Cadence(lambda params: optax.EmptyState(), update)


def every(k: int, offset: int = 0) -> Cadence:
  r"""The perturbed pass on every `k`-th step: steps `t` with `t = offset (mod k)`.

  .. math::
    \mathrm{perturbed}(t) = [\, t \bmod k = \mathrm{offset} \bmod k \,]

  With `offset=0` the first step (t = 0) is a perturbed step, as LookSAM needs (it stores
  the component it reuses on the next `k - 1` steps).

  Args:
    k: the period, a Python int >= 1 (`k = 1`: every step).
    offset: the phase, a Python int >= 0.

  Returns:
    A `Cadence` with an empty state (callable on a step count).

  Example:
    >>> import jax.numpy as jnp
    >>> cadence = every(3)
    >>> [bool(cadence(jnp.asarray(t))) for t in range(5)]
    [True, False, False, True, False]

  References:
    Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*, CVPR 2022,
    https://arxiv.org/abs/2203.02714
  """
  k = check_positive_int("k", k)
  offset = check_positive_int("offset", offset, minimum=0) % k

  def cadence(count):
    return jnp.asarray(count) % k == offset

  return from_function(cadence)


def window(start: int, end: int | None = None) -> Cadence:
  r"""Sharpness-aware steps only for `start <= t < end` (`end` None: no end).

  .. math::
    \mathrm{inside}(t) = [\, \mathrm{start} \le t < \mathrm{end} \,]

  What `window=(start, end)` builds; pass it as `window=` (outside, the step is the inner
  optimizer's on `g`, without correction) or as `cadence=` (outside, the correction still runs
  with `perturbed=False`).

  Args:
    start: the first sharpness-aware step, a Python int >= 0.
    end: the first step after the window, a Python int >= start, or None.

  Returns:
    A `Cadence` with an empty state.

  Example:
    >>> import jax.numpy as jnp
    >>> inside = window(1, 3)
    >>> [bool(inside(jnp.asarray(t))) for t in range(4)]
    [False, True, True, False]

  References:
    Andriushchenko & Flammarion, *Towards Understanding Sharpness-Aware Minimization*, ICML
    2022, https://arxiv.org/abs/2206.06232 (SAM in the last epochs only)
  """
  start = check_positive_int("window start", start, minimum=0)
  if end is not None:
    end = check_positive_int("window end", end, minimum=0)
    if end < start:
      raise ValueError(f"window end ({end}) must be >= its start ({start}).")

  def inside(count):
    after = count >= start
    return after if end is None else after & (count < end)

  return from_function(inside)


def bernoulli(probability: ScalarOrSchedule, seed: int = 0) -> Cadence:
  r"""The perturbed pass on a random draw each step: a Bernoulli trial of probability `p_t`.

  .. math::
    \mathrm{perturbed}(t) = [\, u_t < p_t \,], \qquad
    u_t = \mathrm{uniform}(\mathrm{fold\_in}(\mathrm{key}(\mathrm{seed}), t))

  i.e. `jax.random.bernoulli(jax.random.fold_in(jax.random.key(seed), t), p_t)` with `p_t` in
  float32 (so that the draws are the same with and without `jax_enable_x64`). The draw is
  counter-based: it depends on the seed and the step count only, so it keeps no state, is the
  same on every device under data parallelism (a replica-divergent draw would deadlock the
  collectives of the perturbed pass), the same in both calls of the two-call form, and
  reproducible from `seed`. `p_t = 1` always takes the perturbed pass and `p_t = 0` never does,
  exactly (the draw is overridden there, whatever the dtype of `u_t`).

  A run-time probability that is out of `[0, 1]` or not finite (a schedule's value, or one
  injected by `optax.inject_hyperparams` under `jit`) takes the perturbed pass: a boolean
  cannot carry a NaN, so `sam_optax.rst` makes its radius NaN on such a step instead, for
  `skip_if_nonfinite` to catch.

  Args:
    probability: `p_t`, a float in `[0, 1]` or a schedule of the step count (e.g.
      `optax.linear_schedule(0.2, 0.8, total_steps)` for a gradually increasing share of
      perturbed steps).
    seed: the draws' seed, a Python int (list it in `static_args` under
      `optax.inject_hyperparams`).

  Returns:
    A `Cadence` with an empty state (callable on a step count).

  Example:
    >>> import jax.numpy as jnp
    >>> always, never = bernoulli(1.0), bernoulli(0.0)
    >>> [bool(always(jnp.asarray(t))) for t in range(3)], bool(never(jnp.asarray(0)))
    ([True, True, True], False)
    >>> half = bernoulli(0.5, seed=1)
    >>> bool(half(jnp.asarray(7))) == bool(half(jnp.asarray(7)))  # reproducible
    True

  References:
    Zhao, Zhang & Hu, *Randomized Sharpness-Aware Training for Boosting Computational
    Efficiency in Deep Learning*, 2022, https://arxiv.org/abs/2203.09962
  """
  probability = check_hparam("probability", probability, low=0.0, high=1.0,
                             hint="probability is the chance of a sharpness-aware step.")
  seed = check_positive_int("seed", seed, minimum=0)

  def take(count):
    # In float32 whatever the probability's dtype: the uniform draw behind bernoulli takes p's
    # dtype, so a float64 p (a Python float under jax_enable_x64) would draw other numbers.
    p = value_at(probability, count).astype(jnp.float32)
    draw = jax.random.bernoulli(jax.random.fold_in(jax.random.key(seed), count), p)
    # uniform(...) < p is already never True at p = 0 and always at p = 1 (u < 1); the selects
    # make both exact whatever the dtypes, and send an invalid (NaN) p to the perturbed pass.
    return jnp.where(p >= 1, True, jnp.where(p <= 0, False, draw)) | jnp.isnan(p)

  return from_function(take)


class AdaptiveCadenceState(NamedTuple):
  """State of `adaptive`: the moving statistics of `n_t = ||g_t||^2`, kept as roots.

  Both are float32 scalars in the units of `||g||` (so they stay within float32's range
  wherever `||g||` does, although `n_t` itself may not: `||g|| = 1e20` gives `n_t = 1e40`).
  """
  root_mean: jax.Array    # sqrt(mu_t): the root of the moving mean of ||g||^2
  root_spread: jax.Array  # s2_t ** (1/4): the root of the moving standard deviation of ||g||^2


def adaptive(decay: ScalarOrSchedule = 0.9, threshold: ScalarOrSchedule = 0.0) -> Cadence:
  r"""AE-SAM's policy: the perturbed pass when `||g||^2` is high for its recent history.

  .. math::
    n_t = \|g_t\|^2, \qquad \mu_t = \delta \mu_{t-1} + (1 - \delta) n_t, \qquad
    \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta) (n_t - \mu_t)^2, \\
    \mathrm{perturbed}(t) = [\, n_t \ge \mu_t + c_t \sigma_t \,]

  with `g_t` the clean gradient averaged over devices (so that every replica decides alike,
  even with `average_ascent=False`), the mean updated before the variance, and
  `mu_{-1} = sigma_{-1}^2 = 0`: the first step compares `n_0` with `(1 - delta) n_0 +
  c_0 sqrt(delta (1 - delta)^2) n_0`, so it takes the perturbed pass for any
  `c_0 <= sqrt(delta) / (1 - delta)` (3.16 at `delta = 0.9`). The EMA is not bias-corrected.
  The statistics advance on every step, with or without the perturbed pass (in the two-call
  form once per pair, in the ascent call, which decides; the descent call follows).

  Source: the rule is the one NEW-VARIANTS.md (section b) gives from two secondary sources (a
  summary of the paper and a reading note), which agree; the paper's algorithm box could not
  be read (only its abstract and introduction: an adaptive policy choosing SAM or ERM from
  the geometry of the loss landscape, the squared stochastic gradient norm modelled as
  normally distributed with moving-average estimates of its mean and variance). The initial
  statistics and the absence of bias correction are our choices; the paper's `c_t` is linear
  in `t`, from `lambda_2` at the first step to `lambda_1` at the last, which
  `threshold=optax.linear_schedule(lambda_2, lambda_1, total_steps)` reproduces. A constant
  `c_t` keeps deciding from the gradient's noise: on a full-batch problem whose `||g||^2`
  decreases steadily, `c = 0` takes the perturbed pass on the first few steps only (the
  lagging mean stays above `n_t`); a schedule ending negative guarantees late perturbed steps.

  Non-finite gradients: a NaN or Inf in `g` (or a `decay` or `threshold` that is out of range
  or not finite at run time) leaves the statistics unchanged, so that they do not stay NaN for
  the rest of training, and takes the perturbed pass, where the engine carries the NaN of `g`
  into the updates for `skip_if_nonfinite` (and `sam_optax.ae_sam` makes its radius NaN for an
  invalid hyperparameter). The statistics are computed relative to the largest of `||g||` and
  the two roots in the state, so they neither overflow nor underflow for finite gradients of
  any magnitude (float32 norms of 1e30 or 1e-25 included).

  Args:
    decay: `delta`, the moving averages' decay in `[0, 1)`; a float or a schedule.
    threshold: `c_t`, how many moving standard deviations above the moving mean `n_t` must be;
      a float (any sign) or a schedule of the step count.

  Returns:
    A `Cadence` that reads the clean gradient, with an `AdaptiveCadenceState` (two float32
    scalars).

  Example:
    >>> import jax.numpy as jnp
    >>> cadence = adaptive(decay=0.5, threshold=0.0)
    >>> state = cadence.init(None)
    >>> takes = []
    >>> for scale in (1.0, 3.0, 0.5, 2.0):
    ...   take, state = cadence.update({'w': jnp.array([scale])}, state, None,
    ...                                count=jnp.asarray(0))
    ...   takes.append(bool(take))
    >>> takes
    [True, True, False, True]

  References:
    Jiang, Yang, Zhang & Kwok, *An Adaptive Policy to Employ Sharpness-Aware Minimization*,
    ICLR 2023, https://arxiv.org/abs/2304.14647
  """
  decay = check_hparam("decay", decay, low=0.0, high=1.0, high_open=True,
                       hint="decay weighs the previous statistics of ||g||^2 (paper 0.9).")
  threshold = check_hparam("threshold", threshold, low=-float("inf"),
                           hint="threshold is c_t, in moving standard deviations of ||g||^2.")

  def init(params):
    del params
    # Two arrays, not one twice: a user's jitted step may donate the state, and XLA refuses
    # to donate one buffer twice.
    return AdaptiveCadenceState(root_mean=jnp.zeros([], jnp.float32),
                                root_spread=jnp.zeros([], jnp.float32))

  def update(grads, state, params=None, *, count, param_axis_name=None, **extra):
    del params, extra
    f32 = jnp.float32
    norm = tree.norm(grads, axis_name=param_axis_name).astype(f32)
    delta, c = value_at(decay, count).astype(f32), value_at(threshold, count).astype(f32)
    # Everything relative to the largest of the three magnitudes: the ratios are in [0, 1], so
    # n_t, mu_t and sigma_t^2 are formed without overflow, and underflow only drops terms that
    # are negligible next to the largest one.
    unit = jnp.maximum(norm, jnp.maximum(state.root_mean, state.root_spread))
    relative = lambda x: jnp.where(unit > 0, x / jnp.where(unit > 0, unit, 1.0), 0.0)
    n = jnp.square(relative(norm))
    mean = delta * jnp.square(relative(state.root_mean)) + (1 - delta) * n
    variance = (delta * jnp.square(jnp.square(relative(state.root_spread)))
                + (1 - delta) * jnp.square(n - mean))
    take = n >= mean + c * jnp.sqrt(variance)
    new = AdaptiveCadenceState(root_mean=jnp.sqrt(mean) * unit,
                               root_spread=jnp.sqrt(jnp.sqrt(variance)) * unit)
    valid = (jnp.isfinite(norm) & jnp.isfinite(delta) & jnp.isfinite(c)
             & jnp.isfinite(new.root_mean) & jnp.isfinite(new.root_spread))
    state = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, state)
    return jnp.where(valid, take, True), state

  return Cadence(init, update, reads_grads=True)


def as_window(value: Any) -> Cadence | None:
  """The window piece `window=` describes: None, a `Cadence`, or a pair `(start, end)`."""
  if value is None or isinstance(value, Cadence):
    return value
  if not (isinstance(value, (tuple, list)) and len(value) == 2):
    raise ValueError(f"window must be a pair (start, end) of step counts (end may be None), "
                     f"got {value!r}.")
  return window(*value)
