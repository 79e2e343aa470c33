"""DNSAM, USAM2, HUSAM, penalty SAM, multi-step ascent, optax.MultiSteps, and their errors.

Shared behaviour (reference trajectories, dtypes, jit, inject_hyperparams, rho = 0) is covered
by the catalogue; this file checks what is specific to each of these variants.
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
from tests import problems, references


def direction(tx, problem, params=None, grad_fn=None):
  """The direction a transformation hands an identity inner optimizer (its updates)."""
  params = problem.params if params is None else params
  grad_fn = problem.grad_fn() if grad_fn is None else grad_fn
  updates = jax.jit(lambda p: tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn)[0])(params)
  return ravel_pytree(updates)[0]


def flat_hessian(problem):
  w, unravel = ravel_pytree(problem.params)
  return jax.jit(jax.hessian(lambda v: problem.loss(unravel(v), problem.batch)))(w)


# ----------------------------------------------------------------------------- DNSAM


def test_dnsam_with_the_full_batch_norm_passed_each_step():
  """Minibatch ascent direction, full-batch norm: eps = rho g_B / ||grad L(w)||."""
  problem = problems.mlp(jnp.float64, n=12)
  x, y = problem.batch
  halves = [(x[:6], y[:6]), (x[6:], y[6:])]
  rho = 0.2
  tx = sam_optax.dnsam(optax.sgd(0.1, momentum=0.9), rho=rho)
  grad = jax.grad(problem.loss)

  @jax.jit
  def step(params, state, batch):
    full_norm = optax.tree.norm(grad(params, problem.batch))
    updates, state = tx.update(grad(params, batch), state, params,
                               grad_fn=lambda p: grad(p, batch), full_grad_norm=full_norm)
    return optax.apply_updates(params, updates), state

  params, state = problem.params, tx.init(problem.params)
  w, unravel = ravel_pytree(problem.params)
  v = jnp.zeros_like(w)
  flat = jax.jit(lambda u, b: ravel_pytree(grad(unravel(u), b))[0])
  for t in range(6):
    batch = halves[t % 2]
    params, state = step(params, state, batch)
    g, full = flat(w, batch), jnp.linalg.norm(flat(w, problem.batch))
    d = flat(w + rho * g / full, batch)
    w, v = references.heavy_ball(w, v, d, 0.1, 0.9)
    np.testing.assert_allclose(ravel_pytree(params)[0], w, rtol=1e-12, atol=1e-12)


def test_dnsam_norm_estimate_converges_to_the_full_batch_norm():
  """Linear regression at fixed w with minibatches drawn with replacement.

  There `E ||g_B||^2 = ||grad L||^2 + tr(C)/B`, with C the covariance of per-example
  gradients: the estimate converges to that, i.e. to the full-batch norm up to the noise term,
  which is negligible for large batches.
  """
  rng = np.random.default_rng(0)
  n, dim = 2000, 10
  x = jnp.asarray(rng.normal(size=(n, dim)))
  y = x @ jnp.asarray(rng.normal(size=dim)) + 0.5 * jnp.asarray(rng.normal(size=n))
  params = {"w": jnp.zeros(dim, jnp.float64)}
  loss = lambda p, idx: 0.5 * jnp.mean((x[idx] @ p["w"] - y[idx]) ** 2)
  per_example = jax.vmap(lambda i: jax.grad(loss)(params, i[None])["w"])(jnp.arange(n))
  full_norm = float(jnp.linalg.norm(per_example.mean(0)))
  noise = float(jnp.sum(jnp.var(per_example, axis=0)))
  decay = 0.99
  ascent = sam_optax.deterministic_normalized_ascent(0.1, decay=decay)

  @functools.partial(jax.jit, static_argnums=0)
  def estimates(batch_size, key):
    def step(state, key):
      idx = jax.random.randint(key, (batch_size,), 0, n)
      _, state = ascent.update(jax.grad(loss)(params, idx), state, params)
      return state, jnp.sqrt(state.sq_norm_ema / (1 - decay ** state.count))
    return jax.lax.scan(step, ascent.init(params), jax.random.split(key, 2000))[1]

  small = estimates(10, jax.random.key(0))
  predicted = np.sqrt(full_norm ** 2 + noise / 10)
  assert predicted > 1.3 * full_norm  # a noisy regime, where the excess is visible
  np.testing.assert_allclose(float(small[-1]), predicted, rtol=0.05)
  large = estimates(1000, jax.random.key(1))
  np.testing.assert_allclose(float(large[-1]), full_norm, rtol=0.02)
  # Noise-free (full batch, fixed w): the bias-corrected estimate is the exact norm at every step.
  state = ascent.init(params)
  full_grad = jax.grad(loss)(params, jnp.arange(n))
  for _ in range(3):
    eps, state = ascent.update(full_grad, state, params)
    np.testing.assert_allclose(float(optax.tree.norm(eps)), 0.1, rtol=1e-12)


def test_dnsam_with_zero_decay_is_sam():
  problem = problems.mlp(jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  problems.assert_trees_close(problems.trajectory(sam_optax.dnsam(inner, rho=0.1, decay=0.0), problem, 5)[-1],
        problems.trajectory(sam_optax.sam(inner, rho=0.1), problem, 5)[-1], 1e-12)


def test_dnsam_zero_gradient_and_errors():
  ascent = sam_optax.deterministic_normalized_ascent(0.1)
  zeros = {"w": jnp.zeros(3, jnp.float32)}
  eps, state = ascent.update(zeros, ascent.init(zeros))
  assert bool(jnp.all(eps["w"] == 0)) and state.sq_norm_ema.dtype == jnp.float32
  eps, _ = ascent.update(zeros, ascent.init(zeros), full_grad_norm=0.0)
  assert bool(jnp.all(eps["w"] == 0))
  with pytest.raises(ValueError, match="must be a scalar"):
    ascent.update(zeros, ascent.init(zeros), full_grad_norm=jnp.ones(3))
  with pytest.raises(ValueError, match="decay must be < 1"):
    sam_optax.dnsam(optax.sgd(0.1), decay=1.0)
  with pytest.raises(ValueError, match=r"decay must be in \[0.0, 1.0\)"):
    sam_optax.dnsam(optax.sgd(0.1), decay=-0.5)


# ----------------------------------------------------------------------------- USAM2, multi-step


def test_usam2_is_the_nested_two_step_ascent():
  problem = problems.mlp(jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  usam2 = problems.trajectory(sam_optax.usam2(inner, rho=0.2), problem, 5)
  nested = problems.trajectory(sam_optax.multistep_sam(inner, rho=0.2, steps=2, normalized=False,
                                              project=False, nested=True), problem, 5)
  accumulated = problems.trajectory(sam_optax.multistep_sam(inner, rho=0.2, steps=2, normalized=False,
                                                   project=False), problem, 5)
  problems.assert_trees_close(usam2[-1], nested[-1], 0.0)
  assert not np.allclose(ravel_pytree(usam2[-1])[0], ravel_pytree(accumulated[-1])[0])


@pytest.mark.parametrize("normalized, project, same_as", [
    (True, True, functools.partial(sam_optax.sam, rho=0.1)),
    (False, False, functools.partial(sam_optax.usam, rho=0.1)),
], ids=["sam", "usam"])
def test_one_ascent_step_is_sam_or_usam(normalized, project, same_as):
  problem = problems.mlp(jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  ours = problems.trajectory(sam_optax.multistep_sam(inner, rho=0.1, steps=1, normalized=normalized,
                                            project=project), problem, 5)
  problems.assert_trees_close(ours[-1], problems.trajectory(same_as(inner), problem, 5)[-1], 1e-12)


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "unnormalized"])
@pytest.mark.parametrize("nested", [False, True], ids=["accumulated", "nested"])
@pytest.mark.parametrize("project", [True, False], ids=["projected", "free"])
def test_multistep_ascent_matches_reference(normalized, nested, project):
  problem = problems.mlp(jnp.float64)
  rho, steps, step_size = 0.05, 4, 0.03
  ascent = sam_optax.multistep_ascent(rho, steps, normalized=normalized, step_size=step_size,
                                      project=project, nested=nested)
  grad_fn = problem.grad_fn()
  grads = grad_fn(problem.params)
  eps, state = jax.jit(functools.partial(ascent.update, grad_fn=grad_fn))(
      grads, ascent.init(problem.params), problem.params)
  w, flat_grad, _ = references.flat_problem(problem)
  flat_grad = jax.jit(flat_grad)
  expected = references.multistep_eps(flat_grad, w, flat_grad(w), rho, steps,
                                      normalized=normalized, step_size=step_size,
                                      project=project, nested=nested)
  np.testing.assert_allclose(ravel_pytree(eps)[0], expected, rtol=1e-12, atol=1e-14)
  if project:
    assert float(optax.tree.norm(eps)) <= rho * (1 + 1e-12)
  assert int(state.count) == 1


def test_projection_is_active_and_zero_gradient_is_finite():
  loss = lambda p: jnp.sum(p["w"] ** 2)
  params = {"w": jnp.asarray([3.0, -4.0], jnp.float32)}
  ascent = sam_optax.multistep_ascent(0.1, steps=3, normalized=False, step_size=1.0)
  eps, _ = ascent.update(jax.grad(loss)(params), ascent.init(params), params,
                         grad_fn=jax.grad(loss))
  np.testing.assert_allclose(float(optax.tree.norm(eps)), 0.1, rtol=1e-6)
  zero_fn = lambda p: jax.tree.map(jnp.zeros_like, p)
  for normalized in (True, False):
    ascent = sam_optax.multistep_ascent(0.1, steps=3, normalized=normalized)
    eps, _ = ascent.update(zero_fn(params), ascent.init(params), params, grad_fn=zero_fn)
    assert bool(jnp.all(eps["w"] == 0))


# ----------------------------------------------------------------------------- HUSAM, penalty SAM


def test_husam_hessian_vector_product_matches_jax_hessian():
  problem = problems.mlp(jnp.float64, n=8)
  rho = 0.3
  ascent = sam_optax.hessian_ascent(rho)
  grad_fn = problem.grad_fn()
  grads = grad_fn(problem.params)
  eps, _ = ascent.update(grads, ascent.init(problem.params), problem.params, grad_fn=grad_fn)
  expected = rho * flat_hessian(problem) @ ravel_pytree(grads)[0]
  np.testing.assert_allclose(ravel_pytree(eps)[0], expected, rtol=1e-10, atol=1e-13)
  # And the whole HUSAM step: d = grad L(w + rho H g).
  w, flat_grad, _ = references.flat_problem(problem)
  flat_grad = jax.jit(flat_grad)
  np.testing.assert_allclose(direction(sam_optax.husam(optax.identity(), rho), problem),
                             flat_grad(w + expected), rtol=1e-10, atol=1e-13)


def test_penalty_sam_is_the_gradient_of_the_penalized_loss():
  problem = problems.mlp(jnp.float64, n=8)
  rho = 0.3
  w, unravel = ravel_pytree(problem.params)
  flat_loss = lambda v: problem.loss(unravel(v), problem.batch)
  flat_grad = jax.grad(flat_loss)
  penalty_grad = jax.grad(lambda v: flat_loss(v) + rho / 2 * jnp.sum(flat_grad(v) ** 2))(w)
  ours = direction(sam_optax.penalty_sam(optax.identity(), rho), problem)
  np.testing.assert_allclose(ours, penalty_grad, rtol=1e-10, atol=1e-13)
  g = flat_grad(w)
  np.testing.assert_allclose(ours, g + rho * flat_hessian(problem) @ g, rtol=1e-10, atol=1e-13)
  # The normalized form through the engine: the gradient of L + rho ||grad L||.
  tx = sam_optax.sharpness_aware(optax.identity(), sam_optax.normalized_ascent(rho),
                                 linearize=True)
  expected = jax.grad(lambda v: flat_loss(v) + rho * jnp.linalg.norm(flat_grad(v)))(w)
  np.testing.assert_allclose(direction(tx, problem), expected, rtol=1e-10, atol=1e-13)


def test_penalty_sam_aux_is_taken_at_the_clean_params():
  problem = problems.mlp(jnp.float64)
  tx = sam_optax.penalty_sam(optax.sgd(0.1), rho=0.2, has_aux=True)
  value_and_grad = jax.value_and_grad(problem.loss)
  grad_fn = lambda p: value_and_grad(p, problem.batch)[::-1]
  grads = jax.grad(problem.loss)(problem.params, problem.batch)
  _, _, aux = tx.update_with_aux(grads, tx.init(problem.params), problem.params,
                                 grad_fn=grad_fn)
  np.testing.assert_allclose(float(aux), float(problem.loss(problem.params, problem.batch)),
                             rtol=1e-14)


@pytest.mark.parametrize("make, evaluations", [
    (sam_optax.sam, 1),
    (sam_optax.usam2, 2),
    (sam_optax.husam, 2),          # one Hessian-vector product and the descent gradient
    (sam_optax.penalty_sam, 1),    # one Hessian-vector product, no perturbed gradient
    (functools.partial(sam_optax.multistep_sam, steps=3), 3),
], ids=["sam", "usam2", "husam", "penalty_sam", "multistep_3"])
def test_grad_fn_evaluations_per_step(make, evaluations):
  """Run-time calls of grad_fn per step, beyond the caller's clean gradient (an HVP counts 1)."""
  problem = problems.mlp(jnp.float32)
  calls = []

  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(problem.loss)(p, problem.batch)

  tx = make(optax.sgd(0.1))
  step = jax.jit(lambda p, s: tx.update(jax.grad(problem.loss)(p, problem.batch), s, p,
                                        grad_fn=counted))
  state = tx.init(problem.params)
  for _ in range(2):
    jax.block_until_ready(step(problem.params, state))
  jax.effects_barrier()
  assert len(calls) == 2 * evaluations


# ----------------------------------------------------------------------------- composition


@pytest.mark.parametrize("variant", ["usam2", "husam"])
def test_gradient_evaluating_ascents_respect_the_mask(variant):
  """The inner gradient evaluations see only the masked leaves, the others held fixed."""
  problem = problems.mlp(jnp.float64)
  rho = 0.2
  mask = {"layer0": True, "layer1": False, "scale": True}
  make = getattr(sam_optax, variant)
  ours = direction(make(optax.identity(), rho, mask=mask), problem)
  keep = ravel_pytree(jax.tree.map(lambda m, p: jnp.full(p.shape, m, p.dtype),
                                   {"layer0": {"w": True, "b": True},
                                    "layer1": {"w": False, "b": False}, "scale": True},
                                   problem.params))[0]
  w, grad, _ = references.flat_problem(problem)
  grad = jax.jit(grad)
  g = grad(w)
  if variant == "usam2":
    e1 = rho * keep * g
    eps = rho * keep * grad(w + e1)
  else:
    eps = rho * keep * (flat_hessian(problem) @ (keep * g))
  np.testing.assert_allclose(ours, grad(w + eps), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("average_ascent", [True, False], ids=["global", "per_device"])
def test_gradient_evaluating_ascent_under_data_parallelism(average_ascent):
  """Global USAM2 over 4 shards is USAM2 on the whole batch; per-device USAM2 is m-sharpness."""
  problem = problems.mlp(jnp.float64, n=8)
  grad = jax.grad(problem.loss)
  shards = jax.tree.map(lambda x: x.reshape((4, 2) + x.shape[1:]), problem.batch)
  tx = sam_optax.usam2(optax.sgd(0.1), 0.2, axis_name="data", average_ascent=average_ascent)

  def on_device(batch):
    grad_fn = lambda p: grad(p, batch)
    return tx.update(grad_fn(problem.params), tx.init(problem.params), problem.params,
                     grad_fn=grad_fn)[0]

  ours = jax.tree.map(lambda x: x[0], jax.jit(jax.vmap(on_device, axis_name="data"))(shards))
  if average_ascent:
    single = sam_optax.usam2(optax.sgd(0.1), 0.2)
    expected = jax.jit(lambda p: single.update(grad(p, problem.batch), single.init(p), p,
                                               grad_fn=problem.grad_fn())[0])(problem.params)
  else:
    chunked = sam_optax.usam2(optax.sgd(0.1), 0.2, chunk_size=2)
    expected = jax.jit(lambda p: chunked.update(None, chunked.init(p), p, batch=problem.batch,
                                                grad_fn=grad)[0])(problem.params)
  problems.assert_trees_close(ours, expected, 1e-12)


# ----------------------------------------------------------------------------- optax.MultiSteps


@pytest.mark.parametrize("two_call", [False, True], ids=["one_call", "two_call"])
def test_multisteps_wrapping_raises_and_points_to_sequential_chunks(two_call):
  problem = problems.mlp(jnp.float32)
  tx = optax.MultiSteps(sam_optax.sam(optax.sgd(0.1), two_call=two_call), every_k_schedule=4)
  grads = jax.grad(problem.loss)(problem.params, problem.batch)
  kwargs = {} if two_call else {"grad_fn": problem.grad_fn()}
  state = tx.init(problem.params)
  with pytest.raises(ValueError, match=r'optax.MultiSteps.*chunk_strategy="sequential"'):
    tx.update(grads, state, problem.params, **kwargs)
  with pytest.raises(ValueError, match="MultiSteps"):
    jax.jit(functools.partial(tx.update, **kwargs))(grads, state, problem.params)


def test_multisteps_of_one_is_allowed():
  problem = problems.mlp(jnp.float64)
  sam = sam_optax.sam(optax.sgd(0.1), rho=0.1)
  wrapped = optax.MultiSteps(sam, every_k_schedule=1)
  grads = jax.grad(problem.loss)(problem.params, problem.batch)
  ours, _ = wrapped.update(grads, wrapped.init(problem.params), problem.params,
                           grad_fn=problem.grad_fn())
  expected, _ = sam.update(grads, sam.init(problem.params), problem.params,
                           grad_fn=problem.grad_fn())
  problems.assert_trees_close(ours, expected, 1e-12)


def test_accumulating_grad_fn_gives_sam_on_the_whole_batch():
  """The other remedy the MultiSteps error names: a grad_fn that averages micro-batches."""
  problem = problems.mlp(jnp.float64, n=12)
  micro = jax.tree.map(lambda x: x.reshape((3, 4) + x.shape[1:]), problem.batch)
  grad = jax.grad(problem.loss)

  def accumulated(p):
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), jax.lax.map(lambda b: grad(p, b), micro))

  tx = sam_optax.sam(optax.sgd(0.1), rho=0.1)
  ours, _ = tx.update(accumulated(problem.params), tx.init(problem.params), problem.params,
                      grad_fn=accumulated)
  expected, _ = tx.update(grad(problem.params, problem.batch), tx.init(problem.params),
                          problem.params, grad_fn=problem.grad_fn())
  problems.assert_trees_close(ours, expected, 1e-12)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make", [sam_optax.usam2, sam_optax.husam, sam_optax.penalty_sam,
                                  functools.partial(sam_optax.multistep_sam, steps=2)],
                         ids=["usam2", "husam", "penalty_sam", "multistep"])
def test_one_call_only_variants_refuse_two_call(make):
  with pytest.raises(ValueError, match="needs the one-call form"):
    make(optax.sgd(0.1), two_call=True)


def test_single_step_multistep_has_a_two_call_form():
  problem = problems.mlp(jnp.float64)
  tx = sam_optax.multistep_sam(optax.sgd(0.1), rho=0.1, steps=1, two_call=True)
  params, state = problem.params, tx.init(problem.params)
  for _ in range(2):
    updates, state = tx.update(jax.grad(problem.loss)(params, problem.batch), state, params)
    params = optax.apply_updates(params, updates)
  problems.assert_trees_close(params, problems.trajectory(sam_optax.sam(optax.sgd(0.1), rho=0.1), problem, 1)[-1], 1e-12)


def test_ascents_called_without_grad_fn_explain_themselves():
  params = {"w": jnp.ones(2)}
  for ascent in (sam_optax.hessian_ascent(0.1), sam_optax.multistep_ascent(0.1, steps=2)):
    with pytest.raises(ValueError, match="needs the one-call form.*grad_fn"):
      ascent.update(params, ascent.init(params), params)
  with pytest.raises(ValueError, match="linearize=True.*one-call form"):
    sam_optax.sharpness_aware(optax.sgd(0.1), sam_optax.unnormalized_ascent(0.1),
                              linearize=True, two_call=True)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": 0}, ValueError, "steps must be >= 1"),
    ({"steps": 2.0}, TypeError, "steps must be a Python int"),
    ({"normalized": 1}, TypeError, "normalized must be a Python bool"),
    ({"step_size": -0.1}, ValueError, "step_size must be >= 0"),
    ({"rho": -0.1}, ValueError, "rho must be >= 0"),
])
def test_multistep_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    sam_optax.multistep_sam(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize("make", [sam_optax.usam2, sam_optax.husam, sam_optax.penalty_sam,
                                  sam_optax.dnsam])
def test_negative_rho_is_rejected(make):
  with pytest.raises(ValueError, match="rho must be >= 0"):
    make(optax.sgd(0.1), rho=-1.0)
