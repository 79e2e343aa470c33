"""Where gradients are evaluated and averaged over devices.

`GradientEvaluator` calls the user's `grad_fn` (checking what it returns, splitting off the
aux, or linearizing it); `DataParallel` averages gradients over the data-parallel axis and
keeps per-device ascent states in step; `nan_unless_finite` carries a non-finite gradient into
the updates, where `skip_if_nonfinite` sees it. An ascent may ask for gradients at extra points
(`Perturbation`); `evaluate_points` evaluates them with the perturbed point, one after the
other, batched by `vmap`, or one point per device group over a mesh axis.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import control
from sam_optax._src import tree
from sam_optax._src.checks import check_float_dtypes
from sam_optax._src.checks import check_per_device

AxisName = Any  # a mapped axis name, or a tuple of them


class DataParallel:
  """Averaging over the data-parallel axis (`axis_name`); every method is the identity without
  one. The descent gradient is always averaged; the ascent gradient only for global SAM
  (`average_ascent=True`), otherwise each device perturbs with its own (m-sharpness)."""

  def __init__(self, axis_name: AxisName, average_ascent: bool | None):
    self.axis_name, self.average_ascent = axis_name, average_ascent

  def mean(self, tree_):
    """The average over the data-parallel axis (identity without one)."""
    return tree_ if self.axis_name is None else pmean(tree_, self.axis_name)

  def ascent_input(self, grads):
    """The gradient the ascent sees: averaged for global SAM, each device's own otherwise."""
    if self.axis_name is not None and not self.average_ascent:
      check_per_device(grads, self.axis_name)
    return self.mean(grads) if self.average_ascent else grads

  def synced(self, ascent_state):
    """Per-device ascents leave replicas' states apart: average their floating leaves."""
    if self.axis_name is None or self.average_ascent:
      return ascent_state
    return jax.tree.map(
        lambda x: pmean(x, self.axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        ascent_state)

  def at_varying(self, grad_fn):
    """`grad_fn` at params marked varying over the data axis: inside `shard_map`, gradients
    there are each device's own (not summed over the axis), which the averaging expects."""
    if self.axis_name is None:
      return grad_fn
    return functools.partial(at_varying_params, grad_fn, self.axis_name)


@control.eager_jit(static_argnames=("axis_name",))
def nan_unless_finite(values, gradients, *, axis_name):
  """`values`, NaN everywhere unless every tree in `gradients` has a finite norm."""
  finite = jnp.asarray(True)
  for grads_ in gradients:
    finite = finite & jnp.isfinite(tree.norm(grads_, axis_name=axis_name))
  return jax.tree.map(lambda v: jnp.where(finite, v, jnp.nan).astype(v.dtype), values)


def pmean(tree_, axis_name):
  try:
    return jax.lax.pmean(tree_, axis_name)
  except NameError as error:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound here: a transformation built with axis_name "
        f"must be updated inside jax.pmap(..., axis_name={axis_name!r}) or a shard_map over "
        f"that mesh axis. Under plain jax.jit (with or without sharded arrays) build it "
        f"without axis_name.") from error


def at_varying_params(grad_fn, axis_name, params, *rest):
  """`grad_fn` evaluated at `params` marked varying over the data axis (see `tree.vary`)."""
  return grad_fn(tree.vary(params, axis_name), *rest)


class GradientEvaluator:
  """Calls the user's grad_fn, checks what it returns, and splits off the aux."""

  def __init__(self, grad_fn, has_aux, params):
    self._grad_fn, self._has_aux, self._params = grad_fn, has_aux, params

  def grads_only(self, params):
    """grad_fn without its aux: what an ascent that evaluates gradients itself receives."""
    return self(params)[0]

  def __call__(self, perturbed_params):
    out = self._grad_fn(perturbed_params)
    if self._has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("With has_aux=True, grad_fn must return a pair (grads, aux), e.g. "
                         "jax.grad(loss, has_aux=True).")
      grads, aux = out
    else:
      if _looks_like_grads_and_aux(out, self._params):
        raise ValueError(
            "grad_fn returned a pair (grads, aux), but this transformation was built without "
            "has_aux=True, so it takes grad_fn's output for the gradient. Build it with "
            "has_aux=True (e.g. sam_optax.sam(optax.sgd(0.1), has_aux=True)) and read the aux "
            "with tx.update_with_aux, or return the gradient alone (jax.grad without "
            "has_aux).")
      grads, aux = out, None
    tree.check_same_structure(self._params, grads, what="The output of grad_fn")
    check_float_dtypes(self._params, grads, what="The output of grad_fn")
    return grads, aux

  def linearized(self, params, clean_grads, eps):
    """`(g + H(params) eps, aux at params, grad_fn's value at params)`: one forward-over-reverse
    Hessian-vector product."""
    (grads, aux), (hessian_eps, _) = jax.jvp(self, (params,), (optax.tree.cast_like(eps, params),))
    return tree.add(clean_grads, hessian_eps), aux, grads


def _looks_like_grads_and_aux(out, params):
  """Whether `out` is a pair whose first entry, not `out` itself, is shaped like `params`."""
  if not (isinstance(out, tuple) and len(out) == 2):
    return False
  structure = jax.tree.structure(params)
  return jax.tree.structure(out) != structure and jax.tree.structure(out[0]) == structure


def masked_grad_fn(grad_fn, mask_tree, params):
  """`grad_fn` as a function of the masked leaves (the others held at `params`)."""
  def masked(point):
    full = jax.tree.map(lambda keep, p, q: q if keep else p, mask_tree, params, point)
    return jax.tree.map(lambda keep, g: g if keep else optax.MaskedNode(), mask_tree,
                        grad_fn(full))
  return masked


# ------------------------------------------------------------------ gradients at several points


POINT_EVALUATIONS = ("sequential", "vmap")


class Perturbation(NamedTuple):
  r"""What an ascent may return instead of `eps`: the perturbation, extra points, a carry.

  .. math::
    g^{adv} = \nabla L(w + \epsilon), \qquad
    h_j = \nabla L(w + p_j) \quad (j = 1..k)

  The engine evaluates `grad_fn` at `w + eps` (the perturbed point, whose gradient is `g_adv`)
  and at every `w + points[j]`, together (`point_evaluation`: one after the other, batched by
  `vmap`, or one point per device group), and hands the gradients at the extra points to the
  correction as the keyword `point_grads` (a tuple, in the order of `points`, averaged over the
  data-parallel axis like `g_adv`). `carry` is any tree the ascent computed and the correction
  needs (e.g. intermediate gradients of a multi-step ascent), handed to it as the keyword
  `ascent_carry`. Both live for this step only, outside the state: a correction that needs one
  later keeps it in its own state. One-call form only (the engine evaluates the points with
  `grad_fn`, and the two-call form's correction runs in the next call).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> out = sam_optax.Perturbation(eps={'w': jnp.zeros(2)}, points=({'w': jnp.ones(2)},))
    >>> len(out.points)
    1

  References:
    Xie, Pethick & Cevher, *SAMPa: Sharpness-aware Minimization Parallelized*, NeurIPS 2024,
    https://arxiv.org/abs/2410.10683
  """
  eps: Any              # tree like params: the perturbation.
  points: tuple = ()    # offsets from the params (trees like params) of the extra points.
  carry: Any = None     # any tree handed to the correction this step (`ascent_carry=`).


def check_point_evaluation(evaluation: str, point_axis_name: AxisName) -> None:
  """Checks `point_evaluation` and `point_axis_name` at construction."""
  if evaluation not in POINT_EVALUATIONS:
    raise ValueError(f"point_evaluation must be one of {POINT_EVALUATIONS}, got "
                     f"{evaluation!r} (for one point per device group, name the mesh axis "
                     f"with point_axis_name=...).")


def evaluate_points(evaluate: GradientEvaluator, points: list, evaluation: str,
                    point_axis_name: AxisName):
  """`grad_fn` at each of `points` (absolute params; the first is the perturbed point).

  Returns `(grads, aux)`: the list of gradients, in the order of `points`, and the aux at the
  first point. `"sequential"` calls `grad_fn` once per point; `"vmap"` stacks the points and
  maps `grad_fn` over them, one batched pass. With `point_axis_name` (a `shard_map` mesh axis of
  size `len(points)`) each device group evaluates the point of its index along the axis and the
  gradients are exchanged by one `psum`: every device ends with all of them, invariant over the
  axis.
  """
  if len(points) == 1:
    grads, aux = evaluate(points[0])
    return [grads], aux
  if point_axis_name is not None:
    return _evaluate_across(evaluate, points, point_axis_name)
  if evaluation == "sequential":
    outs = [evaluate(p) for p in points]
    return [g for g, _ in outs], outs[0][1]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *points)
  grads, aux = jax.vmap(evaluate)(stacked)
  first = lambda t: jax.tree.map(lambda x: x[0], t)
  return [jax.tree.map(lambda x, j=j: x[j], grads) for j in range(len(points))], first(aux)


def _evaluate_across(evaluate, points, axis_name):
  """One point per device group along `axis_name`, exchanged by a psum of one-hot slots."""
  try:
    size = jax.lax.axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
  except NameError as error:
    raise ValueError(
        f"point_axis_name={axis_name!r} is not bound here: update the transformation inside "
        f"a shard_map (or pmap) over a mesh axis {axis_name!r} of size {len(points)}, each "
        f"device group taking one point.") from error
  if size != len(points):
    raise ValueError(f"point_axis_name={axis_name!r} has size {size}, but this step evaluates "
                     f"{len(points)} points (the perturbed point and the extra ones): the axis "
                     f"must have exactly one device group per point.")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *points)
  grads, aux = evaluate(jax.tree.map(lambda x: x[index], stacked))

  def slot(x, j):
    # Each device fills its own slot and zeros elsewhere; the psum hands every device all of
    # them (summed in the value's dtype: the other terms are exact zeros).
    kind = x.dtype
    x = x.astype(jnp.int32) if kind == jnp.bool_ else x
    out = jax.lax.psum(jnp.where(index == j, x, jnp.zeros_like(x)), axis_name)
    return out.astype(kind)

  all_grads = [jax.tree.map(lambda g, j=j: slot(g, j), grads) for j in range(len(points))]
  return all_grads, jax.tree.map(lambda a: slot(jnp.asarray(a), 0), aux)
