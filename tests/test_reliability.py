"""Reliability: non-finite values, low precision, and a long run, for every catalogue variant.

* Non-finite gradients. Documented behaviour: a NaN or Inf in the clean gradient `g` or in the
  perturbed gradient `g_adv` reaches the updates; nothing is hidden (a variant that does not
  read `g` gives updates independent of it). Recipes: `optax.apply_if_finite(tx, n)` skips a
  step whose `g` is non-finite with the state untouched, but cannot see `g_adv`;
  `sam_optax.skip_if_nonfinite(tx, n)` judges the step by its updates and skips a bad batch in
  either gradient, one-call and two-call, with the state untouched; training then goes on
  exactly as if the bad batch had not been drawn.
* Low precision: bfloat16/float16 params and gradients of magnitude 1e-8 (bfloat16; 1e-4 for
  float16, whose normal range starts at 6.1e-5) to 1e4 give the float32 result to a few units
  in the last place of the low-precision dtype; norms are accumulated in float32.
* Long run: benchmarks/long_run.py's full 10,000 steps, one-call and two-call.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._src import tree as tree_lib
from tests.catalogue import CATALOGUE

TWO_CALL = [v for v in CATALOGUE if v.two_call]

# ------------------------------------------------------------------------------ a small problem

W0 = {"w": jnp.asarray([[0.5, -0.3, 0.1], [0.2, 0.8, -0.6]], jnp.float32),
      "b": jnp.asarray([0.1, -0.2, 0.05], jnp.float32)}
X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 2)), jnp.float32)  # 6 batches


def loss(p, x):
  return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2) + 0.01 * jnp.sum(p["w"] ** 2)


def batch(i, clean=1.0, perturbed=1.0):
  """Batch i; `clean`/`perturbed` multiply the clean/perturbed gradient (NaN: a bad batch)."""
  return X[i], jnp.asarray(clean, jnp.float32), jnp.asarray(perturbed, jnp.float32)


def gradients(params, b):
  x, clean, perturbed = b
  scaled = lambda factor: (lambda p: jax.tree.map(lambda g: g * factor, jax.grad(loss)(p, x)))
  return scaled(clean)(params), scaled(perturbed)


def one_call_step(tx):
  @jax.jit
  def step(params, state, b):
    grads, grad_fn = gradients(params, b)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, updates
  return step


def two_call_step(tx):
  @jax.jit
  def step(params, state, b):
    x, clean, perturbed = b
    grads = jax.tree.map(lambda g: g * clean, jax.grad(loss)(params, x))
    updates, state = tx.update(grads, state, params)
    moved = optax.apply_updates(params, updates)
    grads = jax.tree.map(lambda g: g * perturbed, jax.grad(loss)(moved, x))
    updates, state = tx.update(grads, state, moved)
    return optax.apply_updates(moved, updates), state, updates
  return step


def run(step, params, state, batches):
  for b in batches:
    params, state, _ = step(params, state, b)
  return params, state


def assert_trees_equal(a, b, skip=()):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
    if any(s in jax.tree_util.keystr(path) for s in skip):
      continue
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def is_finite(tree_):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree_))


# ------------------------------------------------------------- non-finite: documented behaviour


@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_nonfinite_gradients_reach_the_updates(variant):
  """NaN in g or in g_adv is never hidden: it reaches the updates (or g is not read at all)."""
  tx = variant.make(optax.sgd(0.1), **variant.hparams)
  state = tx.init(W0)
  grads, grad_fn = gradients(W0, batch(0))
  nan_grads = jax.tree.map(lambda g: g.at[..., 0].set(jnp.nan), grads)
  updates, _ = tx.update(nan_grads, state, W0, grad_fn=grad_fn)
  if is_finite(updates):  # then the step must not depend on g (e.g. momentum_sam, random_sam)
    zero_grads = jax.tree.map(jnp.zeros_like, grads)
    expected, _ = tx.update(zero_grads, state, W0, grad_fn=grad_fn)
    assert_trees_equal(updates, expected)
  nan_grad_fn = lambda p: jax.tree.map(lambda g: g * jnp.nan, grad_fn(p))
  updates, _ = tx.update(grads, state, W0, grad_fn=nan_grad_fn)
  assert not is_finite(updates)


@pytest.mark.parametrize("variant", TWO_CALL, ids=str)
def test_nonfinite_gradients_reach_the_updates_two_call(variant):
  tx = variant.make(optax.sgd(0.1), **variant.hparams, two_call=True)
  grads, _ = gradients(W0, batch(0))
  state = tx.init(W0)
  eps, ascended = tx.update(grads, state, W0)
  nan_grads = jax.tree.map(lambda g: g * jnp.nan, grads)
  updates, _ = tx.update(nan_grads, ascended, optax.apply_updates(W0, eps))  # bad g_adv
  assert not is_finite(updates)
  def pair(clean_grads):
    eps, ascended = tx.update(clean_grads, state, W0)
    return eps, tx.update(grads, ascended, optax.apply_updates(W0, eps))[0]

  eps, updates = pair(nan_grads)  # bad g: in eps, or in the descent call's updates
  if is_finite(eps) and is_finite(updates):  # then g must not be read at all
    zero_eps, zero_updates = pair(jax.tree.map(jnp.zeros_like, grads))
    assert_trees_equal((eps, updates), (zero_eps, zero_updates))


# ---------------------------------------------------------------- non-finite: skipping a batch


@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_apply_if_finite_skips_a_nonfinite_clean_gradient(variant):
  """optax.apply_if_finite around the variant: a NaN g leaves the whole state untouched."""
  tx = optax.apply_if_finite(variant.make(optax.adam(1e-2), **variant.hparams), 3)
  step = one_call_step(tx)
  params, state = run(step, W0, tx.init(W0), [batch(0)])
  bad_params, bad_state, updates = step(params, state, batch(1, clean=jnp.nan))
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert_trees_equal(bad_state.inner_state, state.inner_state)
  assert_trees_equal(bad_params, params)
  assert int(bad_state.total_notfinite) == 1
  ours = run(step, bad_params, bad_state, [batch(2), batch(3)])
  reference = run(step, W0, tx.init(W0), [batch(0), batch(2), batch(3)])
  assert_trees_equal(ours[0], reference[0])
  assert_trees_equal(ours[1].inner_state, reference[1].inner_state)


def test_apply_if_finite_cannot_see_the_perturbed_gradient():
  """The limit of the outer optax wrapper: it checks g before the perturbed pass exists."""
  tx = optax.apply_if_finite(sam_optax.sam(optax.sgd(0.1)), 3)
  _, state, updates = one_call_step(tx)(W0, tx.init(W0), batch(0, perturbed=jnp.nan))
  assert not is_finite(updates) and int(state.total_notfinite) == 0


# Bad batches: NaN in both gradients (every step reads one), in g only, in g_adv only. A step
# that does not read the bad gradient (a variant that ignores g; a LookSAM step without the
# perturbed pass) is an ordinary step: it must equal the step on the good batch.
BAD = [dict(clean=jnp.nan, perturbed=jnp.nan), dict(clean=jnp.nan), dict(perturbed=jnp.inf)]
SCRATCH = (".pending.clean_grads", ".pending.clean_params")  # two-call: last pair's g and w,
# read only by a descent call


def skip_bad_batches(step, tx, close):
  """Runs batch 0, the bad batches 1-3, then 4 and 5; returns which bad batches were skipped."""
  params, state = run(step, W0, tx.init(W0), [batch(0)])
  kept, skipped = [batch(0)], []
  for i, bad in enumerate(BAD, start=1):
    new_params, new_state, _ = step(params, state, batch(i, **bad))
    if int(new_state.total_notfinite) == int(state.total_notfinite):  # not read: not skipped
      good_params, good_state, _ = step(params, state, batch(i))
      close(new_params, good_params)
      assert_trees_equal(new_state.inner_state, good_state.inner_state, skip=SCRATCH)
      kept.append(batch(i))
    else:  # skipped: the whole state untouched, the params where they were
      assert_trees_equal(new_state.inner_state, state.inner_state, skip=SCRATCH)
      close(new_params, params)
      skipped.append(i)
    params, state = new_params, new_state
  assert 1 in skipped  # a batch bad in both gradients is always skipped
  ours = run(step, params, state, [batch(4), batch(5)])
  reference = run(step, W0, tx.init(W0), kept + [batch(4), batch(5)])
  close(ours[0], reference[0])
  close(ours[1].inner_state, reference[1].inner_state, skip=SCRATCH)
  return skipped


def close_two_call(a, b, skip=()):
  """A skipped descent returns the params to w exactly where |eps| <= |w| (w - (w + eps) is
  then exact), else to within one rounding of w + eps; the run goes on from there."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
    if any(s in jax.tree_util.keystr(path) for s in skip):
      continue
    if jnp.issubdtype(x.dtype, jnp.floating):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    else:
      assert_trees_equal(x, y)


@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_skip_if_nonfinite_skips_a_bad_batch(variant):
  tx = sam_optax.skip_if_nonfinite(variant.make(optax.adam(1e-2), **variant.hparams), 3)
  skipped = skip_bad_batches(one_call_step(tx), tx, assert_trees_equal)
  if variant.name == "sam":  # SAM reads both gradients on every step
    assert skipped == [1, 2, 3]


@pytest.mark.parametrize("variant", TWO_CALL, ids=str)
def test_skip_if_nonfinite_skips_a_bad_pair_in_the_two_call_form(variant):
  tx = sam_optax.skip_if_nonfinite(
      variant.make(optax.adam(1e-2), **variant.hparams, two_call=True), 3)
  skipped = skip_bad_batches(two_call_step(tx), tx, close_two_call)
  if variant.name == "sam":
    assert skipped == [1, 2, 3]


def test_skip_if_nonfinite_two_call_calls_individually():
  """Call by call: a skipped ascent returns zeros and the next (descent) call is skipped too."""
  tx = sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1), two_call=True), 3)
  state = tx.init(W0)
  grads, _ = gradients(W0, batch(0))
  nan_grads = jax.tree.map(lambda g: g * jnp.nan, grads)
  eps, state1 = tx.update(nan_grads, state, W0)
  assert all(bool(jnp.all(e == 0)) for e in jax.tree.leaves(eps))
  assert bool(state1.skip_descent) and not bool(state1.inner_state.pending.descending)
  updates, state2 = tx.update(grads, state1, W0)  # whatever it gets, it is skipped
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert_trees_equal(state2.inner_state, state.inner_state)
  assert not bool(state2.skip_descent)
  eps, state3 = tx.update(grads, state2, W0)  # a fresh pair starts with an ascent call
  assert bool(state3.inner_state.pending.descending) and is_finite(eps)


def test_skip_if_nonfinite_gives_up_after_max_consecutive_errors():
  tx = sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1)), 2)
  step = one_call_step(tx)
  params, state = W0, tx.init(W0)
  for i in range(3):
    params, state, updates = step(params, state, batch(i, perturbed=jnp.nan))
    assert is_finite(params) == (i < 2), i
  assert int(state.total_notfinite) == 3


def test_skip_if_nonfinite_keeps_update_with_aux():
  tx = sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1), has_aux=True), 3)
  assert tx.has_aux
  grads, grad_fn = gradients(W0, batch(0))
  with_aux = lambda p: (grad_fn(p), jnp.float32(7.0))
  updates, state, aux = tx.update_with_aux(grads, tx.init(W0), W0, grad_fn=with_aux)
  assert float(aux) == 7.0 and is_finite(updates) and bool(state.last_finite)


def test_skip_if_nonfinite_under_inject_hyperparams():
  make = lambda rho: sam_optax.skip_if_nonfinite(sam_optax.sam(optax.sgd(0.1), rho=rho), 3)
  tx = optax.inject_hyperparams(make)(rho=0.05)
  step = one_call_step(tx)
  params, state = run(step, W0, tx.init(W0), [batch(0)])
  bad_params, bad_state, _ = step(params, state, batch(1, perturbed=jnp.nan))
  assert_trees_equal(bad_params, params)
  assert_trees_equal(bad_state.inner_state.inner_state, state.inner_state.inner_state)


# ------------------------------------------------------------------------------ low precision

# The comparison: our low-precision result `ours` against the float32 result `reference` from
# the same starting params, per leaf, relative to the leaf's largest reference entry:
#
#   |ours - reference| <= RTOL * max|reference| + 4 |rounded - reference|
#
# where `rounded` is the float32 computation fed the gradients the low-precision run sees
# (evaluated at points rounded to the low dtype, rounded back to it): its distance to the
# reference is the error the inputs' rounding causes whatever the library does, which a
# direction built from a small difference of gradients amplifies (LookSAM's g_v, WSAM's
# gamma/(1-gamma) weight). RTOL is four units in the last place (bfloat16 keeps 8 significant
# bits, float16 11). Where the float32 result does not fit in the low dtype (penalty SAM at
# 1e4 in float16: g + rho H g ~ 5e6 > 65504), it must overflow to inf, not come back wrong.
LOW_PRECISION_RTOL = {jnp.bfloat16: 2.0 ** -6, jnp.float16: 2.0 ** -9}
# Gradient magnitudes: bfloat16 has float32's range; float16's normal range is [6.1e-5, 65504],
# so a float16 gradient below ~6e-8 is zero before the library sees it.
SCALES = {jnp.bfloat16: [1e-8, 1e-4, 1.0, 1e2, 1e4], jnp.float16: [1e-4, 1e-2, 1.0, 1e2, 1e4]}
LP_SHAPES = {"big": (16, 16), "vec": (7,), "scalar": ()}  # at 1e4 a single squared entry is
# beyond float16's range: the norms must be accumulated in float32.


def lp_problem(dtype):
  rng = np.random.default_rng(1)
  params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in LP_SHAPES.items()}
  offsets = {k: jnp.asarray(rng.uniform(-1, 1, size=s), jnp.float32) for k, s in LP_SHAPES.items()}
  return params, offsets


def lp_grad_fn(scale, offsets, rounded_to=None):
  """The gradient `scale * (b + tanh(w) / 2)`, computed in float32, returned in w's dtype (as
  jax.grad of a loss computed in float32 returns it): bounded, so no variant overflows it.
  With `rounded_to`, the point and the gradient are rounded to that dtype (float32 returned)."""
  def grad_fn(p):
    def leaf(w, b):
      point = w if rounded_to is None else w.astype(rounded_to)
      g = (scale * (b + 0.5 * jnp.tanh(point.astype(jnp.float32)))).astype(point.dtype)
      return g.astype(w.dtype)
    return jax.tree.map(leaf, p, offsets)
  return grad_fn


def directions(tx, params, offsets, scales, rounded_to=None):
  """The direction handed to the inner optimizer (identity) at two steps, for every scale."""
  @jax.jit
  def run_all(params, offsets, scales):
    def one(scale):
      grad_fn = lp_grad_fn(scale, offsets, rounded_to)

      def step(state, _):
        d, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return state, d

      # lax.scan traces the step once for both steps: half the program a loop compiles.
      steps = jax.lax.scan(step, tx.init(params), length=2)[1]
      return [jax.tree.map(lambda l, t=t: l[t], steps) for t in range(2)]
    return jax.vmap(one)(scales)
  return run_all(params, offsets, jnp.asarray(scales, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_low_precision_matches_float32(variant, dtype):
  tx = variant.make(optax.identity(), **variant.hparams)
  params, offsets = lp_problem(dtype)
  params32 = jax.tree.map(lambda w: w.astype(jnp.float32), params)  # the same values
  scales = SCALES[dtype]
  ours = directions(tx, params, offsets, scales)
  reference = directions(tx, params32, offsets, scales)
  rounded = directions(tx, params32, offsets, scales, rounded_to=dtype)
  rtol, largest = LOW_PRECISION_RTOL[dtype], float(jnp.finfo(dtype).max)
  for (path, a), e, r in zip(jax.tree.leaves_with_path(ours), jax.tree.leaves(reference),
                             jax.tree.leaves(rounded)):
    where = jax.tree_util.keystr(path)
    assert a.dtype == dtype, where
    a, e, r = (np.asarray(x, np.float64) for x in (a, e, r))
    for i, scale in enumerate(scales):
      size = np.max(np.abs(e[i]), initial=0.0)
      if size > largest / 2:  # the true result does not fit: it must overflow, not be wrong
        assert not np.all(np.isfinite(a[i])) or np.max(np.abs(a[i])) > largest / 4, (where, scale)
        continue
      assert np.all(np.isfinite(a[i])), (where, scale)
      error = np.max(np.abs(a[i] - e[i]), initial=0.0)
      inherent = np.max(np.abs(r[i] - e[i]), initial=0.0)
      assert error <= rtol * size + 4 * inherent, (where, scale, error / size, inherent / size)


@pytest.mark.parametrize("dtype, value, size", [
    (jnp.float16, 1e4, 4096),    # squares 1e8 > float16's max: accumulated in float32
    (jnp.float16, 1e-4, 4096),   # squares 1e-8 < float16's smallest subnormal
    (jnp.bfloat16, 1e4, 4096),
    (jnp.bfloat16, 1e-8, 4096),
    (jnp.bfloat16, 1e-18, 16),   # squares 1e-36: still a normal float32
    (jnp.float32, 1e18, 16),     # squares 1e36: still below float32's max
])
def test_norms_neither_overflow_nor_underflow(dtype, value, size):
  leaf = jnp.full((size,), value, dtype)
  norm = tree_lib.norm({"a": leaf, "b": -leaf[:1]})
  assert norm.dtype == jnp.float32
  expected = float(leaf[0].astype(jnp.float64)) * np.sqrt(size + 1)
  np.testing.assert_allclose(float(norm), expected, rtol=1e-5)
  ascent = sam_optax.normalized_ascent(0.05)
  eps, _ = ascent.update({"a": leaf}, ascent.init({"a": leaf}))
  np.testing.assert_allclose(float(tree_lib.norm(eps)), 0.05, rtol=1e-2)


def test_norms_beyond_the_range_of_float32_squares():
  """Entries below ~1e-19 or above ~1e19 have squares outside float32's normal range: the norm
  is rescaled there, so the perturbation still has length rho (tests/test_nonfinite_inputs.py
  covers every variant)."""
  for value in (1e-25, 1e25):
    g = {"a": jnp.full((4,), value, jnp.float32)}
    ascent = sam_optax.normalized_ascent(0.05)
    eps, _ = ascent.update(g, ascent.init(g))
    np.testing.assert_allclose(np.asarray(eps["a"]), np.full(4, 0.025), rtol=1e-6)


# --------------------------------------------------------------------------------- long run


def load_long_run():
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "long_run.py"
  spec = importlib.util.spec_from_file_location("long_run", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # 10,000 steps, about 9 s each
@pytest.mark.parametrize("two_call", [False, True], ids=["one_call", "two_call"])
def test_long_run(two_call):
  """The full 10,000 steps: a small model makes it a few seconds."""
  args = ["--steps", "10000", "--sample-every", "1000", "--quiet"] + (
      ["--two-call"] if two_call else [])
  summary = load_long_run().main(args)
  assert summary["ok"], summary
  assert summary["compilations_after_warmup"] == 0 and summary["jit_cache_size"] == 1
  assert len(summary["live_arrays"]) == 1 and len(summary["live_bytes"]) == 1


def test_transfer_guard_is_enforced_here():
  """The long run's transfer check means something on this backend: a host value passed into
  the step under the guard is refused."""
  step = jax.jit(lambda a, b: a + b)
  a = jnp.ones(3)
  step(a, a)
  with jax.transfer_guard("disallow"):
    step(a, a)
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
      step(a, np.ones(3, np.float32))
