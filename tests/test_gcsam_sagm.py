"""Issue 16: GCSAM, SAGM and big_vision's GSAM options, beyond the catalogue's shared tests.

The catalogue (tests/catalogue.py) runs gcsam, sagm and gsam with both big_vision options on
through every shared test against the references in tests/field_references.py; here are the
other option combinations, GCSAM's axes, the pieces' exact values, and the construction checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import field_references as fref
from tests import problems, references
from tests.catalogue import GSAM_LR

TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}
STEPS = 12


# ------------------------------------------------------------------------- big_vision's GSAM


@pytest.mark.slow
@pytest.mark.parametrize("adaptive_perturbation, minimize_fp, dtype", [
    (True, True, jnp.float64), (False, False, jnp.float64), (False, False, jnp.float32)],
    ids=["adaptive-min_fp-f64", "plain-min_f-f64", "plain-min_f-f32"])
def test_gsam_options_match_big_vision(adaptive_perturbation, minimize_fp, dtype):
  problem = problems.mlp(dtype)
  tx = sam_optax.gsam(optax.sgd(0.1, momentum=0.9), rho_max=0.3, rho_min=0.05, alpha=0.4,
                      learning_rate=GSAM_LR, lr_max=0.1, lr_min=0.01,
                      adaptive_perturbation=adaptive_perturbation, minimize_fp=minimize_fp)
  ours = problems.trajectory(tx, problem, STEPS)
  rho = fref.gsam_rho(fref.warmup_cosine(0.0, 0.1, 5, 20, 0.01), 0.3, 0.05, 0.1, 0.01)
  expected = references.run(
      problem, fref.big_vision_gsam_direction(rho, 0.4, adaptive_perturbation, minimize_fp),
      STEPS)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[dtype])


def test_minimize_fp_false_keeps_the_clean_gradient_and_adds_the_orthogonal_part():
  fix = sam_optax.surrogate_gap(0.5, minimize_fp=False)
  g = {"a": jnp.asarray([3.0, 0.0], jnp.float64), "b": jnp.asarray([4.0], jnp.float64)}
  g_adv = {"a": jnp.asarray([3.0, 2.0], jnp.float64), "b": jnp.asarray([-1.0], jnp.float64)}
  d, _ = fix.update(g_adv, fix.init(g), None, clean_grads=g)
  # u = (0.6, 0, 0.8); <g_adv, u> = 1; g_adv_perp = (3 - 0.6, 2, -1 - 0.8).
  np.testing.assert_allclose(d["a"], [3.0 + 0.5 * 2.4, 1.0], rtol=1e-14)
  np.testing.assert_allclose(d["b"], [4.0 - 0.5 * 1.8], rtol=1e-14)
  same, _ = fix.update(g, fix.init(g), None, clean_grads=g)  # g_adv = g: d = g exactly
  for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(g)):
    np.testing.assert_array_equal(x, y)


def test_weight_scaled_ascent_is_elementwise_abs_w_times_sam():
  ascent = sam_optax.weight_scaled_ascent(0.2)
  params = {"w": jnp.asarray([[1.0, -2.0], [0.0, 0.5]], jnp.float64),
            "b": jnp.asarray([-3.0], jnp.float64)}
  g = {"w": jnp.asarray([[1.0, 2.0], [2.0, 0.0]], jnp.float64),
       "b": jnp.asarray([4.0], jnp.float64)}
  eps, _ = ascent.update(g, ascent.init(params), params)  # ||g|| = 5
  np.testing.assert_allclose(eps["w"], [[0.04, 0.16], [0.0, 0.0]], rtol=1e-15)
  np.testing.assert_allclose(eps["b"], [0.48], rtol=1e-15)
  with pytest.raises(ValueError, match="needs the params"):
    ascent.update(g, ascent.init(params))


# ------------------------------------------------------------------------------------ GCSAM


def test_centralized_ascent_values_and_raw_norm():
  ascent = sam_optax.centralized_ascent(rho=0.5)
  g = {"conv": jnp.arange(24.0, dtype=jnp.float64).reshape(2, 3, 2, 2) ** 1.5,
       "dense": jnp.asarray([[1.0, -2.0, 0.5], [3.0, 0.0, 1.0]], jnp.float64),
       "bias": jnp.asarray([1.0, 2.0], jnp.float64), "scale": jnp.asarray(3.0, jnp.float64)}
  eps, _ = ascent.update(g, ascent.init(g))
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  factor = 0.5 / np.linalg.norm(flat)  # the raw gradient's norm
  conv, dense = np.asarray(g["conv"]), np.asarray(g["dense"])
  np.testing.assert_allclose(eps["conv"], factor * (conv - conv.mean(axis=(0, 1, 2))),
                             rtol=1e-13, atol=1e-14)
  np.testing.assert_allclose(eps["dense"], factor * (dense - dense.mean(axis=0)), rtol=1e-13)
  np.testing.assert_allclose(eps["bias"], factor * np.asarray(g["bias"]), rtol=1e-15)
  np.testing.assert_allclose(eps["scale"], factor * 3.0, rtol=1e-15)
  np.testing.assert_allclose(np.asarray(eps["dense"]).sum(axis=0), 0.0, atol=1e-15)
  zero, _ = ascent.update(jax.tree.map(jnp.zeros_like, g), ascent.init(g))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))


def _torch_layout(g):  # PyTorch's (out, in, ...) layout: average over dims 1..
  return tuple(range(1, g.ndim)) if g.ndim >= 2 else ()


@pytest.mark.slow
def test_gcsam_with_overridden_axes_matches_reference():
  problem = problems.mlp(jnp.float64)
  tx = sam_optax.gcsam(optax.sgd(0.1, momentum=0.9), rho=0.1, axes=_torch_layout)
  ours = problems.trajectory(tx, problem, STEPS)
  expected = references.run(
      problem, fref.gcsam_direction(0.1, lambda shape: tuple(range(1, len(shape)))
                                    if len(shape) >= 2 else ()), STEPS)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[jnp.float64])


def test_centralized_ascent_checks_its_axes():
  with pytest.raises(TypeError, match="axes must be None or a function"):
    sam_optax.gcsam(optax.sgd(0.1), axes=(0,))  # pyright: ignore[reportArgumentType]
  g = {"w": jnp.ones((2, 3))}
  ascent = sam_optax.centralized_ascent(0.1, axes=lambda x: (2,))
  with pytest.raises(ValueError, match="each axis"):
    ascent.update(g, ascent.init(g))
  ascent = sam_optax.centralized_ascent(0.1, axes=lambda x: "rows")
  with pytest.raises(TypeError, match="tuple of ints"):
    ascent.update(g, ascent.init(g))


# ------------------------------------------------------------------------------------- SAGM


def test_sagm_pieces_follow_the_official_code():
  ascent = sam_optax.sagm_ascent(rho=0.5, alpha=0.05)
  g = {"a": jnp.asarray([3.0, 0.0], jnp.float64), "b": jnp.asarray([-4.0], jnp.float64)}
  eps, _ = ascent.update(g, ascent.init(g))
  np.testing.assert_allclose(eps["a"], [(0.1 - 0.05) * 3.0, 0.0], rtol=1e-15)
  np.testing.assert_allclose(eps["b"], [(0.1 - 0.05) * -4.0], rtol=1e-15)
  fix = sam_optax.average_with_clean()
  g_adv = {"a": jnp.asarray([1.0, 2.0], jnp.float64), "b": jnp.asarray([5.0], jnp.float64)}
  d, _ = fix.update(g_adv, fix.init(g), None, clean_grads=g)
  np.testing.assert_allclose(d["a"], [2.0, 1.0], rtol=1e-15)
  np.testing.assert_allclose(d["b"], [0.5], rtol=1e-15)
  # g_adv = g gives g bit for bit.
  tiny = {"a": jnp.asarray([0.1, -1 / 3], jnp.float64), "b": jnp.asarray([1e-300], jnp.float64)}
  same, _ = fix.update(tiny, fix.init(tiny), None, clean_grads=tiny)
  for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(tiny)):
    np.testing.assert_array_equal(x, y)


def test_construction_checks():
  with pytest.raises(ValueError, match="alpha"):
    sam_optax.sagm(optax.sgd(0.1), alpha=-0.1)
  with pytest.raises(ValueError, match="weight must be in"):
    sam_optax.average_with_clean(1.5)
  with pytest.raises(TypeError, match="weight must be a number"):
    sam_optax.average_with_clean("half")  # pyright: ignore[reportArgumentType]
  with pytest.raises(TypeError, match="adaptive_perturbation must be a Python bool"):
    sam_optax.gsam(optax.sgd(0.1), adaptive_perturbation=1)  # pyright: ignore[reportArgumentType]
  with pytest.raises(TypeError, match="minimize_fp must be a Python bool"):
    sam_optax.gsam(optax.sgd(0.1), minimize_fp="no")  # pyright: ignore[reportArgumentType]
