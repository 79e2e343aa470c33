"""Writes the site's copies of the notebooks, executed, into `docs/notebooks/`.

The notebooks in `notebooks/` are committed without outputs (they are built from
`notebooks/sources/*.py` by `notebooks/_build.py`, and the test suite executes them). The site
shows them with their outputs, so executed copies are committed here and the site build only
renders them: building the site costs no notebook execution, and CI runs each notebook once
(tests/test_notebooks.py), not twice.

`--check` verifies, without executing anything, that every copy holds exactly the cells its
source builds today (kinds and text), that every code cell ran, and that no cell raised:
a source edited without re-running this script fails the check (tests/test_site.py runs it).

Usage::

  python docs/execute_notebooks.py            # execute every notebook (full size) and write
  python docs/execute_notebooks.py quickstart # only these
  python docs/execute_notebooks.py --check    # exit 1 if a copy is stale or not executed
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
OUT_DIR = ROOT / "docs" / "notebooks"
SIZE_VARIABLE = "SAM_OPTAX_NOTEBOOK_SIZE"
CELL_TIMEOUT_S = 900


def _load_build_module():
  """notebooks/_build.py, which turns a source into its notebook (one definition, not two)."""
  spec = importlib.util.spec_from_file_location("_notebook_build", NOTEBOOK_DIR / "_build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_build = _load_build_module()


def sources() -> list[pathlib.Path]:
  return sorted((NOTEBOOK_DIR / "sources").glob("*.py"))


def _cells(nb) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source) for cell in nb.cells]


def execute(source: pathlib.Path, size: str) -> nbformat.NotebookNode:
  """The notebook of `source`, executed in a fresh kernel that imports this checkout."""
  import nbclient  # only needed to execute; --check runs without it

  nb = _build.build(source)
  env_before = dict(os.environ)
  # The kernel inherits this process's environment: this checkout's sam_optax, float32 as a
  # user's session, and the requested size.
  os.environ[SIZE_VARIABLE] = size
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env_before.get("PYTHONPATH", "").split(os.pathsep) if p])
  os.environ.pop("JAX_ENABLE_X64", None)
  try:
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(env_before)
  nb.metadata["sam_optax"] = {"size": size}
  return nb


def problems(source: pathlib.Path, target: pathlib.Path | None = None) -> list[str]:
  """Why `target` (default: the executed copy of `source` in docs/notebooks) is not an
  up-to-date executed copy of `source` (empty when it is)."""
  target = target or OUT_DIR / (source.stem + ".ipynb")
  if not target.exists():
    return [f"{target.name}: missing"]
  copy = nbformat.read(target, as_version=4)
  found = []
  if _cells(copy) != _cells(_build.build(source)):
    found.append(f"{target.name}: its cells differ from {source.name}'s")
  for index, cell in enumerate(copy.cells):
    if cell.cell_type != "code":
      continue
    if cell.execution_count is None:
      found.append(f"{target.name}: cell {index} was not executed")
    if any(output.output_type == "error" for output in cell.outputs):
      found.append(f"{target.name}: cell {index} raised")
  if "size" not in copy.metadata.get("sam_optax", {}):
    found.append(f"{target.name}: no record of the size it ran at")
  return found


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", help="notebook names (default: all)")
  parser.add_argument("--check", action="store_true",
                      help="do not execute; exit 1 if a copy is stale, unexecuted or failed")
  parser.add_argument("--size", default="full", choices=("full", "ci"),
                      help=f"the ${SIZE_VARIABLE} to run at (default: full)")
  args = parser.parse_args(argv)
  chosen = [s for s in sources() if not args.names or s.stem in args.names]
  unknown = set(args.names) - {s.stem for s in chosen}
  if unknown:
    parser.error(f"no source for {sorted(unknown)} in {NOTEBOOK_DIR / 'sources'}")
  if args.check:
    found = [line for source in chosen for line in problems(source)]
    expected = {s.stem + ".ipynb" for s in sources()}
    extra = sorted(p.name for p in OUT_DIR.glob("*.ipynb") if p.name not in expected)
    found += [f"{name}: has no source in notebooks/sources" for name in extra]
    if found:
      print("Out of date (run python docs/execute_notebooks.py):\n  " + "\n  ".join(found))
      return 1
    return 0
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  for source in chosen:
    start = time.perf_counter()
    nb = execute(source, args.size)
    (OUT_DIR / (source.stem + ".ipynb")).write_text(_build.render(nb))
    print(f"{source.stem}: executed at size {args.size} in {time.perf_counter() - start:.0f} s",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
