"""Data-parallel SAM two ways, `jax.pmap` and sharded `jax.jit`, giving the same params.

A small MLP classifies scikit-learn's 8x8 handwritten digits (a fixed split of 1347 train /
450 test images) with SAM around SGD + momentum, data parallel over 8 devices (8 virtual CPU
devices unless JAX already sees 8 or more). It trains the same model from the same
initialization on the same batches four times and checks that the two APIs agree:

- global SAM (ascent on the gradient averaged over devices, equal to SAM on the whole batch):
  `jax.pmap` with `axis_name="data", average_ascent=True`, and plain `jax.jit` on arrays placed
  with `NamedSharding` (params replicated, batch sharded), which needs no axis name;
- per-device ascent (m-sharpness with m = the per-device batch, Foret et al.'s default):
  `jax.pmap` with `average_ascent=False`, and sharded `jax.jit` with `chunk_size` = the
  per-device batch (the chunked form: each chunk, here each device's share, gets its own
  perturbation).

::

  python examples/data_parallel.py            # 300 steps per run, under a minute on 2 cores
  python examples/data_parallel.py --smoke    # 5 steps per run (what CI runs)
  python examples/data_parallel.py --rho 0.1 --steps 600

Each training loop keeps at most 4 steps in flight (`wait_for_old_steps`): on XLA:CPU a loop
that lets asynchronous dispatch run 32 multi-device steps ahead deadlocks on machines with
fewer than 16 cores, so copy that bound along with the loop.

It prints the test accuracy of each run and the largest difference between the pmap and
the jit params, and exits with status 1 if it exceeds `--tolerance`. The two APIs sum the
gradients in different orders, so float32 round-off remains: about 1e-7 after a few steps,
growing slowly over training (below 1e-4 after the default 300 steps).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

DEVICES = 8

# Steps a training loop may have dispatched but not finished. Both loops below wait for the
# step this many steps back before dispatching the next one (see `wait_for_old_steps`): without
# it the default run deadlocks on machines with few cores.
STEPS_IN_FLIGHT = 4

# JAX reads the device count when it starts: ask for 8 virtual CPU devices before importing it.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={DEVICES}").strip()

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import sam_optax  # noqa: E402


def load_digits(seed=0):
  """(x_train, y_train, x_test, y_test): flattened 8x8 images in [0, 1], int labels."""
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=g-import-not-at-top
  data = sklearn_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  return x[:1347], y[:1347], x[1347:], y[1347:]


def init_params(seed=0, sizes=(64, 128, 10)):
  rng = np.random.default_rng(seed)
  return {f"layer{i}": {"w": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
                        "b": np.zeros(b, np.float32)}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def logits(params, x):
  h = jax.nn.relu(x @ params["layer0"]["w"] + params["layer0"]["b"])
  return h @ params["layer1"]["w"] + params["layer1"]["b"]


def loss(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def grad(params, batch):
  return jax.grad(loss)(params, batch)


def make_tx(args, **options):
  return sam_optax.sam(optax.sgd(args.lr, momentum=0.9), rho=args.rho, **options)


def batches(x, y, steps, batch_size, seed=0):
  """The same sequence of (x, y) batches for every run."""
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    index = rng.choice(len(x), size=batch_size, replace=False)
    yield x[index], y[index]


def wait_for_old_steps(in_flight, params):
  """Record a dispatched step's `params`; wait until at most STEPS_IN_FLIGHT remain unfinished.

  Why the loops need this: JAX dispatches asynchronously, so a loop that never waits runs ahead
  of the devices, and XLA:CPU's runtime deadlocks when it gets too far ahead. XLA:CPU runs each
  device's share of a multi-device step on one client thread pool of max(cores, devices)
  threads: 8 threads for 8 devices on a machine with fewer than 8 cores. A step with a
  collective (here the all-reduce of the gradients) needs all 8 shares running at once to meet
  in the all-reduce. Launching a step also takes a slot of a per-device limit of 32 unfinished
  computations, and on a full device the launch *blocks its pool thread* until a slot frees.
  Once the loop is 32 steps ahead, launches of later steps block pool threads while the step
  at the head of the queue still waits for threads: its all-reduce never completes, and after
  40 s XLA aborts with "Termination timeout for all reduce ... Expected 8 threads to join the
  rendezvous, but only 6 of them arrived on time" (a thread dump shows the missing threads in
  `Semaphore::ScopedAcquire` under `CpuPjRtRawLoadedExecutable::Execute`). One dispatch can
  block up to 8 launches, so any machine with fewer than 16 cores can lose the threads the
  all-reduce needs. Keeping at most STEPS_IN_FLIGHT (< 32) steps unfinished means a launch
  never blocks, and a few steps in flight still keep the devices busy. Any long loop of
  multi-device steps on XLA:CPU needs the same bound (or a sync point); GPUs and TPUs use
  other runtimes.
  """
  in_flight.append(params)
  if len(in_flight) > STEPS_IN_FLIGHT:
    jax.block_until_ready(in_flight.popleft())


def train_pmap(args, data, average_ascent):
  """SAM under jax.pmap: params replicated per device, each device a slice of the batch."""
  tx = make_tx(args, axis_name="data", average_ascent=average_ascent)

  def step(params, state, batch):
    updates, state = tx.update(grad(params, batch), state, params,
                               grad_fn=lambda p: grad(p, batch))
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name="data")
  params = jax.tree.map(lambda x: np.stack([x] * DEVICES), init_params())
  state = jax.pmap(tx.init)(params)
  in_flight = collections.deque()
  for x, y in batches(data[0], data[1], args.steps, args.batch_size):
    split = lambda a: a.reshape((DEVICES, -1) + a.shape[1:])
    params, state = step(params, state, (split(x), split(y)))
    wait_for_old_steps(in_flight, params)
  return jax.tree.map(lambda a: np.asarray(a[0]), params)


def train_jit(args, data, chunk_size=None):
  """SAM under plain jax.jit: params replicated over a mesh, the batch sharded over it.

  No axis name: XLA partitions the global computation. `chunk_size` = per-device batch gives
  each device's share of the batch its own perturbation (per-device ascent).
  """
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  tx = make_tx(args, **({} if chunk_size is None else dict(chunk_size=chunk_size)))
  params = jax.device_put(init_params(), replicated)
  state = tx.init(params)  # eagerly: the state takes the params' shardings

  @jax.jit
  def step(params, state, batch):
    if chunk_size is None:
      updates, state = tx.update(grad(params, batch), state, params,
                                 grad_fn=lambda p: grad(p, batch))
    else:
      updates, state = tx.update(None, state, params, batch=batch, grad_fn=grad)
    return optax.apply_updates(params, updates), state

  in_flight = collections.deque()
  for batch in batches(data[0], data[1], args.steps, args.batch_size):
    params, state = step(params, state, jax.device_put(batch, sharded))
    wait_for_old_steps(in_flight, params)
  return jax.device_get(params)


def accuracy(params, x, y):
  return float(np.mean(np.argmax(np.asarray(logits(params, x)), axis=-1) == y))


def max_difference(a, b):
  return max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=64, help="global batch (8 per device)")
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--tolerance", type=float, default=1e-4,
                      help="largest allowed difference between the pmap and the jit params")
  parser.add_argument("--smoke", action="store_true", help="5 steps per run (for CI)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.steps = 5
  if jax.device_count() < DEVICES:
    sys.exit(f"needs {DEVICES} devices, JAX sees {jax.device_count()}: set XLA_FLAGS="
             f"--xla_force_host_platform_device_count={DEVICES} before JAX starts")
  if args.batch_size % DEVICES:
    sys.exit(f"--batch-size must be a multiple of {DEVICES}")
  per_device = args.batch_size // DEVICES
  data = load_digits()
  x_test, y_test = data[2], data[3]
  print(f"{DEVICES} devices ({jax.devices()[0].platform}), global batch {args.batch_size} "
        f"({per_device} per device), {args.steps} steps, SAM rho={args.rho}")

  ok = True
  for label, run_pmap, run_jit in (
      ("global SAM (ascent averaged)",
       lambda: train_pmap(args, data, average_ascent=True),
       lambda: train_jit(args, data)),
      (f"per-device ascent (m={per_device})",
       lambda: train_pmap(args, data, average_ascent=False),
       lambda: train_jit(args, data, chunk_size=per_device))):
    start = time.perf_counter()
    by_pmap = run_pmap()
    middle = time.perf_counter()
    by_jit = run_jit()
    end = time.perf_counter()
    gap = max_difference(by_pmap, by_jit)
    same = gap <= args.tolerance
    ok &= same
    print(f"{label}:")
    print(f"  pmap        test accuracy {accuracy(by_pmap, x_test, y_test):.3f}  "
          f"({middle - start:.1f}s)")
    print(f"  sharded jit test accuracy {accuracy(by_jit, x_test, y_test):.3f}  "
          f"({end - middle:.1f}s)")
    print(f"  same params: {'yes' if same else 'NO'} (max abs difference {gap:.1e})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
