"""Equinox integration: the perturbed pass's gradient function for an `eqx.Module`.

Equinox is an optional dependency of `sam_optax`; this module needs it (`pip install
"sam_optax[equinox]"`) and is not imported by `import sam_optax`::

  import sam_optax.equinox

An Equinox model is a pytree that mixes arrays (the params) with everything else (activation
functions, static fields). Optax sees only the arrays, `eqx.filter(model, eqx.is_inexact_array)`,
with `None` in place of the rest; a sharpness-aware transformation hands that same filtered tree,
moved to `params + eps`, to `grad_fn`. Calling the model it describes fails (`'NoneType' object
is not callable`, the activation being `None`): `grad_fn` must put the non-array part back with
`eqx.combine` first. `filter_grad_fn` does that.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

try:
  import equinox as eqx
except ImportError as error:  # pragma: no cover - exercised only without equinox installed
  raise ImportError(
      "sam_optax.equinox needs Equinox: install it with `pip install 'sam_optax[equinox]'` (or "
      "`pip install equinox`). The rest of sam_optax works without it.") from error

__all__ = ["filter_grad_fn"]


def filter_grad_fn(
    loss_fn: Callable[..., Any],
    model: Any,
    *args: Any,
    has_aux: bool = False,
    filter_spec: Any = eqx.is_inexact_array,
    **kwargs: Any,
) -> Callable[[Any], Any]:
  r"""The gradient function a sharpness-aware transformation calls, for an Equinox model.

  .. math::
    \mathrm{grad\_fn}(p) = \nabla_p\, \mathrm{loss\_fn}\big(\mathrm{combine}(p, s),
    \ldots\big), \qquad (\cdot, s) = \mathrm{partition}(\mathrm{model}, \mathrm{filter\_spec})

  The transformation evaluates it at `params + eps`, where `params = eqx.filter(model,
  filter_spec)` is the tree you hand to `tx.init` and `tx.update`: the model's arrays with
  `None` elsewhere. The function puts the static part `s` of `model` (activations, non-array
  fields, and with a narrower `filter_spec` the frozen arrays) back before calling `loss_fn`,
  and differentiates with respect to the filtered arrays only, so its gradient has the
  params' structure.

  Args:
    loss_fn: `loss_fn(model, *args, **kwargs) -> loss` (a scalar), or `(loss, aux)` with
      `has_aux=True`: the function you would hand to `eqx.filter_grad`.
    model: the model (any pytree, usually an `eqx.Module`); only its non-params part is read.
    *args: the other arguments of `loss_fn` (e.g. the batch), fixed for the perturbed pass.
    has_aux: whether `loss_fn` returns `(loss, aux)`; the function then returns
      `(grads, aux)`, which a transformation built with `has_aux=True` takes.
    filter_spec: which leaves are params, as for `eqx.partition` (default
      `eqx.is_inexact_array`, the floating-point arrays). It must select floating-point arrays
      only: a sharpness-aware step cannot perturb integers.
    **kwargs: keyword arguments of `loss_fn`.

  Returns:
    A function `params -> grads` (or `(grads, aux)`) for `tx.update(..., grad_fn=...)`.

  Raises:
    TypeError: `loss_fn` is not callable.
    ValueError: `filter_spec` selects a leaf that is not a floating-point array.

  Example:
    >>> import jax, jax.numpy as jnp, optax, equinox as eqx
    >>> import sam_optax, sam_optax.equinox
    >>> model = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.key(0))
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> loss = lambda m, x, y: jnp.mean((jax.vmap(m)(x) - y) ** 2)
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05)
    >>> params, static = eqx.partition(model, eqx.is_inexact_array)
    >>> state = tx.init(params)
    >>> grads = eqx.filter_grad(loss)(model, x, y)
    >>> updates, state = tx.update(
    ...     grads, state, params, grad_fn=sam_optax.equinox.filter_grad_fn(loss, model, x, y))
    >>> model = eqx.apply_updates(model, updates)
    >>> bool(loss(model, x, y) < loss(eqx.combine(params, static), x, y))
    True

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412; Kidger & Garcia, *Equinox: neural networks in
    JAX via callable PyTrees and filtered transformations*, 2021,
    https://arxiv.org/abs/2111.00254
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be a function (model, *args) -> loss, got "
                    f"{type(loss_fn).__name__}.")
  params, static = eqx.partition(model, filter_spec)
  not_float = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(params) if not eqx.is_inexact_array(leaf)]
  if not_float:
    raise ValueError(
        f"filter_spec selected leaves that are not floating-point arrays: "
        f"{', '.join(not_float[:5])}{' ...' if len(not_float) > 5 else ''}. A sharpness-aware "
        f"step perturbs and differentiates floating-point arrays only: use "
        f"eqx.is_inexact_array (the default), and the same filter for tx.init and tx.update.")

  def at(perturbed):
    return loss_fn(eqx.combine(perturbed, static), *args, **kwargs)

  return jax.grad(at, has_aux=has_aux)
