"""The notebooks in notebooks/: built from their sources, well formed, and executed end to end.

Each notebook runs top to bottom in a real Jupyter kernel (nbclient) at the "ci" size
(`SAM_OPTAX_NOTEBOOK_SIZE=ci`); its last cell asserts the paper's claim, so a notebook whose
claim stops holding fails here. One test per notebook, so `pytest -n 2` runs two at a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_every_source_has_a_notebook():
  sources = {p.stem for p in (NOTEBOOK_DIR / "sources").glob("*.py")}
  assert sources and sources == {p.stem for p in NOTEBOOKS}


def test_notebooks_are_built_from_their_sources():
  result = subprocess.run([sys.executable, str(NOTEBOOK_DIR / "_build.py"), "--check"],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_well_formed(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  claim, badge, install = nb.cells[:3]
  assert claim.cell_type == "markdown" and "**Claim.**" in claim.source
  if path.stem != "quickstart":
    assert re.search(r"arxiv\.org/abs/\d{4}\.\d{4,5}", claim.source), "cite the paper (arXiv)"
  assert f"colab.research.google.com/github/sam-optax/sam_optax/blob/main/notebooks/{path.name}" \
      in badge.source
  assert "pip" in install.source and "except ImportError" in install.source
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert "assert" in code[-1].source, "the last code cell asserts the claim"
  for cell in code:   # committed stripped
    assert not cell.outputs and cell.execution_count is None


def _lower_bound(specifier_set) -> Version | None:
  """The least version a specifier set admits, from its >=, >, == and ~= clauses (or None)."""
  bounds = [Version(s.version) for s in specifier_set if s.operator in (">=", ">", "==", "~=")]
  return max(bounds) if bounds else None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_satisfies_the_declared_floors(path):
  """Colab comes with jax, optax and flax preinstalled: the install cell's pip line must ask for
  versions at or above the floors pyproject.toml declares, and install sam_optax itself with
  the `notebooks` extra."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  declared = {}
  for line in project["dependencies"] + project["optional-dependencies"]["flax"]:
    requirement = Requirement(line)
    declared[canonicalize_name(requirement.name)] = _lower_bound(requirement.specifier)
  install = nbformat.read(path, as_version=4).cells[2].source
  # The pip arguments are the double-quoted requirement strings of the cell's pip line.
  requested = {}
  for text in re.findall(r'"([^"]+)"', install):
    if text == "pip":
      continue
    requirement = Requirement(text)
    requested[canonicalize_name(requirement.name)] = requirement
  sam = requested.pop("sam-optax")
  assert "notebooks" in sam.extras and sam.url, install
  for name in ("jax", "jaxlib", "optax", "flax"):
    assert name in requested, f"the install cell does not state {name}'s floor: {install}"
    lower = _lower_bound(requested[name].specifier)
    assert lower is not None and lower >= declared[name], (
        f"{path.name} installs {requested[name]}, below the declared floor {name}>="
        f"{declared[name]}")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv("SAM_OPTAX_NOTEBOOK_SIZE", "ci")
  # The kernel imports this checkout's sam_optax, installed or not, in float32 like a user's.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute()
  errors = [output for cell in nb.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]
  assert not errors, json.dumps(errors, indent=1)[:2000]
