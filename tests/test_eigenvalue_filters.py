"""Eigenvalue filters (Bolte, Le & Pauwels, arXiv:2510.09034) checked on diagonal quadratics.

On `L = 1/2 sum_i lam_i x_i^2` every method here is linear and diagonal: with inner SGD of step
`eta`, coordinate i is multiplied by `1 - eta lam_i phi(lam_i)` each step, so it converges iff
`0 < eta lam phi(lam) < 2` (heavy-ball momentum `beta`: `0 < eta lam phi(lam) < 2 (1 + beta)`).
We place eigenvalues where `eta lam phi(lam)` is just inside and just outside each bound (every
real root, so negative eigenvalues too) and run the library's optimizers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

# eta / (4 rho) = 0.25 > DELTA: USAM's two roots at -DELTA are distinct, near 0 and -1/rho.
ETA, RHO, DELTA, STEPS = 0.1, 0.1, 0.05, 600

# name -> (constructor(inner), polynomial coefficients of lam * phi(lam), highest power first)
METHODS = {
    "gd": (lambda inner: inner, [1.0, 0.0]),
    "usam": (lambda inner: sam_optax.usam(inner, RHO), [RHO, 1.0, 0.0]),
    "penalty_sam": (lambda inner: sam_optax.penalty_sam(inner, RHO), [RHO, 1.0, 0.0]),
    "usam2": (lambda inner: sam_optax.usam2(inner, RHO), [RHO ** 2, RHO, 1.0, 0.0]),
    "husam": (lambda inner: sam_optax.husam(inner, RHO), [RHO, 0.0, 1.0, 0.0]),
    # Accumulating two-step unnormalized ascent with step a = rho: lam (1 + rho lam)^2.
    "multistep_k2": (lambda inner: sam_optax.multistep_sam(inner, RHO, steps=2,
                                                           normalized=False, project=False),
                     [RHO ** 2, 2 * RHO, 1.0, 0.0]),
}


def eigenvalues_with(coefficients, target):
  """Every real lam with eta * lam * phi(lam) = target."""
  poly = ETA * np.asarray(coefficients)
  poly[-1] -= target
  roots = np.roots(poly)
  return sorted(float(r.real) for r in roots if abs(r.imag) < 1e-9)


def final_coordinates(method, eigenvalues, momentum=0.0, steps=STEPS):
  make, _ = METHODS[method]
  lam = jnp.asarray(eigenvalues, jnp.float64)
  loss = lambda p: 0.5 * jnp.sum(lam * p["x"] ** 2)
  grad = jax.grad(loss)
  tx = make(optax.sgd(ETA, momentum=momentum or None))
  params = {"x": jnp.ones_like(lam)}

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      if method == "gd":
        updates, state = tx.update(grad(params), state, params)
      else:
        updates, state = tx.update(grad(params), state, params, grad_fn=grad)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params["x"]

  return np.asarray(run(params))


def converged(x):
  return np.isfinite(x) & (np.abs(x) < 1e-6)


def moved_away(x):
  return ~np.isfinite(x) | (np.abs(x) > 1e6)


@pytest.mark.parametrize("momentum", [0.0, 0.5], ids=["sgd", "heavy_ball"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_filter_bounds_are_sharp(method, momentum):
  _, coefficients = METHODS[method]
  upper = 2.0 * (1.0 + momentum)
  inside = [DELTA, upper - DELTA]
  outside = [-DELTA, upper + DELTA]
  lam_in = [lam for c in inside for lam in eigenvalues_with(coefficients, c)]
  lam_out = [lam for c in outside for lam in eigenvalues_with(coefficients, c)]
  x = final_coordinates(method, lam_in + lam_out, momentum)
  x_in, x_out = x[:len(lam_in)], x[len(lam_in):]
  assert converged(x_in).all(), dict(zip(lam_in, x_in))
  assert moved_away(x_out).all(), dict(zip(lam_out, x_out))
  negative_inside = [lam for lam in lam_in if lam < 0]
  if method in ("usam", "penalty_sam"):
    # USAM's filter admits lam <= -1/rho: both negative roots inside lie below it.
    assert len(negative_inside) == 2 and max(negative_inside) < -1 / RHO
  else:
    assert not negative_inside  # no negative eigenvalue passes these filters


def test_usam_converges_on_a_saddle_usam2_and_husam_escape():
  """lam = (1, lam_-) with lam_- < -1/rho inside USAM's filter: USAM converges to the saddle."""
  lam_minus = min(eigenvalues_with(METHODS["usam"][1], 1.0))  # eta lam (1 + rho lam) = 1
  assert lam_minus < -1 / RHO and 0 < ETA * lam_minus * (1 + RHO * lam_minus) < 2
  eigenvalues = [1.0, lam_minus]
  assert converged(final_coordinates("usam", eigenvalues)).all()
  assert converged(final_coordinates("penalty_sam", eigenvalues)).all()
  for method in ("gd", "usam2", "husam"):
    # One run per eigenvalue: once the escaping coordinate overflows, the engine makes the
    # whole update non-finite (a NaN or Inf in a gradient never passes silently), so a shared
    # run would end NaN in the converging coordinate too.
    assert converged(final_coordinates(method, eigenvalues[:1])).all(), method
    assert moved_away(final_coordinates(method, eigenvalues[1:])).all(), method


@pytest.mark.parametrize("method", ["usam2", "husam"])
def test_usam2_and_husam_never_converge_at_negative_curvature(method):
  negative = list(-np.logspace(-2, 2, 17) / RHO)   # from -0.1 to -1000, across -1/rho = -10
  x = final_coordinates(method, negative, steps=2000)
  # Every negative direction grows (|1 - eta lam phi| > 1): none is attracted to the saddle.
  assert (~converged(x)).all() and (np.abs(np.nan_to_num(x, nan=np.inf)) > 1.0).all()
