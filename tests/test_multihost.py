"""Several hosts: two JAX processes on loopback, 4 virtual CPU devices each, train like one.

The test starts two copies of `tests/multihost_worker.py`; they meet through
`jax.distributed.initialize` at a coordinator on 127.0.0.1 (a free port) and run their
collectives over gloo. Their final params must equal a single process's: SAM on the whole batch
for the sharded-jit run, the chunked form (m = per-device batch) for the per-device pmap run.
Both processes are killed if they have not finished within `TIMEOUT_S`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
TOL = 1e-5


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_all(procs, timeout_s):
  """Waits for every process; once one fails (the others would wait for it in a collective)
  or the deadline passes, kills those still running."""
  deadline = time.monotonic() + timeout_s
  while any(proc.poll() is None for proc in procs):
    if any(proc.poll() not in (None, 0) for proc in procs) or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def run_workers(out_dir, num_processes=2):
  """Starts the workers and waits for all of them; returns [(exit code, log)].

  Output goes to files (a full pipe cannot block a worker). If a worker fails, the others
  (which would wait for it in a collective) are killed at once; past the deadline, all are.
  """
  port = free_port()
  path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={worker.LOCAL_DEVICES}")
  env.pop("JAX_ENABLE_X64", None)
  log_paths = [os.path.join(out_dir, f"process_{i}.log") for i in range(num_processes)]
  procs = []
  try:
    for i, log_path in enumerate(log_paths):
      with open(log_path, "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), str(i),
             str(num_processes), str(port), str(out_dir)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  finally:
    wait_all(procs, TIMEOUT_S)
  logs = []
  for log_path in log_paths:
    with open(log_path) as log:
      logs.append(log.read())
  return [(proc.returncode, log) for proc, log in zip(procs, logs)]


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  results = run_workers(tmp_path)
  for i, (code, log) in enumerate(results):
    assert code == 0, (f"process {i} exited with {code} (negative: killed after a failure or "
                       f"past {TIMEOUT_S}s):\n{log[-4000:]}")
    assert f"process {i}: 8 devices over 2 processes" in log, log[-4000:]
  outputs = []
  for i in range(2):
    with np.load(tmp_path / f"process_{i}.npz") as saved:
      outputs.append(dict(saved))
  assert outputs[0].keys() == outputs[1].keys()
  for key in outputs[0]:  # the two processes hold the same (replicated) params
    np.testing.assert_array_equal(outputs[0][key], outputs[1][key], err_msg=key)

  import jax  # pylint: disable=g-import-not-at-top
  expected = {"jit": worker.reference(),
              "pmap": worker.reference(chunk_size=worker.BATCH // (2 * worker.LOCAL_DEVICES))}
  checked = 0
  for form, per_variant in expected.items():
    for name, params in per_variant.items():
      for path, leaf in jax.tree.leaves_with_path(params):
        key = f"{form}/{name}{jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(outputs[0][key], np.asarray(leaf), rtol=TOL, atol=TOL,
                                   err_msg=key)
        assert outputs[0][key].dtype == np.float32
        checked += 1
  assert checked == len(outputs[0]) == 2 * len(worker.VARIANTS) * 5
  # The run moved the params (the comparison is not of two initial states).
  moved = max(float(np.max(np.abs(outputs[0][f"jit/sam{jax.tree_util.keystr(path)}"] - leaf)))
              for path, leaf in jax.tree.leaves_with_path(worker.initial_params()))
  assert moved > 1e-3
