"""Functional-SAM (`functional_grad_fn`): its two exact properties (a loss linear in the outputs
gives SAM, a model linear in the params gives the clean gradient), `sam` and `asam` on it
against plain-jnp references (the Jacobian by `jacrev`, contracted by hand with a hand-written
cross-entropy derivative), the two-call form, its aux, and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

N, D, H, C, STEPS = 6, 3, 4, 3, 4


def mlp(params, x):
  """A two-layer tanh net: logits of shape (N, C), nonlinear in every leaf."""
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def linear(params, x):
  """A model linear in its params: its Jacobian is the same at every point."""
  return x @ params["w"] + params["b"]


def cross_entropy(logits, y):
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
      logits, y[:, None], axis=-1)[:, 0])


def cross_entropy_grad(logits, y):
  """d cross_entropy / d logits, by hand: (softmax - one-hot) / N."""
  p = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
  return (p - jax.nn.one_hot(y, C, dtype=logits.dtype)) / logits.shape[0]


def problem(dtype, model=mlp, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 7)
  if model is mlp:
    params = {"w1": jax.random.normal(keys[0], (D, H), dtype),
              "b1": jax.random.normal(keys[1], (H,), dtype) / 2,
              "w2": jax.random.normal(keys[2], (H, C), dtype),
              "b2": jax.random.normal(keys[3], (C,), dtype) / 2}
  else:
    params = {"w": jax.random.normal(keys[0], (D, C), dtype),
              "b": jax.random.normal(keys[1], (C,), dtype) / 2}
  batches = (jax.random.normal(keys[4], (STEPS, N, D), dtype),
             jax.random.randint(keys[5], (STEPS, N), 0, C))
  return params, batches


def global_norm(tree_):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree_)))


def sam_eps(rho):
  return lambda w, g: jax.tree.map(lambda a: rho * a / global_norm(g), g)


def asam_eps(rho, eta):
  def eps(w, g):
    t = jax.tree.map(lambda a: jnp.abs(a) + eta, w)
    scale = rho / global_norm(jax.tree.map(lambda a, b: a * b, t, g))
    return jax.tree.map(lambda a, b: scale * a ** 2 * b, t, g)
  return eps


def reference(params, batches, eps_fn, lr, momentum, functional=True):
  """Plain jnp: `g = grad L(w)`, `eps = eps_fn(w, g)`, then (Functional-SAM)
  `d = J_F(w + eps)^T delta` with `delta` the hand-written derivative at the clean logits and
  the full Jacobian from `jacrev`, contracted over the outputs' axes; or (SAM) `d = grad L(w +
  eps)`. Heavy-ball SGD on `d`."""
  def step(carry, batch):
    w, m = carry
    x, y = batch
    g = jax.grad(lambda p: cross_entropy(mlp(p, x), y))(w)
    perturbed = jax.tree.map(jnp.add, w, eps_fn(w, g))
    if functional:
      delta = cross_entropy_grad(mlp(w, x), y)
      jacobian = jax.jacrev(mlp)(perturbed, x)  # leaves of shape (N, C) + leaf shape
      d = jax.tree.map(lambda j: jnp.tensordot(delta, j, axes=2), jacobian)
    else:
      d = jax.grad(lambda p: cross_entropy(mlp(p, x), y))(perturbed)
    m = jax.tree.map(lambda a, b: momentum * a + b, m, d)
    return (jax.tree.map(lambda a, b: a - lr * b, w, m), m), None

  (w, _), _ = jax.lax.scan(step, (params, jax.tree.map(jnp.zeros_like, params)), batches)
  return w


def run(tx, params, batches, grads_and_grad_fn):
  """`tx` over the batches, with the clean gradient and grad_fn of `grads_and_grad_fn(w, x, y)`."""
  def step(carry, batch):
    w, state = carry
    grads, grad_fn = grads_and_grad_fn(w, *batch)
    updates, state = tx.update(grads, state, w, grad_fn=grad_fn)
    return (optax.apply_updates(w, updates), state), None

  (w, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
  return w


def functional_from_clean_pass(model, output_loss):
  """The Functional-SAM recipe of docs/variants.md: `g` and `delta` from one forward pass and one
  VJP at `w`."""
  def grads_and_grad_fn(w, x, y):
    apply_fn, loss_fn = lambda p: model(p, x), lambda f: output_loss(f, y)
    outputs, pullback = jax.vjp(apply_fn, w)
    delta = jax.grad(loss_fn)(outputs)
    grad_fn = sam_optax.functional_grad_fn(apply_fn, loss_fn, w, output_grads=delta)
    return pullback(delta)[0], grad_fn
  return grads_and_grad_fn


def functional_default(model, output_loss):
  """`delta` computed by the helper (its own forward pass at `w`)."""
  def grads_and_grad_fn(w, x, y):
    apply_fn, loss_fn = lambda p: model(p, x), lambda f: output_loss(f, y)
    grads = jax.grad(lambda p: loss_fn(apply_fn(p)))(w)
    return grads, sam_optax.functional_grad_fn(apply_fn, loss_fn, w)
  return grads_and_grad_fn


def plain(model, output_loss):
  """SAM's own perturbed pass: the gradient of the whole loss."""
  def grads_and_grad_fn(w, x, y):
    grad = jax.grad(lambda p: output_loss(model(p, x), y))
    return grad(w), grad
  return grads_and_grad_fn


def assert_close(got, want, rtol, atol):
  for name in want:
    assert got[name].dtype == want[name].dtype
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=rtol,
                               atol=atol, err_msg=name)


def max_difference(a, b):
  return max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a)


@pytest.mark.slow  # one jitted function: both properties over several steps, float64
def test_linear_loss_gives_sam_and_linear_model_gives_the_clean_gradient():
  hp = dict(learning_rate=0.1, momentum=0.9)
  mlp_params, mlp_batches = problem(jnp.float64, mlp, seed=1)
  lin_params, lin_batches = problem(jnp.float64, linear, seed=2)
  weights = jax.random.normal(jax.random.PRNGKey(3), (N, C), jnp.float64)
  linear_loss = lambda logits, y: jnp.sum(weights * logits) / N  # l linear in F

  def everything(mlp_params, mlp_batches, lin_params, lin_batches):
    sam = sam_optax.sam(optax.sgd(**hp), rho=0.2)
    return (
        # a loss linear in the outputs: Functional-SAM is SAM
        run(sam, mlp_params, mlp_batches, functional_from_clean_pass(mlp, linear_loss)),
        run(sam, mlp_params, mlp_batches, plain(mlp, linear_loss)),
        # a model linear in the params: Functional-SAM is the inner optimizer on g
        run(sam, lin_params, lin_batches, functional_from_clean_pass(linear, cross_entropy)),
        run(optax.with_extra_args_support(optax.sgd(**hp)), lin_params, lin_batches,
            lambda w, x, y: (jax.grad(lambda p: cross_entropy(linear(p, x), y))(w), None)),
        run(sam, lin_params, lin_batches, plain(linear, cross_entropy)))

  functional_linear_loss, sam_linear_loss, functional_linear_model, inner, sam_linear_model = (
      jax.jit(everything)(mlp_params, mlp_batches, lin_params, lin_batches))
  assert_close(functional_linear_loss, sam_linear_loss, rtol=1e-13, atol=1e-14)
  assert max_difference(sam_linear_loss, mlp_params) > 1e-2  # the params moved
  assert_close(functional_linear_model, inner, rtol=1e-13, atol=1e-14)
  # SAM on the linear model does not give the clean gradient: the property can fail.
  assert max_difference(sam_linear_model, inner) > 1e-4


@pytest.mark.slow  # one jitted function per dtype
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 2e-6)])
def test_sam_and_asam_on_functional_grad_fn_match_references(dtype, tol):
  params, batches = problem(dtype)
  hp = dict(lr=0.1, momentum=0.9)
  inner = optax.sgd(hp["lr"], momentum=hp["momentum"])
  rho, asam_rho, eta = 0.2, 0.5, 0.01

  def everything(params, batches):
    return (
        run(sam_optax.sam(inner, rho=rho), params, batches,
            functional_from_clean_pass(mlp, cross_entropy)),
        reference(params, batches, sam_eps(rho), **hp),
        run(sam_optax.asam(inner, rho=asam_rho, eta=eta), params, batches,
            functional_default(mlp, cross_entropy)),
        reference(params, batches, asam_eps(asam_rho, eta), **hp),
        reference(params, batches, sam_eps(rho), **hp, functional=False))

  functional_sam, want_sam, functional_asam, want_asam, plain_sam = (
      jax.jit(everything)(params, batches))
  assert_close(functional_sam, want_sam, rtol=tol, atol=tol)
  assert_close(functional_asam, want_asam, rtol=tol, atol=tol)
  assert max_difference(want_sam, params) > 1e-2
  # Functional-SAM is not SAM here (nonlinear loss and model): the comparison can fail.
  assert max_difference(want_sam, plain_sam) > 1e-3  # measured 0.014 (float64), 0.027 (float32)


@pytest.mark.slow  # one jitted function
def test_has_aux_returns_the_perturbed_forward_pass_aux():
  params, batches = problem(jnp.float64)
  x, y = jax.tree.map(lambda a: a[0], batches)
  rho = 0.2

  def step(params):
    apply_fn = lambda p: (mlp(p, x), jnp.mean(mlp(p, x) ** 2))  # an aux of the forward pass
    loss_fn = lambda f: cross_entropy(f, y)
    grads = jax.grad(lambda p: loss_fn(apply_fn(p)[0]))(params)
    with_aux = sam_optax.sam(optax.sgd(0.1), rho=rho, has_aux=True)
    updates, _, aux = with_aux.update_with_aux(
        grads, with_aux.init(params), params,
        grad_fn=sam_optax.functional_grad_fn(apply_fn, loss_fn, params, has_aux=True))
    without = sam_optax.sam(optax.sgd(0.1), rho=rho)
    want, _ = without.update(grads, without.init(params), params,
                             grad_fn=functional_default(mlp, cross_entropy)(params, x, y)[1])
    perturbed = jax.tree.map(lambda w, g: w + rho * g / global_norm(grads), params, grads)
    return updates, want, aux, jnp.mean(mlp(perturbed, x) ** 2)

  updates, want, aux, want_aux = jax.jit(step)(params)
  assert_close(updates, want, rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(float(aux), float(want_aux), rtol=1e-13)


def test_functional_grad_fn_rejects_malformed_inputs():
  params, batches = problem(jnp.float32)
  x, y = jax.tree.map(lambda a: a[0], batches)
  apply_fn, loss_fn = lambda p: mlp(p, x), lambda f: cross_entropy(f, y)
  with pytest.raises(TypeError, match="apply_fn must be a function"):
    sam_optax.functional_grad_fn(None, loss_fn, params)
  with pytest.raises(TypeError, match="output_loss must be a function"):
    sam_optax.functional_grad_fn(apply_fn, "xent", params)
  with pytest.raises(ValueError, match="output_loss must return a scalar"):
    sam_optax.functional_grad_fn(apply_fn, lambda f: f.sum(axis=-1), params)
  with pytest.raises(TypeError, match="outputs must be floats"):
    sam_optax.functional_grad_fn(lambda p: jnp.argmax(mlp(p, x), -1), loss_fn, params)
  with pytest.raises(ValueError, match=r"output_grads has shape \(6, 2\)"):
    sam_optax.functional_grad_fn(apply_fn, loss_fn, params, output_grads=jnp.zeros((N, 2)))
  with pytest.raises(ValueError, match="output_grads does not have the structure"):
    sam_optax.functional_grad_fn(apply_fn, loss_fn, params, output_grads={"f": jnp.zeros((N, C))})
  with pytest.raises(ValueError, match="must return a pair"):
    sam_optax.functional_grad_fn(apply_fn, loss_fn, params, has_aux=True)
  with pytest.raises(TypeError, match="has_aux must be a bool"):
    sam_optax.functional_grad_fn(apply_fn, loss_fn, params, has_aux=1)


@pytest.mark.slow  # one jitted function
def test_two_call_form_with_the_helper_built_at_the_clean_params_matches_one_call():
  params, batches = problem(jnp.float64)
  inner = optax.sgd(0.1, momentum=0.9)
  one_call, two_call = sam_optax.sam(inner, rho=0.2), sam_optax.sam(inner, rho=0.2, two_call=True)

  def two_call_run(params, batches):
    def step(carry, batch):
      w, state = carry
      x, y = batch
      apply_fn, loss_fn = lambda p: mlp(p, x), lambda f: cross_entropy(f, y)
      grad_fn = sam_optax.functional_grad_fn(apply_fn, loss_fn, w)  # at the clean params
      updates, state = two_call.update(grad_fn(w), state, w)  # ascent call: w -> w + eps
      perturbed = optax.apply_updates(w, updates)
      updates, state = two_call.update(grad_fn(perturbed), state, perturbed)  # descent call
      return (optax.apply_updates(perturbed, updates), state), None

    (w, _), _ = jax.lax.scan(step, (params, two_call.init(params)), batches)
    return w

  got, want, plain_sam = jax.jit(lambda p, b: (
      two_call_run(p, b), run(one_call, p, b, functional_from_clean_pass(mlp, cross_entropy)),
      run(one_call, p, b, plain(mlp, cross_entropy))))(params, batches)
  assert_close(got, want, rtol=1e-12, atol=1e-12)
  assert max_difference(want, plain_sam) > 1e-3
