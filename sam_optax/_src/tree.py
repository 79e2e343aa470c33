"""Pytree arithmetic with the numerics every sharpness-aware rule relies on.

Norms and inner products are global over all leaves, accumulated in float32 or in the widest
float present (so bfloat16 params do not lose the norm), and optionally reduced over a mapped
axis when the params themselves are sharded across devices. `sam_optax.diagnostics` uses the
same helpers.

Elsewhere, `optax.tree` is used directly where it does the same thing (`cast_like`, `where`,
`cast`, `sub`, `mul`, `zeros_like`); each helper kept here says what it does beyond optax's.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import control

AxisName = Hashable | Sequence[Hashable] | None


def accumulation_dtype(*trees: Any) -> jnp.dtype:
  """float32, or float64 when any leaf is float64: the dtype norms are accumulated in."""
  dtype = jnp.dtype(jnp.float32)
  for tree in trees:
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        dtype = jnp.promote_types(dtype, leaf.dtype)
  return dtype


@control.eager_jit
def in_accumulation_dtype(tree: Any) -> Any:
  """Every leaf in the accumulation dtype (see `accumulation_dtype`), for elementwise rules."""
  return optax.tree.cast(tree, accumulation_dtype(tree))


# `optax.tree.where`, compiled as one call when run eagerly (`optax.tree.where` alone dispatches
# once per leaf there, which made an eager step several times slower).
select = control.eager_jit(optax.tree.where)


@control.eager_jit(static_argnames=("axis_name",))
def vdot(a: Any, b: Any, *, axis_name: AxisName = None) -> jax.Array:
  """Global inner product `<a, b>` accumulated in float32 or wider.

  Does more than `optax.tree.vdot`, which sums in the leaves' own dtypes (bfloat16 leaves lose
  the sum) and knows nothing of sharded params: the axis-aware sum below.

  With `axis_name` (params sharded over a mapped axis), each leaf's partial sum is summed over
  the axes among `axis_name` that the leaf is sharded over (see `sharded_axes`), so that leaves
  replicated there (small biases left unsharded under FSDP) count once.
  """
  acc = accumulation_dtype(a, b)
  names = None if axis_name is None else _axis_names(axis_name)
  groups = {}  # reduction axes -> partial sum over the leaves sharded over exactly those axes
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    axes = () if names is None else sharded_axes((x, y), names)
    part = jnp.sum(x.astype(acc) * y.astype(acc))
    groups[axes] = groups[axes] + part if axes in groups else part
  total = jnp.zeros((), acc)
  for axes, part in groups.items():
    total = total + (jax.lax.psum(part, axes) if axes else part)
  return total


def sharded_axes(values: Any, names: tuple) -> tuple:
  """The axes among `names` over which some leaf of `values` differs across devices.

  Inside `jax.shard_map` (with its default `check_vma=True`) JAX types every value with the
  mesh axes it varies over: a param replicated over an axis, and its gradient (which shard_map
  already sums over that axis), is invariant there. Where JAX does not track this (`pmap`,
  `shard_map(..., check_vma=False)`) every leaf is taken as sharded over every name.
  """
  if not _varying_axes_tracked():
    return names
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  typed = set(get_mesh().manual_axes) if get_mesh is not None else set(names)
  varying = set()
  for leaf in jax.tree.leaves(values):
    varying |= _varying_axes(leaf)
  # Names that are not shard_map mesh axes (a vmap's axis name, say) carry no typing.
  return tuple(name for name in names if name in varying or name not in typed)


def vary(tree: Any, axis_name: AxisName) -> Any:
  """Marks every leaf as varying over the `shard_map` mesh axes among `axis_name`.

  A gradient taken at the result is then each device's own: shard_map sums the gradient with
  respect to a value replicated over an axis. A no-op where JAX does not track varying axes
  (`pmap`, `check_vma=False`, outside `shard_map`) and for leaves already varying.
  """
  if axis_name is None or not _varying_axes_tracked():
    return tree
  names = _axis_names(axis_name)
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  manual = set(get_mesh().manual_axes) if get_mesh is not None else set(names)
  pcast = getattr(jax.lax, "pcast", None)

  def one(x):
    missing = tuple(n for n in names if n in manual and n not in _varying_axes(x))
    if not missing:
      return x
    if pcast is not None:
      return pcast(x, missing, to="varying")
    return getattr(jax.lax, "pvary")(x, missing)  # JAX < 0.8 (pvary is gone since)
  return jax.tree.map(one, tree)


def _varying_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """`x`, marked as varying over the `shard_map` mesh axes `like` varies over (a no-op where JAX
  does not track varying axes), so that conditional branches return matching types."""
  if not _varying_axes_tracked():
    return x
  missing = tuple(sorted(_varying_axes(like) - _varying_axes(x), key=str))
  if not missing:
    return x
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is not None:
    return pcast(x, missing, to="varying")
  return getattr(jax.lax, "pvary")(x, missing)  # JAX < 0.8 (pvary is gone since)


def _axis_names(axis_name: AxisName) -> tuple:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _varying_axes(leaf: Any) -> frozenset:
  aval = jax.typeof(leaf)
  manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # JAX 0.6 - 0.8


def _varying_axes_tracked() -> bool:
  """Whether the enclosing trace types values with their varying mesh axes (shard_map's
  `check_vma`). Read from JAX's trace context; False where this JAX does not expose it."""
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  flag = getattr(jax_config, "_check_vma", None)
  return bool(flag.value) if flag is not None else False


@control.eager_jit(static_argnames=("axis_name",))
def norm(tree: Any, *, axis_name: AxisName = None) -> jax.Array:
  """Global L2 norm `||tree||` over all leaves (and over `axis_name` for sharded params).

  Finite for every finite tree, whatever its scale: where the plain sum of squares overflows
  (float32 entries above ~1e19) or may have lost terms to underflow (entries below ~1e-19), it
  is recomputed with the entries divided by their largest magnitude (see `scaled_vdot`). It is
  non-finite exactly when some entry is (NaN for a NaN entry, else inf for an infinite one),
  which is how the engine tells a non-finite gradient. In the normal range the result is
  `sqrt(vdot(tree, tree))`, bit for bit, at the cost of one scalar test.

  Does more than `optax.tree.norm`: the float32 accumulation and axis-aware sum of `vdot`, and
  the overflow-safe rescaling.
  """
  value, scale, _ = scaled_vdot(tree, tree, axis_name=axis_name)
  return jnp.sqrt(value) * scale


@control.eager_jit(static_argnames=("axis_name",))
def max_abs(tree: Any, *, axis_name: AxisName = None) -> jax.Array:
  """The largest magnitude over all leaves (0 for a tree without elements), in the
  accumulation dtype; NaN when some entry is NaN. With `axis_name`, over the shards too."""
  acc = accumulation_dtype(tree)
  names = None if axis_name is None else _axis_names(axis_name)
  groups = {}  # reduction axes -> maximum over the leaves sharded over exactly those axes
  for x in jax.tree.leaves(tree):
    axes = () if names is None else sharded_axes(x, names)
    part = jnp.max(jnp.abs(x.astype(acc)), initial=0.0)
    groups[axes] = jnp.maximum(groups[axes], part) if axes in groups else part
  total = jnp.zeros((), acc)
  for axes, part in groups.items():
    total = jnp.maximum(total, jax.lax.pmax(part, axes) if axes else part)
  return total


@control.eager_jit(static_argnames=("axis_name",))
def max_exponent(tree: Any, *, axis_name: AxisName = None) -> jax.Array:
  """The int32 `e` with `2^e <= max|tree| < 2^(e+1)`; 0 for a tree that is zero or holds a NaN
  or an infinity. `times_power_of_two(tree, -e)` then has entries in (-2, 2)."""
  m = max_abs(tree, axis_name=axis_name)
  ok = (m > 0) & jnp.isfinite(m)
  return jnp.where(ok, jnp.frexp(jnp.where(ok, m, jnp.ones_like(m)))[1] - 1, 0)


@control.eager_jit
def times_power_of_two(tree: Any, exponent: jax.Array) -> Any:
  """Every leaf times `2^exponent`: exact wherever the result is a normal number.

  Applied as two power-of-two factors, so that neither leaves the normal range for any exponent
  a float32 maximum can have (`2^-e` alone would for the largest floats, and a product with a
  subnormal factor, or a division compiled as one, flushes to zero on CPU and GPU).
  """
  def leaf(x):
    one = jnp.ones((), x.dtype)
    half = exponent // 2
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, exponent - half)
  return jax.tree.map(leaf, tree)


@control.eager_jit(static_argnames=("axis_name",))
def scaled_vdot(a: Any, b: Any, *, axis_name: AxisName = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`<a, b>` as `(value, scale_a, scale_b)` with `<a, b> = value * scale_a * scale_b`, finite
  for finite trees of any magnitude.

  The plain sum `vdot(a, b)` is returned with unit scales when it is trustworthy: finite, and
  at least `n * tiny / eps` in magnitude (`n` elements, `tiny` the smallest normal number,
  `eps` the machine epsilon of the accumulation dtype), below which products that underflowed
  (flushed to zero on CPU and GPU) could matter. Otherwise (an overflow, an underflow, a zero
  or cancelling sum, or a non-finite entry) it is recomputed, inside a `lax.cond` so that the
  common case costs one scalar test, with each tree divided by its largest magnitude: then
  `value` is in range, and the caller combines it with the scales where the combination is
  representable (a norm `sqrt(value) * scale`, a ratio of inner products). The scales are
  powers of two, so the division is exact. A tree that is zero, or holds a NaN or an
  infinity, keeps the scale 1, so its non-finite entries stay in `value`.
  """
  same = a is b
  plain = vdot(a, b, axis_name=axis_name)
  acc = plain.dtype
  info = jnp.finfo(acc)
  count = max(1, sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(a)))
  floor = count * float(info.tiny) / float(info.eps)
  one = jnp.ones((), acc)

  # Inside shard_map the branches' outputs must vary over the same mesh axes: the scales (a
  # constant here, reduced from the trees there) vary over at most the axes `plain` varies over.
  def trusted(_):
    return tuple(_varying_like(x, plain) for x in (plain, one, one))

  def rescaled(_):
    e_a = max_exponent(a, axis_name=axis_name)
    e_b = e_a if same else max_exponent(b, axis_name=axis_name)
    a_ = times_power_of_two(in_accumulation_dtype(a), -e_a)
    b_ = a_ if same else times_power_of_two(in_accumulation_dtype(b), -e_b)
    out = vdot(a_, b_, axis_name=axis_name), jnp.ldexp(one, e_a), jnp.ldexp(one, e_b)
    return tuple(_varying_like(x, plain) for x in out)

  in_range = jnp.isfinite(plain) & (jnp.abs(plain) >= floor)
  if _batched(in_range):
    # Under jax.vmap (m-sharpness's vectorized chunks) lax.cond with a batched predicate runs
    # both branches and selects anyway; selecting here does the same without lax.cond's
    # batching rule, which fails on meshes with explicit axes (jax.set_mesh).
    value, scale_a, scale_b = (jnp.where(in_range, t, r)
                               for t, r in zip(trusted(None), rescaled(None)))
    return value, scale_a, scale_b
  return control.cond(in_range, trusted, rescaled, None)


def _batched(x: Any) -> bool:
  """Whether `x` is batched by an enclosing `jax.vmap` traced right here."""
  try:
    from jax._src.interpreters import batching  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  tracer = getattr(batching, "BatchTracer", None)
  return (tracer is not None and isinstance(x, tracer)
          and isinstance(getattr(x, "batch_dim", None), int))


@control.eager_jit(static_argnames=("axis_name",))
def projection_coefficient(a: Any, b: Any, *, axis_name: AxisName = None) -> jax.Array:
  """`<a, b> / <b, b>` (0 where `b = 0`), finite for finite trees of any magnitude.

  The coefficient of `b` in the projection of `a` onto `b` (GSAM's and LookSAM's
  decompositions). In the normal range it is `safe_ratio(vdot(a, b), vdot(b, b))` bit for bit;
  where either inner product over- or underflows it comes from `scaled_vdot`.
  """
  ab, scale_a, scale_b = scaled_vdot(a, b, axis_name=axis_name)
  bb, scale_bb, _ = scaled_vdot(b, b, axis_name=axis_name)
  # <a, b> / <b, b> = (ab sa sb) / (bb sbb^2), each scale 1 or the tree's largest magnitude;
  # the scales enter as two ratios so that no product of two of them over- or underflows.
  return safe_ratio(ab, bb) * (scale_a / scale_bb) * (scale_b / scale_bb)


@control.eager_jit
def safe_inverse(x: jax.Array) -> jax.Array:
  """`1/x` where x > 0 and finite, else 0: a zero vector normalizes to zero, never NaN."""
  ok = (x > 0) & jnp.isfinite(x)
  return jnp.where(ok, 1.0 / jnp.where(ok, x, 1.0), 0.0)


@control.eager_jit
def safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """`numerator / denominator` where the denominator is > 0 and finite, else 0.

  A division rather than a product with `safe_inverse`, so that equal norms give exactly 1.
  """
  ok = (denominator > 0) & jnp.isfinite(denominator)
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


@control.eager_jit
def scale(factor: jax.Array, tree: Any) -> Any:
  """`factor * tree`, multiplied in the wider of the factor's and each leaf's dtypes and cast
  back to the leaf's dtype.

  Does more than `optax.tree.scale`, which multiplies in JAX's promotion: a weakly typed factor
  (a Python float traced by `jit`) is first rounded to a bfloat16 leaf's dtype, and a strongly
  typed float32 factor makes a bfloat16 leaf float32.
  """
  def leaf(x):
    acc = jnp.promote_types(factor.dtype, x.dtype)
    return (factor.astype(acc) * x.astype(acc)).astype(x.dtype)
  return jax.tree.map(leaf, tree)


@control.eager_jit
def add(a: Any, b: Any) -> Any:
  """`a + b` with the result in `a`'s dtypes (params + a float32 perturbation stay bfloat16).

  Does more than `optax.tree.add`, which promotes (bfloat16 + float32 is float32): `b` is cast
  to `a`'s dtypes first. Compiled eagerly (see `control.eager_jit`), where `optax.tree.add`'s
  leading `0 + a` would also turn a `-0.0` entry into `+0.0` (XLA folds it away under jit).
  """
  return optax.tree.add(a, optax.tree.cast_like(b, a))


@control.eager_jit
def sub(a: Any, b: Any) -> Any:
  """`a - b` with the result in `a`'s dtypes: `optax.tree.sub` after casting `b` like `a`."""
  return optax.tree.sub(a, optax.tree.cast_like(b, a))


@control.eager_jit
def mean(trees: Any) -> Any:
  """Mean over the leading axis of every leaf (e.g. over chunks), in each leaf's dtype (no
  `optax.tree` counterpart)."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), trees)


@control.eager_jit
def all_zero(tree: Any) -> jax.Array:
  """Whether every element of every leaf is zero (True for a tree without elements; no
  `optax.tree` counterpart)."""
  flags = [jnp.all(x == 0) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.asarray(flags, jnp.bool_)) if flags else jnp.asarray(True)


def check_same_structure(reference: Any, tree: Any, *, what: str, reference_name: str = "params"):
  """Raise a ValueError naming the mismatch when `tree` is not shaped like `reference`."""
  ref_def, tree_def = jax.tree.structure(reference), jax.tree.structure(tree)
  if ref_def != tree_def:
    raise ValueError(
        f"{what} does not have the structure of {reference_name}: expected {ref_def}, got "
        f"{tree_def}. Pass a tree with the same keys and nesting as {reference_name} "
        f"(e.g. the output of jax.grad with respect to {reference_name}).")
  for path_leaf, ref_leaf in zip(jax.tree.leaves_with_path(tree), jax.tree.leaves(reference)):
    path, leaf = path_leaf
    if jnp.shape(leaf) != jnp.shape(ref_leaf):
      raise ValueError(
          f"{what} has shape {jnp.shape(leaf)} at {jax.tree_util.keystr(path)} where "
          f"{reference_name} has {jnp.shape(ref_leaf)}. Compute it with respect to the same "
          f"{reference_name} you pass to update().")
