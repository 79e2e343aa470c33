#!/usr/bin/env python
"""A hyperparameter sweep in one compiled run (`jax.vmap` over `rho` and `lam`) against a
Python loop of runs, side by side in one process.

Every run trains the same small MLP (regression, full batch) from the same initialization
with `sam_optax.unified_sam(optax.sgd(lr, momentum=0.9), rho=rho, lam=lam)` for `--steps`
steps inside one `lax.scan`, and returns its final loss. The sweep is the grid of `--rhos`
times `--lams`. Three ways to run it:

  * `loop_recompile`: what a sweep script usually does: for each point, build the
    transformation with Python floats and `jax.jit` a fresh training function, so each point
    compiles its own program;
  * `loop_compiled_once`: one jitted training function taking `rho` and `lam` as traced
    arguments (the transformation is built inside it), called once per point: one
    compilation, then one run per point;
  * `vmap`: `jax.jit(jax.vmap(train))` over the flattened grid: one compilation, one run.

Reported: wall time of the whole sweep including compilation (what a user waits for), and
the run time alone (a second call of the compiled functions, median of `--repeats`), with the
ratios to `vmap`; the process CPU time of each is recorded too (on a shared machine it is
disturbed less by other processes; XLA:CPU may use several threads, so it can exceed the wall
time). The final losses of the three must agree (float32 round-off: XLA fuses the
batched program differently); their largest difference, relative to the grid's largest final
loss, is printed and checked.

Usage::

    python benchmarks/sweep.py                  # 8 x 4 grid, 100 steps, ~1 to 2 minutes on 2 cores
    python benchmarks/sweep.py --smoke          # a 2 x 2 grid, 5 steps (CI)
    python benchmarks/sweep.py --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax


def make_problem(width: int, batch: int, features: int, seed: int = 0):
  """A two-hidden-layer tanh MLP regressing a smooth target: (params, x, y, loss)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  sizes = [features, width, width, 1]
  params = {f"w{i}": jax.random.normal(keys[i], (a, b)) / np.sqrt(a)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
  x = jax.random.normal(keys[3], (batch, features))
  y = jnp.sin(x @ jax.random.normal(keys[4], (features, 1)))

  def loss(p, x, y):
    h = x
    for i in range(len(sizes) - 2):
      h = jnp.tanh(h @ p[f"w{i}"])
    return jnp.mean((h @ p[f"w{len(sizes) - 2}"] - y) ** 2)

  return params, x, y, loss


def make_train(params, x, y, loss, steps: int, lr: float):
  """train(rho, lam) -> final loss: a whole run in one `lax.scan`."""

  def train(rho, lam):
    # Built inside the traced function: rho and lam may be tracers (jit arguments, vmap).
    tx = sam_optax.unified_sam(optax.sgd(lr, momentum=0.9), rho=rho, lam=lam)
    grad = jax.grad(loss)

    def step(carry, _):
      p, state = carry
      updates, state = tx.update(grad(p, x, y), state, p, grad_fn=lambda q: grad(q, x, y))
      return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return loss(p, x, y)

  return train


def timed(fn):
  """(wall seconds, process CPU seconds, result) of fn(), waiting for the result."""
  start, start_cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, time.process_time() - start_cpu, out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rhos", type=int, default=8, help="number of rho values")
  parser.add_argument("--lams", type=int, default=4, help="number of lam values")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--features", type=int, default=16)
  parser.add_argument("--lr", type=float, default=0.02)
  parser.add_argument("--repeats", type=int, default=3, help="runs timed after compilation")
  parser.add_argument("--tolerance", type=float, default=1e-3,
                      help="largest difference of final losses allowed, relative to the largest")
  parser.add_argument("--smoke", action="store_true", help="a 2 x 2 grid, 5 steps (CI)")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.smoke:
    args.rhos, args.lams, args.steps, args.repeats = 2, 2, 5, 1

  params, x, y, loss = make_problem(args.width, args.batch, args.features)
  train = make_train(params, x, y, loss, args.steps, args.lr)
  rho_grid = np.linspace(0.0, 0.1, args.rhos, dtype=np.float32)
  lam_grid = np.linspace(0.0, 1.0, args.lams, dtype=np.float32)
  rhos, lams = (a.ravel() for a in np.meshgrid(rho_grid, lam_grid, indexing="ij"))
  points = list(zip(rhos.tolist(), lams.tolist()))

  # A Python loop of runs, each compiling its own program (Python floats in the transformation).
  def loop_recompile():
    out = []
    for rho, lam in points:
      out.append(jax.jit(lambda rho=rho, lam=lam: train(rho, lam))())
    return jnp.stack(out)

  # A Python loop of runs of one compiled program.
  once = jax.jit(train)
  def loop_compiled_once():
    return jnp.stack([once(jnp.float32(rho), jnp.float32(lam)) for rho, lam in points])

  # One compiled run over the whole grid.
  batched = jax.jit(jax.vmap(train))
  def vmapped():
    return batched(jnp.asarray(rhos), jnp.asarray(lams))

  results = {}
  for name, fn, rerun in (("vmap", vmapped, True), ("loop_compiled_once", loop_compiled_once, True),
                          ("loop_recompile", loop_recompile, False)):
    first_s, first_cpu_s, losses = timed(fn)
    # A rerun of loop_recompile would compile again; its run time is loop_compiled_once's.
    runs = [timed(fn)[:2] for _ in range(args.repeats)] if rerun else []
    results[name] = {"first_call_s": first_s, "first_call_cpu_s": first_cpu_s,
                     "losses": np.asarray(losses).tolist(),
                     "run_s": statistics.median(r[0] for r in runs) if runs else None,
                     "run_cpu_s": statistics.median(r[1] for r in runs) if runs else None}
    print(f"{name:20s} whole sweep (compile + run) {first_s:8.2f} s wall, {first_cpu_s:8.2f} s "
          f"CPU" + (f"; run alone {results[name]['run_s']:8.3f} s wall, "
                    f"{results[name]['run_cpu_s']:8.3f} s CPU" if runs else ""), flush=True)

  reference = np.asarray(results["loop_recompile"]["losses"])
  # Relative to the largest final loss of the grid: runs that reach a loss near zero differ in
  # their last digits only by round-off of the batched program.
  scale = max(float(np.max(np.abs(reference))), 1e-12)
  worst = max(float(np.max(np.abs(np.asarray(r["losses"]) - reference))) / scale
              for r in results.values())
  vmap = results["vmap"]
  ratios = {
      "loop_recompile_vs_vmap_whole": results["loop_recompile"]["first_call_s"]
                                      / vmap["first_call_s"],
      "loop_compiled_once_vs_vmap_whole": results["loop_compiled_once"]["first_call_s"]
                                          / vmap["first_call_s"],
      "loop_compiled_once_vs_vmap_run": results["loop_compiled_once"]["run_s"] / vmap["run_s"],
  }
  print(f"{len(points)} runs ({args.rhos} rho x {args.lams} lam), {args.steps} steps each")
  for key, value in ratios.items():
    print(f"  {key}: {value:.2f}x")
  print(f"largest difference of the final losses, relative to the largest: {worst:.2e}")
  best = int(np.argmin(np.asarray(vmap["losses"])))
  print(f"lowest final loss: rho={points[best][0]:.4f}, lam={points[best][1]:.3f}: "
        f"{vmap['losses'][best]:.5f}")

  report = {
      "settings": {**vars(args), "points": len(points)},
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                  "jax": jax.__version__, "optax": optax.__version__,
                  "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()]},
      "results": results, "ratios": ratios, "largest_relative_difference": worst,
      "date": time.strftime("%Y-%m-%d", time.gmtime()),
  }
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  if not np.all(np.isfinite(reference)):
    sys.exit("sweep: a run's final loss is not finite")
  if worst > args.tolerance:
    sys.exit(f"sweep: the three ways disagree (relative difference {worst:.2e} > "
             f"{args.tolerance:g})")
  return report


if __name__ == "__main__":
  main()
