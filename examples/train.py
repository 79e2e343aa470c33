"""The main job: what SAM is for. Noisy-label digits, SGD against SAM and its cheaper variants.

The default run (164 s measured on a 2-core CPU machine, compilation included) trains
a Flax NNX MLP (64-256-10) on scikit-learn's 8x8 digits with 40% of the training labels
corrupted, and compares SGD with SAM and nine of its variants. Each method's radius is chosen
on a validation split (noisy, like the training set); the clean test split is never used for a
choice. It prints a table (test accuracy, gradient evaluations per step, time per step
relative to SGD, top Hessian eigenvalue; mean +- std over seeds), and writes
`<out-dir>/frontier.png` (accuracy against cost), `<out-dir>/curves.png` (training curves)
and `<out-dir>/results.json` (everything, per seed)::

  pip install -e ".[examples]"
  python examples/train.py                         # noisy digits (40%), 10 methods, 3 seeds
  python examples/train.py --noise 0               # the clean task
  python examples/train.py --variants sgd,sam,looksam --seeds 5
  python examples/train.py --dataset cifar10       # needs tensorflow-datasets or datasets
  python examples/train.py --smoke                 # seconds (CI)

Protocol.
  * Data: the 1797 digits are split once (a stratified split, `--data-seed`, default 0) into
    1150 training, 287 validation and 360 test images. Then, with a generator seeded by
    `--data-seed`, each training and validation label is replaced with probability `--noise`
    (default 0.4) by a class drawn uniformly from the 10 (so it may stay right: about 36% of
    the labels end up wrong). Test labels stay clean.
  * Training: every method wraps the same inner optimizer, `optax.sgd(0.05, momentum=0.9)`,
    batch 64 (the last partial batch of an epoch is dropped: 17 steps per epoch). For each
    seed, every method starts from the same initialization (`nnx.Rngs(seed)`) and sees the
    same batches in the same order (a permutation keyed by (seed, epoch)).
  * Radius: each method has its own grid (its radius means different things: ASAM's is about
    ten times SAM's, Momentum-SAM's scales the momentum direction). The whole grid times all
    seeds trains in ONE compiled run: `jax.vmap` over rho and over seeds of a `lax.scan` over
    epochs and steps, called once per chunk of epochs (one compilation per method). The
    radius with the best validation accuracy after the last epoch, averaged over seeds, is
    selected (one radius per method, for all seeds). A selection at an end of the grid is
    marked in the table.
  * Cost: under vmap, a `lax.cond` with a batched predicate (the random and the adaptive
    cadences) runs both branches, so the sweep says nothing about cost. Cost is measured on
    unvmapped runs at the selected radius, seed 0: gradient evaluations per step counted at run
    time over the whole training (a host callback on every gradient, in a separate counting
    build; that run also checks that the unvmapped code reproduces the sweep's numbers), and
    time per step relative to SGD (a timed build without the counter continues training from
    the end state for `--timing-epochs`; all methods timed in interleaved rounds in one
    process, median over rounds).
  * Randomness inside a variant (RST's coin flips, ESAM's draws) comes from the constructor's
    static `seed` (0), the same for every training seed: the seeds vary the initialization
    and the batch order only.
  * "Beats SGD": the mean test accuracy exceeds SGD's by more than the larger of the two
    standard deviations over seeds. The table says which methods do not.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import random
import sys
import time
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sam_optax
from sam_optax import diagnostics


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
  name: str
  x_train: np.ndarray  # (n, ...) float32
  y_train: np.ndarray  # (n,) int32, noisy
  x_val: np.ndarray
  y_val: np.ndarray    # noisy, like the training labels
  x_test: np.ndarray
  y_test: np.ndarray   # clean
  num_classes: int
  y_train_clean: np.ndarray | None = None
  y_val_clean: np.ndarray | None = None

  def describe(self) -> str:
    wrong = float(np.mean(self.y_train != self.y_train_clean))
    return (f"{self.name}: {len(self.x_train)} train / {len(self.x_val)} validation (labels "
            f"noisy like train) / {len(self.x_test)} test (clean) images of shape "
            f"{self.x_train.shape[1:]}; {100 * wrong:.1f}% of the training labels wrong")


class DatasetUnavailable(RuntimeError):
  pass


def corrupt(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator):
  """Each label replaced with probability `rate` by a class drawn uniformly (maybe itself)."""
  replace = rng.random(len(labels)) < rate
  return np.where(replace, rng.integers(0, num_classes, len(labels)), labels).astype(np.int32)


def split_and_corrupt(name, images, labels, test_images, test_labels, *, validation: int,
                      noise: float, seed: int, num_classes: int = 10) -> Dataset:
  """Holds `validation` images out of the training set, then corrupts train and validation."""
  from sklearn.model_selection import train_test_split
  x_train, x_val, y_train, y_val = train_test_split(
      images, labels, test_size=validation, random_state=seed, stratify=labels)
  rng = np.random.default_rng([seed, 1])
  noisy_train = corrupt(y_train, noise, num_classes, rng)
  noisy_val = corrupt(y_val, noise, num_classes, rng)
  return Dataset(name, x_train, noisy_train, x_val, noisy_val, test_images,
                 test_labels.astype(np.int32), num_classes, y_train.astype(np.int32),
                 y_val.astype(np.int32))


def load_digits(noise: float, seed: int, limit: int | None = None) -> Dataset:
  """scikit-learn's digits, flattened to 64 features in [0, 1]: 1150 / 287 / 360 images."""
  from sklearn.datasets import load_digits as sklearn_digits
  from sklearn.model_selection import train_test_split
  digits = sklearn_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=360, random_state=seed,
                                                    stratify=y)
  if limit:
    x_rest, y_rest, x_test, y_test = x_rest[:limit], y_rest[:limit], x_test[:limit], y_test[:limit]
  validation = max(10, round(0.2 * len(x_rest)))
  return split_and_corrupt("digits", x_rest, y_rest, x_test, y_test, validation=validation,
                           noise=noise, seed=seed)


def load_cifar10(noise: float, seed: int, limit: int | None = None) -> Dataset:
  """CIFAR-10 from tensorflow-datasets or Hugging Face datasets, whichever works; 10% of the
  training images held out for validation."""
  errors = []
  arrays = None
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    errors.append("tensorflow-datasets is not installed")
  else:
    try:
      train, test = tfds.as_numpy(tfds.load("cifar10", split=["train", "test"], batch_size=-1))
      arrays = train["image"], train["label"], test["image"], test["label"]
    except Exception as error:  # noqa: BLE001 - any download or parsing failure
      errors.append(f"tensorflow-datasets could not load cifar10 ({type(error).__name__}: "
                    f"{error})")
  if arrays is None:
    try:
      import datasets as hf_datasets
    except ImportError:
      errors.append("Hugging Face datasets is not installed")
    else:
      try:
        data = hf_datasets.load_dataset("cifar10").with_format("numpy")
        train, test = data["train"], data["test"]
        arrays = train["img"], train["label"], test["img"], test["label"]
      except Exception as error:  # noqa: BLE001
        errors.append(f"Hugging Face datasets could not load cifar10 ({type(error).__name__}: "
                      f"{error})")
  if arrays is None:
    raise DatasetUnavailable(
        "--dataset cifar10 needs a way to get CIFAR-10, and none worked:\n  - "
        + "\n  - ".join(errors)
        + "\nInstall one of them (`pip install tensorflow-datasets` or `pip install datasets`) "
          "on a machine that can reach the internet (or has the data set cached), or run the "
          "default `--dataset digits`, which needs nothing beyond scikit-learn.")

  def prep(x, y):
    x, y = np.asarray(x)[:limit], np.asarray(y)[:limit]
    return (x / 255.0).astype(np.float32), y.astype(np.int32)
  x_train, y_train = prep(arrays[0], arrays[1])
  x_test, y_test = prep(arrays[2], arrays[3])
  return split_and_corrupt("cifar10", x_train, y_train, x_test, y_test,
                           validation=len(x_train) // 10, noise=noise, seed=seed)


DATASETS: dict[str, Callable[..., Dataset]] = {"digits": load_digits, "cifar10": load_cifar10}


# ------------------------------------------------------------------------------------------
# Models: Flax NNX modules, trained as pure parameter pytrees (nnx.split / nnx.merge)
# ------------------------------------------------------------------------------------------


class MLP(nnx.Module):
  """features - 256 - classes, ReLU."""

  def __init__(self, features: int, num_classes: int, *, hidden: int = 256, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(features, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


class CNN(nnx.Module):
  """conv3x3(32) - relu - avgpool2 - conv3x3(64) - relu - avgpool2 - dense(256) - dense."""

  def __init__(self, image_shape, num_classes: int, *, rngs: nnx.Rngs):
    height, width, channels = image_shape
    self.conv1 = nnx.Conv(channels, 32, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.dense1 = nnx.Linear((height // 4) * (width // 4) * 64, 256, rngs=rngs)
    self.dense2 = nnx.Linear(256, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    return self.dense2(nnx.relu(self.dense1(x.reshape(x.shape[0], -1))))


def make_model(data: Dataset, seed: int) -> nnx.Module:
  if data.x_train.ndim == 2:
    return MLP(data.x_train.shape[1], data.num_classes, rngs=nnx.Rngs(seed))
  return CNN(data.x_train.shape[1:], data.num_classes, rngs=nnx.Rngs(seed))


def split_model(data: Dataset, seeds) -> tuple[Any, Any]:
  """(graphdef, params stacked over seeds): one initialization per seed, the same for every
  method."""
  graphdef, first = nnx.split(make_model(data, seeds[0]))
  states = [first] + [nnx.split(make_model(data, s))[1] for s in seeds[1:]]
  params = [jax.tree.map(jnp.asarray, nnx.to_pure_dict(s)) for s in states]
  return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *params)


def make_loss(graphdef) -> tuple[Callable, Callable]:
  """(loss(params, x, y), logits(params, x)) for pure params (the dict of `nnx.to_pure_dict`):
  cross-entropy against integer labels."""
  def logits_fn(params, x):
    return nnx.merge(graphdef, params)(x)

  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()

  return loss, logits_fn


# ------------------------------------------------------------------------------------------
# Methods: SGD and the sharpness-aware variants, all around the same inner optimizer
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """A method: `build(inner, rho)` (rho may be a traced scalar: the sweep vmaps over it) and the
  grid its radius is chosen from. `build` None: the inner optimizer alone."""
  label: str
  build: Callable[[optax.GradientTransformation, Any], optax.GradientTransformation] | None
  grid: tuple[float, ...] = (0.0,)
  note: str = ""
  reads_clean_gradient: bool = True   # False: the caller hands zeros and computes no gradient
  needs_fisher: bool = False          # update() takes fisher_fn= (sparse SAM's Fisher mask)
  cheap: bool = False                 # fewer than two gradients per step on average


METHODS: dict[str, Method] = {
    "sgd": Method("SGD", None),
    "sam": Method("SAM", lambda inner, rho: sam_optax.sam(inner, rho),
                  (0.25, 0.5, 1.0, 1.5)),
    "looksam": Method("LookSAM", lambda inner, rho: sam_optax.looksam(inner, rho, k=5),
                      (0.03, 0.1, 0.3, 1.0), "k=5, alpha=0.7", cheap=True),
    "momentum_sam": Method("MSAM", lambda inner, rho: sam_optax.momentum_sam(inner, rho),
                           (0.5, 1.0, 2.0, 4.0), "no second gradient", cheap=True),
    "esam": Method("ESAM", lambda inner, rho: sam_optax.esam(inner, rho),
                   (0.25, 0.5, 0.75, 1.25), "beta=0.6"),
    "rst": Method("RST", lambda inner, rho: sam_optax.rst(inner, rho, probability=0.5),
                  (0.5, 1.0, 1.5, 2.5), "random cadence, p=0.5", cheap=True),
    "ae_sam": Method("AE-SAM", lambda inner, rho: sam_optax.ae_sam(inner, rho),
                     (0.5, 1.0, 2.0, 3.0), "adaptive cadence", cheap=True),
    "sampa": Method("SAMPa", lambda inner, rho: sam_optax.sampa(inner, rho),
                    (0.5, 1.0, 2.0, 3.0), "lam=0.2", reads_clean_gradient=False),
    "asam": Method("ASAM", lambda inner, rho: sam_optax.asam(inner, rho),
                   (1.0, 2.5, 5.0, 10.0), "eta=0.01"),
    "gsam": Method("GSAM", lambda inner, rho: sam_optax.gsam(inner, rho, rho),
                   (0.1, 0.25, 0.5, 0.75), "alpha=0.4, constant rho"),
}
DEFAULT_VARIANTS = ",".join(METHODS)
SMOKE_VARIANTS = "sgd,looksam"


# ------------------------------------------------------------------------------------------
# Training: a pure function of (params, optimizer state, rho, seed), vmapped over rho and seeds
# ------------------------------------------------------------------------------------------


class GradientCounter:
  """Gradient evaluations counted at run time, in full-batch units: in a counting build, one
  entry of every gradient passes through a host callback that adds its share of the batch to
  `total`.

  The same mechanism as benchmarks/overhead.py's counter (which cannot be imported from here
  without its import-time setup of XLA_FLAGS and sys.path). A `pure_callback`: a gradient the
  step computes but never reads is dead code and is not counted, nor one in a `lax.cond`
  branch not taken.
  """

  def __init__(self):
    self.total = 0
    self.hvps = 0  # Hessian-vector products (a gradient differentiated forward), apart

  def _add(self, fraction, x):
    self.total += fraction
    return x

  def _add_hvp(self, fraction, x):
    self.hvps += fraction
    return x

  def tap(self, grads, fraction: float = 1.0):
    """`grads`, unchanged; each evaluation adds `fraction` (its share of a full batch)."""
    @jax.custom_jvp
    def counted(x):
      return jax.pure_callback(functools.partial(self._add, fraction),
                               jax.ShapeDtypeStruct(x.shape, x.dtype), x,
                               vmap_method="sequential")

    @counted.defjvp
    def counted_jvp(primals, tangents):
      tangent = jax.pure_callback(functools.partial(self._add_hvp, fraction),
                                  jax.ShapeDtypeStruct(
          tangents[0].shape, tangents[0].dtype), tangents[0], vmap_method="sequential")
      return counted(primals[0]), tangent

    leaves, treedef = jax.tree.flatten(grads)
    flat = jnp.ravel(leaves[0])
    leaves[0] = flat.at[0].set(counted(flat[0])).reshape(leaves[0].shape)
    return jax.tree.unflatten(treedef, leaves)


@dataclasses.dataclass
class Problem:
  """The arrays (on device) and the fixed settings every method trains with."""
  x_train: jax.Array
  y_train: jax.Array
  x_val: jax.Array
  y_val: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  loss: Callable
  logits: Callable
  lr: float
  momentum: float
  batch_size: int
  steps_per_epoch: int

  @classmethod
  def make(cls, data: Dataset, graphdef, args) -> "Problem":
    loss, logits = make_loss(graphdef)
    steps = args.steps_per_epoch or len(data.x_train) // args.batch_size
    return cls(*(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_val, data.y_val,
                                          data.x_test, data.y_test)),
               loss, logits, args.lr, args.momentum, args.batch_size, steps)


def make_transformation(method: Method, problem: Problem, rho) -> optax.GradientTransformation:
  inner = optax.sgd(problem.lr, momentum=problem.momentum)
  return inner if method.build is None else method.build(inner, rho)


def make_epochs(method: Method, problem: Problem, counter: GradientCounter | None = None):
  """`epochs(params, state, rho, seed, first_epoch, count) -> (params, state)`: `count`
  (static) epochs of training; the batches depend on (seed, epoch) only."""
  grad = jax.grad(problem.loss)
  if counter is not None:
    # A gradient on part of a batch (the Fisher's single examples) counts its share.
    grad = lambda p, x, y, _grad=grad: counter.tap(_grad(p, x, y),
                                                   x.shape[0] / problem.batch_size)
  n = problem.x_train.shape[0]
  used = problem.steps_per_epoch * problem.batch_size

  def epochs(params, state, rho, seed, first_epoch, count: int):
    tx = make_transformation(method, problem, rho)

    def step(carry, index):
      params, state = carry
      x, y = problem.x_train[index], problem.y_train[index]
      grad_fn = lambda p: grad(p, x, y)
      g = grad_fn(params) if method.reads_clean_gradient else jax.tree.map(jnp.zeros_like,
                                                                           params)
      extra = {}
      if method.build is not None:
        extra["grad_fn"] = grad_fn
      if method.needs_fisher:
        extra["fisher_fn"] = lambda p: fisher_diagonal(grad, p, x[:len(x) // 4],
                                                       y[:len(y) // 4])
      updates, state = tx.update(g, state, params, **extra)
      return (optax.apply_updates(params, updates), state), None

    def epoch(carry, e):
      key = jax.random.fold_in(jax.random.key(seed), e)
      order = jax.random.permutation(key, n)[:used].reshape(problem.steps_per_epoch, -1)
      return jax.lax.scan(step, carry, order)[0], None

    epochs_range = first_epoch + jnp.arange(count)
    return jax.lax.scan(epoch, (params, state), epochs_range)[0]

  return epochs


def fisher_diagonal(grad, params, x, y):
  """The empirical Fisher diagonal on single examples (vmapped), summed: sparse SAM's mask."""
  per_example = jax.vmap(lambda xi, yi: grad(params, xi[None], yi[None]))(x, y)
  return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), per_example)


def evaluate(problem: Problem, params) -> dict:
  """Training loss (noisy labels), validation accuracy (noisy) and test accuracy (clean)."""
  accuracy = lambda x, y: jnp.mean(jnp.argmax(problem.logits(params, x), -1) == y)
  return {"train_loss": problem.loss(params, problem.x_train, problem.y_train),
          "val_accuracy": accuracy(problem.x_val, problem.y_val),
          "test_accuracy": accuracy(problem.x_test, problem.y_test)}


def make_sweep(method: Method, problem: Problem, chunk_epochs: int):
  """(init, chunk), jitted and vmapped over rho (axis 0) and seeds (axis 1): the whole grid
  times all seeds in one compiled program; `chunk` trains `chunk_epochs` epochs then
  evaluates."""
  epochs = make_epochs(method, problem)

  def init(params, rho):
    return make_transformation(method, problem, rho).init(params)

  def chunk(params, state, rho, seed, first_epoch):
    params, state = epochs(params, state, rho, seed, first_epoch, chunk_epochs)
    return params, state, evaluate(problem, params)

  over_seeds = jax.vmap(chunk, in_axes=(0, 0, None, 0, None))
  over_grid = jax.vmap(over_seeds, in_axes=(0, 0, 0, None, None))
  init_grid = jax.vmap(jax.vmap(init, in_axes=(0, None)), in_axes=(0, 0))
  return jax.jit(init_grid), jax.jit(over_grid, donate_argnums=(0, 1))


def sweep_method(name: str, method: Method, problem: Problem, params0, seeds, args,
                 progress) -> dict:
  """Trains the method's whole grid over all seeds (one compilation), chunk by chunk.

  Returns the per-chunk curves (arrays [chunk, rho, seed]), the final params ([rho, seed,
  ...]) and the wall time.
  """
  grid = jnp.asarray(method.grid, jnp.float32)
  seeds_array = jnp.asarray(seeds, jnp.int32)
  init, chunk = make_sweep(method, problem, args.chunk_epochs)
  params = jax.tree.map(lambda p: jnp.broadcast_to(p, (len(grid),) + p.shape), params0)
  state = init(params, grid)
  curves = {"epoch": [], "train_loss": [], "val_accuracy": [], "test_accuracy": []}
  start = time.perf_counter()
  chunks = args.epochs // args.chunk_epochs
  bar = progress(total=chunks * args.chunk_epochs, desc=f"{method.label:>8}", unit="epoch",
                 leave=True)
  for c in range(chunks):
    params, state, metrics = chunk(params, state, grid, seeds_array, c * args.chunk_epochs)
    metrics = jax.device_get(metrics)
    curves["epoch"].append((c + 1) * args.chunk_epochs)
    for key in ("train_loss", "val_accuracy", "test_accuracy"):
      curves[key].append(np.asarray(metrics[key]))
    bar.update(args.chunk_epochs)
    best = int(np.argmax(metrics["val_accuracy"].mean(axis=1)))
    bar.set_postfix(rho=float(method.grid[best]),
                    val=f"{metrics['val_accuracy'][best].mean():.3f}",
                    test=f"{metrics['test_accuracy'][best].mean():.3f}")
  bar.close()
  return {"curves": {k: np.stack(v) if k != "epoch" else v for k, v in curves.items()},
          "params": params, "state": state, "seconds": time.perf_counter() - start}


def select_radius(curves: dict) -> int:
  """The grid index with the best validation accuracy after the last epoch, mean over seeds
  (the first of equals: the smaller radius)."""
  return int(np.argmax(curves["val_accuracy"][-1].mean(axis=1)))


# ------------------------------------------------------------------------------------------
# Cost (unvmapped runs) and sharpness
# ------------------------------------------------------------------------------------------


def single_run(method: Method, problem: Problem, params, rho: float, seed: int, epochs: int):
  """One config trained unvmapped from `params` (no sweep): (params, state, evaluation)."""
  run_epochs = make_epochs(method, problem)

  @jax.jit
  def run(params, rho, seed):
    state = make_transformation(method, problem, rho).init(params)
    params, state = run_epochs(params, state, rho, seed, 0, epochs)
    return params, state, evaluate(problem, params)

  return jax.device_get(run(params, jnp.float32(rho), jnp.int32(seed)))


def _continue_args(run: dict, args):
  return (run["params"], run["state"], jnp.float32(run["rho"]), jnp.int32(run["seed"]),
          jnp.int32(args.epochs))


COUNTING_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                             "xla_cpu_use_fusion_emitters": False}


def count_gradients(run: dict, problem: Problem, args) -> tuple[float, float]:
  """Gradient evaluations per step, counted at run time in a separate counting build over
  `--timing-epochs` more epochs from the end state of training (what the timed runs run)."""
  counter = GradientCounter()
  epochs = make_epochs(run["method"], problem, counter)
  call_args = _continue_args(run, args)
  # This build is never timed: XLA's backend optimizations (most of a CPU compile here) are
  # skipped. Which gradients run is decided before them (the program's control flow, and
  # dead-code elimination of unread gradients, an HLO pass), so the count is the same.
  fn = jax.jit(functools.partial(epochs, count=args.timing_epochs)).lower(*call_args).compile(
      COUNTING_COMPILER_OPTIONS)
  jax.block_until_ready(fn(*call_args))
  steps = args.timing_epochs * problem.steps_per_epoch
  return counter.total / steps, counter.hvps / steps


def time_steps(runs: dict, problem: Problem, args, progress) -> dict:
  """Seconds per step of each method, unvmapped, without the counter: `--timing-epochs` more
  epochs from each method's end state (seed 0, selected radius), all methods in interleaved
  rounds in one process (a fresh random order per round), median over `--timing-rounds`."""
  compiled = {}
  for name, run in runs.items():
    epochs = make_epochs(run["method"], problem)
    fn = jax.jit(functools.partial(epochs, count=args.timing_epochs))
    call_args = _continue_args(run, args)
    compiled[name] = (fn.lower(*call_args).compile(), call_args)
    jax.block_until_ready(compiled[name][0](*call_args))  # warm-up
  times = {name: [] for name in runs}
  order = list(runs)
  rng = random.Random(0)
  for _ in progress(range(args.timing_rounds), desc="  timing", unit="round", leave=False):
    rng.shuffle(order)
    for name in order:
      fn, call_args = compiled[name]
      start = time.perf_counter()
      jax.block_until_ready(fn(*call_args))
      times[name].append(time.perf_counter() - start)
  steps = args.timing_epochs * problem.steps_per_epoch
  return {name: float(np.median(t)) / steps for name, t in times.items()}


def top_hessian_eigenvalues(problem: Problem, params, iters: int, seeds) -> list[float]:
  """Largest eigenvalue of the Hessian of the (noisy) training loss at each of `params`
  (stacked over seeds; Lanczos started from a vector keyed by the seed), in one program."""
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  return [float(e) for e in _top_eigenvalues(problem.loss, iters, params, problem.x_train,
                                             problem.y_train, keys)]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _top_eigenvalues(loss, iters, params, x, y, keys):
  def one(params, key):
    return diagnostics.hessian_eigenvalues(loss, params, x, y, key=key, k=1,
                                           num_iters=iters).eigenvalues[0]
  return jax.vmap(one)(params, keys)


# ------------------------------------------------------------------------------------------
# One method end to end, then the report
# ------------------------------------------------------------------------------------------


def _tree_index(tree, *index):
  return jax.tree.map(lambda x: x[index], tree)


def std(values) -> float:
  """The sample standard deviation over seeds (ddof=1; 0 for one seed)."""
  values = np.asarray(values, np.float64)
  return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def run_method(name: str, problem: Problem, params0, seeds, args, progress) -> dict:
  method = args.methods[name]
  sweep = sweep_method(name, method, problem, params0, seeds, args, progress)
  curves = sweep["curves"]
  best = select_radius(curves)
  rho = float(method.grid[best])
  final = {k: curves[k][-1] for k in ("train_loss", "val_accuracy", "test_accuracy")}
  # Seed 0 at the selected radius, where training ended: the cost runs continue from there.
  run = {"method": method, "rho": rho, "seed": seeds[0],
         "params": _tree_index(sweep["params"], best, 0),
         "state": _tree_index(sweep["state"], best, 0)}
  gradients, hvps = count_gradients(run, problem, args)
  eigen = top_hessian_eigenvalues(problem, _tree_index(sweep["params"], best), args.hessian_iters,
                                  seeds)
  test = final["test_accuracy"][best]
  return {
      "variant": name, "label": method.label, "note": method.note,
      "grid": list(method.grid), "selected_rho": rho, "selected_index": best,
      "at_grid_edge": len(method.grid) > 1 and best in (0, len(method.grid) - 1),
      "seeds": list(seeds),
      "final_by_rho": {k: v.tolist() for k, v in final.items()},
      "test_accuracy": test.tolist(), "test_accuracy_mean": float(test.mean()),
      "test_accuracy_std": std(test),
      "val_accuracy": final["val_accuracy"][best].tolist(),
      "train_loss": final["train_loss"][best].tolist(),
      "gradients_per_step": gradients, "hvps_per_step": hvps,
      "top_hessian_eigenvalue": eigen, "top_hessian_eigenvalue_mean": float(np.mean(eigen)),
      "top_hessian_eigenvalue_std": std(eigen),
      "history": {"epoch": curves["epoch"],
                  **{k: curves[k][:, best].tolist()
                     for k in ("train_loss", "val_accuracy", "test_accuracy")}},
      "early_stopped": early_stopped(curves, best),
      "sweep_seconds": sweep["seconds"],
      "_run": run,  # for the timing runs; dropped before the JSON is written
  }


def early_stopped(curves: dict, index: int) -> dict:
  """What early stopping would give at this radius: the checkpoint (a chunk's end) with the
  best mean validation accuracy, and its test accuracy. Not used for the table: the protocol
  trains every method for the same epochs; this says how much of SGD's gap is overfitting
  that stopping early would avoid."""
  val = curves["val_accuracy"][:, index].mean(axis=1)
  c = int(np.argmax(val))
  test = curves["test_accuracy"][c, index]
  return {"epoch": curves["epoch"][c], "test_accuracy_mean": float(test.mean()),
          "test_accuracy_std": std(test)}


def beats(result: dict, baseline: dict) -> bool:
  """Mean test accuracy above the baseline's by more than the larger of the two standard
  deviations over seeds."""
  margin = result["test_accuracy_mean"] - baseline["test_accuracy_mean"]
  return margin > max(result["test_accuracy_std"], baseline["test_accuracy_std"])


def summarize(results: list[dict]) -> None:
  """Adds time relative to SGD and the beats-SGD verdict (when SGD ran)."""
  sgd = next((r for r in results if r["variant"] == "sgd"), None)
  for r in results:
    r["time_vs_sgd"] = r["seconds_per_step"] / sgd["seconds_per_step"] if sgd else None
    r["beats_sgd"] = None if sgd is None or r is sgd else beats(r, sgd)


def format_table(results: list[dict], markdown: bool = False) -> str:
  rows = [("method", "rho (grid)", "test acc", "grads/step", "time/step", "top Hessian eig",
           "beats SGD")]
  for r in results:
    grid = "/".join(f"{g:g}" for g in r["grid"])
    rho = "-" if r["build_is_inner"] else (f"{r['selected_rho']:g}" + ("*" if r["at_grid_edge"]
                                                                         else "") + f" ({grid})")
    time_ = (f"{r['time_vs_sgd']:.2f}x" if r["time_vs_sgd"] is not None
             else f"{1e6 * r['seconds_per_step']:.0f}us")
    verdict = "-" if r["beats_sgd"] is None else ("yes" if r["beats_sgd"] else "NO")
    rows.append((r["label"], rho,
                 f"{r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f}",
                 f"{r['gradients_per_step']:.2f}" + (f" + {r['hvps_per_step']:.2f} HVP"
                                                     if r.get("hvps_per_step") else ""), time_,
                 f"{r['top_hessian_eigenvalue_mean']:.2f} ± {r['top_hessian_eigenvalue_std']:.2f}",
                 verdict))
  if markdown:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def table_notes(results, args, data: Dataset) -> str:
  seeds = len(results[0]["seeds"])
  return (f"test acc: clean test split, mean ± std (ddof=1) over {seeds} seeds at the radius "
          f"with the best mean validation accuracy (noisy labels) after epoch {args.epochs}; "
          f"* = selected at an end of its grid. grads/step: gradient evaluations counted at run "
          f"time and time/step relative to SGD, both on unvmapped runs of seed 0 at the "
          f"selected radius, continuing training for {args.timing_epochs} epochs from its end "
          f"(time: median of {args.timing_rounds} interleaved rounds). top Hessian eig: of the training loss at the final "
          f"params (Lanczos, {args.hessian_iters} iterations), mean ± std over seeds. beats "
          f"SGD: mean test accuracy above SGD's by more than the larger std.")


def plot_frontier(results, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  sgd = next((r for r in results if r["variant"] == "sgd"), None)
  for ax, key, xlabel in ((axes[0], "gradients_per_step", "gradient evaluations per step"),
                          (axes[1], "time_vs_sgd", "time per step relative to SGD")):
    for i, r in enumerate(results):
      x = r[key]
      if x is None:
        continue
      ax.errorbar(x, r["test_accuracy_mean"], yerr=r["test_accuracy_std"], fmt="o",
                  color=colors[i % len(colors)], capsize=3)
      ax.annotate(r["label"], (x, r["test_accuracy_mean"]), textcoords="offset points",
                  xytext=(5, 4), fontsize=8)
    if sgd is not None:
      ax.axhspan(sgd["test_accuracy_mean"] - sgd["test_accuracy_std"],
                 sgd["test_accuracy_mean"] + sgd["test_accuracy_std"], color="gray", alpha=0.2,
                 label="SGD ± std")
    ax.set(xlabel=xlabel)
    xs = [r[key] for r in results if r[key]]
    if xs and max(xs) > 5 * min(xs):  # a few slow outliers would squeeze the rest together
      ax.set_xscale("log")
    ax.grid(alpha=0.3)
  axes[0].set(ylabel="test accuracy (mean ± std over seeds)")
  axes[0].legend(loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(results, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  keys = (("train_loss", "training loss (noisy labels)"),
          ("val_accuracy", "validation accuracy (noisy labels)"),
          ("test_accuracy", "test accuracy (clean labels)"))
  for i, r in enumerate(results):
    epochs = r["history"]["epoch"]
    for ax, (key, _) in zip(axes, keys):
      values = np.asarray(r["history"][key])
      mean = values.mean(axis=1)
      spread = values.std(axis=1, ddof=1) if values.shape[1] > 1 else 0 * mean
      ax.plot(epochs, mean, color=colors[i % len(colors)],
              label=f"{r['label']}" + ("" if r["build_is_inner"] else
                                       f" (rho {r['selected_rho']:g})"))
      ax.fill_between(epochs, mean - spread, mean + spread, color=colors[i % len(colors)],
                      alpha=0.15)
  for ax, (_, label) in zip(axes, keys):
    ax.set(xlabel="epoch", title=label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def machine() -> dict:
  import flax
  devices = jax.devices()
  return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "jax": jax.__version__,
          "optax": optax.__version__, "flax": flax.__version__,
          "sam_optax": getattr(sam_optax, "__version__", None),
          "devices": f"{len(devices)} x {devices[0].device_kind}",
          "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def parse_args(argv=None, methods: dict[str, Method] | None = None, *,
               default_variants: str | None = None, smoke_variants: str = SMOKE_VARIANTS,
               default_seeds: int = 3, default_out_dir: str = "runs/train",
               description: str | None = None):
  """The main job's options; benchmarks/frontier.py passes its own methods and defaults."""
  methods = METHODS if methods is None else methods
  default_variants = default_variants or ",".join(methods)
  parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated, from: {', '.join(methods)} (default: all; with "
                           f"--smoke: {smoke_variants})")
  parser.add_argument("--noise", type=float, default=0.4,
                      help="probability that a training or validation label is replaced by a "
                           "uniformly drawn class (0: the clean task)")
  parser.add_argument("--data-seed", type=int, default=0,
                      help="seed of the split and of the label corruption")
  parser.add_argument("--seeds", type=int, default=default_seeds,
                      help="training seeds 0..n-1 (initialization and batch order)")
  parser.add_argument("--epochs", type=int, default=80)
  parser.add_argument("--chunk-epochs", type=int, default=10,
                      help="epochs per call of the compiled sweep (a point of the curves)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.05, help="inner SGD learning rate")
  parser.add_argument("--momentum", type=float, default=0.9, help="inner SGD momentum")
  parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
  parser.add_argument("--train-limit", type=int, default=None,
                      help="use at most this many training (and test) images")
  parser.add_argument("--hessian-iters", type=int, default=20,
                      help="Lanczos iterations for the top Hessian eigenvalue")
  parser.add_argument("--timing-epochs", type=int, default=5,
                      help="epochs per counted and per timed call (cost per step)")
  parser.add_argument("--timing-rounds", type=int, default=11)
  parser.add_argument("--out-dir", default=default_out_dir)
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="2 epochs of 3 steps, 2 seeds, 2 radii per method, SGD and LookSAM "
                           "unless --variants is given (for CI)")
  args = parser.parse_args(argv)
  args.steps_per_epoch = None
  if args.variants is None:
    args.variants = smoke_variants if args.smoke else default_variants
  names = [n.strip() for n in args.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in methods]
  if unknown:
    parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(methods)}")
  args.methods = {n: methods[n] for n in names}
  if args.smoke:
    args.epochs, args.chunk_epochs, args.steps_per_epoch = 2, 1, 3
    args.seeds = min(args.seeds, 2)
    # Two epochs of 3 steps continued: LookSAM's count 6..11 takes one perturbed step (10).
    args.hessian_iters, args.timing_epochs, args.timing_rounds = 4, 2, 2
    args.train_limit = args.train_limit or 400
    args.methods = {n: dataclasses.replace(m, grid=m.grid[:2]) for n, m in args.methods.items()}
  if args.epochs % args.chunk_epochs:
    parser.error(f"--epochs {args.epochs} is not a multiple of --chunk-epochs "
                 f"{args.chunk_epochs}")
  if not 0.0 <= args.noise <= 1.0:
    parser.error(f"--noise {args.noise} is not a probability")
  if args.seeds < 1:
    parser.error("--seeds must be at least 1")
  return args


def train_all(args, progress, log=print) -> tuple[list[dict], Dataset]:
  """Loads the data and runs every method of `args.methods`; the results, summarized."""
  data = DATASETS[args.dataset](args.noise, args.data_seed, args.train_limit)
  if len(data.x_train) < args.batch_size:
    raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(data.x_train)} "
                     f"training images.")
  seeds = list(range(args.seeds))
  graphdef, params0 = split_model(data, seeds)
  problem = Problem.make(data, graphdef, args)
  log(data.describe())
  log(f"{args.epochs} epochs of {problem.steps_per_epoch} steps (batch {args.batch_size}), "
      f"inner optimizer SGD(lr={args.lr}, momentum={args.momentum}); seeds {seeds}; "
      f"jax {jax.__version__} on {jax.devices()[0].platform}")
  results = []
  for name in args.methods:
    results.append(run_method(name, problem, params0, seeds, args, progress))
    results[-1]["build_is_inner"] = args.methods[name].build is None
  seconds = time_steps({r["variant"]: r["_run"] for r in results}, problem, args, progress)
  for r in results:
    r["seconds_per_step"] = seconds[r["variant"]]
    del r["_run"]
  summarize(results)
  return results, data


def main(argv=None):
  args = parse_args(argv)
  try:
    from tqdm.auto import tqdm as progress
  except ImportError:
    sys.exit("examples/train.py needs tqdm: pip install -e '.[examples]'")
  started = time.perf_counter()
  try:
    results, data = train_all(args, progress)
  except (DatasetUnavailable, ValueError) as error:
    sys.exit(f"error: {error}")
  total = time.perf_counter() - started

  print()
  print(format_table(results))
  print(table_notes(results, args, data))
  sgd = next((r for r in results if r["variant"] == "sgd"), None)
  if sgd is not None:
    stop = sgd["early_stopped"]
    print(f"SGD stopped early (at the checkpoint with the best validation accuracy, epoch "
          f"{stop['epoch']}) would reach {stop['test_accuracy_mean']:.3f} ± "
          f"{stop['test_accuracy_std']:.3f}" + (": on noisy labels SGD peaks early, then fits "
                                                 "the noise." if args.noise else "."))
  notes = [f"{r['label']}: {r['note']}" for r in results if r["note"]]
  if notes:
    print("; ".join(notes) + ".")
  print(f"Total {total:.1f}s, compilation included.")

  os.makedirs(args.out_dir, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k != "methods"}
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump({"settings": settings, "data": data.describe(), "machine": machine(),
               "results": results, "total_seconds": total}, f, indent=1)
  if not args.no_plot:
    title = f"{data.name}, {100 * args.noise:g}% label noise"
    plot_frontier(results, os.path.join(args.out_dir, "frontier.png"),
                  f"{title}: test accuracy against cost")
    plot_curves(results, os.path.join(args.out_dir, "curves.png"),
                f"{title}: training curves at each method's selected radius "
                f"(mean ± std over seeds)")
    print(f"Wrote frontier.png, curves.png and results.json to {args.out_dir}.")
  return results


if __name__ == "__main__":
  main()
