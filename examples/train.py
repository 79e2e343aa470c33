"""Train a small Flax NNX CNN with SGD and sharpness-aware variants, and compare them.

The default run (about 50 s on an idle 2-core CPU machine, compilation included) trains on the 8x8
handwritten digits that ship with scikit-learn (1797 images, a fixed stratified split of 1347
train / 450 test images), with SGD + momentum and the same optimizer wrapped by SAM, ASAM and a
cheap variant (LookSAM: a perturbed pass every 5 steps). It prints a table with the test
accuracy, the final training loss, the top Hessian eigenvalue of the training loss (Lanczos)
and the time per step relative to SGD, and writes the curves to `<out-dir>/curves.png` and the
numbers to `<out-dir>/results.json`::

  pip install -e ".[examples]"
  python examples/train.py                        # SGD, SAM, ASAM, LookSAM on digits
  python examples/train.py --variants sgd,sam,ssam,gsam --rho 0.1 --epochs 60
  python examples/train.py --dataset cifar10      # needs tensorflow-datasets or datasets
  python examples/train.py --smoke                # a few steps of SGD and LookSAM (CI)

Every variant uses the same initialization, the same batches in the same order and the same
inner optimizer; only the wrapper changes. One train step is one call to
`sam_optax.flax.sam_step(model, optimizer, loss_fn, batch)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import sys
import time
from typing import Callable

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
# flax 0.12.7 renamed nnx.pure to nnx.as_pure (the declared floor is older).
as_pure = getattr(nnx, "as_pure", None) or nnx.pure

import sam_optax
import sam_optax.flax
from sam_optax import diagnostics


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
  name: str
  x_train: np.ndarray  # (n, height, width, channels) float32 in [0, 1]
  y_train: np.ndarray  # (n,) int32
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def load_digits() -> Dataset:
  """scikit-learn's 8x8 digits, with a fixed stratified 75/25 split (random_state=0)."""
  from sklearn.datasets import load_digits as sklearn_digits
  from sklearn.model_selection import train_test_split
  digits = sklearn_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=0.25, random_state=0, stratify=labels)
  return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def load_cifar10(limit: int | None = None) -> Dataset:
  """CIFAR-10 from tensorflow-datasets or Hugging Face datasets, whichever works."""
  errors = []
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    errors.append("tensorflow-datasets is not installed")
  else:
    try:
      train, test = tfds.as_numpy(tfds.load("cifar10", split=["train", "test"], batch_size=-1))
      return _cifar(train["image"], train["label"], test["image"], test["label"], limit)
    except Exception as error:  # noqa: BLE001 - any download or parsing failure
      errors.append(f"tensorflow-datasets could not load cifar10 ({type(error).__name__}: "
                    f"{error})")
  try:
    import datasets as hf_datasets
  except ImportError:
    errors.append("Hugging Face datasets is not installed")
  else:
    try:
      data = hf_datasets.load_dataset("cifar10").with_format("numpy")
      train, test = data["train"], data["test"]
      return _cifar(train["img"], train["label"], test["img"], test["label"], limit)
    except Exception as error:  # noqa: BLE001
      errors.append(f"Hugging Face datasets could not load cifar10 ({type(error).__name__}: "
                    f"{error})")
  raise DatasetUnavailable(
      "--dataset cifar10 needs a way to get CIFAR-10, and none worked:\n  - "
      + "\n  - ".join(errors)
      + "\nInstall one of them (`pip install tensorflow-datasets` or `pip install datasets`) "
        "on a machine that can reach the internet (or has the data set cached), or run the "
        "default `--dataset digits`, which needs nothing beyond scikit-learn.")


def _cifar(x_train, y_train, x_test, y_test, limit):
  def prep(x, y):
    x, y = np.asarray(x)[:limit], np.asarray(y)[:limit]
    return (x / 255.0).astype(np.float32), y.astype(np.int32)
  x_train, y_train = prep(x_train, y_train)
  x_test, y_test = prep(x_test, y_test)
  return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


class DatasetUnavailable(RuntimeError):
  pass


DATASETS: dict[str, Callable[..., Dataset]] = {"digits": load_digits, "cifar10": load_cifar10}


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


def shifted_conv(inputs, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None, **unused):
  """`lax.conv_general_dilated` for stride 1, NHWC/HWIO, as shifted slices and one matmul.

  The same convolution (bit for bit on CPU here), in a form XLA:CPU differentiates fast inside
  loops: in jax 0.10 the kernel gradient of a native convolution runs about 100x slower inside
  a `lax.fori_loop` than outside, which makes Lanczos (a loop of Hessian-vector products) on a
  conv net take minutes. Training speed is unaffected either way.
  """
  del unused
  if tuple(window_strides) != (1, 1) or feature_group_count != 1 or any(
      d not in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation)):
    raise ValueError("shifted_conv supports stride 1, no dilation and one feature group.")
  kh, kw, cin, cout = kernel.shape
  if padding == "SAME":
    pads = [((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)]
  elif padding == "VALID":
    pads = [(0, 0), (0, 0)]
  else:
    pads = [tuple(p) for p in padding]
  x = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = jnp.concatenate([x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                            axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout), precision=precision)


class CNN(nnx.Module):
  """conv3x3(w) - relu - conv3x3(2w) - relu - avgpool2 - dense(64) - relu - dense(classes)."""

  def __init__(self, image_shape, num_classes, *, width=16, rngs: nnx.Rngs):
    height, wide, channels = image_shape
    conv = functools.partial(nnx.Conv, kernel_size=(3, 3), conv_general_dilated=shifted_conv,
                             rngs=rngs)
    self.conv1 = conv(channels, width)
    self.conv2 = conv(width, 2 * width)
    flat = (height // 2) * (wide // 2) * 2 * width
    self.dense1 = nnx.Linear(flat, 64, rngs=rngs)
    self.dense2 = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.dense2(nnx.relu(self.dense1(x)))


@functools.lru_cache  # one function per value: jitted helpers taking it compile once
def make_loss(label_smoothing: float):
  """Cross-entropy with smoothed labels: a loss whose minimum has finite logits, so that the
  Hessian at the end of training measures curvature rather than how far the logits grew."""
  def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()
  return loss_fn


# ------------------------------------------------------------------------------------------
# Optimizers: SGD and the sharpness-aware variants, all around the same inner optimizer
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str
  constructor: str | None     # name in sam_optax (None: the inner optimizer alone)
  hparams: Callable[[argparse.Namespace], dict]
  note: str = ""


VARIANTS = {
    "sgd": Variant("SGD", None, lambda a: {}),
    "sam": Variant("SAM", "sam", lambda a: {"rho": a.rho}),
    # Kwon et al. use a radius about ten times SAM's for the adaptive (scale-invariant) ball.
    "asam": Variant("ASAM", "asam", lambda a: {"rho": 10 * a.rho, "eta": 0.01},
                    "rho = 10 x --rho"),
    "looksam": Variant("LookSAM", "looksam", lambda a: {"rho": a.rho, "k": 5, "alpha": 0.7},
                       "perturbed pass every 5 steps"),
    "momentum_sam": Variant("MSAM", "momentum_sam", lambda a: {"rho": 6 * a.rho},
                            "rho = 6 x --rho, no extra gradient"),
    "ssam": Variant("SSAM", "ssam", lambda a: {"rho": a.rho}),
    "usam": Variant("USAM", "usam", lambda a: {"rho": a.rho}),
    "unified_sam": Variant("UnifiedSAM", "unified_sam", lambda a: {"rho": a.rho, "lam": 0.5}),
    "gsam": Variant("GSAM", "gsam", lambda a: {"rho_max": a.rho, "rho_min": a.rho}),
    "vasso": Variant("VaSSO", "vasso", lambda a: {"rho": a.rho}),
    "friendly_sam": Variant("F-SAM", "friendly_sam", lambda a: {"rho": a.rho}),
    "fisher_sam": Variant("Fisher-SAM", "fisher_sam", lambda a: {"rho": 2 * a.rho},
                          "rho = 2 x --rho"),
}
DEFAULT_VARIANTS = "sgd,sam,asam,looksam"
# --smoke's default. Compiling each variant's train step is most of a smoke run's time (a
# SAM-type step takes about 3x SGD's), and these two cover every path of the script: a plain
# optax optimizer (perturbed loss NaN) and a sharpness-aware one with and without its
# perturbed pass (LookSAM's reuse steps). SAM and ASAM differ from LookSAM only in the
# constructor and its hyperparameters; the default run trains all four.
SMOKE_VARIANTS = "sgd,looksam"


def make_optimizer(name: str, args) -> optax.GradientTransformation | None:
  """The variant's transformation, or None when this sam_optax does not provide it."""
  variant = VARIANTS[name]
  # Weight decay sits in the inner optimizer: it acts on the descent, not on the ascent.
  inner = optax.chain(optax.add_decayed_weights(args.weight_decay),
                      optax.sgd(args.lr, momentum=args.momentum))
  if variant.constructor is None:
    return inner
  constructor = getattr(sam_optax, variant.constructor, None)
  if constructor is None:
    return None
  accepted = inspect.signature(constructor).parameters
  hparams = {k: v for k, v in variant.hparams(args).items() if k in accepted}
  # has_aux=True lets sam_step report the perturbed pass's loss.
  return constructor(inner, **hparams, has_aux=True)


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def make_train_step(graphdef, loss_fn):
  """A jitted train step on the (model, optimizer) state; one call to sam_optax.flax.sam_step.

  `sam_step` works the same inside `nnx.jit` (`nnx.jit(lambda m, o, b: sam_step(m, o,
  loss_fn, b))`); the split/merge form here just keeps the per-step dispatch cost low, so the
  time-per-step column measures the optimizers rather than Python overhead.
  """
  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    metrics = sam_optax.flax.sam_step(model, optimizer, loss_fn, (x, y))
    return nnx.state((model, optimizer)), metrics
  return train_step


@functools.partial(nnx.jit, static_argnums=1)
def evaluate(model, loss_fn, x, y):
  """(training loss, accuracy) on a whole set."""
  return loss_fn(model, (x, y)), jnp.mean(jnp.argmax(model(x), -1) == y)


def top_hessian_eigenvalue(model, loss_fn, x, y, num_iters, seed):
  """Largest eigenvalue of the Hessian of the training loss at the model's params (Lanczos)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return float(_top_eigenvalue(graphdef, loss_fn, num_iters, as_pure(params),
                               as_pure(rest), x, y, jax.random.key(seed)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _top_eigenvalue(graphdef, loss_fn, num_iters, params, rest, x, y, key):
  def loss_of_params(p, x, y):
    return loss_fn(nnx.merge(graphdef, p, rest), (x, y))
  return diagnostics.hessian_eigenvalues(loss_of_params, params, x, y, key=key, k=1,
                                         num_iters=num_iters).eigenvalues[0]


def batches_for_epoch(data: Dataset, batch_size, seed, epoch, steps=None):
  """A fixed shuffle per (seed, epoch), the same for every variant; the last partial batch
  is dropped so every step has the same shape (one compilation)."""
  order = np.random.default_rng([seed, epoch]).permutation(len(data.x_train))
  count = len(order) // batch_size if steps is None else steps
  order = order[:count * batch_size].reshape(count, batch_size)
  return data.x_train[order], data.y_train[order]


def train_variant(name, tx, data, args, progress):
  model = CNN(data.x_train.shape[1:], data.num_classes, width=args.width,
              rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  loss_fn = make_loss(args.label_smoothing)
  train_step = make_train_step(graphdef, loss_fn)
  history = {"epoch": [], "train_loss": [], "perturbed_loss": [], "test_accuracy": []}
  epoch_seconds = []
  steps = len(batches_for_epoch(data, args.batch_size, args.seed, 0, args.steps_per_epoch)[0])
  bar = progress(total=args.epochs * steps, desc=f"{VARIANTS[name].label:>8}", unit="step",
                 leave=True)
  for epoch in range(args.epochs):
    xs, ys = batches_for_epoch(data, args.batch_size, args.seed, epoch, args.steps_per_epoch)
    start = time.perf_counter()
    losses, perturbed = [], []
    for x, y in zip(xs, ys):
      state, metrics = train_step(state, x, y)
      losses.append(metrics.loss)
      perturbed.append(metrics.perturbed_loss)
      bar.update()
    losses = np.asarray(jnp.stack(losses))  # waits for the epoch to finish
    epoch_seconds.append(time.perf_counter() - start)
    perturbed = np.asarray(jnp.stack(perturbed))
    nnx.update((model, optimizer), state)
    _, test_acc = evaluate(model, loss_fn, data.x_test, data.y_test)
    history["epoch"].append(epoch + 1)
    history["train_loss"].append(float(losses.mean()))
    history["perturbed_loss"].append(
        None if np.all(np.isnan(perturbed)) else float(np.nanmean(perturbed)))
    history["test_accuracy"].append(float(test_acc))
    bar.set_postfix(epoch=epoch + 1, loss=f"{losses.mean():.4f}",
                    test_acc=f"{float(test_acc):.4f}")
  bar.close()
  # The first epoch includes compilation. Time per step: the fastest other epoch, which is
  # robust to whatever else runs on the machine.
  timed = epoch_seconds[1:] or epoch_seconds
  train_loss, _ = evaluate(model, loss_fn, data.x_train, data.y_train)
  test_loss, test_acc = evaluate(model, loss_fn, data.x_test, data.y_test)
  eigen = top_hessian_eigenvalue(model, loss_fn, data.x_train, data.y_train, args.hessian_iters,
                                 args.seed)
  return {
      "variant": name, "label": VARIANTS[name].label, "history": history,
      "test_accuracy": float(test_acc), "test_loss": float(test_loss),
      "train_loss": float(train_loss), "top_hessian_eigenvalue": eigen,
      "seconds_per_step": float(np.min(timed) / steps),
      "compile_seconds": float(max(epoch_seconds[0] - np.min(timed), 0.0)),
      "steps": steps * args.epochs,
  }


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def format_table(results) -> str:
  base = next((r["seconds_per_step"] for r in results if r["variant"] == "sgd"), None)
  header = (f"{'variant':<12}{'test acc':>10}{'train loss':>12}{'top Hessian eig':>17}"
            f"{'time/step':>11}")
  lines = [header, "-" * len(header)]
  for r in results:
    ratio = (f"{r['seconds_per_step'] / base:.2f}x" if base else
             f"{1e3 * r['seconds_per_step']:.2f}ms")
    lines.append(f"{r['label']:<12}{r['test_accuracy']:>10.4f}{r['train_loss']:>12.4f}"
                 f"{r['top_hessian_eigenvalue']:>17.2f}{ratio:>11}")
  if base is None:
    lines.append("(time/step in milliseconds: SGD was not run)")
  return "\n".join(lines)


def smoothed_entropy(label_smoothing, num_classes):
  """The smallest value the label-smoothed cross-entropy can take (the targets' entropy)."""
  on = 1.0 - label_smoothing + label_smoothing / num_classes
  off = label_smoothing / num_classes
  return float(-(on * np.log(on) + (num_classes - 1) * (off * np.log(off) if off else 0.0)))


def plot(results, path, title):
  """Training loss and test accuracy per epoch, and the final top Hessian eigenvalues."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_acc, ax_eig) = plt.subplots(1, 3, figsize=(14, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for r, color in zip(results, colors * 4):
    h = r["history"]
    ax_loss.plot(h["epoch"], h["train_loss"], label=r["label"], color=color)
    ax_acc.plot(h["epoch"], h["test_accuracy"], label=r["label"], color=color)
    ax_eig.bar(r["label"], r["top_hessian_eigenvalue"], color=color)
  lowest = min(r["test_accuracy"] for r in results)
  ax_loss.set(xlabel="epoch", ylabel="train loss (mean over the epoch's steps)",
              title="training loss (label-smoothed)")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy",
             ylim=(max(0.0, lowest - 0.05), 1.0))
  ax_eig.set(ylabel="top Hessian eigenvalue", title="sharpness at the end (lower: flatter)")
  for ax in (ax_loss, ax_acc):
    ax.legend()
  for ax in (ax_loss, ax_acc, ax_eig):
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated, from: {', '.join(VARIANTS)} (default: "
                           f"{DEFAULT_VARIANTS}; with --smoke: {SMOKE_VARIANTS})")
  parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius (ASAM: 10x)")
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=0.05, help="inner SGD learning rate")
  parser.add_argument("--momentum", type=float, default=0.9, help="inner SGD momentum")
  parser.add_argument("--weight-decay", type=float, default=5e-4,
                      help="L2 weight decay, applied by the inner optimizer")
  parser.add_argument("--label-smoothing", type=float, default=0.1)
  parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
  parser.add_argument("--train-limit", type=int, default=None,
                      help="use at most this many training (and test) images")
  parser.add_argument("--hessian-iters", type=int, default=20,
                      help="Lanczos iterations for the top Hessian eigenvalue")
  parser.add_argument("--out-dir", default="runs/train")
  parser.add_argument("--no-plot", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="a few steps on a slice of the data, SGD and LookSAM unless "
                           "--variants is given (for CI)")
  args = parser.parse_args(argv)
  args.steps_per_epoch = None
  if args.variants is None:
    args.variants = SMOKE_VARIANTS if args.smoke else DEFAULT_VARIANTS
  if args.smoke:
    args.epochs, args.steps_per_epoch, args.hessian_iters = 2, 3, 4
    args.batch_size = min(args.batch_size, 16)
    args.train_limit = args.train_limit or 256
  return args


def main(argv=None):
  args = parse_args(argv)
  names = [n.strip() for n in args.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    sys.exit(f"Unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}.")
  try:
    data = DATASETS[args.dataset](**({"limit": args.train_limit}
                                     if args.dataset != "digits" else {}))
  except DatasetUnavailable as error:
    sys.exit(f"error: {error}")
  if args.dataset == "digits" and args.train_limit:
    data = dataclasses.replace(data, x_train=data.x_train[:args.train_limit],
                               y_train=data.y_train[:args.train_limit],
                               x_test=data.x_test[:args.train_limit],
                               y_test=data.y_test[:args.train_limit])
  if len(data.x_train) < args.batch_size:
    sys.exit(f"--batch-size {args.batch_size} exceeds the {len(data.x_train)} training images.")
  try:
    from tqdm.auto import tqdm as progress
  except ImportError:
    sys.exit("examples/train.py needs tqdm: pip install -e '.[examples]'")

  print(f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} test images of shape "
        f"{data.x_train.shape[1:]}; {args.epochs} epochs of batch {args.batch_size}; "
        f"inner optimizer SGD(lr={args.lr}, momentum={args.momentum}, "
        f"weight decay {args.weight_decay}); "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  results, started = [], time.perf_counter()
  for name in names:
    tx = make_optimizer(name, args)
    if tx is None:
      print(f"note: skipping {name}: this version of sam_optax has no "
            f"sam_optax.{VARIANTS[name].constructor}")
      continue
    results.append(train_variant(name, tx, data, args, progress))
  if not results:
    sys.exit("No variant could run.")
  total = time.perf_counter() - started

  print()
  print(format_table(results))
  notes = [f"{VARIANTS[r['variant']].label}: {VARIANTS[r['variant']].note}"
           for r in results if VARIANTS[r["variant"]].note]
  print(f"rho={args.rho}, seed={args.seed}. " + "; ".join(notes) + ".")
  print(f"train loss: the label-smoothed cross-entropy on all {len(data.x_train)} training "
        f"images (its minimum is {smoothed_entropy(args.label_smoothing, data.num_classes):.4f}"
        f"); top Hessian eig: of that loss at the final params, Lanczos with "
        f"{args.hessian_iters} iterations; time/step: fastest epoch after the first.")
  print(f"Total {total:.1f}s for training and evaluation, compilation included.")

  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results,
               "total_seconds": total}, f, indent=1)
  if not args.no_plot:
    path = os.path.join(args.out_dir, "curves.png")
    plot(results, path, f"{data.name}: SGD vs sharpness-aware variants (rho={args.rho})")
    print(f"Wrote {path} and {os.path.join(args.out_dir, 'results.json')}.")
  return results


if __name__ == "__main__":
  main()
