"""Every wrong call gets an error that names the problem and the fix: one test per message.

Each case is `(wrong call, error type, the problem, the fix)`, the last two regular
expressions the message must contain. Construction errors are raised by the constructor;
update errors at the first call (or trace: every check is on static structure, shapes and
dtypes, so none costs anything at run time).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

PARAMS = {"w": jnp.ones(2, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def grad_fn(p):
  return jax.tree.map(lambda x: 2.0 * x, p)


def one_call_update(tx=None, grads=PARAMS, params=PARAMS, **kwargs):
  tx = sam_optax.sam(optax.sgd(0.1)) if tx is None else tx
  kwargs.setdefault("grad_fn", grad_fn)
  return tx.update(grads, tx.init(PARAMS), params, **kwargs)


def chunked_update(**kwargs):
  tx = sam_optax.sam(optax.sgd(0.1), chunk_size=kwargs.pop("chunk_size", 3))
  kwargs.setdefault("grad_fn", lambda p, b: grad_fn(p))
  return tx.update(None, tx.init(PARAMS), PARAMS, **kwargs)


def two_call_update(**kwargs):
  tx = sam_optax.sam(optax.sgd(0.1), two_call=True)
  return tx.update(PARAMS, tx.init(PARAMS), PARAMS, **kwargs)


def with_state(state):
  tx = sam_optax.sam(optax.sgd(0.1))
  return tx.update(PARAMS, state, PARAMS, grad_fn=grad_fn)


def under_multisteps():
  tx = optax.MultiSteps(sam_optax.sam(optax.sgd(0.1)), every_k_schedule=2)
  return tx.update(PARAMS, tx.init(PARAMS), PARAMS, grad_fn=grad_fn)


def skip_wrapping_nested_two_call():
  tx = optax.chain(optax.identity(), sam_optax.sam(optax.sgd(0.1), two_call=True))
  return sam_optax.skip_if_nonfinite(tx, 3).init(PARAMS)


def masked_ascent_with_points():
  def update(grads, state, params=None, **extra):
    eps = jax.tree.map(lambda w: 0.01 * jnp.ones_like(w), params)
    return sam_optax.Perturbation(eps, (eps,)), state
  ascent = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
  tx = sam_optax.sharpness_aware(optax.sgd(0.1), ascent, mask={"w": True, "b": False})
  return one_call_update(tx)


CASES = {
    "mask_with_an_ascent_returning_points": (
        masked_ascent_with_points, ValueError, r"returns a sam_optax\.Perturbation.*cannot "
        r"restrict", r"drop mask="),
    # ----------------------------------------------------------------- construction
    "negative_rho": (
        lambda: sam_optax.sam(optax.sgd(0.1), rho=-0.1), ValueError,
        r"rho must be >= 0\.0, got -0\.1", r"radius of the perturbation ball"),
    "nonfinite_rho": (
        lambda: sam_optax.usam(optax.sgd(0.1), rho=float("nan")), ValueError,
        r"rho must be finite, got nan", r"radius of the perturbation ball"),
    "rho_of_wrong_type": (
        lambda: sam_optax.sam(optax.sgd(0.1), rho="big"), TypeError,
        r"rho must be a float or a schedule", r"a function of the step count"),
    "lam_out_of_range": (
        lambda: sam_optax.unified_sam(optax.sgd(0.1), lam=1.5), ValueError,
        r"lam must be in \[0\.0, 1\.0\], got 1\.5", r"lam=1 is SAM, lam=0 is USAM"),
    "inner_not_a_transformation": (
        lambda: sam_optax.sam(lambda g: g), TypeError,
        r"inner must be an optax\.GradientTransformation", r"e\.g\. optax\.sgd\(0\.1\)"),
    "window_not_a_pair": (
        lambda: sam_optax.sam(optax.sgd(0.1), window=5), ValueError,
        r"window must be a pair \(start, end\)", r"end may be None"),
    "window_end_before_start": (
        lambda: sam_optax.sam(optax.sgd(0.1), window=(5, 2)), ValueError,
        r"window end \(2\)", r"must be >= its start \(5\)"),
    "chunk_size_zero": (
        lambda: sam_optax.sam(optax.sgd(0.1), chunk_size=0), ValueError,
        r"chunk_size must be >= 1, got 0", r">= 1"),
    "chunk_size_not_an_int": (
        lambda: sam_optax.sam(optax.sgd(0.1), chunk_size=2.0), TypeError,
        r"chunk_size must be a Python int, got float", r"list it in static_args"),
    "unknown_chunk_strategy": (
        lambda: sam_optax.sam(optax.sgd(0.1), chunk_size=2, chunk_strategy="parallel"),
        ValueError, r"chunk_strategy must be one of", r"'vectorized', 'sequential'"),
    "two_call_with_chunks": (
        lambda: sam_optax.sam(optax.sgd(0.1), chunk_size=2, two_call=True), ValueError,
        r"two-call form cannot split a batch", r"use the one-call form"),
    "two_call_with_linearize": (
        lambda: sam_optax.sharpness_aware(optax.sgd(0.1), sam_optax.normalized_ascent(0.1),
                                          linearize=True, two_call=True), ValueError,
        r"linearize=True takes a Hessian-vector product", r"use the one-call form"),
    "axis_name_without_ascent_choice": (
        lambda: sam_optax.sam(optax.sgd(0.1), axis_name="batch"), ValueError,
        r"choose how the ascent gradient is formed",
        r"average_ascent=True for global SAM.*average_ascent=False for per-device"),
    "average_ascent_without_axis_name": (
        lambda: sam_optax.sam(optax.sgd(0.1), average_ascent=True), ValueError,
        r"average_ascent only has a meaning with axis_name", r"data parallelism"),
    "skip_wraps_a_non_transformation": (
        lambda: sam_optax.skip_if_nonfinite(lambda g: g, 3), TypeError,
        r"wraps an optax\.GradientTransformation", r"sam_optax\.sam\(optax\.sgd\(0\.1\)\)"),
    "skip_with_negative_error_count": (
        lambda: sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1)), -1), ValueError,
        r"max_consecutive_errors must be >= 0, got -1", r">= 0"),
    # ----------------------------------------------------------------- the update call
    "missing_grad_fn": (
        lambda: one_call_update(grad_fn=None), ValueError,
        r"needs grad_fn=\.\.\.", r"grad_fn=lambda p: jax\.grad\(loss\)\(p, batch\).*two_call=True"),
    "grad_fn_not_callable": (
        lambda: one_call_update(grad_fn=3), TypeError,
        r"grad_fn must be callable", r"params -> grads"),
    "missing_params": (
        lambda: one_call_update(params=None), ValueError,
        r"need the params", r"tx\.update\(grads, state, params"),
    "grads_none_without_chunks": (
        lambda: one_call_update(grads=None), ValueError,
        r"got grads=None", r"pass the gradient at params"),
    "gradient_of_the_wrong_tree": (
        lambda: one_call_update(grads={"w": PARAMS["w"]}), ValueError,
        r"The gradient passed to update\(\) does not have the structure of params",
        r"same keys and nesting as params"),
    "gradient_of_the_wrong_shape": (
        lambda: one_call_update(grads={"w": jnp.ones(3), "b": jnp.zeros(())}), ValueError,
        r"has shape \(3,\) at \['w'\] where params has \(2,\)",
        r"Compute it with respect to the same params"),
    "grad_fn_returns_the_wrong_tree": (
        lambda: one_call_update(grad_fn=lambda p: {"w": p["w"]}), ValueError,
        r"The output of grad_fn does not have the structure of params",
        r"e\.g\. the output of jax\.grad with respect to params"),
    "integer_gradient": (
        lambda: one_call_update(grads={"w": jnp.ones(2, jnp.int32), "b": jnp.zeros((), jnp.int32)}),
        TypeError, r"has dtype int32 at \['b'\]",
        r"truncate the perturbation to zero.*g\.astype\(p\.dtype\)"),
    "complex_gradient": (
        lambda: one_call_update(grads=jax.tree.map(lambda x: x.astype(jnp.complex64), PARAMS)),
        TypeError, r"has dtype complex64", r"Differentiate a floating-point loss"),
    "grad_fn_returns_integers": (
        lambda: one_call_update(grad_fn=lambda p: jax.tree.map(lambda x: x.astype(jnp.int32), p)),
        TypeError, r"The output of grad_fn has dtype int32", r"must be real floating point"),
    "integer_params": (
        lambda: one_call_update(params={"w": jnp.ones(2, jnp.int32), "b": jnp.zeros((), jnp.int32)}),
        TypeError, r"The params have dtype int32",
        r"Keep integer, boolean or complex leaves out.*optax\.partition"),
    "has_aux_without_a_pair": (
        lambda: one_call_update(sam_optax.sam(optax.sgd(0.1), has_aux=True)), ValueError,
        r"must return a pair \(grads, aux\)", r"jax\.grad\(loss, has_aux=True\)"),
    "chunk_size_does_not_divide_the_batch": (
        lambda: chunked_update(batch=jnp.zeros((8, 2))), ValueError,
        r"chunk_size=3 does not divide the batch size 8",
        r"Use a chunk size among \[1, 2, 4, 8\], or drop the remainder"),
    "chunk_size_without_a_batch": (
        lambda: chunked_update(), ValueError,
        r"chunk_size=3 needs the batch", r"update\(\.\.\., batch=batch"),
    "batch_without_chunk_size": (
        lambda: one_call_update(batch=jnp.zeros((8, 2))), ValueError,
        r"batch= is for m-sharpness", r"build the transformation with chunk_size=m"),
    "batch_and_chunks": (
        lambda: chunked_update(batch=jnp.zeros((6, 2)), chunks=jnp.zeros((2, 3, 2))), ValueError,
        r"Pass either batch=", r"not both"),
    "ragged_batch": (
        lambda: chunked_update(batch=(jnp.zeros((6, 2)), jnp.zeros((4,)))), ValueError,
        r"same leading \(example\) axis", r"got leading sizes"),
    "axis_name_outside_pmap": (
        lambda: one_call_update(sam_optax.sam(optax.sgd(0.1), axis_name="batch",
                                              average_ascent=True)), ValueError,
        r"axis_name='batch' is not bound here",
        r"inside jax\.pmap\(\.\.\., axis_name='batch'\).*build it without axis_name"),
    "grad_fn_given_to_the_two_call_form": (
        lambda: two_call_update(grad_fn=grad_fn), ValueError,
        r"built with two_call=True, which ignores grad_fn=", r"build it without two_call=True"),
    "state_restored_without_its_types": (
        lambda: with_state({"count": 0}), TypeError,
        r"got a state of type dict", r"restore it with the target's structure.*jax\.eval_shape"),
    "state_of_another_optimizer": (
        lambda: with_state(optax.sgd(0.1).init(PARAMS)), TypeError,
        r"not the SharpnessAwareState", r"Pass tx\.init\(params\)"),
    "one_call_state_in_the_two_call_form": (
        lambda: sam_optax.sam(optax.sgd(0.1), two_call=True).update(
            PARAMS, sam_optax.sam(optax.sgd(0.1)).init(PARAMS), PARAMS), ValueError,
        r"got the state of a one-call transformation", r"with this transformation's own init"),
    "multisteps_around_sam": (
        under_multisteps, ValueError,
        r"optax\.MultiSteps cannot accumulate a sharpness-aware step",
        r"chunk_size=<micro-batch size>, chunk_strategy=\"sequential\""),
    # ----------------------------------------------------------------- issue 13, item 12
    "grad_fn_returns_aux_without_has_aux": (
        lambda: one_call_update(grad_fn=lambda p: (grad_fn(p), jnp.float32(1.0))), ValueError,
        r"grad_fn returned a pair \(grads, aux\).*built without has_aux=True",
        r"Build it with has_aux=True.*tx\.update_with_aux"),
    "empty_batch_with_chunks": (
        lambda: chunked_update(batch=jnp.zeros((0, 2))), ValueError,
        r"The batch is empty \(leading axis of size 0\)", r"Skip empty batches"),
    "empty_chunks": (
        lambda: chunked_update(chunks=jnp.zeros((0, 3, 2))), ValueError,
        r"chunks= holds no chunk", r"Skip empty batches"),
    "state_of_another_variant": (
        lambda: sam_optax.vasso(optax.sgd(0.1)).update(
            PARAMS, sam_optax.sam(optax.sgd(0.1)).init(PARAMS), PARAMS, grad_fn=grad_fn),
        TypeError, r"The state's ascent_state has type AscentCountState.*makes one of type "
        r"AverageState.*comes from another transformation",
        r"Initialize it with this transformation's own init, state = tx\.init\(params\)"),
    "state_of_another_inner_optimizer": (
        lambda: sam_optax.sam(optax.adam(0.1)).update(
            PARAMS, sam_optax.sam(optax.sgd(0.1, momentum=0.9)).init(PARAMS), PARAMS,
            grad_fn=grad_fn),
        TypeError, r"The state's inner_state .*another inner optimizer",
        r"state = tx\.init\(params\)"),
    "mask_missing_a_key": (
        lambda: one_call_update(sam_optax.sam(optax.sgd(0.1), mask={"w": True})), ValueError,
        r"mask= does not match the params.*keys in one and not the other: b",
        r"every key present.*jax\.tree\.map\(lambda _: False, params\)"),
    "mask_function_missing_a_key": (
        lambda: one_call_update(sam_optax.sam(optax.sgd(0.1), mask=lambda p: {"b": True})),
        ValueError, r"mask= does not match the params", r"sam_optax\.normalization_mask"),
    "reserved_keyword": (
        lambda: one_call_update(perturbed=True), ValueError,
        r"update\(\) got perturbed=, a keyword the engine passes to the ascent and the "
        r"correction", r"Rename your keyword argument"),
    "reserved_keyword_count": (
        lambda: one_call_update(count=3), ValueError, r"update\(\) got count=",
        r"Rename your keyword argument"),
    "reserved_keyword_in_the_two_call_form": (
        lambda: two_call_update(clean_grads=PARAMS), ValueError, r"update\(\) got clean_grads=",
        r"Rename your keyword argument"),
    "update_with_aux_on_the_two_call_form": (
        lambda: sam_optax.sam(optax.sgd(0.1), two_call=True).update_with_aux(
            PARAMS, sam_optax.sam(optax.sgd(0.1), two_call=True).init(PARAMS), PARAMS),
        ValueError, r"update_with_aux belongs to the one-call form.*two_call=True",
        r"build it without two_call=True and with has_aux=True"),
    "optax_contrib_grad_fn_signature": (
        lambda: one_call_update(grad_fn=lambda p, i: grad_fn(p)), TypeError,
        r"The engine calls grad_fn\(params\).*grad_fn is <lambda>\(p, i\).*"
        r"optax\.contrib\.sam's grad_fn\(params, i\)",
        r"grad_fn=lambda p: jax\.grad\(loss\)\(p, batch\)"),
    "one_argument_grad_fn_with_chunks": (
        lambda: chunked_update(batch=jnp.zeros((6, 2)), grad_fn=grad_fn), TypeError,
        r"engine calls grad_fn\(params, batch\) on each chunk.*grad_fn is grad_fn\(p\)",
        r"grad_fn=lambda p, b: jax\.grad\(loss\)\(p, b\)"),
    "update_with_aux_without_has_aux": (
        lambda: sam_optax.sam(optax.sgd(0.1)).update_with_aux(
            PARAMS, sam_optax.sam(optax.sgd(0.1)).init(PARAMS), PARAMS, grad_fn=grad_fn),
        ValueError, r"built without has_aux=True, so grad_fn returns no aux",
        r"Build it with has_aux=True.*jax\.grad\(loss, has_aux=True\); or call tx\.update"),
    "update_with_aux_without_has_aux_under_skip": (
        lambda: sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1)), 3).update_with_aux(
            PARAMS, sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1)), 3).init(PARAMS),
            PARAMS, grad_fn=grad_fn),
        ValueError, r"built without has_aux=True", r"Build it with has_aux=True"),
    # ----------------------------------------------------------------- issue 13, item 10
    "bsam_without_data": (
        lambda: sam_optax.bsam(optax.sgd(0.1), num_data=0), ValueError,
        r"num_data must be > 0\.0, got 0\.0", r"training-set size N"),
    "bsam_b1_of_one": (
        lambda: sam_optax.bsam(optax.sgd(0.1), num_data=10, b1=1.0), ValueError,
        r"b1 must be in \[0\.0, 1\.0\), got 1\.0", r"gradient momentum"),
    "bsam_b2_of_one": (
        lambda: sam_optax.bsam(optax.sgd(0.1), num_data=10, b2=1.0), ValueError,
        r"b2 must be in \[0\.0, 1\.0\), got 1\.0", r"precision's decay"),
    "bsam_zero_init_precision": (
        lambda: sam_optax.bsam(optax.sgd(0.1), num_data=10, init_precision=0.0), ValueError,
        r"init_precision must be > 0", r"s divides the perturbation"),
    "gsam_negative_lr_max": (
        lambda: sam_optax.gsam(optax.sgd(0.1), learning_rate=lambda t: 0.1, lr_max=-0.1,
                               lr_min=0.01), ValueError,
        r"lr_max must be >= 0\.0, got -0\.1", r"schedule's peak value"),
    "gsam_nonfinite_lr_min": (
        lambda: sam_optax.gsam(optax.sgd(0.1), learning_rate=lambda t: 0.1, lr_max=0.1,
                               lr_min=float("nan")), ValueError,
        r"lr_min must be finite", r"schedule's final value"),
    "dnsam_negative_full_grad_norm_eagerly": (
        lambda: one_call_update(sam_optax.dnsam(optax.sgd(0.1)), full_grad_norm=-1.0),
        ValueError, r"full_grad_norm must be finite and >= 0\.0, got -1\.0",
        r"norm of the full-batch gradient; omit it to use the estimate"),
    "dnsam_nan_full_grad_norm_eagerly": (
        lambda: one_call_update(sam_optax.dnsam(optax.sgd(0.1)), full_grad_norm=float("nan")),
        ValueError, r"full_grad_norm must be finite and >= 0\.0, got nan", r"omit it"),
    "vasso_theta_of_zero": (
        lambda: sam_optax.vasso(optax.sgd(0.1), theta=0.0), ValueError,
        r"theta must be in \(0\.0, 1\.0\], got 0\.0", r"weighs the new gradient"),
    "boolean_hyperparameter": (
        lambda: sam_optax.sam(optax.sgd(0.1), rho=True), TypeError,
        r"rho must be a float or a schedule", r"got bool"),
    "hyperparameter_of_the_wrong_shape": (
        lambda: sam_optax.sam(optax.sgd(0.1), rho=jnp.ones(2)), ValueError,
        r"rho must be a scalar, got shape \(2,\)", r"scalar"),
    "negative_rho_injected_eagerly": (
        lambda: one_call_update(optax.inject_hyperparams(sam_optax.sam)(optax.sgd(0.1),
                                                                         rho=-0.1)),
        ValueError, r"rho must be >= 0\.0, got -0\.1", r"radius of the perturbation ball"),
    "skip_around_a_nested_two_call_form": (
        skip_wrapping_nested_two_call, ValueError,
        r"must wrap a two-call sharpness-aware transformation directly",
        r"skip_if_nonfinite\(sam_optax\.sam\(\.\.\., two_call=True\), n\)"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_message_names_the_problem_and_the_fix(name):
  call, error, problem, fix = CASES[name]
  with pytest.raises(error) as info:
    call()
  message = str(info.value)
  assert re.search(problem, message, flags=re.S), f"problem not named: {message}"
  assert re.search(fix, message, flags=re.S), f"fix not named: {message}"


def test_the_two_call_form_says_it_is_one():
  """update_with_aux exists on every sharpness-aware transformation (so that calling it gives
  the message above, not "'NoneType' object is not callable"); `two_call` tells them apart."""
  assert sam_optax.sam(optax.sgd(0.1), two_call=True).two_call
  assert not sam_optax.sam(optax.sgd(0.1)).two_call


def test_python_float_leaves_are_accepted():
  """Python numbers as gradient (or param) leaves are taken as arrays, as optax does."""
  params = {"w": jnp.ones(2, jnp.float32), "b": 0.5}
  grads = {"w": jnp.ones(2, jnp.float32), "b": 1.0}
  tx = sam_optax.sam(optax.sgd(0.1), rho=0.05)
  updates, _ = tx.update(grads, tx.init(params), params,
                         grad_fn=lambda p: {"w": 2.0 * p["w"], "b": 2.0 * p["b"]})
  # eps = rho g / ||g||, ||g|| = sqrt(3); d = 2 (w + eps); u = -0.1 d.
  eps = 0.05 / jnp.sqrt(3.0)
  np.testing.assert_allclose(updates["w"], -0.2 * (1.0 + eps) * np.ones(2), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -0.2 * (0.5 + eps), rtol=1e-6)


def test_a_state_of_the_same_structure_still_works():
  """The foreign-state diagnosis runs on failures only: a state of the same structure (sam's
  for usam) is not refused, and good steps pay nothing for it."""
  state = sam_optax.sam(optax.sgd(0.1)).init(PARAMS)
  sam_optax.usam(optax.sgd(0.1)).update(PARAMS, state, PARAMS, grad_fn=grad_fn)


def test_errors_are_raised_under_jit_at_trace_time():
  tx = sam_optax.sam(optax.sgd(0.1))
  grads = {"w": jnp.ones(2, jnp.int32), "b": jnp.zeros((), jnp.int32)}
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  with pytest.raises(TypeError, match=r"has dtype int32"):
    step(grads, tx.init(PARAMS), PARAMS)


def test_mixed_float_dtypes_are_accepted():
  """Float32 gradients for bfloat16 params (or the reverse) are not an error: the norms are
  accumulated in the widest float, and the perturbation is added in the params' dtype."""
  params = {"w": jnp.ones(2, jnp.bfloat16), "b": jnp.zeros((), jnp.float32)}
  grads = {"w": jnp.ones(2, jnp.float32), "b": jnp.ones((), jnp.bfloat16)}
  tx = sam_optax.sam(optax.sgd(0.1))
  updates, _ = tx.update(grads, tx.init(params), params, grad_fn=lambda p: grads)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
