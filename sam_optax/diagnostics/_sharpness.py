"""Worst-case (SAM), adaptive (ASAM) and m-sharpness by projected gradient ascent."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from sam_optax._src import tree as tree_lib
from sam_optax.diagnostics import _utils

PyTree = Any

__all__ = ["SharpnessResult", "MSharpnessResult", "worst_case_sharpness", "m_sharpness"]


class SharpnessResult(NamedTuple):
  """Output of :func:`worst_case_sharpness`.

  Attributes:
    sharpness: Best value found of :math:`L(w + \\epsilon) - L(w)` over the ball
      (a lower bound on the true maximum, always ``>= sam_sharpness``).
    sam_sharpness: One-step SAM/ASAM estimate (the ascent's starting point).
    loss: :math:`L(w)`.
    perturbation: The maximizing :math:`\\epsilon` found (params-shaped).
  """

  sharpness: jax.Array
  sam_sharpness: jax.Array
  loss: jax.Array
  perturbation: PyTree


class MSharpnessResult(NamedTuple):
  """Output of :func:`m_sharpness`.

  Attributes:
    sharpness: Mean over chunks of the per-chunk worst-case sharpness.
    sam_sharpness: Mean over chunks of the per-chunk one-step SAM estimate.
    per_chunk: ``(B / m,)`` per-chunk worst-case sharpness values.
  """

  sharpness: jax.Array
  sam_sharpness: jax.Array
  per_chunk: jax.Array


def _validate(loss_fn, params, rho, num_steps, step_size, adaptive, eta):
  _utils.check_callable("loss_fn", loss_fn)
  _utils.check_params(params)
  _utils.check_nonnegative("rho", rho, hint="rho is the radius of the perturbation ball.")
  num_steps = _utils.check_int(
      "num_steps",
      num_steps,
      0,
      "It counts ascent steps after the one-step SAM point (0 = SAM estimate only).",
  )
  if step_size is not None:
    _utils.check_nonnegative(
        "step_size", step_size, strict=True, hint="Use e.g. step_size=rho (the default)."
    )
  if not isinstance(adaptive, bool):
    raise TypeError(f"adaptive must be a bool, got {type(adaptive).__name__}.")
  if adaptive:
    _utils.check_nonnegative(
        "eta", eta, strict=True, hint="ASAM needs eta > 0 so that T = |w| + eta is invertible."
    )
  return num_steps


@_utils.jit_dispatch(("loss_fn", "num_steps", "adaptive"))
def _ascent_jit(*, loss_fn, params, args, rho, step_size, eta, key, num_steps, adaptive):
  return _ascent(loss_fn, params, args, rho, num_steps, step_size, adaptive, eta, key)


def _ascent(loss_fn, params, args, rho, num_steps, step_size, adaptive, eta, key):
  """Projected normalized-gradient ascent in the (T-scaled) ball; see docstring."""
  acc = tree_lib.accumulation_dtype(params)
  rho = jnp.asarray(rho, acc)
  step = rho if step_size is None else jnp.asarray(step_size, acc)
  tiny = _utils.tiny(acc)
  value_and_grad = jax.value_and_grad(loss_fn)

  if adaptive:
    scale = jax.tree.map(lambda w: jnp.abs(w) + jnp.asarray(eta, jnp.result_type(w)), params)
  else:
    scale = jax.tree.map(jnp.ones_like, params)

  def mul(a, b):
    return jax.tree.map(lambda x, y: (x * y).astype(jnp.result_type(x)), a, b)

  def axpy(a, x, y):  # a * x + y, leafwise, keeping y's dtypes
    return jax.tree.map(lambda u, v: (a * u.astype(acc) + v.astype(acc)).astype(v.dtype), x, y)

  def normalized(tree):
    nrm = tree_lib.norm(tree)
    inv = jnp.where(nrm > tiny, 1.0 / jnp.maximum(nrm, tiny), 0.0)
    return jax.tree.map(lambda x: (x.astype(acc) * inv).astype(x.dtype), tree), nrm

  def project(delta):
    nrm = tree_lib.norm(delta)
    factor = jnp.where(nrm > rho, rho / jnp.maximum(nrm, tiny), 1.0)
    return jax.tree.map(lambda x: (x.astype(acc) * factor).astype(x.dtype), delta)

  def perturbed(delta):
    eps = mul(scale, delta)
    return eps, jax.tree.map(lambda w, e: (w + e).astype(jnp.result_type(w)), params, eps)

  loss0, g0 = value_and_grad(params, *args)
  loss0 = loss0.astype(acc)
  # Gradient w.r.t. delta (eps = T * delta) is T * g.
  d0, g0_norm = normalized(mul(scale, g0))
  rand_dir, _ = normalized(_utils.tree_normal(key, params))
  # Zero gradient (e.g. exactly at a minimum): start from a random direction.
  d0 = jax.tree.map(lambda a, b: jnp.where(g0_norm > tiny, a, b), d0, rand_dir)
  delta0 = jax.tree.map(lambda x: (x.astype(acc) * rho).astype(x.dtype), d0)

  def body(t, state):
    delta, best, best_delta, first = state
    _, wp = perturbed(delta)
    val, g = value_and_grad(wp, *args)
    gain = val.astype(acc) - loss0
    first = jnp.where(t == 0, gain, first)
    improve = gain > best
    best = jnp.where(improve, gain, best)
    best_delta = jax.tree.map(lambda a, b: jnp.where(improve, a, b), delta, best_delta)
    direction, _ = normalized(mul(scale, g))
    delta = project(axpy(step, direction, delta))
    return delta, best, best_delta, first

  init = (
      delta0,
      jnp.asarray(-jnp.inf, acc),
      delta0,
      jnp.zeros((), acc),
  )
  _, best, best_delta, first = lax.fori_loop(0, num_steps + 1, body, init)
  # NaN-safe: if every evaluation was NaN/-inf keep the SAM value.
  best = jnp.where(jnp.isfinite(best), jnp.maximum(best, first), first)
  eps, _ = perturbed(best_delta)
  return SharpnessResult(best, first, loss0, eps)


def worst_case_sharpness(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    *args: Any,
    rho: Any,
    num_steps: int = 10,
    step_size: Optional[Any] = None,
    adaptive: bool = False,
    eta: Any = 0.01,
    key: Optional[jax.Array] = None,
) -> SharpnessResult:
  r"""Worst-case sharpness :math:`\max_{\lVert T^{-1}\epsilon\rVert\le\rho} L(w+\epsilon) - L(w)`.

  With ``adaptive=False``, :math:`T = I` (SAM's Euclidean ball); with
  ``adaptive=True``, :math:`T = \mathrm{diag}(|w| + \eta)` elementwise (ASAM's
  adaptive sharpness). Writing :math:`\epsilon = T\delta` with
  :math:`\lVert\delta\rVert\le\rho`, the estimate runs projected normalized
  gradient ascent on :math:`\delta` (gradient :math:`T\nabla L`):

  .. math::
      \delta_0 &= \rho\,\frac{T g}{\lVert T g\rVert}, \quad g = \nabla L(w)
      \qquad(\epsilon_0 = \rho\,T^2 g/\lVert T g\rVert:\ \text{the SAM/ASAM step}),\\
      \delta_{t+1} &= \Pi_{\lVert\cdot\rVert\le\rho}\Big(\delta_t + s\,
      \frac{T \nabla L(w + T\delta_t)}{\lVert T \nabla L(w + T\delta_t)\rVert}\Big),

  i.e. in :math:`\epsilon` the steps are scaled by :math:`T^2` and the projection
  is in the :math:`T^{-1}`-weighted norm. The best value seen over
  :math:`t = 0..\text{num\_steps}` is returned, so the result is always
  :math:`\ge` the one-step SAM estimate :math:`L(w+\epsilon_0) - L(w)` and
  :math:`\le` the true maximum. If :math:`g = 0` the start is a random direction
  from ``key``. Costs ``num_steps + 2`` gradient evaluations; jit-able.

  Args:
    loss_fn: ``loss_fn(params, *args) -> scalar``.
    params: Params pytree :math:`w`.
    *args: Extra arguments for ``loss_fn`` (e.g. the batch).
    rho: Ball radius ``>= 0`` (may be traced).
    num_steps: Ascent steps after the SAM point (``0`` = SAM estimate only).
    step_size: Length :math:`s` of each normalized step in :math:`\delta`-space;
      default ``rho``. Smaller values help when the maximizer is interior.
    adaptive: Use ASAM's adaptive ball.
    eta: ASAM's :math:`\eta > 0` (only with ``adaptive=True``).
    key: Optional PRNG key, used only for the zero-gradient fallback direction
      (default ``jax.random.key(0)``).

  Returns:
    :class:`SharpnessResult` ``(sharpness, sam_sharpness, loss, perturbation)``.

  Raises:
    ValueError: If ``rho < 0``, ``num_steps < 0``, ``step_size <= 0`` or
      ``eta <= 0`` with ``adaptive=True``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.diagnostics import worst_case_sharpness
    >>> d = jnp.array([1.0, 4.0])
    >>> loss = lambda p: 0.5 * jnp.sum(d * p["w"] ** 2)
    >>> res = worst_case_sharpness(loss, {"w": jnp.array([1.0, 0.0])}, rho=0.1, num_steps=20)
    >>> float(res.sharpness) >= float(res.sam_sharpness)
    True
    >>> res0 = worst_case_sharpness(loss, {"w": jnp.zeros(2)}, rho=0.1, num_steps=30)
    >>> round(float(res0.sharpness), 4)   # 0.5 * rho**2 * lambda_max
    0.02

  References:
    Foret et al., "Sharpness-Aware Minimization", 2020, https://arxiv.org/abs/2010.01412.
    Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization", 2021,
    https://arxiv.org/abs/2102.11600.
    Andriushchenko & Flammarion, "Towards understanding sharpness-aware
    minimization", 2022, https://arxiv.org/abs/2206.06232.
  """
  num_steps = _validate(loss_fn, params, rho, num_steps, step_size, adaptive, eta)
  if key is None:
    key = jax.random.key(0)
  _utils.check_key(key, "worst_case_sharpness")
  return _ascent_jit(
      loss_fn=loss_fn, params=params, args=args, rho=jnp.asarray(rho),
      step_size=None if step_size is None else jnp.asarray(step_size), eta=jnp.asarray(eta),
      key=key, num_steps=num_steps, adaptive=adaptive,
  )


def m_sharpness(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    batch: PyTree,
    *args: Any,
    m: int,
    rho: Any,
    num_steps: int = 10,
    step_size: Optional[Any] = None,
    adaptive: bool = False,
    eta: Any = 0.01,
    key: Optional[jax.Array] = None,
) -> MSharpnessResult:
  r"""m-sharpness: worst-case sharpness averaged over chunks of ``m`` examples.

  .. math::
      S_m(w) = \frac{m}{B}\sum_{c=1}^{B/m}\ \max_{\lVert T^{-1}\epsilon\rVert\le\rho}
      L_{S_c}(w+\epsilon) - L_{S_c}(w),

  where :math:`S_c` are consecutive chunks of ``m`` examples along the leading
  axis of every leaf of ``batch`` and each inner maximum is estimated by
  :func:`worst_case_sharpness` (so each chunk gets its own perturbation, as in
  SAM with per-device ascent). Chunks are processed with ``jax.vmap``.

  Args:
    loss_fn: ``loss_fn(params, batch, *args) -> scalar`` (mean over the batch).
    params: Params pytree.
    batch: Pytree of arrays sharing a leading batch axis ``B``.
    *args: Extra non-batched arguments for ``loss_fn``.
    m: Chunk size; must divide ``B``.
    rho, num_steps, step_size, adaptive, eta: As in :func:`worst_case_sharpness`.
    key: Optional PRNG key (split across chunks; zero-gradient fallback only).

  Returns:
    :class:`MSharpnessResult` ``(sharpness, sam_sharpness, per_chunk)``.

  Raises:
    ValueError: If ``m`` does not divide the batch size, or for the invalid
      inputs listed in :func:`worst_case_sharpness`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.diagnostics import m_sharpness
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    >>> loss = lambda p, x: jnp.mean((x @ p["w"] - 1.0) ** 2)
    >>> res = m_sharpness(loss, {"w": jnp.zeros(2)}, x, m=2, rho=0.05, num_steps=5)
    >>> res.per_chunk.shape
    (2,)

  References:
    Foret et al., 2020, https://arxiv.org/abs/2010.01412 (Sec. 4, m-sharpness).
    Andriushchenko & Flammarion, 2022, https://arxiv.org/abs/2206.06232.
  """
  num_steps = _validate(loss_fn, params, rho, num_steps, step_size, adaptive, eta)
  m = _utils.check_int("m", m, 1, "m is the number of examples per chunk.")
  if key is None:
    key = jax.random.key(0)
  _utils.check_key(key, "m_sharpness")
  _utils.split_chunks(batch, m, "m_sharpness", "m")  # validate eagerly
  return _m_sharpness_impl(
      loss_fn=loss_fn, params=params, batch=batch, args=args, rho=jnp.asarray(rho),
      step_size=None if step_size is None else jnp.asarray(step_size), eta=jnp.asarray(eta),
      key=key, m=m, num_steps=num_steps, adaptive=adaptive,
  )


@_utils.jit_dispatch(("loss_fn", "m", "num_steps", "adaptive"))
def _m_sharpness_impl(
    *, loss_fn, params, batch, args, rho, step_size, eta, key, m, num_steps, adaptive
):
  chunks = _utils.split_chunks(batch, m, "m_sharpness", "m")
  num_chunks = jax.tree.leaves(chunks)[0].shape[0]
  keys = jax.random.split(key, num_chunks)

  def one(chunk, k):
    res = _ascent(loss_fn, params, (chunk,) + tuple(args), rho, num_steps, step_size,
                  adaptive, eta, k)
    return res.sharpness, res.sam_sharpness

  per_chunk, sam = jax.vmap(one)(chunks, keys)
  return MSharpnessResult(jnp.mean(per_chunk), jnp.mean(sam), per_chunk)
