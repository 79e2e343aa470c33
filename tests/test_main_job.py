"""The main job's protocol (examples/train.py): the vmapped sweep computes what a plain run
computes, and the main claim, SAM beats SGD on noisy-label digits, holds with a criterion shown
to discriminate."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train  # noqa: E402

sys.path.pop(0)


def quiet(iterable=None, **kwargs):
  """tqdm's interface, silent."""
  from tqdm import tqdm
  return tqdm(iterable, disable=True, **kwargs)


def problem_for(argv):
  args = train.parse_args(argv)
  data = train.load_digits(args.noise, args.data_seed, args.train_limit)
  seeds = list(range(args.seeds))
  graphdef, params0 = train.split_model(data, seeds)
  return args, train.Problem.make(data, graphdef, args), params0, seeds


@pytest.mark.parametrize("name", ["sam", "ae_sam"])
def test_unvmapped_run_reproduces_the_sweep(name):
  """Seed 1 at the grid's second radius: the vmapped sweep (vmap over 2 radii x 2 seeds, two
  chunks) and one plain jitted run end at the same params. AE-SAM's cadence is a `lax.cond` on
  a batched predicate: under vmap both branches run and a select keeps one, the same math."""
  args, problem, params0, seeds = problem_for(
      ["--variants", name, "--epochs", "4", "--chunk-epochs", "2", "--seeds", "2"])
  method = dataclasses.replace(args.methods[name], grid=(0.5, 1.0))
  sweep = train.sweep_method(name, method, problem, params0, seeds, args, quiet)
  params, _, metrics = train.single_run(method, problem, train._tree_index(params0, 1), 1.0, 1,
                                        args.epochs)
  swept = train._tree_index(sweep["params"], 1, 1)
  for a, b in zip(jax.tree.leaves(swept), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  assert metrics["train_loss"] == pytest.approx(sweep["curves"]["train_loss"][-1, 1, 1],
                                                rel=1e-4)
  assert metrics["test_accuracy"] == sweep["curves"]["test_accuracy"][-1, 1, 1]
  # The other radius is another run: the comparison can tell them apart.
  other = train._tree_index(sweep["params"], 0, 1)
  assert not np.allclose(jax.tree.leaves(other)[0], jax.tree.leaves(params)[0], rtol=1e-3)


@pytest.mark.slow  # about 25 s on 2 cores
def test_sam_beats_sgd_on_noisy_digits():
  """The main claim, on a smaller configuration of the main job's code (40 epochs, a 2-point
  grid, 3 seeds): SAM at its validation-selected radius beats SGD on 40%-noisy digits by more
  than the seeds' spread. The negative control goes through the same criterion: SAM at rho = 0
  (the inner optimizer, bit for bit) does not beat SGD."""
  args = train.parse_args(["--variants", "sgd,sam,sam0", "--epochs", "40", "--chunk-epochs",
                           "40", "--hessian-iters", "2", "--timing-epochs", "1",
                           "--timing-rounds", "1"],
                          methods={**train.METHODS, "sam0": dataclasses.replace(
                              train.METHODS["sam"], label="SAM rho=0", grid=(0.0,))})
  args.methods["sam"] = dataclasses.replace(args.methods["sam"], grid=(0.5, 1.0))
  results, _ = train.train_all(args, quiet, log=lambda *a: None)
  by_label = {r["label"]: r for r in results}
  sgd, sam, control = by_label["SGD"], by_label["SAM"], by_label["SAM rho=0"]
  margin = sam["test_accuracy_mean"] - sgd["test_accuracy_mean"]
  spread = max(sam["test_accuracy_std"], sgd["test_accuracy_std"])
  assert sam["beats_sgd"] and margin > spread > 0, (sam, sgd)
  assert control["beats_sgd"] is False, control
  assert control["test_accuracy"] == sgd["test_accuracy"]
  assert sam["gradients_per_step"] == 2 and sgd["gradients_per_step"] == 1


def test_corruption_is_fixed_and_documented_sizes():
  """The split sizes the docstring gives, the test labels clean, and the same corruption on
  every run; `--noise 0` leaves every label right."""
  data = train.load_digits(0.4, 0)
  assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (1150, 287, 360)
  assert 0.3 < np.mean(data.y_train != data.y_train_clean) < 0.42
  again = train.load_digits(0.4, 0)
  np.testing.assert_array_equal(data.y_train, again.y_train)
  np.testing.assert_array_equal(data.x_test, again.x_test)
  clean = train.load_digits(0.0, 0)
  np.testing.assert_array_equal(clean.y_train, clean.y_train_clean)
  np.testing.assert_array_equal(clean.y_test, data.y_test)


def test_beats_needs_a_margin_larger_than_the_spread():
  base = {"test_accuracy_mean": 0.80, "test_accuracy_std": 0.02}
  assert train.beats({"test_accuracy_mean": 0.83, "test_accuracy_std": 0.01}, base)
  assert not train.beats({"test_accuracy_mean": 0.81, "test_accuracy_std": 0.01}, base)
  assert not train.beats({"test_accuracy_mean": 0.83, "test_accuracy_std": 0.04}, base)


def test_gradient_counter_counts_what_runs():
  counter = train.GradientCounter()
  grad = jax.grad(lambda w: jnp.sum(w ** 2))
  f = jax.jit(lambda w, take: jax.lax.cond(take, lambda: counter.tap(grad(w)),
                                           lambda: w))
  for take in (True, False, True):
    jax.block_until_ready(f(jnp.ones(3), take))
  assert counter.total == 2


def test_image_data_trains_the_cnn():
  """`--dataset cifar10`'s path without the download: images (here the digits as 8x8x1) get
  the CNN, and the same sweep, selection and evaluation run on it."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  data = train.split_and_corrupt("digit images", images[:300], labels[:300], images[1500:1600],
                                 labels[1500:1600], validation=60, noise=0.4, seed=0)
  args = train.parse_args(["--variants", "sam", "--epochs", "1", "--chunk-epochs", "1",
                           "--seeds", "2"])
  args.steps_per_epoch = 2
  graphdef, params0 = train.split_model(data, [0, 1])
  assert isinstance(train.nnx.merge(graphdef, train._tree_index(params0, 0)), train.CNN)
  problem = train.Problem.make(data, graphdef, args)
  method = dataclasses.replace(args.methods["sam"], grid=(0.1, 0.5))
  sweep = train.sweep_method("sam", method, problem, params0, [0, 1], args, quiet)
  assert sweep["curves"]["test_accuracy"].shape == (1, 2, 2)
  assert np.isfinite(sweep["curves"]["train_loss"]).all()
