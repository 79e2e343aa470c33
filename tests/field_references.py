"""Plain jax.numpy references for the wider field (issue 5), written from the formulas.

Each factory returns `direction(grad, w, t)` (or `direction(grad, w, t, unravel)` when it needs
the params' leaves, for per-leaf random draws) on the flattened params, for `references.run`.
Stateful references keep their state in the closure: build a fresh one per trajectory.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def _unit(x):
  n = jnp.linalg.norm(x)
  return jnp.where(n > 0, x / jnp.where(n > 0, n, 1.0), 0.0)


def _ratio(a, b):
  return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def needs_structure(direction):
  direction.needs_structure = True
  return direction


def _leaves(w, unravel):
  """The flat vector's leaves (in tree order) as (start, shape, dtype)."""
  out, start = [], 0
  for leaf in jax.tree.leaves(unravel(w)):
    out.append((start, leaf.shape, leaf.dtype))
    start += leaf.size
  return out


def asam_direction(rho, eta, unit_mask=None):
  """T = |w| + eta (1 where unit_mask), eps = rho T^2 g / ||T g||."""
  def direction(grad, w, t):
    g = grad(w)
    tw = jnp.abs(w) + eta
    if unit_mask is not None:
      tw = jnp.where(unit_mask, 1.0, tw)
    eps = rho * _ratio(1.0, jnp.linalg.norm(tw * g)) * tw * tw * g
    return grad(w + eps)
  return direction


def warmup_cosine(init, peak, warmup, decay_steps, end):
  """optax.warmup_cosine_decay_schedule, written out: linear warmup, then cosine to `end`."""
  def lr(t):
    if t < warmup:
      return init + (peak - init) * t / warmup
    frac = min(t - warmup, decay_steps - warmup) / (decay_steps - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
  return lr


def gsam_rho(lr, rho_max, rho_min, lr_max, lr_min):
  def rho(t):
    value = rho_min + (rho_max - rho_min) * (lr(t) - lr_min) / (lr_max - lr_min)
    return min(max(value, rho_min), rho_max)
  return rho


def gsam_direction(rho_fn, alpha):
  def direction(grad, w, t):
    g = grad(w)
    g_adv = grad(w + rho_fn(t) * _unit(g))
    g_perp = g - _ratio(g @ g_adv, g_adv @ g_adv) * g_adv
    return g_adv - alpha * g_perp
  return direction


def looksam_direction(rho, k, alpha):
  g_v = [None]

  def direction(grad, w, t):
    g = grad(w)
    if t % k == 0:
      g_adv = grad(w + rho * _unit(g))
      # g_adv - (<g_adv, g>/||g||^2) g, written as delta - (<delta, g>/||g||^2) g with
      # delta = g_adv - g (the same vector, without cancellation in float32).
      delta = g_adv - g
      g_v[0] = delta - _ratio(delta @ g, g @ g) * g
      return g_adv
    return g + alpha * _ratio(jnp.linalg.norm(g), jnp.linalg.norm(g_v[0])) * g_v[0]
  return direction


def friendly_direction(rho, sigma, lam):
  m = [None]

  def direction(grad, w, t):
    g = grad(w)
    if m[0] is None:
      eps, m[0] = rho * _unit(g), g
    else:
      eps = rho * _unit(g - sigma * m[0])
      m[0] = lam * m[0] + (1 - lam) * g
    return grad(w + eps)
  return direction


def vasso_direction(rho, theta):
  d = [None]

  def direction(grad, w, t):
    g = grad(w)
    d[0] = g if d[0] is None else (1 - theta) * d[0] + theta * g
    return grad(w + rho * _unit(d[0]))
  return direction


def momentum_sam_direction(rho):
  previous = [None]

  def direction(grad, w, t):
    last = jnp.zeros_like(w) if previous[0] is None else w - previous[0]
    previous[0] = w
    return grad(w + rho * _unit(last))
  return direction


def fisher_direction(rho, eta):
  def direction(grad, w, t):
    g = grad(w)
    f_inv_g = g / (1 + eta * g * g)
    eps = rho * _ratio(1.0, jnp.sqrt(g @ f_inv_g)) * f_inv_g
    return grad(w + eps)
  return direction


def wsam_direction(rho, gamma):
  def direction(grad, w, t):
    g = grad(w)
    g_adv = grad(w + rho * _unit(g))
    return g + gamma / (1 - gamma) * (g_adv - g)
  return direction


def _draw(key, w, unravel, sample):
  """Per-leaf draws as the library documents them: key, sub = split(key); one key per leaf."""
  key, sub = jax.random.split(key)
  leaves = _leaves(w, unravel)
  keys = jax.random.split(sub, len(leaves))
  parts = [sample(k, shape, dtype) for k, (_, shape, dtype) in zip(keys, leaves)]
  return key, parts, leaves


def random_sam_direction(rho, sigma, lam, seed=0):
  key = [jax.random.PRNGKey(seed)]

  @needs_structure
  def direction(grad, w, t, unravel):
    key[0], parts, _ = _draw(key[0], w, unravel,
                             lambda k, shape, dtype: jax.random.normal(k, shape, dtype))
    delta = sigma * jnp.concatenate([p.ravel() for p in parts]).astype(w.dtype)
    g_noisy = grad(w + delta)
    return grad(w + delta + lam * rho * _unit(g_noisy))
  return direction


def esam_direction(rho, beta, seed=0):
  key = [jax.random.PRNGKey(seed)]

  @needs_structure
  def direction(grad, w, t, unravel):
    key[0], parts, leaves = _draw(key[0], w, unravel,
                                  lambda k, shape, dtype: jax.random.bernoulli(k, beta))
    keep = jnp.concatenate([jnp.full(math.prod(shape), bool(p)) for p, (_, shape, _)
                            in zip(parts, leaves)])
    g = grad(w)
    kept = jnp.where(keep, g, 0.0)
    return grad(w + rho / beta * _unit(kept))
  return direction


def bsam_direction(rho, num_data, b1, b2, delta, damping, s0=1.0, seed=0):
  state = {"key": jax.random.PRNGKey(seed), "s": None, "gm": None}

  @needs_structure
  def direction(grad, w, t, unravel):
    if state["s"] is None:
      state["s"] = jnp.full_like(w, s0)
      state["gm"] = jnp.zeros_like(w)
    s = state["s"]
    state["key"], parts, _ = _draw(state["key"], w, unravel,
                                   lambda k, shape, dtype: jax.random.normal(k, shape, dtype))
    z = jnp.concatenate([p.ravel() for p in parts]).astype(w.dtype)
    g = grad(w + z / jnp.sqrt(num_data * s))
    g_eps = grad(w + rho * g / s)
    state["gm"] = b1 * state["gm"] + (1 - b1) * (g_eps + delta * w)
    state["s"] = b2 * s + (1 - b2) * (jnp.sqrt(s) * jnp.abs(g) + delta + damping)
    return state["gm"] / state["s"]
  return direction


def flat(tree):
  return ravel_pytree(tree)[0]


# --------------------------------------------------- cheap cadences (issue 15): RST, AE-SAM


def rst_draw(seed, probability):
  """RST's draw at step t, redone with jax.random: bernoulli(fold_in(key(seed), t), p_t)."""
  def take(t):
    p = probability(t) if callable(probability) else probability
    p = jnp.asarray(p, jnp.float32)  # the library draws in float32 whatever p's dtype
    return bool(jax.random.bernoulli(jax.random.fold_in(jax.random.key(seed), t), p))
  return take


def rst_direction(rho, probability, seed=0):
  """SAM's direction on the drawn steps, g on the others."""
  take = rst_draw(seed, probability)

  def direction(grad, w, t):
    g = grad(w)
    return grad(w + rho * _unit(g)) if take(t) else g
  return direction


def ae_policy(decay, threshold):
  """AE-SAM's decision from the plain statistics of n = ||g||^2 (mu, s2 from 0; mean first).

  Stateful: call it once per step, in order. Returns `decide(g, t) -> bool`.
  """
  stats = {"mu": 0.0, "s2": 0.0}

  def decide(g, t):
    c = threshold(t) if callable(threshold) else threshold
    n = g @ g
    stats["mu"] = decay * stats["mu"] + (1 - decay) * n
    stats["s2"] = decay * stats["s2"] + (1 - decay) * (n - stats["mu"]) ** 2
    return bool(n >= stats["mu"] + c * jnp.sqrt(stats["s2"]))
  return decide


def ae_sam_direction(rho, decay, threshold, taken=None):
  """SAM's direction where AE-SAM's policy takes it, g elsewhere; `taken` collects the
  decisions when given."""
  decide = ae_policy(decay, threshold)

  def direction(grad, w, t):
    g = grad(w)
    take = decide(g, t)
    if taken is not None:
      taken.append(take)
    return grad(w + rho * _unit(g)) if take else g
  return direction


def ae_looksam_direction(rho, decay, threshold, alpha, taken=None):
  """LookSAM's SAM step (storing g_v) where AE-SAM's policy takes it, its reuse elsewhere."""
  decide = ae_policy(decay, threshold)
  g_v = [None]

  def direction(grad, w, t):
    g = grad(w)
    take = decide(g, t)
    if taken is not None:
      taken.append(take)
    if take:
      g_adv = grad(w + rho * _unit(g))
      delta = g_adv - g
      g_v[0] = delta - _ratio(delta @ g, g @ g) * g
      return g_adv
    if g_v[0] is None:
      return g
    return g + alpha * _ratio(jnp.linalg.norm(g), jnp.linalg.norm(g_v[0])) * g_v[0]
  return direction


def sampa_direction(rho, lam, lr=0.1, momentum=0.9, learning_rate=None):
  """SAMPa (LIONS-EPFL/SAMPa's train.py): x~ = w + rho g_y/||g_y||; y = w + the heavy-ball
  step at g_y from the current momentum v, not committed (or w - learning_rate g_y);
  d = (1 - lam) grad(x~) + lam grad(y); g_y <- grad(y), zero before the first step."""
  kept = {"g_y": None}

  def direction(grad, w, t, v=None):
    g_y = jnp.zeros_like(w) if kept["g_y"] is None else kept["g_y"]
    if v is None and learning_rate is None:
      # Called without the momentum (tests/test_nonfinite_inputs.py), the inner optimizer is
      # optax.identity, whose update at g_y is g_y itself.
      y = w + g_y
    elif learning_rate is None:
      y = w - lr * (g_y + momentum * v)
    else:
      y = w - learning_rate * g_y
    g_aux = grad(y)
    d = (1 - lam) * grad(w + rho * _unit(g_y)) + lam * g_aux
    kept["g_y"] = g_aux
    return d
  direction.needs_velocity = True
  return direction


# ------------------------------------ modern variants (issue 16): GCSAM, SAGM, big_vision GSAM


def centralize_flat(g, leaves, axes_of=None):
  """Gradient centralization of the flat vector `g`, leaf by leaf: a leaf with >= 2 dims minus
  its mean over every axis but the last (or over `axes_of(shape)`); vectors and scalars as
  they are."""
  parts = []
  for start, shape, _ in leaves:
    x = g[start:start + math.prod(shape)].reshape(shape)
    axes = tuple(range(len(shape) - 1)) if len(shape) >= 2 else ()
    if axes_of is not None:
      axes = axes_of(shape)
    if axes:
      x = x - jnp.mean(x, axis=axes, keepdims=True)
    parts.append(x.ravel())
  return jnp.concatenate(parts) if parts else g


def gcsam_direction(rho, axes_of=None):
  """GCSAM (Mohamed-Hassan22/GCSAM): eps = rho GC(g) / ||g|| (raw norm), d = grad(w + eps)."""
  @needs_structure
  def direction(grad, w, t, unravel):
    g = grad(w)
    eps = rho * _ratio(1.0, jnp.linalg.norm(g)) * centralize_flat(g, _leaves(w, unravel), axes_of)
    return grad(w + eps)
  return direction


def sagm_direction(rho, alpha):
  """SAGM (Wang-pengfei/SAGM): eps = (rho/||g|| - alpha) g, d = (g + grad(w + eps)) / 2."""
  def direction(grad, w, t):
    g = grad(w)
    g_adv = grad(w + (rho * _ratio(1.0, jnp.linalg.norm(g)) - alpha) * g)
    return (g + g_adv) / 2
  return direction


def big_vision_gsam_direction(rho_fn, alpha, adaptive_perturbation, minimize_fp):
  """big_vision's gsam_gradient with its two options, the projections written through unit
  vectors as there (rho_fn clipped at rho_min, as sam_optax documents)."""
  def direction(grad, w, t):
    g = grad(w)
    step = rho_fn(t) * _unit(g)
    g_adv = grad(w + (jnp.abs(w) * step if adaptive_perturbation else step))
    if minimize_fp:
      u = _unit(g_adv)
      return g_adv - alpha * (g - (g @ u) * u)
    u = _unit(g)
    return g + alpha * (g_adv - (g_adv @ u) * u)
  return direction


def gam_direction(rho, rho_prime, alpha, beta, gamma, h_minus="paper"):
  """Accelerated GAM (the paper's Algorithm 2; h_minus="code": xxgege/GAM's gam.py, whose h-
  has coefficient 1 on g0), each line of the algorithm written out."""
  def direction(grad, w, t):
    g0 = grad(w)
    g1 = grad(w + rho_prime * _unit(g0))
    w2 = w + rho * _unit(g1 - g0)
    g2 = grad(w2)
    g3 = grad(w2 + rho_prime * _unit(g2))
    h_plus = alpha * g1 + (1 - alpha) * g3
    h_minus_ = (beta if h_minus == "paper" else 1.0) * g0 + (1 - beta) * g2
    h_perp = h_minus_ - _ratio(h_minus_ @ h_plus, h_plus @ h_plus) * h_plus
    return h_plus - gamma * h_perp
  return direction


# ------------------------------------------------------------- Sparse SAM: SSAM-F and SSAM-D


def sparse_top(scores, count, eligible=None):
  """The `count` largest `scores` among `eligible` (all when None) as a bool vector: ranked by
  eligibility, then decreasing score, then index (ties to the lower index); NaN ranks last."""
  scores = [float(s) for s in np.asarray(scores)]
  n = len(scores)
  key = lambda i: (eligible is not None and not bool(eligible[i]),
                   math.inf if math.isnan(scores[i]) else -scores[i], i)
  keep = np.zeros(n, bool)
  keep[sorted(range(n), key=key)[:int(count)]] = True
  return keep


def sparse_live(n, sparsity):
  return math.floor(n * (1 - sparsity))


def sparse_eps(g, mask, rho):
  """Sparse SAM's perturbation: rho m g / ||g||, the norm of the unmasked g."""
  return rho * _ratio(1.0, jnp.linalg.norm(g)) * jnp.where(jnp.asarray(mask), g, 0.0)


def sparse_fisher_direction(rho, sparsity, update_every, fisher):
  """SSAM-F as specified: the mask is the top-live of fisher(w) at t % update_every == 0
  (t = 0 included), before the ascent."""
  kept = {"mask": None}

  def direction(grad, w, t):
    if kept["mask"] is None or t % update_every == 0:
      kept["mask"] = sparse_top(fisher(w), sparse_live(w.size, sparsity))
    g = grad(w)
    return grad(w + sparse_eps(g, kept["mask"], rho))
  return direction


def sparse_dynamic_direction(rho, sparsity, update_every, drop_rate, drop_score="gradient",
                             growth_score="random", seed=0, masks=None):
  """SSAM-D as specified: a random initial mask (key, sub = split(PRNGKey(seed)), uniform
  float32 scores over the concatenated entries); at t > 0 with t % update_every == 0, before
  the ascent, key, sub = split(key), k_drop, k_grow = split(sub); d = min(live -
  floor(live (1 - dr_t)), N - live) live entries of smallest drop score die and the d old-dead
  entries of largest growth score live. `masks` collects each step's mask when given."""
  kept = {"key": None, "mask": None}

  def scores(kind, key, g, w):
    if kind == "random":
      return np.asarray(jax.random.uniform(key, (w.size,), jnp.float32))
    return np.abs(np.asarray(g if kind == "gradient" else w))

  def direction(grad, w, t):
    n = w.size
    live = sparse_live(n, sparsity)
    g = grad(w)
    if kept["mask"] is None:
      kept["key"], sub = jax.random.split(jax.random.PRNGKey(seed))
      kept["mask"] = sparse_top(jax.random.uniform(sub, (n,), jnp.float32), live)
    elif t % update_every == 0:
      kept["key"], sub = jax.random.split(kept["key"])
      k_drop, k_grow = jax.random.split(sub)
      rate = float(drop_rate(t)) if callable(drop_rate) else drop_rate
      d = min(live - math.floor(live * (1 - rate)), n - live)
      old = kept["mask"]
      keep = sparse_top(scores(drop_score, k_drop, g, w), live - d, eligible=old)
      grow = sparse_top(scores(growth_score, k_grow, g, w), d, eligible=~old)
      kept["mask"] = keep | grow
    if masks is not None:
      masks.append(kept["mask"].copy())
    return grad(w + sparse_eps(g, kept["mask"], rho))
  return direction


def lookbehind_direction(rho, k, alpha):
  """Lookbehind-SAM's update `alpha (theta_k - phi)` (a `steps_inner` reference).

  u_0 = w, g_0 = grad(w); for j = 1..k: u_j = u_{j-1} + rho g_{j-1}/||g_{j-1}||,
  g_j = grad(u_j), theta_j = theta_{j-1} + inner(g_j); alpha None: per leaf,
  (1 + cos(theta_1 - w, theta_k - w)) / 2 (cos 0 for a zero vector). `inner` takes one step of
  the inner optimizer (the identity when None: the update is then alpha times the sum of the
  gradients, what the library hands optax.identity's caller).
  """
  @needs_structure
  def step(grad, w, t, unravel, inner=None):
    inner = (lambda d: d) if inner is None else inner
    g, u, theta, first = grad(w), w, jnp.zeros_like(w), None
    for j in range(k):
      u = u + rho * _unit(g)
      g = grad(u)
      theta = theta + inner(g)
      first = theta if j == 0 else first
    if alpha is not None:
      return alpha * theta
    weights = jnp.zeros_like(w)
    for start, shape, _ in _leaves(w, unravel):
      part = slice(start, start + math.prod(shape))
      cosine = jnp.dot(_unit(first[part]), _unit(theta[part]))
      weights = weights.at[part].set((1 + jnp.clip(cosine, -1.0, 1.0)) / 2)
    return weights * theta
  step.steps_inner = True
  return step
