"""m-sharpness: splitting a batch into chunks and averaging what each chunk computes.

Two strategies with the same result: `"vectorized"` maps over the chunks with `jax.vmap` (fast,
memory of the whole batch) and `"sequential"` runs them one after another with `lax.scan`
(memory of one chunk: SAM with gradient accumulation).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_optax._src import control

STRATEGIES = ("vectorized", "sequential")


def split(batch: Any, chunk_size: int) -> Any:
  """Reshapes every leaf's leading axis `n` into `(n // chunk_size, chunk_size)`."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("m-sharpness needs a batch: pass batch=... to update() (a tree of arrays "
                     "whose leading axis indexes examples).")
  sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"Every leaf of the batch needs the same leading (example) axis; got leading "
                     f"sizes {sorted(map(str, sizes))}.")
  (n,) = sizes
  assert n is not None  # excluded above; for type checkers
  if n == 0:
    raise ValueError(f"The batch is empty (leading axis of size 0): m-sharpness with "
                     f"chunk_size={chunk_size} needs at least one chunk of {chunk_size} "
                     f"examples. Skip empty batches before calling update().")
  if n % chunk_size:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(f"chunk_size={chunk_size} does not divide the batch size {n}. Use a "
                     f"chunk size among {divisors}, or drop the remainder of the batch.")
  return jax.tree.map(lambda x: x.reshape((n // chunk_size, chunk_size) + x.shape[1:]), batch)


def check_chunks(chunked: Any) -> None:
  """`chunks=` must hold at least one chunk, with the same leading (chunk) axis on every leaf."""
  leaves = jax.tree.leaves(chunked)
  if not leaves:
    raise ValueError("chunks= is empty: pass a tree of arrays with a leading chunk axis, e.g. "
                     "batch.reshape((k, m) + batch.shape[1:]), or pass batch= instead.")
  sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"Every leaf of chunks= needs the same leading (chunk) axis; got leading "
                     f"sizes {sorted(map(str, sizes))}.")
  if sizes == {0}:
    raise ValueError("chunks= holds no chunk (leading axis of size 0): m-sharpness needs at "
                     "least one. Skip empty batches before calling update().")


def num_chunks(chunked: Any) -> int:
  return jax.tree.leaves(chunked)[0].shape[0]


def reduce(fn: Callable[[Any], tuple[Any, Any]], chunked: Any, strategy: str, *,
           eager: bool = False) -> tuple[Any, Any]:
  """Runs `fn(chunk) -> (averaged, stacked)` on every chunk.

  Returns the chunk mean of `averaged` (floating leaves; other leaves, such as counts and PRNG
  keys, are taken from the first chunk) and `stacked` with a leading chunk axis. With
  `eager=True` (the caller's values are concrete: no trace), the sequential strategy is a
  Python loop over the chunks with the same accumulation, since an un-jitted `lax.scan` over
  `fn` (a fresh closure on every call) would be traced and compiled on every call.
  """
  if strategy == "vectorized":
    averaged, stacked = jax.vmap(fn)(chunked)
    return _means_or_firsts(averaged), stacked
  if strategy != "sequential":
    raise ValueError(f"chunk_strategy must be one of {STRATEGIES}, got {strategy!r}.")
  k = num_chunks(chunked)
  if eager:
    return _python_loop(fn, chunked, k)
  first = jax.tree.map(lambda x: x[0], chunked)
  averaged_shape, _ = jax.eval_shape(fn, first)
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, _sum_dtype(s.dtype)), averaged_shape)

  def body(total, indexed_chunk):
    i, chunk = indexed_chunk
    averaged, stacked = fn(chunk)
    total = jax.tree.map(lambda t, x: _accumulate(t, x, i), total, averaged)
    return total, stacked

  total, stacked = jax.lax.scan(body, init, (jnp.arange(k), chunked))
  mean = jax.tree.map(lambda t, s: (t / k).astype(s.dtype) if _is_float(s.dtype) else t,
                      total, averaged_shape)
  return mean, stacked


def _python_loop(fn, chunked, k):
  """The sequential strategy, unrolled in Python (eager calls): the scan's sums, in its order."""
  total, stacked, dtypes = None, [], None
  for i in range(k):
    averaged, chunk_stacked = fn(jax.tree.map(lambda x: x[i], chunked))
    stacked.append(chunk_stacked)
    if total is None:
      dtypes = jax.tree.map(lambda x: x.dtype, averaged)
      # The scan starts from zeros in the sum dtype: 0 + x is x, cast.
      total = jax.tree.map(lambda x: x.astype(_sum_dtype(x.dtype)), averaged)
    else:
      total = jax.tree.map(lambda t, x: _accumulate(t, x, i), total, averaged)
  mean = jax.tree.map(lambda t, d: (t / k).astype(d) if _is_float(d) else t, total, dtypes)
  return mean, jax.tree.map(lambda *xs: jnp.stack(xs), *stacked)


def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _sum_dtype(dtype):
  # Sums of low-precision chunk gradients are accumulated in float32 at least.
  return jnp.promote_types(dtype, jnp.float32) if _is_float(dtype) else dtype


def _accumulate(total, x, i):
  if _is_float(x.dtype):
    return total + x.astype(total.dtype)
  return jnp.where(i == 0, x, total)


@control.eager_jit
def _means_or_firsts(averaged):
  """`_mean_or_first` of every leaf: one compiled call when called eagerly (`eager_jit`)."""
  return jax.tree.map(_mean_or_first, averaged)


def _mean_or_first(x):
  if _is_float(x.dtype):
    return _chunk_mean(x)
  return _first(x)


def _chunk_mean(x):
  """The mean over the leading (chunk) axis, summed in float32 at least.

  Summed pairwise from slices along the axis rather than with `jnp.mean(x, axis=0)`: XLA's CPU
  backend runs a reduction over the outermost axis of a large array tens of times slower than
  the elementwise adds (about 25 ms against 0.5 ms for 4 x 400k floats), which made the
  vectorized strategy several times slower than SAM on CPU; on accelerators both are fast. A
  chunk axis sharded over an explicit mesh cannot be sliced: there the reduction is kept.
  """
  acc = x.astype(_sum_dtype(x.dtype))
  spec: Any = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
  if len(spec) and spec[0] is not None:
    return jnp.mean(acc, axis=0).astype(x.dtype)
  k = acc.shape[0]
  leftovers = []
  while acc.shape[0] > 1:
    if acc.shape[0] % 2:
      leftovers.append(acc[-1])
      acc = acc[:-1]
    half = acc.shape[0] // 2
    acc = acc[:half] + acc[half:]
  total = acc[0]
  for leftover in leftovers:
    total = total + leftover
  return (total / k).astype(x.dtype)


def _first(x):
  """`x[0]`. Under an explicit-axes mesh (`jax.make_mesh`'s default) a chunk axis sharded over
  devices cannot be sliced: the (small: counts, keys) leaf is replicated first."""
  spec: Any = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
  if len(spec) and spec[0] is not None and hasattr(jax.sharding, "reshard"):
    x = jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  return x[0]
