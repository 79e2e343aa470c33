"""Hyperparameters that may be numbers, schedules, or arrays injected by optax.

Every hyperparameter is validated where it is resolved: `check_hparam` raises for a number out
of range at construction, and wraps a schedule or a traced value (injected by
`optax.inject_hyperparams` under `jax.jit`) so that `value_at` replaces an invalid value by NaN
at run time. The NaN reaches the step's updates, where `skip_if_nonfinite` and
`optax.apply_if_finite` catch it: an invalid value is never used silently.
"""

from __future__ import annotations

import numbers
from typing import Union

import jax
import jax.numpy as jnp
from jax import core
import numpy as np
import optax

# A float, an array (e.g. injected by `optax.inject_hyperparams`), or a schedule of the step
# (`optax.Schedule`: any function of the step count, such as `optax.linear_schedule(...)`).
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def value_at(hparam: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """The hyperparameter's value at step `count` (schedules are called, numbers passed through)."""
  return jnp.asarray(hparam(count) if callable(hparam) else hparam)


def _concrete(value) -> float | None:
  """The value as a Python float when it is known at construction, else None (traced)."""
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
    return float(value)
  if isinstance(value, jax.Array) and not isinstance(value, core.Tracer) and value.ndim == 0:
    return float(value)
  return None


def is_constant(value, number: float) -> bool:
  """Whether a hyperparameter is known at construction to equal `number` (never for schedules
  or traced values)."""
  return _concrete(value) == number


def check_hparam(name: str, value: ScalarOrSchedule, *, low: float = 0.0,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 hint: str = "") -> ScalarOrSchedule:
  """Validates a scalar hyperparameter, now when it is concrete and at every step otherwise.

  A concrete value (a float, a NumPy or non-traced JAX scalar: also what
  `optax.inject_hyperparams` injects in an eager update) outside `[low, high]` (open ends with
  `low_open` / `high_open`), or not finite, raises a ValueError here. A schedule, or a value
  traced inside `jax.jit` (injected by `optax.inject_hyperparams`), is only known inside the
  step: it comes back wrapped, as a schedule that `value_at` evaluates and checks there,
  replacing an invalid value by NaN. The NaN makes the step's perturbation (or descent
  direction) and so its updates NaN, which `sam_optax.skip_if_nonfinite` and
  `optax.apply_if_finite` catch, instead of a negative radius or a weight outside [0, 1] being
  used silently. Decays of moving averages kept in the state (e.g. Friendly SAM's `lam`) put the
  NaN into the state: the updates are NaN from the step that reads it on.

  Returns:
    `value` itself when it is concrete, else the checked schedule to evaluate with `value_at`.
  """
  bounds = _Bounds(name, low, high, low_open, high_open)
  if callable(value):
    return _CheckedSchedule(value, bounds)
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.ndarray, np.generic, jax.Array)):
    raise TypeError(f"{name} must be a float or a schedule (a function of the step count), "
                    f"got {type(value).__name__}.")
  concrete = _concrete(value)
  if concrete is None:
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
    return _CheckedSchedule(value, bounds)
  if not np.isfinite(concrete):
    raise ValueError(f"{name} must be finite, got {concrete}. {hint}".rstrip())
  if not bounds.holds(concrete):
    raise ValueError(f"{name} must be {bounds}, got {concrete}. {hint}".rstrip())
  return value


class _Bounds:
  """The valid range of a hyperparameter: [low, high], each end possibly open."""

  def __init__(self, name, low, high, low_open, high_open):
    self.name, self.low, self.high = name, low, high
    self.low_open, self.high_open = low_open, high_open

  def holds(self, x):
    """Whether x (a float, or an array: elementwise, False for NaN) is in the range."""
    ok = (x > self.low) if self.low_open else (x >= self.low)
    if self.high is not None:
      ok = ok & ((x < self.high) if self.high_open else (x <= self.high))
    return ok

  def __str__(self):
    if self.high is None:
      return f"> {self.low}" if self.low_open else f">= {self.low}"
    return (f"in {'(' if self.low_open else '['}{self.low}, {self.high}"
            f"{')' if self.high_open else ']'}")


class _CheckedSchedule:
  """A schedule (or a traced value) whose value is replaced by NaN when out of its range."""

  def __init__(self, value, bounds):
    self.value, self.bounds = value, bounds

  def __call__(self, count):
    return nan_if_invalid(value_at(self.value, count), self.bounds)

  def __repr__(self):
    return f"checked({self.value!r}, {self.bounds.name} {self.bounds})"


def nan_if_invalid(value, bounds: _Bounds) -> jax.Array:
  """`value` where it is finite and within `bounds`, NaN elsewhere (a run-time check)."""
  value = jnp.asarray(value)
  # jnp.where keeps a floating value's dtype and weak type (an integer one becomes a float).
  return jnp.where(bounds.holds(value) & jnp.isfinite(value), value, jnp.nan)


def check_run_time_value(name: str, value, *, low: float = 0.0, high: float | None = None,
                         low_open: bool = False, high_open: bool = False,
                         hint: str = "") -> jax.Array:
  """Checks a value passed to `update` (e.g. `full_grad_norm=`).

  A Python or NumPy number raises a ValueError when out of range or not finite; a JAX array
  (traced under `jax.jit`, or concrete: reading it would wait for the device) is replaced by
  NaN there instead, which makes the step's updates NaN (see `check_hparam`).
  """
  bounds = _Bounds(name, low, high, low_open, high_open)
  if isinstance(value, numbers.Real) or (
      isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0):
    concrete = float(value)
    if not (np.isfinite(concrete) and bounds.holds(concrete)):
      raise ValueError(f"{name} must be finite and {bounds}, got {concrete}. {hint}".rstrip())
  return nan_if_invalid(value, bounds)


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
  """Validate a structural integer (a period, a step count): it fixes shapes or loops."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
    raise TypeError(
        f"{name} must be a Python int, got {type(value).__name__}. It fixes the shape of the "
        f"computation, so under optax.inject_hyperparams list it in static_args.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)
