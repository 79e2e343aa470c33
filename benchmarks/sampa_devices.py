#!/usr/bin/env python
"""SAMPa's wall time per step on one device and on two, beside SGD and SAM.

SAMPa's two gradients (at `x + rho g_y/||g_y||` and at the auxiliary point `y`) do not depend
on each other, so two devices can take one each: a step then costs the wall time of one
gradient plus one exchange. This script times, in one process, on a small MLP:

  * sgd: the inner optimizer alone (SGD, momentum 0.9), one gradient per step;
  * sam: `sam_optax.sam`, two gradients one after the other;
  * sampa_sequential / sampa_vmap: `sam_optax.sampa` on one device, the two points evaluated
    one after the other, or stacked and vmapped into one batched pass;
  * sampa_2dev: `sam_optax.sampa(..., point_axis_name="points")` inside a `shard_map` over a
    mesh axis "points" of 2 devices, each taking one point on the same batch; the gradients
    are exchanged by one psum.

and prints each one's time per step and its ratios to sgd and to sam, the gradient evaluations
per step (counted at run time by a host callback in `grad_fn`, on a separate build: total over
devices and per device), and checks that the three SAMPa forms follow the same trajectory.

Fairness on a CPU. The 2 devices are XLA's host-platform devices
(`--xla_force_host_platform_device_count=2`, set below before JAX starts). By default
(`--threads-per-device 1`) XLA's CPU backend runs every op single-threaded
(`--xla_cpu_multi_thread_eigen=false`), so that each device is one thread, i.e. at most one
core: the one-device contenders use one core, the two-device one may use two, which is the
comparison the paper makes (one accelerator against two). With `--threads-per-device 0` XLA keeps
its defaults (a shared intra-op pool over all cores), where a one-device step may already use
every core and the two-device run has nothing left to gain. The table's `cpu/wall` column (the
process's CPU time over the wall time of the timed rounds) says how many cores a contender kept
busy: about 1 for the one-device contenders, and about 2 for the two-device one only if the
host devices run concurrently. With jaxlib 0.10.2 they did not (cpu/wall 1.0: XLA's CPU client
ran the two devices' programs one after the other, under shard_map and pmap alike), so on a CPU
this benchmark can show the cost of the exchange but not the speedup; it needs accelerators.
The machine's core count and load are printed.

On GPUs or TPUs (`--platform gpu`): the first two accelerators form the "points" axis (the
host-platform and threading flags only touch the CPU backend); use `--width` and `--batch` to
make one gradient fill a device, e.g.

    python benchmarks/sampa_devices.py --platform gpu --width 4096 --batch 4096 --depth 4

Usage::

    python benchmarks/sampa_devices.py                  # CPU, 2 host devices, 1 thread each
    python benchmarks/sampa_devices.py --smoke          # tiny sizes, a few steps (CI)
    python benchmarks/sampa_devices.py --out r.json     # also write the figures as JSON

References:
  Xie, Pethick & Cevher, *SAMPa: Sharpness-aware Minimization Parallelized*, NeurIPS 2024,
  https://arxiv.org/abs/2410.10683; code https://github.com/LIONS-EPFL/SAMPa
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, few steps (CI)")
  parser.add_argument("--platform", default="cpu", help="cpu (2 host devices) or gpu/tpu")
  parser.add_argument("--threads-per-device", type=int, default=1,
                      help="1: every XLA CPU op single-threaded (one core per device); "
                           "0: XLA's default threading")
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--depth", type=int, default=3, help="hidden layers")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default=None, help="write the figures as JSON here")
  parser.add_argument("--check", action="store_true",
                      help="only check that the three SAMPa forms follow the same trajectory "
                           "(tiny sizes, no timing; tests/test_sampa.py)")
  args = parser.parse_args(argv)
  if args.smoke or args.check:
    args.width, args.depth, args.batch, args.steps, args.rounds = 32, 2, 16, 3, 2
  return args


ARGS = parse_args()
if ARGS.platform == "cpu":
  # Before JAX starts: XLA reads its flags once.
  flags = [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]
  if ARGS.threads_per_device == 1:
    flags += ["--xla_cpu_multi_thread_eigen=false"]
  os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sam_optax  # noqa: E402

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # jax < 0.7
  from jax.experimental.shard_map import shard_map  # type: ignore  # noqa: E402


def make_problem(args):
  """An MLP regression: `depth` tanh layers of `width`, inputs 64, outputs 10."""
  rng = np.random.default_rng(0)
  sizes = [64] + [args.width] * args.depth + [10]
  params = [{"w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
             "b": jnp.zeros(b, jnp.float32)} for a, b in zip(sizes[:-1], sizes[1:])]
  batch = (jnp.asarray(rng.normal(size=(args.batch, 64)), jnp.float32),
           jnp.asarray(rng.normal(size=(args.batch, 10)), jnp.float32))

  def loss(params, batch):
    x, y = batch
    for layer in params[:-1]:
      x = jnp.tanh(x @ layer["w"] + layer["b"])
    out = x @ params[-1]["w"] + params[-1]["b"]
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
  return params, batch, loss


SAM_TX = [None]  # the SAM contender: the one whose ascent reads the clean gradient


def contenders(mesh):
  """name -> (transformation, runs under shard_map over the 'points' axis)."""
  inner = optax.sgd(0.05, momentum=0.9)
  SAM_TX[0] = sam_optax.sam(inner, rho=0.05)
  out = {
      "sgd": (None, False),
      "sam": (SAM_TX[0], False),
      "sampa_sequential": (sam_optax.sampa(inner, evaluation="sequential"), False),
      "sampa_vmap": (sam_optax.sampa(inner, evaluation="vmap"), False),
  }
  if mesh is not None:
    out["sampa_2dev"] = (sam_optax.sampa(inner, point_axis_name="points"), True)
  return out, inner


def build_step(tx, inner, on_mesh, mesh, loss, counter=None):
  """A jitted `(params, state, batch) -> (params, state)`; `counter` wraps grad_fn."""
  reads_clean = tx is not None and tx is SAM_TX[0]
  def grad_fn_of(batch):
    grad = lambda p: jax.grad(loss)(p, batch)
    return grad if counter is None else counter(grad)

  if tx is None:
    def step(params, state, batch):
      updates, state = inner.update(grad_fn_of(batch)(params), state, params)
      return optax.apply_updates(params, updates), state
  else:
    def step(params, state, batch):
      # The clean gradient: SAM reads it; SAMPa does not (zeros; a clean gradient computed here
      # would be dead code anyway).
      clean = (grad_fn_of(batch)(params) if reads_clean
               else optax.tree.zeros_like(params))
      updates, state = tx.update(clean, state, params, grad_fn=grad_fn_of(batch))
      return optax.apply_updates(params, updates), state
  if on_mesh:
    step = shard_map(step, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=(0, 1))


def counting():
  calls = []

  def counter(grad):
    def counted(p):
      g = grad(p)
      first = jax.tree.leaves(g)[0]
      # Called on every device that evaluates a gradient; the callback reads one entry so the
      # gradient it counts is one the step actually uses.
      jax.debug.callback(lambda _: calls.append(1), first.reshape(-1)[0])
      return g
    return counted
  return calls, counter


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


def place(tree, sharding):
  return tree if sharding is None else jax.device_put(tree, sharding)


def check_trajectories(trajectories):
  """The three SAMPa forms follow the same trajectory (float32, different programs): the
  largest difference to sampa_sequential over the first steps; exits non-zero past 1e-5."""
  same = {}
  for name in ("sampa_vmap", "sampa_2dev"):
    if name in trajectories:
      diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for pa, pb in zip(trajectories[name], trajectories["sampa_sequential"])
               for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))]
      same[name] = max(diffs)
  print(f"largest difference to sampa_sequential after 3 steps: {same}")
  for name, diff in same.items():
    if not diff <= 1e-5:
      raise SystemExit(f"{name} left sampa_sequential's trajectory: {diff}")
  return same


def main(args):
  devices = jax.devices()
  mesh = Mesh(np.array(devices[:2]), ("points",)) if len(devices) >= 2 else None
  replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, P())
  params0, batch, loss = make_problem(args)
  txs, inner = contenders(mesh)
  report = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "backend": jax.default_backend(), "devices": len(devices),
                        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
            "settings": {k: v for k, v in vars(args).items()}, "contenders": {}}
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  report["machine"]["load_average_1min"] = load
  print(f"backend {jax.default_backend()}, {len(devices)} devices, {os.cpu_count()} CPU cores, "
        f"load average {load:.2f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if mesh is None:
    print("fewer than 2 devices: sampa_2dev skipped")

  if args.check:
    txs = {k: v for k, v in txs.items() if k.startswith("sampa")}
  steps, trajectories = {}, {}
  for name, (tx, on_mesh) in txs.items():
    sharding = replicated if on_mesh else None
    step = build_step(tx, inner, on_mesh, mesh, loss)
    state0 = (inner if tx is None else tx).init(params0)
    args_ = (place(copy(params0), sharding), place(state0, sharding), place(batch, sharding))
    compiled = step.lower(*args_).compile()
    # A few steps for the trajectory check (and the warm-up).
    p, s = args_[0], args_[1]
    path = []
    for _ in range(3):
      p, s = compiled(p, s, args_[2])
      path.append(jax.device_get(p))
    trajectories[name] = path
    steps[name] = (compiled, p, s, args_[2])

  if args.check:
    return check_trajectories(trajectories)

  # Timed rounds, contenders interleaved so that drifts of the machine hit all alike.
  times = {name: [] for name in steps}
  cpu = {name: [0.0, 0.0] for name in steps}  # process CPU time, wall time
  for _ in range(args.rounds):
    for name in steps:
      compiled, p, s, b = steps[name]
      jax.block_until_ready(p)
      start, start_cpu = time.perf_counter(), time.process_time()
      for _ in range(args.steps):
        p, s = compiled(p, s, b)
      jax.block_until_ready(p)
      wall = time.perf_counter() - start
      times[name].append(wall / args.steps)
      cpu[name][0] += time.process_time() - start_cpu
      cpu[name][1] += wall
      steps[name] = (compiled, p, s, b)

  # Gradient evaluations per step, counted at run time on a separate build.
  for name, (tx, on_mesh) in txs.items():
    calls, counter = counting()
    sharding = replicated if on_mesh else None
    step = build_step(tx, inner, on_mesh, mesh, loss, counter)
    p = place(copy(params0), sharding)
    s = place((inner if tx is None else tx).init(params0), sharding)
    for _ in range(2):
      p, s = step(p, s, place(batch, sharding))
    jax.block_until_ready(p)
    jax.effects_barrier()
    per_device = 2 if on_mesh else 1
    report["contenders"][name] = {"median_s": statistics.median(times[name]),
                                  "times_s": times[name], "grads_per_step": len(calls) / 2,
                                  "cpu_per_wall": cpu[name][0] / cpu[name][1],
                                  "grads_per_step_per_device": len(calls) / 2 / per_device}

  same = check_trajectories(trajectories)
  report["max_abs_difference_to_sampa_sequential"] = same

  sgd = report["contenders"]["sgd"]["median_s"]
  sam = report["contenders"]["sam"]["median_s"]
  print("\n| contender | ms/step | vs sgd | vs sam | grads/step (total) | per device | cpu/wall |")
  print("|---|---|---|---|---|---|---|")
  for name, entry in report["contenders"].items():
    entry["vs_sgd"], entry["vs_sam"] = entry["median_s"] / sgd, entry["median_s"] / sam
    print(f"| {name} | {1e3 * entry['median_s']:.2f} | {entry['vs_sgd']:.2f} | "
          f"{entry['vs_sam']:.2f} | {entry['grads_per_step']:g} | "
          f"{entry['grads_per_step_per_device']:g} | {entry['cpu_per_wall']:.2f} |")
  if "sampa_2dev" in report["contenders"]:
    two = report["contenders"]["sampa_2dev"]["median_s"]
    one = report["contenders"]["sampa_sequential"]["median_s"]
    report["sampa_2dev_vs_sampa_sequential"] = two / one
    print(f"\nsampa over 2 devices / sampa on one (sequential): {two / one:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main(ARGS)
