"""The transformation type every variant returns, and the engine's state."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, cast

import jax
import optax


class Decision(NamedTuple):
  """Which kind of step this is, from the window and the cadence (bool scalars)."""
  inside: jax.Array     # inside the window: False makes the step the inner optimizer's on g.
  perturbed: jax.Array  # takes the perturbed pass: inside the window and the cadence says so.


class CadenceState(NamedTuple):
  """The states of the two pieces that decide which steps take the perturbed pass."""
  window: Any   # the window piece's state; None without a window (EmptyState for (start, end)).
  cadence: Any  # the cadence piece's state; None without a cadence (EmptyState for every(k)).


class PendingDescent(NamedTuple):
  """What an ascent call leaves for the next descent call (two-call form only)."""
  descending: jax.Array  # bool scalar: True when the next call is a descent call.
  clean_grads: Any       # g, the gradient the ascent call received; None when nothing reads it.
  clean_params: Any      # w, the params before the perturbation was applied.
  decision: Decision | None = None  # the ascent call's decision, which the descent call
  # follows; None when every step is perturbed (no window, no cadence).


class SharpnessAwareState(NamedTuple):
  """State of a sharpness-aware transformation."""
  count: jax.Array         # int32 scalar: descent steps taken; the cadence's argument.
  ascent_state: Any        # state of the ascent transformation.
  correction_state: Any    # state of the descent correction (EmptyState when there is none).
  inner_state: Any         # state of the wrapped optimizer; advances on descent steps only.
  cadence_state: CadenceState  # states of the window and the cadence; advance once per step.
  mask_state: Any          # state of an element-wise Mask piece; None without one.
  pending: PendingDescent | None  # two-call form only; None in the one-call form.


class UpdateWithAux(Protocol):
  """`update_with_aux(grads, state, params=None, **extra_args) -> (updates, state, aux)`."""

  def __call__(self, updates: optax.Updates, state: optax.OptState,
               params: optax.Params | None = None, /,
               **extra_args: Any) -> tuple[optax.Updates, optax.OptState, Any]: ...


class SharpnessAwareTransformation(optax.GradientTransformationExtraArgs):
  """An `optax.GradientTransformationExtraArgs` that can also return the perturbed pass's aux.

  `init` and `update` are the usual optax pair. `update_with_aux(grads, state, params,
  grad_fn=...)` runs the same step and returns `(updates, state, aux)`, where `aux` is what a
  `grad_fn` built with `has_aux=True` returned at the perturbed params (zeros of the same
  structure on steps without a perturbed pass); it raises a ValueError for a transformation
  built without `has_aux=True` or with `two_call=True`. `has_aux` records whether `grad_fn`
  must return `(grads, aux)`, so that wrappers (e.g. `sam_optax.flax`) can build a matching
  one; `two_call` whether it is the two-call form.

  Attributes:
    init: `init(params) -> state`.
    update: `update(grads, state, params=None, **extra_args) -> (updates, state)`.
    update_with_aux: `update_with_aux(grads, state, params=None, **extra_args) -> (updates,
      state, aux)`.
    has_aux: whether `grad_fn` returns `(grads, aux)`.
    two_call: whether ascent and descent alternate over successive `update` calls.
  """
  # Declared for type checkers; the values live in the instance's __dict__ (see __new__).
  update_with_aux: UpdateWithAux
  has_aux: bool
  two_call: bool

  def __new__(cls, init: Callable[..., Any], update: Callable[..., Any],
              update_with_aux: Callable[..., Any] | None = None, has_aux: bool = False,
              two_call: bool = False) -> SharpnessAwareTransformation:
    self = super().__new__(cls, init, update)
    # Instances of optax's NamedTuple subclasses carry a __dict__; the third entry point lives
    # there so that optax, which reads the two fields, sees an ordinary transformation.
    self.update_with_aux = cast(UpdateWithAux, update_with_aux or _no_update_with_aux)
    self.has_aux = has_aux
    self.two_call = two_call
    return self


def _no_update_with_aux(*args: Any, **kwargs: Any) -> Any:
  """The `update_with_aux` of a transformation built without one (one function for all, so
  that the pytree's static data of two such transformations compare equal)."""
  del args, kwargs
  raise ValueError(
      "This transformation has no update_with_aux: it wraps one that does not return the "
      "perturbed pass's aux. Build the sharpness-aware transformation with has_aux=True, e.g. "
      "sam_optax.sam(optax.sgd(0.1), rho=0.05, has_aux=True), and wrap that.")


# As a plain NamedTuple, a pytree round trip (`jax.tree.map`, or an `nnx.Optimizer` under
# `nnx.jit` before flax 0.12.7) rebuilds it from its two fields and loses the extra entry
# points above; registered, they travel as the node's static data.
jax.tree_util.register_pytree_with_keys(
    SharpnessAwareTransformation,
    lambda t: (((jax.tree_util.GetAttrKey("init"), t.init),
                (jax.tree_util.GetAttrKey("update"), t.update)), tuple(sorted(vars(t).items()))),
    lambda extras, fields: SharpnessAwareTransformation(*fields, **dict(extras)))
