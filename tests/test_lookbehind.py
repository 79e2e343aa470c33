"""Lookbehind-SAM beyond the catalogue's shared tests.

The catalogue (tests/catalogue.py) runs `lookbehind_sam` (k = 3, alpha = 0.5) and its adaptive
alpha (k = 2) through every shared test against tests/field_references.py. Here: a reference
written out below with an inner optimizer that reads its params (weight decay on the fast
weights) and a momentum that advances k times per update; k = 1, alpha = 1 against `sam` bit
for bit; the adaptive rule's values (zero guard included); Lookbehind-ASAM; the gradient count;
the aux; data parallelism under `vmap`; and what it refuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_optax
from tests import problems

LR, MOMENTUM, WD, STEPS = 0.1, 0.9, 0.05, 6
TOL = {jnp.float32: 2e-6, jnp.float64: 1e-12}


def unit(x):
  n = jnp.linalg.norm(x)
  return jnp.where(n > 0, x / jnp.where(n > 0, n, 1.0), 0.0)


def leaf_slices(params):
  """The flat vector's slice of each leaf, in tree order."""
  out, start = [], 0
  for leaf in jax.tree.leaves(params):
    out.append(slice(start, start + leaf.size))
    start += leaf.size
  return out


def reference_trajectory(problem, rho, k, alpha, steps=STEPS, ascent_metric=None):
  """Lookbehind-SAM with `optax.chain(add_decayed_weights(WD), sgd(LR, MOMENTUM))` inside,
  on the flattened params:

    u_0 = theta_0 = phi = w, g_0 = grad(w); for j = 1..k:
      u_j = u_{j-1} + rho g_{j-1}/||g_{j-1}||   (ASAM: T^2 g / ||T g||, T = |u_{j-1}| + eta)
      g_j = grad(u_j); v = g_j + WD theta_{j-1} + MOMENTUM v; theta_j = theta_{j-1} - LR v
    w <- phi + alpha (theta_k - phi), alpha per leaf (1 + cos(theta_1 - phi, theta_k - phi))/2
    when None.
  """
  w, unravel = ravel_pytree(problem.params)
  grad = jax.jit(lambda x: ravel_pytree(jax.grad(problem.loss)(unravel(x), problem.batch))[0])
  slices = leaf_slices(problem.params)
  v, out = jnp.zeros_like(w), []
  for _ in range(steps):
    g, u, theta = grad(w), w, w
    for j in range(k):
      if ascent_metric is None:
        u = u + rho * unit(g)
      else:
        t = ascent_metric(u)
        u = u + rho * t * t * g / jnp.linalg.norm(t * g)
      g = grad(u)
      v = g + WD * theta + MOMENTUM * v
      theta = theta - LR * v
      if j == 0:
        first = theta - w
    last = theta - w
    if alpha is None:
      weights = jnp.zeros_like(w)
      for part in slices:
        cosine = jnp.clip(jnp.dot(unit(first[part]), unit(last[part])), -1.0, 1.0)
        weights = weights.at[part].set((1 + cosine) / 2)
      w = w + weights * last
    else:
      w = w + alpha * last
    out.append(unravel(w))
  return out


def inner():
  return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


def check_against_reference(dtype, k, alpha, **kwargs):
  problem = problems.mlp(dtype)
  tx = sam_optax.lookbehind_sam(inner(), rho=0.1, k=k, alpha=alpha, **kwargs)
  ours = problems.trajectory(tx, problem, STEPS)
  expected = reference_trajectory(problem, 0.1, k, alpha)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[dtype])
  assert not np.allclose(ours[-1]["scale"], problem.params["scale"])


def test_matches_reference_with_weight_decay_on_the_fast_weights():
  """The fast tier's case: float64, k = 2, fixed alpha."""
  check_against_reference(jnp.float64, 2, 0.8)


# k = 4 in float64 only: its large steps (four inner steps of lr 0.1 per update) amplify the
# float32 rounding of two different programs past 2e-6 within six updates.
@pytest.mark.slow
@pytest.mark.parametrize("dtype, k, alpha", [
    (jnp.float32, 3, 0.2), (jnp.float64, 3, 0.2), (jnp.float32, 2, None),
    (jnp.float64, 2, None), (jnp.float64, 4, None)],
    ids=["k3-fixed-f32", "k3-fixed-f64", "k2-adaptive-f32", "k2-adaptive-f64",
         "k4-adaptive-f64"])
def test_matches_reference(dtype, k, alpha):
  check_against_reference(dtype, k, alpha)


@pytest.mark.slow
def test_adaptive_alpha_is_not_a_constant():
  """The adaptive rule moves the leaves by different fractions (the comparison above is not
  between two runs of a constant alpha)."""
  problem = problems.mlp(jnp.float64)
  adaptive = problems.trajectory(sam_optax.lookbehind_sam(inner(), 0.1, k=3, alpha=None),
                                 problem, 2)[-1]
  for alpha in (0.5, 1.0):
    fixed = problems.trajectory(sam_optax.lookbehind_sam(inner(), 0.1, k=3, alpha=alpha),
                                problem, 2)[-1]
    assert not np.allclose(adaptive["layer0"]["w"], fixed["layer0"]["w"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rho", [0.05, 0.0], ids=["rho", "rho0"])
def test_k1_alpha1_is_sam(dtype, rho):
  """The same operations as SAM's step; two compiled programs may fuse (and so round) them
  differently, hence a tolerance of the dtype's precision (observed: 1e-16 in float64)."""
  problem = problems.mlp(dtype)
  for make_inner in (lambda: optax.sgd(LR, momentum=MOMENTUM), lambda: optax.adamw(1e-2)):
    sam = problems.trajectory(sam_optax.sam(make_inner(), rho), problem, 4)
    ours = problems.trajectory(sam_optax.lookbehind_sam(make_inner(), rho, k=1, alpha=1.0),
                               problem, 4)
    for a, e in zip(ours, sam):
      problems.assert_trees_close(a, e, {jnp.float32: 1e-6, jnp.float64: 1e-14}[dtype])


def test_k1_alpha1_first_step_is_sams_bit_for_bit():
  """From a fresh state inside each program: the first updates agree bit for bit."""
  problem = problems.mlp(jnp.float32)
  grad = problem.grad_fn()

  def first_update(tx):
    @jax.jit
    def update(params):
      return tx.update(grad(params), tx.init(params), params, grad_fn=grad)[0]
    return update(problem.params)

  inner_ = optax.sgd(LR, momentum=MOMENTUM)
  problems.assert_trees_close(
      first_update(sam_optax.lookbehind_sam(inner_, 0.05, k=1, alpha=1.0)),
      first_update(sam_optax.sam(inner_, 0.05)), 0.0)


@pytest.mark.slow
def test_k1_adaptive_alpha_is_sam_to_rounding():
  """k = 1: theta_1 = theta_k, so the cosine is 1 and alpha 1, up to its rounding."""
  problem = problems.mlp(jnp.float64)
  inner_ = optax.sgd(LR, momentum=MOMENTUM)
  sam = problems.trajectory(sam_optax.sam(inner_, 0.05), problem, 4)
  ours = problems.trajectory(sam_optax.lookbehind_sam(inner_, 0.05, k=1, alpha=None),
                             problem, 4)
  for a, e in zip(ours, sam):
    problems.assert_trees_close(a, e, 1e-13)


@pytest.mark.slow
def test_lookbehind_asam_reads_abs_w_at_the_perturbed_point():
  """`ascent=adaptive_ascent(...)`: T = |u_{j-1}| + eta, at the current perturbed point."""
  problem, eta = problems.mlp(jnp.float64), 0.01
  ascent = sam_optax.adaptive_ascent(0.5, eta)
  tx = sam_optax.lookbehind_sam(inner(), k=2, alpha=0.5, ascent=ascent)
  ours = problems.trajectory(tx, problem, STEPS)
  expected = reference_trajectory(problem, 0.5, 2, 0.5,
                                  ascent_metric=lambda u: jnp.abs(u) + eta)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[jnp.float64])


# ------------------------------------------------------------------------ the adaptive rule


def scripted(gradients):
  """A grad_fn returning the given gradients in turn (eager calls run in order)."""
  calls = iter(gradients)
  return lambda p: next(calls)


def test_adaptive_alpha_values_and_zero_guard():
  """Identity inner: theta_1 - phi = g_1, theta_2 - phi = g_1 + g_2, leaf by leaf."""
  f64 = lambda x: jnp.asarray(x, jnp.float64)
  params = {"parallel": f64([1.0, 1.0]), "orthogonal": f64([0.0, 0.0]),
            "reversed": f64([0.0, 0.0]), "first_zero": f64([0.0, 0.0]), "scalar": f64(1.0),
            "empty": jnp.zeros((0,), jnp.float64)}
  g1 = {"parallel": f64([1.0, 2.0]), "orthogonal": f64([1.0, 0.0]),
        "reversed": f64([1.0, 0.0]), "first_zero": f64([0.0, 0.0]), "scalar": f64(2.0),
        "empty": jnp.zeros((0,), jnp.float64)}
  g2 = {"parallel": f64([2.0, 4.0]), "orthogonal": f64([-1.0, 1.0]),
        "reversed": f64([-3.0, 0.0]), "first_zero": f64([1.0, 1.0]), "scalar": f64(3.0),
        "empty": jnp.zeros((0,), jnp.float64)}
  tx = sam_optax.lookbehind_sam(optax.identity(), rho=0.1, k=2, alpha=None)
  updates, _ = tx.update(g1, tx.init(params), params, grad_fn=scripted([g1, g2]))
  expected = {"parallel": [3.0, 6.0],       # cos 1: alpha 1
              "orthogonal": [0.0, 0.5],     # last (0, 1) _|_ first (1, 0): alpha 1/2
              "reversed": [0.0, 0.0],       # last (-2, 0): cos -1, alpha 0
              "first_zero": [0.5, 0.5],     # a zero first displacement: alpha 1/2
              "scalar": 5.0, "empty": []}
  for name, value in expected.items():
    np.testing.assert_allclose(np.asarray(updates[name]), np.asarray(value), rtol=1e-15,
                               atol=1e-15, err_msg=name)


def test_adaptive_alpha_is_finite_for_huge_float32_gradients():
  """The unit vectors are formed first: no overflow of <a, b> at |g| ~ 1e30."""
  params = {"w": jnp.zeros(3, jnp.float32)}
  g1, g2 = {"w": jnp.asarray([3e30, 0.0, 4e30], jnp.float32)}, {"w": jnp.asarray(
      [0.0, 5e30, 0.0], jnp.float32)}
  tx = sam_optax.lookbehind_sam(optax.identity(), rho=0.1, k=2, alpha=None)
  updates, _ = tx.update(g1, tx.init(params), params, grad_fn=scripted([g1, g2]))
  first, last = np.asarray([3.0, 0.0, 4.0]), np.asarray([3.0, 5.0, 4.0])
  alpha = (1 + first @ last / (np.linalg.norm(first) * np.linalg.norm(last))) / 2
  np.testing.assert_allclose(np.asarray(updates["w"]) / 1e30, alpha * last, rtol=1e-6)


# -------------------------------------------------------------------- cost, aux, parallelism


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 2,
                               pytest.param(3, marks=pytest.mark.slow)])
def test_k_plus_one_gradient_evaluations(k):
  """Counted at run time (one host callback per grad_fn call) and in the compiled step (one
  tanh per gradient of the MLP: the caller's and k of grad_fn's)."""
  problem = problems.mlp(jnp.float32)
  tx = sam_optax.lookbehind_sam(optax.sgd(0.1), k=k)
  grad_fn, calls = problems.counting(problem.grad_fn())
  problems.run(tx, problem, 2, grad_fn=grad_fn)
  jax.effects_barrier()
  assert len(calls) == 2 * k
  assert problems.compiled_tanh_count(tx, problem) == k + 1


@pytest.mark.slow
def test_update_with_aux_returns_the_last_perturbed_pass():
  """The aux at u_k (here the point itself), and the same updates as `update`."""
  problem = problems.quadratic(jnp.float64)
  rho, k = 0.1, 3
  tx = sam_optax.lookbehind_sam(optax.sgd(0.1), rho=rho, k=k, has_aux=True)
  grad = problem.grad_fn()
  grad_and_point = lambda p: (grad(p), p)
  params, state = problem.params, tx.init(problem.params)
  updates, _, aux = jax.jit(tx.update_with_aux, static_argnames="grad_fn")(
      grad(params), state, params, grad_fn=grad_and_point)
  plain, _ = jax.jit(tx.update, static_argnames="grad_fn")(grad(params), state, params,
                                                           grad_fn=grad_and_point)
  problems.assert_trees_close(updates, plain, 0.0)
  w, unravel = ravel_pytree(params)
  flat_grad = lambda x: ravel_pytree(grad(unravel(x)))[0]
  u, g = w, flat_grad(w)
  for _ in range(k):
    u = u + rho * unit(g)
    g = flat_grad(u)
  problems.assert_trees_close(aux, unravel(u), 1e-14)
  with pytest.raises(ValueError, match="has_aux=True"):
    sam_optax.lookbehind_sam(optax.sgd(0.1)).update_with_aux(
        grad(params), state, params, grad_fn=grad)


@pytest.mark.slow
def test_window_with_aux_gives_zeros_outside():
  problem = problems.quadratic(jnp.float64)
  tx = sam_optax.lookbehind_sam(optax.sgd(0.1), k=2, has_aux=True, window=(0, 1))
  grad = problem.grad_fn()
  step = jax.jit(tx.update_with_aux, static_argnames="grad_fn")
  grad_and_loss = lambda p: (grad(p), problem.loss(p, None))
  params, state = problem.params, tx.init(problem.params)
  _, state, inside = step(grad(params), state, params, grad_fn=grad_and_loss)
  updates, state, outside = step(grad(params), state, params, grad_fn=grad_and_loss)
  assert float(inside) > 0 and float(outside) == 0.0
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grad(params))):
    np.testing.assert_allclose(np.asarray(u), -0.1 * np.asarray(g), rtol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("average_ascent", [True, False], ids=["global", "per_device"])
def test_data_parallel_under_vmap(average_ascent):
  """Two replicas (vmap with an axis name), each with half the batch. Global (averaged ascent):
  Lookbehind on the whole batch. Per device: each replica climbs from its own gradients and the
  inner optimizer steps on their averages."""
  problem, rho, k = problems.mlp(jnp.float64, n=16), 0.1, 2
  tx = sam_optax.lookbehind_sam(inner(), rho=rho, k=k, alpha=None, axis_name="data",
                                average_ascent=average_ascent)
  x, y = problem.batch
  halves = (x.reshape(2, 8, -1), y.reshape(2, 8, -1))
  loss_grad = jax.grad(problem.loss)

  @jax.jit
  def run(params):
    def replica(batch):
      state, p = tx.init(params), params
      for _ in range(3):
        updates, state = tx.update(loss_grad(p, batch), state, p,
                                   grad_fn=lambda q: loss_grad(q, batch))
        p = optax.apply_updates(p, updates)
      return p
    return jax.vmap(replica, axis_name="data")(halves)

  replicas = run(problem.params)
  for leaf in jax.tree.leaves(replicas):
    np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[1]))
  ours = jax.tree.map(lambda l: l[0], replicas)
  if average_ascent:
    expected = reference_trajectory(problem, rho, k, None, steps=3)[-1]
  else:
    expected = per_device_reference(problem, halves, rho, k, steps=3)
  problems.assert_trees_close(ours, expected, 1e-12)


def per_device_reference(problem, halves, rho, k, steps):
  """Per-device ascent chains, averaged descent gradients, adaptive alpha (flat vectors)."""
  w, unravel = ravel_pytree(problem.params)
  grads = [jax.jit(lambda x, b=(halves[0][i], halves[1][i]): ravel_pytree(
      jax.grad(problem.loss)(unravel(x), b))[0]) for i in range(2)]
  slices = leaf_slices(problem.params)
  v = jnp.zeros_like(w)
  for _ in range(steps):
    gs, us, theta = [g(w) for g in grads], [w, w], w
    for j in range(k):
      us = [u + rho * unit(g) for u, g in zip(us, gs)]
      gs = [g(u) for g, u in zip(grads, us)]
      v = (gs[0] + gs[1]) / 2 + WD * theta + MOMENTUM * v
      theta = theta - LR * v
      if j == 0:
        first = theta - w
    last = theta - w
    weights = jnp.zeros_like(w)
    for part in slices:
      cosine = jnp.clip(jnp.dot(unit(first[part]), unit(last[part])), -1.0, 1.0)
      weights = weights.at[part].set((1 + cosine) / 2)
    w = w + weights * last
  return unravel(w)


@pytest.mark.slow
def test_scan_and_injected_alpha_schedule():
  """Under lax.scan, with alpha injected by optax.inject_hyperparams and changed between runs
  without recompiling: the plain construction's trajectory."""
  problem = problems.quadratic(jnp.float64)
  grad = problem.grad_fn()
  injected = optax.inject_hyperparams(sam_optax.lookbehind_sam, static_args=("k",))(
      inner(), rho=0.1, k=2, alpha=0.5)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      p, s = carry
      u, s = injected.update(grad(p), s, p, grad_fn=grad)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, state), None, length=4)[0][0]

  for alpha in (0.5, 0.3):
    state = injected.init(problem.params)
    state.hyperparams["alpha"] = jnp.asarray(alpha, jnp.float64)
    ours = run(problem.params, state)
    plain = problems.trajectory(sam_optax.lookbehind_sam(inner(), 0.1, k=2, alpha=alpha),
                                problem, 4)[-1]
    problems.assert_trees_close(ours, plain, 1e-12)
  assert run._cache_size() == 1


@pytest.mark.slow
def test_flax_nnx_sam_step_reads_the_last_perturbed_loss():
  """`sam_optax.flax.sam_step` drives it unchanged; its perturbed loss is the loss at u_k."""
  nnx = pytest.importorskip("flax.nnx")
  import sam_optax.flax  # pylint: disable=import-outside-toplevel

  class Linear(nnx.Module):
    def __init__(self, rngs):
      self.layer = nnx.Linear(3, 2, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
      return self.layer(x)

  model = Linear(nnx.Rngs(0))
  w0 = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))  # before the step updates it
  rho, k = 0.2, 2
  tx = sam_optax.lookbehind_sam(optax.sgd(0.1), rho=rho, k=k, has_aux=True)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.arange(12.0, dtype=jnp.float64).reshape(4, 3) / 10
  y = jnp.ones((4, 2), jnp.float64)
  loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
  metrics = sam_optax.flax.sam_step(model, optimizer, loss_fn, (x, y))
  graphdef = nnx.graphdef(model)
  loss_at = lambda state: loss_fn(nnx.merge(graphdef, state), (x, y))
  w, unravel = ravel_pytree(w0)
  flat_grad = lambda v: ravel_pytree(jax.grad(loss_at)(unravel(v)))[0]
  u, g = w, flat_grad(w)
  for _ in range(k):
    u = u + rho * unit(g)
    g = flat_grad(u)
  np.testing.assert_allclose(float(metrics.perturbed_loss), float(loss_at(unravel(u))),
                             rtol=1e-12)
  np.testing.assert_allclose(float(metrics.loss), float(loss_at(w0)), rtol=1e-12)


# ---------------------------------------------------------------------------- misuse


def test_construction_refusals():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="one-call form"):
    sam_optax.lookbehind_sam(sgd, two_call=True)
  for option, value in (("renormalize", True), ("mask", {"w": True}), ("chunk_size", 2)):
    with pytest.raises(ValueError, match=f"cannot take {option}="):
      sam_optax.lookbehind_sam(sgd, **{option: value})
  with pytest.raises(ValueError, match="k must be >= 1"):
    sam_optax.lookbehind_sam(sgd, k=0)
  with pytest.raises(TypeError, match="k must be a Python int"):
    sam_optax.lookbehind_sam(sgd, k=2.0)  # pyright: ignore[reportArgumentType]
  for alpha in (1.5, -0.1, float("nan")):
    with pytest.raises(ValueError, match="alpha must be"):
      sam_optax.lookbehind_sam(sgd, alpha=alpha)
  with pytest.raises(ValueError, match="rho must be"):
    sam_optax.lookbehind_sam(sgd, rho=-0.1)
  with pytest.raises(TypeError, match="ascent must be an optax.GradientTransformation"):
    sam_optax.lookbehind_sam(sgd, ascent=0.05)  # pyright: ignore[reportArgumentType]
  with pytest.raises(ValueError, match="average_ascent=True for global"):
    sam_optax.lookbehind_sam(sgd, axis_name="data")


def test_call_refusals():
  problem = problems.quadratic(jnp.float32)
  params, grad = problem.params, problem.grad_fn()
  tx = sam_optax.lookbehind_sam(optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs grad_fn=.*no two-call form"):
    tx.update(grad(params), state, params)
  with pytest.raises(ValueError, match="takes no batch="):
    tx.update(grad(params), state, params, grad_fn=grad, batch=(1, 2))
  with pytest.raises(TypeError, match="not the SharpnessAwareState"):
    tx.update(grad(params), optax.sgd(0.1).init(params), params, grad_fn=grad)
  with_points = optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(),
      lambda g, s, p=None, **extra: (sam_optax.Perturbation(eps=g, points=(g,)), s))
  sampa_like = sam_optax.lookbehind_sam(optax.sgd(0.1), ascent=with_points)
  with pytest.raises(ValueError, match="Perturbation"):
    sampa_like.update(grad(params), sampa_like.init(params), params, grad_fn=grad)
