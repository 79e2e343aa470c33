"""Private helpers shared by the diagnostics modules (validation, flat-vector maths).

Global norms and inner products of pytrees are the optimizer's own (`sam_optax._src.tree`):
accumulated in float32 or wider, finite at any scale.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import jax
import jax.core  # jax.core.Tracer, named so that type checkers see the submodule
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from sam_optax._src import tree as tree_lib

PyTree = Any

#: Matmul / dot precision used for every inner product the diagnostics compute.
#: ``HIGHEST`` keeps float32 accumulation on accelerators that would otherwise use
#: reduced-precision passes (TF32/bf16) for ``jnp.dot``.
PRECISION = lax.Precision.HIGHEST


# --------------------------------------------------------------------------- validation


def check_callable(name: str, fn: Any) -> None:
  if not callable(fn):
    raise TypeError(
        f"{name} must be a callable such as `loss_fn(params, *args) -> scalar`, "
        f"got {type(fn).__name__}."
    )


def check_int(name: str, value: Any, minimum: int = 1, hint: str = "") -> int:
  """Checks that ``value`` is a concrete Python/NumPy integer ``>= minimum``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise TypeError(
        f"{name} must be a Python int (it fixes a loop length / array shape, so it "
        f"cannot be traced), got {value!r} of type {type(value).__name__}."
    )
  value = int(value)
  if value < minimum:
    msg = f"{name} must be >= {minimum}, got {value}."
    if hint:
      msg += " " + hint
    raise ValueError(msg)
  return value


def check_nonnegative(name: str, value: Any, strict: bool = False, hint: str = "") -> None:
  """Checks a possibly-traced scalar; only concrete values can be validated."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(np.asarray(value))
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a real scalar, got {value!r}.") from None
  if not np.isfinite(v) or v < 0 or (strict and v == 0):
    bound = "> 0" if strict else ">= 0"
    msg = f"{name} must be a finite number {bound}, got {v}."
    if hint:
      msg += " " + hint
    raise ValueError(msg)


def check_key(key: Any, fn_name: str) -> None:
  if key is None:
    raise TypeError(
        f"{fn_name} needs a PRNG key for its random start/probes: pass "
        "`key=jax.random.key(0)` (or any `jax.random.PRNGKey`)."
    )
  dtype = getattr(key, "dtype", None)
  if dtype is None:
    raise TypeError(
        f"key must be a JAX PRNG key (e.g. `jax.random.key(0)`), got {type(key).__name__}."
    )
  if not jnp.issubdtype(dtype, jax.dtypes.prng_key) and dtype != jnp.uint32:
    raise TypeError(
        "key must be a JAX PRNG key created with `jax.random.key(seed)` or "
        f"`jax.random.PRNGKey(seed)`, got an array of dtype {dtype} and shape "
        f"{getattr(key, 'shape', None)}."
    )


def check_params(params: PyTree) -> int:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params has no array leaves; pass the model parameters pytree.")
  for leaf in leaves:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          "All params leaves must be floating point (the Hessian is taken with "
          f"respect to every leaf); found a leaf of dtype {dtype}. Close over "
          "non-trainable integer state instead of passing it in params."
      )
  return sum(int(np.prod(jnp.shape(x))) for x in leaves)


# --------------------------------------------------------------------------- dtypes / flat


def flat_ops(params_like: PyTree):
  """Returns ``(n, dtype, ravel, unravel)`` for working on flat vectors.

  ``ravel`` maps a params-shaped pytree to a flat vector in the compute dtype
  (float32 or wider: `tree.accumulation_dtype`); ``unravel`` maps it back, casting each leaf
  to its own dtype.
  """
  flat, unravel_raw = ravel_pytree(params_like)
  dtype = tree_lib.accumulation_dtype(params_like)

  def ravel(tree):
    return ravel_pytree(tree)[0].astype(dtype)

  def unravel(x):
    return unravel_raw(x.astype(flat.dtype))

  return flat.shape[0], dtype, ravel, unravel


def flat_matvec(matvec: Callable[[PyTree], PyTree], ravel, unravel):
  return lambda x: ravel(matvec(unravel(x)))


def tiny(dtype) -> jnp.ndarray:
  return jnp.asarray(jnp.finfo(dtype).tiny, dtype)


def dot(x, y):
  return jnp.dot(x, y, precision=PRECISION)


def safe_norm(x):
  """L2 norm of a flat vector (zero-safe, no NaN gradient issues)."""
  return jnp.sqrt(jnp.maximum(dot(x, x), 0.0))


# --------------------------------------------------------------------------- pytree maths


def tree_rademacher(key, like: PyTree) -> PyTree:
  """I.i.d. Rademacher (+-1) entries for every leaf of ``like``.

  One flat draw of ``n`` signs is split into the leaves (each cast to its own
  dtype). This is the same distribution as independent per-leaf draws but
  compiles a single RNG call however many leaves the model has: it does more than
  ``optax.tree.random_like``, which splits the key and draws once per leaf.
  """
  flat, unravel = ravel_pytree(like)
  signs = jax.random.rademacher(key, flat.shape, dtype=jnp.int8)
  return unravel(signs.astype(flat.dtype))


def tree_normal(key, like: PyTree) -> PyTree:
  """I.i.d. standard normal entries for every leaf of ``like`` (one flat draw, drawn in
  float32 or wider and cast to each leaf's dtype; see `tree_rademacher`)."""
  flat, unravel = ravel_pytree(like)
  z = jax.random.normal(key, flat.shape, dtype=tree_lib.accumulation_dtype(like))
  return unravel(z.astype(flat.dtype))


# --------------------------------------------------------------------------- batch chunks


def leading_batch_size(tree: PyTree, what: str) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(
        f"{what}: there are no array arguments to split along a batch axis; pass the "
        "batch as positional args after params (or drop the chunking option)."
    )
  sizes = set()
  for leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
          f"{what}: every array leaf of the batch arguments needs a leading batch "
          "axis, but a scalar was found. Close over non-batched arguments with "
          "functools.partial instead of passing them positionally."
      )
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(
        f"{what}: batch arguments disagree on the leading (batch) dimension: "
        f"{sorted(sizes)}. All leaves must share the same batch size."
    )
  return sizes.pop()


def check_chunk_size(chunk_size: Any, args: PyTree, what: str) -> Optional[int]:
  """Validates ``chunk_size`` (None: no chunking) against the args' leading batch axis."""
  if chunk_size is None:
    return None
  chunk_size = check_int(
      "chunk_size", chunk_size, 1,
      "It is the number of examples per chunk along the leading batch axis of the args.")
  split_chunks(args, chunk_size, what, "chunk_size")  # raises when it does not divide the batch
  return chunk_size


def split_chunks(tree: PyTree, chunk: int, what: str, name: str) -> PyTree:
  """Reshapes leading axis ``B`` into ``(B // chunk, chunk)``; validates divisibility."""
  batch = leading_batch_size(tree, what)
  if batch % chunk != 0:
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    raise ValueError(
        f"{what}: {name}={chunk} does not divide the batch size {batch}. Use a "
        f"divisor of the batch size (one of {divisors[:12]}"
        f"{'...' if len(divisors) > 12 else ''}) "
        "or trim the batch."
    )
  return jax.tree.map(
      lambda x: jnp.reshape(x, (batch // chunk, chunk) + tuple(jnp.shape(x)[1:])), tree
  )


# --------------------------------------------------------------------------- jit dispatch


def _is_array_leaf(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def jit_dispatch(static_argnames: tuple):
  """Decorator: run ``impl`` through a cached ``jax.jit`` when it is safe to do so.

  Eager calls otherwise dispatch op-by-op and re-trace every ``lax`` loop body on
  every call. The jitted path is used when all static arguments are hashable and
  every leaf of the dynamic arguments is an array (Python scalars / flags passed as
  extra ``*args`` keep the eager path, so user code branching on them still works).
  Under an outer ``jax.jit`` the inner jit is simply inlined. ``impl`` must be
  called with keyword arguments only.
  """

  def deco(impl):
    jitted = jax.jit(impl, static_argnames=static_argnames)

    def call(**kwargs):
      static = tuple(kwargs[name] for name in static_argnames if name in kwargs)
      dynamic = {k: v for k, v in kwargs.items() if k not in static_argnames}
      try:
        hash(static)
      except TypeError:
        return impl(**kwargs)
      if not all(_is_array_leaf(x) for x in jax.tree.leaves(dynamic)):
        return impl(**kwargs)
      return jitted(**kwargs)

    call.__wrapped__ = impl
    return call

  return deco
