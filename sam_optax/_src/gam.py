"""GAM's pieces: an ascent that evaluates two gradients itself, and the correction mixing four.

Accelerated GAM (Zhang et al.'s Algorithm 2) takes four gradients per step: the caller's `g0`,
two inside the ascent (`g1` at a SAM step from `w`, `g2` at a step along `g1 - g0`), and the
engine's perturbed one `g3` at `w2 + rho' g2/||g2||`. The ascent hands `g1` and `g2` to the
correction through the engine's transient channel (a `Perturbation`'s `carry`, received as the
keyword `ascent_carry`), so that they live for one step and never in the optimizer state.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree
from sam_optax._src.ascents import _ascent
from sam_optax._src.ascents import _check_gradient_access
from sam_optax._src.ascents import _increment
from sam_optax._src.corrections import CorrectionCountState
from sam_optax._src.corrections import _correction
from sam_optax._src.evaluation import Perturbation
from sam_optax._src.evaluation import nan_unless_finite
from sam_optax._src.hyperparams import ScalarOrSchedule
from sam_optax._src.hyperparams import _concrete
from sam_optax._src.hyperparams import check_hparam
from sam_optax._src.hyperparams import value_at

H_MINUS_FORMS = ("paper", "code")


class GamCarry(NamedTuple):
  """What `gam_ascent` hands `gam_correction` for one step (never kept in the state)."""
  grads_at_first: Any   # tree like params: g1 = grad L(w + rho' g0/||g0||).
  grads_at_second: Any  # tree like params: g2 = grad L(w + rho h0/||h0||), h0 = g1 - g0.


def _may_vanish(*radii: ScalarOrSchedule) -> bool:
  """Whether one of the radii may be zero at run time (zero, a schedule or a traced value)."""
  for value in radii:
    concrete = None if callable(value) else _concrete(value)
    if concrete is None or concrete <= 0:
      return True
  return False


def gam_ascent(rho: ScalarOrSchedule = 0.2, rho_prime: ScalarOrSchedule = 0.03
               ) -> optax.GradientTransformationExtraArgs:
  r"""Accelerated GAM's ascent: two gradients of its own, then the point of the third.

  .. math::
    g_1 = \nabla L\Big(w + \rho' \frac{g_0}{\|g_0\|}\Big), \quad h_0 = g_1 - g_0, \quad
    w_2 = w + \rho \frac{h_0}{\|h_0\|}, \quad g_2 = \nabla L(w_2),

    \epsilon = \rho \frac{h_0}{\|h_0\|} + \rho' \frac{g_2}{\|g_2\|}

  with `g0` the clean gradient it is handed; the engine then evaluates
  `g3 = grad L(w + eps) = grad L(w2 + rho' g2/||g2||)`. `h0` is a finite-difference estimate of
  `rho' H g0/||g0|| = rho' grad ||grad L||(w)`, so `w2` ascends the gradient norm without a
  Hessian-vector product. `g1` and `g2` are returned in the `Perturbation`'s `carry` (a `GamCarry`)
  for `sam_optax.gam_correction`, for this step only. Each `x/||x||` is 0 where `x = 0` (the
  authors add 1e-12 to the norm instead). When a radius may be zero at run time (0, a
  schedule, an injected value), a point that coincides with `w` (a zero offset) takes `g0`
  itself as its gradient, so that `rho = rho' = 0` hands the clean gradient on bit for bit.
  `g1`, `g2` come from the engine's `grad_fn` keyword: one-call form only.

  Args:
    rho: the radius of the step along `h0` (the code's `grad_norm_rho`, 0.2), >= 0; a float or
      a schedule of the step count.
    rho_prime: the radius of the two SAM steps, along `g0` and `g2` (the code's `grad_rho`,
      0.03 for ResNets on CIFAR-10, 0.02 on CIFAR-100), >= 0; a float or a schedule.

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs`) returning a
    `Perturbation(eps, carry=GamCarry(g1, g2))`; its `update` needs the keyword `grad_fn`
    (params -> grads), which the engine supplies.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> loss = lambda p: jnp.sum(jnp.cos(p['w']))
    >>> params = {'w': jnp.array([0.5, -1.0])}
    >>> ascent = sam_optax.gam_ascent(rho=0.2, rho_prime=0.03)
    >>> out, _ = ascent.update(jax.grad(loss)(params), ascent.init(params), params,
    ...                        grad_fn=jax.grad(loss))
    >>> len(out.carry)  # g1 and g2, for the correction
    2

  References:
    Zhang, Xu, Yu, Zou & Cui, *Gradient Norm Aware Minimization Seeks First-Order Flatness and
    Improves Generalization*, CVPR 2023, https://arxiv.org/abs/2303.03108 (Algorithm 2;
    code https://github.com/xxgege/GAM, `gam/gam.py`)
  """
  rho = check_hparam("rho", rho, hint="rho is the radius of GAM's step along g1 - g0.")
  rho_prime = check_hparam("rho_prime", rho_prime,
                           hint="rho_prime is the radius of GAM's SAM steps along g0 and g2.")
  exact_at_zero = _may_vanish(rho, rho_prime)

  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, state, params=None, *, grad_fn=None, count=None, param_axis_name=None,
             **extra):
    del extra
    grad_fn = _check_gradient_access("gam_ascent", grad_fn, params)
    assert params is not None  # _check_gradient_access raised otherwise
    step = jnp.zeros([], jnp.int32) if count is None else count
    radius, radius_prime = value_at(rho, step), value_at(rho_prime, step)

    def unit_step(r, x):
      """`(r/||x||) x` and its factor (0 where x = 0)."""
      factor = r * tree.safe_inverse(tree.norm(x, axis_name=param_axis_name))
      return tree.scale(factor, x), factor

    def gradient_at(offset, factor):
      """grad L(w + offset); at a zero offset (a zero factor) `g0` itself when a radius may
      vanish, since the point is `w`."""
      out = grad_fn(tree.add(params, offset))
      if not exact_at_zero:
        return out
      return tree.select(factor == 0, grads, out)

    g0 = tree.in_accumulation_dtype(grads)
    first, factor = unit_step(radius_prime, g0)
    g1 = gradient_at(first, factor)
    h0 = optax.tree.sub(tree.in_accumulation_dtype(g1), g0)
    second, factor = unit_step(radius, h0)
    g2 = gradient_at(second, factor)
    third, _ = unit_step(radius_prime, tree.in_accumulation_dtype(g2))
    eps = optax.tree.cast_like(optax.tree.add(second, third), params)
    return Perturbation(eps=eps, carry=GamCarry(grads_at_first=g1, grads_at_second=g2)), state

  return _ascent(init, update)


def _check_h_minus(h_minus: Any) -> str:
  """`h_minus`, checked at construction: the string 'paper' or 'code'."""
  if not isinstance(h_minus, str):
    raise TypeError(f"h_minus must be the string 'paper' or 'code', got "
                    f"{type(h_minus).__name__} (it is structural: under "
                    f"optax.inject_hyperparams it stays a Python string).")
  if h_minus not in H_MINUS_FORMS:
    raise ValueError(f"h_minus must be 'paper' (h- = beta g0 + (1 - beta) g2, Algorithm 2) or "
                     f"'code' (h- = g0 + (1 - beta) g2, the official code), got {h_minus!r}.")
  return h_minus


def gam_correction(alpha: ScalarOrSchedule = 0.1, beta: ScalarOrSchedule = 0.1,
                   gamma: ScalarOrSchedule = 0.05,
                   h_minus: Literal["paper", "code"] = "paper"
                   ) -> optax.GradientTransformationExtraArgs:
  r"""Accelerated GAM's descent: two mixtures of the four gradients, one decomposed on the other.

  .. math::
    h_+ = \alpha g_1 + (1 - \alpha) g_3, \qquad
    h_- = \beta g_0 + (1 - \beta) g_2 \;\text{(paper)}\;\text{ or }\; g_0 + (1 - \beta) g_2
    \;\text{(code)},

    h_{-,\perp} = h_- - \frac{\langle h_-, h_+\rangle}{\|h_+\|^2} h_+, \qquad
    d = h_+ - \gamma\, h_{-,\perp}

  with `g0` the clean gradient (`clean_grads`), `g3` the perturbed one (its updates), and `g1`,
  `g2` from `sam_optax.gam_ascent`'s carry (the keyword `ascent_carry`). `h_minus="paper"`
  follows the paper's Algorithm 2; `"code"` the official code (`gam/gam.py`,
  `gradient_decompose`: `pro_m = g_0 + |grad_beta_2| g_2` with `grad_beta_2 = 1 - beta`,
  coefficient 1 on `g0`). The projection coefficient is 0 where `h+ = 0` (the code adds 1e-12
  to the norms instead). Computed as `h+ = g3 + alpha (g1 - g3)` and `h-_perp = delta -
  (<delta, h+>/||h+||^2) h+` with `delta = h- - h+` (the same vectors), so that four equal
  gradients give `d = g3` bit for bit in the paper's form. A non-finite `g1` or `g2` makes `d`
  NaN (for `skip_if_nonfinite`). On a step without the perturbed pass the direction is the
  gradient handed in.

  Args:
    alpha: the weight of `g1` in `h+`, in [0, 1] (the code's `grad_beta_1`: 0.1 for ResNets on
      CIFAR-10, 0.6 on CIFAR-100); a float or a schedule of the count of GAM steps.
    beta: the weight of `g0` in `h-` (paper), in [0, 1] (the code's `grad_beta_0`: 0.1 on
      CIFAR-10, 0.5 on CIFAR-100); a float or a schedule.
    gamma: the weight of the orthogonal component, >= 0 (the code's `grad_gamma`: 0.05 on
      CIFAR-10, 0.03 on CIFAR-100); a float or a schedule.
    h_minus: `"paper"` or `"code"` (see above).

  Returns:
    A descent correction (`optax.GradientTransformationExtraArgs`) whose state is a
    `CorrectionCountState`.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> fix = sam_optax.gam_correction(alpha=0.5, beta=0.5, gamma=1.0)
    >>> g = lambda *x: {'w': jnp.array(x)}
    >>> carry = sam_optax.GamCarry(grads_at_first=g(2.0, 0.0), grads_at_second=g(0.0, 2.0))
    >>> d, _ = fix.update(g(2.0, 0.0), fix.init(None), None, clean_grads=g(0.0, 2.0),
    ...                   ascent_carry=carry)
    >>> d['w']  # h+ = (2, 0), h- = (0, 2): d = h+ - h-
    Array([ 2., -2.], dtype=float32)

  References:
    Zhang, Xu, Yu, Zou & Cui, *Gradient Norm Aware Minimization Seeks First-Order Flatness and
    Improves Generalization*, CVPR 2023, https://arxiv.org/abs/2303.03108 (Algorithm 2;
    code https://github.com/xxgege/GAM, `gam/gam.py`)
  """
  alpha = check_hparam("alpha", alpha, high=1.0, hint="alpha weighs g1 against g3 in h+.")
  beta = check_hparam("beta", beta, high=1.0, hint="beta weighs g0 against g2 in h-.")
  gamma = check_hparam("gamma", gamma,
                       hint="gamma weighs the part of h- orthogonal to h+ (e.g. 0.05).")
  paper = _check_h_minus(h_minus) == "paper"

  def init(params):
    del params
    return CorrectionCountState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, clean_grads, ascent_carry=None, perturbed=True,
             param_axis_name=None, **extra):
    del params, extra
    if not perturbed:
      return updates, state
    if not isinstance(ascent_carry, GamCarry):
      raise ValueError("gam_correction reads g1 and g2 from gam_ascent's carry (the keyword "
                       "ascent_carry): build them together (sam_optax.gam does), in the "
                       "one-call form.")
    g0, g3 = tree.in_accumulation_dtype(clean_grads), tree.in_accumulation_dtype(updates)
    g1 = tree.in_accumulation_dtype(ascent_carry.grads_at_first)
    g2 = tree.in_accumulation_dtype(ascent_carry.grads_at_second)
    dtype = tree.accumulation_dtype(g0)
    a, b, c = (value_at(h, state.count).astype(dtype) for h in (alpha, beta, gamma))
    h_plus = jax.tree.map(lambda x3, x1: x3 + a * (x1 - x3), g3, g1)
    if paper:
      h_minus_ = jax.tree.map(lambda x2, x0: x2 + b * (x0 - x2), g2, g0)
    else:
      h_minus_ = jax.tree.map(lambda x0, x2: x0 + (1 - b) * x2, g0, g2)
    delta = optax.tree.sub(h_minus_, h_plus)
    coef = tree.projection_coefficient(delta, h_plus, axis_name=param_axis_name)
    perp = jax.tree.map(lambda e, p: e - coef * p, delta, h_plus)
    d = jax.tree.map(lambda p, v: p - c * v, h_plus, perp)
    d = nan_unless_finite(d, (ascent_carry.grads_at_first, ascent_carry.grads_at_second),
                          axis_name=param_axis_name)
    return optax.tree.cast_like(d, updates), CorrectionCountState(_increment(state.count))

  return _correction(init, update)
