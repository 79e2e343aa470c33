"""Cadences: which steps take the perturbed pass.

A cadence is a piece with a state, like an optax transformation: `init(params) -> state` and
`update(grads, state, params, *, count, param_axis_name) -> (take, state)`, where `take` is a
boolean scalar. It may decide from the step count, a PRNG key carried in its state, statistics
of the clean gradient `g` (set `reads_grads=True`: the engine then hands it `g`, averaged over
devices under data parallelism so that every replica decides alike; otherwise `grads` is None
and the engine computes nothing for it) and its own state. The engine runs the perturbed pass
(the ascent and the second gradient evaluation) on the steps where `take` is True, inside a
`jax.lax.cond`, so the other steps evaluate no second gradient at run time.

The engine has two slots for such pieces, which differ in what an off step is:

  * `cadence=`: an off step still calls the descent correction, with `g_adv = g` and
    `perturbed=False` (LookSAM reuses its stored component there);
  * `window=`: an off step is the inner optimizer's own step on `g`, without correction.

A step takes the perturbed pass when both say so. `every(k)` is a cadence, `window(start,
end)` (what `window=(start, end)` builds) a window piece; any cadence may fill either slot, and
a plain function of the step count is accepted as `cadence=` (`from_function`). In the
two-call form the ascent call decides and the descent call follows that decision; the state
advances once per pair of calls.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src.hyperparams import check_positive_int

__all__ = ["Cadence", "every", "from_function", "window"]


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


def as_window(value: Any) -> Cadence | None:
  """The window piece `window=` describes: None, a `Cadence`, or a pair `(start, end)`."""
  if value is None or isinstance(value, Cadence):
    return value
  if not (isinstance(value, (tuple, list)) and len(value) == 2):
    raise ValueError(f"window must be a pair (start, end) of step counts (end may be None), "
                     f"got {value!r}.")
  return window(*value)
