"""The package as users get it: one version everywhere, and an sdist whose tests run unpacked.

The version is written once, in `sam_optax/__init__.py`; pyproject.toml reads it
(`dynamic = ["version"]`), so the installed metadata, the wheel and the sdist all carry it.
The sdist carries the whole repository (MANIFEST.in), so that its tests run after unpacking.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A few of the sdist's own tests, run from the unpacked tree: the tree utilities, SAM against
# its plain-jnp reference (which needs conftest.py, catalogue.py, problems.py and
# references.py), and the notebooks' checks (notebooks/, their sources and _build.py).
SDIST_TESTS = [
    "tests/test_tree.py",
    "tests/test_catalogue.py::test_matches_plain_jnp_reference[sam-mlp-float32]",
    "tests/test_catalogue.py::test_matches_plain_jnp_reference[sam-quadratic-float64]",
    "tests/test_notebooks.py",
]


def test_version_is_single_sourced():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in pyproject["project"], "the version is written in sam_optax/__init__.py"
  assert "version" in pyproject["project"]["dynamic"]
  assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
      "attr": "sam_optax.__version__"}


def test_version_matches_the_installed_metadata():
  installed = importlib.metadata.version("sam_optax")
  assert sam_optax.__version__ == installed, (
      f"sam_optax.__version__ is {sam_optax.__version__} but the installed metadata says "
      f"{installed}: reinstall (pip install -e .) after changing the version")


def test_license_is_declared_as_spdx():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0"   # a string (SPDX), not the deprecated table
  assert project["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text   # the full text, not a pointer to it
  assert "License :: OSI Approved :: Apache Software License" not in project["classifiers"], (
      "with an SPDX license string, setuptools refuses License :: classifiers")


def _git_files() -> list[str] | None:
  """The files git tracks here, or None outside a git checkout (e.g. in an unpacked sdist)."""
  try:
    result = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=False)
  except FileNotFoundError:
    return None
  if result.returncode != 0 or not (ROOT / ".git").exists():
    return None
  return [name for name in result.stdout.decode().split("\0") if name]


@pytest.mark.slow  # about a minute: builds the sdist and a wheel from it (pip fetches setuptools)
def test_sdist_and_wheel_build_and_the_unpacked_sdist_runs_its_tests(tmp_path):
  # Built from a clean copy, as from a fresh clone: setuptools adds the files listed in a
  # stale `sam_optax.egg-info/SOURCES.txt` (which `pip install -e .` leaves in the checkout),
  # which would hide a file that MANIFEST.in leaves out.
  tracked = _git_files()
  source = tmp_path / "source"
  if tracked is not None:
    for name in tracked:
      (source / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, source / name)
  else:   # an unpacked sdist: its own files, less what builds and runs leave
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "runs",
        ".venv*", "_build"))
  dist = tmp_path / "dist"
  # `python -m build` builds the sdist, then the wheel from the unpacked sdist: the wheel
  # building also checks that the sdist is complete enough to build.
  build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
                         capture_output=True, text=True, check=False, timeout=600)
  assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
  version = sam_optax.__version__
  sdist = dist / f"sam_optax-{version}.tar.gz"
  wheel = dist / f"sam_optax-{version}-py3-none-any.whl"
  assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])

  check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist),
                          str(wheel)], capture_output=True, text=True, check=False, timeout=300)
  assert check.returncode == 0, check.stdout + check.stderr

  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = archive.read(f"sam_optax-{version}.dist-info/METADATA").decode()
  assert f"sam_optax-{version}.dist-info/licenses/LICENSE" in names
  assert "sam_optax/py.typed" in names
  assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))], (
      "the wheel holds the package only")
  assert f"\nVersion: {version}\n" in metadata
  assert "\nLicense-Expression: Apache-2.0\n" in metadata

  unpacked = tmp_path / "unpacked"
  with tarfile.open(sdist) as archive:
    archive.extractall(unpacked, filter="data")
  tree = unpacked / f"sam_optax-{version}"
  assert f"\nVersion: {version}\n" in (tree / "PKG-INFO").read_text()
  shipped = {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}
  if tracked is not None:   # in a git checkout: the sdist carries every tracked file
    missing = sorted(set(tracked) - shipped)
    assert not missing, f"tracked files missing from the sdist: {missing}"
  for name in ("tests/conftest.py", "tests/catalogue.py", "tests/problems.py",
               "tests/references.py", "tests/field_references.py", "LICENSE", "CHANGELOG.md",
               "README.md", "MANIFEST.in"):
    assert name in shipped, name

  # The unpacked tree's own tests, importing the unpacked sam_optax (PYTHONPATH precedes
  # any installed copy) in a fresh interpreter.
  env = dict(os.environ, PYTHONPATH=str(tree))
  env.pop("JAX_ENABLE_X64", None)
  where = subprocess.run([sys.executable, "-c", "import sam_optax; print(sam_optax.__file__)"],
                         cwd=tree, env=env, capture_output=True, text=True, check=True)
  assert pathlib.Path(where.stdout.strip()).is_relative_to(tree), where.stdout
  run = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
       "-m", "not slow", *SDIST_TESTS],
      cwd=tree, env=env, capture_output=True, text=True, check=False, timeout=600)
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
  assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
