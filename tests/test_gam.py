"""Accelerated GAM: both forms of h-, the cost (four gradients, no param-sized state), what its
zero radii reduce to, data parallelism, and what it refuses. The catalogue entry
(tests/catalogue.py) runs the shared tests on the paper's form against
tests/field_references.py's `gam_direction`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import field_references as fref
from tests import problems
from tests import references

TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}
STEPS = 8
HPARAMS = {"rho": 0.2, "rho_prime": 0.03, "alpha": 0.3, "beta": 0.4, "gamma": 0.2}


def _size(state) -> int:
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(state))


@pytest.mark.slow
@pytest.mark.parametrize("h_minus, dtype", [("code", jnp.float64), ("code", jnp.float32),
                                            ("paper", jnp.float32)],
                         ids=["code-f64", "code-f32", "paper-f32"])
def test_both_forms_of_h_minus_match_their_reference(h_minus, dtype):
  """Heavy-ball SGD over the MLP (five leaves, four shapes); the two forms differ."""
  problem = problems.mlp(dtype)
  inner = optax.sgd(0.1, momentum=0.9)
  ours = problems.trajectory(sam_optax.gam(inner, **HPARAMS, h_minus=h_minus), problem, STEPS)
  expected = references.run(problem, fref.gam_direction(**HPARAMS, h_minus=h_minus), STEPS)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[dtype])
  other = "paper" if h_minus == "code" else "code"
  theirs = problems.trajectory(sam_optax.gam(inner, **HPARAMS, h_minus=other), problem, STEPS)
  assert not np.allclose(np.asarray(theirs[-1]["layer0"]["w"]),
                         np.asarray(ours[-1]["layer0"]["w"]), rtol=1e-6, atol=1e-6)


def test_radius_schedules_follow_the_step_count():
  """rho and rho' as schedules of the step count, on the quadratic (two leaves) in float64."""
  problem = problems.quadratic(jnp.float64)
  rho = lambda count: jnp.where(count < 2, 0.3, 0.1)
  rho_prime = lambda count: jnp.where(count < 3, 0.05, 0.02)
  tx = sam_optax.gam(optax.sgd(0.1, momentum=0.9), rho, rho_prime, 0.3, 0.4, 0.2)
  ours = problems.trajectory(tx, problem, 5)

  def direction(grad, w, t):
    return fref.gam_direction(float(rho(t)), float(rho_prime(t)), 0.3, 0.4, 0.2)(grad, w, t)

  expected = references.run(problem, direction, 5)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[jnp.float64])


def test_intermediate_gradients_do_not_persist_in_the_state():
  """g1 and g2 travel in the step's carry: the state holds no more than SAM's (the inner
  optimizer's momentum and a few counters), before and after a step."""
  problem = problems.mlp(jnp.float32)
  inner = optax.sgd(0.1, momentum=0.9)
  params_size = _size(problem.params)
  tx = sam_optax.gam(inner)
  _, state, _ = problems.run(tx, problem, 2)
  sam_state = sam_optax.sam(inner).init(problem.params)
  for gam_state in (tx.init(problem.params), state):
    assert jax.tree.structure(gam_state) == jax.tree.structure(tx.init(problem.params))
    assert _size(gam_state) <= _size(sam_state) + 2
    assert _size(gam_state.ascent_state) + _size(gam_state.correction_state) < params_size


@pytest.mark.slow
def test_four_gradient_evaluations_per_step():
  """grad_fn runs three times per step at run time (g1, g2, g3), the caller's g0 is the
  fourth: the compiled step holds four of the MLP's tanh (one per forward pass)."""
  problem = problems.mlp(jnp.float32)
  tx = sam_optax.gam(optax.sgd(0.1, momentum=0.9))
  grad_fn, calls = problems.counting(problem.grad_fn())
  problems.run(tx, problem, 3, grad_fn=grad_fn)
  jax.effects_barrier()
  assert len(calls) == 9
  assert problems.compiled_tanh_count(tx, problem) == 4


@pytest.mark.parametrize("h_minus", ["paper", "code"])
def test_zero_radii_give_the_inner_optimizer(h_minus):
  """rho = rho' = 0: every point is w, so d = g0 (bit for bit in the paper's form, where the
  two mixtures and the decomposition of equal gradients are exact; to rounding in the code's,
  whose h- = (2 - beta) g0 is parallel to h+)."""
  problem = problems.mlp(jnp.float64)
  tx = sam_optax.gam(optax.identity(), 0.0, 0.0, 0.3, 0.4, 0.2, h_minus=h_minus)

  @jax.jit
  def direction_and_grad(params):
    grads = jax.grad(problem.loss)(params, problem.batch)
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=problem.grad_fn())
    return updates, grads

  updates, grads = direction_and_grad(problem.params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    if h_minus == "paper":
      np.testing.assert_array_equal(np.asarray(u), np.asarray(g))
    else:
      np.testing.assert_allclose(np.asarray(u), np.asarray(g), rtol=1e-13, atol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("h_minus, gsam_alpha", [("paper", 0.2), ("code", (2 - 0.4) * 0.2)],
                         ids=["paper", "code"])
def test_zero_rho_is_gsam(h_minus, gsam_alpha):
  """rho = 0: w2 = w, so g2 = g0 and g3 = g1 = SAM's gradient at radius rho'; h+ = g1 and
  h- = g0 (paper) or (2 - beta) g0 (code), so d = g1 - gamma g0_perp: GSAM with alpha = gamma
  (or (2 - beta) gamma) and a constant radius rho'."""
  problem = problems.mlp(jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  ours = problems.trajectory(
      sam_optax.gam(inner, 0.0, 0.05, 0.3, 0.4, 0.2, h_minus=h_minus), problem, 4)
  gsam = problems.trajectory(
      sam_optax.gsam(inner, rho_max=0.05, rho_min=0.05, alpha=gsam_alpha), problem, 4)
  for a, e in zip(ours, gsam):
    problems.assert_trees_close(a, e, 1e-12)


@pytest.mark.slow
def test_scan_and_vmap():
  """A lax.scan over steps gives the step-by-step trajectory; vmap over two starting points
  gives each one's own scan (float64, quadratic)."""
  problem = problems.quadratic(jnp.float64)
  tx = sam_optax.gam(optax.sgd(0.1, momentum=0.9), **HPARAMS)
  grad_fn = problem.grad_fn()
  stepped = problems.trajectory(tx, problem, 4)

  def scanned(params):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, tx.init(params)), None, length=4)[0][0]

  problems.assert_trees_close(jax.jit(scanned)(problem.params), stepped[-1], 1e-12)
  other = jax.tree.map(lambda x: -0.5 * x, problem.params)
  both = jax.jit(jax.vmap(scanned))(jax.tree.map(lambda a, b: jnp.stack([a, b]),
                                                 problem.params, other))
  problems.assert_trees_close(jax.tree.map(lambda x: x[0], both), stepped[-1], 1e-12)
  problems.assert_trees_close(jax.tree.map(lambda x: x[1], both), jax.jit(scanned)(other),
                              1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("average_ascent", [True, False], ids=["global", "per_device"])
def test_data_parallelism(average_ascent):
  """Global GAM over 4 shards is GAM on the whole batch; per-device GAM (each device's g0, g1,
  g2, g3, averaged before the correction) is its m-sharpness form with chunks of 2."""
  problem = problems.mlp(jnp.float64, n=8)
  grad = jax.grad(problem.loss)
  shards = jax.tree.map(lambda x: x.reshape((4, 2) + x.shape[1:]), problem.batch)
  tx = sam_optax.gam(optax.sgd(0.1), **HPARAMS, axis_name="data",
                     average_ascent=average_ascent)

  def on_device(batch):
    grad_fn = lambda p: grad(p, batch)
    return tx.update(grad_fn(problem.params), tx.init(problem.params), problem.params,
                     grad_fn=grad_fn)[0]

  ours = jax.tree.map(lambda x: x[0], jax.jit(jax.vmap(on_device, axis_name="data"))(shards))
  if average_ascent:
    single = sam_optax.gam(optax.sgd(0.1), **HPARAMS)
    expected = jax.jit(lambda p: single.update(grad(p, problem.batch), single.init(p), p,
                                               grad_fn=problem.grad_fn())[0])(problem.params)
  else:
    chunked = sam_optax.gam(optax.sgd(0.1), **HPARAMS, chunk_size=2)
    expected = jax.jit(lambda p: chunked.update(None, chunked.init(p), p, batch=problem.batch,
                                                grad_fn=grad)[0])(problem.params)
  problems.assert_trees_close(ours, expected, 1e-12)


def test_correction_values():
  """The correction alone, on hand-computed vectors over two leaves (float64)."""
  f64 = lambda *x: jnp.asarray(x, jnp.float64)
  g0, g1 = {"a": f64(1.0, 0.0), "b": f64(2.0)}, {"a": f64(0.0, 2.0), "b": f64(0.0)}
  g2, g3 = {"a": f64(3.0, 1.0), "b": f64(-1.0)}, {"a": f64(1.0, 1.0), "b": f64(1.0)}
  carry = sam_optax.GamCarry(grads_at_first=g1, grads_at_second=g2)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  for h_minus, weight_g0 in (("paper", 0.25), ("code", 1.0)):
    fix = sam_optax.gam_correction(alpha=0.5, beta=0.25, gamma=0.5, h_minus=h_minus)
    d, state = fix.update(g3, fix.init(g0), None, clean_grads=g0, ascent_carry=carry)
    h_plus = 0.5 * flat(g1) + 0.5 * flat(g3)
    h_minus_ = weight_g0 * flat(g0) + 0.75 * flat(g2)
    perp = h_minus_ - (h_minus_ @ h_plus) / (h_plus @ h_plus) * h_plus
    np.testing.assert_allclose(flat(d), h_plus - 0.5 * perp, rtol=1e-14, atol=1e-15)
    assert int(state.count) == 1
  # A zero h+ projects nothing: d = -gamma h-.
  zero = {"a": f64(0.0, 0.0), "b": f64(0.0)}
  fix = sam_optax.gam_correction(alpha=0.5, beta=0.25, gamma=0.5)
  d, _ = fix.update(zero, fix.init(g0), None, clean_grads=g0,
                    ascent_carry=sam_optax.GamCarry(zero, g2))
  np.testing.assert_allclose(flat(d), -0.5 * (0.25 * flat(g0) + 0.75 * flat(g2)), rtol=1e-15)
  # A non-finite g1 or g2 makes d NaN, even where the rule would drop it (alpha = 0).
  fix = sam_optax.gam_correction(alpha=0.0, beta=0.25, gamma=0.5)
  bad = {"a": f64(jnp.nan, 0.0), "b": f64(0.0)}
  d, _ = fix.update(g3, fix.init(g0), None, clean_grads=g0,
                    ascent_carry=sam_optax.GamCarry(bad, g2))
  assert np.all(np.isnan(flat(d)))
  # Without the perturbed pass (a window's off steps) the gradient passes through.
  d, state = fix.update(g0, fix.init(g0), None, clean_grads=g0, perturbed=False)
  np.testing.assert_array_equal(flat(d), flat(g0))
  assert int(state.count) == 0


def test_ascent_values():
  """The ascent alone on the quadratic: its carry and eps against the formulas (float64)."""
  problem = problems.quadratic(jnp.float64)
  w, grad, unravel = references.flat_problem(problem)
  grad_fn = problem.grad_fn()
  ascent = sam_optax.gam_ascent(rho=0.2, rho_prime=0.05)
  out, _ = ascent.update(grad_fn(problem.params), ascent.init(problem.params), problem.params,
                         grad_fn=grad_fn)
  g0 = grad(w)
  g1 = grad(w + 0.05 * fref._unit(g0))
  step = 0.2 * fref._unit(g1 - g0)
  g2 = grad(w + step)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  np.testing.assert_allclose(flat(out.carry.grads_at_first), g1, rtol=1e-13)
  np.testing.assert_allclose(flat(out.carry.grads_at_second), g2, rtol=1e-13)
  np.testing.assert_allclose(flat(out.eps), step + 0.05 * fref._unit(g2), rtol=1e-13)
  assert out.points == ()
  # Zero radii: both points are w, whose gradient is the g0 handed in, taken as it is (here a
  # grad_fn shifted by 1 tells the two apart); eps is zero.
  ascent = sam_optax.gam_ascent(rho=0.0, rho_prime=0.0)
  g0 = grad_fn(problem.params)
  shifted = lambda p: jax.tree.map(lambda x: x + 1.0, grad_fn(p))
  out, _ = ascent.update(g0, ascent.init(problem.params), problem.params, grad_fn=shifted)
  for carried in out.carry:
    np.testing.assert_array_equal(flat(carried), flat(g0))
  assert not np.any(flat(out.eps))


@pytest.mark.slow
def test_inject_hyperparams_with_the_code_form():
  """h_minus is a string: optax.inject_hyperparams passes it through; the numbers are injected."""
  problem = problems.mlp(jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  plain, _, _ = problems.run(sam_optax.gam(inner, **HPARAMS, h_minus="code"), problem, 3)
  tx = optax.inject_hyperparams(sam_optax.gam)(inner, **HPARAMS, h_minus="code")
  injected, state, step = problems.run(tx, problem, 3)
  problems.assert_trees_close(injected[-1], plain[-1], 1e-12)
  assert set(HPARAMS) <= set(state.hyperparams) and "h_minus" not in state.hyperparams
  assert step._cache_size() == 1


def test_refusals():
  inner = optax.sgd(0.1)
  with pytest.raises(ValueError, match="one-call form"):
    sam_optax.gam(inner, two_call=True)
  with pytest.raises(ValueError, match="mask"):
    sam_optax.gam(inner, mask={"w": True})
  with pytest.raises(ValueError, match="h_minus must be 'paper'"):
    sam_optax.gam(inner, h_minus="official")  # pyright: ignore[reportArgumentType]
  with pytest.raises(TypeError, match="h_minus must be the string"):
    sam_optax.gam(inner, h_minus=1)  # pyright: ignore[reportArgumentType]
  for name, value in (("alpha", 1.5), ("beta", -0.1), ("gamma", -1.0), ("rho", -0.2),
                      ("rho_prime", float("nan"))):
    with pytest.raises(ValueError, match=name):
      sam_optax.gam(inner, **{name: value})
  # The correction without its ascent's carry, and the ascent without grad_fn.
  params = {"w": jnp.ones(2)}
  tx = sam_optax.sharpness_aware(inner, sam_optax.normalized_ascent(0.05),
                                 correction=sam_optax.gam_correction())
  with pytest.raises(ValueError, match="gam_ascent's carry"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)
  ascent = sam_optax.gam_ascent()
  with pytest.raises(ValueError, match="grad_fn"):
    ascent.update(params, ascent.init(params), params)
  # A user's GAM pieces in the two-call form: the carry cannot cross to the descent call.
  tx = sam_optax.sharpness_aware(inner, ascent, correction=sam_optax.gam_correction(),
                                 two_call=True)
  with pytest.raises(ValueError, match="one-call form"):
    tx.update(params, tx.init(params), params)
