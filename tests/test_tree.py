"""The pytree helpers that do more than their `optax.tree` counterparts keep doing it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_optax._src import tree


def _params():
  return {"w": jnp.asarray([-0.0, 1.5, 200.0], jnp.bfloat16),
          "b": jnp.asarray([-0.0, 0.25], jnp.float32),
          "c": jnp.asarray([3.0, -1.0 / 3.0], jnp.float64)}


def _perturbation():
  return {"w": jnp.asarray([-0.0, 2.0 ** -9, 0.6], jnp.float32),
          "b": jnp.asarray([-0.0, 1e-9], jnp.float64),
          "c": jnp.asarray([1e-17, 0.5], jnp.float64)}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_add_and_sub_keep_the_first_trees_dtypes(jit):
  # params + a wider perturbation stay in the params' dtypes (optax.tree.add promotes), and a
  # -0.0 entry keeps its sign (optax.tree.add's leading `0 +` drops it op by op).
  a, b = _params(), _perturbation()
  add, sub = (jax.jit(tree.add), jax.jit(tree.sub)) if jit else (tree.add, tree.sub)
  for name in a:
    x, y = a[name], b[name]
    for got, want in ((add(a, b)[name], x + y.astype(x.dtype)),
                      (sub(a, b)[name], x - y.astype(x.dtype))):
      assert got.dtype == x.dtype
      np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(want, np.float64))
      np.testing.assert_array_equal(np.signbit(np.asarray(got, np.float64)),
                                    np.signbit(np.asarray(want, np.float64)))
  assert np.signbit(np.asarray(add(a, b)["w"][0], np.float64))


def test_scale_multiplies_in_the_wider_dtype_and_keeps_the_leafs():
  # A Python float traced by jit is weakly typed: optax.tree.scale would round it to bfloat16
  # (and multiply a float32 leaf in float32); tree.scale multiplies in the factor's dtype.
  factor = 1.0 + 3.0 * 2.0 ** -9  # between two bfloat16 numbers
  got = jax.jit(lambda f, t: tree.scale(jnp.asarray(f), t))(factor, _params())
  for name, x in _params().items():
    wide = np.asarray(x, np.float64)
    want = jnp.asarray(np.float64(factor) * wide).astype(x.dtype)
    assert got[name].dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got[name], np.float64), np.asarray(want, np.float64))
  assert float(got["w"][2]) == 201.0  # 200 * 1.00586 in float32, then bfloat16 (202 otherwise)


def test_select_and_cast_like_match_plain_jnp():
  a, b = _params(), _perturbation()
  for pred in (True, False):
    got = jax.jit(tree.select)(jnp.asarray(pred), a, optax.tree.cast_like(b, a))
    for name in a:
      want = a[name] if pred else b[name].astype(a[name].dtype)
      assert got[name].dtype == a[name].dtype
      np.testing.assert_array_equal(np.asarray(got[name], np.float64),
                                    np.asarray(want, np.float64))
