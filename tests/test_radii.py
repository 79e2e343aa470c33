"""Per-leaf radii and layer-wise scaling of the normalized and unnormalized ascents (issue 14).

Each trajectory is compared with a reference written here in plain `jax.numpy` from the formula
(`eps_l = rho_l s_l g_l / ||g||`, `s_l = ||w_l||` when layer-wise), with heavy-ball SGD run by
hand, over several steps, in the one-call and the two-call form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems

TOL = {jnp.float32: 2e-6, jnp.float64: 1e-12}
LR, MOMENTUM, STEPS = 0.1, 0.9, 4
# float32 joins float64 in the full suite; the fast tier keeps float64 (the tighter tolerance).
DTYPES = pytest.mark.parametrize("dtype", [
    pytest.param(jnp.float32, id="f32", marks=pytest.mark.slow),
    pytest.param(jnp.float64, id="f64")])
FORMS = pytest.mark.parametrize("two_call", [False, True], ids=["one_call", "two_call"])


def problem(dtype):
  """Three leaves in two levels (so a radius may cover a subtree) and a nonconvex loss."""
  rng = np.random.default_rng(0)
  params = {"layer": {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,)) / 2},
            "v": rng.normal(size=(4,))}
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  x = jnp.asarray(rng.normal(size=(5, 3)), dtype)
  a = jnp.asarray([0.5, 1.0, 2.0, 3.0], dtype)

  def loss(p):
    h = jnp.tanh(x @ p["layer"]["w"] + p["layer"]["b"])
    return jnp.mean(h ** 2) + 0.5 * jnp.sum(a * p["v"] ** 2) + 0.1 * jnp.sum(jnp.sin(p["v"]))

  return params, loss


def run(ascent, params, loss, two_call):
  """The params after each of STEPS steps of sharpness_aware(sgd + momentum, ascent)."""
  tx = sam_optax.sharpness_aware(optax.sgd(LR, momentum=MOMENTUM), ascent, two_call=two_call)
  grad = jax.grad(loss)

  step = problems.form_step(tx, grad, two_call)

  state, path = tx.init(params), []
  for _ in range(STEPS):
    params, state = step(params, state)
    path.append(params)
  return path


def reference(eps_fn, params, loss):
  """Heavy-ball SGD on grad L(w + eps), eps = eps_fn(g, w, t): the rule, by hand."""
  grad = jax.jit(jax.grad(loss))
  w, v, path = params, jax.tree.map(jnp.zeros_like, params), []
  for t in range(STEPS):
    g = grad(w)
    d = grad(jax.tree.map(jnp.add, w, eps_fn(g, w, t)))
    v = jax.tree.map(lambda m, x: x + MOMENTUM * m, v, d)
    w = jax.tree.map(lambda p, m: p - LR * m, w, v)
    path.append(w)
  return path


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def per_leaf(rho_w, rho_b, rho_v):
  """Radii as a tree shaped like the params (a function of the step for each leaf)."""
  return lambda t: {"layer": {"w": rho_w(t), "b": rho_b(t)}, "v": rho_v(t)}


def eps_rule(radii, *, normalized, layerwise):
  """eps_l = rho_l s_l g_l / ||g|| (normalized) or rho_l s_l g_l, s_l = ||w_l|| or 1."""
  def eps(g, w, t):
    inv = 1.0 / global_norm(g) if normalized else 1.0
    scales = jax.tree.map(lambda x: jnp.sqrt(jnp.sum(x ** 2)) if layerwise else 1.0, w)
    return jax.tree.map(lambda r, s, x: r * s * inv * x, radii(t), scales, g)
  return eps


def assert_paths_close(actual, expected, tol):
  for a, e in zip(actual, expected):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(e)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# The radii: a subtree ('layer') and a leaf ('v', following a schedule of the ascent count).
SUBTREE_RHO = {"layer": 0.3, "v": lambda t: 0.05 * (1.0 + t)}
SUBTREE_REF = per_leaf(lambda t: 0.3, lambda t: 0.3, lambda t: 0.05 * (1.0 + t))

CASES = {  # name: (ascent, eps rule)
    "normalized_per_leaf": (
        sam_optax.normalized_ascent(SUBTREE_RHO),
        eps_rule(SUBTREE_REF, normalized=True, layerwise=False)),
    "unnormalized_per_leaf": (
        sam_optax.unnormalized_ascent({"layer": {"w": 0.2, "b": 0.0}, "v": 0.1}),
        eps_rule(per_leaf(lambda t: 0.2, lambda t: 0.0, lambda t: 0.1),
                 normalized=False, layerwise=False)),
    "normalized_layerwise": (
        sam_optax.normalized_ascent(0.1, layerwise=True),
        eps_rule(per_leaf(*[lambda t: 0.1] * 3), normalized=True, layerwise=True)),
    "normalized_per_leaf_layerwise": (
        sam_optax.normalized_ascent(SUBTREE_RHO, layerwise=True),
        eps_rule(SUBTREE_REF, normalized=True, layerwise=True)),
    "unnormalized_layerwise": (
        sam_optax.unnormalized_ascent(0.05, layerwise=True),
        eps_rule(per_leaf(*[lambda t: 0.05] * 3), normalized=False, layerwise=True)),
}


@DTYPES
@FORMS
@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_the_rule(case, two_call, dtype):
  ascent, rule = CASES[case]
  params, loss = problem(dtype)
  assert_paths_close(run(ascent, params, loss, two_call), reference(rule, params, loss),
                     TOL[dtype])


@DTYPES
def test_step_count_ascent_takes_per_leaf_radii_of_the_step(dtype):
  """GSAM's ascent: the schedules' argument is the engine's step count."""
  params, loss = problem(dtype)
  ascent = sam_optax.step_count_ascent({"layer": lambda t: 0.1 + 0.05 * t, "v": 0.2})
  rule = eps_rule(per_leaf(lambda t: 0.1 + 0.05 * t, lambda t: 0.1 + 0.05 * t, lambda t: 0.2),
                  normalized=True, layerwise=False)
  assert_paths_close(run(ascent, params, loss, False), reference(rule, params, loss),
                     TOL[dtype])


@DTYPES
@FORMS
def test_equal_radii_are_the_scalar_radius_bit_for_bit(two_call, dtype):
  """A tree of equal radii takes the per-leaf path; a scalar one the scalar rule, unchanged."""
  params, loss = problem(dtype)
  scalar = run(sam_optax.normalized_ascent(0.1), params, loss, two_call)
  tree = run(sam_optax.normalized_ascent({"layer": 0.1, "v": 0.1}), params, loss, two_call)
  for a, b in zip(scalar, tree):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_named_variants_take_per_leaf_radii():
  """sam(rho=tree) is the engine over normalized_ascent(tree): the same steps."""
  params, loss = problem(jnp.float64)
  rho = {"layer": 0.2, "v": 0.0}
  tx = sam_optax.sam(optax.sgd(LR, momentum=MOMENTUM), rho=rho)
  grad, state, ours = jax.grad(loss), tx.init(params), params
  for _ in range(2):
    updates, state = tx.update(grad(ours), state, ours, grad_fn=grad)
    ours = optax.apply_updates(ours, updates)
  expected = run(sam_optax.normalized_ascent(rho), params, loss, False)[1]
  assert_paths_close([ours], [expected], 1e-12)


@DTYPES
@pytest.mark.parametrize("make", [
    sam_optax.friendly_ascent, sam_optax.variance_suppressed_ascent,
    sam_optax.deterministic_normalized_ascent], ids=["friendly", "vasso", "dnsam"])
def test_ascents_with_a_state_take_per_leaf_radii(make, dtype):
  """eps_l = rho_l d_l / ||d|| (d their direction, ||d|| global): leaf by leaf, the ascent with
  the scalar radius rho_l, over three updates (each state moving with the gradients)."""
  params, loss = problem(dtype)
  radii = {"layer": 0.3, "v": lambda t: 0.05 * (1.0 + t)}
  grads = [jax.grad(loss)(jax.tree.map(lambda x, k=k: x * (1.0 + 0.3 * k), params))
           for k in range(3)]

  def eps_path(ascent):
    update, state, path = jax.jit(ascent.update), ascent.init(params), []
    for g in grads:
      eps, state = update(g, state, params)
      path.append(eps)
    return path

  per_leaf = eps_path(make(radii))
  layer, v = eps_path(make(0.3)), eps_path(make(lambda t: 0.05 * (1.0 + t)))
  for t in range(3):
    assert_paths_close([per_leaf[t]["layer"]], [layer[t]["layer"]], TOL[dtype])
    assert_paths_close([per_leaf[t]["v"]], [v[t]["v"]], TOL[dtype])
    assert float(global_norm(per_leaf[t]["v"])) > 0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("rho, match", [
    ({"layer": -0.1, "v": 0.1}, r"rho\['layer'\] must be >= 0"),
    ({"layer": {"w": float("nan")}}, r"rho\['layer'\]\['w'\] must be finite"),
    ({"layer": float("inf")}, "must be finite"),
    ({}, "empty tree"),
])
def test_invalid_radii_raise_at_construction(rho, match):
  for make in (sam_optax.normalized_ascent, sam_optax.unnormalized_ascent,
               sam_optax.step_count_ascent, sam_optax.friendly_ascent,
               sam_optax.variance_suppressed_ascent, sam_optax.deterministic_normalized_ascent):
    with pytest.raises(ValueError, match=match):
      make(rho)
  with pytest.raises(ValueError, match=match):
    sam_optax.sam(optax.sgd(0.1), rho=rho)


def test_a_radius_tree_that_is_not_a_prefix_raises_at_the_first_trace():
  params, loss = problem(jnp.float32)
  for rho in ({"layer": 0.1, "u": 0.1}, {"layer": {"w": 0.1}, "v": 0.1}, [0.1, 0.2]):
    tx = sam_optax.sam(optax.sgd(0.1), rho=rho)
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, grad_fn=jax.grad(loss)))
    with pytest.raises(ValueError, match="not a prefix of the params"):
      step(jax.grad(loss)(params), tx.init(params), params)


def test_layerwise_is_a_bool_and_needs_the_params():
  with pytest.raises(TypeError, match="layerwise must be a Python bool"):
    sam_optax.normalized_ascent(0.1, layerwise=1)  # type: ignore[arg-type]
  ascent = sam_optax.normalized_ascent(0.1, layerwise=True)
  g = {"w": jnp.ones(2, jnp.float32)}
  with pytest.raises(ValueError, match="needs the params"):
    ascent.update(g, ascent.init(g))


def test_invalid_scheduled_radius_gives_nan_at_run_time():
  """A schedule's value is checked at every step, per leaf, as a scalar radius is."""
  ascent = sam_optax.normalized_ascent({"a": 0.1, "b": lambda t: 0.1 - 0.2 * t})
  g = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones(3, jnp.float32)}
  update = jax.jit(ascent.update)
  eps, state = update(g, ascent.init(g))
  assert bool(jnp.all(jnp.isfinite(eps["b"])))
  eps, _ = update(g, state)  # rho_b = -0.1
  assert bool(jnp.all(jnp.isnan(eps["b"])))
  np.testing.assert_allclose(np.asarray(eps["a"]), 0.1 / np.sqrt(5.0), rtol=1e-6)


def test_layerwise_leaves_zero_weights_unperturbed_and_keeps_relative_radius():
  """sum_l (||eps_l|| / ||w_l||)^2 = rho^2 over leaves with nonzero weights and gradient."""
  params = {"w": jnp.asarray([[3.0, 4.0]], jnp.float64), "b": jnp.zeros(2, jnp.float64),
            "s": jnp.asarray(-2.0, jnp.float64)}
  g = {"w": jnp.asarray([[1.0, -2.0]], jnp.float64), "b": jnp.asarray([0.5, 0.5], jnp.float64),
       "s": jnp.asarray(1.5, jnp.float64)}
  ascent = sam_optax.normalized_ascent(0.2, layerwise=True)
  eps, _ = ascent.update(g, ascent.init(params), params)
  assert bool(jnp.all(eps["b"] == 0))
  gn = float(global_norm(g))
  for name, w_norm in (("w", 5.0), ("s", 2.0)):
    np.testing.assert_allclose(np.asarray(eps[name]), 0.2 * w_norm * np.asarray(g[name]) / gn,
                               rtol=1e-14)
  relative = sum((float(global_norm(eps[k])) / float(global_norm(params[k]))) ** 2
                 for k in ("w", "s"))
  np.testing.assert_allclose(relative, 0.04 * (1 - 0.5 / gn ** 2), rtol=1e-12)
