"""Compile time and program size of one jitted step, sam_optax's variants beside optax.contrib.sam.

A sharpness-aware step is traced once per run, so its compile time is paid once, but it is paid
on every restart and every notebook cell that rebuilds the step, and the engine's structure
(conditionals for cadences, two-call branches, checks) shows up there first. This script
builds, in one process and side by side, the jitted training step `(params, state, batch) ->
(params, state)` of each contender on the MLP of `benchmarks/models.py`, and prints for each:

  * trace + lower time (`jax.jit(step).lower(...)`), and XLA compile time (`.compile()`), the
    median over `--repeats` fresh builds (each with a new step function, so no cache hits);
  * the size of the lowered StableHLO text (characters), a proxy for the program the engine
    emits.

XLA's default optimization level is used (the tests compile at level 0, see tests/conftest.py).

Usage::

    python benchmarks/compile_time.py                  # a few seconds per contender on CPU
    python benchmarks/compile_time.py --repeats 5 --contenders sam,looksam,optax_sam
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
  import sam_optax  # noqa: F401
except ImportError:  # running from a checkout without installing the package
  sys.path.insert(0, os.path.join(_HERE, os.pardir))

import jax
import optax
import optax.contrib

import models as benchmark_models
import sam_optax

RHO = 0.05


def _inner():
  return optax.sgd(1e-3, momentum=0.9)


def _one_call(problem, tx, opaque=False):
  grad = jax.grad(problem.loss)

  def step(params, state, batch):
    grad_fn = (lambda p, i: grad(p, batch)) if opaque else (lambda p: grad(p, batch))
    updates, state = tx.update(grad(params, batch), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return step, tx.init(problem.params)


def _two_call(problem, tx):
  grad = jax.grad(problem.loss)

  def step(params, state, batch):
    updates, state = tx.update(grad(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  return step, tx.init(problem.params)


def _optax_sam(opaque):
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
  return optax.contrib.sam(_inner(), adversary, sync_period=2, opaque_mode=opaque)


CONTENDERS = {
    "optax_sam": lambda p: _one_call(p, _optax_sam(True), opaque=True),
    "optax_sam_two_call": lambda p: _two_call(p, _optax_sam(False)),
    "sam": lambda p: _one_call(p, sam_optax.sam(_inner(), RHO)),
    "sam_two_call": lambda p: _two_call(p, sam_optax.sam(_inner(), RHO, two_call=True)),
    "asam": lambda p: _one_call(p, sam_optax.asam(_inner())),
    "gsam": lambda p: _one_call(p, sam_optax.gsam(_inner())),
    "looksam": lambda p: _one_call(p, sam_optax.looksam(_inner(), k=5)),
    "looksam_two_call": lambda p: _two_call(p, sam_optax.looksam(_inner(), k=5, two_call=True)),
    "sam_window": lambda p: _one_call(p, sam_optax.sam(_inner(), RHO, window=(10, None))),
}


def measure(problem, name, repeats):
  lowers, compiles, size = [], [], None
  for _ in range(repeats):
    step, state = CONTENDERS[name](problem)  # a fresh function: no cache hit
    start = time.perf_counter()
    lowered = jax.jit(step).lower(problem.params, state, problem.batch)
    middle = time.perf_counter()
    lowered.compile()
    end = time.perf_counter()
    lowers.append(middle - start)
    compiles.append(end - middle)
    size = len(lowered.as_text())
  return statistics.median(lowers), statistics.median(compiles), size


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--contenders", default=",".join(CONTENDERS))
  parser.add_argument("--model", default="mlp", choices=benchmark_models.MODELS)
  parser.add_argument("--size", default="cpu", choices=("cpu", "gpu", "smoke"))
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  problem = benchmark_models.make(args.model, args.size)
  print(f"{problem.description}; jax {jax.__version__}, optax {optax.__version__}, "
        f"{jax.default_backend()}; median of {args.repeats} builds")
  print(f"{'contender':<20} {'lower (ms)':>11} {'compile (ms)':>13} {'HLO chars':>10}")
  for name in args.contenders.split(","):
    lower, compile_, size = measure(problem, name, args.repeats)
    print(f"{name:<20} {lower * 1e3:>11.1f} {compile_ * 1e3:>13.1f} {size:>10}")


if __name__ == "__main__":
  main()
