"""The documentation site (docs/): every public symbol has an API page, the executed notebooks
match their sources, and the whole site builds with warnings as errors (slow tier).

The build command is the one docs/README.md and the README give:
`sphinx-build -W --keep-going -n -b html docs docs/_build/html`.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import sam_optax
from tests.test_guides import GUIDES, MANUAL  # the nine guides; the manual's pages

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
BUILD_TIMEOUT_S = 900


def public_modules() -> dict[str, object]:
  """{public path: module}: the package and every module or subpackage of sam_optax whose name
  has no leading underscore (a new one joins the check by existing)."""
  modules = {"sam_optax": sam_optax}
  for path in sorted((ROOT / "sam_optax").iterdir()):
    if path.name.startswith("_") or not (path.suffix == ".py" or (path / "__init__.py").exists()):
      continue
    name = f"sam_optax.{path.stem}"
    modules[name] = importlib.import_module(name)
  return modules


def public_symbols() -> set[str]:
  symbols = set()
  for path, module in public_modules().items():
    names = getattr(module, "__all__", None)
    assert names is not None, f"{path} has no __all__: the API reference documents __all__"
    symbols |= {f"{path}.{name}" for name in names}
  return symbols


def documented_symbols() -> dict[str, list[str]]:
  """{qualified name: the API pages naming it}: autosummary entries (under the page's current
  `.. currentmodule::`), `.. automodule::` and hand-written `.. py:data::` entries."""
  found: dict[str, list[str]] = {}
  for page in sorted(API.glob("*.rst")):
    module, in_autosummary = None, False
    for line in page.read_text().splitlines():
      directive = re.match(r"\.\. (\S+?)::\s*(\S*)", line)
      if directive:
        kind, argument = directive.groups()
        in_autosummary = kind == "autosummary"
        if kind in ("currentmodule", "py:currentmodule"):
          module = argument
        elif kind == "automodule":
          found.setdefault(argument, []).append(page.name)
        elif kind in ("py:data", "py:function", "py:class"):
          found.setdefault(f"{module}.{argument}", []).append(page.name)
        continue
      if in_autosummary:
        if line and not line.startswith(" "):
          in_autosummary = False
        elif line.strip() and not line.strip().startswith(":"):
          assert module, f"{page.name}: an autosummary before any currentmodule"
          found.setdefault(f"{module}.{line.strip()}", []).append(page.name)
  return found


def test_every_public_symbol_has_an_api_page():
  documented = documented_symbols()
  missing = sorted(public_symbols() - set(documented))
  assert not missing, f"public symbols with no page in docs/api/*.rst: {missing}"


def test_the_api_pages_name_only_public_symbols_once():
  documented = documented_symbols()
  stale = sorted(set(documented) - public_symbols() - set(public_modules()))
  assert not stale, f"docs/api/*.rst names what is not public (renamed or removed?): {stale}"
  twice = {name: pages for name, pages in documented.items() if len(pages) > 1}
  assert not twice, f"documented on more than one page: {twice}"


def test_every_guide_is_in_the_guides_toctree():
  toctree = (DOCS / "guides" / "index.md").read_text()
  for guide in GUIDES:
    assert (DOCS / "guides" / f"{guide}.md").exists(), guide
    assert re.search(rf"^{guide}$", toctree, re.MULTILINE), f"{guide} not in guides/index.md"
  root = (DOCS / "index.md").read_text()
  for page in ("guides/index", *MANUAL):
    assert re.search(rf"^{page}$", root, re.MULTILINE), f"{page} not in index.md's toctree"


def test_executed_notebooks_match_their_sources():
  pytest.importorskip("nbformat")
  result = subprocess.run([sys.executable, str(DOCS / "execute_notebooks.py"), "--check"],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_notebook_check_catches_stale_unexecuted_and_failed_copies(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  spec = importlib.util.spec_from_file_location("execute_notebooks",
                                                DOCS / "execute_notebooks.py")
  execute_notebooks = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(execute_notebooks)
  source = ROOT / "notebooks" / "sources" / "quickstart.py"
  committed = nbformat.read(DOCS / "notebooks" / "quickstart.ipynb", as_version=4)
  assert execute_notebooks.problems(source) == []

  def damaged(change):
    nb = nbformat.from_dict(committed)   # a copy
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    change(nb, code)
    path = tmp_path / "quickstart.ipynb"
    nbformat.write(nb, path)
    return " ".join(execute_notebooks.problems(source, path))

  def edit_source(nb, code):
    code[-1].source += "\nprint('edited')"

  def unexecute(nb, code):
    code[1].execution_count = None

  def fail(nb, code):
    code[1].outputs.append(nbformat.v4.new_output("error", ename="E", evalue="", traceback=[]))

  assert "differ" in damaged(edit_source)
  assert "was not executed" in damaged(unexecute)
  assert "raised" in damaged(fail)
  assert "missing" in " ".join(execute_notebooks.problems(source, tmp_path / "absent.ipynb"))


def test_the_build_checks_the_docstring_rule_of_test_docs():
  """conf.py's docstring check (a Sphinx warning) and tests/test_docs.py hold one rule."""
  pytest.importorskip("sphinx")
  from tests import test_docs

  conf = _load_conf()
  assert conf.REQUIRED_SECTIONS == test_docs.SECTIONS
  assert conf.missing_sections(sam_optax.sam.__doc__) == []
  assert conf.missing_sections("One line.\n\nArgs:\n  x: y\n") == [
      "Returns:", "Example", "References:", "the rule in math (a `.. math::` block)",
      "an arXiv link in References"]


def _load_conf():
  spec = importlib.util.spec_from_file_location("sam_optax_docs_conf", DOCS / "conf.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sphinx_build(source: pathlib.Path, out: pathlib.Path, *extra: str):
  """The site's build command (warnings are errors, nitpicky), in a fresh interpreter that
  imports this checkout's sam_optax."""
  env = dict(os.environ)
  env.pop("JAX_ENABLE_X64", None)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [
      p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html",
       "-d", str(out / "doctrees"), *extra, str(source), str(out / "html")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)


@pytest.mark.slow  # about 90 s on a 2-core CPU: the whole site
def test_site_builds_with_warnings_as_errors(tmp_path):
  pytest.importorskip("sphinx", reason="the `docs` extra (Sphinx, myst-nb) is not installed")
  # A generated page left by an earlier build, of a symbol since removed: the build clears
  # api/_generated (gitignored) first, so it cannot end up outside every toctree.
  stale = API / "_generated" / "sam_optax.removed_symbol.rst"
  stale.parent.mkdir(exist_ok=True)
  stale.write_text("sam_optax.removed_symbol\n========================\n")
  result = sphinx_build(DOCS, tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert not stale.exists()
  html = tmp_path / "html"
  group_pages = "".join(p.read_text() for p in (html / "api").glob("*.html"))
  # The package's own page is the API index; its modules and symbols each have one.
  for name in public_symbols() | (set(public_modules()) - {"sam_optax"}):
    page = html / "api" / "_generated" / f"{name}.html"
    anchors = (f'id="{name}"', f'id="module-{name}"')
    assert page.exists() or any(a in group_pages for a in anchors), f"no page for {name}"
  for guide in GUIDES:
    assert (html / "guides" / f"{guide}.html").exists(), guide
  for page in MANUAL:
    assert (html / f"{page}.html").exists(), page
  # Every link of the README into the site names a page of this build, and an anchor on it.
  from tests.test_readme import site_links
  for page, fragment in site_links():
    built = html / (page or "index.html")
    assert built.is_file(), f"the README links {page!r}, which the build did not produce"
    if fragment:
      assert f'id="{fragment}"' in built.read_text(), f"no #{fragment} on {page}"
  for notebook in (DOCS / "notebooks").glob("*.ipynb"):
    page = (html / "notebooks" / f"{notebook.stem}.html").read_text()
    assert "<img" in page or "output" in page, f"{notebook.stem}: rendered without outputs"


# A page documenting a function whose docstring lacks its sections, a broken cross-reference,
# and a well-formed page (which must build, so that the failures are the pages' own).
PROBES = {
    "lacking_sections": (".. autofunction:: sam_optax._src.variants.build_variant",
                         "build_variant's docstring lacks:"),
    "broken_reference": ("See :func:`sam_optax.not_a_function`.",
                         "reference target not found: sam_optax.not_a_function"),
    "well_formed": (".. autofunction:: sam_optax.hessian_ascent\n\n"
                    "See :func:`sam_optax.hessian_ascent`.", None),
}


@pytest.mark.slow  # about 15 s per build
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_the_build_fails_on_a_missing_section_or_a_broken_reference(tmp_path, probe):
  pytest.importorskip("sphinx", reason="the `docs` extra (Sphinx, myst-nb) is not installed")
  body, expected = PROBES[probe]
  source = tmp_path / "source"
  source.mkdir()
  (source / "index.rst").write_text(textwrap.dedent("""\
      Probe
      =====

      """) + body + "\n")
  result = sphinx_build(source, tmp_path, "-c", str(DOCS))
  output = result.stdout + result.stderr
  if expected is None:
    assert result.returncode == 0, output[-4000:]
  else:
    assert result.returncode != 0 and expected in output, output[-4000:]
