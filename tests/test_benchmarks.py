"""Smoke test of the overhead benchmark: it runs end to end and writes the expected JSON.

No thresholds: timings in CI are noise. The full run (and its targets) is
`python benchmarks/overhead.py`; its tables are on the site's benchmarks page (docs/benchmarks.md).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "overhead.py")

EXPECTED = ("floor", "handwritten", "handwritten_rerun", "optax_sam", "optax_sam_two_call", "sam",
            "sam_two_call", "asam", "gsam", "looksam", "momentum_sam", "msharp_vectorized",
            "msharp_sequential", "usam2", "husam", "rst", "ae_sam", "ae_looksam", "sampa",
            "sampa_vmap", "ksam", "partial_ascent", "gcsam", "sagm", "gsam_big_vision",
            "gam", "sparse_sam_dynamic", "sparse_sam_fisher", "sam_loss_scale",
            "lookbehind_sam")
# Gradient evaluations per step counted at run time (full-batch units) over the smoke run's
# steps: exact for the deterministic contenders. LookSAM runs two whole cycles of k = 5.
COUNTED = {"floor": 1, "handwritten": 2, "sam": 2, "sam_two_call": 2, "optax_sam": 2,
           "looksam": 1.2, "momentum_sam": 1, "msharp_vectorized": 2, "msharp_sequential": 2,
           "usam2": 3, "sampa": 2, "sampa_vmap": 2, "ksam": 0.5, "partial_ascent": 1.25,
           "gcsam": 2, "sagm": 2, "gsam_big_vision": 2, "gam": 4, "sparse_sam_dynamic": 2,
           "sam_loss_scale": 2, "lookbehind_sam": 3}


@pytest.mark.slow  # a benchmark run; the full suite runs it
def test_overhead_smoke(tmp_path):
  out = tmp_path / "overhead.json"
  # Every contender on the MLP: the CNN and the Transformer only add compile time here.
  result = subprocess.run(
      [sys.executable, SCRIPT, "--smoke", "--models", "mlp", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["settings"]["smoke"] is True
  assert {"platform", "cpu_count", "jax", "backend"} <= set(report["machine"])
  contenders = report["models"]["mlp"]["contenders"]
  assert set(EXPECTED) <= set(contenders)
  for name in EXPECTED:
    entry = contenders[name]
    assert entry["status"] in ("ok", "missing"), (name, entry)
    if entry["status"] == "ok":
      assert entry["median_s"] > 0 and entry["finite"], (name, entry)
      assert entry["memory"].get("temp_size_in_bytes", 0) >= 0
      assert entry["vs_handwritten"] > 0 and entry["vs_floor"] > 0
  for name in ("floor", "handwritten", "optax_sam", "optax_sam_two_call", "sam", "sam_two_call",
               "msharp_vectorized", "msharp_sequential"):
    assert contenders[name]["status"] == "ok", name
  assert contenders["sam_two_call"]["calls_per_step"] == 2
  for name, count in COUNTED.items():  # a missing contender is skipped above
    if contenders[name]["status"] == "ok":
      assert contenders[name]["gradients_measured"] == pytest.approx(count), name
  husam = contenders["husam"]
  assert (husam["gradients_measured"], husam["hvps_measured"]) == pytest.approx((2, 1))
  if contenders["rst"]["status"] == "ok":  # off steps evaluate no second gradient
    assert 1 <= contenders["rst"]["gradients_measured"] <= 2
  if contenders["sparse_sam_fisher"]["status"] == "ok":
    # The Fisher of batch/4 single examples on the update steps (t = 0, 5, ...) only: 0.25 on
    # each, on at most every other step of the smoke run's few steps.
    assert 2 < contenders["sparse_sam_fisher"]["gradients_measured"] <= 2.125
  assert "targets" not in report["models"]["mlp"]  # smoke mode checks no thresholds
  assert "| sam |" in result.stdout  # the markdown table is printed


def test_models_build():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import jax
    import jax.numpy as jnp
    import models
  finally:
    sys.path.pop(0)
  for name in models.MODELS:
    problem = models.make(name, "smoke", jnp.float32)
    # Jitted: eager Flax compiles every op on its own, which took most of a minute.
    loss_fn = jax.jit(problem.loss)
    loss = loss_fn(problem.params, problem.batch)
    assert loss.shape == () and jnp.isfinite(loss), name
    half = jax.tree.map(lambda x: x[: problem.batch_size // 2], problem.batch)
    assert jnp.isfinite(loss_fn(problem.params, half)), name  # a chunk is a batch
    losses = jax.jit(problem.per_example_loss)(problem.params, problem.batch)  # K-SAM's ranking
    assert losses.shape == (problem.batch_size,), name
    assert jnp.allclose(jnp.mean(losses), loss, rtol=1e-5), name


FRONTIER = os.path.join(ROOT, "benchmarks", "frontier.py")


def test_frontier_covers_the_catalogue():
  """Every catalogue entry has a frontier method (and SGD, the baseline)."""
  from tests.catalogue import CATALOGUE
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import frontier
  finally:
    sys.path.pop(0)
  assert {v.name for v in CATALOGUE} | {"sgd"} <= set(frontier.VARIANTS)
  assert frontier.VARIANTS["sparse_sam_fisher"].needs_fisher


@pytest.mark.slow  # a benchmark run (five variants, tiny sizes); the full suite runs it
def test_frontier_smoke(tmp_path):
  result = subprocess.run(
      [sys.executable, FRONTIER, "--smoke", "--out-dir", str(tmp_path)], cwd=ROOT,
      capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads((tmp_path / "frontier.json").read_text())
  results = {r["variant"]: r for r in report["results"]}
  assert list(results) == ["sgd", "sam", "husam", "sparse_sam_fisher", "lookbehind_sam"]
  assert results["sam"]["gradients_per_step"] == 2
  assert results["husam"]["hvps_per_step"] == pytest.approx(1)
  # The Fisher mask's single-example gradients (a quarter of the batch) on its update steps.
  assert results["sparse_sam_fisher"]["gradients_per_step"] > 2
  assert results["lookbehind_sam"]["gradients_per_step"] > 2
  table = (tmp_path / "frontier.md").read_text()
  assert "| SAM |" in table and report["machine"]["jax"] in table
  assert (tmp_path / "frontier.png").stat().st_size > 0
