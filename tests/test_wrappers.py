"""The two-call form under optax's wrappers, and mixed-precision gradients, over the catalogue.

* `skip_if_nonfinite` counts ascent/descent pairs as the one-call form counts steps, so it gives
  up after `max_consecutive_errors` bad pairs even when only the perturbed pass is bad.
* `optax.apply_if_finite` around the two-call form is refused (it would skip one call of a
  pair and shift every later pair); around the one-call form it still composes.
* The two-call state's structure depends on structural choices only, never on hyperparameter
  values: `optax.inject_hyperparams` (alone or around `skip_if_nonfinite`) runs jitted, and a
  state built with a float rho has the structure of one built with a schedule.
* bfloat16/float16 params with float32 gradients and a stateful inner optimizer: finite
  updates of the params' dtype, close to the float32 run, in both forms.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests.catalogue import CATALOGUE

TWO_CALL = [v for v in CATALOGUE if v.two_call]
FORMS = [(v, two_call) for v in CATALOGUE for two_call in ([False, True] if v.two_call
                                                            else [False])]
FORM_IDS = [f"{v.name}-{'two_call' if two_call else 'one_call'}" for v, two_call in FORMS]

# Tests that compile a run per variant keep SAM (no correction, no cadence) in the fast tier,
# and LookSAM (a correction, a cadence and a stored buffer: every conditional of the engine)
# where it is the case the test is about; the whole catalogue runs in the slow tier.


def catalogue_wide(cases, ids, fast=("sam",)):
  """pytest params over `cases`, those whose variant is not in `fast` marked slow."""
  return [pytest.param(*(c if isinstance(c, tuple) else (c,)), id=i,
                       marks=() if i.split("-")[0] in fast else pytest.mark.slow)
          for c, i in zip(cases, ids)]


TWO_CALL_COMPILED = catalogue_wide(TWO_CALL, [v.name for v in TWO_CALL])
FORMS_COMPILED = catalogue_wide(FORMS, FORM_IDS, fast=("sam", "looksam"))

W0 = {"w": jnp.asarray([[0.5, -0.3, 0.1], [0.2, 0.8, -0.6]], jnp.float32),
      "b": jnp.asarray([0.1, -0.2, 0.05], jnp.float32)}
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 2)), jnp.float32)  # 4 batches


def loss(p, x):
  return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2) + 0.01 * jnp.sum(p["w"] ** 2)


def f32_grad(p, x):
  """The gradient in float32 for low-precision params (a float32 master copy's gradient);
  float32 and float64 params get their own dtype's."""
  wide = lambda l: l.astype(jnp.promote_types(l.dtype, jnp.float32))
  return jax.grad(loss)(jax.tree.map(wide, p), wide(x))


def one_call_step(tx, grad=f32_grad, perturbed=1.0):
  """One one-call step on batch x; `perturbed` multiplies the perturbed gradient."""
  def step(params, state, x):
    grad_fn = lambda p: jax.tree.map(lambda g: g * perturbed, grad(p, x))
    updates, state = tx.update(grad(params, x), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state
  return step


def two_call_step(tx, grad=f32_grad, perturbed=1.0):
  """One step of two calls on batch x: the clean gradient at w, then the one at the params
  the first call returned (times `perturbed`)."""
  def step(params, state, x):
    updates, state = tx.update(grad(params, x), state, params)
    moved = optax.apply_updates(params, updates)
    grads = jax.tree.map(lambda g: g * perturbed, grad(moved, x))
    updates, state = tx.update(grads, state, moved)
    return optax.apply_updates(moved, updates), state
  return step


def scan_steps(step, params, state, xs, record=lambda params, state: params):
  """Takes `step` over the batches `xs` under lax.scan, which traces one step however many
  there are (a Python loop traces each), and returns `record(params, state)` stacked over the
  steps. Also exercises the lax.scan composition users write."""
  def body(carry, x):
    carry = step(*carry, x)
    return carry, record(*carry)
  return jax.lax.scan(body, (params, state), xs)[1]


def is_finite(tree_):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree_))


def assert_close(actual, expected, tol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                               rtol=tol, atol=tol)


# ------------------------------------------------- 4. skip_if_nonfinite counts pairs, gives up


@pytest.mark.parametrize("variant", TWO_CALL_COMPILED)
def test_two_call_skip_counts_pairs_like_the_one_call_form(variant):
  """Only the perturbed pass is bad, on every step: both forms skip the same steps and give up
  after max_consecutive_errors of them (a step whose perturbed pass is off, e.g. LookSAM's
  reuse steps, is good in both and resets the count in both)."""
  max_errors = 2
  forms = {}
  for two_call, make_step in ((False, one_call_step), (True, two_call_step)):
    tx = sam_optax.skip_if_nonfinite(
        variant.make(optax.adam(1e-2), **variant.hparams, two_call=two_call), max_errors)
    step = make_step(tx, perturbed=jnp.nan)

    record = lambda params, state: (state.notfinite_count, state.total_notfinite,
                                    state.last_finite, jnp.all(jnp.isfinite(params["w"])))
    counts = jax.jit(lambda p, s: scan_steps(step, p, s, X, record))(W0, tx.init(W0))
    forms[two_call] = [tuple(int(c[i]) for c in counts) for i in range(len(X))]
  assert forms[True] == forms[False]
  consecutive, total, last_finite, params_finite = forms[True][max_errors]
  if last_finite:  # a reuse step at this count (LookSAM): skipping is not giving up
    return
  # Steps 0 .. max_errors - 1 were skipped; step max_errors is applied anyway.
  assert [c[3] for c in forms[True][:max_errors]] == [1] * max_errors
  assert (consecutive, total, params_finite) == (max_errors + 1, max_errors + 1, 0)


def test_two_call_skip_resets_only_after_a_good_pair():
  """Call by call: a good ascent call leaves the counts alone; a good descent call resets."""
  tx = sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1), two_call=True), 5)
  state = tx.init(W0)
  grads = f32_grad(W0, X[0])
  nan = jax.tree.map(lambda g: g * jnp.nan, grads)
  update = jax.jit(tx.update)
  for pair in range(3):  # bad perturbed passes: counted once per pair, never reset in between
    _, state = update(grads, state, W0)
    assert int(state.notfinite_count) == pair
    _, state = update(nan, state, W0)
    assert (int(state.notfinite_count), int(state.total_notfinite)) == (pair + 1, pair + 1)
  _, state = update(grads, state, W0)
  assert int(state.notfinite_count) == 3 and bool(state.last_finite)
  _, state = update(grads, state, W0)
  assert (int(state.notfinite_count), int(state.total_notfinite)) == (0, 3)


# -------------------------------------- 5. optax.apply_if_finite: refused around the two-call form


@pytest.mark.parametrize("variant", TWO_CALL, ids=str)
def test_apply_if_finite_around_the_two_call_form_is_refused(variant):
  tx = variant.make(optax.adam(1e-2), **variant.hparams, two_call=True)
  wrapped = [optax.apply_if_finite(tx, 3),
             optax.apply_if_finite(sam_optax.skip_if_nonfinite(tx, 3), 3),
             optax.chain(optax.clip(1.0), optax.apply_if_finite(optax.chain(tx), 3))]
  for outer in wrapped:
    with pytest.raises(ValueError, match=r"apply_if_finite cannot wrap the two-call form.*"
                                         r"sam_optax\.skip_if_nonfinite"):
      outer.init(W0)


def test_apply_if_finite_around_the_two_call_form_is_refused_at_update():
  """A state assembled without apply_if_finite's init: the first update (trace) refuses."""
  tx = sam_optax.sam(optax.sgd(0.1), two_call=True)
  outer = optax.apply_if_finite(tx, 3)
  state = optax.ApplyIfFiniteState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.bool_),
                                   jnp.zeros([], jnp.int32), tx.init(W0))
  with pytest.raises(ValueError, match="skip_if_nonfinite"):
    jax.jit(outer.update)(f32_grad(W0, X[0]), state, W0)


def test_apply_if_finite_composes_with_the_one_call_form():
  """The one-call form under apply_if_finite: a NaN g is skipped, the next step runs as usual."""
  tx = optax.apply_if_finite(sam_optax.sam(optax.sgd(0.1)), 3)
  plain = sam_optax.sam(optax.sgd(0.1))
  update = jax.jit(tx.update, static_argnames="grad_fn")
  grad_fn = lambda p: f32_grad(p, X[0])
  state = tx.init(W0)
  nan = jax.tree.map(lambda g: g * jnp.nan, grad_fn(W0))
  updates, state = update(nan, state, W0, grad_fn=grad_fn)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  updates, state = update(grad_fn(W0), state, W0, grad_fn=grad_fn)
  expected, _ = plain.update(grad_fn(W0), plain.init(W0), W0, grad_fn=grad_fn)
  assert_close(updates, expected, 1e-6)


# -------------------------- 6. the state's structure never depends on the hyperparameters' values


def static_args(variant):
  """The catalogue's static args, and the schedules its entry binds (GSAM's learning rate):
  injected, a schedule would count update calls, two per step in the two-call form."""
  parameters = inspect.signature(variant.make).parameters
  return tuple(variant.static_args) + tuple(
      n for n, p in parameters.items() if callable(p.default) and n not in variant.static_args)


def injectable(variant, two_call, skip=False):
  """optax.inject_hyperparams of `variant.make` (wrapped in skip_if_nonfinite when `skip`)."""
  if not skip:
    return optax.inject_hyperparams(variant.make, static_args=static_args(variant))
  signature = inspect.signature(variant.make)

  def factory(*args, **kwargs):
    return sam_optax.skip_if_nonfinite(variant.make(*args, **kwargs), 3)

  factory.__signature__ = signature  # what inject_hyperparams reads the hparams from
  return lambda *args, **kwargs: optax.inject_hyperparams(
      factory, static_args=static_args(variant))(*args, **kwargs, two_call=two_call)


@pytest.mark.parametrize("variant", TWO_CALL_COMPILED)
def test_inject_hyperparams_two_call_matches_plain(variant):
  """inject_hyperparams around the two-call form, and around skip_if_nonfinite of it, jitted:
  the plain construction's trajectory (one program, so equal to rounding). In float64, where
  the injected hyperparameters have the precision of the plain Python floats (ESAM's Bernoulli
  draws depend on it)."""
  inner = optax.sgd(0.1, momentum=0.9)
  hparams = dict(variant.hparams)
  w0 = jax.tree.map(lambda l: l.astype(jnp.float64), W0)
  txs = [variant.make(inner, **hparams, two_call=True),
         injectable(variant, True)(inner, **hparams, two_call=True),
         injectable(variant, True, skip=True)(inner, **hparams)]
  steps = [two_call_step(tx) for tx in txs]

  @jax.jit
  def run(states):
    xs = X[:3].astype(jnp.float64)
    return [jax.tree.map(lambda l: l[-1], scan_steps(step, w0, state, xs))
            for step, state in zip(steps, states)]

  plain, injected, skipped = run([tx.init(w0) for tx in txs])
  assert_close(injected, plain, 1e-12)
  assert_close(skipped, plain, 1e-12)
  assert not np.allclose(plain["w"], W0["w"])


@pytest.mark.parametrize("variant", TWO_CALL, ids=str)
def test_float_and_schedule_radii_give_the_same_state_structure(variant):
  """A checkpoint of a run with a float rho restores into one with a schedule (and back), and
  the injected form's init (concrete rho) fits its update (traced rho): same structure,
  shapes and dtypes, in both forms and under skip_if_nonfinite."""
  inner = optax.adam(1e-2)
  floats = dict(variant.hparams)
  schedules = dict(floats, **{n: (lambda v: lambda count: v)(floats[n])
                              for n in variant.rho_names})
  zeros = dict(floats, **{n: 0.0 for n in variant.rho_names})
  for two_call in (False, True):
    made = [variant.make(inner, **h, two_call=two_call) for h in (floats, schedules, zeros)]
    made += [sam_optax.skip_if_nonfinite(tx, 3) for tx in made]
    for tx in made[1:3]:
      assert_same_layout(tx.init(W0), made[0].init(W0))
    for tx in made[4:]:
      assert_same_layout(tx.init(W0), made[3].init(W0))
  # optax.inject_hyperparams: init sees concrete values, update traced ones.
  for tx in (injectable(variant, True)(inner, **floats, two_call=True),
             injectable(variant, True, skip=True)(inner, **floats)):
    state = tx.init(W0)
    traced = jax.eval_shape(lambda s: tx.update(f32_grad(W0, X[0]), s, W0)[1], state)
    assert_same_layout(traced, state)


def assert_same_layout(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert (jnp.shape(x), jnp.result_type(x)) == (jnp.shape(y), jnp.result_type(y))


@pytest.mark.parametrize("variant", catalogue_wide(
    *zip(*[(v, v.name) for v in TWO_CALL if v.rho_zero_is_inner and v.exact_at_rho_zero])))
def test_two_call_rho_zero_hands_the_inner_optimizer_g_bit_for_bit(variant):
  """rho = 0 in the two-call form: the descent call gets the caller's gradient at w + 0 = w,
  computed by the same jitted function as g, so the inner optimizer receives g exactly without
  the state keeping g (the inner optimizer is the identity: the updates are the direction)."""
  hparams = dict(variant.hparams, **{n: 0.0 for n in variant.rho_names})
  tx = variant.make(optax.identity(), **hparams, two_call=True)
  update, grad = jax.jit(tx.update), jax.jit(f32_grad)
  params, state = W0, tx.init(W0)
  for x in X[:2]:
    g = grad(params, x)
    eps, state = update(g, state, params)
    moved = optax.apply_updates(params, eps)
    direction, state = update(grad(moved, x), state, moved)
    for d, expected in zip(jax.tree.leaves(direction), jax.tree.leaves(g)):
      np.testing.assert_array_equal(np.asarray(d), np.asarray(expected))
    params = optax.apply_updates(moved, direction)


# ------------------------------------- 7. low-precision params with float32 gradients, adam inner


@pytest.mark.parametrize("variant, two_call", FORMS_COMPILED)
def test_low_precision_params_with_float32_gradients(variant, two_call):
  """bfloat16 and float16 params, float32 gradients, optax.adam inside: finite updates of the
  params' dtype at every step, close to the float32 run. In the one-call form also with a
  grad_fn in bfloat16 (`g` float32, `g_adv` bfloat16: they meet where a cadence or window
  skips the perturbed pass). Not float16 gradients: adam's second moment of a small float16
  direction (bSAM's `g_m / s`) underflows, a step away from float32 with or without SAM."""
  make_step = two_call_step if two_call else one_call_step
  # eps=1e-3: adam's first steps are not sign(g), which would turn the rounding of a near-zero
  # gradient entry into a full step of either sign.
  tx = variant.make(optax.adam(1e-2, eps=1e-3), **variant.hparams, two_call=two_call)
  native_grad = lambda p, x: jax.grad(loss)(p, x.astype(jax.tree.leaves(p)[0].dtype))
  runs = [(dtype, f32_grad) for dtype in (jnp.float32, jnp.bfloat16, jnp.float16)]
  if not two_call:
    runs += [(jnp.bfloat16, "native")]

  @jax.jit
  def run():
    paths = []
    for dtype, grad in runs:
      params = jax.tree.map(lambda l, d=dtype: l.astype(d), W0)
      if grad == "native":  # the clean g in float32, grad_fn's in the params' dtype
        def step(p, s, x):
          updates, s = tx.update(f32_grad(p, x), s, p, grad_fn=lambda q: native_grad(q, x))
          return optax.apply_updates(p, updates), s
      else:
        step = make_step(tx, grad)
      state, path = tx.init(params), []
      # Two steps: the first promotes adam's first moment to float32 (optax follows the
      # gradients' dtype), the second runs every conditional on the promoted state.
      for x in X[:2]:
        params, state = step(params, state, x)
        path.append(params)
      paths.append(path)
    return paths

  reference, *low = run()
  for (dtype, _), path in zip(runs[1:], low):
    for params, expected in zip(path, reference):
      for leaf in jax.tree.leaves(params):
        assert leaf.dtype == dtype and bool(jnp.all(jnp.isfinite(leaf)))
      # Adam steps of about 1e-2 each: the low-precision rounding of the params (8 or 11
      # significant bits) and of a near-zero gradient entry (which adam rescales to a step of
      # up to 1e-2) stay within one step of the float32 run; a missing, doubled or reversed
      # step does not.
      assert_close(params, expected, 1e-2)
  assert not np.allclose(reference[-1]["w"], W0["w"])
