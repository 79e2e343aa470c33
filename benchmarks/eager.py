#!/usr/bin/env python
"""Eager (un-jitted) cost of one `tx.update`, against optax.contrib.sam's, side by side.

A notebook cell or a debugging loop calls `tx.update` without `jax.jit`: every operation is
dispatched on its own. This script times that, in one process, for:

  * sam_optax.sam, one call per step (`grad_fn=`) and two calls per step (`two_call=True`);
  * optax.contrib.sam in its default two-call mode and in its one-call form
    (`opaque_mode=True`, `grad_fn(params, i)`);
  * other sam_optax variants, to check that none is pathological eagerly: looksam (a cadence,
    also with `has_aux=True`), sam with a window, esam (random draws), asam, gsam,
    momentum_sam, usam2, m-sharpness (4 chunks, vectorized and sequential), and
    `skip_if_nonfinite`.

Every contender wraps the same inner optimizer (`optax.sgd(0.1, momentum=0.9)`) and updates
the same small params (four leaves, a two-layer regression net). The gradient function is
`jax.jit(jax.grad(loss))`, compiled once, so that the times are those of the transformations
and not of the user's own eager autodiff (`--eager-grad` makes it eager: both one-call forms
then also pay for it inside `update`).

Method. After a warm-up, `--rounds` rounds each run every contender for `--steps` training
steps in a freshly shuffled order. Only the `tx.update` calls are timed, each ending with
`jax.block_until_ready` on its outputs (updates and state); the gradient at the new params and
`optax.apply_updates` are not. A two-call contender's step is its two calls. A contender's time
per step is the median over rounds of its mean per step in the round (LookSAM's k = 5 cheap and
full steps average over whole cycles when `--steps` is a multiple of 5). Both the wall time
and the process's CPU time are recorded; `--clock cpu` judges the targets on the latter, which
other processes on a busy machine disturb less (it misses time spent waiting on an
accelerator, so keep the wall clock there).

Targets (issue 13, section 3): sam one-call <= 2x optax.contrib.sam one-call (opaque) and
sam two-call <= 2x optax.contrib.sam two-call, per step. Printed with whether each holds (not
checked with `--smoke`).

Usage::

    python benchmarks/eager.py                 # ~1 minute on 2 CPU cores
    python benchmarks/eager.py --smoke         # a few steps of each contender, no targets
    python benchmarks/eager.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
try:
  import sam_optax  # noqa: F401
except ImportError:  # running from a checkout without installing the package
  sys.path.insert(0, os.path.join(_HERE, os.pardir))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import sam_optax

RHO = 0.05
TARGET = 2.0  # ours / optax.contrib.sam's, per step, in each form


def _inner() -> optax.GradientTransformation:
  return optax.sgd(0.1, momentum=0.9)


def _problem(eager_grad: bool):
  """Small params (four leaves) and a gradient function params -> grads."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": 0.5 * jax.random.normal(keys[0], (8, 16)), "b1": jnp.zeros((16,)),
            "w2": 0.5 * jax.random.normal(keys[1], (16, 1)), "b2": jnp.zeros((1,))}
  x = jax.random.normal(keys[2], (32, 8))
  y = jax.random.normal(keys[3], (32, 1))

  def loss(p):
    hidden = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((hidden @ p["w2"] + p["b2"] - y) ** 2)

  grad = jax.grad(loss)
  return params, (grad if eager_grad else jax.jit(grad))


class Contender:
  """One transformation, its state and params, stepped eagerly; times its update calls."""

  def __init__(self, name: str, description: str, tx, params, grad: Callable, *,
               form: str, calls_grad_fn_with_index: bool = False, chunked: bool = False,
               with_aux: bool = False):
    self.name, self.description, self.form = name, description, form
    self.tx, self.grad = tx, grad
    self.params = params
    self.state = tx.init(params)
    self.with_index = calls_grad_fn_with_index
    self.chunked = chunked
    self.with_aux = with_aux
    self.calls = 2 if form == "two-call" else 1

  def _timed_update(self, grads, **kwargs) -> tuple[Any, np.ndarray]:
    start = np.array([time.perf_counter(), time.process_time()])
    updates, self.state = self.tx.update(grads, self.state, self.params, **kwargs)
    jax.block_until_ready((updates, self.state))
    return updates, np.array([time.perf_counter(), time.process_time()]) - start

  def step(self) -> np.ndarray:
    """One training step; returns the (wall, CPU) seconds spent in tx.update."""
    grads = self.grad(self.params)
    if self.form == "two-call":
      updates, first = self._timed_update(grads)
      self.params = optax.apply_updates(self.params, updates)
      updates, second = self._timed_update(self.grad(self.params))
      self.params = optax.apply_updates(self.params, updates)
      return first + second
    grad = self.grad
    if self.chunked:
      # m-sharpness: each chunk's gradient comes from grad_fn(params, chunk); the batch here is
      # a dummy the gradient ignores, so the chunks share the problem's gradient.
      kwargs = dict(batch=jnp.zeros((4, 1)), grad_fn=lambda p, b: grad(p))
      grads = None
    elif self.with_index:  # optax.contrib.sam's opaque mode: grad_fn(params, i)
      kwargs = dict(grad_fn=lambda p, i: grad(p))
    elif self.with_aux:  # has_aux=True: grad_fn returns (grads, aux), as the Flax helpers do
      kwargs = dict(grad_fn=lambda p: (grad(p), {"b2": p["b2"]}))
    else:
      kwargs = dict(grad_fn=lambda p: grad(p))
    updates, seconds = self._timed_update(grads, **kwargs)
    self.params = optax.apply_updates(self.params, updates)
    return seconds


def _optax_sam(opaque: bool) -> optax.GradientTransformation:
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
  return optax.contrib.sam(_inner(), adversary, sync_period=2, opaque_mode=opaque)


# name -> (description, form, builder of the transformation, contender options)
CONTENDERS: dict[str, tuple[str, str, Callable[[], Any], dict]] = {
    "optax_sam": ("optax.contrib.sam(opaque_mode=True)", "one-call",
                  lambda: _optax_sam(True), {"calls_grad_fn_with_index": True}),
    "optax_sam_two_call": ("optax.contrib.sam (default two-call mode)", "two-call",
                           lambda: _optax_sam(False), {}),
    "sam": ("sam_optax.sam", "one-call", lambda: sam_optax.sam(_inner(), RHO), {}),
    "sam_two_call": ("sam_optax.sam(two_call=True)", "two-call",
                     lambda: sam_optax.sam(_inner(), RHO, two_call=True), {}),
    "looksam": ("sam_optax.looksam (k=5)", "one-call",
                lambda: sam_optax.looksam(_inner(), RHO, k=5), {}),
    "looksam_two_call": ("sam_optax.looksam (k=5, two_call=True)", "two-call",
                         lambda: sam_optax.looksam(_inner(), RHO, k=5, two_call=True), {}),
    "looksam_aux": ("sam_optax.looksam (k=5, has_aux=True)", "one-call",
                    lambda: sam_optax.looksam(_inner(), RHO, k=5, has_aux=True),
                    {"with_aux": True}),
    "sam_window": ("sam_optax.sam(window=(1, None))", "one-call",
                   lambda: sam_optax.sam(_inner(), RHO, window=(1, None)), {}),
    "sam_window_two_call": ("sam_optax.sam(window=(1, None), two_call=True)", "two-call",
                            lambda: sam_optax.sam(_inner(), RHO, window=(1, None),
                                                  two_call=True), {}),
    "esam": ("sam_optax.esam", "one-call", lambda: sam_optax.esam(_inner(), RHO), {}),
    "esam_two_call": ("sam_optax.esam(two_call=True)", "two-call",
                      lambda: sam_optax.esam(_inner(), RHO, two_call=True), {}),
    "asam": ("sam_optax.asam", "one-call", lambda: sam_optax.asam(_inner()), {}),
    "gsam": ("sam_optax.gsam", "one-call", lambda: sam_optax.gsam(_inner()), {}),
    "momentum_sam": ("sam_optax.momentum_sam", "one-call",
                     lambda: sam_optax.momentum_sam(_inner()), {}),
    "usam2": ("sam_optax.usam2", "one-call", lambda: sam_optax.usam2(_inner()), {}),
    "msharp": ("sam_optax.sam(chunk_size=1), 4 chunks", "one-call",
               lambda: sam_optax.sam(_inner(), RHO, chunk_size=1), {"chunked": True}),
    "msharp_sequential": ("sam_optax.sam(chunk_size=1, chunk_strategy='sequential'), 4 chunks",
                          "one-call", lambda: sam_optax.sam(_inner(), RHO, chunk_size=1,
                                                            chunk_strategy="sequential"),
                          {"chunked": True}),
    "skip_sam": ("skip_if_nonfinite(sam_optax.sam)", "one-call",
                 lambda: sam_optax.skip_if_nonfinite(sam_optax.sam(_inner(), RHO), 5), {}),
    "skip_sam_two_call": ("skip_if_nonfinite(sam_optax.sam(two_call=True))", "two-call",
                          lambda: sam_optax.skip_if_nonfinite(
                              sam_optax.sam(_inner(), RHO, two_call=True), 5), {}),
}

# (ours, optax.contrib.sam's) per form: the targets.
PAIRS = {"one-call": ("sam", "optax_sam"), "two-call": ("sam_two_call", "optax_sam_two_call")}


def run(args) -> dict:
  params, grad = _problem(args.eager_grad)
  names = [n for n in CONTENDERS if not args.only or n in args.only or
           n in {name for pair in PAIRS.values() for name in pair}]
  contenders = []
  for name in names:
    description, form, build, options = CONTENDERS[name]
    contenders.append(Contender(name, description, build(), params, grad, form=form, **options))
  for contender in contenders:
    for _ in range(args.warmup):
      contender.step()
  per_round = {c.name: [] for c in contenders}
  order = list(contenders)
  shuffle = random.Random(0)
  for _ in range(args.rounds):
    shuffle.shuffle(order)
    for contender in order:
      seconds = sum(contender.step() for _ in range(args.steps))
      per_round[contender.name].append(seconds / args.steps)
  results = {}
  for contender in contenders:
    rounds = np.array(per_round[contender.name])
    results[contender.name] = {"description": contender.description, "form": contender.form,
                               "calls_per_step": contender.calls,
                               "median_s": float(np.median(rounds[:, 0])),
                               "median_cpu_s": float(np.median(rounds[:, 1])),
                               "rounds_s": rounds[:, 0].tolist(),
                               "rounds_cpu_s": rounds[:, 1].tolist(),
                               "finite": bool(all(jnp.all(jnp.isfinite(x)) for x in
                                                  jax.tree.leaves(contender.params)))}
  for result in results.values():
    reference = results[PAIRS[result["form"]][1]]
    result["vs_optax"] = result["median_s"] / reference["median_s"]
    result["vs_optax_cpu"] = result["median_cpu_s"] / reference["median_cpu_s"]
  targets = {}
  if not args.smoke:
    for form, (ours, theirs) in PAIRS.items():
      ratio = results[ours]["vs_optax"]
      cpu_ratio = results[ours]["vs_optax_cpu"]
      targets[f"{ours} <= {TARGET}x {theirs}"] = {
          "ratio": ratio, "cpu_ratio": cpu_ratio,
          "holds": (cpu_ratio if args.clock == "cpu" else ratio) <= TARGET}
  return {"settings": {"smoke": args.smoke, "rounds": args.rounds, "steps": args.steps,
                       "warmup": args.warmup, "eager_grad": args.eager_grad,
                       "clock": args.clock},
          "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                      "python": platform.python_version(), "jax": jax.__version__,
                      "optax": optax.__version__, "backend": jax.default_backend()},
          "contenders": results, "targets": targets}


def _print(report: dict) -> None:
  print(f"Eager tx.update per training step (median of {report['settings']['rounds']} rounds "
        f"of {report['settings']['steps']} steps; jax {report['machine']['jax']}, "
        f"{report['machine']['backend']}):\n")
  print("| contender | form | wall ms / step | CPU ms / step | vs optax.contrib.sam, same "
        "form (wall, CPU) |")
  print("|---|---|---|---|---|")
  for name, result in report["contenders"].items():
    print(f"| {name} | {result['form']} | {1e3 * result['median_s']:.2f} | "
          f"{1e3 * result['median_cpu_s']:.2f} | {result['vs_optax']:.2f}x, "
          f"{result['vs_optax_cpu']:.2f}x |")
  for label, target in report["targets"].items():
    print(f"\n{label}: {target['ratio']:.2f}x wall, {target['cpu_ratio']:.2f}x CPU "
          f"({'holds' if target['holds'] else 'FAILS'} on the {report['settings']['clock']} "
          f"clock)", end="")
  print()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="a few steps, no targets")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None, help="steps per contender per round")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps per contender")
  parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                      help="comma-separated contenders (the four sam/optax ones always run)")
  parser.add_argument("--eager-grad", action="store_true",
                      help="an un-jitted jax.grad as the gradient function")
  parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                      help="the clock the targets are judged on: wall time, or the process's "
                           "CPU time (steadier on a machine other processes load)")
  parser.add_argument("--json", default=None, help="also write the results to this file")
  args = parser.parse_args(argv)
  if args.rounds is None:
    args.rounds = 1 if args.smoke else 15
  if args.steps is None:
    args.steps = 2 if args.smoke else 10
  if args.smoke:
    args.warmup = min(args.warmup, 1)
  report = run(args)
  _print(report)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return 0 if all(c["finite"] for c in report["contenders"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
