#!/usr/bin/env python
"""Long-run reliability: many sharpness-aware steps of a small MLP, watched for drift.

The run is the loop a user writes: a Python loop over one jitted step
`(params, state, key, count, finite) -> (...)` that draws its minibatch on device, computes the
clean gradient, calls `tx.update(..., grad_fn=...)` and applies the update. It checks:

  * no non-finite value: every step's loss, updates and params are folded into one device flag
    (read at each sample point, and at the end);
  * no recompilation: XLA backend compilations are counted (jax.monitoring) after the first
    step, and the jitted step's cache holds one entry at the end;
  * memory that does not grow: the number and total bytes of live device arrays
    (jax.live_arrays()) are sampled every --sample-every steps and must be the same at every
    sample after the first; the process's resident memory is reported, and its growth from the
    first sample to the last must stay under --rss-slack-mb;
  * no host transfer inside the loop: the steps run under jax.transfer_guard("disallow"), which
    turns any implicit host<->device transfer into an error (the sample points read the flag
    with an explicit jax.device_get, which the guard allows).

Usage:
  python benchmarks/long_run.py                    # 10,000 steps of sam on the MLP
  python benchmarks/long_run.py --steps 200 --variant ssam --two-call

Prints one line per sample and a JSON summary; exits 1 when a check fails. `main(argv)`
returns the summary (tests/test_reliability.py runs it for a few hundred steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  import sam_optax
except ImportError:  # run from a checkout without installing
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import sam_optax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def rss_mb() -> float:
  """Resident memory of this process in MiB (Linux /proc; 0 where unavailable)."""
  try:
    with open("/proc/self/statm") as f:
      pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError, IndexError):
    return 0.0


def live_arrays() -> tuple[int, int]:
  arrays = jax.live_arrays()
  return len(arrays), int(sum(a.nbytes for a in arrays))


def make_problem(seed: int = 0, n: int = 1024, d_in: int = 16, hidden: int = 32, d_out: int = 4):
  """A teacher-student regression: data on device, an MLP of about 1,700 params."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in)).astype(np.float32)
  teacher = rng.normal(size=(d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
  y = np.tanh(x @ teacher) + 0.1 * rng.normal(size=(n, d_out)).astype(np.float32)
  params = {
      "dense0": {"w": rng.normal(size=(d_in, hidden)) / np.sqrt(d_in), "b": np.zeros(hidden)},
      "dense1": {"w": rng.normal(size=(hidden, d_out)) / np.sqrt(hidden), "b": np.zeros(d_out)},
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return params, jnp.asarray(x), jnp.asarray(y)


def loss_fn(params, x, y):
  h = jax.nn.gelu(x @ params["dense0"]["w"] + params["dense0"]["b"])
  out = h @ params["dense1"]["w"] + params["dense1"]["b"]
  return jnp.mean((out - y) ** 2)


def all_finite(*trees) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(leaf)) for tree in trees for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(flags))


def build_step(tx, x, y, batch_size: int, two_call: bool):
  """The jitted training step; draws its minibatch on device from (key, count)."""
  n = x.shape[0]

  def minibatch(key, count):
    idx = jax.random.randint(jax.random.fold_in(key, count), (batch_size,), 0, n)
    return x[idx], y[idx]

  def step(params, state, key, count, finite):
    xb, yb = minibatch(key, count)
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    if two_call:
      updates, state = tx.update(grads, state, params)                # ascent call
      perturbed = optax.apply_updates(params, updates)
      grads_adv = jax.grad(loss_fn)(perturbed, xb, yb)
      updates, state = tx.update(grads_adv, state, perturbed)         # descent call
      params = optax.apply_updates(perturbed, updates)
    else:
      updates, state = tx.update(grads, state, params,
                                 grad_fn=lambda p: jax.grad(loss_fn)(p, xb, yb))
      params = optax.apply_updates(params, updates)
    finite = finite & all_finite(loss, updates, params)
    return params, state, count + 1, finite, loss

  return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=10_000)
  parser.add_argument("--variant", default="sam", help="a sam_optax variant, default hparams")
  parser.add_argument("--two-call", action="store_true", help="use the two-call form")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--sample-every", type=int, default=1000)
  parser.add_argument("--rss-slack-mb", type=float, default=32.0)
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  say = (lambda *a: None) if args.quiet else print

  params, x, y = make_problem()
  tx = getattr(sam_optax, args.variant)(optax.adam(args.learning_rate), two_call=args.two_call)
  state = tx.init(params)
  step = build_step(tx, x, y, args.batch_size, args.two_call)
  key = jax.random.key(0)
  count = jnp.zeros([], jnp.int32)
  finite = jnp.ones([], jnp.bool_)

  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if event == _BACKEND_COMPILE else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # Warm-up: the first step compiles (and the first donation settles the buffers).
    params, state, count, finite, loss = step(params, state, key, count, finite)
    first_loss = float(loss)
    jax.block_until_ready((params, state))
    compiles_at_warmup = len(compiles)

    samples = []
    start = time.perf_counter()
    done = 1
    with jax.transfer_guard("disallow"):
      while done < args.steps:
        chunk = min(args.sample_every, args.steps - done)
        for _ in range(chunk):
          params, state, count, finite, loss = step(params, state, key, count, finite)
        done += chunk
        jax.block_until_ready((params, state))
        arrays, nbytes = live_arrays()
        sample = {"step": done, "finite": bool(jax.device_get(finite)),
                  "loss": float(jax.device_get(loss)), "live_arrays": arrays,
                  "live_bytes": nbytes, "rss_mb": round(rss_mb(), 1)}
        samples.append(sample)
        say(json.dumps(sample))
    elapsed = time.perf_counter() - start
  finally:
    # Public only after jax 0.7.1 (the declared floor); older versions have the private one.
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is None:
      from jax._src import monitoring
      unregister = monitoring._unregister_event_duration_listener_by_callback
    unregister(listener)

  live_counts = {s["live_arrays"] for s in samples}
  live_bytes = {s["live_bytes"] for s in samples}
  rss_growth = samples[-1]["rss_mb"] - samples[0]["rss_mb"] if samples else 0.0
  summary = {
      "variant": args.variant, "two_call": args.two_call, "steps": args.steps,
      "steps_per_second": round((args.steps - 1) / elapsed, 1) if elapsed > 0 else None,
      "seconds": round(elapsed, 2),
      "first_loss": first_loss, "final_loss": samples[-1]["loss"] if samples else first_loss,
      "all_finite": bool(jax.device_get(finite)),
      "compilations_after_warmup": len(compiles) - compiles_at_warmup,
      "jit_cache_size": step._cache_size(),  # pylint: disable=protected-access
      "live_arrays": sorted(live_counts), "live_bytes": sorted(live_bytes),
      "rss_mb_first_sample": samples[0]["rss_mb"] if samples else None,
      "rss_mb_last_sample": samples[-1]["rss_mb"] if samples else None,
      "rss_growth_mb": round(rss_growth, 1),
  }
  checks = {
      "finite": summary["all_finite"],
      "no_recompilation": summary["compilations_after_warmup"] == 0
                          and summary["jit_cache_size"] == 1,
      "live_arrays_constant": len(live_counts) <= 1 and len(live_bytes) <= 1,
      "rss_bounded": rss_growth < args.rss_slack_mb,
      "loss_decreased": summary["final_loss"] < first_loss,
  }
  summary["checks"] = checks
  summary["ok"] = all(checks.values())
  say(json.dumps(summary, indent=1))
  return summary


if __name__ == "__main__":
  sys.exit(0 if main()["ok"] else 1)
