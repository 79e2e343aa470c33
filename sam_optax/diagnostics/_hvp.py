"""Hessian-vector products of a scalar loss over a params pytree."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from sam_optax._src import tree as tree_lib
from sam_optax.diagnostics import _utils

PyTree = Any
LossFn = Callable[..., jax.Array]

__all__ = ["hvp", "make_hvp_fn"]


def make_hvp_fn(
    loss_fn: LossFn,
    params: PyTree,
    *args: Any,
    chunk_size: Optional[int] = None,
    axis_name: Optional[Any] = None,
) -> Callable[[PyTree], PyTree]:
  r"""Returns ``v -> H v``, the Hessian-vector product of ``loss_fn`` at ``params``.

  The product is computed forward-over-reverse,

  .. math::  H v = \partial_t \nabla_w L(w + t v)\big|_{t=0}
             = \texttt{jax.jvp(jax.grad(L), (w,), (v,))[1]},

  which costs about as much as two gradient evaluations and never forms ``H``.

  **Batch averaging (one mechanism).** ``loss_fn(params, *args)`` is assumed to
  be a *mean* over the examples in ``args``. With ``chunk_size=m`` every array
  leaf of ``args`` is split along its leading (batch) axis into ``B / m`` chunks of
  ``m`` examples, the HVP of each chunk's loss is computed sequentially
  (``lax.map``, so peak memory is that of one chunk) and the results are averaged:
  :math:`H v = \frac{1}{B/m}\sum_c H_c v`, which equals the full-batch HVP of a
  mean loss. With ``axis_name`` the (chunk-averaged) result is additionally
  ``lax.pmean``-ed over that mapped axis, i.e. averaged over devices inside
  ``jax.pmap`` / ``shard_map`` where each device holds its own batch shard.

  Args:
    loss_fn: ``loss_fn(params, *args) -> scalar``.
    params: Point at which the Hessian is taken (any pytree of float arrays,
      e.g. Flax ``variables['params']`` or an ``nnx.State``).
    *args: Extra arguments (typically the batch) forwarded to ``loss_fn``.
    chunk_size: Optional number of examples per chunk (must divide the batch).
    axis_name: Optional mapped-axis name to ``pmean`` the product over.

  Returns:
    A function mapping a params-shaped pytree ``v`` to ``H v`` (same structure
    and dtypes as ``params``).

  Raises:
    TypeError: If ``loss_fn`` is not callable or params has non-float leaves.
    ValueError: If ``chunk_size`` is invalid or does not divide the batch.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.diagnostics import make_hvp_fn
    >>> d = jnp.array([1.0, 2.0, 3.0])
    >>> loss = lambda p: 0.5 * jnp.sum(d * p["w"] ** 2)
    >>> hv = make_hvp_fn(loss, {"w": jnp.zeros(3)})
    >>> hv({"w": jnp.ones(3)})["w"].tolist()
    [1.0, 2.0, 3.0]

  References:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    Yao et al., "PyHessian", 2019, https://arxiv.org/abs/1912.07145.
  """
  _utils.check_callable("loss_fn", loss_fn)
  _utils.check_params(params)
  chunk_size = _utils.check_chunk_size(chunk_size, args, "hvp")
  chunked = None if chunk_size is None else _utils.split_chunks(args, chunk_size, "hvp",
                                                                "chunk_size")

  grad_fn = jax.grad(loss_fn)

  def _cast_like_params(v):
    try:
      return jax.tree.map(lambda p, t: jnp.asarray(t, jnp.result_type(p)), params, v)
    except ValueError as e:
      raise ValueError(
          "The vector v must have the same pytree structure as params "
          f"(got a mismatch: {e})."
      ) from None

  def single(v, batch_args):
    p = params
    if axis_name is not None:
      # Inside shard_map, JAX sums cotangents of device-invariant (replicated)
      # inputs across the axis automatically; mark params/v as device-varying so
      # each device computes its *local* HVP and the pmean below averages them.
      p, v = tree_lib.vary(p, axis_name), tree_lib.vary(v, axis_name)
    return jax.jvp(lambda q: grad_fn(q, *batch_args), (p,), (v,))[1]

  def matvec(v: PyTree) -> PyTree:
    v = _cast_like_params(v)
    if chunked is None:
      out = single(v, args)
    else:
      per_chunk = lax.map(lambda a: single(v, a), chunked)
      out = jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), per_chunk)
    if axis_name is not None:
      out = lax.pmean(out, axis_name)
    return out

  return matvec


def hvp(
    loss_fn: LossFn,
    params: PyTree,
    v: PyTree,
    *args: Any,
    chunk_size: Optional[int] = None,
    axis_name: Optional[Any] = None,
) -> PyTree:
  r"""Hessian-vector product ``H v`` of ``loss_fn`` at ``params`` (forward-over-reverse).

  .. math::  H v = \texttt{jax.jvp(jax.grad(loss\_fn), (params,), (v,))[1]}

  See :func:`make_hvp_fn` for the batch-chunk averaging (``chunk_size``) and the
  cross-device averaging (``axis_name``, a ``lax.pmean`` for use inside
  ``pmap``/``shard_map``).

  Args:
    loss_fn: ``loss_fn(params, *args) -> scalar`` (a mean over the batch).
    params: Pytree of float arrays at which the Hessian is evaluated.
    v: Pytree with the same structure as ``params``.
    *args: Extra arguments forwarded to ``loss_fn``.
    chunk_size: Optional examples per chunk along the leading axis of ``args``.
    axis_name: Optional mapped-axis name; the product is ``pmean``-ed over it.

  Returns:
    ``H v`` as a pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.diagnostics import hvp
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])          # a batch of 2 examples
    >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)  # H = 2 * mean(x x^T)
    >>> p = {"w": jnp.zeros(2)}
    >>> hvp(loss, p, {"w": jnp.ones(2)}, x)["w"].tolist()
    [1.0, 4.0]
    >>> hvp(loss, p, {"w": jnp.ones(2)}, x, chunk_size=1)["w"].tolist()
    [1.0, 4.0]

  References:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    Yao et al., "PyHessian", 2019, https://arxiv.org/abs/1912.07145.
  """
  _utils.check_callable("loss_fn", loss_fn)
  _utils.check_params(params)
  chunk_size = _utils.check_chunk_size(chunk_size, args, "hvp")
  return _hvp_impl(
      loss_fn=loss_fn, params=params, v=v, args=args, chunk_size=chunk_size, axis_name=axis_name
  )


@_utils.jit_dispatch(("loss_fn", "chunk_size", "axis_name"))
def _hvp_impl(*, loss_fn, params, v, args, chunk_size, axis_name):
  return make_hvp_fn(loss_fn, params, *args, chunk_size=chunk_size, axis_name=axis_name)(v)
