"""Benchmark problems: an MLP, a small ResNet-style CNN and a small Transformer, in Flax Linen.

Each problem is a `Problem(name, params, loss, batch, description, per_example_loss)`:
`loss(params, batch)` is a scalar mean over the batch (so a chunk of the batch is a batch too,
for m-sharpness), `per_example_loss(params, batch)` the vector of each example's loss (a
sequence's mean over its tokens for the Transformer; for K-SAM's selection), `batch` is a dict
of arrays whose leading axis indexes examples. Sizes come in three presets: `smoke` (tiny,
for CI), `cpu` (a few milliseconds per SAM step on two CPU cores) and `gpu` (larger models, meant
for bfloat16 on one accelerator).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIZES = {
    "smoke": {
        "mlp": dict(batch=16, features=32, hidden=(32,), classes=4),
        "cnn": dict(batch=8, image=8, channels=4, blocks=1, classes=4),
        "transformer": dict(batch=4, seq=8, vocab=16, dim=16, heads=2, layers=1),
    },
    "cpu": {
        "mlp": dict(batch=128, features=784, hidden=(512, 512), classes=10),
        "cnn": dict(batch=16, image=16, channels=16, blocks=2, classes=10),
        "transformer": dict(batch=16, seq=32, vocab=256, dim=64, heads=4, layers=2),
    },
    "gpu": {
        "mlp": dict(batch=1024, features=3072, hidden=(4096, 4096, 4096), classes=1000),
        "cnn": dict(batch=128, image=32, channels=128, blocks=4, classes=100),
        "transformer": dict(batch=32, seq=256, vocab=8192, dim=512, heads=8, layers=6),
    },
}

MODELS = ("mlp", "cnn", "transformer")


@dataclasses.dataclass
class Problem:
  name: str
  params: Any
  loss: Callable[[Any, Any], jax.Array]   # loss(params, batch) -> scalar mean over the batch
  batch: dict
  description: str
  # per_example_loss(params, batch) -> (batch,) losses, whose mean is `loss` (up to rounding)
  per_example_loss: Callable[[Any, Any], jax.Array] | None = None

  @property
  def num_params(self) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

  @property
  def batch_size(self) -> int:
    return int(jax.tree.leaves(self.batch)[0].shape[0])


class MLP(nn.Module):
  hidden: tuple
  classes: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype, param_dtype=self.dtype)(x))
    return nn.Dense(self.classes, dtype=self.dtype, param_dtype=self.dtype)(x)


class ResidualBlock(nn.Module):
  channels: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = lambda: nn.Conv(self.channels, (3, 3), dtype=self.dtype, param_dtype=self.dtype)
    norm = lambda: nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)
    y = conv()(nn.relu(norm()(x)))
    y = conv()(nn.relu(norm()(y)))
    return x + y


class ResNet(nn.Module):
  """A stem convolution, `blocks` pre-norm residual blocks, global average pooling."""
  channels: int
  blocks: int
  classes: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.channels, (3, 3), dtype=self.dtype, param_dtype=self.dtype)(x)
    for i in range(self.blocks):
      if i == self.blocks // 2 and i > 0:  # halve the resolution once, half-way
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      x = ResidualBlock(self.channels, self.dtype)(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return nn.Dense(self.classes, dtype=self.dtype, param_dtype=self.dtype)(x)


class TransformerBlock(nn.Module):
  dim: int
  heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    y = nn.LayerNorm(**kw)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, **kw)(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(**kw)(x)
    y = nn.Dense(4 * self.dim, **kw)(y)
    y = nn.Dense(self.dim, **kw)(nn.gelu(y))
    return x + y


class Transformer(nn.Module):
  """A decoder-only language model: token + position embeddings, pre-norm causal blocks."""
  vocab: int
  seq: int
  dim: int
  heads: int
  layers: int
  dtype: Any

  @nn.compact
  def __call__(self, tokens):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    x = nn.Embed(self.vocab, self.dim, **kw)(tokens)
    x = x + nn.Embed(self.seq, self.dim, **kw)(jnp.arange(tokens.shape[1]))
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      x = TransformerBlock(self.dim, self.heads, self.dtype)(x, mask)
    x = nn.LayerNorm(**kw)(x)
    return nn.Dense(self.vocab, **kw)(x)


def _cross_entropy(logits, labels):
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def _per_example_cross_entropy(logits, labels):
  """Each example's cross-entropy, averaged over its other axes (a sequence's tokens)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return jnp.mean(nll.reshape(nll.shape[0], -1), axis=1)


def make(name: str, preset: str = "cpu", dtype: Any = jnp.float32, seed: int = 0) -> Problem:
  """Builds the problem `name` ("mlp", "cnn" or "transformer") at the size `preset`."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}: choose among {MODELS}.")
  size = SIZES[preset][name]
  dtype = jnp.dtype(dtype)
  k_init, k_x, k_y = jax.random.split(jax.random.PRNGKey(seed), 3)
  if name == "mlp":
    model = MLP(tuple(size["hidden"]), size["classes"], dtype)
    x = jax.random.normal(k_x, (size["batch"], size["features"]), dtype)
    y = jax.random.randint(k_y, (size["batch"],), 0, size["classes"])
    batch = {"x": x, "y": y}
    description = (f"MLP {size['features']}-{'-'.join(map(str, size['hidden']))}-"
                   f"{size['classes']}, batch {size['batch']}")
  elif name == "cnn":
    model = ResNet(size["channels"], size["blocks"], size["classes"], dtype)
    x = jax.random.normal(k_x, (size["batch"], size["image"], size["image"], 3), dtype)
    y = jax.random.randint(k_y, (size["batch"],), 0, size["classes"])
    batch = {"x": x, "y": y}
    description = (f"ResNet-style CNN, {size['blocks']} residual blocks x {size['channels']} "
                   f"channels, {size['image']}x{size['image']}x3 images, batch {size['batch']}")
  else:
    model = Transformer(size["vocab"], size["seq"], size["dim"], size["heads"], size["layers"],
                        dtype)
    tokens = jax.random.randint(k_x, (size["batch"], size["seq"] + 1), 0, size["vocab"])
    batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    description = (f"Transformer LM, {size['layers']} layers, d={size['dim']}, "
                   f"{size['heads']} heads, seq {size['seq']}, vocab {size['vocab']}, "
                   f"batch {size['batch']}")
  # One compiled init, not one compilation per eager op (tens of seconds for the Transformer).
  params = jax.jit(model.init)(k_init, jax.tree.map(lambda a: a[:1], batch)["x"])["params"]

  def loss(params, batch):
    return _cross_entropy(model.apply({"params": params}, batch["x"]), batch["y"])

  def per_example_loss(params, batch):
    return _per_example_cross_entropy(model.apply({"params": params}, batch["x"]), batch["y"])

  description += f", {jnp.dtype(dtype).name}"
  return Problem(name, params, loss, batch, description, per_example_loss)
