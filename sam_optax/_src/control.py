"""Conditionals that cost nothing extra when called eagerly.

Called outside `jax.jit`, `jax.lax.cond` traces both branches and compiles the conditional on
every call: its branches are fresh closures over the call's arrays, so JAX's caches never hit,
and one un-jitted two-call `tx.update` spent ~0.4 s in XLA's compiler (~200x the op-by-op
cost of `optax.contrib.sam`). `cond` below runs the branch a concrete predicate selects as plain
Python instead, op by op like the rest of an eager update; under `jax.jit`, `jax.vmap` or any
other trace the predicate is a tracer and `cond` is `jax.lax.cond`, unchanged.

Op by op, an eager update costs a dispatch per operation: a global norm alone is a few dozen.
`eager_jit` makes a pure helper (a norm, a pytree sum) one call of a compiled program when it
is called with concrete arrays, compiled once per tree structure, shapes and dtypes and cached
across calls and across transformations; under a trace it is the plain function, inlined.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
from jax.core import Tracer
import jax.numpy as jnp
import numpy as np


def is_concrete(value: Any) -> bool:
  """Whether `value` is a known boolean: a Python or NumPy bool, or a jax.Array being no tracer.

  Reading such a value on the host (`bool(value)`) is a device-to-host copy of one scalar in
  eager code; under a trace, values are tracers and this is False.
  """
  if isinstance(value, (bool, np.bool_)):
    return True
  if isinstance(value, Tracer):
    return False
  return isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0


def is_concrete_tree(tree: Any) -> bool:
  """Whether no leaf of `tree` is a tracer: the values are known, as in eager code."""
  return not any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(tree))


def cond(pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any],
         *operands: Any) -> Any:
  """`jax.lax.cond(pred, true_fn, false_fn, *operands)`, run directly when `pred` is concrete.

  Under a trace (`jax.jit`, `vmap`, `scan`, ...) this is `jax.lax.cond`: only the selected
  branch runs at run time, with one compilation. Eagerly, `pred` is read on the host and only
  the selected branch is called, in Python: no tracing, no compilation, and the same values
  (the branches do the same operations; XLA may fuse them differently under `jit`, as for any
  eager-versus-jitted computation). The branches must still return the same structure and
  shapes, as `jax.lax.cond` requires under a trace; where they disagree only on a leaf's
  dtype, both return the promoted dtype (see `_promoted`).

  Args:
    pred: a boolean scalar (a Python bool, a NumPy or JAX array, or a tracer).
    true_fn: called with `*operands` when `pred` is True.
    false_fn: called with `*operands` when `pred` is False.
    *operands: the branches' arguments.

  Returns:
    The selected branch's output.
  """
  if is_concrete(pred):
    return true_fn(*operands) if bool(pred) else false_fn(*operands)
  try:
    return jax.lax.cond(pred, true_fn, false_fn, *operands)
  except TypeError as error:
    dtypes = _promoted(true_fn, false_fn, operands)
    if dtypes is None:
      raise
    original = error
  cast = lambda fn: lambda *ops: jax.tree.map(
      lambda x, d: x if jnp.result_type(x) == d else jnp.asarray(x).astype(d), fn(*ops), dtypes)
  try:
    return jax.lax.cond(pred, cast(true_fn), cast(false_fn), *operands)
  except TypeError:
    raise original from None


def _promoted(true_fn, false_fn, operands):
  """The promoted dtype of each output leaf, or None unless the branches differ in dtypes only.

  Float gradients wider than the params (float32 on bfloat16 params) make a state leaf created
  at the params' dtype by `init` float32 on its first update, as in optax's own optimizers, so
  a branch that updates it and one that passes it through disagree. Both then return the
  dtype the update produces, the promotion of the two (a pass-through leaf is cast exactly,
  bfloat16 -> float32). Only that case pays for tracing the branches again: `cond` first
  tries the plain `jax.lax.cond`, which raises a TypeError on the mismatch.
  """
  try:
    outs = jax.eval_shape(true_fn, *operands), jax.eval_shape(false_fn, *operands)
  except Exception:  # pylint: disable=broad-except
    return None  # an error of the branches themselves: `cond` re-raises the original
  (true_leaves, true_def), (false_leaves, false_def) = (jax.tree.flatten(o) for o in outs)
  if true_def != false_def or any(a.shape != b.shape for a, b in zip(true_leaves, false_leaves)):
    return None
  if all(a.dtype == b.dtype for a, b in zip(true_leaves, false_leaves)):
    return None  # not a dtype mismatch
  return jax.tree.unflatten(true_def, [a.dtype if a.dtype == b.dtype
                                       else jnp.promote_types(a.dtype, b.dtype)
                                       for a, b in zip(true_leaves, false_leaves)])


# Leaves a cached `jax.jit` takes as array arguments; anything else (a Python number, which the
# function may branch on, a string, a function) keeps an `eager_jit` function on its plain path.
_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)


def eager_jit(fn: Callable[..., Any] | None = None, *,
              static_argnames: Sequence[str] = ()) -> Callable[..., Any]:
  """Runs a pure function through a cached `jax.jit` when called eagerly; plain under a trace.

  When every leaf of the arguments (other than `static_argnames`) is a concrete array (a
  `jax.Array` or a NumPy array), the call is one dispatch of the compiled function, compiled on
  the first call for each tree structure, shapes, dtypes and static values, and cached across
  calls: no per-op dispatch, no host synchronization inside. When some leaf is a tracer (under
  `jax.jit`, `vmap`, `grad`, `shard_map`, ...) or not an array (a Python number), `fn` is
  called directly, so that traced programs are exactly what they were without the decorator.
  `fn` must be pure, with static arguments hashable; module-level functions only (a closure
  made per call would miss the cache every time).

  The compiled function is `wrapper.jitted` (its `_cache_size()` counts compilations).

  Args:
    fn: the function to wrap (or None, to use as `@eager_jit(static_argnames=...)`).
    static_argnames: keyword arguments that are not arrays (e.g. `axis_name`).

  Returns:
    The wrapped function.
  """
  if fn is None:
    return functools.partial(eager_jit, static_argnames=static_argnames)
  static_argnames = tuple(static_argnames)
  jitted = jax.jit(fn, static_argnames=static_argnames)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    dynamic = (args, {k: v for k, v in kwargs.items() if k not in static_argnames})
    for leaf in jax.tree.leaves(dynamic):
      if isinstance(leaf, Tracer) or not isinstance(leaf, _ARRAY_TYPES):
        return fn(*args, **kwargs)
    return jitted(*args, **kwargs)

  setattr(wrapper, "jitted", jitted)  # read by tests: wrapper.jitted._cache_size()
  return wrapper
