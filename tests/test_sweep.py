"""Smoke test of the sweep benchmark: `jax.vmap` over rho and lam, against Python loops of runs.

No thresholds on time: timings in CI are noise. The script itself fails when the three ways of
running the sweep disagree on a run's final loss; the measured figures are in
docs/guides/hyperparameter_sweeps.md.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "sweep.py")


@pytest.mark.slow  # a benchmark run: six compilations of a small training loop
def test_sweep_smoke(tmp_path):
  out = tmp_path / "sweep.json"
  result = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["settings"]["smoke"] is True and report["settings"]["points"] == 4
  assert {"platform", "cpu_count", "jax", "backend"} <= set(report["machine"])
  results = report["results"]
  assert set(results) == {"vmap", "loop_compiled_once", "loop_recompile"}
  for name, entry in results.items():
    assert len(entry["losses"]) == 4 and entry["first_call_s"] > 0, name
  assert results["vmap"]["run_s"] > 0 and results["loop_recompile"]["run_s"] is None
  assert report["largest_relative_difference"] <= 1e-3
  assert set(report["ratios"]) == {"loop_recompile_vs_vmap_whole",
                                   "loop_compiled_once_vs_vmap_whole",
                                   "loop_compiled_once_vs_vmap_run"}
  assert "loop_recompile_vs_vmap_whole" in result.stdout
