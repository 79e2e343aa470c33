"""Plain jax.numpy references, written independently of sam_optax (no library calls).

Params are flattened to one vector so each rule reads like its formula in GUIDE.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def flat_problem(problem):
  """(w0, grad(w), unravel) with grad on the flat vector."""
  w0, unravel = ravel_pytree(problem.params)
  # Jitted: one trace per problem instead of one per call (the rules around it stay eager).
  grad = jax.jit(lambda w: ravel_pytree(jax.grad(problem.loss)(unravel(w), problem.batch))[0])
  return w0, grad, unravel


def sam_eps(g, rho):
  n = jnp.linalg.norm(g)
  return jnp.where(n > 0, rho * g / jnp.where(n > 0, n, 1.0), 0.0)


def usam_eps(g, rho):
  return rho * g


def unified_eps(g, rho, lam):
  n = jnp.linalg.norm(g)
  inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  return rho * (1 - lam + lam * inv) * g


def renormalized(g, g_adv):
  na, nc = jnp.linalg.norm(g_adv), jnp.linalg.norm(g)
  return jnp.where(na > 0, g_adv * nc / jnp.where(na > 0, na, 1.0), g_adv)


def heavy_ball(w, v, d, lr, momentum):
  """optax.sgd(lr, momentum): v <- d + momentum v; w <- w - lr v."""
  v = d + momentum * v
  return w - lr * v, v


def run(problem, direction, steps, lr=0.1, momentum=0.9):
  """Trajectory of heavy-ball SGD on `direction(grad, w, t) -> d`; returns the list of params.

  A reference marked `steps_inner` takes the inner optimizer's steps itself (several per
  update, Lookbehind-SAM): it is called with `inner=`, a function `d -> Opt(d)` that takes one
  heavy-ball step on `d` (advancing the velocity), and returns the update.
  """
  w, grad, unravel = flat_problem(problem)
  v = jnp.zeros_like(w)
  out = []
  steps_inner = getattr(direction, "steps_inner", False)
  needs_velocity = getattr(direction, "needs_velocity", False)  # SAMPa peeks at the momentum
  if getattr(direction, "needs_structure", False):  # per-leaf random draws need the leaves
    direction = functools.partial(direction, unravel=unravel)
  velocity = [v]

  def inner(d):
    velocity[0] = d + momentum * velocity[0]
    return -lr * velocity[0]

  for t in range(steps):
    if steps_inner:
      w = w + direction(grad, w, t, inner=inner)
    else:
      d = direction(grad, w, t, v=velocity[0]) if needs_velocity else direction(grad, w, t)
      w, velocity[0] = heavy_ball(w, velocity[0], d, lr, momentum)
    out.append(unravel(w))
  return out


def sam_direction(eps_fn, renorm=False):
  """The SAM-family direction for an ascent `eps_fn(g, t)`."""
  def direction(grad, w, t):
    g = grad(w)
    g_adv = grad(w + eps_fn(g, t))
    return renormalized(g, g_adv) if renorm else g_adv
  return direction


# ------------------------------------------------------------------ seed variants, part two


def dnsam_eps_fn(rho, decay):
  """DNSAM's `eps_fn(g, t)` with the norm estimated by a bias-corrected EMA of ||g||^2.

  Stateful: call it once per step, in order (as `run` does).
  """
  ema = [0.0]

  def eps(g, t):
    ema[0] = decay * ema[0] + (1 - decay) * jnp.dot(g, g)
    estimate = jnp.sqrt(ema[0] / (1 - decay ** (t + 1)))
    return jnp.where(estimate > 0, rho * g / jnp.where(estimate > 0, estimate, 1.0), 0.0)
  return eps


def hessian(grad, w):
  """The dense Hessian at w (forward-mode Jacobian of the gradient)."""
  return jax.jacfwd(grad)(w)


def husam_direction(rho):
  def direction(grad, w, t):
    g = grad(w)
    return grad(w + rho * hessian(grad, w) @ g)
  return direction


def penalty_direction(rho):
  def direction(grad, w, t):
    g = grad(w)
    return g + rho * hessian(grad, w) @ g
  return direction


def multistep_eps(grad, w, g, rho, steps, normalized=True, step_size=None, project=True,
                  nested=False):
  """The iterated ascent: e <- P(e + a N(grad(w + e))), or e <- P(a N(...)) when nested."""
  a = rho if step_size is None else step_size
  e, h = jnp.zeros_like(w), g
  for j in range(steps):
    if j:
      h = grad(w + e)
    if normalized:
      n = jnp.linalg.norm(h)
      h = jnp.where(n > 0, h / jnp.where(n > 0, n, 1.0), 0.0)
    e = a * h if nested else e + a * h
    if project:
      n = jnp.linalg.norm(e)
      e = jnp.where(n > rho, e * rho / jnp.where(n > rho, n, 1.0), e)
  return e


def multistep_direction(rho, steps, **options):
  def direction(grad, w, t):
    return grad(w + multistep_eps(grad, w, grad(w), rho, steps, **options))
  return direction


def usam2_direction(rho):
  """e1 = rho g, e2 = rho grad(w + e1), d = grad(w + e2), written out."""
  def direction(grad, w, t):
    e1 = rho * grad(w)
    e2 = rho * grad(w + e1)
    return grad(w + e2)
  return direction
