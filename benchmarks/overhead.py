#!/usr/bin/env python
"""Overhead of sam_optax against the two-gradient limit and against the alternatives.

Exact SAM needs two forward-backward passes per step; a wrapper can only add cost on top of
that. This script times, in one process and side by side:

  * the floor: the inner optimizer alone (one gradient per step);
  * the limit: a hand-written exact SAM step (two gradients, written below in plain JAX);
  * optax.contrib.sam, one-call (opaque mode) and two-call (transparent mode);
  * sam_optax's sam (one- and two-call), asam, gsam, looksam (k=5), momentum_sam, chunked
    m-sharpness (vectorized and sequential), usam2 and husam;
  * the cheaper-than-SAM variants: rst (p=0.5), ae_sam, ae_looksam, sampa (one device, the two
    points sequential or vmapped), K-SAM (`top_k_examples` with k = batch/4, then sam) and the
    partial-batch ascent recipe (the clean gradient on a quarter of the batch, the descent on
    all of it);
  * the modern variants gcsam, sagm, gsam with big_vision's options
    (adaptive_perturbation, minimize_fp=False), accelerated GAM (four gradients), sparse_sam
    with its dynamic mask and with its Fisher mask (the Fisher of batch/4 examples, one at a
    time, every 5 steps), and lookbehind_sam (k=2: three gradients, two inner steps per step)
  * sam under `dynamic_loss_scale` (both passes' losses scaled, both gradients unscaled, the
    step's finiteness tested: the float16 recipe's cost on top of sam)

on an MLP, a small ResNet-style CNN and a small Transformer (benchmarks/models.py). A
contender whose constructor this version of sam_optax lacks is reported "missing" and skipped.

Method. Every training step is a jitted function `(params, state, batch) -> (params, state)`
that computes the gradient(s) and applies the update, with params and state donated, compiled
once ahead of time. A two-call contender is timed the way its user runs it: two calls of that
jitted function (each computes the gradient at the params it holds and calls `tx.update`) make
one training step. After a warm-up, `--rounds` rounds each run every contender for `--steps`
steps, in a freshly shuffled order, ending with `jax.block_until_ready`; the per-step time of a
contender is the median over rounds. LookSAM's step time is the mean over whole cycles of k
steps (one full step and k-1 cheap ones). A second copy of the hand-written step
("handwritten_rerun") measures the run's noise: its ratio to the hand-written step should be 1.
Memory is read from XLA's memory analysis of each compiled step (`temp_size_in_bytes`: the
scratch memory the step needs beyond its arguments and outputs).

Gradient evaluations per step are measured, not computed: after the timed rounds, each
contender is compiled a second time with a counter in its gradient function (a host callback on
one entry of every gradient, adding the fraction of the batch it was taken on) and runs the same
trajectory as its timed runs (warm-up and rounds, from the same start). A gradient in a branch
not taken (`lax.cond`) is not counted, nor one the step never reads (dead code, as in the timed
build); one on a quarter of the batch counts 1/4; a vmapped gradient counts once per mapped
element; a Hessian-vector product (forward-over-reverse) is counted apart ("+ 1.000 HVP").
Forward-only passes (K-SAM's ranking) are not counted. The timed executables carry no
counter, except with `--count inline` (the smoke run's default: one compilation per contender).

Targets (ratios of medians in one run; printed with whether each holds):
  * sam (one-call) <= 1.02x the hand-written step, and <= optax.contrib.sam (one-call);
  * sam (one-call) compiled temporary memory <= the hand-written step's + 2%;
  * sam (two-call), the pair of calls, <= 1.05x the hand-written step;
  * looksam (k=5) <= 1.3x the floor; momentum_sam <= 1.05x the floor;
  * vectorized m-sharpness <= 1.15x sam.

Usage::

    python benchmarks/overhead.py                       # full run (a few minutes on 2 CPU cores)
    python benchmarks/overhead.py --smoke               # tiny sizes, no thresholds (CI)
    python benchmarks/overhead.py --models mlp,cnn --rounds 30
    python benchmarks/overhead.py --dtype bfloat16      # on a GPU: larger models, bfloat16
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import inspect
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

# On CPU, XLA runs single-threaded unless --multithreaded is given (set before JAX starts): the
# per-step CPU time of a single-threaded step measures its work, whatever else the machine runs.
_SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
if "--multithreaded" not in sys.argv and "xla_cpu_multi_thread_eigen" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _SINGLE_THREAD_FLAGS).strip()
try:
  import sam_optax  # noqa: F401
except ImportError:  # running from a checkout without installing the package
  sys.path.insert(0, os.path.join(_HERE, os.pardir))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

import models as benchmark_models
import sam_optax

DEFAULT_OUT = os.path.join("benchmarks", "results", "overhead.json")

RHO = 0.05
LR = 1e-3
LOOKSAM_K = 5
LOOKBEHIND_K = 2  # the authors' README default
CHUNK_SIZE_FRACTION = 4  # m-sharpness: the batch is split into this many chunks
SUBSET_FRACTION = 4  # K-SAM keeps batch/4 examples; the partial ascent takes batch/4
RST_PROBABILITY = 0.5


# Smoke mode checks that every contender builds, compiles and runs; it skips the backend's
# expensive optimization passes, which dominate its runtime on CPU.
SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


class Missing(Exception):
  """A contender whose constructor does not exist in this version of sam_optax."""


def _constructor(name: str) -> Callable:
  if not hasattr(sam_optax, name):
    raise Missing(f"sam_optax.{name} does not exist")
  return getattr(sam_optax, name)


def _inner() -> optax.GradientTransformation:
  """The inner optimizer every contender wraps: heavy-ball SGD, the usual SAM companion."""
  return optax.sgd(LR, momentum=0.9)


class GradientCounter:
  """Counts each contender's gradient evaluations at run time, in full-batch units.

  `_grad` reads `building` when a step is built (traced): the contender's name while a counting
  build is made, else None, so the timed builds carry no counter (except with `--count inline`).
  """

  def __init__(self):
    self.building = None
    self.totals = collections.defaultdict(float)

  def add(self, name, fraction, token):
    self.totals[name] += fraction
    return token


COUNTER = GradientCounter()


def _callback(name: str, fraction: float, x):
  return jax.pure_callback(functools.partial(COUNTER.add, name, fraction),
                           jax.ShapeDtypeStruct(x.shape, x.dtype), x, vmap_method="sequential")


def _tap(name: str, fraction: float) -> Callable:
  """The identity on a scalar, counting `fraction` for `name` each time it runs.

  A `pure_callback`, not a `debug.callback`: an unused result is dead code, so a gradient the
  step computes but never reads (XLA removes it from the timed build) is not counted either.
  Sequential under vmap (once per mapped element). Under jvp, the tangent counts for
  `name + ":hvp"`: a Hessian-vector product (forward-over-reverse) is counted apart, and the
  gradient it differentiates only if its value is used.
  """
  @jax.custom_jvp
  def tap(x):
    return _callback(name, fraction, x)

  @tap.defjvp
  def tap_jvp(primals, tangents):
    return tap(primals[0]), _callback(name + ":hvp", fraction, tangents[0])

  return tap


def _grad(problem, loss: Callable | None = None) -> Callable:
  """`jax.grad(problem.loss)` (or of `loss(params, batch, *rest)`); in a counting build, one
  entry of each gradient passes `_tap`."""
  grad = jax.grad(problem.loss if loss is None else loss)
  name = COUNTER.building
  if name is None:
    return grad
  full = problem.batch_size

  def counted(params, batch, *rest):
    g = grad(params, batch, *rest)
    fraction = jax.tree.leaves(batch)[0].shape[0] / full  # static: a sub-batch counts its share
    leaves, treedef = jax.tree.flatten(g)
    flat = jnp.ravel(leaves[0])
    leaves[0] = flat.at[0].set(_tap(name, fraction)(flat[0])).reshape(leaves[0].shape)
    return jax.tree.unflatten(treedef, leaves)

  return counted


# ------------------------------------------------------------------------------------------
# Step functions. Each returns `step(params, state, batch) -> (params, state)` and the initial
# state; `calls` is how many calls of `step` make one training step.


@dataclasses.dataclass
class Built:
  step: Callable
  state: Any
  calls: int = 1          # calls of `step` per training step (2 for two-call forms)
  cycle: int = 1          # time steps in multiples of this (LookSAM's k)


def floor_step(problem) -> Built:
  """The inner optimizer alone: one gradient per step."""
  opt = _inner()
  grad = _grad(problem)

  def step(params, state, batch):
    updates, state = opt.update(grad(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  return Built(step, opt.init(problem.params))


def handwritten_step(problem) -> Built:
  """Exact SAM written by hand, as in Foret et al.'s code: two gradients, no wrapper.

  The global norm is accumulated in float32 (what a careful user writes for bfloat16 params) and
  guarded by adding 1e-12, as the reference implementation does.
  """
  opt = _inner()
  grad = _grad(problem)

  def step(params, state, batch):
    g = grad(params, batch)
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g))
    scale = RHO / (jnp.sqrt(sq) + 1e-12)
    perturbed = jax.tree.map(lambda w, x: w + (scale * x).astype(w.dtype), params, g)
    g_adv = grad(perturbed, batch)
    updates, state = opt.update(g_adv, state, params)
    return optax.apply_updates(params, updates), state

  return Built(step, opt.init(problem.params))


def handwritten_momentum_sam_step(problem) -> Built:
  """Momentum-SAM written by hand at its cheapest: the perturbation is read from the inner SGD's
  momentum buffer (the direction of the last update), so no extra state; one gradient."""
  opt = _inner()
  grad = _grad(problem)

  def step(params, state, batch):
    trace = state[0].trace  # optax.sgd(momentum=...): (TraceState, ...)
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(trace))
    scale = -RHO / (jnp.sqrt(sq) + 1e-12)  # the last update is -lr * trace
    perturbed = jax.tree.map(lambda w, v: w + (scale * v).astype(w.dtype), params, trace)
    updates, state = opt.update(grad(perturbed, batch), state, params)
    return optax.apply_updates(params, updates), state

  return Built(step, opt.init(problem.params))


def handwritten_msharp_step(problem) -> Built:
  """m-sharpness written by hand with `jax.vmap` over chunks: each chunk's own SAM perturbation
  and perturbed gradient, averaged. The limit the vectorized chunked form competes with."""
  opt = _inner()
  grad = _grad(problem)
  chunks = CHUNK_SIZE_FRACTION

  def chunk_grad(params, chunk):
    g = grad(params, chunk)
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g))
    scale = RHO / (jnp.sqrt(sq) + 1e-12)
    return grad(jax.tree.map(lambda w, x: w + (scale * x).astype(w.dtype), params, g), chunk)

  def step(params, state, batch):
    split = jax.tree.map(lambda x: x.reshape((chunks, -1) + x.shape[1:]), batch)
    g_adv = jax.tree.map(lambda x: jnp.mean(x, axis=0),
                         jax.vmap(chunk_grad, in_axes=(None, 0))(params, split))
    updates, state = opt.update(g_adv, state, params)
    return optax.apply_updates(params, updates), state

  return Built(step, opt.init(problem.params))


def one_call_step(problem, tx, *, calls_grad_fn_with_index=False, cycle=1) -> Built:
  """The user's one-call step: g computed by the caller, `grad_fn` evaluated by the transformation."""
  grad = _grad(problem)

  def step(params, state, batch):
    if calls_grad_fn_with_index:  # optax.contrib.sam's opaque mode: grad_fn(params, i)
      grad_fn = lambda p, i: grad(p, batch)
    else:
      grad_fn = lambda p: grad(p, batch)
    updates, state = tx.update(grad(params, batch), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return Built(step, tx.init(problem.params), cycle=cycle)


def loss_scaled_step(problem, tx) -> Built:
  """The float16 recipe's one-call step: both passes differentiate the loss times the state's
  loss scale (`sam_optax.loss_scale`), which `dynamic_loss_scale` divides out of both
  gradients. The benchmark's losses never overflow at the default scale: every step is taken."""
  grad = _grad(problem, lambda params, batch, scale: scale * problem.loss(params, batch))

  def step(params, state, batch):
    scale = sam_optax.loss_scale(state)
    grad_fn = lambda p: grad(p, batch, scale)
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return Built(step, tx.init(problem.params))


def two_call_step(problem, tx) -> Built:
  """One call of the user's two-call loop: gradient at the params held, then `tx.update`."""
  grad = _grad(problem)

  def step(params, state, batch):
    updates, state = tx.update(grad(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  return Built(step, tx.init(problem.params), calls=2)


def chunked_step(problem, tx) -> Built:
  """m-sharpness: the transformation computes each chunk's clean and perturbed gradients."""
  grad = _grad(problem)

  def step(params, state, batch):
    updates, state = tx.update(None, state, params, batch=batch, grad_fn=grad)
    return optax.apply_updates(params, updates), state

  return Built(step, tx.init(problem.params))


def gradient_free_clean_step(problem, tx) -> Built:
  """SAMPa's step: the transformation never reads the caller's clean gradient, so the caller
  passes zeros (as its docstring says) and computes none."""
  grad = _grad(problem)

  def step(params, state, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, state, params, grad_fn=lambda p: grad(p, batch))
    return optax.apply_updates(params, updates), state

  return Built(step, tx.init(problem.params))


def _subset_size(problem) -> int:
  return max(1, problem.batch_size // SUBSET_FRACTION)


def top_k_step(problem, tx) -> Built:
  """K-SAM: one forward pass ranks the batch, both passes of `tx` take the k highest losses."""
  grad = _grad(problem)
  k = _subset_size(problem)

  def step(params, state, batch):
    sub = sam_optax.top_k_examples(problem.per_example_loss, params, batch, k)
    updates, state = tx.update(grad(params, sub), state, params, grad_fn=lambda p: grad(p, sub))
    return optax.apply_updates(params, updates), state

  return Built(step, tx.init(problem.params))


def partial_ascent_step(problem, tx) -> Built:
  """The cheaper-ascent recipe, no feature needed: the clean gradient (which only sets the
  ascent's direction) on the first batch/4 examples, the descent gradient on the whole batch."""
  grad = _grad(problem)
  k = _subset_size(problem)

  def step(params, state, batch):
    part = jax.tree.map(lambda x: x[:k], batch)
    updates, state = tx.update(grad(params, part), state, params,
                               grad_fn=lambda p: grad(p, batch))
    return optax.apply_updates(params, updates), state

  return Built(step, tx.init(problem.params))


SPARSE_EVERY = 5  # sparse_sam's mask period in steps


def sparse_fisher_step(problem, tx) -> Built:
  """Sparse SAM's Fisher mask: `fisher_fn` is `sam_optax.fisher_diagonal`'s rule (the squared
  gradients of single-example batches, vmapped, summed) on the first batch/4 examples, written
  over the benchmark's gradient so that the counting build counts it (each 1/batch of a
  gradient, on the mask's update steps only)."""
  grad = _grad(problem)
  k = _subset_size(problem)

  def fisher(params, samples):
    one = lambda example: grad(params, jax.tree.map(lambda x: x[None], example))
    per_example = jax.vmap(one)(samples)
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0),
                        per_example)

  def step(params, state, batch):
    samples = jax.tree.map(lambda x: x[:k], batch)
    updates, state = tx.update(grad(params, batch), state, params,
                               grad_fn=lambda p: grad(p, batch),
                               fisher_fn=lambda p: fisher(p, samples))
    return optax.apply_updates(params, updates), state

  return Built(step, tx.init(problem.params))


def _chunk_size(problem) -> int:
  return max(1, problem.batch_size // CHUNK_SIZE_FRACTION)


def _optax_sam(opaque: bool):
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
  return optax.contrib.sam(_inner(), adversary, sync_period=2, opaque_mode=opaque)


def _gsam_big_vision():
  """GSAM with big_vision's two options away from their defaults (missing where this gsam
  lacks them)."""
  gsam = _constructor("gsam")
  if "adaptive_perturbation" not in inspect.signature(gsam).parameters:
    raise Missing("sam_optax.gsam has no adaptive_perturbation option")
  return gsam(_inner(), adaptive_perturbation=True, minimize_fp=False)


# name -> (description, gradient evaluations per step, builder)
CONTENDERS: dict[str, tuple[str, str, Callable]] = {
    "floor": ("inner optimizer alone", "1", floor_step),
    "handwritten": ("hand-written exact SAM", "2", handwritten_step),
    "handwritten_rerun": ("the same, timed again (noise control)", "2", handwritten_step),
    "optax_sam": ("optax.contrib.sam, opaque (one call)", "2",
                  lambda p: one_call_step(p, _optax_sam(True), calls_grad_fn_with_index=True)),
    "optax_sam_two_call": ("optax.contrib.sam, transparent (two calls)", "2",
                           lambda p: two_call_step(p, _optax_sam(False))),
    "sam": ("sam_optax.sam, one call", "2",
            lambda p: one_call_step(p, sam_optax.sam(_inner(), RHO))),
    "sam_two_call": ("sam_optax.sam, two calls", "2",
                     lambda p: two_call_step(p, sam_optax.sam(_inner(), RHO, two_call=True))),
    "asam": ("sam_optax.asam", "2",
             lambda p: one_call_step(p, _constructor("asam")(_inner()))),
    "gsam": ("sam_optax.gsam", "2",
             lambda p: one_call_step(p, _constructor("gsam")(_inner()))),
    "looksam": (f"sam_optax.looksam, k={LOOKSAM_K}", f"1+1/{LOOKSAM_K}",
                lambda p: one_call_step(p, _constructor("looksam")(_inner(), k=LOOKSAM_K),
                                        cycle=LOOKSAM_K)),
    "handwritten_momentum_sam": ("hand-written Momentum-SAM (reads the SGD momentum)", "1",
                                 handwritten_momentum_sam_step),
    "momentum_sam": ("sam_optax.momentum_sam", "1",
                     lambda p: one_call_step(p, _constructor("momentum_sam")(_inner()))),
    "handwritten_msharp": (f"hand-written m-sharpness, {CHUNK_SIZE_FRACTION} chunks (vmap)", "2",
                           handwritten_msharp_step),
    "msharp_vectorized": (f"sam, m-sharpness, {CHUNK_SIZE_FRACTION} chunks (vmap)", "2",
                          lambda p: chunked_step(p, sam_optax.sam(
                              _inner(), RHO, chunk_size=_chunk_size(p),
                              chunk_strategy="vectorized"))),
    "msharp_sequential": (f"sam, m-sharpness, {CHUNK_SIZE_FRACTION} chunks (scan)", "2",
                          lambda p: chunked_step(p, sam_optax.sam(
                              _inner(), RHO, chunk_size=_chunk_size(p),
                              chunk_strategy="sequential"))),
    "usam2": ("sam_optax.usam2", "3",
              lambda p: one_call_step(p, _constructor("usam2")(_inner()))),
    "husam": ("sam_optax.husam", "2+HVP",
              lambda p: one_call_step(p, _constructor("husam")(_inner()))),
    # The cheaper-than-SAM variants. Their constructors are looked up when built, so
    # this script runs with and without them.
    "rst": (f"sam_optax.rst, p={RST_PROBABILITY}", f"1+p = {1 + RST_PROBABILITY:g} expected",
            lambda p: one_call_step(p, _constructor("rst")(
                _inner(), RHO, probability=RST_PROBABILITY))),
    "ae_sam": ("sam_optax.ae_sam, defaults", "1+share of SAM steps",
               lambda p: one_call_step(p, _constructor("ae_sam")(_inner(), RHO))),
    "ae_looksam": ("sam_optax.ae_looksam, defaults", "1+share of SAM steps",
                   lambda p: one_call_step(p, _constructor("ae_looksam")(_inner(), RHO))),
    "sampa": ("sam_optax.sampa, one device, points in sequence", "2",
              lambda p: gradient_free_clean_step(p, _constructor("sampa")(
                  _inner(), evaluation="sequential"))),
    "sampa_vmap": ("sam_optax.sampa, one device, points vmapped", "2",
                   lambda p: gradient_free_clean_step(p, _constructor("sampa")(
                       _inner(), evaluation="vmap"))),
    "ksam": (f"K-SAM: top_k_examples (k = batch/{SUBSET_FRACTION}), then sam",
             f"2 x 1/{SUBSET_FRACTION} + 1 forward",
             lambda p: top_k_step(p, sam_optax.sam(_inner(), RHO))),
    "partial_ascent": (f"sam, clean gradient on batch/{SUBSET_FRACTION} (recipe)",
                       f"1 + 1/{SUBSET_FRACTION}",
                       lambda p: partial_ascent_step(p, sam_optax.sam(_inner(), RHO))),
    # Issue 16's modern variants (looked up when built, like the cheaper-than-SAM ones).
    "gcsam": ("sam_optax.gcsam (centralized ascent)", "2",
              lambda p: one_call_step(p, _constructor("gcsam")(_inner(), RHO))),
    "sagm": ("sam_optax.sagm, alpha=0.001", "2",
             lambda p: one_call_step(p, _constructor("sagm")(_inner(), RHO, alpha=0.001))),
    "gsam_big_vision": ("sam_optax.gsam, adaptive_perturbation, minimize_fp=False", "2",
                        lambda p: one_call_step(p, _gsam_big_vision())),
    "gam": ("sam_optax.gam (accelerated GAM, the authors' CIFAR-10 defaults)", "4",
            lambda p: one_call_step(p, _constructor("gam")(_inner()))),
    "sparse_sam_dynamic": (f"sam_optax.sparse_sam, dynamic mask, s=0.5, every {SPARSE_EVERY}",
                           "2", lambda p: one_call_step(p, _constructor("sparse_sam")(
                               _inner(), RHO, 0.5, "dynamic", update_every=SPARSE_EVERY))),
    "sparse_sam_fisher": (f"sam_optax.sparse_sam, Fisher mask, s=0.5, every {SPARSE_EVERY}",
                          f"2 + 1/({SUBSET_FRACTION} x {SPARSE_EVERY}) (Fisher)",
                          lambda p: sparse_fisher_step(p, _constructor("sparse_sam")(
                              _inner(), RHO, 0.5, "fisher", update_every=SPARSE_EVERY))),
    "sam_loss_scale": ("sam under sam_optax.dynamic_loss_scale (Flax's DynamicScale)", "2",
                       lambda p: loss_scaled_step(p, _constructor("dynamic_loss_scale")(
                           sam_optax.sam(_inner(), RHO)))),
    "lookbehind_sam": (f"sam_optax.lookbehind_sam, k={LOOKBEHIND_K}, alpha=0.5",
                       f"k+1 = {LOOKBEHIND_K + 1}",
                       lambda p: one_call_step(p, _constructor("lookbehind_sam")(
                           _inner(), RHO, k=LOOKBEHIND_K, alpha=0.5))),
}

# (label, contender, reference, bound): contender's time (or memory) <= bound x reference's.
TIME_TARGETS = (
    ("sam <= 1.02x hand-written", "sam", "handwritten", 1.02),
    ("sam <= optax one-call", "sam", "optax_sam", 1.00),
    ("two-call sam <= 1.05x hand-written", "sam_two_call", "handwritten", 1.05),
    ("looksam (k=5) <= 1.3x floor", "looksam", "floor", 1.30),
    ("momentum_sam <= 1.05x floor", "momentum_sam", "floor", 1.05),
    ("vectorized m-sharpness <= 1.15x sam", "msharp_vectorized", "sam", 1.15),
)
MEMORY_TARGETS = (
    ("sam temp memory <= hand-written + 2%", "sam", "handwritten", 1.02),
)


# ------------------------------------------------------------------------------------------
# Measurement.


@dataclasses.dataclass
class Runner:
  name: str
  compiled: Any
  params: Any
  state: Any
  calls: int
  cycle: int
  times: list = dataclasses.field(default_factory=list)

  cpu_times: list = dataclasses.field(default_factory=list)
  steps_run: int = 0  # training steps so far (warm-up included): the counting run repeats them

  def run(self, steps: int, batch) -> tuple[float, float]:
    """Runs `steps` training steps; returns (wall seconds, process CPU seconds) per step."""
    params, state = self.params, self.state
    self.steps_run += steps
    cpu_start, start = time.process_time(), time.perf_counter()
    for _ in range(steps * self.calls):
      params, state = self.compiled(params, state, batch)
    jax.block_until_ready((params, state))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    self.params, self.state = params, state
    return elapsed / steps, cpu / steps


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _memory(compiled) -> dict:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return {}
  if analysis is None:
    return {}
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


def _hlo_ops(compiled) -> int | None:
  """Instructions in the optimized HLO's entry computation (a rough measure of added work)."""
  try:
    text = compiled.as_text()
  except Exception:
    return None
  entry = text[text.find("ENTRY"):]
  body = entry[:entry.find("\n}")]
  return sum(1 for line in body.splitlines()[1:] if " = " in line)


def build_runners(problem, names, log, compiler_options=None,
                  counted=False) -> tuple[dict, dict]:
  """Compiles each contender's step; returns (runners, static info per contender).

  `counted`: the steps carry the gradient counter (`--count inline`).
  """
  runners, info, compiled_by_builder = {}, {}, {}
  for name in names:
    description, grads, builder = CONTENDERS[name]
    entry = {"description": description, "gradients_per_step": grads}
    info[name] = entry
    COUNTER.building = name if counted else None
    try:
      built = builder(problem)
    except Missing as missing:
      entry["status"] = "missing"
      entry["reason"] = str(missing)
      log(f"  {name:20s} missing ({missing}); skipped")
      continue
    finally:
      COUNTER.building = None
    start = time.perf_counter()
    # Copied: a state whose leaves share one buffer cannot be donated (XLA refuses to donate a
    # buffer twice); fresh copies are what a restored checkpoint would give.
    params, state = _copy(problem.params), _copy(built.state)
    if builder in compiled_by_builder and not counted:  # the noise control reuses hand-written's
      compiled = compiled_by_builder[builder]
    else:
      jitted = jax.jit(built.step, donate_argnums=(0, 1))
      compiled = jitted.lower(params, state, problem.batch).compile(compiler_options)
      compiled_by_builder[builder] = compiled
    entry.update(status="ok", calls_per_step=built.calls, cycle=built.cycle,
                 compile_seconds=time.perf_counter() - start, memory=_memory(compiled),
                 hlo_entry_instructions=_hlo_ops(compiled))
    runners[name] = Runner(name, compiled, params, state, built.calls, built.cycle)
    log(f"  {name:20s} compiled in {entry['compile_seconds']:.1f}s")
  return runners, info


def measure(problem, names, *, rounds, steps, warmup, seed, log, clock,
            compiler_options=None, count="separate") -> dict:
  runners, info = build_runners(problem, names, log, compiler_options,
                                counted=(count == "inline"))
  batch = problem.batch
  cycle = int(np.lcm.reduce([r.cycle for r in runners.values()] or [1]))
  steps = max(cycle, steps // cycle * cycle)
  for runner in runners.values():  # warm-up: whole cycles, results discarded
    runner.run(max(warmup, 1) * runner.cycle, batch)
  rng = random.Random(seed)
  order = list(runners)
  for _ in range(rounds):
    rng.shuffle(order)
    for name in order:
      wall, cpu = runners[name].run(steps, batch)
      runners[name].times.append(wall)
      runners[name].cpu_times.append(cpu)
  for name, runner in runners.items():
    wall, cpu = np.asarray(runner.times), np.asarray(runner.cpu_times)
    chosen = cpu if clock == "cpu" else wall
    info[name].update(
        median_s=float(np.median(chosen)),
        relative_iqr=float((np.percentile(chosen, 75) - np.percentile(chosen, 25))
                           / np.median(chosen)),
        wall_median_s=float(np.median(wall)), cpu_median_s=float(np.median(cpu)),
        wall_s=wall.tolist(), cpu_s=cpu.tolist(),
        rounds=len(wall), steps_per_round=steps, steps_run=runner.steps_run, finite=bool(all(
            np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(runner.params))))
  if count == "separate":
    count_gradients(problem, runners, info, log, compiler_options)
  elif count == "inline":
    for name, runner in runners.items():
      _record_count(info[name], name, runner.steps_run)
  return info


def _record_count(entry, name, steps) -> None:
  entry.update(gradients_measured=COUNTER.totals[name] / steps,
               hvps_measured=COUNTER.totals[name + ":hvp"] / steps, counted_steps=steps)


def count_gradients(problem, runners, info, log, compiler_options=None) -> None:
  """Measures each contender's gradient evaluations per step at run time (see the docstring).

  Each contender is rebuilt with the counting `_grad`, compiled, and run over the steps its timed
  runs took, from the same start; adds `gradients_measured` (per training step) to its entry.
  """
  batch = problem.batch
  for name, runner in runners.items():
    COUNTER.building = name  # read while the step is built and traced
    try:
      built = CONTENDERS[name][2](problem)
      params, state = _copy(problem.params), _copy(built.state)
      compiled = jax.jit(built.step, donate_argnums=(0, 1)).lower(
          params, state, batch).compile(compiler_options)
    finally:
      COUNTER.building = None
    COUNTER.totals[name] = COUNTER.totals[name + ":hvp"] = 0.0
    for _ in range(runner.steps_run * built.calls):
      params, state = compiled(params, state, batch)
    jax.block_until_ready((params, state))
    _record_count(info[name], name, runner.steps_run)
    log(f"  {name:20s} {_fmt_count(info[name])} gradients/step "
        f"(counted over {runner.steps_run} steps)")


def ratios(info: dict) -> None:
  """Adds time ratios to the hand-written step and the floor, and the temp-memory ratio."""
  def median(name):
    entry = info.get(name, {})
    return entry.get("median_s") if entry.get("status") == "ok" else None

  def temp(name):
    entry = info.get(name, {})
    return entry.get("memory", {}).get("temp_size_in_bytes") if entry.get("status") == "ok" else None

  hand, floor, hand_temp = median("handwritten"), median("floor"), temp("handwritten")
  for name, entry in info.items():
    t = median(name)
    if t is None:
      continue
    entry["vs_handwritten"] = t / hand if hand else None
    entry["vs_floor"] = t / floor if floor else None
    m = temp(name)
    entry["temp_vs_handwritten"] = (m / hand_temp if (m is not None and hand_temp) else None)


def check_targets(info: dict) -> list:
  results = []
  for kind, targets in (("time", TIME_TARGETS), ("memory", MEMORY_TARGETS)):
    for label, name, reference, bound in targets:
      a, b = info.get(name, {}), info.get(reference, {})
      if a.get("status") != "ok" or b.get("status") != "ok":
        results.append({"target": label, "kind": kind, "ratio": None, "bound": bound,
                        "holds": None})
        continue
      if kind == "time":
        ratio = a["median_s"] / b["median_s"]
      else:
        ma = a["memory"].get("temp_size_in_bytes")
        mb = b["memory"].get("temp_size_in_bytes")
        ratio = ma / mb if (ma is not None and mb) else (1.0 if ma == mb == 0 else None)
      results.append({"target": label, "kind": kind, "ratio": ratio, "bound": bound,
                      "holds": None if ratio is None else bool(ratio <= bound)})
  return results


# ------------------------------------------------------------------------------------------
# Reporting.


def machine() -> dict:
  devices = jax.devices()
  return {
      "platform": platform.platform(),
      "processor": _cpu_model() or platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
      "optax": optax.__version__,
      "sam_optax": getattr(sam_optax, "__version__", None),
      "backend": jax.default_backend(),
      "devices": f"{len(devices)} x {devices[0].device_kind}",
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
  }


def _version(package):
  try:
    from importlib import metadata
    return metadata.version(package)
  except Exception:
    return None


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def _fmt_count(entry):
  grads, hvps = entry.get("gradients_measured"), entry.get("hvps_measured")
  if grads is None:
    return ""
  return f"{grads:.3f}" + (f" + {hvps:.3f} HVP" if hvps else "")


def _fmt_ratio(x):
  return "" if x is None else f"{x:.3f}"


def _fmt_time(seconds):
  if seconds is None:
    return ""
  return f"{seconds * 1e3:.2f}" if seconds < 10 else f"{seconds:.1f}s"


def _fmt_bytes(n):
  if n is None:
    return ""
  return f"{n / 2 ** 20:.2f}"


def markdown(report: dict) -> str:
  lines = []
  m = report["machine"]
  lines.append(f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}; backend "
               f"{m['backend']} ({m['devices']}); jax {m['jax']}, optax {m['optax']}, Python "
               f"{m['python']}. {report['settings']['rounds']} interleaved rounds x "
               f"{report['settings']['steps']} steps; median {report['settings']['clock']} "
               f"time per step" + (" (process CPU time, XLA single-threaded)"
                                   if report['settings']['clock'] == "cpu" else "") + ".")
  for model, result in report["models"].items():
    info = result["contenders"]
    lines.append("")
    lines.append(f"**{model}** ({result['description']}, {result['num_params']:,} params)")
    lines.append("")
    # "grads/step, measured": the run-time count (full-batch units); "expected": the rule's.
    lines.append("| contender | grads/step, expected | grads/step, measured | vs floor | ms/step "
                 "| vs hand-written | temp MiB | temp vs hand-written |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, entry in info.items():
      if entry.get("status") != "ok":
        lines.append(f"| {name} | {entry['gradients_per_step']} | | {entry.get('status')} | | | "
                     f"| |")
        continue
      lines.append(
          f"| {name} | {entry['gradients_per_step']} | {_fmt_count(entry)} | "
          f"{_fmt_ratio(entry.get('vs_floor'))} | {_fmt_time(entry['median_s'])} | "
          f"{_fmt_ratio(entry.get('vs_handwritten'))} | "
          f"{_fmt_bytes(entry['memory'].get('temp_size_in_bytes'))} | "
          f"{_fmt_ratio(entry.get('temp_vs_handwritten'))} |")
    if result.get("targets"):
      lines.append("")
      lines.append("| target | ratio | holds |")
      lines.append("|---|---|---|")
      for t in result["targets"]:
        holds = {True: "yes", False: "**no**", None: "n/a"}[t["holds"]]
        lines.append(f"| {t['target']} | {_fmt_ratio(t['ratio'])} | {holds} |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes, one round, no thresholds (CI; well under a minute)")
  p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
  p.add_argument("--models", default=",".join(benchmark_models.MODELS),
                 help="comma-separated subset of " + ",".join(benchmark_models.MODELS))
  p.add_argument("--contenders", default=",".join(CONTENDERS),
                 help="comma-separated subset of the contenders (default: all)")
  p.add_argument("--size", choices=sorted(benchmark_models.SIZES), default=None,
                 help="model sizes (default: gpu on a GPU, cpu otherwise; smoke with --smoke)")
  p.add_argument("--dtype", default=None,
                 help="params dtype (default: bfloat16 on a GPU, float32 otherwise)")
  p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15; smoke 1)")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps per contender per round (default 10; smoke 5)")
  p.add_argument("--warmup", type=int, default=2, help="warm-up steps (or LookSAM cycles)")
  p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                 help="what the medians and targets use: process CPU time per step (robust on a "
                      "shared machine) or wall time; auto: cpu on a CPU backend, wall otherwise. "
                      "Both are recorded in the JSON.")
  p.add_argument("--multithreaded", action="store_true",
                 help="let XLA use several threads on CPU (default: one, see --clock)")
  p.add_argument("--count", choices=("separate", "inline", "off"), default=None,
                 help="how gradient evaluations per step are counted: separate (a second, "
                      "counting compilation of every contender, run after the timed rounds "
                      "over the same steps; default), inline (the timed steps carry the "
                      "counter; default with --smoke, whose timings are not read) or off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--markdown", default=None, help="also write the tables to this file")
  args = p.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if args.size is None:
    args.size = "smoke" if args.smoke else ("gpu" if on_gpu else "cpu")
  if args.dtype is None:
    args.dtype = "bfloat16" if (on_gpu and not args.smoke) else "float32"
  if args.clock == "auto":
    args.clock = "cpu" if jax.default_backend() == "cpu" else "wall"
  if args.rounds is None:
    args.rounds = 1 if args.smoke else 25
  if args.steps is None:
    args.steps = LOOKSAM_K
  if args.smoke:
    args.warmup = 1
  if args.count is None:
    args.count = "inline" if args.smoke else "separate"
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
  for c in args.contenders:
    if c not in CONTENDERS:
      p.error(f"unknown contender {c!r}; choose among {', '.join(CONTENDERS)}")
  for required in ("floor", "handwritten"):
    if required not in args.contenders:
      args.contenders.insert(0, required)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  log = lambda *a: print(*a, flush=True)
  start = time.perf_counter()
  report = {
      "machine": machine(),
      "settings": {"smoke": args.smoke, "size": args.size, "dtype": args.dtype,
                   "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                   "clock": args.clock, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                   "rho": RHO, "learning_rate": LR, "inner": "optax.sgd(lr, momentum=0.9)",
                   "looksam_k": LOOKSAM_K, "chunks": CHUNK_SIZE_FRACTION,
                   "subset_fraction": SUBSET_FRACTION, "rst_probability": RST_PROBABILITY,
                   "gradient_count": args.count,
                   "timing": "median over rounds of (time of `steps` steps) / steps, rounds "
                             "interleaved in shuffled order; two-call forms: two jitted calls "
                             "per step"},
      "models": {},
  }
  for model in args.models:
    problem = benchmark_models.make(model, args.size, jnp.dtype(args.dtype), seed=args.seed)
    log(f"{model}: {problem.description}, {problem.num_params:,} params")
    info = measure(problem, args.contenders, rounds=args.rounds, steps=args.steps,
                   warmup=args.warmup, seed=args.seed, log=log, clock=args.clock,
                   compiler_options=SMOKE_COMPILER_OPTIONS if args.smoke else None,
                   count=args.count)
    ratios(info)
    result = {"description": problem.description, "num_params": problem.num_params,
              "contenders": info}
    if not args.smoke:
      result["targets"] = check_targets(info)
    report["models"][model] = result
  report["machine"]["load_average_end"] = (list(os.getloadavg()) if hasattr(os, "getloadavg")
                                           else None)
  report["seconds"] = time.perf_counter() - start
  table = markdown(report)
  log("")
  log(table)
  log(f"\nTotal {report['seconds']:.0f}s.")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
    log(f"Wrote {args.out}")
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")
  return report


if __name__ == "__main__":
  main()
