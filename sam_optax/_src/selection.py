"""Data selection: ESAM's sharpness-sensitive `grad_fn`, and K-SAM's top-k sub-batch."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp


def example_count(examples: Any, name: str) -> int:
  """The size of the leading example axis that every leaf of `examples` shares (checked)."""
  leaves = jax.tree.leaves(examples)
  if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
    raise ValueError(f"{name} must be a tree of arrays with a leading example axis.")
  sizes = {jnp.shape(x)[0] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(f"every leaf of {name} must share the leading example axis; got leading "
                     f"sizes {sorted(sizes)}.")
  return sizes.pop()


def sharpness_sensitive_grad_fn(per_example_loss: Callable[[Any, Any], jax.Array], params: Any,
                                batch: Any, gamma: float = 0.5, *,
                                clean_losses: jax.Array | None = None) -> Callable[[Any], Any]:
  r"""ESAM's data selection: the perturbed gradient on the examples whose loss rose most.

  Returns a `grad_fn` for the one-call form of any variant (ESAM's pairing is
  `sam_optax.esam`): at the perturbed params `w + eps` it evaluates the per-example losses
  (forward only), keeps the `k = ceil(gamma n)` examples with the largest increase over the
  clean losses at `w`,

  .. math::
    B^+ = \operatorname{top}_k \big(\ell_i(w + \epsilon) - \ell_i(w)\big), \qquad
    g_{adv} = \nabla \frac{1}{k} \sum_{i \in B^+} \ell_i (w + \epsilon),

  and differentiates the mean loss over those only, so the backward pass runs on a `gamma`
  fraction of the batch (the authors' code keeps the examples strictly above the k-th largest
  increase; here exactly `k`). `k` is static, so shapes are fixed under `jax.jit`.

  Args:
    per_example_loss: `(params, batch) -> losses`, a vector with one loss per example (the
      batch's leading axis).
    params: the clean params `w` (for the clean losses when `clean_losses` is None).
    batch: the batch, a tree of arrays with a leading example axis.
    gamma: the fraction of examples kept, a Python float in (0, 1] (paper 0.5).
    clean_losses: the per-example losses at `w` if the caller already has them (e.g. from the
      clean gradient's forward pass), else they are computed here.

  Returns:
    `grad_fn(params) -> grads`, for `tx.update(grads, state, params, grad_fn=...)`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_i = lambda p, b: (b[0] @ p['w'] - b[1]) ** 2
    >>> params = {'w': jnp.ones(3)}
    >>> batch = (jnp.eye(4, 3), jnp.arange(4.0))
    >>> grad_fn = sam_optax.sharpness_sensitive_grad_fn(loss_i, params, batch, gamma=0.5)
    >>> tx = sam_optax.esam(optax.sgd(0.1), rho=0.05, beta=0.6)
    >>> grads = jax.grad(lambda p: loss_i(p, batch).mean())(params)
    >>> updates, state = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)

  References:
    Du et al., *Efficient Sharpness-aware Minimization for Improved Training of Neural
    Networks*, ICLR 2022, https://arxiv.org/abs/2110.03141
  """
  if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 < gamma <= 1:
    raise ValueError(f"gamma must be a Python float in (0, 1] (the fraction of the batch kept; "
                     f"it fixes the selected batch's shape), got {gamma!r}.")
  leaves = jax.tree.leaves(batch)
  if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
    raise ValueError("batch must be a tree of arrays with a leading example axis.")
  n = leaves[0].shape[0]
  k = max(1, math.ceil(gamma * n))
  before = per_example_loss(params, batch) if clean_losses is None else clean_losses
  before = jax.lax.stop_gradient(before)
  if jnp.shape(before) != (n,):
    raise ValueError(f"per_example_loss must return one loss per example, shape ({n},); got "
                     f"{jnp.shape(before)}.")

  def grad_fn(perturbed):
    after = jax.lax.stop_gradient(per_example_loss(perturbed, batch))
    _, chosen = jax.lax.top_k(after - before, k)
    subset = jax.tree.map(lambda x: jnp.take(x, chosen, axis=0), batch)
    return jax.grad(lambda p: jnp.mean(per_example_loss(p, subset)))(perturbed)

  return grad_fn


def top_k_examples(per_example_loss: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
                   k: int) -> Any:
  r"""K-SAM's data selection: the sub-batch of the `k` examples with the highest loss.

  One forward pass over the batch gives the per-example losses at `w` (under
  `stop_gradient`: the selection is not differentiated); the `k` largest are kept, in
  decreasing order of loss,

  .. math::
    B_k = \operatorname{top}_k \big(\ell_i(w)\big)_{i \in B}, \qquad
    g = \nabla \frac{1}{k} \sum_{i \in B_k} \ell_i(w), \qquad
    d = \nabla \frac{1}{k} \sum_{i \in B_k} \ell_i(w + \epsilon),

  and any variant then takes both of its passes on `B_k`: the caller's clean gradient and the
  `grad_fn` both use the returned sub-batch (with `sam_optax.sam`, this is K-SAM). A step then
  costs one forward pass on the full batch plus the variant's gradients on `k` examples, instead
  of on the whole batch.

  Source: the paper's abstract (arXiv:2210.12864): "compute gradients in both stages of SAM on
  only the top-k samples with highest loss"; third-party summaries agree, and mention the extra
  forward pass over the full batch. The method section (how the paper chooses `k`) could not be
  read: `k` is the caller's choice here, one static value for both stages. Ties go to the
  lower index (`jax.lax.top_k`). A non-finite loss (NaN, either infinity) ranks above every
  finite one, so a broken example is always selected and the gradients on the sub-batch are
  non-finite too: never a silently clean step (see `skip_if_nonfinite`).

  Args:
    per_example_loss: `(params, batch) -> losses`, a vector with one loss per example (the
      batch's leading axis).
    params: the params `w` at which the losses are ranked (the clean point).
    batch: the batch, a tree of arrays sharing a leading example axis of size `n`.
    k: how many examples to keep, a Python int in `[1, n]`; static, so the sub-batch's shapes
      are fixed under `jax.jit`.

  Returns:
    The sub-batch: `batch` with each leaf indexed by the `k` selected examples along its
    leading axis (same tree structure and dtypes; leading axis `k`).

  Raises:
    ValueError: `k` is not an int in `[1, n]`, the batch has no arrays or leaves whose leading
      axes differ, or `per_example_loss` does not return shape `(n,)`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_i = lambda p, b: (b[0] @ p['w'] - b[1]) ** 2
    >>> params = {'w': jnp.ones(3)}
    >>> batch = (jnp.eye(4, 3), jnp.arange(4.0))
    >>> sub = sam_optax.top_k_examples(loss_i, params, batch, k=2)
    >>> sub[1]  # the targets of the two worst-fitted examples
    Array([3., 0.], dtype=float32)
    >>> loss = lambda p, b: loss_i(p, b).mean()
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05)
    >>> updates, state = tx.update(jax.grad(loss)(params, sub), tx.init(params), params,
    ...                            grad_fn=lambda p: jax.grad(loss)(p, sub))

  References:
    Ni et al., *K-SAM: Sharpness-Aware Minimization at the Speed of SGD*, 2022,
    https://arxiv.org/abs/2210.12864
  """
  n = example_count(batch, "batch")
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
    raise ValueError(f"k must be a Python int in [1, {n}] (the number of examples kept, out of "
                     f"the batch's {n}; it fixes the sub-batch's shape), got {k!r}.")
  losses = jax.lax.stop_gradient(per_example_loss(params, batch))
  if jnp.shape(losses) != (n,):
    raise ValueError(f"per_example_loss must return one loss per example, shape ({n},); got "
                     f"{jnp.shape(losses)}.")
  # A non-finite loss ranks first, whatever its sign: XLA orders a NaN by its sign bit, and the
  # NaN of an invalid operation is negative on x86, so it would otherwise sort last and drop the
  # broken example from both passes without a trace.
  key = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
  _, chosen = jax.lax.top_k(key, int(k))
  return jax.tree.map(lambda x: jnp.take(x, chosen, axis=0), batch)
