"""SAMPa's pieces: an ascent asking for a second, independent point, and its correction.

The ascent reads the gradient `g_y` the correction kept at the last step (the engine hands it
the correction's state), and returns a `Perturbation` with the auxiliary point `y` as its extra
point; the engine evaluates `grad_fn` at `x + eps` and at `y` together (one after the other,
batched, or one per device group) and hands `grad f(y)` to the correction, which mixes the two
and keeps `grad f(y)` for the next step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import tree
from sam_optax._src.ascents import GradientFreeAscent
from sam_optax._src.ascents import _gradient_free_ascent
from sam_optax._src.ascents import _increment
from sam_optax._src.evaluation import Perturbation
from sam_optax._src.hyperparams import ScalarOrSchedule
from sam_optax._src.hyperparams import check_hparam
from sam_optax._src.hyperparams import value_at


class SampaState(NamedTuple):
  """State of SAMPa's correction."""
  count: jax.Array  # int32 scalar: perturbed steps taken, the argument of a lam schedule.
  grads_at_y: Any  # tree like params: g_y = grad f(y_t), the gradient at the last auxiliary
  # point (zeros before the first step, as in the authors' code).


def _find_sampa_state(correction_state) -> SampaState:
  """SAMPa's state inside the correction's (alone, or chained with renormalization)."""
  found = [s for s in jax.tree.leaves(correction_state,
                                      is_leaf=lambda x: isinstance(x, SampaState))
           if isinstance(s, SampaState)]
  if len(found) != 1:
    raise ValueError("sampa_ascent reads the gradient g_y kept by sampa_correction: build them "
                     "together (sam_optax.sampa does), with the engine passing the correction's "
                     "state to the ascent.")
  return found[0]


def sampa_ascent(rho: ScalarOrSchedule = 0.1, inner: optax.GradientTransformation | None = None,
                 learning_rate: ScalarOrSchedule | None = None) -> GradientFreeAscent:
  r"""SAMPa's ascent: both points from the last auxiliary gradient `g_y`, none from `g`.

  .. math::
    \epsilon_t = \rho \frac{g_y}{\|g_y\|}, \qquad
    y_{t+1} - x_t = -\eta_t\, g_y \;\text{(learning\_rate given)}
    \;\text{ or }\; \mathrm{Opt}_{peek}(g_y)

  with `g_y` the gradient at the previous auxiliary point, read from `sampa_correction`'s state
  (the engine hands the ascent `correction_state`). `Opt_peek(g_y)` is the inner optimizer's
  update at `g_y` from its current state (momentum, weight decay), computed and not committed,
  as in the authors' code. Returns a `Perturbation(eps, points=(y - x,))`: the engine evaluates
  the gradient at `y` with the perturbed one. The clean gradient is not read.

  Args:
    rho: the perturbation radius, >= 0; a float or a schedule of the step count.
    inner: the inner optimizer whose update is peeked at (needed unless `learning_rate`).
    learning_rate: `eta_t` (a float or a schedule of the step count) for the paper's
      `y = x - eta_t g_y`; None for the code's peek.

  Returns:
    A `GradientFreeAscent` returning a `Perturbation`; its `update` needs the keywords
    `correction_state` and (for the peek) `inner_state`, which the engine supplies.

  Example:
    >>> import optax, sam_optax
    >>> ascent = sam_optax.sampa_ascent(0.1, inner=optax.sgd(0.1, momentum=0.9))
    >>> sam_optax.ascent_reads_grads(ascent)
    False

  References:
    Xie, Pethick & Cevher, *SAMPa: Sharpness-aware Minimization Parallelized*, NeurIPS 2024,
    https://arxiv.org/abs/2410.10683; code https://github.com/LIONS-EPFL/SAMPa
  """
  rho = check_hparam("rho", rho, hint="rho is the radius of the perturbation.")
  if learning_rate is None:
    if not isinstance(inner, optax.GradientTransformation):
      raise TypeError("sampa_ascent needs the inner optimizer (inner=...) to peek at its update "
                      "at g_y, or a learning_rate for the paper's y = x - lr g_y.")
    peek = optax.with_extra_args_support(inner).update
  else:
    learning_rate = check_hparam("learning_rate", learning_rate,
                                 hint="learning_rate is the step to the auxiliary point.")
    peek = None

  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, state, params=None, *, correction_state=None, inner_state=None,
             count=None, param_axis_name=None, **extra):
    del grads, extra
    if params is None:
      raise ValueError("sampa_ascent needs the params: call update(g, state, params, ...).")
    g_y = _find_sampa_state(correction_state).grads_at_y
    step = jnp.zeros([], jnp.int32) if count is None else count
    eps = tree.scale(value_at(rho, step) * tree.safe_inverse(
        tree.norm(g_y, axis_name=param_axis_name)), tree.in_accumulation_dtype(g_y))
    if peek is None:
      assert learning_rate is not None
      offset = tree.scale(-value_at(learning_rate, step), tree.in_accumulation_dtype(g_y))
    else:
      if inner_state is None:
        raise ValueError("sampa_ascent peeks at the inner optimizer's update: it needs the "
                         "keyword inner_state (the engine passes it).")
      # The inner optimizer's step at g_y from its current state; the state it returns is
      # dropped, so the committed step (at d) is the only one that advances it.
      offset, _ = peek(g_y, inner_state, params)
    eps = optax.tree.cast_like(eps, params)
    offset = optax.tree.cast_like(offset, params)
    return Perturbation(eps=eps, points=(offset,)), state

  return _gradient_free_ascent(init, update)


def sampa_correction(lam: ScalarOrSchedule = 0.2) -> optax.GradientTransformationExtraArgs:
  r"""SAMPa's descent: the perturbed and the auxiliary gradients mixed; `g_y` kept.

  .. math::
    d_t = (1 - \lambda)\, \nabla f(\tilde x_t) + \lambda\, \nabla f(y_{t+1}), \qquad
    g_y \leftarrow \nabla f(y_{t+1})

  The gradient at the auxiliary point arrives as the engine's `point_grads[0]` (the ascent's
  extra point). On a step without the perturbed pass (none unless a cadence is added) the
  direction is the gradient handed in and `g_y` is kept.

  Args:
    lam: the weight of the auxiliary gradient, in [0, 1] (the authors' default 0.2; 0 is
      the pure SAMPa), a float or a schedule of the count of perturbed steps.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `SampaState`.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> c = sam_optax.sampa_correction(0.25)
    >>> params = {'w': jnp.zeros(2)}
    >>> d, _ = c.update({'w': jnp.array([4.0, 0.0])}, c.init(params), params,
    ...                 point_grads=({'w': jnp.array([0.0, 4.0])},))
    >>> d['w']
    Array([3., 1.], dtype=float32)

  References:
    Xie, Pethick & Cevher, *SAMPa: Sharpness-aware Minimization Parallelized*, NeurIPS 2024,
    https://arxiv.org/abs/2410.10683; code https://github.com/LIONS-EPFL/SAMPa
  """
  lam = check_hparam("lam", lam, high=1.0,
                     hint="lam weighs the auxiliary gradient against the perturbed one.")

  def init(params):
    return SampaState(count=jnp.zeros([], jnp.int32),
                      grads_at_y=optax.tree.zeros_like(params))

  def update(updates, state, params=None, *, point_grads=(), **extra):
    del params, extra
    if not point_grads:
      return updates, state
    weight = value_at(lam, state.count)
    g_adv = tree.in_accumulation_dtype(updates)
    g_aux = tree.in_accumulation_dtype(point_grads[0])
    mixed = jax.tree.map(lambda a, b: (1 - weight) * a + weight * b, g_adv, g_aux)
    direction = optax.tree.cast_like(mixed, updates)
    return direction, SampaState(
        count=_increment(state.count),
        grads_at_y=optax.tree.cast_like(point_grads[0], state.grads_at_y))

  return optax.GradientTransformationExtraArgs(init, update)
