"""Dynamic loss scaling through both passes (`sam_optax.dynamic_loss_scale`): float16 compute
with float32 master weights, in the one-call form, the two-call form and the Flax helpers.

The float16 MLP's loss is small enough (a weight of 2^-30) that its gradient with respect to
the float16 activations rounds to zero: unscaled, nothing trains. The scale's rule is checked
against Flax's own `DynamicScale.value_and_grad`, and the whole step against a plain-jnp
loss-scaled SAM written here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.dynamic_scale import DynamicScale

import sam_optax
from sam_optax._src import loss_scaling
from tests import problems
from tests.catalogue import CATALOGUE

F16, F32 = jnp.float16, jnp.float32
LOSS_WEIGHT = 2.0 ** -30  # the loss's gradient at the float16 output is ~2^-34: zero in float16
LR = 0.3 / LOSS_WEIGHT    # sgd on the weighted loss = sgd(0.3) on the unweighted one
RHO = 0.05
NEVER_GROWS = 10 ** 9     # a growth interval no test reaches: the scale stays where it starts
BLOW = 2.0 ** 40         # times the loss of one pass: its float16 backward pass overflows


def init_mlp(seed=0, dtype=F32):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(4, 8)) / 2, "b1": np.zeros(8),
            "w2": rng.normal(size=(8, 1)) / 3, "b2": np.zeros(1)}
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def make_batches(steps, seed=1, n=32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(steps, n, 4)), F32)
  return x, jnp.sin(x[..., :1] + x[..., 1:2])


def forward(p, x, compute=F16):
  """float16 compute on float32 master weights; the output back in float32 for the loss."""
  c = lambda a: a.astype(compute)
  h = jnp.tanh(c(x) @ c(p["w1"]) + c(p["b1"]))
  return (h @ c(p["w2"]) + c(p["b2"])).astype(F32)


def mse(p, x, y):
  return jnp.mean((forward(p, x) - y) ** 2)


def loss(p, x, y):
  return LOSS_WEIGHT * mse(p, x, y)


def tree_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def one_call_step(tx, loss_fn=loss, scaled=True):
  @jax.jit
  def step(params, state, x, y, blow=1.0):
    scale = sam_optax.loss_scale(state) if scaled else 1.0
    clean = jax.grad(lambda p: scale * loss_fn(p, x, y))(params)
    # `blow` multiplies the loss of the perturbed pass only: a forced float16 overflow there.
    grad_fn = jax.grad(lambda p: scale * blow * loss_fn(p, x, y))
    updates, state = tx.update(clean, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state
  return step


def two_call_half(tx, loss_fn=loss):
  @jax.jit
  def half(params, state, x, y, blow=1.0):
    scale = sam_optax.loss_scale(state)
    grads = jax.grad(lambda p: scale * blow * loss_fn(p, x, y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return half


def train(tx, form, steps, params=None, blow_at=None):
  """`steps` steps of `tx` on the float16 MLP; the params and state after each."""
  params = init_mlp() if params is None else params
  state = tx.init(params)
  xs, ys = make_batches(steps)
  step = one_call_step(tx) if form == "one_call" else two_call_half(tx)
  history = []
  for t in range(steps):
    blow = BLOW if t == blow_at else 1.0
    if form == "one_call":
      params, state = step(params, state, xs[t], ys[t], blow)
    else:
      params, state = step(params, state, xs[t], ys[t])          # ascent call: clean gradient
      params, state = step(params, state, xs[t], ys[t], blow)    # descent call: at w + eps
    history.append((params, state))
  return history


def sam_state_of(state):
  """The SharpnessAwareState inside a dynamic_loss_scale state."""
  return state.inner_state.inner_state


# ------------------------------------------------------------------ float16 underflow, overflow


def test_unscaled_float16_gradient_underflows_to_zero():
  """The premise: in float16 the MLP's gradient is exactly zero, in float32 it is not."""
  params, (x, y) = init_mlp(), make_batches(1)
  g16 = jax.grad(loss)(params, x[0], y[0])
  assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g16))
  g32 = jax.grad(lambda p: LOSS_WEIGHT * jnp.mean((forward(p, x[0], F32) - y[0]) ** 2))(params)
  assert all(np.all(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(g32))


@pytest.mark.parametrize("form", ["one_call", pytest.param("two_call", marks=pytest.mark.slow)])
def test_float16_training_progresses_with_scaling_and_not_without(form):
  steps = 25
  two_call = form == "two_call"
  sam = sam_optax.sam(optax.sgd(LR), rho=RHO, two_call=two_call)
  params0 = init_mlp()
  x, y = make_batches(1, seed=7)
  initial = float(mse(params0, x[0], y[0]))

  # Without scaling: both gradients are zero, so the params never move.
  state, params = sam.init(params0), params0
  step = one_call_step(sam, scaled=False) if not two_call else None
  xs, ys = make_batches(steps)
  for t in range(steps):
    if two_call:
      for _ in range(2):
        grads = jax.grad(loss)(params, xs[t], ys[t])
        updates, state = sam.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    else:
      params, state = step(params, state, xs[t], ys[t])
  assert tree_equal(params, params0)

  # With scaling (starting at Flax's default 2^16): the same steps train.
  tx = sam_optax.dynamic_loss_scale(sam)
  params, state = train(tx, form, steps, params0)[-1]
  final = float(mse(params, x[0], y[0]))
  assert final < 0.5 * initial, (initial, final)
  assert int(state.inner_state.total_notfinite) == 0  # 2^16 never overflows here
  assert int(sam_state_of(state).count) == steps


@pytest.mark.parametrize("form", ["one_call", pytest.param("two_call", marks=pytest.mark.slow)])
def test_overflow_in_the_perturbed_pass_only_is_skipped_and_recovered(form):
  """A float16 overflow of the perturbed gradient alone (the clean one is finite): the step is
  skipped (params, inner state, the whole sharpness-aware state untouched), the scale halves,
  and training goes on."""
  blow_at, steps = 3, 12
  tx = sam_optax.dynamic_loss_scale(
      sam_optax.sam(optax.sgd(LR, momentum=0.9), rho=RHO, two_call=form == "two_call"),
      DynamicScale(scale=2.0 ** 16, growth_interval=4))
  history = train(tx, form, steps, blow_at=blow_at)
  (before_params, before), (after_params, after) = history[blow_at - 1], history[blow_at]
  assert tree_equal(after_params, before_params)
  # Step count, momentum, ascent state (a two-call state's pending pair is not compared: it
  # holds the params and gradient of the last ascent call, rejected or not).
  without_pending = lambda s: sam_state_of(s)._replace(pending=None)
  assert tree_equal(without_pending(after), without_pending(before))
  assert float(after.dynamic_scale.scale) == 0.5 * float(before.dynamic_scale.scale)
  assert int(after.dynamic_scale.fin_steps) == 0
  assert int(after.inner_state.total_notfinite) == 1
  # Recovery: every later step is applied, and the scale grows again after 4 + 1 finite steps.
  final_params, final = history[-1]
  assert int(final.inner_state.total_notfinite) == 1
  assert int(sam_state_of(final).count) == steps - 1
  assert float(final.dynamic_scale.scale) == float(before.dynamic_scale.scale)
  x, y = make_batches(1, seed=7)
  assert float(mse(final_params, x[0], y[0])) < float(mse(after_params, x[0], y[0]))


@pytest.mark.slow
def test_two_call_scale_is_constant_within_a_pair_and_an_ascent_overflow_skips_the_pair():
  tx = sam_optax.dynamic_loss_scale(sam_optax.sam(optax.sgd(LR), rho=RHO, two_call=True))
  half = two_call_half(tx)
  params, state = init_mlp(), None
  state = tx.init(params)
  x, y = make_batches(1)
  scale = float(state.dynamic_scale.scale)
  p1, s1 = half(params, state, x[0], y[0], BLOW)  # the ascent call overflows
  assert tree_equal(p1, params) and float(s1.dynamic_scale.scale) == scale  # not yet lowered
  p2, s2 = half(p1, s1, x[0], y[0])  # the descent call of the skipped pair: a no-op
  assert tree_equal(p2, params) and tree_equal(sam_state_of(s2), sam_state_of(state))
  assert float(s2.dynamic_scale.scale) == scale / 2 and int(s2.inner_state.total_notfinite) == 1
  p3, s3 = half(p2, s2, x[0], y[0])  # a good ascent call: params at w + eps, same scale
  assert not tree_equal(p3, params) and float(s3.dynamic_scale.scale) == scale / 2


# --------------------------------------------------------------- the scale's rule, exactness


def test_scale_rule_matches_flax_dynamic_scale():
  """Our once-per-step adjustment equals Flax's `value_and_grad` fed the same finiteness."""
  flags = [True, True, False, True, True, True, True, False, False, True, True, True, True,
           True, True]
  ours = loss_scaling._as_arrays(DynamicScale(growth_interval=3, scale=8.0, minimum_scale=2.0))
  theirs = DynamicScale(growth_interval=3, scale=8.0, minimum_scale=2.0)
  for finite in flags:
    ours = loss_scaling.adjust(ours, jnp.asarray(finite))
    bad = jnp.asarray(0.0 if finite else jnp.inf, F32)
    theirs = theirs.value_and_grad(lambda w: w * bad)(jnp.asarray(1.0, F32)).dynamic_scale
    assert float(ours.scale) == float(theirs.scale)
    assert int(ours.fin_steps) == int(theirs.fin_steps)
  assert ours.scale.dtype == F32 and ours.fin_steps.dtype == jnp.int32


def test_unscaling_happens_in_float32():
  """A float16 gradient of the scaled loss unscales to a float32 value below float16's range."""
  g = {"a": jnp.asarray([2.0 ** -10, -3.0], F16), "b": jnp.asarray([1.5], F32),
       "c": jnp.asarray(4.0, jnp.float64)}
  out = loss_scaling.unscale(g, jnp.asarray(2.0 ** 20, F32))
  assert out["a"].dtype == F32 and out["b"].dtype == F32 and out["c"].dtype == jnp.float64
  np.testing.assert_array_equal(out["a"], np.asarray([2.0 ** -30, -3.0 * 2.0 ** -20], np.float32))
  assert float(out["c"]) == 4.0 * 2.0 ** -20


@pytest.mark.parametrize("scale, form, dtype", [
    (2.0 ** 12, "one_call", jnp.float32),
    pytest.param(2.0 ** 12, "two_call", jnp.float32, marks=pytest.mark.slow),
    pytest.param(1.0, "one_call", jnp.float64, marks=pytest.mark.slow),
    pytest.param(2.0 ** 12, "two_call", jnp.float64, marks=pytest.mark.slow),
    pytest.param(1.0, "two_call", jnp.float32, marks=pytest.mark.slow)],
    ids=["4096-one_call-f32", "4096-two_call-f32", "1-one_call-f64", "4096-two_call-f64",
         "1-two_call-f32"])
def test_power_of_two_scale_gives_the_unscaled_step_bit_for_bit(scale, form, dtype):
  """With the scale fixed at a power of two, every float32 (float64) step equals the unscaled
  one exactly: scaling the loss and dividing the gradients are exact.

  Compared op by op (eagerly), with the gradients of `s * L` from one compiled function
  (`s` = the scale, or 1 for the unscaled step): two different jitted programs may fuse the
  same arithmetic differently (even `skip_if_nonfinite(tx)` against `tx` alone differ in the
  last bit of a step), which `test_jitted_scaled_step_agrees_with_the_unscaled_one` covers.
  """
  problem = problems.mlp(dtype)
  two_call = form == "two_call"
  sam = sam_optax.sam(optax.adam(1e-2), rho=RHO, two_call=two_call)
  tx = sam_optax.dynamic_loss_scale(sam, DynamicScale(scale=scale, growth_interval=NEVER_GROWS))
  ours = _run(tx, problem, two_call, steps=3, scaled=True, jit=False)
  unscaled = _run(sam, problem, two_call, steps=3, scaled=False, jit=False)
  for a, e in zip(ours, unscaled, strict=True):
    assert tree_equal(a, e)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["one_call", "two_call"])
def test_jitted_scaled_step_agrees_with_the_unscaled_one(form):
  problem = problems.mlp(jnp.float64)
  two_call = form == "two_call"
  sam = sam_optax.sam(optax.adam(1e-2), rho=RHO, two_call=two_call)
  tx = sam_optax.dynamic_loss_scale(sam, DynamicScale(scale=2.0 ** 12,
                                                      growth_interval=NEVER_GROWS))
  ours = _run(tx, problem, two_call, steps=4, scaled=True)
  unscaled = _run(sam, problem, two_call, steps=4, scaled=False)
  problems.assert_trees_close(ours[-1], unscaled[-1], 1e-14)


_scaled_grad = jax.jit(jax.grad(lambda p, batch, s: s * problems.mlp().loss(p, batch)))


def _run(tx, problem, two_call, steps, scaled, jit=True):
  """The params after each step; the gradients are those of `s * L`, with `s` the state's loss
  scale when `scaled`, else 1."""
  params, state = problem.params, tx.init(problem.params)

  def call(params, state):
    s = sam_optax.loss_scale(state) if scaled else jnp.ones([], F32)
    grad_fn = (jax.grad(lambda p: s * problem.loss(p, problem.batch)) if jit
               else lambda p: _scaled_grad(p, problem.batch, s))
    if two_call:
      updates, state = tx.update(grad_fn(params), state, params)
    else:
      updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  call = jax.jit(call) if jit else call
  out = []
  for _ in range(steps):
    params, state = call(params, state)
    if two_call:
      params, state = call(params, state)
    out.append(params)
  return out


def reference_loss_scaled_sam(params, xs, ys, scale, growth_interval, lr, rho):
  """Plain-jnp SAM with Flax's loss-scale rule: both gradients of `scale * loss`, unscaled in
  float32; a step with a non-finite gradient in either pass is skipped and halves the scale."""
  grad = jax.jit(jax.grad(lambda p, x, y, s: s * loss(p, x, y)))
  fin_steps, scales = 0, []
  for x, y in zip(xs, ys):
    s = jnp.asarray(scale, F32)
    g = jax.tree.map(lambda v: v.astype(F32) / s, grad(params, x, y, s))
    norm = jnp.sqrt(sum(jnp.sum(v.astype(F32) ** 2) for v in jax.tree.leaves(g)))
    eps = jax.tree.map(lambda v: rho * v / norm, g)
    point = jax.tree.map(lambda w, e: w + e, params, eps)
    g_adv = jax.tree.map(lambda v: v.astype(F32) / s, grad(point, x, y, s))
    finite = all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves((g, g_adv)))
    if finite:
      params = jax.tree.map(lambda w, v: w - lr * v, params, g_adv)
      if fin_steps == growth_interval:
        scale, fin_steps = scale * 2.0, 0
      else:
        fin_steps += 1
    else:
      scale, fin_steps = scale * 0.5, 0
    scales.append(scale)
  return params, scales


@pytest.mark.slow
@pytest.mark.parametrize("form", ["one_call", "two_call"])
def test_matches_a_plain_jnp_reference_through_overflows_and_growth(form):
  """Starting at 2^48 the float16 backward pass overflows: the reference and the library skip
  the same steps, move the scale alike (down, then up every 3 + 1 finite steps) and end at the
  same params."""
  steps = 16
  xs, ys = make_batches(steps)
  tx = sam_optax.dynamic_loss_scale(
      sam_optax.sam(optax.sgd(LR), rho=RHO, two_call=form == "two_call"),
      DynamicScale(scale=2.0 ** 48, growth_interval=3))
  history = train(tx, form, steps)
  expected_params, expected_scales = reference_loss_scaled_sam(
      init_mlp(), xs, ys, 2.0 ** 48, 3, LR, RHO)
  scales = [float(state.dynamic_scale.scale) for _, state in history]
  assert scales == expected_scales
  assert min(scales) < 2.0 ** 48 and any(b > a for a, b in zip(scales, scales[1:]))  # both ways
  problems.assert_trees_close(history[-1][0], expected_params, 1e-5)


# ----------------------------------------------------------------------- composition, misuse


@pytest.mark.slow
def test_inject_hyperparams_scan_and_one_compilation():
  tx = optax.inject_hyperparams(
      lambda learning_rate: sam_optax.dynamic_loss_scale(
          sam_optax.sam(optax.sgd(learning_rate), rho=RHO),
          DynamicScale(scale=2.0 ** 48, growth_interval=2)))(learning_rate=LR)
  params = init_mlp()
  xs, ys = make_batches(8)

  def body(carry, batch):
    params, state = carry
    scale = sam_optax.loss_scale(state)
    grad_fn = jax.grad(lambda p: scale * loss(p, *batch))
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return (optax.apply_updates(params, updates), state), scale

  run = jax.jit(lambda c, b: jax.lax.scan(body, c, b))
  (params, state), scales = run((params, tx.init(params)), (xs, ys))
  assert float(scales[0]) == 2.0 ** 48 and float(scales.min()) < 2.0 ** 48
  assert np.all(np.isfinite(np.asarray(jax.tree.leaves(params)[0])))
  run((params, state), (xs, ys))
  assert run._cache_size() == 1


@pytest.mark.slow
def test_vmap_over_runs_keeps_each_runs_scale():
  """Three runs under one vmap, whose losses overflow at different scales: each run skips and
  lowers its own scale."""
  tx = sam_optax.dynamic_loss_scale(sam_optax.sam(optax.sgd(0.1), rho=RHO),
                                    DynamicScale(scale=2.0 ** 15))
  loss_c = lambda p, c: jnp.sum((c * p["w"]).astype(F16) ** 2).astype(F32)

  def run(c):
    params = {"w": jnp.asarray([1.0, -2.0], F32)}
    state = tx.init(params)
    for _ in range(3):
      scale = sam_optax.loss_scale(state)
      grad_fn = jax.grad(lambda p: scale * loss_c(p, c))
      updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
      params = optax.apply_updates(params, updates)
    return state.dynamic_scale.scale, state.inner_state.total_notfinite

  scales, skipped = jax.jit(jax.vmap(run))(jnp.asarray([0.5, 1.0, 100.0], F32))
  for c, scale, count in zip([0.5, 1.0, 100.0], scales, skipped):
    _, expected = run(jnp.asarray(c, F32))
    assert int(count) == int(expected) and float(scale) == 2.0 ** 15 / 2 ** int(count)
  assert list(np.asarray(skipped)) == [1, 2, 3]


@pytest.mark.slow
def test_m_sharpness_grad_fn_of_params_and_batch_is_unscaled():
  problem = problems.mlp(jnp.float32)
  x, y = problem.batch
  plain = sam_optax.sam(optax.sgd(0.1), rho=RHO, chunk_size=4)
  tx = sam_optax.dynamic_loss_scale(sam_optax.sam(optax.sgd(0.1), rho=RHO, chunk_size=4),
                                    DynamicScale(scale=2.0 ** 10, growth_interval=NEVER_GROWS))
  state = tx.init(problem.params)
  scale = sam_optax.loss_scale(state)
  updates, _ = tx.update(None, state, problem.params, batch=(x, y),
                         grad_fn=lambda p, b: jax.grad(lambda q: scale * problem.loss(q, b))(p))
  expected, _ = plain.update(None, plain.init(problem.params), problem.params, batch=(x, y),
                             grad_fn=lambda p, b: jax.grad(problem.loss)(p, b))
  assert tree_equal(updates, expected)


@pytest.mark.parametrize("inner", [optax.lion(1e-3), optax.sgd(0.1)], ids=["lion", "sgd"])
def test_overflow_is_caught_through_a_sign_based_inner_optimizer(inner):
  """Lion turns an infinite entry of the perturbed gradient into a finite update (sign(inf) =
  1): the wrapper must still skip the step and keep Lion's state finite."""
  tx = sam_optax.dynamic_loss_scale(sam_optax.sam(inner, rho=RHO), DynamicScale(scale=2.0 ** 10))
  params = {"w": jnp.asarray([1.0, -2.0], F32), "b": jnp.asarray(0.5, F32)}
  state = tx.init(params)
  grads = {"w": jnp.asarray([1.0, 1.0], F32), "b": jnp.asarray(1.0, F32)}
  overflow = lambda p: {"w": jnp.asarray([jnp.inf, 1.0], F32), "b": jnp.asarray(1.0, F32)}
  updates, new_state = tx.update(grads, state, params, grad_fn=overflow)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert tree_equal(sam_state_of(new_state), sam_state_of(state))
  assert int(new_state.inner_state.total_notfinite) == 1
  assert float(new_state.dynamic_scale.scale) == 2.0 ** 9


def test_misuse_is_refused_with_the_fix():
  sam = sam_optax.sam(optax.sgd(0.1))
  params = {"w": jnp.ones(2, F32)}
  with pytest.raises(ValueError, match="without skip_if_nonfinite"):
    sam_optax.dynamic_loss_scale(sam_optax.skip_if_nonfinite(sam, 3)).init(params)
  with pytest.raises(ValueError, match="without skip_if_nonfinite"):
    sam_optax.dynamic_loss_scale(optax.apply_if_finite(optax.sgd(0.1), 3)).init(params)
  with pytest.raises(ValueError, match="cannot wrap dynamic_loss_scale"):
    optax.apply_if_finite(sam_optax.dynamic_loss_scale(sam), 3).init(params)
  with pytest.raises(TypeError, match="GradientTransformation"):
    sam_optax.dynamic_loss_scale(lambda g: g)  # type: ignore[arg-type]
  with pytest.raises(TypeError, match="DynamicScale"):
    sam_optax.dynamic_loss_scale(sam, 2.0 ** 15)  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="backoff_factor"):
    sam_optax.dynamic_loss_scale(sam, DynamicScale(backoff_factor=2.0))
  with pytest.raises(ValueError, match="positive and finite"):
    sam_optax.dynamic_loss_scale(sam, DynamicScale(scale=0.0))
  with pytest.raises(ValueError, match="no dynamic loss scale"):
    sam_optax.loss_scale(sam.init(params))


@pytest.mark.slow
def test_state_round_trips_through_an_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = sam_optax.dynamic_loss_scale(sam_optax.sam(optax.adam(1e-2), rho=RHO),
                                    DynamicScale(scale=2.0 ** 48, growth_interval=2))
  params = init_mlp()
  state = tx.init(params)
  step = one_call_step(tx)
  xs, ys = make_batches(8)
  for t in range(4):
    params, state = step(params, state, xs[t], ys[t])
  saved = {"params": params, "state": state}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", saved)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(lambda: saved))
  assert isinstance(restored["state"].dynamic_scale, DynamicScale)
  assert restored["state"].dynamic_scale.growth_interval == 2
  assert jax.tree.structure(restored) == jax.tree.structure(saved) and tree_equal(restored, saved)
  resumed_params, resumed = restored["params"], restored["state"]
  for t in range(4, 8):
    params, state = step(params, state, xs[t], ys[t])
    resumed_params, resumed = step(resumed_params, resumed, xs[t], ys[t])
  assert tree_equal((resumed_params, resumed), (params, state))


# --------------------------------------------------------------------------------- Flax helpers


@pytest.mark.slow
def test_nnx_sam_step_scales_both_passes_and_skips_an_overflow_with_the_model_state():
  """float16 compute with BatchNorm: the helper differentiates the scaled loss (training moves
  despite the 2^-30 weight), reports the unscaled loss, and an overflow forced in the
  perturbed pass only leaves params, BatchNorm statistics and optimizer state untouched."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import sam_optax.flax  # pylint: disable=import-outside-toplevel,redefined-outer-name

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense1 = nnx.Linear(4, 8, dtype=F16, param_dtype=F32, rngs=rngs)
      self.bn = nnx.BatchNorm(8, dtype=F16, param_dtype=F32, rngs=rngs)
      self.dense2 = nnx.Linear(8, 1, dtype=F16, param_dtype=F32, rngs=rngs)

    def __call__(self, x):
      return self.dense2(jnp.tanh(self.bn(self.dense1(x)))).astype(F32)

  def loss_fn(model, batch):
    x, y, clean_kernel, blow = batch
    # The perturbed pass (kernel moved by eps) multiplies its loss by `blow`: float16 overflow.
    moved = jnp.any(model.dense1.kernel[...] != clean_kernel)
    weight = LOSS_WEIGHT * jnp.where(moved, blow, 1.0)
    return weight * jnp.mean((model(x) - y) ** 2)

  model = Net(nnx.Rngs(0))
  tx = sam_optax.dynamic_loss_scale(
      sam_optax.sam(optax.sgd(LR, momentum=0.9), rho=RHO, has_aux=True))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = nnx.jit(lambda m, o, b: sam_optax.flax.sam_step(m, o, loss_fn, b))
  xs, ys = make_batches(1)

  def batch(t, blow=1.0):
    del t  # one batch throughout: its loss must fall
    return xs[0], ys[0], model.dense1.kernel[...], jnp.asarray(blow, F32)

  as_pure = getattr(nnx, "as_pure", None) or nnx.pure  # renamed in flax 0.12.7
  snapshot = lambda: (as_pure(nnx.state(model, nnx.Param)),
                      as_pure(nnx.state(model, nnx.BatchStat)), as_pure(optimizer.opt_state))
  losses = [float(step(model, optimizer, batch(t)).loss) for t in range(6)]
  assert all(1e-4 * LOSS_WEIGHT < l < LOSS_WEIGHT for l in losses)  # unscaled
  params, stats, opt_state = snapshot()
  metrics = step(model, optimizer, batch(6, BLOW))
  new_params, new_stats, new_opt_state = snapshot()
  assert np.isfinite(float(metrics.loss))
  assert tree_equal(new_params, params) and tree_equal(new_stats, stats)
  assert not tree_equal(stats, as_pure(nnx.state(Net(nnx.Rngs(0)), nnx.BatchStat)))  # moved
  assert tree_equal(sam_state_of(new_opt_state), sam_state_of(opt_state))
  assert float(sam_optax.loss_scale(new_opt_state)) == float(sam_optax.loss_scale(opt_state)) / 2
  for t in range(7, 12):
    losses.append(float(step(model, optimizer, batch(t)).loss))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_linen_sam_step_with_a_loss_scale_trains_in_float16():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import sam_optax.flax  # pylint: disable=import-outside-toplevel,redefined-outer-name

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jnp.tanh(nn.Dense(8, dtype=F16, param_dtype=F32)(x))
      return nn.Dense(1, dtype=F16, param_dtype=F32)(x).astype(F32)

  xs, ys = make_batches(10)
  model = Net()
  state = sam_optax.flax.SAMTrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), xs[0])["params"],
      tx=sam_optax.dynamic_loss_scale(sam_optax.sam(optax.sgd(LR), rho=RHO, has_aux=True)))

  @jax.jit
  def step(state, x, y):
    loss_fn = lambda p: LOSS_WEIGHT * jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    return sam_optax.flax.linen_sam_step(state, loss_fn)

  losses = []
  for t in range(10):
    state, metrics = step(state, xs[t], ys[t])
    losses.append(float(metrics.loss))
    assert float(metrics.perturbed_loss) < LOSS_WEIGHT  # reported unscaled
  assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------- every variant of the catalogue


@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_every_variant_skips_an_overflowing_perturbed_pass_and_then_steps_as_unscaled(variant):
  """Each variant under the wrapper, one-call form, float32 MLP, scale 2^8 (a power of two: the
  scaled and unscaled steps agree to rounding). Step 1: every grad_fn evaluation overflows; the
  bare variant's updates are then non-finite (each takes the perturbed pass at its first step),
  and the wrapper must skip: params and the variant's state untouched, the scale halved. Step
  2, with a finite grad_fn: the bare variant's step from its fresh state."""
  problem = problems.mlp(F32)
  params, grad = problem.params, jax.grad(problem.loss)
  # SGD: a gradient left scaled (or unscaled twice) changes its step, where adam's would not.
  bare = variant.make(optax.sgd(0.1, momentum=0.9), **variant.hparams)
  wrapped = sam_optax.dynamic_loss_scale(
      bare, DynamicScale(scale=jnp.asarray(2.0 ** 8, F32), growth_interval=NEVER_GROWS))

  @jax.jit
  def steps(params):
    scale = lambda s: sam_optax.loss_scale(s)
    overflow = lambda c: lambda p: jax.tree.map(lambda g: g * jnp.inf, grad(p, problem.batch))
    finite = lambda c: lambda p: jax.tree.map(lambda g: c * g, grad(p, problem.batch))
    out = []
    for tx, scaled in ((bare, False), (wrapped, True)):
      state = tx.init(params)
      c = scale(state) if scaled else 1.0
      clean = jax.tree.map(lambda g: c * g, grad(params, problem.batch))
      first, state1 = tx.update(clean, state, params, grad_fn=overflow(c))
      c = scale(state1) if scaled else 1.0
      clean = jax.tree.map(lambda g: c * g, grad(params, problem.batch))
      second, state2 = tx.update(clean, state1 if scaled else state, params, grad_fn=finite(c))
      out.append((first, second, state1, state2))
    return out

  (bare_first, bare_second, _, _), (first, second, state1, _) = steps(params)
  assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(bare_first))
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(first)), "the step was not skipped"
  assert float(state1.dynamic_scale.scale) == 2.0 ** 7
  assert tree_equal(state1.inner_state.inner_state, bare.init(params))
  problems.assert_trees_close(second, bare_second, 1e-6)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(second))
