"""Element-wise, stateful masks: a gradient-score mask written here, against a plain-jnp reference.

The mask keeps the top fraction of all entries (one global top-k over every leaf) by the score
g^2, recomputed every T steps and kept in its state in between; the ascent and its norm see the
kept entries only and eps is zero elsewhere, in both forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
Mask = sam_optax.Mask
from tests import problems

RHO, LR, STEPS, PERIOD, KEEP = 0.1, 0.05, 6, 2, 3
# float32 joins float64 in the full suite; the fast tier keeps float64 (the tighter tolerance).
DTYPES = pytest.mark.parametrize("dtype", [
    pytest.param(jnp.float32, id="f32", marks=pytest.mark.slow),
    pytest.param(jnp.float64, id="f64")])
FORMS = pytest.mark.parametrize("two_call", [False, True], ids=["one_call", "two_call"])


def top_entries(scores, k):
  """Bools shaped like `scores`: True on the k largest entries over all leaves."""
  flat = jnp.concatenate([s.ravel() for s in jax.tree.leaves(scores)])
  threshold = jax.lax.top_k(flat, k)[0][-1]
  return jax.tree.map(lambda s: s >= threshold, scores)


def score_mask(period, k):
  """Keeps the top-k entries by g^2, recomputed every `period` steps."""
  def init(params):
    return jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)

  def update(grads, mask, params, *, count, **_):
    del params
    fresh = top_entries(jax.tree.map(jnp.square, grads), k)
    mask = jax.tree.map(lambda f, m: jnp.where(count % period == 0, f, m), fresh, mask)
    return mask, mask

  return Mask(init, update, reads_grads=True)


loss, initial = problems.two_leaf_loss, problems.two_leaf_params


def reference(dtype):
  grad = jax.jit(jax.grad(loss))
  w, mask = initial(dtype), None
  for t in range(STEPS):
    g = grad(w)
    if t % PERIOD == 0:
      mask = top_entries(jax.tree.map(jnp.square, g), KEEP)
    gm = jax.tree.map(lambda x, m: jnp.where(m, x, 0), g, mask)
    norm = jnp.sqrt(sum(jnp.sum(x.astype(jnp.float64) ** 2) for x in jax.tree.leaves(gm)))
    eps = jax.tree.map(lambda x: (RHO * x / norm).astype(dtype), gm)
    d = grad(jax.tree.map(jnp.add, w, eps))
    w = jax.tree.map(lambda x, dx: x - LR * dx, w, d)
  return w, eps


@DTYPES
@FORMS
def test_gradient_score_mask(dtype, two_call):
  tx = sam_optax.sharpness_aware(optax.sgd(LR), sam_optax.normalized_ascent(RHO),
                                 mask=score_mask(PERIOD, KEEP), two_call=two_call)

  @jax.jit
  def step(p, s):
    if two_call:
      u, s = tx.update(jax.grad(loss)(p), s, p)  # ascent call: u is eps
      eps = u
      p = optax.apply_updates(p, u)
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s, eps
    u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))
    return optax.apply_updates(p, u), s, None

  p = initial(dtype)
  s = tx.init(p)
  for _ in range(STEPS):
    p, s, eps = step(p, s)
  expected, expected_eps = reference(dtype)
  tol = 1e-5 if dtype == jnp.float32 else 1e-12
  for a, e in zip(jax.tree.leaves(p), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)
  kept = sum(int(jnp.sum(m)) for m in jax.tree.leaves(s.mask_state))
  assert kept == KEEP
  if two_call:  # eps is zero outside the mask, the last step's
    for x, e in zip(jax.tree.leaves(eps), jax.tree.leaves(expected_eps)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(e), rtol=tol, atol=tol)
