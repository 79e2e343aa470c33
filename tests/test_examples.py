"""Every example runs as a subprocess, as a user would run it, at its defaults (data_parallel.py
at 150 steps, long enough to reach the failure its defaults once hit). train.py's defaults
take minutes, so its default run is in the slow tier and its smoke run in the fast tier
(its protocol's own tests are in tests/test_main_job.py).

examples/checkpoint.py exits with an error unless the run resumed from its Orbax checkpoint
ends bit for bit where the uninterrupted run ends (params, BatchNorm statistics, RNG streams,
optimizer step and SAM state), so its runs are also the checkpoint test.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name, *args, extra_path=None, timeout=900, env_extra=None):
  env = dict(os.environ)
  paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
  env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.pop("XLA_FLAGS", None)  # each example asks for the devices it needs, as a user's run does
  env.pop("JAX_ENABLE_X64", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def check(result):
  assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  return result.stdout


def check_train_results(out, tmp_path, labels):
  assert "top Hessian eig" in out and "time/step" in out and "grads/step" in out
  report = json.loads((tmp_path / "results.json").read_text())
  results = report["results"]
  assert [r["label"] for r in results] == labels
  assert {"jax", "optax", "flax", "date", "cpu_count"} <= set(report["machine"])
  for r in results:
    assert 0.0 <= r["test_accuracy_mean"] <= 1.0 and len(r["test_accuracy"]) == len(r["seeds"])
    assert r["selected_rho"] in r["grid"]
    assert all(e == e for e in r["top_hessian_eigenvalue"])  # not NaN
    assert r["seconds_per_step"] > 0
  for name in ("frontier.png", "curves.png"):
    assert (tmp_path / name).stat().st_size > 0
  return {r["label"]: r for r in results}


@pytest.mark.fast_tier_stand_in  # for test_train_at_its_defaults, which checks the same and more
def test_train_smoke(tmp_path):
  """SGD and LookSAM (--smoke's default): 2 seeds, 2 radii, every stage of the main job."""
  out = check(run_example("train.py", "--smoke", "--out-dir", str(tmp_path)))
  results = check_train_results(out, tmp_path, ["SGD", "LookSAM"])
  assert len(results["SGD"]["history"]["epoch"]) == 2
  assert results["SGD"]["gradients_per_step"] == 1
  # The counted continuation runs steps 6..11: LookSAM's perturbed pass at step 10 only.
  assert results["LookSAM"]["gradients_per_step"] == pytest.approx(7 / 6)
  assert results["SGD"]["time_vs_sgd"] == 1 and results["SGD"]["beats_sgd"] is None
  assert results["LookSAM"]["beats_sgd"] in (True, False)


@pytest.mark.slow  # the 3-minute default run
def test_train_at_its_defaults(tmp_path):
  """The main job as the README runs it: ten methods, three seeds, noisy digits; every
  sharpness-aware method's radius selected inside its grid, and SAM beats SGD."""
  out = check(run_example("train.py", "--out-dir", str(tmp_path)))
  results = check_train_results(out, tmp_path, [
      "SGD", "SAM", "LookSAM", "MSAM", "ESAM", "RST", "AE-SAM", "SAMPa", "ASAM", "GSAM"])
  assert "SGD stopped early" in out
  assert results["SAM"]["beats_sgd"], (results["SAM"], results["SGD"])
  assert results["SAM"]["gradients_per_step"] == 2
  assert results["MSAM"]["gradients_per_step"] == 1
  assert results["LookSAM"]["gradients_per_step"] == pytest.approx(1.2)
  for r in results.values():
    assert len(r["seeds"]) == 3 and r["history"]["epoch"][-1] == 80


def test_train_cifar10_without_a_loader_fails_clearly(tmp_path):
  """Neither tensorflow-datasets nor Hugging Face datasets importable: a clear message."""
  for package in ("tensorflow_datasets", "datasets"):
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(
        f"raise ImportError('{package} hidden by the test')\n")
  result = run_example("train.py", "--dataset", "cifar10", "--smoke", "--out-dir",
                       str(tmp_path / "out"), extra_path=tmp_path)
  assert result.returncode != 0
  assert "pip install tensorflow-datasets" in result.stderr
  assert "pip install datasets" in result.stderr
  assert "Traceback" not in result.stderr


def test_train_rejects_unknown_variant(tmp_path):
  result = run_example("train.py", "--variants", "sgd,nosuchsam", "--smoke", "--out-dir",
                       str(tmp_path))
  assert result.returncode != 0 and "nosuchsam" in result.stderr


# checkpoint.py, linen_batchnorm.py and data_parallel.py run at (or, for data_parallel.py, near)
# their defaults, in the slow tier (about 70 s together, a fifth of the fast tier's budget; the
# fast tier keeps train.py's smoke run): compilation is most of their cost, so their defaults take
# about the CPU time of their --smoke runs (user + system, measured on 2 cores: 19.0 s against
# 19.2 s, 12.8 s against 11.4 s, and 16.9 s at 150 steps against 13.4 s), and a smoke run
# alone would test less.


@pytest.mark.slow  # about 30 s; the full suite runs it
def test_checkpoint_resume_is_bit_for_bit():
  """At its defaults: 60 steps, checkpoint at step 30."""
  out = check(run_example("checkpoint.py"))
  assert "saved the train state at step 30" in out and "bit for bit" in out


@pytest.mark.slow  # about 18 s; the full suite runs it
def test_linen_batchnorm_at_its_defaults():
  out = check(run_example("linen_batchnorm.py"))
  assert f"{15 * (1347 // 32)} steps" in out


@pytest.mark.slow  # about 21 s; the full suite runs it
@pytest.mark.multidevice
def test_data_parallel_runs_past_the_in_flight_limit():
  """8 virtual CPU devices, 150 steps per run: pmap and sharded jit agree for both ascents.

  150 steps is far past the 32 unfinished steps per device at which XLA:CPU's launch blocks a
  thread of its client pool (see `wait_for_old_steps` in the example). Without the example's
  bound on steps in flight this run aborted ("Termination timeout for all reduce") in every
  try on 2 cores. PJRT_NPROC=2 sizes that pool as on a 2-core machine (8 threads for 8
  devices) on any machine, so the test keeps its teeth on a large one: with 16 threads the
  unbounded loop passes, with 12 it still aborts.
  """
  out = check(run_example("data_parallel.py", "--steps", "150",
                          env_extra={"PJRT_NPROC": "2"}))
  assert "150 steps" in out and out.count("same params: yes") == 2, out


@pytest.mark.slow  # about 10 s of CPU (25 s on a busy machine); the full suite runs it
def test_mixed_precision_at_its_defaults():
  """float16 compute with a dynamic loss scale: the growing scale overflows at some steps,
  which are skipped, and the run still learns the digits."""
  out = check(run_example("mixed_precision.py"))
  assert f"{5 * (1347 // 32)} steps" in out and "master weights float32, compute float16" in out
  last = out.strip().splitlines()[-2]
  scale = float(last.split("loss scale ")[1].split(",")[0])
  assert scale >= 2.0 ** 16 and np.log2(scale) == int(np.log2(scale)), out  # a power of two
  skipped = int(last.rsplit(" ", 1)[1])
  accuracy = float(last.split("test accuracy ")[1].split(",")[0])
  assert skipped > 0 and accuracy > 0.9, out


@pytest.mark.parametrize("name", ["train.py", "checkpoint.py", "linen_batchnorm.py",
                                  "data_parallel.py", "mixed_precision.py"])
def test_examples_have_usage(name):
  text = (EXAMPLES / name).read_text()
  assert text.startswith('"""') and "--smoke" in text
