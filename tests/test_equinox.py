"""sam_optax.equinox: SAM on Equinox models, against a SAM step written by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

eqx = pytest.importorskip("equinox")

import sam_optax  # noqa: E402
import sam_optax.equinox  # noqa: E402
from tests import test_docs  # noqa: E402

RHO, LR, STEPS = 0.05, 0.1, 5


def problem():
  model = eqx.nn.MLP(3, 1, 8, 2, activation=jax.nn.tanh, key=jax.random.key(0))
  model = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model)
  x = jax.random.normal(jax.random.key(1), (16, 3), jnp.float32)
  return model, x, jnp.sin(x[:, :1])


def loss(model, x, y):
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def handwritten_sam(model, x, y):
  """SAM around plain SGD in jax.numpy on the model's arrays: eps = rho g/||g||, w -= lr g_adv."""
  params, static = eqx.partition(model, eqx.is_inexact_array)
  at = lambda p: loss(eqx.combine(p, static), x, y)

  @jax.jit
  def step(params):
    g = jax.grad(at)(params)
    norm = jnp.sqrt(sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(g)))
    g_adv = jax.grad(at)(jax.tree.map(lambda w, gi: w + RHO * gi / norm, params, g))
    return jax.tree.map(lambda w, gi: w - LR * gi, params, g_adv)

  for _ in range(STEPS):
    params = step(params)
  return eqx.combine(params, static)


def test_filter_grad_fn_step_matches_handwritten_sam():
  model, x, y = problem()
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO)
  state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def step(model, state):
    grads = eqx.filter_grad(loss)(model, x, y)
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_inexact_array),
                               grad_fn=sam_optax.equinox.filter_grad_fn(loss, model, x, y))
    return eqx.apply_updates(model, updates), state

  for _ in range(STEPS):
    model, state = step(model, state)
  expected = handwritten_sam(problem()[0], x, y)
  got, want = (jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array)) for m in (model, expected))
  assert len(got) == len(want) == 6
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(loss(model, x, y)) < float(loss(problem()[0], x, y))


def test_filtered_params_alone_fail_as_users_report():
  """What users meet without the helper: the perturbed pass calls a model whose activation is
  None. The guide explains this error; the helper is the fix."""
  model, x, y = problem()
  params = eqx.filter(model, eqx.is_array)
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO)
  with pytest.raises(TypeError, match="'NoneType' object is not callable"):
    tx.update(eqx.filter_grad(loss)(model, x, y), tx.init(params), params,
              grad_fn=lambda p: eqx.filter_grad(loss)(p, x, y))


def test_has_aux_returns_the_perturbed_pass_aux():
  model, x, y = problem()
  params = eqx.filter(model, eqx.is_inexact_array)
  loss_aux = lambda m, x, y: (loss(m, x, y), {"loss": loss(m, x, y)})
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, has_aux=True)
  grads = eqx.filter_grad(loss)(model, x, y)
  fn = sam_optax.equinox.filter_grad_fn(loss_aux, model, x, y, has_aux=True)
  updates, _, aux = tx.update_with_aux(grads, tx.init(params), params, grad_fn=fn)
  assert float(aux["loss"]) > float(loss(model, x, y))  # the loss at w + eps, uphill
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_a_narrower_filter_freezes_the_rest():
  """Only the last layer trained: the frozen layers are static, perturbed and updated never."""
  model, x, y = problem()
  spec = jax.tree.map(lambda _: False, model)
  spec = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), spec, (True, True))
  params, static = eqx.partition(model, spec)
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO)
  grads = jax.grad(lambda p: loss(eqx.combine(p, static), x, y))(params)
  fn = sam_optax.equinox.filter_grad_fn(loss, model, x, y, filter_spec=spec)
  updates, _ = tx.update(grads, tx.init(params), params, grad_fn=fn)
  new = eqx.apply_updates(model, updates)
  assert jnp.array_equal(new.layers[0].weight, model.layers[0].weight)
  assert not jnp.array_equal(new.layers[-1].weight, model.layers[-1].weight)


def test_bad_arguments_raise():
  model, x, y = problem()
  with pytest.raises(TypeError, match="loss_fn must be a function"):
    sam_optax.equinox.filter_grad_fn("loss", model, x, y)
  with_int = (model, jnp.arange(3))
  with pytest.raises(ValueError, match=r"not floating-point arrays: \[1\]"):
    sam_optax.equinox.filter_grad_fn(lambda m: 0.0, with_int, filter_spec=eqx.is_array)


def test_docstring_has_every_section():
  test_docs.test_public_function_docstring_has_every_section(
      "sam_optax.equinox.filter_grad_fn", sam_optax.equinox.filter_grad_fn)
