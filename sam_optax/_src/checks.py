"""Input validation for the engine, and the messages that explain a wrong call.

Every check runs at trace time on static information (structures, shapes, dtypes, keywords),
so it costs nothing in a jitted step; the state is compared with the transformation's `init`
only when a step fails (`entry_point`).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import sys

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import chunking
from sam_optax._src import tree
from sam_optax._src.transformation import SharpnessAwareState

# Keywords the engine consumes; every other keyword of `update` is forwarded to the ascent, the
# correction and the inner optimizer.
ENGINE_KEYWORDS = ("grad_fn", "batch", "chunks")


def check_per_device(grads, axis_name):
  """Per-device ascent needs per-device gradients: refuse ones shard_map already reduced.

  Inside `jax.shard_map` (check_vma=True), `jax.grad` with respect to params replicated over the
  data axis returns their gradient summed over that axis (invariant there); a per-device ascent
  on it would silently be a global one.
  """
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  for path, leaf in jax.tree.leaves_with_path(grads):
    reduced = [n for n in names if n not in tree.sharded_axes(leaf, names)]
    if reduced and jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
          f"average_ascent=False (per-device ascent) needs each device's own gradient, but the "
          f"gradient at {jax.tree_util.keystr(path)} is already reduced over axis "
          f"{reduced[0]!r}: inside shard_map, jax.grad with respect to params replicated over "
          f"that axis sums over it. Differentiate at params marked as varying, e.g. "
          f"jax.grad(loss)(jax.lax.pcast(params, {reduced[0]!r}, to='varying'), batch) "
          f"(jax.lax.pvary in older JAX), in grad_fn and for the clean gradient; or use "
          f"average_ascent=True.")


def check_state(state, two_call):
  """The state must be this kind of transformation's (a restored checkpoint may lose its types)."""
  if not all(hasattr(state, field) for field in SharpnessAwareState._fields):
    raise TypeError(
        f"update() got a state of type {type(state).__name__}, not the SharpnessAwareState that "
        f"this transformation's init returns. Pass tx.init(params) or the state the previous "
        f"update returned; a checkpoint restored without a target comes back as plain "
        f"dicts/lists: restore it with the target's structure, e.g. "
        f"checkpointer.restore(path, jax.eval_shape(tx.init, params)).")
  if two_call and state.pending is None:
    raise ValueError("This transformation was built with two_call=True but got the state of a "
                     "one-call transformation (no pending descent): initialize it with this "
                     "transformation's own init.")


def refuse_one_call_keywords(extra):
  """The two-call form takes gradients, not functions: a grad_fn there would be ignored."""
  given = [k for k in ENGINE_KEYWORDS if extra.get(k) is not None]
  if given:
    raise ValueError(
        f"This transformation was built with two_call=True, which ignores {given[0]}=: each "
        f"step is two update calls (the clean gradient at w, then the gradient at the params "
        f"the first call returned). To pass grad_fn (and batch) in one call per step, build it "
        f"without two_call=True.")


# Keywords the engine itself passes to the ascent and the correction: a caller's keyword of the
# same name would collide with them (or be silently replaced).
RESERVED_KEYWORDS = ("count", "clean_grads", "perturbed", "param_axis_name", "ascent_state",
                      "inner_state")


def refuse_reserved_keywords(extra):
  given = [k for k in RESERVED_KEYWORDS if k in extra]
  if given:
    raise ValueError(
        f"update() got {given[0]}=, a keyword the engine passes to the ascent and the "
        f"correction itself (reserved: {', '.join(RESERVED_KEYWORDS)}). Rename your keyword "
        f"argument; the other keywords of update() are forwarded to the ascent, the correction "
        f"and the inner optimizer.")


def entry_point(update, init):
  """`update` with Python-scalar leaves accepted and a foreign state explained.

  Python numbers among the leaves of `grads` and `params` become arrays (JAX's default float
  type). When the step fails, the state is compared with this transformation's own `init`
  (traced with `jax.eval_shape`, on the failure path only: nothing is added to a good step),
  so that the state of another variant or inner optimizer gets an error saying so, not
  whatever attribute or tree error the mismatch raised first.
  """
  @functools.wraps(update)
  def wrapped(grads, state, params=None, **kwargs):
    grads, params = _scalars_as_arrays(grads), _scalars_as_arrays(params)
    try:
      return update(grads, state, params, **kwargs)
    except Exception as error:  # pylint: disable=broad-except
      _explain_foreign_state(error, init, state, params)
      raise
  return wrapped


def _scalars_as_arrays(tree_):
  if tree_ is None:
    return None
  leaves = jax.tree.leaves(tree_)
  if all(hasattr(leaf, "dtype") for leaf in leaves):
    return tree_
  return jax.tree.map(lambda x: x if hasattr(x, "dtype") else jnp.asarray(x), tree_)


def _explain_foreign_state(error, init, state, params):
  """Raises a TypeError from `error` when `state` is not shaped like `init(params)`'s."""
  if params is None or not all(hasattr(state, f) for f in SharpnessAwareState._fields):
    return
  try:
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                          params)
    expected = jax.eval_shape(init, shapes)
  except Exception:  # pylint: disable=broad-except
    return  # the diagnosis is best effort: the original error stands
  for field in ("ascent_state", "correction_state", "inner_state"):
    got, want = getattr(state, field), getattr(expected, field)
    if jax.tree.structure(got) != jax.tree.structure(want):
      raise TypeError(
          f"The state's {field} has type {type(got).__name__}, but this transformation's "
          f"init makes one of type {type(want).__name__} (tree {jax.tree.structure(want)}, got "
          f"{jax.tree.structure(got)}): the state comes from another transformation (another "
          f"variant, its hyperparameters' structure, or another inner optimizer). Initialize "
          f"it with this transformation's own init, state = tx.init(params); a checkpoint "
          f"restores only into the transformation that wrote it. (Original error: "
          f"{type(error).__name__}: {str(error)[:200]})") from error


def explained_signature(grad_fn, chunked):
  """`grad_fn`, whose TypeError for a wrong number of arguments names the expected signature.

  Only the failure path inspects the signature: a good call costs one Python frame.
  """
  def call(*args):
    try:
      return grad_fn(*args)
    except TypeError as error:
      try:
        inspect.signature(grad_fn).bind(*args)
      except TypeError:
        raise TypeError(_signature_message(grad_fn, chunked, error)) from error
      except ValueError:  # no signature to inspect (some builtins): keep the original error
        pass
      raise
  return call


def _signature_message(grad_fn, chunked, error):
  try:
    signature = f"{getattr(grad_fn, '__name__', 'grad_fn')}{inspect.signature(grad_fn)}"
  except (TypeError, ValueError):
    signature = "grad_fn"
  if chunked:
    return (f"With chunk_size (m-sharpness) the engine calls grad_fn(params, batch) on each "
            f"chunk of the batch, but grad_fn is {signature} ({error}). Pass a gradient "
            f"function of the params and a batch, e.g. grad_fn=lambda p, b: "
            f"jax.grad(loss)(p, b).")
  return (f"The engine calls grad_fn(params) (one argument: the perturbed params), but "
          f"grad_fn is {signature} ({error}). optax.contrib.sam's grad_fn(params, i) signature "
          f"is not this one: close over the batch instead, e.g. grad_fn=lambda p: "
          f"jax.grad(loss)(p, batch) (or lambda p: your_grad_fn(p, 0)); for one gradient per "
          f"chunk of the batch, build the transformation with chunk_size and pass "
          f"grad_fn(params, batch).")


def _keys_not_in_both(a, b):
  """The keys that one of two nested dicts has and the other lacks, at the first level where
  they differ (found here: JAX's error names them only in recent versions), or None."""
  if isinstance(a, collections.abc.Mapping) and isinstance(b, collections.abc.Mapping):
    keys = sorted(map(str, set(a) ^ set(b)))
    if keys:
      return keys
    for key in a:
      keys = _keys_not_in_both(a[key], b[key])
      if keys:
        return keys
  return None


def check_mask(mask_tree, params):
  """The mask must be a tree of bools shaped like the params (or a prefix): checked at trace
  time, so that a missing or extra key is named here rather than inside optax.masked."""
  try:
    jax.tree.map(lambda *_: None, mask_tree, params)
  except (ValueError, TypeError) as error:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    keys = _keys_not_in_both(mask_tree, params)
    if keys:
      first += f"; keys in one and not the other: {', '.join(keys)}"
    raise ValueError(
        f"mask= does not match the params: mask has structure {jax.tree.structure(mask_tree)} "
        f"and params {jax.tree.structure(params)} ({first}). mask must be a tree of bools "
        f"with the keys and nesting of params (or a prefix of it: one bool for a whole "
        f"subtree), every key present, e.g. jax.tree.map(lambda _: False, params) with the "
        f"perturbed leaves set to True, or a function of params returning one, such as "
        f"sam_optax.normalization_mask.") from error


def check_params_and_grads(grads, params, optional=False):
  if params is None:
    raise ValueError("Sharpness-aware transformations need the params: call "
                     "tx.update(grads, state, params, ...).")
  if grads is None and optional:
    return
  if grads is None:
    raise ValueError("update() got grads=None: pass the gradient at params (None is only "
                     "accepted with chunk_size, where each chunk's gradient is computed inside).")
  tree.check_same_structure(params, grads, what="The gradient passed to update()")
  check_float_dtypes(params, grads, what="The gradient passed to update()")


def check_float_dtypes(params, grads, *, what):
  """Params and gradients must be real floating point (any width; they may differ).

  Anything else would be cast silently: an integer gradient truncates the perturbation to zero,
  and complex leaves would get a norm without conjugation. Checked at trace time (dtypes are
  static), so it costs nothing at run time; eagerly, on every call, where leaves that are
  arrays of a floating dtype take the fast path (no key paths built).
  """
  leaves = jax.tree.leaves(grads) + jax.tree.leaves(params)
  if all(_is_float_dtype(getattr(leaf, "dtype", None)) for leaf in leaves):
    return
  for (path, grad), param in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(params)):
    where = jax.tree_util.keystr(path) or "the root"
    param_dtype, grad_dtype = jnp.result_type(param), jnp.result_type(grad)
    if not jnp.issubdtype(param_dtype, jnp.floating):
      raise TypeError(
          f"The params have dtype {param_dtype} at {where}: sharpness-aware methods perturb and "
          f"update real floating-point params only. Keep integer, boolean or complex leaves out "
          f"of the tree you optimize (store them beside the params, or split the tree with "
          f"optax.partition and give those leaves optax.set_to_zero()).")
    if not jnp.issubdtype(grad_dtype, jnp.floating):
      raise TypeError(
          f"{what} has dtype {grad_dtype} at {where}, where the params are {param_dtype}: "
          f"gradients must be real floating point (an integer gradient would truncate the "
          f"perturbation to zero). Differentiate a floating-point loss with respect to the params "
          f"with jax.grad, or cast the gradient to the params' dtypes: "
          f"jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params).")


@functools.lru_cache(maxsize=None)
def _is_float_dtype(dtype) -> bool:
  """Whether `dtype` (None for a leaf without one, e.g. a Python float) is a real float."""
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def check_grad_fn(grad_fn, chunked):
  signature = "(params, batch) -> grads" if chunked else "params -> grads"
  example = ("grad_fn=lambda p, b: jax.grad(loss)(p, b)" if chunked
             else "grad_fn=lambda p: jax.grad(loss)(p, batch)")
  if grad_fn is None:
    raise ValueError(
        f"This sharpness-aware transformation needs grad_fn=..., a function {signature} giving "
        f"the gradient at the perturbed params, e.g. {example}. For a loop that cannot pass a "
        f"function, build it with two_call=True.")
  if not callable(grad_fn):
    raise TypeError(f"grad_fn must be callable ({signature}), got {type(grad_fn).__name__}.")


def chunked_batch(chunk_size, batch, chunked):
  """The batch with a leading chunk axis, or None when m-sharpness is off."""
  if chunked is not None:
    if batch is not None:
      raise ValueError("Pass either batch= (split by chunk_size) or chunks= (already split), "
                       "not both.")
    chunking.check_chunks(chunked)
    return chunked
  if batch is None:
    if chunk_size is not None:
      raise ValueError(f"chunk_size={chunk_size} needs the batch: call update(..., batch=batch, "
                       f"grad_fn=lambda p, b: jax.grad(loss)(p, b)).")
    return None
  if chunk_size is None:
    raise ValueError("batch= is for m-sharpness: build the transformation with chunk_size=m "
                     "(examples per chunk), or drop batch= and pass grad_fn=lambda p: ...")
  return chunking.split(batch, chunk_size)


def require_aux(has_aux: bool, which_pass: str = "grad_fn's perturbed pass") -> None:
  """`update_with_aux` on a transformation built without `has_aux=True`: refused with the fix."""
  if not has_aux:
    raise ValueError(
        f"update_with_aux returns the aux of {which_pass}, but this transformation was built "
        "without has_aux=True, so grad_fn returns no aux. Build it with has_aux=True and a "
        "grad_fn returning (grads, aux), e.g. grad_fn=jax.grad(loss, has_aux=True); or call "
        "tx.update.")


def refuse_wrappers(two_call: bool):
  """Raises when called from inside an optax wrapper that would silently break the step.

  The wrapper is built around this transformation after it, so it is detected from the call
  stack, by the code objects of its functions (at trace time under `jax.jit`: no run-time
  cost):

  - `optax.MultiSteps` (its `update`) calls the wrapped transformation on every micro-batch
    with the running mean of the clean gradients and that micro-batch's keywords, and keeps the
    result of the last one: the perturbation would come from the accumulated gradient but the
    descent gradient from the last micro-batch alone. A constant `every_k_schedule` of 1 is
    harmless and allowed.
  - `optax.apply_if_finite` (its `init` and `update`) around the two-call form skips one call,
    not the ascent/descent pair: after one non-finite gradient the calls are out of phase for
    the rest of the run, and every step ends at `w + eps`. It composes with the one-call form.
  """
  wrappers = _wrapper_codes()
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    wrapper = wrappers.get(frame.f_code)
    if wrapper == "MultiSteps":
      k_steps = frame.f_locals.get("k_steps")
      if not (isinstance(k_steps, int) and k_steps == 1):
        raise ValueError(
            "optax.MultiSteps cannot accumulate a sharpness-aware step: it calls this "
            "transformation on every micro-batch with the running mean of the clean gradients "
            "and that micro-batch's grad_fn, so the perturbation would use the accumulated "
            "gradient but the descent gradient only the last micro-batch (and every micro-step "
            "would pay for a discarded perturbed pass). For SAM with gradient accumulation, "
            "build it with chunk_size=<micro-batch size>, chunk_strategy=\"sequential\" and "
            "pass the whole batch: tx.update(None, state, params, batch=batch, grad_fn=lambda "
            "p, b: jax.grad(loss)(p, b)) (one perturbation per chunk, the memory of one chunk). "
            "For one perturbation from the whole batch's gradient, pass a grad_fn that itself "
            "averages micro-batch gradients (e.g. with jax.lax.map).")
    elif wrapper == "apply_if_finite" and two_call:
      raise ValueError(
          "optax.apply_if_finite cannot wrap the two-call form: it skips one update call, not "
          "the ascent/descent pair, so after one non-finite gradient every later call would be "
          "out of phase (each step ending at the perturbed params w + eps). Use "
          "sam_optax.skip_if_nonfinite(tx, max_consecutive_errors) instead: it skips the pair, "
          "and also catches a non-finite perturbed gradient. (optax.apply_if_finite does wrap "
          "the one-call form.)")
    frame = frame.f_back


@functools.lru_cache(maxsize=None)
def _wrapper_codes() -> dict:
  """{code object: wrapper name} for the functions of the optax wrappers `refuse_wrappers`
  detects: `MultiSteps.update`, and `apply_if_finite` with the closures it defines."""
  codes = {}
  multisteps_update = getattr(getattr(optax, "MultiSteps", None), "update", None)
  multisteps_code = getattr(multisteps_update, "__code__", None)
  if multisteps_code is not None:
    codes[multisteps_code] = "MultiSteps"
  apply_if_finite_code = getattr(getattr(optax, "apply_if_finite", None), "__code__", None)
  pending = [apply_if_finite_code] if apply_if_finite_code is not None else []
  while pending:  # the function and its nested closures (init, update, their branches)
    code = pending.pop()
    codes[code] = "apply_if_finite"
    pending.extend(c for c in code.co_consts if isinstance(c, type(code)))
  return codes
