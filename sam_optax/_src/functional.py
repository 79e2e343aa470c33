"""Functional-SAM: the perturbed gradient along the network's function only."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_optax._src import tree


def functional_grad_fn(apply_fn: Callable[[Any], Any], output_loss: Callable[[Any], jax.Array],
                       params: Any, *, output_grads: Any = None,
                       has_aux: bool = False) -> Callable[[Any], Any]:
  r"""Functional-SAM: the perturbed pass with the loss's derivative frozen at the clean point.

  Split the training loss into the network's outputs `F(w)` (`apply_fn`, e.g. the logits) and
  the loss of those outputs `l(F)` (`output_loss`), so `L(w) = l(F(w))`. SAM's perturbed gradient
  `J_F(w + eps)^T \nabla l(F(w + eps))` moves both factors; Functional-SAM keeps the first (the
  "functional path") and evaluates the loss's derivative at the clean outputs:

  .. math::
    \delta = \nabla_F\, l\big(F(w)\big), \qquad
    d = J_F(w + \epsilon)^\top \delta,

  with `eps` from the variant's ascent (`eps = rho g/||g||` with `sam_optax.sam`, which is the
  paper's Functional-SAM; any other variant's ascent composes the same way). This returns the
  `grad_fn` for the perturbed pass: one forward pass and one vector-Jacobian product at
  `w + eps`, as SAM's. Two properties follow from the rule: when `l` is linear in `F`,
  `delta` does not depend on the point and `d` is SAM's perturbed gradient; when `F` is linear
  in `w`, the Jacobian does not depend on the point and `d = g`, the clean gradient. A variant
  that evaluates more gradients through `grad_fn` (e.g. `usam2`, `multistep_sam`) gets each of
  them with the same `delta`. The two-call form has no `grad_fn`: there, build this at the
  clean params and call it at the perturbed ones for the second call's gradient. `grad_fn`
  takes the params only, so it does not combine with `chunk_size` (m-sharpness).

  Source: what could be read of the paper is its abstract (arXiv, PMLR): Functional-SAM
  regularizes curvature through the statistics of the network's function only, not through
  changes of the logits' statistics, which the authors find dominate SAM on language tasks.
  A reviewer's summary (OpenReview, mirrored on paperhub.cn) adds that the paper splits the
  gradient of the gradient norm into a functional and a logit part and keeps the functional
  one. The formula above is a third-party summary's (junaidaliop/zij), and a third-party
  PyTorch reimplementation computes the same (the logits' gradient at the clean point, a VJP
  of the network at the perturbed point); the paper's method section could not be read. Its
  second proposal, preconditioning the perturbation, is not implemented (rule not readable).

  Cost: `delta` needs the outputs at `w`. Without `output_grads`, one extra forward pass at `w`
  computes them here; pass `output_grads` to reuse the clean pass instead (see the example,
  which takes `g` and `delta` from one forward pass and one VJP at `w`).

  Args:
    apply_fn: `params -> outputs`, the network's outputs on the batch (close over the batch,
      the dropout key, ...). The outputs are a float array or a tree of them. With
      `has_aux=True`, `params -> (outputs, aux)` (e.g. Flax's updated batch statistics).
    output_loss: `outputs -> loss`, a scalar (close over the labels).
    params: the clean params `w`, where `delta` is taken.
    output_grads: `delta` if the caller already has it (e.g. from the clean pass), a tree
      shaped like the outputs; it is cast to the outputs' dtypes. Default: computed here.
    has_aux: whether `apply_fn` returns `(outputs, aux)`; the returned `grad_fn` then returns
      `(grads, aux)` with the aux of the perturbed forward pass, for a variant built with
      `has_aux=True`.

  Returns:
    `grad_fn(params) -> grads` (or `(grads, aux)`), for `tx.update(grads, state, params,
    grad_fn=...)` of any variant.

  Raises:
    TypeError: `apply_fn` or `output_loss` is not callable, or the outputs are not floats.
    ValueError: `output_loss` does not return a scalar, `apply_fn` does not return a pair with
      `has_aux=True`, or `output_grads` is not shaped like the outputs.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 1, 0])
    >>> apply_fn = lambda p: jnp.tanh(x @ p['w1']) @ p['w2']  # the logits
    >>> output_loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(
    ...     logits, y).mean()
    >>> params = {'w1': jnp.full((3, 5), 0.1), 'w2': jnp.full((5, 2), 0.1)}
    >>> logits, pullback = jax.vjp(apply_fn, params)  # the clean pass: one forward
    >>> delta = jax.grad(output_loss)(logits)         # dl/dF at w
    >>> grads, = pullback(delta)                      # g, one backward
    >>> grad_fn = sam_optax.functional_grad_fn(apply_fn, output_loss, params,
    ...                                        output_grads=delta)
    >>> tx = sam_optax.sam(optax.adamw(1e-3), rho=0.05)
    >>> updates, state = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)

  References:
    Singh, Mobahi, Agarwala & Dauphin, *Avoiding spurious sharpness minimization broadens
    applicability of SAM*, ICML 2025, https://arxiv.org/abs/2502.02407
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be a function params -> outputs, got {apply_fn!r}.")
  if not callable(output_loss):
    raise TypeError(f"output_loss must be a function outputs -> scalar loss, got "
                    f"{output_loss!r}.")
  if not isinstance(has_aux, bool):
    raise TypeError(f"has_aux must be a bool, got {has_aux!r}.")

  def outputs_of(out):
    if not has_aux:
      return out
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError("With has_aux=True, apply_fn must return a pair (outputs, aux).")
    return out[0]

  shapes = outputs_of(jax.eval_shape(apply_fn, params))
  for path, leaf in jax.tree.leaves_with_path(shapes):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"apply_fn's outputs must be floats (they are differentiated), got "
                      f"{leaf.dtype} at {jax.tree_util.keystr(path)}.")
  loss_shape = jax.eval_shape(output_loss, shapes)
  if not (isinstance(loss_shape, jax.ShapeDtypeStruct) and loss_shape.shape == ()):
    raise ValueError(f"output_loss must return a scalar loss (e.g. the batch mean), got "
                     f"{jax.tree.map(lambda s: s.shape, loss_shape)}.")

  if output_grads is None:
    delta = jax.grad(output_loss)(outputs_of(apply_fn(params)))
  else:
    tree.check_same_structure(shapes, output_grads, what="output_grads",
                              reference_name="the outputs of apply_fn")
    delta = jax.tree.map(lambda d, s: jnp.asarray(d).astype(s.dtype), output_grads, shapes)
  delta = jax.lax.stop_gradient(delta)

  def grad_fn(perturbed):
    if has_aux:
      _, pullback, aux = jax.vjp(apply_fn, perturbed, has_aux=True)
      return pullback(delta)[0], aux
    _, pullback = jax.vjp(apply_fn, perturbed)
    return pullback(delta)[0]

  return grad_fn

