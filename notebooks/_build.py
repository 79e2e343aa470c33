"""Builds the notebooks in this folder from their sources in `notebooks/sources/`.

Each source is a Python file in the "percent" format: cells are separated by lines starting
with `# %%`; a `# %% [markdown]` cell holds markdown, every line prefixed with `# ` (or a bare
`#` for an empty line). The sources run as plain scripts too (`python sources/NAME.py`), which
is how they are easiest to edit and debug.

Every notebook gets the same opening, written here once: the claim (the source's first
markdown cell), a Colab badge, and an install cell that works in Colab and is skipped where
sam_optax is already importable; it also names the floors of jax, jaxlib, optax and flax that
pyproject.toml declares, so that pip upgrades a runtime's older preinstalled ones. Each
source reads its size from `SAM_OPTAX_NOTEBOOK_SIZE` ("full", the default, or "ci" for shorter
runs) and ends with a cell asserting its claim.
Outputs are never written: the
committed notebooks are stripped, and CI executes them (tests/test_notebooks.py).

Usage::

  python notebooks/_build.py          # rewrite every notebook from its source
  python notebooks/_build.py --check  # exit 1 if a notebook differs from its source
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tomllib

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = HERE / "sources"
REPOSITORY = "sam-optax/sam_optax"

BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         f"(https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{{name}})")

# The packages whose floors the install cell states: a Colab runtime comes with jax, optax and
# flax preinstalled, possibly older than sam_optax's floors; naming the floors in the pip line
# makes pip upgrade them, and shows the reader which versions the notebook needs.
FLOOR_PACKAGES = ("jax", "jaxlib", "optax", "flax")


def declared_floors(pyproject: pathlib.Path = HERE.parent / "pyproject.toml") -> dict[str, str]:
  """{name: floor} for FLOOR_PACKAGES, read from the core and `flax` requirements."""
  project = tomllib.loads(pyproject.read_text())["project"]
  requirements = project["dependencies"] + project["optional-dependencies"]["flax"]
  floors = {}
  for requirement in requirements:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*", requirement)
    if match and match[1].lower() in FLOOR_PACKAGES:
      floors[match[1].lower()] = match[2]
  missing = [name for name in FLOOR_PACKAGES if name not in floors]
  if missing:
    raise ValueError(f"pyproject.toml declares no plain '>=' floor for {missing}.")
  return floors


def install_cell() -> str:
  """The install cell: sam_optax from the repository, and its floors for jax, optax and flax."""
  floors = " ".join(f'"{name}>={version}"' for name, version in declared_floors().items())
  return f"""\
# Installs sam_optax in Colab, with jax, jaxlib, optax and flax at or above the versions it
# declares (the runtime's own may be older); skipped wherever sam_optax is already importable
# (e.g. in CI).
try:
  import sam_optax
except ImportError:
  get_ipython().run_line_magic(
      "pip", 'install -q "sam_optax[notebooks] @ git+https://github.com/{REPOSITORY}" '
             '{floors}')
  import sam_optax"""

# Every source reads its problem size from this variable: "full" (the default: each notebook
# runs in under two minutes on two CPU cores) or "ci" (smaller runs, set by
# tests/test_notebooks.py).
SIZE_VARIABLE = "SAM_OPTAX_NOTEBOOK_SIZE"

# Lines of a source that only make sense when it runs as a script (not copied to notebooks).
SCRIPT_ONLY = "# script-only"


def parse(text: str) -> list[tuple[str, str]]:
  """Splits a percent-format source into (kind, source) cells."""
  cells: list[tuple[str, list[str]]] = []
  for line in text.splitlines():
    if line.startswith("# %%"):
      kind = "markdown" if "[markdown]" in line else "code"
      cells.append((kind, []))
    elif cells:
      if line.rstrip().endswith(SCRIPT_ONLY):
        continue
      cells[-1][1].append(line)
    elif line.strip() and not line.startswith("#"):
      raise ValueError("Code before the first `# %%` cell marker.")
  out = []
  for kind, lines in cells:
    if kind == "markdown":
      lines = [_uncomment(line) for line in lines]
    source = "\n".join(lines).strip("\n")
    if source:
      out.append((kind, source))
  return out


def _uncomment(line: str) -> str:
  if line.startswith("# "):
    return line[2:]
  if line.rstrip() in ("#", ""):
    return ""
  raise ValueError(f"Markdown lines must start with '# ' or be a bare '#': {line!r}")


def build(source: pathlib.Path) -> nbformat.NotebookNode:
  """The notebook of one source, with the common opening after its first (claim) cell."""
  cells = parse(source.read_text())
  if not cells or cells[0][0] != "markdown":
    raise ValueError(f"{source.name}: the first cell must be the markdown statement of the claim.")
  name = source.stem + ".ipynb"
  if SIZE_VARIABLE not in source.read_text():
    raise ValueError(f"{source.name}: read the size from ${SIZE_VARIABLE} (see the docstring).")
  opening = [cells[0], ("markdown", BADGE.format(name=name)), ("code", install_cell())]
  nb = nbformat.v4.new_notebook()
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  for index, (kind, text) in enumerate(opening + cells[1:]):
    make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
    cell = make(text)
    cell.id = f"{source.stem[:40]}-{index}"   # stable ids: rebuilding changes nothing
    nb.cells.append(cell)
  nbformat.validate(nb)
  return nb


def render(nb: nbformat.NotebookNode) -> str:
  return nbformat.writes(nb) + "\n"


def _content(nb: nbformat.NotebookNode) -> list:
  """What a rebuild must reproduce: the cells' kinds, sources and outputs (none)."""
  return [(cell.cell_type, cell.source, cell.get("outputs", [])) for cell in nb.cells]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="do not write; exit 1 if a notebook is out of date")
  args = parser.parse_args(argv)
  stale = []
  for source in sorted(SOURCES.glob("*.py")):
    target = HERE / (source.stem + ".ipynb")
    nb = build(source)
    if target.exists() and _content(nbformat.read(target, as_version=4)) == _content(nb):
      continue
    stale.append(target.name)
    if not args.check:
      target.write_text(render(nb))
  if args.check and stale:
    print("Out of date (run python notebooks/_build.py):", ", ".join(stale))
    return 1
  if not args.check:
    print("Wrote:", ", ".join(stale) if stale else "nothing (all up to date)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
