"""Non-finite and huge gradients, for every catalogue variant (issue 13, section 5, items 1-3, 8).

* A NaN or Inf in the clean gradient `g` or in the perturbed gradient `g_adv` reaches the
  updates, in both forms, even where the loss saturates (its gradient at a NaN point comes out
  finite), and `skip_if_nonfinite` then skips the step. A variant that does not read `g`
  (Momentum-SAM, random SAM, bSAM) gives the updates of the good batch instead.
* Finite float32 gradients of magnitude 1e20, 1e30 and 1e-25, whose squares leave float32's
  range, give the directions a float64 run of the plain-jnp references gives (where the
  variant's rule itself stays within float32's range).
* One gradient spike of 1e20 enters DNSAM's norm estimate (its squared norm capped at float32's
  largest value) and decays from it at the moving average's rate (it used to make the estimate
  infinite for good).
* Renormalization (SSAM) keeps the clean gradient's norm where `||g||^2` overflows.
* The norms and projection coefficients equal the plain formulas bit for bit in the normal range.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_optax
from sam_optax._src import tree as tree_lib
from tests.catalogue import CATALOGUE

TWO_CALL = [v for v in CATALOGUE if v.two_call]
F32, F64 = jnp.float32, jnp.float64


def tiered(variants, fast):
  """The variants, those not named in `fast` in the slow tier: every catalogue sweep here
  compiles a step per variant; the fast tier keeps the cases the issue reported."""
  return [v if v.name in fast else pytest.param(v, marks=pytest.mark.slow) for v in variants]

# ---------------------------------------------------------- NaN and Inf reach the updates

W0 = {"a": jnp.asarray([0.3, -0.5, 0.8], F32),
      "b": jnp.asarray([[0.2, -0.1], [0.4, 0.6]], F32),
      "c": jnp.asarray(0.7, F32)}
CURVATURE = {"a": jnp.asarray([1.0, 2.0, 0.5], F32), "b": jnp.asarray(1.5, F32),
             "c": jnp.asarray(0.8, F32)}


def saturating_loss(p):
  """Entries beyond |w| = 4, and NaN entries, contribute nothing and have a zero gradient: the
  gradient at a point with a NaN entry is finite, so nothing but the engine carries the NaN."""
  def leaf(w, k):
    inside = jnp.abs(w) < 4.0
    w = jnp.where(inside, w, 0.0)  # the double where: no NaN through the unselected branch
    return jnp.sum(jnp.where(inside, jnp.cos(w) + k * w * w, 0.0))
  return sum(jax.tree.leaves(jax.tree.map(leaf, p, CURVATURE)))


def poison(leaf_name, value):
  """A tree of zeros with `value` at the first entry of one leaf (added to a gradient)."""
  return {k: (v.reshape(-1).at[0].set(value).reshape(v.shape) if k == leaf_name else v)
          for k, v in jax.tree.map(jnp.zeros_like, W0).items()}


# Every leaf (so that some leaf is one ESAM's first draw leaves out), NaN and Inf, in g or in
# g_adv; the first case poisons nothing (the good batch).
CASES = [("none", None, None)] + [
    (f"{where}-{name}-{leaf}", where, poison(leaf, value))
    for where in ("clean", "perturbed") for name, value in (("nan", jnp.nan), ("inf", jnp.inf))
    for leaf in W0]
ZERO = jax.tree.map(jnp.zeros_like, W0)


def stacked_poisons():
  clean = [p if where == "clean" else ZERO for _, where, p in CASES]
  perturbed = [p if where == "perturbed" else ZERO for _, where, p in CASES]
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return stack(clean), stack(perturbed)


def plus(a, b):
  return jax.tree.map(lambda x, y: x + y, a, b)


def skipped_steps(tx, two_call):
  """For every case: (whether skip_if_nonfinite(tx) skipped the step, the params after it, the
  wrapped engine's step count). One jitted function; the cases run under `lax.map` so that the
  engine's conditionals stay conditionals."""
  skipper = sam_optax.skip_if_nonfinite(tx, 3)

  def one_case(poisons):
    clean_poison, perturbed_poison = poisons
    grad = jax.grad(saturating_loss)
    state = skipper.init(W0)
    if two_call:
      eps, state = skipper.update(plus(grad(W0), clean_poison), state, W0)
      moved = optax.apply_updates(W0, eps)
      updates, state = skipper.update(plus(grad(moved), perturbed_poison), state, moved)
      params = optax.apply_updates(moved, updates)
    else:
      grad_fn = lambda p: plus(grad(p), perturbed_poison)
      updates, state = skipper.update(plus(grad(W0), clean_poison), state, W0, grad_fn=grad_fn)
      params = optax.apply_updates(W0, updates)
    return state.total_notfinite, params

  return jax.jit(lambda poisons: jax.lax.map(one_case, poisons))(stacked_poisons())


def check_every_case_is_caught(variant, two_call):
  extra = {"two_call": True} if two_call else {}
  tx = variant.make(optax.sgd(0.1), **variant.hparams, **extra)
  skipped, params = skipped_steps(tx, two_call)
  skipped = np.asarray(skipped)
  assert skipped[0] == 0, "the good batch was skipped"
  good = jax.tree.map(lambda x: x[0], params)
  moved = jax.tree.map(lambda x, w: not np.array_equal(np.asarray(x), np.asarray(w)), good, W0)
  assert any(jax.tree.leaves(moved)), "the good batch did not move the params"
  for i, (name, where, _) in enumerate(CASES[1:], start=1):
    after = jax.tree.map(lambda x: x[i], params)
    if skipped[i] == 1:  # the step is skipped: the params stay at w
      tol = 1e-6 if two_call else 0.0  # a skipped descent call returns to w + eps - eps
      for x, w in zip(jax.tree.leaves(after), jax.tree.leaves(W0)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), rtol=0, atol=tol, err_msg=name)
    else:
      # Not skipped: only a variant that does not read g may do that, and only for a bad g,
      # and then the step must be the good batch's.
      assert where == "clean", f"{name}: a non-finite perturbed gradient was not caught"
      for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(good)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@pytest.mark.parametrize("variant", tiered(CATALOGUE, {"usam", "esam"}), ids=str)
def test_nonfinite_gradients_are_caught(variant):
  check_every_case_is_caught(variant, two_call=False)


@pytest.mark.parametrize("variant", tiered(TWO_CALL, {"usam"}), ids=str)
def test_nonfinite_gradients_are_caught_two_call(variant):
  check_every_case_is_caught(variant, two_call=True)


def test_the_saturating_loss_hides_a_nan_without_the_engine():
  """The test above is not vacuous: USAM's rule alone turns a NaN in g into finite updates."""
  grad = jax.grad(saturating_loss)
  g = plus(grad(W0), poison("a", jnp.nan))
  eps = jax.tree.map(lambda x: 0.1 * x, g)  # USAM's perturbation carries the NaN...
  g_adv = grad(plus(W0, eps))               # ...which the gradient there drops
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g_adv))
  updates, _ = sam_optax.usam(optax.sgd(0.1), rho=0.1).update(
      g, sam_optax.usam(optax.sgd(0.1), rho=0.1).init(W0), W0, grad_fn=grad)
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))


# ------------------------------------------------------------------- huge and tiny gradients

SCALES = [1e20, 1e30, 1e-25]
STEPS, LR = 3, 0.1
_RNG = np.random.default_rng(3)
HUGE_W0 = {"a": _RNG.normal(size=5), "b": _RNG.normal(size=(3, 2)), "c": np.asarray(0.4)}
OFFSETS = {"a": _RNG.uniform(-1, 1, size=5), "b": _RNG.uniform(-1, 1, size=(3, 2)),
           "c": np.asarray(-0.3)}
# Where the rule's own state leaves float32's range although its directions do not.
STATE_OVERFLOWS = {("bsam", 1e30): "its precision s <- b2 s + (1 - b2) sqrt(s) |g| reaches "
                                   "3e43 at the second step",
                   ("dnsam", 1e20): "its state, the average of ||g||^2 ~ 1e40, is capped at "
                                    "float32's largest value",
                   ("dnsam", 1e30): "the same",
                   ("dnsam", 1e-25): "its state, the average of ||g||^2 ~ 1e-50, underflows"}


def bounded_loss(dtype):
  """`scale * sum(b w + logcosh(w) / 2)`: its gradient `scale (b + tanh(w) / 2)` is bounded by
  1.5 scale wherever a perturbation takes w, and its Hessian by scale / 2."""
  offsets = jax.tree.map(lambda b: jnp.asarray(b, dtype), OFFSETS)

  def loss(p, scale):
    def leaf(w, b):
      logcosh = jnp.logaddexp(w, -w) - jnp.log(jnp.asarray(2.0, dtype))
      return jnp.sum(b * w + 0.5 * logcosh)
    return scale * sum(jax.tree.leaves(jax.tree.map(leaf, p, offsets)))
  return loss


def library_directions(variant):
  """The directions the library hands the inner optimizer (optax.identity) at each of STEPS
  steps `w <- w - (LR / scale) d`, in float32, for every scale: the params move by O(LR) at
  every scale, so that the gradient's magnitude is all that changes."""
  tx = variant.make(optax.identity(), **variant.hparams)
  loss = bounded_loss(F32)
  params = jax.tree.map(lambda w: jnp.asarray(w, F32), HUGE_W0)

  def one_scale(params, scale):
    grad_fn = lambda p: jax.grad(loss)(p, scale)
    w, state, out = params, tx.init(params), []
    for _ in range(STEPS):
      d, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
      w = jax.tree.map(lambda x, y: x - (LR / scale) * y, w, d)
      out.append(d)
    return out

  # The params are an argument, not constants XLA could fold into the arithmetic.
  @jax.jit
  def run(params, scales):
    return jax.lax.map(functools.partial(one_scale, params), scales)
  return run(params, jnp.asarray(SCALES, F32))


def reference_directions(variant, scale):
  """The catalogue's plain-jnp reference, in float64, on the same problem (flat vectors); random
  draws in float32, as the library makes them for float32 params."""
  params32 = jax.tree.map(lambda w: jnp.asarray(w, F32), HUGE_W0)
  w32, unravel32 = ravel_pytree(params32)
  _, unravel64 = ravel_pytree(jax.tree.map(lambda w: jnp.asarray(w, F64), HUGE_W0))
  loss = bounded_loss(F64)
  grad = jax.jit(lambda w: ravel_pytree(jax.grad(loss)(unravel64(w), scale))[0])
  direction = variant.reference(variant.hparams)
  if getattr(direction, "needs_structure", False):
    # The leaves' shapes and float32 dtypes, which the per-leaf draws follow.
    direction = functools.partial(direction, unravel=lambda w: unravel32(w.astype(F32)))
  w, out, largest = w32.astype(F64), [], 0.0
  for t in range(STEPS):
    d = direction(grad, w, t)
    w = w - (LR / scale) * d
    out.append(np.asarray(d))
    largest = max(largest, float(np.max(np.abs(d))), float(np.max(np.abs(w))))
  return out, largest


@pytest.mark.parametrize("variant", tiered(CATALOGUE, {"ssam", "looksam", "asam", "fisher_sam"}),
                         ids=str)
def test_huge_and_tiny_gradients_match_float64(variant):
  ours = library_directions(variant)
  compared = []
  for i, scale in enumerate(SCALES):
    expected, reached = reference_directions(variant, scale)
    if (variant.name, scale) in STATE_OVERFLOWS:
      continue
    if reached > float(jnp.finfo(F32).max) / 10:
      # The rule itself leaves float32's range: HUSAM's rho H g ~ scale^2, or bSAM's weight
      # decay term, which does not shrink with the gradient, at 1e-25 / LR.
      continue
    compared.append(scale)
    for t, e in enumerate(expected):
      a = np.asarray(ravel_pytree(jax.tree.map(lambda x: x[i], ours[t]))[0], np.float64)
      assert np.all(np.isfinite(a)), (scale, t)
      size = np.max(np.abs(e))
      np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * size, err_msg=f"{scale} step {t}")
  assert 1e-25 in compared or variant.name in ("bsam", "dnsam")
  assert 1e20 in compared or variant.name in ("husam", "penalty_sam", "dnsam")


def test_looksam_reuse_step_at_1e20():
  """The reported case: LookSAM's reuse step took safe_ratio(||g|| = inf, ...) and gave Inf."""
  tx = sam_optax.looksam(optax.identity(), rho=0.3, alpha=0.7, k=2)
  g = {"w": jnp.asarray([3e20, -4e20], F32)}
  grad_fn = lambda p: jax.tree.map(lambda x: x * jnp.asarray([1.0, 0.5], F32), g)
  params = {"w": jnp.zeros(2, F32)}
  state = tx.init(params)
  d0, state = tx.update(g, state, params, grad_fn=grad_fn)  # stores g_v
  d1, _ = tx.update(g, state, params, grad_fn=grad_fn)      # reuses it
  g64, ga64 = np.asarray([3e20, -4e20]), np.asarray([3e20, -2e20])
  g_v = ga64 - (ga64 @ g64) / (g64 @ g64) * g64
  expected = g64 + 0.7 * np.linalg.norm(g64) / np.linalg.norm(g_v) * g_v
  np.testing.assert_allclose(np.asarray(d1["w"], np.float64), expected, rtol=1e-6)


# ------------------------------------------------------------------ renormalization (SSAM)

@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-25])
def test_renormalization_keeps_the_norm_where_its_square_overflows(scale):
  g = np.asarray([3.0, -4.0, 1.0]) * scale
  g_adv = np.asarray([2.5, -3.0, 2.0]) * scale
  expected = np.linalg.norm(g) / np.linalg.norm(g_adv) * g_adv
  fix = sam_optax.renormalize()
  d, _ = fix.update({"w": jnp.asarray(g_adv, F32)}, fix.init(None), None,
                    clean_grads={"w": jnp.asarray(g, F32)})
  np.testing.assert_allclose(np.asarray(d["w"], np.float64), expected, rtol=1e-6)
  # With the adaptive metric (ASAM's), both norms weighted.
  weights = np.asarray([1.0, 0.5, 2.0])
  fix = sam_optax.renormalize(lambda p: {"w": jnp.asarray(weights, F32)})
  d, _ = fix.update({"w": jnp.asarray(g_adv, F32)}, fix.init(None), None,
                    clean_grads={"w": jnp.asarray(g, F32)})
  expected = np.linalg.norm(weights * g) / np.linalg.norm(weights * g_adv) * g_adv
  np.testing.assert_allclose(np.asarray(d["w"], np.float64), expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["sam", "ssam"])
def test_sam_and_ssam_step_where_the_squared_norm_overflows(name):
  """At 1e20 g_adv differs from g: SSAM used to return a zero direction (inf / inf -> 0)."""
  tx = getattr(sam_optax, name)(optax.identity(), rho=0.5)
  loss = bounded_loss(F32)
  params = jax.tree.map(lambda w: jnp.asarray(w, F32), HUGE_W0)
  grad_fn = lambda p: jax.grad(loss)(p, 1e20)
  d, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  flat_d = np.asarray(ravel_pytree(d)[0], np.float64)
  flat_g = np.asarray(ravel_pytree(grad_fn(params))[0], np.float64)
  assert np.all(np.isfinite(flat_d)) and np.linalg.norm(flat_d) > 1e19
  if name == "ssam":
    np.testing.assert_allclose(np.linalg.norm(flat_d), np.linalg.norm(flat_g), rtol=1e-6)


# ------------------------------------------------------------------------ DNSAM's estimate

def test_dnsam_estimate_recovers_from_a_spike():
  decay, rho, steps, spike_at = 0.9, 0.1, 1000, 3
  ascent = sam_optax.deterministic_normalized_ascent(rho, decay=decay)
  normal = jnp.asarray([0.6, 0.8], F32)  # norm 1
  factors = np.ones(steps, np.float32)
  factors[spike_at] = 1e20

  @jax.jit
  def run(factors):
    def step(state, factor):
      g = {"w": normal * factor}
      eps, state = ascent.update(g, state)
      # The estimate the perturbation was normalized by: rho ||g|| / ||eps||.
      n_eps = jnp.linalg.norm(eps["w"].astype(F64))
      estimate = rho * jnp.linalg.norm(g["w"].astype(F64)) / n_eps
      return state, (estimate, state.sq_norm_ema)
    return jax.lax.scan(step, ascent.init({"w": normal}), jnp.asarray(factors))[1]

  estimates, stored = (np.asarray(x) for x in run(factors))
  assert np.all(np.isfinite(estimates)) and np.all(np.isfinite(stored))
  # The float64 reference: the bias-corrected EMA of ||g||^2, where ||g||^2 beyond float32's
  # range (the spike's 1e40) enters as float32's largest value (documented).
  v, expected = 0.0, []
  for t, factor in enumerate(factors.astype(np.float64), start=1):
    v = decay * v + (1 - decay) * min(factor ** 2, float(np.finfo(np.float32).max))
    expected.append(np.sqrt(v / (1 - decay ** t)))
  # float32 rounding of a 1000-step average that falls from 3e37 to 1: a few 1e-6 relative.
  np.testing.assert_allclose(estimates, expected, rtol=5e-5)
  # The spike's share of ||g||^2's average decays by `decay` per step (once the bias correction
  # 1 - decay^t is 1), so the estimate is back at the normal norm within ~830 steps.
  excess = estimates.astype(np.float64) ** 2 - 1.0
  after = slice(spike_at + 200, spike_at + 210)
  np.testing.assert_allclose(excess[after][1:] / excess[after][:-1], decay, rtol=1e-5)
  np.testing.assert_allclose(estimates[-1], 1.0, rtol=1e-5)


def test_dnsam_keeps_perturbing_after_a_spike():
  """End to end: once the spike has decayed from the average (0.5^130 3e38 < 1), the steps are
  sharpness-aware again; they used to stay plain SGD steps for good."""
  tx = sam_optax.dnsam(optax.identity(), rho=0.1, decay=0.5)
  loss = bounded_loss(F32)
  params = jax.tree.map(lambda w: jnp.asarray(w, F32), HUGE_W0)
  scales = np.ones(150, np.float32)
  scales[1] = 1e20

  @jax.jit
  def run(scales):
    def step(state, scale):
      grad_fn = lambda p: jax.grad(loss)(p, scale)
      return tx.update(grad_fn(params), state, params, grad_fn=grad_fn)[::-1]
    return jax.lax.scan(step, tx.init(params), scales)

  state, directions = run(jnp.asarray(scales))
  d = jax.tree.map(lambda x: x[-1], directions)
  assert np.isfinite(float(state.ascent_state.sq_norm_ema))
  plain = jax.grad(loss)(params, 1.0)
  moved = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(d),
                                                              jax.tree.leaves(plain)))
  assert moved > 1e-6  # g_adv differs from g: the perturbation is not zero


# ------------------------------------------------------------- the norms themselves

@pytest.mark.parametrize("dtype, scales", [(F32, [1e-30, 1e-25, 1e-20, 1e20, 1e30, 1e37]),
                                           (F64, [1e-200, 1e-160, 1e160, 1e300])])
def test_norm_and_projection_at_extreme_scales(dtype, scales):
  rng = np.random.default_rng(0)
  a = {"x": rng.normal(size=(4, 3)), "y": rng.normal(size=5)}
  b = {"x": rng.normal(size=(4, 3)), "y": rng.normal(size=5)}
  flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])
  for scale in scales:
    for scale_b in (scale, 1.0):
      ta = jax.tree.map(lambda x: jnp.asarray(x * scale, dtype), a)
      tb = jax.tree.map(lambda x: jnp.asarray(x * scale_b, dtype), b)
      fa, fb = flat(ta).astype(np.float64), flat(tb).astype(np.float64)
      # The float64 truth, from float64 copies scaled back to the unit range.
      na, nb = np.linalg.norm(fa / scale) * scale, np.linalg.norm(fb / scale_b) * scale_b
      coef = (fa / scale) @ (fb / scale_b) / ((fb / scale_b) @ (fb / scale_b)) * scale / scale_b
      for fn in (lambda f, *x: f(*x), lambda f, *x: jax.jit(f)(*x)):
        np.testing.assert_allclose(float(fn(tree_lib.norm, ta)), na, rtol=1e-6)
        np.testing.assert_allclose(float(fn(tree_lib.norm, tb)), nb, rtol=1e-6)
        if np.isfinite(coef) and abs(coef) < float(jnp.finfo(dtype).max):
          np.testing.assert_allclose(float(fn(tree_lib.projection_coefficient, ta, tb)), coef,
                                     rtol=1e-5)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_norm_and_projection_are_the_plain_formulas_in_the_normal_range(dtype):
  rng = np.random.default_rng(1)
  for scale in (1e-6, 1.0, 1e6):
    a = {"x": jnp.asarray(rng.normal(size=(8, 5)) * scale, dtype),
         "y": jnp.asarray(rng.normal(size=3) * scale, dtype)}
    b = jax.tree.map(lambda x: x * 0.7 + jnp.asarray(rng.normal(size=x.shape), dtype), a)
    plain_norm = jnp.sqrt(tree_lib.vdot(a, a))
    plain_coef = tree_lib.safe_ratio(tree_lib.vdot(a, b), tree_lib.vdot(b, b))
    assert tree_lib.norm(a) == plain_norm
    assert tree_lib.projection_coefficient(a, b) == plain_coef
    assert jax.jit(tree_lib.norm)(a) == jax.jit(lambda t: jnp.sqrt(tree_lib.vdot(t, t)))(a)


def test_norm_is_nonfinite_exactly_when_an_entry_is():
  finite = {"x": jnp.asarray([1e30, -2e30], F32), "y": jnp.asarray([0.0], F32)}
  assert np.isfinite(float(tree_lib.norm(finite)))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    tree_ = {"x": finite["x"], "y": jnp.asarray([bad], F32)}
    assert not np.isfinite(float(tree_lib.norm(tree_)))
    assert not np.isfinite(float(jax.jit(tree_lib.norm)(tree_)))
  assert float(tree_lib.norm({"x": jnp.zeros(3, F32)})) == 0.0
  assert float(tree_lib.norm({})) == 0.0
