"""SAM in float16: float32 master weights, float16 compute, a dynamic loss scale through both passes.

The recipe of mixed-precision training (Micikevicius et al., 2018) with a sharpness-aware
optimizer:

* the params stay in float32 (`param_dtype=jnp.float32`); the layers compute in float16
  (`dtype=jnp.float16`), so both forward-backward passes of a SAM step run in float16;
* the loss is computed in float32 from the float16 logits;
* `sam_optax.dynamic_loss_scale` wraps the optimizer: `sam_optax.flax.sam_step` multiplies the
  loss by the state's scale in *both* passes (at `w` and at `w + eps`), the transformation
  divides both gradients by it in float32 before the ascent normalizes `g` and before the
  inner optimizer, and a step whose gradient overflowed in either pass is skipped (params,
  optimizer state and BatchNorm-like model state untouched) while the scale halves; after
  `growth_interval` finite steps the scale doubles.

The only changes from a float32 SAM run are the `dtype=` of the layers and the wrapper::

  python examples/mixed_precision.py            # 5 epochs on the 8x8 digits, a few seconds
  python examples/mixed_precision.py --smoke    # a few steps (CI)
  python examples/mixed_precision.py --no-loss-scale   # float16 without scaling, to compare

The scale starts at 2^16 (Flax's `DynamicScale()` default) and grows after every 20 finite steps
here (Flax's default, 2000, is for long runs), so that a short run shows it move both ways:
once it is too large, a float16 gradient overflows (here from 2^19 on), the step is skipped
and the scale halves; it settles at 2^18. The losses printed are unscaled.
"""

from __future__ import annotations

import argparse

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training.dynamic_scale import DynamicScale

import sam_optax
import sam_optax.flax


class Net(nnx.Module):
  """An MLP computing in float16 on float32 params."""

  def __init__(self, rngs: nnx.Rngs):
    half = dict(dtype=jnp.float16, param_dtype=jnp.float32, rngs=rngs)
    self.dense1 = nnx.Linear(64, 128, **half)
    self.dense2 = nnx.Linear(128, 10, **half)

  def __call__(self, x):
    x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
    return self.dense2(x)


def loss_fn(model, batch):
  x, y = batch
  logits = model(x).astype(jnp.float32)  # the loss in float32, from float16 logits
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def load_data():
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


@nnx.jit
def train_step(model, optimizer, x, y):
  return sam_optax.flax.sam_step(model, optimizer, loss_fn, (x, y))


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-loss-scale", action="store_true",
                      help="float16 compute without loss scaling (gradients may underflow)")
  parser.add_argument("--smoke", action="store_true", help="2 epochs of 3 steps (CI)")
  args = parser.parse_args(argv)
  x_train, x_test, y_train, y_test = load_data()
  steps = len(x_train) // args.batch_size
  if args.smoke:
    args.epochs, steps = 2, 3

  model = Net(nnx.Rngs(args.seed))
  tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=args.rho, has_aux=True)
  if not args.no_loss_scale:
    tx = sam_optax.dynamic_loss_scale(tx, DynamicScale(growth_interval=20))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  for epoch in range(args.epochs):
    order = np.random.default_rng([args.seed, epoch]).permutation(len(x_train))
    losses = []
    for i in range(steps):
      chosen = order[i * args.batch_size:(i + 1) * args.batch_size]
      metrics = train_step(model, optimizer, x_train[chosen], y_train[chosen])
      losses.append(metrics.loss)
    report = (f"epoch {epoch + 1}: loss {float(np.mean(losses)):.4f}, test accuracy "
              f"{float(accuracy(model, x_test, y_test)):.4f}")
    if not args.no_loss_scale:
      state = optimizer.opt_state  # a DynamicLossScaleState (leaves in nnx Variables)
      skipped = int(state.inner_state.total_notfinite[...])
      report += (f", loss scale {float(sam_optax.loss_scale(state)):.0f}, "
                 f"steps skipped so far {skipped}")
    print(report)
  kernel = model.dense1.kernel[...]
  print(f"master weights {kernel.dtype}, compute {jnp.dtype(model.dense1.dtype).name}; "
        f"{int(optimizer.step[...])} steps")


if __name__ == "__main__":
  main()
