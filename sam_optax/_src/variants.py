"""Named constructors: each variant names its pieces (ascent, correction, cadence) for the engine.

A variant constructor is an ordinary function `name(inner, *hparams, **options)`: it builds the
variant's `Pieces` from its own hyperparameters and hands them to `build_variant` with the
options every variant shares (renormalization, SAM windows, masks, aux, the two-call form,
m-sharpness), which are declared once, here, as the `SharedOptions` TypedDict. Static type
checkers and editors read the real signature; `@variant` fills the shared options' defaults.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Hashable, Mapping
from typing import (Any, Callable, Literal, NamedTuple, ParamSpec, TypedDict, TypeVar, Unpack,
                    overload)

import jax.numpy as jnp
import optax

from sam_optax._src import ascents, cadences, corrections, engine
from sam_optax._src.ascents import Radius
from sam_optax._src import gam as gam_pieces
from sam_optax._src import sampa as sampa_pieces
from sam_optax._src.hyperparams import ScalarOrSchedule
from sam_optax._src.hyperparams import check_hparam, value_at
from sam_optax._src.hyperparams import _concrete
from sam_optax._src.transformation import SharpnessAwareTransformation


class Pieces(NamedTuple):
  """What a variant hands to the engine.

  `metric` and `needs_grad_fn` describe the variant for `build_variant` and never reach the
  engine: `renormalize=True` needs the variant's own norm (ASAM's `T_w`), and a variant whose
  pieces call `grad_fn` themselves is refused in the two-call form at construction, not at its
  first trace. Whether the ascent reads `g` is the ascent's own (`GradientFreeAscent`).
  """
  ascent: optax.GradientTransformation
  correction: optax.GradientTransformation | None = None
  cadence: engine.Cadence | None = None
  metric: corrections.Metric | None = None   # the norm's weights for renormalization (ASAM)
  linearize: bool = False        # descent gradient g + H eps (one HVP) instead of grad L(w + eps)
  needs_grad_fn: bool = False    # evaluates gradients beyond the perturbed pass: one-call only
  decoupled: Callable | None = None  # (correction_state, params, count) -> added update


class SharedOptions(TypedDict, total=False):
  """The options every variant constructor accepts after its own hyperparameters.

  All are keyword-only and optional; a constructor's docstring names them under `**options`.
  The defaults are in parentheses (`ssam` defaults to `renormalize=True`).

  Attributes:
    renormalize: apply Stable SAM's renormalization `d <- (||g|| / ||d||) d` to the descent
      direction (Tan et al., https://arxiv.org/abs/2401.07250). (False)
    window: `(start, end)`: sharpness-aware steps only for `start <= t < end` (end None: no
      end); other steps are the inner optimizer's, with one gradient evaluation. (None)
    mask: tree of bools (or function of params returning one) choosing the perturbed leaves;
      norms are over those leaves only (SAM-ON, https://arxiv.org/abs/2306.04226). (None)
    has_aux: whether `grad_fn` returns `(grads, aux)`; `tx.update_with_aux` returns the
      perturbed pass's aux. (False)
    two_call: alternate ascent and descent over successive `update` calls instead of passing
      `grad_fn`. (False)
    chunk_size: m-sharpness: examples per chunk; each chunk takes its own clean gradient,
      perturbation and descent gradient (with any ascent, and before renormalization), and the
      descent gradients are averaged. `update` then takes `batch=` (or `chunks=`, already
      split) and `grad_fn(params, batch)`; `grads` may be None. (None)
    chunk_strategy: `"vectorized"` (vmap over chunks) or `"sequential"` (scan: memory of one
      chunk, i.e. gradient accumulation). ("vectorized")
    axis_name: data-parallel axis name(s) of an enclosing `pmap`/`shard_map`; gradients are
      averaged over it. (None)
    average_ascent: with `axis_name`: True for global SAM (ascent on the averaged gradient),
      False for per-device ascent (m-sharpness); required with `axis_name`. (None)
    param_axis_name: axis the params are sharded over (FSDP in `shard_map`): norms are reduced
      over it. (None)
  """
  renormalize: bool
  window: tuple[int, int | None] | None
  mask: Any
  has_aux: bool
  two_call: bool
  chunk_size: int | None
  chunk_strategy: Literal["vectorized", "sequential"]
  axis_name: Hashable | None
  average_ascent: bool | None
  param_axis_name: Hashable | None


# The shared options' defaults, in the order of the runtime signature.
SHARED_DEFAULTS: dict[str, Any] = dict(
    renormalize=False, window=None, mask=None, has_aux=False, two_call=False, chunk_size=None,
    chunk_strategy="vectorized", axis_name=None, average_ascent=None, param_axis_name=None)
assert tuple(SHARED_DEFAULTS) == tuple(SharedOptions.__annotations__), "keep the two in step"

# Each constructor's docstring names the shared options with this entry, which the runtime
# docstring (`help()`, API docs) replaces by `SharedOptions`' documentation of each.
_OPTIONS_ENTRY = "    **options: the options every variant shares (`SharedOptions`)"

_P = ParamSpec("_P")
_T = TypeVar("_T")


@overload
def variant(constructor: Callable[_P, _T], /) -> Callable[_P, _T]: ...
@overload
def variant(constructor: None = None, /,
            **option_defaults: Any) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]: ...
def variant(constructor: Callable[..., Any] | None = None, /, **option_defaults: Any) -> Any:
  """Completes a variant constructor `(inner, *hparams, **options: Unpack[SharedOptions])`.

  The static signature (what pyright and editors see) is the constructor's own. At run time
  the constructor is called with every shared option (its default filled in; `option_defaults`
  overrides defaults, e.g. `ssam`'s `renormalize=True`), an unknown keyword raises the usual
  TypeError, and `inspect.signature` spells the options out as keyword-only parameters, since
  `optax.inject_hyperparams` reads the hyperparameters from it and calls the constructor with
  them as keywords. The docstring gets the shared options' documentation.
  """
  if constructor is None:
    return functools.partial(variant, **option_defaults)
  fn = constructor
  own = [p for p in inspect.signature(fn).parameters.values()
         if p.kind is not inspect.Parameter.VAR_KEYWORD]
  # The TypedDict keeps its annotations as ForwardRefs; the signature shows their text.
  annotations = {name: getattr(annotation, "__forward_arg__", annotation)
                 for name, annotation in SharedOptions.__annotations__.items()}
  shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                              default=option_defaults.get(name, default),
                              annotation=annotations[name])
            for name, default in SHARED_DEFAULTS.items()]
  signature = inspect.Signature([*own, *shared], return_annotation=SharpnessAwareTransformation)

  def complete(*args: Any, **kwargs: Any) -> Any:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return fn(**bound.arguments)

  functools.update_wrapper(complete, fn)
  setattr(complete, "__signature__", signature)
  complete.__doc__ = _with_shared_docs(fn.__doc__ or "")
  return complete


def _with_shared_docs(doc: str) -> str:
  """Replaces the `**options` entry of the Args section by each shared option's entry."""
  start = doc.find(_OPTIONS_ENTRY)
  if start < 0:
    return doc
  end = doc.find("\n", start)
  while doc.startswith("      ", end + 1):  # the entry's continuation lines
    end = doc.find("\n", end + 1)
  entries = (SharedOptions.__doc__ or "").split("  Attributes:\n", 1)[1].rstrip()
  return doc[:start] + entries + doc[end:]


def build_variant(inner: optax.GradientTransformation, pieces: Pieces, hparams: dict[str, Any],
                  options: Mapping[str, Any], *, name: str) -> engine.SharpnessAwareTransformation:
  """The engine over a variant's `pieces`, with the options every variant shares.

  `hparams` are the variant's own hyperparameters (their radii decide `exact_at_zero`),
  `options` the shared ones (`renormalize`, `window`, `mask`, ...), `name` the variant's name
  for error messages. The one place where a named variant meets the engine.
  """
  options = dict(options)
  if pieces.needs_grad_fn and options["two_call"]:
    raise ValueError(
        f"{name} evaluates gradients (or Hessian-vector products) of grad_fn beyond "
        f"the perturbed pass, so it needs the one-call form: drop two_call=True and call "
        f"tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch)).")
  correction = pieces.correction
  if options.pop("renormalize"):
    fix = corrections.renormalize(pieces.metric)
    correction = fix if correction is None else optax.chain(correction, fix)
  return engine.sharpness_aware(
      inner, pieces.ascent, correction=correction, cadence=pieces.cadence,
      linearize=pieces.linearize,
      exact_at_zero=_radius_may_vanish(hparams), decoupled=pieces.decoupled, **options)


def _radius_may_vanish(hparams: dict) -> bool:
  """Whether a perturbation radius (`rho`, `rho_max`, `rho_min`, ...) may be zero at run time.

  False only when the variant has radii and every one is a concrete positive number: a zero
  perturbation can then only come from a zero gradient, so the engine need not keep the clean
  gradient through the perturbed pass to hand it back bit for bit (`exact_at_zero`). Zeros,
  schedules and injected (traced) values keep that guarantee. The answer changes what a step
  computes, never the state's structure: `optax.inject_hyperparams` builds the transformation
  with concrete values for `init` and traced ones for `update`, and both must fit one state.
  """
  radii = [value for name, value in hparams.items() if name == "rho" or name.startswith("rho_")]
  if not radii:
    return True
  for value in radii:
    concrete = None if callable(value) else _concrete(value)
    if concrete is None or concrete <= 0:
      return True
  return False


@variant
def sam(inner: optax.GradientTransformation, rho: Radius = 0.05,
        **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Sharpness-Aware Minimization.

  .. math::
    \epsilon = \rho \frac{g}{\|g\|}, \qquad d = \nabla L(w + \epsilon),
    \qquad w \leftarrow w + \mathrm{Opt}(d)

  Two gradient evaluations per step (the caller's `g` and one `grad_fn` call). A zero gradient
  gives a zero perturbation; `rho=0` reproduces the inner optimizer. Near a minimum `w*`,
  gradient descent with step `eta` only converges where the Hessian eigenvalues satisfy
  `0 <= eta lam <= 2` (normalized SAM oscillates around `w*` within O(rho) instead of
  converging exactly).

  Gradient clipping belongs inside the inner optimizer, where it clips the descent gradient:
  `sam(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)))`. In front,
  `optax.chain(optax.clip_by_global_norm(1.0), sam(...))` is accepted but clips nothing the
  step uses: it rescales the clean gradient `g`, whose length the normalized ascent divides
  out, while the descent gradient comes from `grad_fn` unclipped.

  Hyperparameters given as numbers are checked here (a negative `rho` raises a ValueError).
  Those that arrive at run time, from a schedule or injected by `optax.inject_hyperparams`
  under `jax.jit`, are checked at every step: a value out of range or not finite makes the
  step's updates NaN, which `sam_optax.skip_if_nonfinite` and `optax.apply_if_finite` catch,
  rather than being used (an eager update with an injected value raises the ValueError). This
  holds for every variant and every hyperparameter.

  Args:
    inner: the optimizer that takes the descent step, e.g. `optax.sgd(0.1, momentum=0.9)`.
    rho: the perturbation radius (paper default 0.05 from scratch, 0.1 when fine-tuning); a
      float or a schedule of the step count, or a pytree prefix of the params holding one per
      leaf or subtree (see `sam_optax.normalized_ascent`).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda p, x: jnp.mean((x @ p['w'] + p['b']) ** 2)
    >>> params = {'w': jnp.ones((3,)), 'b': jnp.zeros(())}
    >>> x = jnp.eye(3)
    >>> tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params, x)
    >>> updates, state = tx.update(grads, state, params,
    ...                            grad_fn=lambda p: jax.grad(loss)(p, x))
    >>> params = optax.apply_updates(params, updates)

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving Generalization*,
    ICLR 2021, https://arxiv.org/abs/2010.01412
  """
  pieces = Pieces(ascent=ascents.normalized_ascent(rho))
  return build_variant(inner, pieces, dict(rho=rho), options, name="sam")


@variant
def usam(inner: optax.GradientTransformation, rho: Radius = 0.05,
         **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Unnormalized SAM (USAM).

  .. math::
    \epsilon = \rho\, g, \qquad d = \nabla L(w + \epsilon)

  Two gradient evaluations per step. Eigenvalue filter (Bolte et al., by linearization at a
  limit point, inner SGD with step `eta`): USAM can only converge where every Hessian eigenvalue
  satisfies `0 <= eta lam (1 + rho lam) <= 2`, which also admits `lam <= -1/rho`: USAM can
  converge to saddles with strong negative curvature. On `L = beta/2 ||x||^2` it diverges once
  `eta > 2 / (beta + rho beta^2)` (Dai et al.).

  Args:
    inner: the optimizer that takes the descent step.
    rho: the perturbation scale; a float or a schedule of the step count, or a pytree
      prefix of the params holding one per leaf or subtree.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.usam(optax.sgd(0.1), rho=0.1)

  References:
    Andriushchenko & Flammarion, *Towards Understanding Sharpness-Aware Minimization*,
    ICML 2022, https://arxiv.org/abs/2206.06232;
    Dai, Ahn & Sra, *The Crucial Role of Normalization in Sharpness-Aware Minimization*,
    NeurIPS 2023, https://arxiv.org/abs/2305.15287;
    Bolte, Le & Pauwels, https://arxiv.org/abs/2510.09034
  """
  pieces = Pieces(ascent=ascents.unnormalized_ascent(rho))
  return build_variant(inner, pieces, dict(rho=rho), options, name="usam")


@variant
def unified_sam(inner: optax.GradientTransformation, rho: Radius = 0.05,
                lam: ScalarOrSchedule = 0.5,
                **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Unified SAM: a convex combination of USAM's and SAM's perturbations.

  .. math::
    \epsilon = \rho \left(1 - \lambda + \frac{\lambda}{\|g\|}\right) g,
    \qquad d = \nabla L(w + \epsilon)

  `lam = 0` is USAM and `lam = 1` is SAM, exactly. `lam` (and `rho`) may follow schedules,
  e.g. `lambda t: 1 / (t + 1)` or `lambda t: 1 - 1 / (t + 1)`; the paper's decreasing
  schedule is `rho_t = min(rho, 1 / (2t + 1))`. Two gradient evaluations per step.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the perturbation radius; a float or a schedule of the step count, or a pytree
      prefix of the params holding one per leaf or subtree.
    lam: the normalization weight in [0, 1]; a float or a schedule.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.unified_sam(optax.sgd(0.1), rho=0.05, lam=lambda t: 1.0 / (t + 1))

  References:
    Oikonomou & Loizou, *Sharpness-Aware Minimization: General Analysis and Improved Rates*,
    ICLR 2025, https://arxiv.org/abs/2503.02225
  """
  pieces = Pieces(ascent=ascents.unified_ascent(rho, lam))
  return build_variant(inner, pieces, dict(rho=rho, lam=lam), options, name="unified_sam")


@variant(renormalize=True)
def ssam(inner: optax.GradientTransformation, rho: Radius = 0.05,
         **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Stable SAM: SAM whose descent direction keeps the clean gradient's norm.

  .. math::
    \epsilon = \rho \frac{g}{\|g\|}, \qquad
    d = \frac{\|g\|}{\|\nabla L(w + \epsilon)\|} \nabla L(w + \epsilon)

  Equal to `sam(inner, rho, renormalize=True)`; every variant accepts `renormalize=True`
  (here it defaults to True).
  Two gradient evaluations per step. Renormalization widens the range of learning rates over
  which training is stable.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the perturbation radius; a float or a schedule of the step count, or a pytree
      prefix of the params holding one per leaf or subtree.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.ssam(optax.sgd(0.5), rho=0.05)

  References:
    Tan et al., *Stabilizing Sharpness-Aware Minimization Through A Simple Renormalization
    Strategy*, JMLR 2025, https://arxiv.org/abs/2401.07250
  """
  pieces = Pieces(ascent=ascents.normalized_ascent(rho))
  return build_variant(inner, pieces, dict(rho=rho), options, name="ssam")


# ------------------------------------------------------------------ seed variants, part two
#
# Eigenvalue filters (Bolte, Le & Pauwels, https://arxiv.org/abs/2510.09034): linearizing the
# step `w <- w - eta d(w)` of inner SGD at a limit point `w*` with Hessian eigenvalues `lam`
# gives the multiplier `1 - eta lam phi(lam)` per eigendirection, so the method can only converge
# to `w*` where `0 <= eta lam phi(lam) <= 2` for every eigenvalue (with heavy-ball momentum
# `beta_m` the upper bound is `2 (1 + beta_m)`). `phi = 1` for GD, `1 + rho lam` for USAM and
# penalty SAM, `1 + rho lam + rho^2 lam^2` for USAM2, `1 + rho lam^2` for HUSAM. Verified on
# diagonal quadratics in tests/test_eigenvalue_filters.py.


@variant
def dnsam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05, decay: float = 0.99,
          **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Deterministic-normalization SAM: the stochastic gradient over the full-batch norm.

  .. math::
    \epsilon = \rho\, \frac{g}{\|\nabla L(w)\|}, \qquad d = \nabla L_B(w + \epsilon)

  with `g = grad L_B(w)` the minibatch gradient. Pass the full-batch norm each step as
  `tx.update(..., full_grad_norm=value)`, a finite scalar, positive unless the gradient is
  zero (a negative or non-finite Python number raises a ValueError; otherwise an invalid value
  makes the step's updates NaN); without it, it is estimated by the root of a
  bias-corrected moving average of `||g||^2` (see
  `sam_optax.deterministic_normalized_ascent`: it overestimates `||grad L||` by the gradient
  noise, `E ||g||^2 = ||grad L||^2 + tr(Sigma)/B`, and gives a perturbation of root-mean-square
  length `rho`). With full batches and the exact norm it is SAM. Two gradient evaluations per
  step and one scalar of extra state. Like SAM's, the normalized perturbation does not vanish at a
  minimum, so there is no linear eigenvalue filter beyond GD's `0 <= eta lam <= 2`.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the perturbation scale; a float or a schedule of the step count.
    decay: the decay of the moving average of `||g||^2` in [0, 1) (used when `update` gets no
      `full_grad_norm`).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`; `update` accepts `full_grad_norm=`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> tx = sam_optax.dnsam(optax.sgd(0.1), rho=0.05)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            grad_fn=jax.grad(loss), full_grad_norm=4.5)

  References:
    Compagnoni et al., *An SDE for Modeling SAM: Theory and Insights*, ICML 2023,
    https://arxiv.org/abs/2301.08203
  """
  pieces = Pieces(ascent=ascents.deterministic_normalized_ascent(rho, decay))
  return build_variant(inner, pieces, dict(rho=rho, decay=decay), options, name="dnsam")


@variant
def usam2(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
          **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Two-step USAM: the unnormalized ascent taken twice, nested.

  .. math::
    e_1 = \rho\, g, \quad e_2 = \rho \nabla L(w + e_1), \quad d = \nabla L(w + e_2)

  Three gradient evaluations per step (`g`, one inside the ascent, the descent one); no extra
  state. It is `multistep_sam(inner, rho, steps=2, normalized=False, project=False,
  nested=True)`: the second iterate replaces the first rather than adding to it (the
  accumulating two-step ascent would give `e_2 = e_1 + rho grad L(w + e_1)`).

  Eigenvalue filter (linearization at a limit point, inner SGD with step `eta`): USAM2 can only
  converge where every Hessian eigenvalue satisfies
  `0 <= eta lam (1 + rho lam + rho^2 lam^2) <= 2`. Since `1 + x + x^2 > 0`, this excludes every
  negative eigenvalue: unlike USAM, USAM2 never converges to a saddle. One-call form only.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the perturbation scale; a float or a schedule of the step count.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.usam2(optax.sgd(0.1), rho=0.05)

  References:
    Bolte, Le & Pauwels, https://arxiv.org/abs/2510.09034
  """
  pieces = Pieces(ascent=ascents.multistep_ascent(rho, steps=2, normalized=False, project=False,
                                                  nested=True),
                  needs_grad_fn=True)
  return build_variant(inner, pieces, dict(rho=rho), options, name="usam2")


@variant
def husam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
          **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Hessian USAM: the ascent follows the Hessian applied to the gradient.

  .. math::
    \epsilon = \rho\, H(w)\, g, \qquad d = \nabla L(w + \epsilon)

  `H(w) g` is one Hessian-vector product, forward-over-reverse (`jax.jvp` of `grad_fn` along
  `g`). Per step: the caller's gradient, one HVP (about two to three gradients' cost) and the
  descent gradient; no extra state. This is our reading of Bolte et al.'s HUSAM; the related
  `penalty_sam` uses `g + rho H g` as the direction.

  Eigenvalue filter (linearization, inner SGD with step `eta`): HUSAM can only converge where
  every Hessian eigenvalue satisfies `0 <= eta lam (1 + rho lam^2) <= 2`, which excludes every
  negative eigenvalue (HUSAM never converges to a saddle) and penalizes large ones more sharply
  than USAM. One-call form only.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the perturbation scale; a float or a schedule of the step count.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.husam(optax.sgd(0.1), rho=0.05)

  References:
    Bolte, Le & Pauwels, https://arxiv.org/abs/2510.09034
  """
  pieces = Pieces(ascent=ascents.hessian_ascent(rho), needs_grad_fn=True)
  return build_variant(inner, pieces, dict(rho=rho), options, name="husam")


@variant
def penalty_sam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
                **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Gradient-norm penalty: the gradient of `L + rho/2 ||grad L||^2`.

  .. math::
    d = g + \rho\, H(w)\, g

  USAM's descent gradient `grad L(w + rho g)` to first order in `rho`: the engine's
  `linearize=True` replaces the perturbed gradient evaluation by one Hessian-vector product
  (forward-over-reverse on `grad_fn`), so a step costs the caller's gradient plus one HVP and no
  gradient at a perturbed point. With `has_aux`, the aux is `grad_fn`'s at `w`. For the gradient
  of `L + rho ||grad L||` use
  `sharpness_aware(inner, normalized_ascent(rho), linearize=True)`.

  Eigenvalue filter (linearization, inner SGD with step `eta`): the same as USAM's,
  `0 <= eta lam (1 + rho lam) <= 2`, which admits `lam <= -1/rho` (it can converge to saddles
  of strong negative curvature). One-call form only.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the penalty weight; a float or a schedule of the step count.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.penalty_sam(optax.sgd(0.1), rho=0.05)

  References:
    Bolte, Le & Pauwels, https://arxiv.org/abs/2510.09034;
    Zhao, Zhang & Hu, *Penalizing Gradient Norm for Efficiently Improving Generalization in
    Deep Learning*, ICML 2022, https://arxiv.org/abs/2202.03599 (they penalize
    `||grad L||`, the normalized form above)
  """
  pieces = Pieces(ascent=ascents.unnormalized_ascent(rho), linearize=True, needs_grad_fn=True)
  return build_variant(inner, pieces, dict(rho=rho), options, name="penalty_sam")


@variant
def multistep_sam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05, steps: int = 2,
                  normalized: bool = True, step_size: ScalarOrSchedule | None = None,
                  project: bool = True, nested: bool = False,
                  **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""SAM with a multi-step ascent: `steps` ascent steps kept in the rho-ball.

  .. math::
    e_0 = 0, \quad e_{j+1} = P_\rho\big(e_j + a\, N(\nabla L(w + e_j))\big), \quad
    d = \nabla L(w + e_k)

  with `a = step_size` (default `rho`), `N(h) = h/||h||` or `h` (`normalized`), and `P_rho` the
  projection onto `||e|| <= rho` (`project`), as in Andriushchenko & Flammarion's iterated
  ascent. `nested=True` drops `e_j` inside the projection (each iterate replaces the previous
  one): `usam2` is `steps=2, normalized=False, project=False, nested=True`, i.e. the nested
  special case, and `steps=1` is SAM (normalized) or USAM (unnormalized, unprojected).

  `steps + 1` gradient evaluations per step (the caller's, `steps - 1` inside the ascent, the
  descent one); no extra state. One-call form only.

  Eigenvalue filter (unnormalized; near a limit point the projection is inactive; inner SGD
  with step `eta`, `x = a lam`): accumulating steps converge only where
  `0 <= eta lam (1 + x)^k <= 2`, nested ones where `0 <= eta lam (1 + x + ... + x^k) <= 2`
  (USAM2 for `k = 2`). For even `k` both exclude negative curvature; for odd `k` they admit
  `lam <= -1/a` as USAM does. Normalized steps do not vanish at a minimum (SAM-like O(rho)
  oscillation, no linear filter beyond GD's).

  Args:
    inner: the optimizer that takes the descent step.
    rho: the ball's radius (and default step size); a float or a schedule of the step count.
    steps: the number of ascent steps `k` >= 1 (list it in `static_args` under
      `optax.inject_hyperparams`, with the three flags below).
    normalized: normalize each ascent step's gradient.
    step_size: the ascent step `a`; None for `rho`. A float or a schedule.
    project: project each iterate onto the rho-ball.
    nested: each iterate replaces the previous one instead of adding to it.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.multistep_sam(optax.sgd(0.1), rho=0.05, steps=3, step_size=0.02)

  References:
    Andriushchenko & Flammarion, *Towards Understanding Sharpness-Aware Minimization*,
    ICML 2022, https://arxiv.org/abs/2206.06232;
    Bolte, Le & Pauwels, https://arxiv.org/abs/2510.09034
  """
  ascent = ascents.multistep_ascent(rho, steps, normalized=normalized, step_size=step_size,
                                    project=project, nested=nested)
  pieces = Pieces(ascent=ascent, needs_grad_fn=steps > 1)
  return build_variant(inner, pieces, dict(rho=rho, steps=steps, normalized=normalized,
                                           step_size=step_size, project=project,
                                           nested=nested), options, name="multistep_sam")


# ------------------------------------------------------------------ the wider field
#
# Each variant below is a composition of the engine's pieces: an ascent (sam_optax/_src/
# ascents.py), an optional descent correction (corrections.py), an optional cadence
# (cadences.py). Every one accepts the shared options (window=, mask= for SAM-ON, renormalize=,
# chunk_size=, ...). "Gradients per step" counts gradient evaluations at run time under jit,
# the caller's clean gradient included where it is read.


@variant
def asam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.5,
         eta: ScalarOrSchedule = 0.01, bias_convention: str = "adaptive",
         **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Adaptive SAM (ASAM): SAM in a scale-invariant metric.

  .. math::
    T_w = |w| + \eta, \qquad \epsilon = \rho\, \frac{T_w^2\, g}{\|T_w\, g\|}, \qquad
    d = \nabla L(w + \epsilon)

  (elementwise `T_w`). The radius is measured in the metric `||T_w^{-1} eps||`, so rescaling a
  layer's weights (which leaves a ReLU network's function unchanged) rescales its
  perturbation alike. With `renormalize=True` both norms of the renormalization are the
  adaptive ones (`||T g|| / ||T d||`). No extra state; two gradient evaluations per step.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the adaptive radius (paper: 0.5 to 2, about 10x SAM's; default 0.5); a float or a
      schedule of the step count.
    eta: the offset in `T_w = |w| + eta` (paper 0.01).
    bias_convention: which leaves keep the identity metric `T = 1`: `"adaptive"` none (the
      paper's formula), `"identity"` every leaf with at most one dimension (biases and
      normalization parameters), `"no_bias"` the leaves whose last key is `bias` (the authors'
      code adapts only tensors named `weight`).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.asam(optax.sgd(0.1, momentum=0.9), rho=0.5, eta=0.01)

  References:
    Kwon et al., *ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
    Deep Neural Networks*, ICML 2021, https://arxiv.org/abs/2102.11600
  """
  ascent = ascents.adaptive_ascent(rho, eta, bias_convention)
  pieces = Pieces(ascent=ascent, metric=ascents.AdaptiveWeights(eta, bias_convention))
  return build_variant(inner, pieces, dict(rho=rho, eta=eta,
                                           bias_convention=bias_convention), options, name="asam")


@variant
def gsam(inner: optax.GradientTransformation, rho_max: float = 0.04, rho_min: float = 0.02,
         alpha: ScalarOrSchedule = 0.4, learning_rate: ScalarOrSchedule | None = None,
         lr_max: float | None = None, lr_min: float | None = None,
         adaptive_perturbation: bool = False, minimize_fp: bool = True,
         **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Surrogate-gap guided SAM (GSAM).

  .. math::
    \epsilon = \rho_t \frac{g}{\|g\|}, \quad g_{adv} = \nabla L(w + \epsilon), \quad
    g_\perp = g - \frac{\langle g, g_{adv}\rangle}{\|g_{adv}\|^2} g_{adv}, \quad
    d = g_{adv} - \alpha\, g_\perp

  with the radius tied to the learning rate,
  `rho_t = clip(rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min), rho_min,
  rho_max)`, evaluated at the engine's step count (so it stays aligned with the inner
  optimizer's schedule under windows), never below `rho_min` (nor negative) during a warmup that
  starts below `lr_min`. Pass the same `learning_rate` schedule as the inner optimizer's, with
  its peak `lr_max` and final value `lr_min`; without `learning_rate` (or with a constant one)
  `rho_t = rho_max`. Sign convention: the paper's and the authors' code, where the clean
  gradient is decomposed relative to the perturbed one and `d = g_adv - alpha g_perp`. No
  extra state; two gradient evaluations per step.

  big_vision's options (`gsam_gradient` in `google-research/big_vision`,
  `big_vision/trainers/proj/gsam/gsam.py`, read for these rules), both off by default (the
  defaults are the rule above, unchanged):

  .. math::
    \text{adaptive\_perturbation:}\quad \epsilon = \rho_t\, |w| \odot \frac{g}{\|g\|};
    \qquad \text{minimize\_fp=False:}\quad
    d = g + \alpha \Big(g_{adv} - \frac{\langle g_{adv}, g\rangle}{\|g\|^2}\, g\Big)

  `adaptive_perturbation=True` scales the perturbation element by element by `|w|` while the
  norm stays that of the raw `g` (not ASAM's metric; big_vision: it handles radii about 10x
  larger, e.g. its ViT-B/32 config `rho_max 0.6, rho_min 0.1, alpha 0.6`);
  `minimize_fp=False` keeps the clean gradient and adds the part of the perturbed one
  orthogonal to it (minimizing the clean loss and the surrogate gap: closer to conventional
  training, fewer loss spikes). One difference from big_vision, whatever the options:
  big_vision's `rho_t` follows the learning rate below `lr_min`, so it drops below `rho_min`
  and turns negative during a warmup from zero; here it stays clipped at `rho_min`. With
  `rho_max = rho_min` and `alpha = 0`, `minimize_fp=True` is SAM (with `|w|` scaling under
  `adaptive_perturbation`) and `minimize_fp=False` the inner optimizer on `g`.

  Args:
    inner: the optimizer that takes the descent step.
    rho_max: the radius at the peak learning rate (paper: 0.04 for ResNets on ImageNet, up to
      0.6 for ViTs).
    rho_min: the radius at the final learning rate (paper: 0.02 for ResNets, 0 for ViTs).
    alpha: the weight of the surrogate-gap component (the authors' example 0.4; the paper
      tunes it in [0, 0.5]).
    learning_rate: the inner optimizer's learning rate (float or optax schedule), or None.
    lr_max: the schedule's peak learning rate (required with a schedule).
    lr_min: the schedule's final learning rate (required with a schedule).
    adaptive_perturbation: scale the perturbation by `|w|` element by element (big_vision's
      option; `sam_optax.weight_scaled_ascent`). Needs the params.
    minimize_fp: True for GSAM's `d = g_adv - alpha g_perp`, False for big_vision's
      `d = g + alpha g_adv_perp` (`sam_optax.surrogate_gap`).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 100, 1000, end_value=1e-3)
    >>> tx = sam_optax.gsam(optax.sgd(lr, momentum=0.9), rho_max=0.04, rho_min=0.02,
    ...                     alpha=0.4, learning_rate=lr, lr_max=0.1, lr_min=1e-3)
    >>> vit = sam_optax.gsam(optax.adam(lr), rho_max=0.6, rho_min=0.1, alpha=0.6,
    ...                      learning_rate=lr, lr_max=0.1, lr_min=1e-3,
    ...                      adaptive_perturbation=True, minimize_fp=False)

  References:
    Zhuang et al., *Surrogate Gap Minimization Improves Sharpness-Aware Training*, ICLR 2022,
    https://arxiv.org/abs/2203.08065 (code: https://github.com/google-research/big_vision)
  """
  if not isinstance(adaptive_perturbation, bool):
    raise TypeError(f"adaptive_perturbation must be a Python bool, got "
                    f"{type(adaptive_perturbation).__name__}.")
  rho = ascents.lr_proportional_rho(learning_rate, rho_max, rho_min, lr_max, lr_min)
  ascent = (ascents.weight_scaled_ascent(rho) if adaptive_perturbation
            else ascents.step_count_ascent(rho))
  pieces = Pieces(ascent=ascent,
                  correction=corrections.surrogate_gap(alpha, minimize_fp=minimize_fp))
  return build_variant(inner, pieces, dict(rho_max=rho_max, rho_min=rho_min, alpha=alpha,
                                           learning_rate=learning_rate, lr_max=lr_max,
                                           lr_min=lr_min,
                                           adaptive_perturbation=adaptive_perturbation,
                                           minimize_fp=minimize_fp), options, name="gsam")


@variant
def looksam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05, k: int = 5,
            alpha: ScalarOrSchedule = 0.7,
            **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""LookSAM: a full SAM step every `k` steps, its sharpness direction reused in between.

  On steps `t = 0 (mod k)`:

  .. math::
    \epsilon = \rho \frac{g}{\|g\|}, \quad d = g_{adv} = \nabla L(w + \epsilon), \quad
    g_v = g_{adv} - \frac{\langle g_{adv}, g\rangle}{\|g\|^2} g

  and on the other steps `d = g + alpha (||g|| / ||g_v||) g_v` with the stored `g_v`. The
  engine's cadence runs the perturbed pass inside a `lax.cond`, so the other steps evaluate no
  second gradient at run time: `1 + 1/k` gradient evaluations per step on average. Extra state:
  `g_v`, one param-sized buffer. Norms are global (the authors' code works per tensor). With a
  window, the cadence counts from step 0 (`k` divides the step count).

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (paper: SAM's); a float or a schedule of the step count.
    k: the period of full SAM steps (paper 5), a Python int (list it in `static_args` under
      `optax.inject_hyperparams`).
    alpha: the weight of the reused component (paper 0.7).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.looksam(optax.sgd(0.1, momentum=0.9), rho=0.05, k=5, alpha=0.7)

  References:
    Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*, CVPR 2022,
    https://arxiv.org/abs/2203.02714
  """
  pieces = Pieces(ascent=ascents.step_count_ascent(rho),
                  correction=corrections.look_ahead_reuse(alpha), cadence=cadences.every(k))
  return build_variant(inner, pieces, dict(rho=rho, k=k, alpha=alpha), options, name="looksam")


def _nan_radius_unless_valid(rho: ScalarOrSchedule, *hparams: ScalarOrSchedule
                             ) -> ScalarOrSchedule:
  """`rho`, made NaN at the steps where a checked run-time hyperparameter of a cadence is not.

  A cadence returns a boolean, which cannot carry the NaN `check_hparam` substitutes for an
  invalid run-time value (a schedule's, or one injected under `jit`); the cadences then take
  the perturbed pass, and this radius makes its perturbation, so the updates, NaN there.
  Concrete hyperparameters were checked at construction: `rho` is returned as is.
  """
  runtime = [h for h in hparams if callable(h)]
  if not runtime:
    return rho

  def radius(count):
    valid = jnp.all(jnp.asarray([jnp.isfinite(value_at(h, count)) for h in runtime]))
    return jnp.where(valid, value_at(rho, count), jnp.nan)
  return radius


@variant
def rst(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
        probability: ScalarOrSchedule = 0.5, seed: int = 0,
        **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Randomized sharpness-aware training (RST): SAM on a random share `p_t` of the steps.

  .. math::
    b_t \sim \mathrm{Bernoulli}(p_t), \qquad
    d = \begin{cases} \nabla L(w + \rho_t\, g / \|g\|) & b_t = 1 \\
                       g & b_t = 0 \end{cases}

  and the inner optimizer steps along `d`. The draw is
  `jax.random.bernoulli(jax.random.fold_in(jax.random.key(seed), t), p_t)`, `p_t` in float32
  (`sam_optax.cadences.bernoulli`): a function of the seed and the step count, identical on
  every device and in both calls of the two-call form, and reproducible. A step without the
  draw is the inner optimizer's own step on `g` (no correction), inside a `lax.cond`, so it
  evaluates no second gradient at run time: `1 + p_t` gradient evaluations per step in
  expectation (1.5 at the default). `probability=1` is `sam` exactly and `probability=0` the
  inner optimizer exactly. `rho`'s schedule, like `p_t`'s, follows the training step (the
  engine's count), drawn or not.

  Source: the paper's abstract (both arXiv versions; v1 is titled SS-SAM): a Bernoulli trial
  with a scheduled probability picks SAM or the base optimizer at every iteration. Its four
  schedules (constant, piecewise, linear, trigonometric, per a summary of v1) are optax
  schedules of the step here, e.g. `optax.linear_schedule(0.2, 0.8, total_steps)`. G-RST (the
  paper's generalized form) is not implemented: its rule could not be read.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (SAM's; 0.05 from scratch); a float or a schedule of the step count.
    probability: `p_t`, the chance of a sharpness-aware step, in `[0, 1]`; a float or a
      schedule of the step count. A run-time value outside `[0, 1]` makes the updates NaN.
    seed: the draws' seed, a Python int (list it in `static_args` under
      `optax.inject_hyperparams`).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.rst(optax.sgd(0.1, momentum=0.9), rho=0.05, probability=0.5, seed=0)

  References:
    Zhao, Zhang & Hu, *Randomized Sharpness-Aware Training for Boosting Computational
    Efficiency in Deep Learning*, 2022, https://arxiv.org/abs/2203.09962
  """
  probability = check_hparam("probability", probability, low=0.0, high=1.0,
                             hint="probability is the chance of a sharpness-aware step.")
  pieces = Pieces(ascent=ascents.step_count_ascent(_nan_radius_unless_valid(rho, probability)),
                  cadence=cadences.bernoulli(probability, seed))
  return build_variant(inner, pieces, dict(rho=rho, probability=probability, seed=seed),
                       options, name="rst")


def _adaptive_pieces(rho, decay, threshold, correction=None) -> Pieces:
  """AE-SAM's pieces: SAM's ascent and `cadences.adaptive`, with `correction` (AE-LookSAM)."""
  decay = check_hparam("decay", decay, low=0.0, high=1.0, high_open=True,
                       hint="decay weighs the previous statistics of ||g||^2 (paper 0.9).")
  threshold = check_hparam("threshold", threshold, low=-float("inf"),
                           hint="threshold is c_t, in moving standard deviations of ||g||^2.")
  return Pieces(ascent=ascents.step_count_ascent(_nan_radius_unless_valid(rho, decay, threshold)),
                correction=correction, cadence=cadences.adaptive(decay, threshold))


@variant
def ae_sam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
           decay: ScalarOrSchedule = 0.9, threshold: ScalarOrSchedule = 0.0,
           **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""AE-SAM: SAM on the steps where `||g||^2` is high for its recent history, else `Opt(g)`.

  .. math::
    n_t = \|g_t\|^2, \quad \mu_t = \delta \mu_{t-1} + (1 - \delta) n_t, \quad
    \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta)(n_t - \mu_t)^2, \\
    d = \begin{cases} \nabla L(w + \rho_t\, g / \|g\|) & n_t \ge \mu_t + c_t \sigma_t \\
                       g & \text{otherwise} \end{cases}

  (`sam_optax.cadences.adaptive`, whose docstring gives the first step, `mu_{-1} =
  sigma_{-1}^2 = 0`, and the handling of non-finite gradients). A large `||g||^2` relative to
  its moving distribution signals a sharp region, where SAM's step is worth its second
  gradient. The statistics are taken on the clean gradient averaged over devices, so every
  replica decides alike; in the two-call form the ascent call decides and the descent call
  follows. Steps without the perturbed pass evaluate no second gradient at run time:
  `1 + (share of SAM steps)` gradient evaluations per step. Extra state: two float32 scalars.

  Source: NEW-VARIANTS.md section b (two secondary sources that agree; the paper's method
  section and hyperparameter table could not be read, only its abstract and introduction).
  Defaults: `decay=0.9` (recalled, not read) and a constant `threshold=0.0`; the paper's `c_t`
  is linear in `t` from `lambda_2` to `lambda_1` (recalled: 1 to -1), which needs the number of
  training steps: pass `threshold=optax.linear_schedule(1.0, -1.0, total_steps)`. With a
  constant threshold the share of SAM steps depends on the gradient's noise (few late SAM
  steps when `||g||^2` decreases steadily); a schedule that ends negative keeps taking them.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (SAM's); a float or a schedule of the step count.
    decay: `delta`, the decay of the moving mean and variance of `||g||^2`, in `[0, 1)`.
    threshold: `c_t`, in moving standard deviations; a float (any sign) or a schedule of the
      step count (e.g. `optax.linear_schedule(1.0, -1.0, total_steps)`, the paper's form).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, ... (not `chunk_size`: the decision needs the whole batch's `g`).

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.ae_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, decay=0.9,
    ...                       threshold=optax.linear_schedule(1.0, -1.0, 10_000))

  References:
    Jiang, Yang, Zhang & Kwok, *An Adaptive Policy to Employ Sharpness-Aware Minimization*,
    ICLR 2023, https://arxiv.org/abs/2304.14647
  """
  pieces = _adaptive_pieces(rho, decay, threshold)
  return build_variant(inner, pieces, dict(rho=rho, decay=decay, threshold=threshold), options,
                       name="ae_sam")


@variant
def ae_looksam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
               decay: ScalarOrSchedule = 0.9, threshold: ScalarOrSchedule = 0.0,
               alpha: ScalarOrSchedule = 0.7,
               **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""AE-LookSAM: LookSAM whose full SAM steps are AE-SAM's adaptive choice, not every `k`.

  On the steps AE-SAM's policy takes (`n_t = ||g||^2 >= mu_t + c_t sigma_t`, see `ae_sam`)

  .. math::
    \epsilon = \rho \frac{g}{\|g\|}, \quad d = g_{adv} = \nabla L(w + \epsilon), \quad
    g_v = g_{adv} - \frac{\langle g_{adv}, g\rangle}{\|g\|^2} g

  and on the others `d = g + alpha (||g|| / ||g_v||) g_v` with the stored `g_v` (zero before the
  first SAM step: `d = g` there). Steps without the perturbed pass evaluate no second gradient
  at run time. Extra state: `g_v` (one param-sized buffer) and two float32 scalars.

  Source: the paper's abstract names AE-LookSAM (the adaptive policy applied to LookSAM); the
  reuse on the other steps follows LookSAM, per a secondary source only (NEW-VARIANTS.md,
  section b). Norms are global. Defaults as in `ae_sam` and `looksam`.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (SAM's); a float or a schedule of the step count.
    decay: `delta`, the decay of the moving mean and variance of `||g||^2`, in `[0, 1)`.
    threshold: `c_t`, in moving standard deviations; a float or a schedule of the step count.
    alpha: the weight of the reused component (LookSAM's 0.7).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, ... (not `chunk_size`).

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.ae_looksam(optax.sgd(0.1, momentum=0.9), rho=0.05, alpha=0.7,
    ...                           threshold=optax.linear_schedule(1.0, -1.0, 10_000))

  References:
    Jiang, Yang, Zhang & Kwok, *An Adaptive Policy to Employ Sharpness-Aware Minimization*,
    ICLR 2023, https://arxiv.org/abs/2304.14647

    Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*, CVPR 2022,
    https://arxiv.org/abs/2203.02714
  """
  pieces = _adaptive_pieces(rho, decay, threshold, corrections.look_ahead_reuse(alpha))
  return build_variant(inner, pieces, dict(rho=rho, decay=decay, threshold=threshold,
                                           alpha=alpha), options, name="ae_looksam")


@variant
def friendly_sam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
                 sigma: ScalarOrSchedule = 1.0, lam: ScalarOrSchedule = 0.9,
                 **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Friendly SAM (F-SAM): perturb along the gradient's stochastic (noise) component.

  .. math::
    \epsilon = \rho \frac{g - \sigma m_{t-1}}{\|g - \sigma m_{t-1}\|}, \qquad
    m_t = \lambda m_{t-1} + (1 - \lambda) g, \qquad d = \nabla L(w + \epsilon)

  `m` estimates the full-batch gradient; the perturbation subtracts the previous estimate
  (`m_0 = g_1`: the first step is SAM's), as in the authors' code. Extra state: `m`, one
  param-sized buffer. Two gradient evaluations per step.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (authors' default 0.05); a float or a schedule of the step count.
    sigma: the weight of the subtracted average (paper 1).
    lam: the EMA decay (paper 0.6 to 0.95; authors' default 0.9).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.friendly_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, lam=0.9)

  References:
    Li et al., *Friendly Sharpness-Aware Minimization*, CVPR 2024,
    https://arxiv.org/abs/2403.12350
  """
  pieces = Pieces(ascent=ascents.friendly_ascent(rho, sigma, lam))
  return build_variant(inner, pieces, dict(rho=rho, sigma=sigma, lam=lam), options,
                       name="friendly_sam")


@variant
def vasso(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
          theta: ScalarOrSchedule = 0.9,
          **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Variance-suppressed sharpness-aware optimization (VaSSO).

  .. math::
    d_t = (1 - \theta) d_{t-1} + \theta g, \qquad \epsilon = \rho \frac{d_t}{\|d_t\|},
    \qquad d = \nabla L(w + \epsilon)

  (`d_1 = g_1`, as in the authors' code). Averaging stabilizes the adversary's direction.
  Extra state: one param-sized buffer. Two gradient evaluations per step.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (the paper uses SAM's tuned value); a float or a schedule.
    theta: the weight of the new gradient in (0, 1] (paper 0.9; `theta = 1` is SAM).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.vasso(optax.sgd(0.1, momentum=0.9), rho=0.05, theta=0.9)

  References:
    Li & Giannakis, *Enhancing Sharpness-Aware Optimization Through Variance Suppression*,
    NeurIPS 2023, https://arxiv.org/abs/2309.15639
  """
  pieces = Pieces(ascent=ascents.variance_suppressed_ascent(rho, theta))
  return build_variant(inner, pieces, dict(rho=rho, theta=theta), options, name="vasso")


@variant
def momentum_sam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.3,
                 **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Momentum-SAM (MSAM): the perturbation is the last step's direction, free of gradients.

  .. math::
    \epsilon_t = \rho \frac{w_t - w_{t-1}}{\|w_t - w_{t-1}\|}, \qquad
    d = \nabla L(w_t + \epsilon_t)

  With heavy-ball SGD the last step is `-lr v`, so this is exactly the paper's gradient at
  `w - rho v / ||v||` (v the momentum buffer), read from the params so that any inner optimizer
  works. With Adam(W) the paper perturbs along the first moment `m`; this follows the last step
  `-lr m_hat / (sqrt(v_hat) + eps)` instead (the direction the optimizer actually moved).
  Zero on the first step. **One gradient evaluation per step**: the ascent does not read
  the clean gradient, so under `jax.jit` a clean gradient computed only for this update is dead
  code; the caller may pass zeros (`optax.tree.zeros_like(params)`) or the clean gradient
  (needed with `window=` outside the window, and with `renormalize=True`). Extra state: the
  previous params (one param-sized buffer). In the two-call form the first call needs no real
  gradient either (pass zeros) and returns `eps`.

  Args:
    inner: the optimizer that takes the descent step (the paper: SGD with momentum, or AdamW).
    rho: the step length along the last update (authors' default 0.3; their CIFAR
      configurations up to 3, larger than SAM's since the direction is not adversarial).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import jax, optax, sam_optax
    >>> tx = sam_optax.momentum_sam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    >>> # updates, state = tx.update(optax.tree.zeros_like(params), state, params,
    >>> #                            grad_fn=lambda p: jax.grad(loss)(p, batch))

  References:
    Becker, Altrock & Risse, *Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead*, https://arxiv.org/abs/2401.12033
  """
  pieces = Pieces(ascent=ascents.momentum_ascent(rho))
  return build_variant(inner, pieces, dict(rho=rho), options, name="momentum_sam")


@variant
def sampa(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.1,
          lam: ScalarOrSchedule = 0.2, learning_rate: ScalarOrSchedule | None = None,
          evaluation: Literal["sequential", "vmap"] = "sequential",
          point_axis_name: Hashable | None = None,
          **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""SAMPa: SAM's two gradients made independent, so that they can run at the same time.

  .. math::
    \tilde x_t = x_t + \rho \frac{g_y}{\|g_y\|}, \qquad
    y_{t+1} = x_t + \mathrm{Opt}_{peek}(g_y) \;\text{ or }\; x_t - \eta_t g_y,

    d_t = (1 - \lambda) \nabla f(\tilde x_t) + \lambda \nabla f(y_{t+1}), \qquad
    g_y \leftarrow \nabla f(y_{t+1}), \qquad x_{t+1} = x_t + \mathrm{Opt}(d_t)

  Both points depend only on `x_t` and the kept `g_y`, so their gradients are independent: on
  two devices a step costs the wall time of one gradient. Source: the authors' code
  (LIONS-EPFL/SAMPa, `train.py`) and README. Without `learning_rate`, `y` is the inner
  optimizer's update at `g_y` from its current state (momentum, weight decay), not committed,
  as the code computes it; with `learning_rate` (a float or the inner schedule, of the step
  count) `y = x - lr_t g_y` as in the paper. First step as in the code: `g_y = 0`, so both
  points are `x_0` (up to the peek's weight decay) and the step is the inner optimizer's on
  `grad f(x_0)`. The caller's clean gradient is never read (pass zeros; under `jax.jit` a clean
  gradient computed only for this update is dead code), except by `renormalize=True` and off
  the `window`. Deviation from the code: both gradients use the batch `grad_fn` closes over;
  the code takes the perturbed one on the previous iteration's batch. `lam = 0` is the pure
  SAMPa here (the code's all-reduce recovers `g_y` by dividing by `lam`).

  Cost: two gradient evaluations per step, plus the peek (one elementwise inner update);
  state: `g_y`, one param-sized buffer. `evaluation="sequential"` evaluates the two points one
  after the other (SAM's memory), `"vmap"` batches them into one pass (twice the activation
  memory; faster where one pass leaves the device idle). `point_axis_name` names a `shard_map`
  mesh axis of size 2: each device group evaluates one point on the same batch and a `psum`
  exchanges the gradients (`benchmarks/sampa_devices.py` shows the setup). One-call form only.

  Args:
    inner: the optimizer (the authors: SGD, momentum 0.9, weight decay 5e-4, cosine schedule).
    rho: the perturbation radius, >= 0 (the code's default 0.1).
    lam: the weight of the auxiliary gradient, in [0, 1] (the code's default 0.2).
    learning_rate: None for the code's peek at the inner optimizer, or the paper's step size
      `eta_t` (a float or a schedule of the step count) for `y = x - eta_t g_y`.
    evaluation: `"sequential"` or `"vmap"` (see above); the trajectory is the same.
    point_axis_name: a `shard_map` mesh axis of size 2 with one device group per point
      (overrides `evaluation`); None on one device.
    **options: the options every variant shares (`SharedOptions`), except `mask` and
      `two_call`.

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> tx = sam_optax.sampa(optax.sgd(0.1, momentum=0.9), rho=0.1, lam=0.2)
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(optax.tree.zeros_like(params), state, params,
    ...                            grad_fn=jax.grad(loss))
    >>> params = optax.apply_updates(params, updates)

  References:
    Xie, Pethick & Cevher, *SAMPa: Sharpness-aware Minimization Parallelized*, NeurIPS 2024,
    https://arxiv.org/abs/2410.10683; code https://github.com/LIONS-EPFL/SAMPa
  """
  if options.get("mask") is not None:
    raise ValueError("sampa cannot take mask=: its auxiliary point y moves every entry, and "
                     "the mask would restrict x + eps only. Drop mask.")
  pieces = Pieces(ascent=sampa_pieces.sampa_ascent(rho, inner, learning_rate),
                  correction=sampa_pieces.sampa_correction(lam), needs_grad_fn=True)
  engine_options = dict(options, point_evaluation=evaluation, point_axis_name=point_axis_name)
  return build_variant(inner, pieces, dict(rho=rho, lam=lam), engine_options, name="sampa")


@variant
def fisher_sam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.1,
               eta: ScalarOrSchedule = 1.0,
               **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Fisher SAM: SAM in the (diagonal, empirical) Fisher metric.

  .. math::
    F = 1 + \eta\, g^2, \qquad \epsilon = \rho \frac{F^{-1} g}{\sqrt{g^\top F^{-1} g}},
    \qquad d = \nabla L(w + \epsilon)

  (elementwise `F`, from the squared mini-batch gradient). No extra state; two gradient
  evaluations per step.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius in the Fisher metric (default 0.1, our reading of the paper's setting);
      a float or a schedule.
    eta: the weight of the Fisher term (default 1.0; `eta = 0` is SAM).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.fisher_sam(optax.sgd(0.1, momentum=0.9), rho=0.1, eta=1.0)

  References:
    Kim et al., *Fisher SAM: Information Geometry and Sharpness Aware Minimisation*,
    ICML 2022, https://arxiv.org/abs/2206.04920
  """
  pieces = Pieces(ascent=ascents.fisher_ascent(rho, eta))
  return build_variant(inner, pieces, dict(rho=rho, eta=eta), options, name="fisher_sam")


@variant
def random_sam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
               sigma: ScalarOrSchedule = 0.01, lam: ScalarOrSchedule = 1.0, seed: int = 0,
               **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Random SAM (R-SAM): SAM's step taken on the randomly smoothed loss.

  .. math::
    \delta \sim \mathcal{N}(0, \sigma^2 I), \quad \tilde g = \nabla L(w + \delta), \quad
    \epsilon = \delta + \lambda \rho \frac{\tilde g}{\|\tilde g\|}, \quad
    d = \nabla L(w + \epsilon)

  (our reading of the paper's Algorithm 1, with isotropic noise). The ascent evaluates the
  gradient at the noisy point itself (one-call form only) and does not read the clean gradient:
  two gradient evaluations per step, like SAM; the caller may pass zeros as the clean gradient.
  Extra state: a raw PRNG key (`jax.random.PRNGKey(seed)`, split once per step; under
  m-sharpness every chunk draws the same noise).

  Args:
    inner: the optimizer that takes the descent step.
    rho: the adversarial radius; a float or a schedule.
    sigma: the noise's standard deviation.
    lam: the weight of the adversarial step (1: SAM's full step).
    seed: the seed of the noise (a Python int).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.random_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, sigma=0.01, seed=0)

  References:
    Liu et al., *Random Sharpness-Aware Minimization*, NeurIPS 2022,
    https://openreview.net/forum?id=htUvh7xPoa
  """
  pieces = Pieces(ascent=ascents.random_smoothing_ascent(rho, sigma, lam, seed),
                  needs_grad_fn=True)
  return build_variant(inner, pieces, dict(rho=rho, sigma=sigma, lam=lam, seed=seed), options,
                       name="random_sam")


@variant
def esam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
         beta: ScalarOrSchedule = 0.6, seed: int = 0,
         **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Efficient SAM (ESAM): stochastic weight perturbation.

  .. math::
    m_i \sim \mathrm{Bernoulli}(\beta)\ \text{per leaf}, \qquad
    \epsilon = \frac{\rho}{\beta} \frac{m \odot g}{\|m \odot g\|}, \qquad
    d = \nabla L(w + \epsilon)

  Each leaf joins the ascent with probability `beta`; the norm is over the kept leaves and the
  step is scaled by `1/beta`, as in the authors' code. ESAM's second strategy,
  sharpness-sensitive data selection (the descent gradient on the examples whose loss rose most
  under the perturbation), needs per-example losses: build the `grad_fn` with
  `sam_optax.sharpness_sensitive_grad_fn(per_example_loss, params, batch, gamma)`. Extra state:
  a raw PRNG key. Two gradient evaluations per step (the second on a `gamma` fraction of the
  batch with data selection).

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (SAM's, 0.05); a float or a schedule.
    beta: the probability that a leaf is perturbed (paper 0.5 to 0.6; 1 is SAM).
    seed: the seed of the draws (a Python int).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.esam(optax.sgd(0.1, momentum=0.9), rho=0.05, beta=0.6)

  References:
    Du et al., *Efficient Sharpness-aware Minimization for Improved Training of Neural
    Networks*, ICLR 2022, https://arxiv.org/abs/2110.03141
  """
  pieces = Pieces(ascent=ascents.stochastic_weight_ascent(rho, beta, seed))
  return build_variant(inner, pieces, dict(rho=rho, beta=beta, seed=seed), options, name="esam")


@variant
def wsam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
         gamma: ScalarOrSchedule = 0.9, decouple: bool = False,
         learning_rate: ScalarOrSchedule | None = None,
         **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Weighted SAM (WSAM): the sharpness as a weighted regularization term.

  .. math::
    \epsilon = \rho \frac{g}{\|g\|}, \qquad
    L_{WSAM} = L + \frac{\gamma}{1 - \gamma}\big(L(w + \epsilon) - L(w)\big)

  Coupled (`decouple=False`): the inner optimizer gets the gradient of `L_WSAM`,
  `d = g + gamma/(1 - gamma) (grad L(w + eps) - g)`. Decoupled (`decouple=True`, the authors'
  default; pass the inner optimizer's `learning_rate`): the inner optimizer gets `g` and the
  sharpness step bypasses it, like AdamW's weight decay,

  .. math::
    w \leftarrow w + \mathrm{Opt}(g) - \eta_t \frac{\gamma}{1 - \gamma}
    \big(\nabla L(w + \epsilon) - g\big).

  `gamma = 1/2` is SAM (coupled), `gamma = 0` the inner optimizer. Extra state: none coupled,
  one param-sized buffer decoupled (the sharpness term, as in the authors' code). Two gradient
  evaluations per step.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (authors' default 0.05); a float or a schedule.
    gamma: the sharpness weight in [0, 1) (authors' default 0.9).
    decouple: apply the sharpness term outside the inner optimizer (needs `learning_rate`).
    learning_rate: the inner optimizer's learning rate (float or schedule) for the decoupled
      step.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.wsam(optax.sgd(0.1, momentum=0.9), rho=0.05, gamma=0.9)
    >>> tx = sam_optax.wsam(optax.adamw(1e-3), rho=0.05, gamma=0.9, decouple=True,
    ...                     learning_rate=1e-3)

  References:
    Yue et al., *Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term*, KDD 2023, https://arxiv.org/abs/2305.15817
  """
  if not isinstance(decouple, bool):
    raise TypeError(f"decouple must be a Python bool, got {type(decouple).__name__}.")
  if decouple and learning_rate is None:
    raise ValueError("wsam(..., decouple=True) applies the sharpness step outside the inner "
                     "optimizer, scaled by its learning rate: pass learning_rate= (the same "
                     "float or schedule as the inner optimizer's).")
  correction = corrections.weighted_sharpness(gamma, decoupled=decouple)
  step = corrections.decoupled_sharpness_step(learning_rate) if decouple else None
  pieces = Pieces(ascent=ascents.step_count_ascent(rho), correction=correction, decoupled=step)
  return build_variant(inner, pieces, dict(rho=rho, gamma=gamma, decouple=decouple,
                                           learning_rate=learning_rate), options, name="wsam")


@variant
def bsam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.01,
         num_data: float | None = None, b1: ScalarOrSchedule = 0.9, b2: ScalarOrSchedule = 0.999,
         weight_decay: ScalarOrSchedule = 0.0, damping: ScalarOrSchedule = 0.1,
         init_precision: float = 1.0, seed: int = 0,
         **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Bayesian SAM (bSAM): SAM as a relaxation of Bayes, an Adam-like method with a posterior.

  With `s` the posterior precision (variance `1/(N s)`), per step (elementwise):

  .. math::
    \theta = w + \frac{z}{\sqrt{N s}}, \quad g = \nabla L(\theta), \quad
    \epsilon = \rho \frac{g}{s}, \quad g_\epsilon = \nabla L(w + \epsilon),

    g_m \leftarrow \beta_1 g_m + (1 - \beta_1)(g_\epsilon + \delta w), \quad
    s \leftarrow \beta_2 s + (1 - \beta_2)(\sqrt{s}\,|g| + \delta + \gamma), \quad
    w \leftarrow w - \alpha \frac{g_m}{s}

  The paper's Algorithm 1, in its order (the mean step divides by the updated `s`; the
  authors' code divides by the previous one). Pieces: the ascent (noise, noisy gradient, `eps`,
  precision update; `sam_optax.bayesian_ascent`) and the descent correction `d = g_m / s`
  (`sam_optax.bayesian_descent`, reading `s` from the ascent's state); **the inner optimizer
  must be `optax.sgd(learning_rate)` without momentum** for bSAM's update (a learning-rate
  schedule is fine). Two gradient evaluations per step (noisy and perturbed); the clean
  gradient is not read (pass zeros). Extra state: `s` and `g_m` (two param-sized buffers)
  and a PRNG key. One-call form only. With `mask=` (SAM-ON) only the masked leaves are sampled,
  perturbed and get a learned precision; the others keep `s = init_precision`. `rho=0` is not
  the inner optimizer (the precision still preconditions).

  Args:
    inner: `optax.sgd(learning_rate)` (paper's alpha; authors' CIFAR setting 0.5).
    rho: the radius (authors' CIFAR setting 0.01).
    num_data: `N` > 0, the training-set size (required; the authors multiply it by an
      augmentation factor of 4).
    b1: the gradient momentum in [0, 1) (0.9).
    b2: the precision's decay in [0, 1) (0.999).
    weight_decay: `delta`, the prior precision divided by `N` (the authors: 10 / N).
    damping: `gamma` (0.1).
    init_precision: the initial `s` (1.0).
    seed: the seed of the posterior samples (a Python int).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.bsam(optax.sgd(0.5), rho=0.01, num_data=50_000 * 4,
    ...                     weight_decay=10 / (50_000 * 4))

  References:
    Mollenhoff & Khan, *SAM as an Optimal Relaxation of Bayes*, ICLR 2023,
    https://arxiv.org/abs/2210.01620
  """
  ascent = ascents.bayesian_ascent(rho, num_data, b2, weight_decay, damping, init_precision,
                                   seed)
  descent = corrections.bayesian_descent(b1, weight_decay, init_precision)
  pieces = Pieces(ascent=ascent, correction=descent, needs_grad_fn=True)
  return build_variant(inner, pieces, dict(rho=rho, num_data=num_data, b1=b1, b2=b2,
                                           weight_decay=weight_decay, damping=damping,
                                           init_precision=init_precision, seed=seed), options,
                       name="bsam")


# ------------------------------------------------------------------ modern variants


@variant
def gcsam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
          axes: Callable[[Any], Any] | None = None,
          **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Gradient-centralized SAM (GCSAM): SAM's ascent along the centralized gradient.

  .. math::
    \mathrm{GC}(g)_l = g_l - \mathrm{mean}_{A_l}(g_l), \qquad
    \epsilon = \rho\, \frac{\mathrm{GC}(g)}{\|g\|}, \qquad d = \nabla L(w + \epsilon)

  Each leaf with at least two dimensions is centralized over every axis but the last (its
  output axis in Flax and Haiku layouts; `axes=` overrides the choice), vectors and scalars are
  left as they are, and the norm is that of the raw gradient, taken before centralizing. Only
  the ascent is centralized: the descent gradient reaches the inner optimizer as it is. This
  follows the authors' code (`Mohamed-Hassan22/GCSAM`, `cifar10_gcsam_resnet50.py`); a
  summary that normalizes by `||GC(g)||` and centralizes the descent gradient too does not.
  See `sam_optax.centralized_ascent`. No extra state; two gradient evaluations per step.

  Args:
    inner: the optimizer that takes the descent step (the authors: Adam, lr 1e-4).
    rho: the radius (the authors' 0.05); a float or a schedule of the step count.
    axes: None (every axis but the last, on leaves with >= 2 dimensions), or a function from
      a gradient leaf to the axes to average over (`()` or None: leave the leaf as it is);
      structural: under `optax.inject_hyperparams`, list it in `static_args`.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.gcsam(optax.adam(1e-4), rho=0.05)

  References:
    Hassan, Vakanski, Zhang & Xian, *GCSAM: Gradient Centralized Sharpness Aware Minimization*,
    https://arxiv.org/abs/2501.11584
  """
  pieces = Pieces(ascent=ascents.centralized_ascent(rho, axes))
  return build_variant(inner, pieces, dict(rho=rho, axes=axes), options, name="gcsam")


@variant
def sagm(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
         alpha: ScalarOrSchedule = 0.001,
         **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Sharpness-Aware Gradient Matching (SAGM).

  .. math::
    \epsilon = \rho\, \frac{g}{\|g\|} - \alpha\, g, \qquad
    d = \frac{g + \nabla L(w + \epsilon)}{2}

  as in the authors' code (`Wang-pengfei/SAGM`, `domainbed/sagm/sagm.py`: the perturbation
  `(rho / ||g|| - alpha) g`, then `grad += old_g/2 - grad/2`). The paper's objective
  minimizes the empirical and the perturbed loss together (its abstract), and its update
  descends their sum `g + grad L(w + eps)` (as recalled: the algorithm box was not read); the
  code halves it, which is a factor 2 on an SGD learning rate and nothing for Adam (up to its
  epsilon). This follows the code. `alpha = 0` is SAM's ascent with the averaged descent;
  `rho = alpha = 0` is the inner optimizer. No extra state; two gradient evaluations per
  step. See `sam_optax.sagm_ascent` and `sam_optax.average_with_clean`.

  Args:
    inner: the optimizer that takes the descent step (the authors: DomainBed's Adam).
    rho: the radius (the authors' 0.05); a float or a schedule of the step count.
    alpha: the step back along `g` in the perturbation (the authors' runs: 0.001; tuned per
      dataset); a float or a schedule.
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import optax, sam_optax
    >>> tx = sam_optax.sagm(optax.adam(1e-4), rho=0.05, alpha=0.001)

  References:
    Wang et al., *Sharpness-Aware Gradient Matching for Domain Generalization*, CVPR 2023,
    https://arxiv.org/abs/2303.10353
  """
  pieces = Pieces(ascent=ascents.sagm_ascent(rho, alpha),
                  correction=corrections.average_with_clean(0.5))
  return build_variant(inner, pieces, dict(rho=rho, alpha=alpha), options, name="sagm")


@variant
def gam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.2,
        rho_prime: ScalarOrSchedule = 0.03, alpha: ScalarOrSchedule = 0.1,
        beta: ScalarOrSchedule = 0.1, gamma: ScalarOrSchedule = 0.05,
        h_minus: Literal["paper", "code"] = "paper",
        **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Accelerated Gradient norm Aware Minimization (GAM): four gradients per step.

  .. math::
    g_0 = \nabla L(w), \quad g_1 = \nabla L\Big(w + \rho' \frac{g_0}{\|g_0\|}\Big), \quad
    h_0 = g_1 - g_0, \quad w_2 = w + \rho \frac{h_0}{\|h_0\|},

    g_2 = \nabla L(w_2), \quad g_3 = \nabla L\Big(w_2 + \rho' \frac{g_2}{\|g_2\|}\Big),

    h_+ = \alpha g_1 + (1 - \alpha) g_3, \quad h_- = \beta g_0 + (1 - \beta) g_2, \quad
    h_{-,\perp} = h_- - \frac{\langle h_-, h_+\rangle}{\|h_+\|^2} h_+, \quad
    d = h_+ - \gamma\, h_{-,\perp}

  and `w <- w + Opt(d)`. GAM minimizes the perturbed loss together with first-order flatness,
  the largest gradient norm within the radius: `w2` ascends the gradient norm along the
  finite difference `h0` (about `rho' H g0/||g0|| = rho' grad ||grad L||`, no Hessian-vector
  product), `h+` mixes the SAM gradients at `w` and at `w2`, `h-` the clean gradients there,
  and `h-_perp` is GSAM's decomposition applied to the two mixtures (`rho = 0` below is GSAM
  itself). This is the paper's Algorithm 2 ("accelerated GAM", the one the authors release;
  the Hessian-vector form, Algorithm 1, is not released), as the official repository's image
  of it states it, checked line by line against its code (`xxgege/GAM`, `gam/gam.py`,
  `main_cifar.py`).

  `h_minus` chooses between the paper and the code where they differ: `"paper"` (default) is
  Algorithm 2's `h- = beta g0 + (1 - beta) g2`; `"code"` is `gam/gam.py`'s
  `h- = g0 + (1 - beta) g2` (coefficient 1 on `g0`: `pro_m = g_0 + |grad_beta_2| g_2` with
  `grad_beta_2 = 1 - beta`). Elsewhere the code and the paper agree, up to the guard: here
  `x/||x||` is 0 where `x = 0`, where the code adds 1e-12 to every norm. The code's
  `adaptive=True` (`|w|`-weighted norms) is not offered. The code's weight decay is SGD's,
  applied to `d`: put `optax.add_decayed_weights` in `inner`. Batches: the four gradients use
  the batch `grad_fn` closes over (the code's too).

  `rho = rho' = 0`: every point is `w`, the four gradients are `g0` and `d = g0`, i.e. the inner
  optimizer (bit for bit in the paper's form; to rounding in the code's, whose `h-` is then
  `(2 - beta) g0`, parallel to `h+`). `rho = 0` alone: `w2 = w`, so `g2 = g0`, `g3 = g1`
  (SAM's gradient at radius `rho'`) and `d = g1 - gamma g0_perp`, which is
  `gsam(inner, rho_max=rho', rho_min=rho', alpha=gamma)` (`alpha=(2 - beta) gamma` in the
  code's form). `alpha = gamma = 0`: `d = g3`, the SAM gradient at the gradient-norm ascent
  point `w2`.

  Cost: four gradient evaluations per step (the caller's `g0`, `g1` and `g2` inside the
  ascent, `g3` at the perturbed point), all sequential; no param-sized state: `g1` and `g2`
  reach the correction through the engine's per-step carry (a `sam_optax.Perturbation`'s
  `carry`), not the state. One-call form only; `mask` is refused (the correction mixes whole
  gradients). See `sam_optax.gam_ascent` and `sam_optax.gam_correction`.

  Args:
    inner: the optimizer (the authors: SGD, momentum 0.9, weight decay 5e-4, cosine lr).
    rho: the radius of the gradient-norm step along `h0` (the code's `grad_norm_rho`, 0.2 in
      every published config); a float or a schedule of the step count.
    rho_prime: the radius of the two SAM steps (the code's `grad_rho`: 0.03 for ResNets on
      CIFAR-10, 0.02 on CIFAR-100, 0.04 for PyramidNet on CIFAR-100); a float or a schedule.
    alpha: the weight of `g1` in `h+`, in [0, 1] (`grad_beta_1`: 0.1 on CIFAR-10, 0.6 for
      ResNets on CIFAR-100); a float or a schedule (alpha, beta and gamma: of the count of
      steps with the perturbed pass).
    beta: the weight of `g0` in `h-`, in [0, 1] (`grad_beta_0`: 0.1 on CIFAR-10, 0.5 for
      ResNets on CIFAR-100); a float or a schedule.
    gamma: the weight of the orthogonal component, >= 0 (`grad_gamma`: 0.05 for ResNets on
      CIFAR-10, 0.03 on CIFAR-100); a float or a schedule.
    h_minus: `"paper"` or `"code"` (see above); a Python string.
    **options: the options every variant shares (`SharedOptions`), except `mask` and
      `two_call`.

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda p: jnp.sum(jnp.cos(p['w'])) + jnp.sum(p['w'] ** 2)
    >>> tx = sam_optax.gam(optax.sgd(0.1, momentum=0.9), rho=0.2, rho_prime=0.03)
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            grad_fn=jax.grad(loss))
    >>> params = optax.apply_updates(params, updates)

  References:
    Zhang, Xu, Yu, Zou & Cui, *Gradient Norm Aware Minimization Seeks First-Order Flatness and
    Improves Generalization*, CVPR 2023, https://arxiv.org/abs/2303.03108 (code:
    https://github.com/xxgege/GAM)
  """
  if options.get("mask") is not None:
    raise ValueError("gam cannot take mask=: its correction mixes the whole gradients g0..g3, "
                     "and a mask would restrict the perturbation only. Drop mask.")
  pieces = Pieces(ascent=gam_pieces.gam_ascent(rho, rho_prime),
                  correction=gam_pieces.gam_correction(alpha, beta, gamma, h_minus),
                  needs_grad_fn=True)
  return build_variant(inner, pieces, dict(rho=rho, rho_prime=rho_prime, alpha=alpha, beta=beta,
                                           gamma=gamma, h_minus=h_minus), options, name="gam")
