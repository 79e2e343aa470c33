"""The wider field (issue 5): per-variant rules, gradient counts at run time, SAM-ON, windows.

The shared tests (jit, dtypes, zero gradients, rho = 0, ...) run on every variant from
tests/catalogue.py; here are the checks specific to one variant, each against a reference in
tests/field_references.py written from the formula.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import field_references as fref
from tests import problems, references

TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}


def counting(grad_fn):
  """`grad_fn` that counts its evaluations at run time (a host callback per call)."""
  calls = []

  def counted(params):
    jax.debug.callback(lambda: calls.append(1))
    return grad_fn(params)

  def count():
    jax.effects_barrier()
    return len(calls)

  return counted, count


# ----------------------------------------------------------------------------- LookSAM


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_looksam_over_several_periods(dtype):
  problem = problems.mlp(dtype)
  k, steps = 3, 22  # seven full periods and a partial one
  tx = sam_optax.looksam(optax.sgd(0.1, momentum=0.9), rho=0.3, k=k, alpha=0.7)
  ours = problems.trajectory(tx, problem, steps)
  expected = references.run(problem, fref.looksam_direction(0.3, k, 0.7), steps)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[dtype])


def test_looksam_and_windows_evaluate_the_gradient_only_when_needed():
  problem = problems.mlp(jnp.float32)
  cases = [  # (transformation, steps, grad_fn calls expected)
      (sam_optax.looksam(optax.sgd(0.1), k=4), 12, 3),            # steps 0, 4, 8
      (sam_optax.sam(optax.sgd(0.1), window=(3, 7)), 10, 4),       # steps 3..6
      (sam_optax.looksam(optax.sgd(0.1), k=2, window=(3, 9)), 12, 3),  # steps 4, 6, 8
      (sam_optax.gsam(optax.sgd(0.1), window=(5, None)), 8, 3),    # steps 5, 6, 7
  ]
  for tx, steps, expected in cases:
    grad_fn, count = counting(problem.grad_fn())
    problems.trajectory(tx, problem, steps, grad_fn=grad_fn)
    assert count() == expected


@pytest.mark.parametrize("make", [
    functools.partial(sam_optax.asam, rho=0.5), functools.partial(sam_optax.looksam, k=2),
    functools.partial(sam_optax.momentum_sam, rho=0.1)], ids=["asam", "looksam", "momentum_sam"])
def test_windowed_variant_is_the_inner_optimizer_outside_the_window(make):
  """window=(2, 5): plain SGD steps w - lr g before step 2 and from step 5 on."""
  problem = problems.quadratic(jnp.float64)
  lr = 0.1
  path = [problem.params] + problems.trajectory(make(optax.sgd(lr), window=(2, 5)), problem, 8)
  grad = jax.grad(problem.loss)
  for t in range(8):
    sgd_step = jax.tree.map(lambda w, g: w - lr * g, path[t], grad(path[t], None))
    if 2 <= t < 5:
      assert not np.allclose(path[t + 1]["x"], sgd_step["x"])
    else:
      problems.assert_trees_close(path[t + 1], sgd_step, 1e-12)


# ----------------------------------------------------------------------------- GSAM


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_gsam_with_a_warmup_cosine_schedule(dtype):
  """GSAM with the inner SGD on a warmup-cosine schedule and rho tied to it, 24 steps."""
  problem = problems.mlp(dtype)
  peak, end, warmup, total = 0.2, 0.02, 6, 24
  optax_schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=end)
  # optax evaluates schedules in the count's precision: give it float64 counts, so that the
  # float64 comparison is not limited by a float32 learning rate.
  schedule = lambda count: optax_schedule(jnp.asarray(count, jnp.float64))
  tx = sam_optax.gsam(optax.sgd(schedule, momentum=0.9), rho_max=0.1, rho_min=0.03,
                      alpha=0.3, learning_rate=schedule, lr_max=peak, lr_min=end)
  ours = problems.trajectory(tx, problem, total)

  # Reference: the schedule written out, rho from the formula, heavy-ball SGD by hand.
  lr = fref.warmup_cosine(0.0, peak, warmup, total, end)
  rho = fref.gsam_rho(lr, 0.1, 0.03, peak, end)
  direction = fref.gsam_direction(rho, 0.3)
  w, grad, unravel = references.flat_problem(problem)
  v = jnp.zeros_like(w)
  for t in range(total):
    w, v = references.heavy_ball(w, v, direction(grad, w, t), lr(t), 0.9)
    problems.assert_trees_close(ours[t], unravel(w), TOL[dtype])
  # The warmup starts below lr_min: there rho is clipped at rho_min, never below (nor < 0).
  assert lr(0) < end and rho(0) == 0.03 and rho(warmup) == 0.1


def test_gsam_rho_schedule_is_clipped_and_follows_the_learning_rate():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, end_value=0.1)
  rho = sam_optax.lr_proportional_rho(schedule, rho_max=0.5, rho_min=0.1, lr_max=1.0,
                                      lr_min=0.1)
  values = np.array([float(rho(jnp.asarray(t, jnp.int32))) for t in range(100)])
  assert values.min() >= 0.1 - 1e-7 and values.max() <= 0.5 + 1e-7
  assert values[0] == pytest.approx(0.1)     # lr = 0 < lr_min: clipped, not negative
  assert values[10] == pytest.approx(0.5)    # the peak
  assert values[5] == pytest.approx(0.1 + 0.4 * (0.5 - 0.1) / 0.9, rel=1e-5)
  assert float(sam_optax.lr_proportional_rho(0.3, 0.5, 0.1)(7)) == 0.5  # constant lr: rho_max
  with pytest.raises(ValueError, match="pass lr_max and lr_min"):
    sam_optax.gsam(optax.sgd(0.1), learning_rate=schedule)
  with pytest.raises(ValueError, match="rho_min .* must be <= rho_max"):
    sam_optax.gsam(optax.sgd(0.1), rho_max=0.01, rho_min=0.1)


# ----------------------------------------------------------------------------- Momentum-SAM


def test_momentum_sam_evaluates_one_gradient_per_step():
  problem = problems.mlp(jnp.float32)
  tx = sam_optax.momentum_sam(optax.sgd(0.1, momentum=0.9), rho=0.2)
  # grad_fn is called once per step at run time ...
  grad_fn, count = counting(problem.grad_fn())
  with_zeros = problems.trajectory(tx, problem, 6, grad_fn=grad_fn, clean=False)
  assert count() == 6
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(with_zeros[-1]))
  # ... the clean gradient is never read (NaNs give finite updates) ...
  state = tx.init(problem.params)
  nan_grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), problem.params)
  updates, _ = jax.jit(tx.update, static_argnames="grad_fn")(
      nan_grads, state, problem.params, grad_fn=problem.grad_fn())
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  # ... so a clean gradient computed inside the jitted step is dead code: the compiled step
  # holds one gradient evaluation (one tanh of the MLP), SAM's two.
  assert problems.compiled_tanh_count(tx, problem) == 1
  assert problems.compiled_tanh_count(sam_optax.sam(optax.sgd(0.1), rho=0.05), problem) == 2


def test_a_gradient_free_ascent_of_ones_own_leaves_the_clean_gradient_unread():
  """The engine reads "ignores g" off the ascent: a user's GradientFreeAscent gets what
  Momentum-SAM gets, and the same ascent built as a plain transformation reads g."""
  problem = problems.mlp(jnp.float32)

  def init(params):
    return optax.EmptyState()

  def update(grads, state, params=None, **extra):
    return jax.tree.map(lambda w: 0.01 * jnp.sign(w), params), state

  free = sam_optax.GradientFreeAscent(init, update)
  plain = optax.GradientTransformationExtraArgs(init, update)
  assert not sam_optax.ascent_reads_grads(free) and sam_optax.ascent_reads_grads(plain)
  assert not sam_optax.ascent_reads_grads(sam_optax.momentum_ascent(0.1))
  nan_grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), problem.params)
  for ascent, finite, tanhs in ((free, True, 1), (plain, False, 2)):
    tx = sam_optax.sharpness_aware(optax.sgd(0.1), ascent)
    updates, _ = jax.jit(tx.update, static_argnames="grad_fn")(
        nan_grads, tx.init(problem.params), problem.params, grad_fn=problem.grad_fn())
    # Unread, a NaN clean gradient leaves the update finite; read, it must show.
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)) == finite
    assert problems.compiled_tanh_count(tx, problem) == tanhs


def test_momentum_sam_perturbs_along_the_last_step():
  """With heavy-ball SGD the perturbed point is w - rho v / ||v|| (the paper's rule)."""
  problem = problems.quadratic(jnp.float64)
  lr, mu, rho = 0.1, 0.9, 0.3
  ours = problems.trajectory(sam_optax.momentum_sam(optax.sgd(lr, momentum=mu), rho=rho), problem, 20)
  w, grad, unravel = references.flat_problem(problem)
  v = jnp.zeros_like(w)
  for t in range(20):
    n = jnp.linalg.norm(v)
    point = w - rho * v / n if t else w
    v = grad(point) + mu * v
    w = w - lr * v
    problems.assert_trees_close(ours[t], unravel(w), 1e-12)


# ----------------------------------------------------------------------------- random ascents


def test_random_and_bayesian_sam_do_not_read_the_clean_gradient():
  problem = problems.mlp(jnp.float32)
  for tx in (sam_optax.random_sam(optax.sgd(0.1), rho=0.05, sigma=0.01),
             sam_optax.bsam(optax.sgd(0.1), num_data=1000.0)):
    grad_fn, count = counting(problem.grad_fn())
    zeros = problems.trajectory(tx, problem, 4, grad_fn=grad_fn, clean=False)
    assert count() == 8  # the noisy gradient and the perturbed one
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(zeros[-1]))
    # A clean gradient computed in the jitted step is dead code: two evaluations compiled.
    assert problems.compiled_tanh_count(tx, problem) == 2


def test_seeds_change_the_draws_and_states_hold_raw_keys():
  problem = problems.mlp(jnp.float64)
  inner = optax.sgd(0.1)
  grads = jax.grad(problem.loss)(problem.params, problem.batch)
  for make in (sam_optax.random_sam, sam_optax.esam):
    tx = make(inner, seed=0)
    # The seed only sets the initial key: one compiled step serves both seeds' states.
    step = jax.jit(lambda s: tx.update(grads, s, problem.params, grad_fn=problem.grad_fn())[0])
    states = [make(inner, seed=seed).init(problem.params) for seed in (0, 1)]
    a, b = (step(s)["layer0"]["w"] for s in states)
    assert not np.allclose(a, b)
    assert states[1].ascent_state.key.dtype == jnp.uint32
  with pytest.raises(TypeError, match="seed must be a Python int"):
    sam_optax.random_sam(inner, seed=0.5)


def test_esam_keeps_whole_leaves_with_probability_beta():
  """Over many draws each leaf joins with frequency beta; the kept part has norm rho/beta."""
  ascent = sam_optax.stochastic_weight_ascent(rho=0.1, beta=0.3)
  g = {f"leaf{i}": jnp.full((3,), i + 1.0) for i in range(8)}
  draw = jax.jit(lambda s: ascent.update(g, s))
  state, kept = ascent.init(g), []
  for _ in range(200):
    eps, state = draw(state)
    on = [bool(jnp.any(e != 0)) for e in jax.tree.leaves(eps)]
    assert all(bool(jnp.all(e != 0)) == o for e, o in zip(jax.tree.leaves(eps), on))
    if any(on):
      np.testing.assert_allclose(float(jnp.sqrt(sum(jnp.sum(e ** 2) for e in
                                                    jax.tree.leaves(eps)))), 0.1 / 0.3,
                                 rtol=1e-5)
    kept.append(np.mean(on))
  assert abs(np.mean(kept) - 0.3) < 0.05


def test_esam_data_selection_differentiates_the_sharpest_examples():
  problem = problems.mlp(jnp.float64)
  x, y = problem.batch

  def per_example(p, batch):
    xb, yb = batch
    h = jnp.tanh(xb @ p["layer0"]["w"] + p["layer0"]["b"])
    out = (h @ p["layer1"]["w"] + p["layer1"]["b"]) * p["scale"]
    return jnp.mean((out - yb) ** 2, axis=-1)

  grad_fn = sam_optax.sharpness_sensitive_grad_fn(per_example, problem.params, problem.batch,
                                                  gamma=0.25)
  shifted = jax.tree.map(lambda w: w + 0.05, problem.params)
  rise = per_example(shifted, problem.batch) - per_example(problem.params, problem.batch)
  top = np.argsort(-np.asarray(rise))[:4]
  expected = jax.grad(lambda p: jnp.mean(per_example(p, (x[top], y[top]))))(shifted)
  problems.assert_trees_close(jax.jit(grad_fn)(shifted), expected, 1e-12)
  tx = sam_optax.esam(optax.sgd(0.1), rho=0.05, beta=0.6)
  grads = jax.grad(problem.loss)(problem.params, problem.batch)
  updates, _ = tx.update(grads, tx.init(problem.params), problem.params, grad_fn=grad_fn)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  with pytest.raises(ValueError, match="gamma must be a Python float"):
    sam_optax.sharpness_sensitive_grad_fn(per_example, problem.params, problem.batch, 1.5)


# ----------------------------------------------------------------------------- ASAM


@pytest.mark.parametrize("convention", ["adaptive", "identity", "no_bias"])
def test_asam_bias_conventions(convention):
  problem = problems.mlp(jnp.float64)
  tx = sam_optax.asam(optax.sgd(0.1, momentum=0.9), rho=0.5, eta=0.01,
                      bias_convention=convention)
  ours = problems.trajectory(tx, problem, 20)
  # The mlp's biases are named "b", not "bias": "no_bias" adapts every leaf there, as
  # "adaptive" does; "identity" keeps T = 1 on the biases and the scalar scale.
  unit = None
  if convention == "identity":
    unit = fref.flat(jax.tree.map(lambda x: jnp.full(x.shape, x.ndim <= 1),
                                  problem.params)).astype(bool)
  expected = references.run(problem, fref.asam_direction(0.5, 0.01, unit), 20)
  problems.assert_trees_close(ours[-1], expected[-1], 1e-12)


def test_asam_no_bias_convention_reads_the_key_name():
  weights = sam_optax.AdaptiveWeights(0.01, "no_bias")
  params = {"dense": {"kernel": -jnp.ones((2, 2)), "bias": 3 * jnp.ones(2)}}
  t = weights(params)
  np.testing.assert_allclose(t["dense"]["kernel"], 1.01)
  np.testing.assert_allclose(t["dense"]["bias"], 1.0)
  with pytest.raises(ValueError, match="bias_convention must be one of"):
    sam_optax.asam(optax.sgd(0.1), bias_convention="weights")


def test_asam_renormalization_uses_the_adaptive_norms():
  problem = problems.mlp(jnp.float64)
  tx = sam_optax.asam(optax.identity(), rho=0.5, eta=0.01, renormalize=True)
  grads = jax.grad(problem.loss)(problem.params, problem.batch)
  direction, _ = tx.update(grads, tx.init(problem.params), problem.params,
                           grad_fn=problem.grad_fn())
  w, grad, _ = references.flat_problem(problem)
  g = grad(w)
  t = jnp.abs(w) + 0.01
  g_adv = grad(w + 0.5 * t * t * g / jnp.linalg.norm(t * g))
  expected = jnp.linalg.norm(t * g) / jnp.linalg.norm(t * g_adv) * g_adv
  np.testing.assert_allclose(fref.flat(direction), expected, rtol=1e-12)


# ----------------------------------------------------------------------------- SAM-ON


def _normed_problem():
  rng = np.random.default_rng(1)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4))),
                        "bias": jnp.asarray(rng.normal(size=4))},
            "LayerNorm_0": {"scale": jnp.asarray(1 + rng.normal(size=4) / 5),
                            "bias": jnp.asarray(rng.normal(size=4) / 5)}}
  x = jnp.asarray(rng.normal(size=(8, 3)))

  def loss(p, batch):
    h = batch @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-3)
    return jnp.mean(jnp.sin(h * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]) ** 2)

  return problems.Problem("normed", params, loss, x)


@pytest.mark.parametrize("name", ["sam", "asam", "fisher_sam", "esam", "vasso", "random_sam"])
def test_sam_on_mask_perturbs_and_normalizes_over_the_masked_leaves(name):
  problem = _normed_problem()
  mask = sam_optax.normalization_mask(problem.params)
  assert mask == {"Dense_0": {"kernel": False, "bias": False},
                  "LayerNorm_0": {"scale": True, "bias": True}}
  make = {"sam": functools.partial(sam_optax.sam, rho=0.3),
          "asam": functools.partial(sam_optax.asam, rho=0.3, eta=0.01),
          "fisher_sam": functools.partial(sam_optax.fisher_sam, rho=0.3, eta=1.0),
          "esam": functools.partial(sam_optax.esam, rho=0.3, beta=1.0),
          "vasso": functools.partial(sam_optax.vasso, rho=0.3, theta=0.9),
          "random_sam": functools.partial(sam_optax.random_sam, rho=0.3, sigma=0.0)}[name]
  for mask_arg in (mask, sam_optax.normalization_mask):  # a tree, or a function of params
    tx = make(optax.identity(), mask=mask_arg)
    grads = jax.grad(problem.loss)(problem.params, problem.batch)
    direction, _ = jax.jit(tx.update, static_argnames="grad_fn")(
        grads, tx.init(problem.params), problem.params, grad_fn=problem.grad_fn())

    w, grad, unravel = references.flat_problem(problem)
    on = fref.flat(jax.tree.map(lambda m, x: jnp.full(x.shape, m), mask,
                                problem.params)).astype(bool)
    g = grad(w)
    g_on = jnp.where(on, g, 0.0)
    if name == "asam":
      t = jnp.where(on, jnp.abs(w) + 0.01, 0.0)
      eps = 0.3 * t * t * g_on / jnp.linalg.norm(t * g_on)
    elif name == "fisher_sam":
      f_inv_g = g_on / (1 + g_on ** 2)
      eps = 0.3 * f_inv_g / jnp.sqrt(g_on @ f_inv_g)
    else:  # SAM's step over the masked leaves (ESAM with beta=1, VaSSO's first step, R-SAM
      eps = 0.3 * g_on / jnp.linalg.norm(g_on)  # without noise)
    problems.assert_trees_close(direction, unravel(grad(w + eps)), 1e-12)


def test_sam_on_with_an_empty_mask_is_the_inner_optimizer():
  problem = _normed_problem()
  nothing = jax.tree.map(lambda _: False, problem.params)
  for make in (sam_optax.sam, sam_optax.looksam, sam_optax.gsam, sam_optax.friendly_sam):
    tx = make(optax.identity(), mask=nothing)
    grads = jax.grad(problem.loss)(problem.params, problem.batch)
    direction, _ = tx.update(grads, tx.init(problem.params), problem.params,
                             grad_fn=problem.grad_fn())
    # To rounding: with a positive rho the engine re-evaluates the gradient at w + 0 rather
    # than keeping g alive through the perturbed pass (exact_at_zero=False).
    problems.assert_trees_close(direction, grads, 1e-12)


# ----------------------------------------------------------------------------- WSAM, bSAM


def test_wsam_interpolates_between_the_inner_optimizer_and_sam():
  problem = problems.mlp(jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  problems.assert_trees_close(problems.trajectory(sam_optax.wsam(inner, rho=0.1, gamma=0.5), problem, 10)[-1],
        problems.trajectory(sam_optax.sam(inner, rho=0.1), problem, 10)[-1], 1e-12)
  problems.assert_trees_close(problems.trajectory(sam_optax.wsam(inner, rho=0.1, gamma=0.0), problem, 10)[-1],
        problems.trajectory(sam_optax.sam(inner, rho=0.0), problem, 10)[-1], 1e-12)
  with pytest.raises(ValueError, match="gamma must be < 1"):
    sam_optax.wsam(inner, gamma=1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_wsam_decoupled_bypasses_the_inner_optimizer(dtype):
  """w <- w + Opt(g) - lr gamma/(1-gamma) (g_adv - g), heavy-ball SGD on g, 20 steps."""
  problem = problems.mlp(dtype)
  lr, mu, rho, gamma = 0.1, 0.9, 0.1, 0.8
  tx = sam_optax.wsam(optax.sgd(lr, momentum=mu), rho=rho, gamma=gamma, decouple=True,
                      learning_rate=lr)
  ours = problems.trajectory(tx, problem, 20)
  w, grad, unravel = references.flat_problem(problem)
  v = jnp.zeros_like(w)
  for t in range(20):
    g = grad(w)
    g_adv = grad(w + rho * g / jnp.linalg.norm(g))
    v = g + mu * v
    w = w - lr * v - lr * gamma / (1 - gamma) * (g_adv - g)
    problems.assert_trees_close(ours[t], unravel(w), TOL[dtype])
  with pytest.raises(ValueError, match="pass learning_rate"):
    sam_optax.wsam(optax.sgd(lr), decouple=True)


def test_wsam_decoupled_term_is_zero_outside_the_window():
  problem = problems.quadratic(jnp.float64)
  tx = sam_optax.wsam(optax.sgd(0.1), rho=0.1, gamma=0.8, decouple=True, learning_rate=0.1,
                      window=(1, 3))
  path = [problem.params] + problems.trajectory(tx, problem, 5)
  grad = jax.grad(problem.loss)
  for t in range(5):
    sgd_step = jax.tree.map(lambda w, g: w - 0.1 * g, path[t], grad(path[t], None))
    if 1 <= t < 3:
      assert not np.allclose(path[t + 1]["x"], sgd_step["x"])
    else:
      problems.assert_trees_close(path[t + 1], sgd_step, 1e-12)


def test_bsam_refuses_what_it_cannot_do():
  problem = problems.mlp(jnp.float32)
  with pytest.raises(ValueError, match="needs num_data"):
    sam_optax.bsam(optax.sgd(0.1))
  with pytest.raises(ValueError, match="one-call form"):
    sam_optax.bsam(optax.sgd(0.1), num_data=10.0, two_call=True)
  tx = sam_optax.sharpness_aware(optax.sgd(0.1), sam_optax.normalized_ascent(0.1),
                                 correction=sam_optax.bayesian_descent())
  with pytest.raises(ValueError, match="reads the posterior precision"):
    tx.update(problem.params, tx.init(problem.params), problem.params,
              grad_fn=problem.grad_fn())


def test_bsam_with_a_mask_learns_the_precision_of_the_masked_leaves_only():
  problem = _normed_problem()
  mask = sam_optax.normalization_mask(problem.params)
  tx = sam_optax.bsam(optax.sgd(0.1), rho=0.0, num_data=100.0, b1=0.0, init_precision=2.0,
                      mask=mask)
  grads = jax.grad(problem.loss)(problem.params, problem.batch)
  updates, state = jax.jit(tx.update, static_argnames="grad_fn")(
      grads, tx.init(problem.params), problem.params, grad_fn=problem.grad_fn())
  # rho = 0: g_adv = g. Outside the mask s stays 2, so the step is -lr g / 2 (b1 = 0).
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * grads["Dense_0"]["kernel"] / 2,
                             rtol=1e-12)
  precision = state.ascent_state.inner_state.precision
  assert isinstance(precision["Dense_0"]["kernel"], optax.MaskedNode)
  assert not np.allclose(precision["LayerNorm_0"]["scale"], 2.0)


def test_bsam_state_holds_a_positive_precision():
  problem = problems.mlp(jnp.float64)
  tx = sam_optax.bsam(optax.sgd(0.05), num_data=1e4, weight_decay=1e-4)
  params, state = problem.params, tx.init(problem.params)
  grads = optax.tree.zeros_like(params)  # not read
  for _ in range(3):
    updates, state = tx.update(grads, state, params, grad_fn=problem.grad_fn())
    params = optax.apply_updates(params, updates)
  s = state.ascent_state.precision
  assert all(bool(jnp.all((x > 0) & (x != 1.0))) for x in jax.tree.leaves(s))
  assert jax.tree.structure(s) == jax.tree.structure(problem.params)


M_SHARPNESS_CASES = {
    "random_sam": functools.partial(sam_optax.random_sam, sigma=0.01),
    "bsam": functools.partial(sam_optax.bsam, num_data=100.0),
    "momentum_sam": sam_optax.momentum_sam,
    "looksam": functools.partial(sam_optax.looksam, k=2),
    "friendly_sam": sam_optax.friendly_sam,
}


@pytest.mark.parametrize("strategy", ["vectorized", "sequential"])
def test_stateful_variants_under_m_sharpness(strategy):
  """Per-chunk ascents (chunks of 8 of 16 examples) with state, keys and inner gradients.

  Vectorized for all; sequential (the scan's carry) for those with keys and averaged state.
  """
  problem = problems.mlp(jnp.float32)
  grad_fn = lambda p, b: jax.grad(problem.loss)(p, b)
  names = M_SHARPNESS_CASES if strategy == "vectorized" else ("random_sam", "bsam")
  for name in names:
    tx = M_SHARPNESS_CASES[name](optax.sgd(0.05), chunk_size=8, chunk_strategy=strategy)
    params, state = problem.params, tx.init(problem.params)
    update = jax.jit(tx.update, static_argnames="grad_fn")
    for _ in range(3):
      updates, state = update(None, state, params, batch=problem.batch, grad_fn=grad_fn)
      params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert problem.loss(params, problem.batch) < problem.loss(problem.params, problem.batch)


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("make, kwargs, error, match", [
    (sam_optax.looksam, {"k": 0}, ValueError, "k must be >= 1"),
    (sam_optax.looksam, {"k": 2.5}, TypeError, "k must be a Python int"),
    (sam_optax.friendly_sam, {"lam": 1.5}, ValueError, r"lam must be in \[0.0, 1.0\]"),
    (sam_optax.vasso, {"theta": -0.1}, ValueError, "theta must be in"),
    (sam_optax.fisher_sam, {"eta": -1.0}, ValueError, "eta must be >= 0"),
    (sam_optax.esam, {"beta": 0.0}, ValueError, "beta must be > 0"),
    (sam_optax.momentum_sam, {"rho": -1.0}, ValueError, "rho must be >= 0"),
    (sam_optax.random_sam, {"two_call": True}, ValueError, "one-call form"),
])
def test_bad_hyperparameters_are_rejected(make, kwargs, error, match):
  with pytest.raises(error, match=match):
    make(optax.sgd(0.1), **kwargs)


def test_cadence_every():
  cadence = sam_optax.cadences.every(4, offset=1)
  assert [bool(cadence(jnp.asarray(t))) for t in range(9)] == [
      False, True, False, False, False, True, False, False, False]
  with pytest.raises(TypeError, match="k must be a Python int"):
    sam_optax.cadences.every(jnp.asarray(3))
