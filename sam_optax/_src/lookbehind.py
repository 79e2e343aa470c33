"""Lookbehind-SAM: k accumulated ascent steps, k inner steps on fast weights, one interpolation.

The engine (step.py) takes one inner step per update; Lookbehind takes `k` of them, on fast
weights that start at the params, and then moves the params (the slow weights) part of the way
to where the fast weights ended. It is therefore its own transformation, built from the
engine's pieces: the ascent (any ascent piece), the window, `GradientEvaluator` (grad_fn's aux,
its checks), `DataParallel` (gradients averaged over devices) and the exact select at a zero
perturbation; as in the engine, a non-finite gradient reaches the updates. Its state is the
engine's `SharpnessAwareState`, so checkpoints, `skip_if_nonfinite`, `optax.inject_hyperparams`
and the Flax helpers treat it as any other variant's.
"""

from __future__ import annotations

import functools
from typing import Any, Unpack

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import ascents
from sam_optax._src import checks
from sam_optax._src import control
from sam_optax._src import tree
from sam_optax._src.ascents import Radius
from sam_optax._src.engine import _checked_options
from sam_optax._src.engine import _init
from sam_optax._src.evaluation import DataParallel
from sam_optax._src.evaluation import GradientEvaluator
from sam_optax._src.evaluation import Perturbation
from sam_optax._src.hyperparams import ScalarOrSchedule
from sam_optax._src.hyperparams import check_hparam
from sam_optax._src.hyperparams import check_positive_int
from sam_optax._src.hyperparams import value_at
from sam_optax._src.step import Engine
from sam_optax._src.step import increment
from sam_optax._src.transformation import SharpnessAwareState
from sam_optax._src.transformation import SharpnessAwareTransformation
from sam_optax._src.variants import SharedOptions
from sam_optax._src.variants import _radius_may_vanish
from sam_optax._src.variants import variant


@variant
def lookbehind_sam(inner: optax.GradientTransformation, rho: Radius = 0.05, k: int = 2,
                   alpha: ScalarOrSchedule | None = 0.5,
                   ascent: optax.GradientTransformation | None = None,
                   **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Lookbehind-SAM: k ascent steps that accumulate, k inner steps, then interpolation.

  .. math::
    \phi = \theta_0 = u_0 = w, \qquad g_0 = g = \nabla L(w),

    u_j = u_{j-1} + \rho \frac{g_{j-1}}{\|g_{j-1}\|}, \qquad g_j = \nabla L(u_j), \qquad
    \theta_j = \theta_{j-1} + \mathrm{Opt}(g_j) \qquad (j = 1..k),

    w \leftarrow \phi + \alpha\, (\theta_k - \phi)

  The perturbed points `u_j` climb from the params and never see the fast weights `theta_j`;
  each gradient `g_j` taken there is one step of the inner optimizer on the fast weights (its
  state advances `k` times per update, and it receives `theta_{j-1}` as its params, so that
  weight decay acts on the fast weights, as in the authors' code). The update returned is
  `alpha (theta_k - phi)`, accumulated as the sum of the `k` inner updates. `k = 1, alpha = 1`
  is SAM: the same ascent, gradient evaluation and inner step (equal to the rounding of two
  compiled programs, which XLA may fuse differently).

  Adaptive alpha (`alpha=None`): per leaf `l`, from the first and the last displacement of the
  fast weights,

  .. math::
    \alpha_l = \frac{1}{2}\left(1 + \cos(\theta_{1,l} - \phi_l,\; \theta_{k,l} - \phi_l)\right)

  over the flattened leaf (accumulated in float32 or wider; the unit vectors are formed first,
  so the cosine is finite for gradients of any magnitude). A leaf whose first or last
  displacement is zero gets `alpha_l = 1/2` (the cosine is taken as 0, which is what
  `torch.nn.CosineSimilarity`'s clamped denominator gives; a zero last displacement leaves the
  leaf in place whatever `alpha_l`).

  **The inner optimizer counts k steps per update**: its learning-rate schedule (and any other
  schedule of its step count) advances `k` steps per call of `update`. Scale its lengths by `k`
  (a 10,000-update cosine decay with `k = 2` is `optax.cosine_decay_schedule(lr, 20_000)`). So
  does the ascent's own count (a schedule of `rho`); a schedule of `alpha` counts updates, as
  the `window` does.

  Cost: `k + 1` gradient evaluations per update (the caller's `g` and `k` calls of `grad_fn`,
  at `u_1 .. u_k`) and `k` inner steps; beyond SAM's buffers, the fast weights' displacement
  `theta_j - phi` and the fast weights handed to the inner optimizer live during the update (and
  the first displacement with `alpha=None`), none in the state. One-call form only.

  Source: the authors' code (chandar-lab/Lookbehind-SAM, `lookbehind.py`, `example_cifar.py`:
  `k` ascent/descent pairs on one batch, slow weights cached, the cosine rule for `alpha=-1`).
  Deviations: the code evaluates the gradient at `u_j` twice (once to descend, once to ascend
  further, on the same batch); it is the same gradient, taken once here (`k + 1` evaluations
  instead of `2k`). Its norms add 1e-16; ours are guarded (a zero gradient gives a zero step).
  It writes the interpolation `alpha theta_k + (1 - alpha) phi`; we return `alpha (theta_k -
  phi)`, equal up to rounding. Lookbehind-ASAM is `ascent=sam_optax.adaptive_ascent(0.5, eta,
  bias_convention="no_bias")` (the code adapts tensors named `weight` only and reads `|w|` at
  the current perturbed point `u_{j-1}`, which is what every ascent here receives as params).
  The paper also discusses a new minibatch per inner step; here all `k + 1` gradients use the
  batch `grad_fn` closes over, as the code does.

  Ascent pieces: any ascent (`sam_optax.normalized_ascent`, `adaptive_ascent`, ...) maps
  `g_{j-1}` to `u_j - u_{j-1}`, called with params `u_{j-1}`, the inner optimizer's current
  state (`inner_state=`), `grad_fn` and the keywords of `update`; its state advances `k` times
  per update and its schedules count those calls (not the engine's `count=`, which is not
  passed). An ascent returning extra points (`sam_optax.Perturbation`) is refused.

  Args:
    inner: the optimizer that takes the `k` fast steps (the authors: SGD, momentum 0.9,
      weight decay 5e-4).
    rho: the radius of each ascent step (README: 0.05 for SAM, 0.5 for ASAM); a float or a
      schedule of the ascent count, or a pytree prefix of the params holding one per leaf or
      subtree. Not used when `ascent` is given (the ascent carries its own radius).
    k: the number of ascent/inner steps per update, a Python int >= 1 (README default 2;
      structural: list it in `static_args` under `optax.inject_hyperparams`).
    alpha: the slow weights' step toward the fast ones, in [0, 1] (the paper uses 0.2, 0.5,
      0.8), a float or a schedule of the update count; None for the adaptive per-leaf rule.
    ascent: the ascent piece for each of the `k` steps; None for SAM's normalized ascent with
      radius `rho`.
    **options: the options every variant shares (`SharedOptions`), except `renormalize`,
      `mask`, `two_call` and `chunk_size`: `window`, `has_aux` (`update_with_aux` returns the
      aux of the last perturbed pass, at `u_k`), `axis_name` and `average_ascent` (each
      `g_j` is averaged over devices before the inner step; the ascent sees each device's own
      or the averaged one), `param_axis_name`.

  Returns:
    A `SharpnessAwareTransformation` (one-call form) whose state is a `SharpnessAwareState`
    (no correction; the ascent and inner states advance `k` times per update).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda p, x: jnp.mean((x @ p['w'] + p['b']) ** 2)
    >>> params = {'w': jnp.ones((3,)), 'b': jnp.zeros(())}
    >>> x = jnp.eye(3)
    >>> tx = sam_optax.lookbehind_sam(optax.adam(1e-2), rho=0.05, k=2, alpha=0.5)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params, x), state, params,
    ...                            grad_fn=lambda p: jax.grad(loss)(p, x))
    >>> params = optax.apply_updates(params, updates)
    >>> int(state.count), int(state.inner_state[0].count)  # one update, two Adam steps
    (1, 2)

  References:
    Mordido, Malviya, Baratin & Chandar, *Lookbehind-SAM: k steps back, 1 step forward*,
    ICML 2024, https://arxiv.org/abs/2307.16704; code
    https://github.com/chandar-lab/Lookbehind-SAM;
    Zhang et al., *Lookahead Optimizer: k steps forward, 1 step back*, NeurIPS 2019,
    https://arxiv.org/abs/1907.08610
  """
  refused = {"two_call": "the k gradients at the accumulated ascent points are taken with "
                         "grad_fn, so it needs the one-call form",
             "renormalize": "SSAM's renormalization keeps one descent gradient's norm, and "
                            "Lookbehind takes k inner steps",
             "mask": "a mask is not supported by Lookbehind's k ascent steps",
             "chunk_size": "m-sharpness is not supported by Lookbehind's k ascent steps"}
  for name, reason in refused.items():
    if options.get(name) not in (None, False):
      hint = (": drop two_call=True and call tx.update(grads, state, params, grad_fn=lambda p: "
              "jax.grad(loss)(p, batch))" if name == "two_call" else f": drop {name}=")
      raise ValueError(f"lookbehind_sam cannot take {name}={options[name]!r}: {reason}{hint}.")
  k = check_positive_int("k", k)
  if alpha is not None:
    alpha = check_hparam("alpha", alpha, high=1.0,
                         hint="alpha is the slow weights' step toward the fast ones "
                              "(None: the adaptive per-leaf rule).")
  if ascent is None:
    ascent = ascents.normalized_ascent(rho)
    exact_at_zero = _radius_may_vanish(dict(rho=rho))
  else:
    exact_at_zero = True  # the ascent's radius is its own: it may be zero
  return lookbehind(inner, ascent, k=k, alpha=alpha, exact_at_zero=exact_at_zero,
                    window=options.get("window"), has_aux=bool(options.get("has_aux")),
                    axis_name=options.get("axis_name"),
                    average_ascent=options.get("average_ascent"),
                    param_axis_name=options.get("param_axis_name"))


def lookbehind(inner: optax.GradientTransformation, ascent: optax.GradientTransformation, *,
               k: int, alpha: Any, exact_at_zero: bool = True, window: Any = None,
               has_aux: bool = False, axis_name: Any = None, average_ascent: bool | None = None,
               param_axis_name: Any = None) -> SharpnessAwareTransformation:
  """The transformation `lookbehind_sam` documents, over checked pieces (`alpha` None for the
  adaptive rule, else a checked float or schedule of the update count)."""
  _, window, _ = _checked_options(
      inner, ascent, None, cadence=None, window=window, mask=None, two_call=False,
      chunk_size=None, chunk_strategy="vectorized", axis_name=axis_name,
      average_ascent=average_ascent, linearize=False, decoupled=None)
  engine = Engine(
      inner=inner, ascent=ascent, correction=None, window=window, cadence=None, mask=None,
      has_aux=has_aux, chunk_size=None, chunk_strategy="vectorized",
      parallel=DataParallel(axis_name, average_ascent), param_axis_name=param_axis_name,
      linearize=False, exact_at_zero=exact_at_zero, decoupled=None)
  rule = _Rule(engine, k, alpha)
  # The engine's init: no two-call pending descent, no kept clean gradient.
  init = functools.partial(_init, engine, False, False)
  update = functools.partial(_update_without_aux, rule)
  update_with_aux = functools.partial(_update_with_aux, rule)
  return SharpnessAwareTransformation(
      init, checks.entry_point(update, init), checks.entry_point(update_with_aux, init),
      has_aux, two_call=False)


class _Rule:
  """The engine's pieces and Lookbehind's own hyperparameters."""

  def __init__(self, engine: Engine, k: int, alpha: Any):
    self.engine, self.k, self.alpha = engine, k, alpha


def _update_without_aux(rule: _Rule, grads, state, params=None, *, grad_fn=None, **extra):
  updates, state, _ = _update(rule, False, grads, state, params, grad_fn=grad_fn, **extra)
  return updates, state


def _update_with_aux(rule: _Rule, grads, state, params=None, *, grad_fn=None, **extra):
  checks.require_aux(rule.engine.has_aux, "grad_fn's last perturbed pass")
  return _update(rule, True, grads, state, params, grad_fn=grad_fn, **extra)


def _update(rule: _Rule, returns_aux: bool, grads, state, params=None, *, grad_fn=None,
            **extra):
  engine = rule.engine
  checks.refuse_wrappers(False)
  checks.check_state(state, False)
  for name in ("batch", "chunks"):
    if extra.get(name) is not None:
      raise ValueError(f"lookbehind_sam takes no {name}=: it has no m-sharpness (chunk_size). "
                       f"Close grad_fn over the batch: grad_fn=lambda p: jax.grad(loss)(p, "
                       f"batch).")
  checks.check_params_and_grads(grads, params)
  if grad_fn is None:
    raise ValueError(
        "lookbehind_sam needs grad_fn=..., a function params -> grads (e.g. grad_fn=lambda p: "
        "jax.grad(loss)(p, batch)): it evaluates k gradients at the accumulated ascent points "
        "within one update, and has no two-call form.")
  checks.check_grad_fn(grad_fn, False)
  checks.refuse_reserved_keywords(extra)
  grad_fn = engine.parallel.at_varying(checks.explained_signature(grad_fn, False))
  mean_grads = engine.parallel.mean(grads) if engine.reads_clean_gradient() else None
  decision, cadence_state = engine.decide(mean_grads, state, params)
  step = _Step(rule, grads, state, params, grad_fn, extra, returns_aux)
  if decision is None:
    updates, inner_state, ascent_state, aux = step.lookbehind(None)
  else:
    step.eager = control.is_concrete(decision.perturbed)
    updates, inner_state, ascent_state, aux = control.cond(
        decision.perturbed, step.lookbehind, step.plain, None)
  new_state = state._replace(count=increment(state.count), ascent_state=ascent_state,
                             inner_state=inner_state, cadence_state=cadence_state)
  return updates, new_state, aux


class _Step:
  """The two branches of one update: Lookbehind's k steps, or (outside the window) the inner
  optimizer's own step on `g`."""

  def __init__(self, rule: _Rule, grads, state: SharpnessAwareState, params, grad_fn, extra,
               returns_aux: bool):
    self.rule, self.grads, self.state, self.params = rule, grads, state, params
    self.grad_fn, self.extra, self.returns_aux = grad_fn, extra, returns_aux
    self.eager = False

  def lookbehind(self, _):
    """`alpha (theta_k - phi)`, the inner and ascent states after k steps, the last aux."""
    engine, params, extra = self.rule.engine, self.params, self.extra
    evaluate = GradientEvaluator(self.grad_fn, engine.has_aux, params)
    ascent_grad_fn = lambda p: engine.parallel.ascent_input(evaluate.grads_only(p))
    ascent_state, inner_state = self.state.ascent_state, self.state.inner_state
    point, previous = params, self.grads  # u_{j-1} and g_{j-1} (each device's own)
    # The norms of the gradients whose non-finite entries must reach the updates, which the
    # rules may drop (a normalized ascent turns a NaN gradient into a zero step). As in the
    # engine, each inner step's direction is made NaN when one of them is not finite (a norm is
    # non-finite exactly when an entry is), and the inner optimizer carries it to the updates.
    norms = ([self.norm(engine.parallel.mean(self.grads))] if engine.ascent_reads_grads
             else [])
    first = displacement = like = aux = None
    # Unrolled (k is small and static), as multistep_ascent: XLA:CPU runs convolutions inside a
    # loop body several times slower, and the inner state may change dtype at its first step
    # (float32 gradients on bfloat16 params), which a loop carry could not.
    for j in range(self.rule.k):
      eps, ascent_state = engine.perturb(
          engine.parallel.ascent_input(previous), ascent_state, point,
          dict(extra, grad_fn=ascent_grad_fn, inner_state=inner_state))
      if isinstance(eps, Perturbation):
        raise ValueError("lookbehind_sam's ascent returned a sam_optax.Perturbation (extra "
                         "points to evaluate, e.g. SAMPa's): Lookbehind evaluates one point "
                         "per ascent step. Use an ascent that returns eps.")
      point = tree.add(point, eps)
      grads_j, aux = evaluate(point)
      grads_j = engine.keep_clean_at_zero(eps, previous, grads_j)
      direction = engine.parallel.mean(grads_j)
      norms.append(self.norm(direction))
      direction = _nan_unless_finite(direction, norms)
      # theta_0 is the params themselves (not params + 0), so k = 1 is SAM's step exactly.
      fast = params if displacement is None else tree.add(params, displacement)
      step, inner_state = engine.inner.update(direction, inner_state, fast, **extra)
      if displacement is None:
        like, displacement = step, _widened(step)
        first = displacement
      else:
        displacement = jax.tree.map(lambda d, s: d + s.astype(d.dtype), displacement, step)
      previous = grads_j
    updates = self.interpolate(first, displacement, like)
    return updates, inner_state, engine.parallel.synced(ascent_state), aux

  def norm(self, values):
    return tree.norm(values, axis_name=self.rule.engine.param_axis_name)

  def interpolate(self, first, last, like):
    """`alpha (theta_k - phi)` in the dtypes of the inner optimizer's updates."""
    alpha, engine = self.rule.alpha, self.rule.engine
    if alpha is None:
      scaled = jax.tree.map(
          lambda a, b: _adaptive_alpha(a, b, engine.param_axis_name) * b, first, last)
    else:
      scaled = tree.scale(value_at(alpha, self.state.count), last)
    return jax.tree.map(lambda x, u: x.astype(u.dtype), scaled, like)

  def plain(self, _):
    """Outside the window: the inner optimizer's step on `g`, one gradient evaluation."""
    engine = self.rule.engine
    direction = engine.parallel.mean(self.grads)
    updates, inner_state = engine.inner.update(direction, self.state.inner_state, self.params,
                                               **self.extra)
    return updates, inner_state, self.state.ascent_state, self.zero_aux()

  def zero_aux(self):
    """Zeros shaped like grad_fn's aux (see `OneCallStep.zero_aux`): under a trace, for the
    branches of the `lax.cond` to match; eagerly, only when the caller reads the aux."""
    engine = self.rule.engine
    if not engine.has_aux or (self.eager and not self.returns_aux):
      return None
    evaluate = GradientEvaluator(self.grad_fn, True, self.params)
    shape = jax.eval_shape(lambda p: evaluate(p)[1], self.params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)


def _nan_unless_finite(values, norms):
  """`values`, NaN everywhere unless every norm in `norms` is finite."""
  finite = jnp.all(jnp.isfinite(jnp.stack(norms)))
  return jax.tree.map(lambda v: jnp.where(finite, v, jnp.nan).astype(v.dtype), values)


def _widened(values):
  """Each leaf in its dtype promoted with float32: the fast weights' displacement is summed
  there over the k steps and rounded to the inner optimizer's dtype once, at the end."""
  return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), values)


def _adaptive_alpha(first, last, axis_name):
  """`(1 + cos(first, last)) / 2` over one leaf; the cosine is 0 when either is zero."""
  unit = lambda x: tree.scale(tree.safe_inverse(tree.norm(x, axis_name=axis_name)),
                              tree.in_accumulation_dtype(x))
  cosine = tree.vdot(unit(first), unit(last), axis_name=axis_name)
  # A rounded cosine of parallel vectors may exceed 1 by an ulp; alpha stays in [0, 1].
  return (1.0 + jnp.clip(cosine, -1.0, 1.0)) / 2.0
