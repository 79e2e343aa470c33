"""K-SAM's data selection (`top_k_examples`): the sub-batch, its errors, and SAM on it against a
plain-jnp reference (selection by argsort, both gradients on the subset, heavy-ball SGD)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

N, K, D, H = 8, 3, 4, 5


def per_example_loss(params, batch):
  """A two-layer tanh net with squared error: the losses of distinct examples differ."""
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return (hidden @ params["w2"] - batch["y"]) ** 2


def problem(dtype, steps=1, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {"w1": jax.random.normal(keys[0], (D, H), dtype) / 2,
            "b1": jax.random.normal(keys[1], (H,), dtype) / 4,
            "w2": jax.random.normal(keys[2], (H,), dtype)}
  batches = {"x": jax.random.normal(keys[3], (steps, N, D), dtype),
             "y": jax.random.normal(keys[4], (steps, N), dtype)}
  return params, batches


def test_top_k_examples_keeps_the_highest_losses_of_every_leaf():
  params, batches = problem(jnp.float64)
  batch = jax.tree.map(lambda x: x[0], batches)
  sub = jax.jit(lambda p, b: sam_optax.top_k_examples(per_example_loss, p, b, K))(params, batch)
  losses = np.asarray(per_example_loss(params, batch))
  chosen = np.argsort(-losses, kind="stable")[:K]  # independent of lax.top_k
  assert len(set(losses.tolist())) == N  # distinct losses: the selection is unambiguous
  for name in ("x", "y"):
    np.testing.assert_array_equal(np.asarray(sub[name]), np.asarray(batch[name])[chosen])
    assert sub[name].dtype == batch[name].dtype
  # k = n keeps every example (sorted by loss), so a mean over the sub-batch is the batch's mean.
  whole = sam_optax.top_k_examples(per_example_loss, params, batch, N)
  np.testing.assert_allclose(per_example_loss(params, whole).mean(),
                             per_example_loss(params, batch).mean(), rtol=1e-14)


def test_top_k_examples_selects_non_finite_losses_first():
  params, batches = problem(jnp.float32)
  batch = jax.tree.map(lambda x: x[0], batches)
  # 0 * inf: the NaN an invalid operation yields (negative on x86; lax.top_k would rank it last).
  broken = dict(batch, y=batch["y"].at[5].set(jnp.zeros((), jnp.float32) * jnp.inf))
  sub = jax.jit(lambda b: sam_optax.top_k_examples(per_example_loss, params, b, 1))(broken)
  assert np.isnan(np.asarray(sub["y"])).all()
  broken = dict(batch, y=batch["y"].at[2].set(-jnp.inf))
  sub = sam_optax.top_k_examples(per_example_loss, params, broken, 1)
  np.testing.assert_array_equal(np.asarray(sub["x"]), np.asarray(batch["x"])[2:3])


@pytest.mark.parametrize("k", [0, N + 1, -1, 2.0, True, None])
def test_top_k_examples_rejects_k_out_of_range(k):
  params, batches = problem(jnp.float32)
  batch = jax.tree.map(lambda x: x[0], batches)
  with pytest.raises(ValueError, match=r"k must be a Python int in \[1, 8\]"):
    sam_optax.top_k_examples(per_example_loss, params, batch, k)


def test_top_k_examples_rejects_malformed_batches():
  params, batches = problem(jnp.float32)
  batch = jax.tree.map(lambda x: x[0], batches)
  with pytest.raises(ValueError, match="share the leading example axis"):
    sam_optax.top_k_examples(per_example_loss, params, dict(batch, y=batch["y"][:-1]), K)
  for bad in ({}, dict(batch, y=jnp.zeros(()))):
    with pytest.raises(ValueError, match="leading example axis"):
      sam_optax.top_k_examples(per_example_loss, params, bad, K)
  with pytest.raises(ValueError, match=r"one loss per example, shape \(8,\)"):
    sam_optax.top_k_examples(lambda p, b: per_example_loss(p, b).mean(), params, batch, K)


def reference_ksam(params, batches, k, rho, lr, momentum):
  """K-SAM in plain jnp: rank by loss (argsort), SAM's two gradients on the top k, heavy ball."""
  def subset_loss(p, batch, chosen):
    return per_example_loss(p, jax.tree.map(lambda x: x[chosen], batch)).mean()

  def step(carry, batch):
    w, m = carry
    chosen = jnp.argsort(-per_example_loss(w, batch))[:k]
    g = jax.grad(subset_loss)(w, batch, chosen)
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda a, b: a + rho * b / norm, w, g)
    d = jax.grad(subset_loss)(perturbed, batch, chosen)
    m = jax.tree.map(lambda a, b: momentum * a + b, m, d)
    return (jax.tree.map(lambda a, b: a - lr * b, w, m), m), None

  (w, _), _ = jax.lax.scan(step, (params, jax.tree.map(jnp.zeros_like, params)), batches)
  return w


def library_ksam(params, batches, rho, lr, momentum):
  tx = sam_optax.sam(optax.sgd(lr, momentum=momentum), rho=rho)
  loss = lambda p, b: per_example_loss(p, b).mean()

  def step(carry, batch):
    w, state = carry
    sub = sam_optax.top_k_examples(per_example_loss, w, batch, K)
    updates, state = tx.update(jax.grad(loss)(w, sub), state, w,
                               grad_fn=lambda p: jax.grad(loss)(p, sub))
    return (optax.apply_updates(w, updates), state), None

  (w, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
  return w


@pytest.mark.slow  # one jitted function per dtype; the selection is checked in the fast tier
@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-12), (jnp.float32, 2e-5)])
def test_sam_on_top_k_examples_matches_reference(dtype, rtol):
  params, batches = problem(dtype, steps=5, seed=1)
  hp = dict(rho=0.05, lr=0.1, momentum=0.9)
  got, want, whole_batch_sam = jax.jit(lambda p, b: (
      library_ksam(p, b, **hp), reference_ksam(p, b, K, **hp), reference_ksam(p, b, N, **hp)))(
          params, batches)
  for name in params:
    assert got[name].dtype == dtype
    assert float(jnp.max(jnp.abs(want[name] - params[name]))) > 1e-3  # every leaf moved
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=rtol,
                               atol=rtol)
  # SAM on the whole batch ends elsewhere: the selection matters, so the check can fail.
  assert not np.allclose(np.asarray(got["w2"]), np.asarray(whole_batch_sam["w2"]), rtol=1e-3)
