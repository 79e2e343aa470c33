# %% [markdown]
# # The crucial role of normalization in SAM
#
# **Claim.** SAM divides its ascent step by the gradient norm, $\epsilon = \rho\, g/\|g\|$;
# unnormalized SAM (USAM) does not, $\epsilon = \rho\, g$. Dai, Ahn and Sra show that this
# normalization is what makes SAM work: (1) on a quadratic, USAM diverges once the step size
# passes $2/(\beta + \rho\beta^2)$, while SAM stays bounded for every step size below $2/\beta$,
# oscillating at a predictable amplitude; (2) near a manifold of minima, SAM keeps moving *along*
# the minima towards the flattest one, while gradient descent and USAM stop wherever they first
# land (scalar factorization, a single-neuron linear network); (3) on over-parameterized matrix
# sensing, SAM trains over a range of $\rho$ where USAM blows up, and from a sharp minimum SAM
# with different $\rho$ drifts to the same flat minimum while GD and USAM stay put.
#
# **Reference.** Yan Dai, Kwangjun Ahn, Suvrit Sra, *The Crucial Role of Normalization in
# Sharpness-Aware Minimization*, NeurIPS 2023, [arXiv:2305.15287](https://arxiv.org/abs/2305.15287).

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sam_optax
from sam_optax import diagnostics

SIZE = os.environ.get("SAM_OPTAX_NOTEBOOK_SIZE", "full")  # "ci": shorter runs, same claims
FULL = SIZE != "ci"
START = time.perf_counter()

# %% [markdown]
# Every experiment is full-batch: the gradient function is the loss's gradient, and the
# sharpness-aware optimizers wrap plain `optax.sgd`. One helper runs a whole training inside a
# `lax.scan`, so that a grid of hyperparameters is a single `jax.vmap` and one compilation.

# %%
def train(tx, loss, params, steps, record=lambda p: p, every=1):
  """Runs `steps` full-batch steps of the optax transformation `tx` on `loss` from `params`.

  Returns the final params and `record(params)` after every `every` steps.
  """
  grad = jax.grad(loss)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(grad(params), state, params, grad_fn=grad)
    return (optax.apply_updates(params, updates), state), None

  def block(carry, _):
    carry, _ = jax.lax.scan(step, carry, None, length=every)
    return carry, record(carry[0])

  (params, _), history = jax.lax.scan(block, (params, tx.init(params)), None,
                                      length=steps // every)
  return params, history


def finite_or(x, cap):
  """Replaces diverged values (inf, nan, or above cap) by cap, for plotting."""
  x = np.asarray(x, dtype=float)
  return np.where(np.isfinite(x) & (x < cap), x, cap)

# %% [markdown]
# ## 1. The quadratic: USAM's threshold and SAM's two-cycle
#
# On $L(x) = \beta x^2/2$ the USAM step is $x \leftarrow (1 - \eta\beta(1 + \rho\beta))\,x$: it
# diverges once $\eta > 2/(\beta + \rho\beta^2)$, a threshold that shrinks as $\rho$ grows. The SAM
# step is $x \leftarrow x - \eta\beta\,(x + \rho\,\mathrm{sign}(x))$: for every $\eta < 2/\beta$ it
# settles into a two-cycle $x \to -x$ of amplitude $\eta\beta\rho/(2 - \eta\beta)$: bounded, at a
# distance $O(\rho)$ from the minimum for moderate steps.

# %%
beta, rho = 2.0, 0.5
quadratic = lambda x: 0.5 * beta * jnp.sum(x ** 2)
usam_threshold = 2.0 / (beta + rho * beta ** 2)
etas = np.linspace(0.01, 0.99, 50 if FULL else 26) * 2.0 / beta


def amplitudes(make):
  """max |x| over the last 20 of 400 steps, for every step size in `etas`."""
  def one(eta):
    _, xs = train(make(optax.sgd(eta), rho=rho), quadratic, jnp.ones([1]), 400)
    return jnp.max(jnp.abs(xs[-20:]))
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(etas)))


quad = {"SAM": amplitudes(sam_optax.sam), "USAM": amplitudes(sam_optax.usam)}
predicted_cycle = etas * beta * rho / (2.0 - etas * beta)

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.semilogy(etas * beta, finite_or(quad["SAM"], 1e6), "o", ms=4, label="SAM")
ax.semilogy(etas * beta, predicted_cycle, "k-", lw=1, label=r"$\eta\beta\rho/(2-\eta\beta)$")
ax.semilogy(etas * beta, finite_or(np.maximum(quad["USAM"], 1e-12), 1e6), "s", ms=4,
            label="USAM (capped at 1e6)")
ax.axvline(usam_threshold * beta, color="C1", ls="--", lw=1)
ax.text(usam_threshold * beta, 1e3, " USAM threshold\n $2/(\\beta+\\rho\\beta^2)$", color="C1",
        fontsize=8)
ax.set(xlabel=r"$\eta\beta$", ylabel="final amplitude |x|", ylim=(1e-12, 3e6),
       title=rf"$L = \beta x^2/2$, $\beta$={beta}, $\rho$={rho}")
ax.legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Scalar factorization: SAM finds the flattest minimum, USAM diverges
#
# $L(x, y) = (xy)^2/2$ is minimized on the two axes; at $(x, 0)$ the Hessian's top eigenvalue is
# $x^2$, so the origin is the flattest minimum. Gradient descent stops at the first minimum it
# reaches. Near the axis $y = 0$, SAM's normalized perturbation is about $(0, \pm\rho)$, and the
# gradient there has the $x$-component $x\rho^2$: SAM keeps drifting towards the origin at a rate
# of about $\eta\rho^2$ per step, however small the gradient. USAM's perturbation $\rho g$
# vanishes at the minima (no drift) and explodes far from them: from the same start it diverges
# once $\rho$ is comparable to $\eta$.

# %%
factorization = lambda w: 0.5 * (w[0] * w[1]) ** 2
eta_f = 0.1
w0 = jnp.asarray([3.0, 2.0])
steps_f = 20000 if FULL else 6000
rhos_f = np.logspace(-2, 0, 9 if FULL else 5)


def final_distance(make):
  def one(rho):
    w, _ = train(make(optax.sgd(eta_f), rho=rho), factorization, w0, steps_f, every=steps_f)
    return jnp.linalg.norm(w)
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(rhos_f)))


fact = {"SAM": final_distance(sam_optax.sam), "USAM": final_distance(sam_optax.usam)}
gd_end, _ = jax.jit(lambda w: train(optax.sgd(eta_f), factorization, w, steps_f, every=steps_f))(w0)
paths = {name: jax.jit(lambda w, tx=tx: train(tx, factorization, w, 3000)[1])(w0)
         for name, tx in [("GD", optax.sgd(eta_f)),
                          ("USAM, rho=0.05", sam_optax.usam(optax.sgd(eta_f), 0.05)),
                          ("SAM, rho=0.2", sam_optax.sam(optax.sgd(eta_f), 0.2))]}

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
grid = np.linspace(-3.5, 3.5, 201)
X, Y = np.meshgrid(grid, grid)
ax0.contour(X, Y, np.log10(0.5 * (X * Y) ** 2 + 1e-3), levels=12, colors="0.8", linewidths=0.6)
for name, path in paths.items():
  path = np.concatenate([np.asarray(w0)[None], np.asarray(path)])
  ax0.plot(path[:, 0], path[:, 1], ".-", ms=2, lw=0.7, label=name)
  ax0.plot(*path[-1], "k*", ms=8)
ax0.set(xlabel="x", ylabel="y", xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal",
        title=r"$L=(xy)^2/2$: first 3000 steps ($\star$: end)")
ax0.legend(fontsize=7)
ax1.loglog(rhos_f, finite_or(fact["SAM"], 1e3), "o-", label="SAM")
ax1.loglog(rhos_f, finite_or(fact["USAM"], 1e3), "s-", label="USAM (1e3: diverged)")
ax1.loglog(rhos_f, rhos_f, "k:", lw=1, label=r"$\rho$")
ax1.axhline(float(jnp.linalg.norm(gd_end)), color="C2", ls="--", lw=1, label="GD")
ax1.set(xlabel=r"$\rho$", ylabel="final distance to the origin",
        title=f"after {steps_f} steps, $\\eta$={eta_f}")
ax1.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. A single-neuron linear network: where each method stops on the manifold of minima
#
# $L(x, y) = \ell(xy)$ with $\ell(s) = \log\cosh(s)$ (convex, even, minimized at 0). The minima
# are the axes; at $(0, y)$ the sharpness is $y^2$. Gradient flow keeps $y^2 - x^2$ constant, and
# gradient descent can only stop where $\eta y^2 \le 2$, so it ends at
# $y_\infty^2 \approx \min(y_0^2 - x_0^2,\ 2/\eta)$. USAM can only stop where
# $\eta y^2(1 + \rho y^2) \le 2$, so it ends at $y_\infty^2 \approx \min(y_0^2 - x_0^2,\ y_{usam}^2)$
# with $(1 + \rho y_{usam}^2)\, y_{usam}^2 = 2/\eta$. SAM does not stop: it drifts along the minima
# to $y_\infty^2 = o(1)$.

# %%
neuron = lambda w: jnp.logaddexp(w[0] * w[1], -w[0] * w[1]) - jnp.log(2.0)
eta_n, rho_n = 0.1, 0.1
steps_n = 10000 if FULL else 5000
gaps = np.linspace(3.0, 40.0, 12 if FULL else 6)            # y0^2 - x0^2
starts = jnp.asarray(np.stack([np.full_like(gaps, 0.5), np.sqrt(gaps + 0.25)], axis=1))
y_usam2 = (-1.0 + np.sqrt(1.0 + 8.0 * rho_n / eta_n)) / (2.0 * rho_n)


def final_y2(tx):
  run = lambda w: train(tx, neuron, w, steps_n, every=steps_n)[0][1] ** 2
  return np.asarray(jax.jit(jax.vmap(run))(starts))


neuron_end = {"GD": final_y2(optax.sgd(eta_n)),
              "USAM": final_y2(sam_optax.usam(optax.sgd(eta_n), rho_n)),
              "SAM": final_y2(sam_optax.sam(optax.sgd(eta_n), rho_n))}

fig, ax = plt.subplots(figsize=(6, 3.4))
for (name, y2), marker in zip(neuron_end.items(), "o^s"):
  ax.plot(gaps, np.maximum(y2, 1e-6), marker, label=name)
ax.plot(gaps, np.minimum(gaps, 2 / eta_n), "C0-", lw=1, label=r"$\min(y_0^2-x_0^2,\ 2/\eta)$")
ax.plot(gaps, np.minimum(gaps, y_usam2), "C1-", lw=1, label=r"$\min(y_0^2-x_0^2,\ y_{usam}^2)$")
ax.set(yscale="log", xlabel=r"$y_0^2 - x_0^2$", ylabel=r"final $y^2$",
       title=rf"$L=\log\cosh(xy)$, $\eta$={eta_n}, $\rho$={rho_n}, {steps_n} steps")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Over-parameterized matrix sensing
#
# Recover a rank-one PSD matrix $X^* = u u^\top$ ($d = 10$, $\|X^*\| = 10$) from $n = 25$ Gaussian
# measurements $b_i = \langle A_i, X^*\rangle$, with a full $d \times d$ factor $U$:
# $L(U) = \frac{1}{4n}\sum_i (\langle A_i, UU^\top\rangle - b_i)^2$. There are fewer measurements
# than the 55 entries of a symmetric matrix, so the global minima $UU^\top$ form a family of
# matrices with different sharpness, of which small initialization finds the low-rank $X^*$.
#
# **(a) Stability.** From a small initialization, with the step size $\eta = 1/\lambda_{max}$ at
# $X^*$, sweep $\rho$.

# %%
d, r, n, scale = 10, 1, 25, 10.0
rng = np.random.default_rng(0)
u = rng.normal(size=(d, r))
u *= np.sqrt(scale) / np.linalg.norm(u, 2)
x_star = jnp.asarray(u @ u.T, jnp.float32)
gaussian = rng.normal(size=(n, d, d))
A = jnp.asarray((gaussian + gaussian.transpose(0, 2, 1)) / 2, jnp.float32)
b = jnp.einsum("kij,ij->k", A, x_star)


def sensing(U):
  residual = jnp.einsum("kij,ij->k", A, U @ U.T) - b
  return jnp.mean(residual ** 2) / 4


@jax.jit
def sharpness(U):
  """The top Hessian eigenvalue of the sensing loss at U (Lanczos, 20 Hessian-vector products)."""
  return diagnostics.hessian_eigenvalues(sensing, U, key=jax.random.key(0), k=1,
                                         num_iters=20).eigenvalues[0]


U_star = jnp.zeros((d, d)).at[:, :r].set(jnp.asarray(u, jnp.float32))
lam_star = float(sharpness(U_star))
eta_s = 1.0 / lam_star
U_small = jnp.asarray(0.1 * rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)
loss_small = float(sensing(U_small))
rhos_s = np.logspace(-3, 0, 10)
steps_s = 3000 if FULL else 1500


def final_loss(make):
  def one(rho):
    U, _ = train(make(optax.sgd(eta_s), rho=rho), sensing, U_small, steps_s, every=steps_s)
    return sensing(U)
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(rhos_s)))


sense = {"SAM": final_loss(sam_optax.sam), "USAM": final_loss(sam_optax.usam)}
trains = {name: losses < 0.01 * loss_small for name, losses in sense.items()}
largest = {name: rhos_s[ok].max() if ok.any() else 0.0 for name, ok in trains.items()}

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.loglog(rhos_s, finite_or(sense["SAM"], 1e4), "o-", label="SAM")
ax.loglog(rhos_s, finite_or(sense["USAM"], 1e4), "s-", label="USAM (1e4: diverged)")
ax.axhline(loss_small, color="0.5", ls=":", lw=1, label="initial loss")
ax.set(xlabel=r"$\rho$", ylabel=f"loss after {steps_s} steps",
       title=rf"matrix sensing from a small init, $\eta = 1/\lambda_{{max}}(X^*)$")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()
print(f"largest rho that trains (loss < 1% of the initial loss): SAM {largest['SAM']:.3g}, "
      f"USAM {largest['USAM']:.3g}")

# %% [markdown]
# SAM trains until $\rho$ is so large that the perturbation dwarfs the initialization (then it
# hovers at the saddle $U = 0$, see `sam_and_saddles.ipynb`, but stays bounded); USAM diverges
# for every $\rho$ above a much smaller value.
#
# **(b) Moving along the minima.** Start instead from a *sharp* global minimum, the one gradient
# descent finds from a large initialization, and continue with GD, USAM and SAM at two values of
# $\rho$ (step size $1/\lambda_{max}$ at that minimum). The sharpness is the top Hessian eigenvalue,
# measured with `sam_optax.diagnostics.hessian_eigenvalues` (Lanczos).

# %%
U_large = jnp.asarray(3.0 * rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)
eta_large = 0.2 / float(sharpness(U_large))
U_sharp, _ = jax.jit(lambda U: train(optax.sgd(eta_large), sensing, U, 8000, every=8000))(U_large)
lam_sharp = float(sharpness(U_sharp))
eta_m = 1.0 / lam_sharp
steps_m = 10000 if FULL else 4000
every_m = steps_m // 100

# GD, USAM and SAM are all unified SAM: lam = 1 is SAM, lam = 0 is USAM, and rho = 0 is the
# inner optimizer alone (plain GD). So the four runs are one vmapped call over (rho, lam).
runs_m = {"GD": (0.0, 0.0), "USAM, rho=0.005": (0.005, 0.0),
          "SAM, rho=0.2": (0.2, 1.0), "SAM, rho=0.4": (0.4, 1.0)}


@jax.jit
def drift_runs(U):
  def one(rho_lam):
    tx = sam_optax.unified_sam(optax.sgd(eta_m), rho=rho_lam[0], lam=rho_lam[1])
    return train(tx, sensing, U, steps_m, every=every_m)[1]
  snapshots = jax.vmap(one)(jnp.asarray(list(runs_m.values())))
  snapshots = jnp.concatenate([jnp.broadcast_to(U, snapshots[:, :1].shape), snapshots], axis=1)
  flat = snapshots.reshape(-1, d, d)
  sharp = jax.vmap(sharpness)(flat).reshape(snapshots.shape[:2])
  error = jax.vmap(lambda U: jnp.linalg.norm(U @ U.T - x_star))(flat).reshape(sharp.shape)
  return snapshots[:, -1], sharp, error


finals, sharp_m, error_m = jax.device_get(drift_runs(U_sharp))
drift = {name: {"sharpness": sharp_m[i], "error": error_m[i], "final": finals[i]}
         for i, name in enumerate(runs_m)}

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.4))
t = every_m * np.arange(steps_m // every_m + 1)
for (name, out), style in zip(drift.items(), ["-", "--", "-", "-"]):
  ax0.plot(t, out["sharpness"], style, label=name)
  ax1.plot(t, out["error"], style, label=name)
ax0.axhline(lam_star, color="k", ls=":", lw=1, label=r"at $X^*$")
ax0.set(ylabel=r"$\lambda_{max}$ of the Hessian", title="sharpness along the run")
ax1.set(ylabel=r"$\|UU^T - X^*\|_F$", title="distance to $X^*$")
for ax in (ax0, ax1):
  ax.set_xscale("symlog", linthresh=every_m)
  ax.set(xlabel="step (linear up to the first snapshot, then log)", xlim=(0, steps_m))
ax0.legend(fontsize=7)
plt.tight_layout()
plt.show()
final_sam = [drift[k]["final"] for k in ("SAM, rho=0.2", "SAM, rho=0.4")]
sam_gap = float(jnp.linalg.norm(final_sam[0] @ final_sam[0].T - final_sam[1] @ final_sam[1].T))
print(f"start: lambda_max {lam_sharp:.1f} (at X*: {lam_star:.1f}); end: " + ", ".join(
    f"{k} {v['sharpness'][-1]:.1f}" for k, v in drift.items()))
print(f"||U U^T|| difference between the two SAM end points: {sam_gap:.2f} "
      f"(start to X*: {float(jnp.linalg.norm(U_sharp @ U_sharp.T - x_star)):.1f})")

# %% [markdown]
# ## The claims, checked

# %%
# 1. Quadratic: USAM converges below its threshold and diverges above it; SAM stays on the
#    predicted two-cycle for every step size below 2 / beta.
below, above = etas < 0.95 * usam_threshold, etas > 1.05 * usam_threshold
assert np.all(quad["USAM"][below] < 1e-3)
assert np.all(~np.isfinite(quad["USAM"][above]) | (quad["USAM"][above] > 1e3))
np.testing.assert_allclose(quad["SAM"], predicted_cycle, rtol=1e-2)

# 2. Scalar factorization: SAM ends within rho of the origin once it had time to drift
#    (eta rho^2 steps >= 5); USAM diverges for rho >= eta; GD stops far from the origin.
drifted = eta_f * rhos_f ** 2 * steps_f >= 5
assert drifted.sum() >= 3 and np.all(fact["SAM"][drifted] <= rhos_f[drifted])
assert np.all(np.isfinite(fact["SAM"]))
assert np.all(~np.isfinite(fact["USAM"][rhos_f >= eta_f]) | (fact["USAM"][rhos_f >= eta_f] > 1e3))
assert float(jnp.linalg.norm(gd_end)) > 1.0

# 3. Single neuron: GD and USAM stop where predicted (within 10%); SAM reaches y^2 = o(1).
np.testing.assert_allclose(neuron_end["GD"], np.minimum(gaps, 2 / eta_n), rtol=0.1)
np.testing.assert_allclose(neuron_end["USAM"], np.minimum(gaps, y_usam2), rtol=0.1)
assert np.all(neuron_end["SAM"] < 0.05)

# 4a. Matrix sensing: SAM trains with a rho at least 2x larger than the largest USAM tolerates
#     (a grid point further: the grid's ratio is 2.15; SAM's loss at the next point, rho = 0.215,
#     sits at the 1% cutoff and crosses it with the compiler's rounding), and USAM diverges
#     (non-finite loss) somewhere in that range while SAM never does.
assert largest["SAM"] >= 2 * largest["USAM"] > 0
assert np.all(np.isfinite(sense["SAM"]))
assert np.any(~np.isfinite(sense["USAM"]) & (rhos_s <= largest["SAM"]))

# 4b. From a sharp minimum, both SAM runs end much flatter, at about the same sharpness and the
#     same minimum; GD and USAM keep the sharpness they started with.
ends = {k: v["sharpness"][-1] for k, v in drift.items()}
assert ends["SAM, rho=0.2"] < 0.5 * lam_sharp and ends["SAM, rho=0.4"] < 0.5 * lam_sharp
assert abs(ends["SAM, rho=0.2"] - ends["SAM, rho=0.4"]) < 0.15 * ends["SAM, rho=0.4"]
assert sam_gap < 0.2 * float(jnp.linalg.norm(U_sharp @ U_sharp.T - x_star))
assert ends["GD"] > 0.9 * lam_sharp and ends["USAM, rho=0.005"] > 0.9 * lam_sharp
print(f"all claims hold ({SIZE} size, {time.perf_counter() - START:.0f} s)")
