"""Data parallelism and sharding: pmap, shard_map (data parallel and FSDP), sharded jit.

The multi-device checks need 8 devices, which JAX fixes when it starts, so they run in
subprocesses with 8 virtual CPU devices (`tests/distributed_checks.py`, two groups that
xdist can run side by side); this process keeps its single device and float64. The argument
checks that need no second device run here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 540


def run_script(args, devices=8, extra_xla_flags=""):
  path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  flags = f"--xla_force_host_platform_device_count={devices} {extra_xla_flags}".strip()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, XLA_FLAGS=flags)
  env.pop("JAX_ENABLE_X64", None)
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT_S)
  return proc.returncode, proc.stdout + proc.stderr


# Groups that share their single-device references and pmap runs go together.
@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.parametrize("groups", [("pmap", "jit"), ("shard_map", "fsdp")])
def test_eight_devices_match_single_device(groups):
  # Compiled as the in-process tests are (conftest.py sets the flags): optimization level 0
  # halves the CPU time of these compilation-bound checks and changes no compared value.
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if "device_count" not in f)
  code, out = run_script([os.path.join("tests", "distributed_checks.py"), *groups],
                         extra_xla_flags=flags)
  failures = [line for line in out.splitlines() if line.startswith("FAIL")]
  assert code == 0 and not failures, "\n".join(failures) + "\n" + out[-4000:]
  passed = [line for line in out.splitlines() if line.startswith("PASS")]
  expected = {("pmap", "jit"): 41, ("shard_map", "fsdp"): 23}[groups]
  assert len(passed) == expected, out[-4000:]
  for group in groups:
    assert f"TIME {group}" in out


def test_average_ascent_is_required_with_an_axis():
  with pytest.raises(ValueError, match="average_ascent=True for global SAM"):
    sam_optax.sam(optax.sgd(0.1), axis_name="data")
  with pytest.raises(ValueError, match="only has a meaning with axis_name"):
    sam_optax.usam(optax.sgd(0.1), average_ascent=True)


def test_unbound_axis_name_says_how_to_fix_it():
  tx = sam_optax.sam(optax.sgd(0.1), axis_name="data", average_ascent=True)
  params = {"w": jnp.ones(3, jnp.float32)}
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
  with pytest.raises(ValueError, match="is not bound here"):
    jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))(params, tx.init(params))


@pytest.mark.parametrize("average_ascent", [True, False])
def test_named_axis_under_vmap_matches_the_single_device_forms(average_ascent):
  """`vmap` with an axis name stands in for 4 devices on one: the same two equivalences."""
  devices, per_device = 4, 3
  x = jnp.linspace(-1.0, 1.0, devices * per_device * 2, dtype=jnp.float32).reshape(-1, 2)
  y = jnp.sin(3.0 * x[:, :1] * x[:, 1:])
  params = {"w": jnp.asarray([[0.5], [-0.3]], jnp.float32), "b": jnp.zeros(1, jnp.float32)}
  loss = lambda p, b: jnp.mean((jnp.tanh(b[0] @ p["w"] + p["b"]) - b[1]) ** 2)
  grad = lambda p, b: jax.grad(loss)(p, b)

  def steps(tx, update, params):
    @jax.jit
    def run(params):
      state = tx.init(params)
      for _ in range(3):
        updates, state = update(tx, params, state)
        params = optax.apply_updates(params, updates)
      return params
    return run(params)

  mapped = sam_optax.ssam(optax.sgd(0.2, momentum=0.9), rho=0.1, axis_name="data",
                          average_ascent=average_ascent)
  split = (x.reshape(devices, per_device, 2), y.reshape(devices, per_device, 1))

  def mapped_update(tx, params, state):
    def one(batch):
      return tx.update(grad(params, batch), state, params, grad_fn=lambda p: grad(p, batch))
    updates, states = jax.vmap(one, axis_name="data")(split)
    return jax.tree.map(lambda u: u[0], updates), jax.tree.map(lambda s: s[0], states)

  options = {} if average_ascent else dict(chunk_size=per_device)
  single = sam_optax.ssam(optax.sgd(0.2, momentum=0.9), rho=0.1, **options)

  def single_update(tx, params, state):
    if average_ascent:
      return tx.update(grad(params, (x, y)), state, params, grad_fn=lambda p: grad(p, (x, y)))
    return tx.update(None, state, params, batch=(x, y), grad_fn=grad)

  got, want = steps(mapped, mapped_update, params), steps(single, single_update, params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert jnp.allclose(a, b, rtol=1e-6, atol=1e-6), (a, b)
