"""The README, the front page: its code runs as written, its links lead somewhere, and its tables
hold what the rest of the repository says.

A reader pastes a block into a new Python, so each ```python block runs in its own process
(nothing leaks from one block to the next, and the suite's float64 default does not apply),
from an empty directory. `test_every_block_is_run` checks that no code block hides under
another language tag. The manual behind the front page is the documentation site in docs/;
tests/test_guides.py runs its blocks with the helpers of this module.

The README is also the package's long description on PyPI, where a relative link leads nowhere:
its links are absolute. Links into the site must name a page that the site's build produces,
links into the repository a file or folder that exists, so that moving a page breaks a test.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import subprocess
import sys
import tomllib
from typing import NamedTuple

import pytest

import sam_optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 180  # per block; a block takes a few seconds on an idle machine
LANGUAGES = ("python", "bash")  # the fences the README may use; only python blocks run
# Where the site is published (pyproject.toml's Documentation URL) and where the repository is.
SITE = "https://sam-optax.github.io/sam_optax/"
REPOSITORY = "https://github.com/sam-optax/sam_optax"
# Files the README shows (images) are read from the repository's main branch.
RAW = "https://raw.githubusercontent.com/sam-optax/sam_optax/main"


class Block(NamedTuple):
  line: int      # 1-based line of the opening fence in its file
  language: str  # the fence's tag
  text: str      # the code, with the fence's indentation removed


def fenced_blocks(path=README) -> list[Block]:
  """Every fenced code block of a markdown file, indented ones (inside list items) included."""
  name = os.path.relpath(path, ROOT)
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  blocks, opening = [], None
  for number, line in enumerate(lines, start=1):
    stripped = line.strip()
    if opening is None:
      # A MyST directive may take an argument on its opening line (```{include} path).
      match = re.fullmatch(r"( *)```(\S*)(?:[ \t]+\S.*)?\s*", line)
      if match:
        opening = (number, match.group(2), len(match.group(1)), [])
    elif stripped == "```":
      start, language, indent, body = opening
      blocks.append(Block(start, language, "\n".join(body) + "\n"))
      opening = None
    else:
      start, language, indent, body = opening
      # Inside a list item every code line is indented at least as far as the fence.
      assert not line.strip() or line[:indent] == " " * indent, (
          f"{name}:{number}: code line indented less than its fence (line {start})")
      body.append(line[indent:])
  assert opening is None, f"{name}:{opening[0]}: code block never closed"
  return blocks


def python_blocks() -> list[Block]:
  return [b for b in fenced_blocks() if b.language == "python"]


def block_id(block: Block) -> str:
  return f"line{block.line}"


def run_in_fresh_interpreter(code: str, directory) -> subprocess.CompletedProcess:
  """`code` run as a script in a fresh interpreter from `directory`, as a reader pastes it
  (raises subprocess.TimeoutExpired past TIMEOUT_S)."""
  script = directory / "block.py"
  script.write_text(code)
  return subprocess.run([sys.executable, str(script)], cwd=directory, env=fresh_env(),
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def fresh_env(**extra) -> dict[str, str]:
  """The environment of a reader's fresh interpreter: not the suite's float64 default.

  XLA_FLAGS is kept: conftest.py's fast-compilation flags change no value and take a third
  off each block's time.
  """
  env = dict(os.environ)
  env.pop("JAX_ENABLE_X64", None)
  # The checkout's sam_optax, also when the suite runs without installing it.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  env.update(extra)
  return env


def report(block: Block, what: str, output: str, path: str = README) -> str:
  numbered = "\n".join(f"{block.line + i:4d} | {line}"
                       for i, line in enumerate(block.text.splitlines(), start=1))
  return (f"{os.path.relpath(path, ROOT)} block at line {block.line} {what}.\n"
          f"--- block ---\n{numbered}\n--- output ---\n{output[-6000:]}")


def test_every_block_is_run():
  blocks = fenced_blocks()
  others = [(b.line, b.language) for b in blocks if b.language not in LANGUAGES]
  assert not others, f"code blocks with a tag this test does not know (line, tag): {others}"
  assert python_blocks(), "no python block in README.md: the quick start is gone"


@pytest.mark.parametrize("block", python_blocks(), ids=block_id)
def test_block_runs(block, tmp_path):
  try:
    result = run_in_fresh_interpreter(block.text, tmp_path)
  except subprocess.TimeoutExpired as error:
    pytest.fail(report(block, f"ran past {TIMEOUT_S}s", str(error.stderr or "")))
  assert result.returncode == 0, report(block, f"exited with {result.returncode}",
                                        result.stdout + result.stderr)


def test_ci_runs_exactly_the_readme_test_command():
  """The set-up's test command is what `.ci/run` runs first, character for character."""
  commands = [b.text.strip() for b in fenced_blocks() if b.language == "bash"
              and b.text.startswith('pip install -e ".[test]"')]
  assert commands == ['pip install -e ".[test]" && python -m pytest -n 2 -q'], commands
  ci = pathlib.Path(ROOT, ".ci", "run").read_text(encoding="utf-8").splitlines()
  assert any(line.startswith(commands[0] + " ||") for line in ci), (
      f".ci/run does not run the README's test command {commands[0]!r}")


# --- the variants' table ------------------------------------------------------------------------

def variant_constructors() -> dict[str, object]:
  """{name: function}: every public constructor of a variant, `name(inner, ...)` (the engine
  `sharpness_aware`, which takes the pieces rather than hyperparameters, is not a variant)."""
  found = {}
  for name in sam_optax.__all__:
    obj = getattr(sam_optax, name)
    if (inspect.isfunction(obj) and name != "sharpness_aware"
        and next(iter(inspect.signature(obj).parameters), None) == "inner"):
      found[name] = obj
  return found


def section(title: str) -> str:
  text = pathlib.Path(README).read_text(encoding="utf-8")
  match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
  assert match, f"README.md has no section '## {title}'"
  return match.group(1)


def table_rows(text: str) -> list[list[str]]:
  """The cells of every row of the markdown tables in `text`, header and rule lines left out."""
  rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
          for line in text.splitlines() if line.startswith("|")]
  return [row for row in rows[1:] if not set("".join(row)) <= set("-: ")] if rows else []


def test_every_variant_is_in_the_readme_with_its_reference():
  """Each public variant has a row of the README's table, and the row links the first reference
  of the variant's own docstring (so the two cannot name different papers)."""
  rows = {re.match(r"`(\w+)`", row[0]).group(1): row
          for row in table_rows(section("Variants")) if re.match(r"`(\w+)`", row[0])}
  constructors = variant_constructors()
  assert len(constructors) >= 28, sorted(constructors)
  missing = sorted(set(constructors) - set(rows))
  assert not missing, f"variants missing from the README's table: {missing}"
  for name, function in constructors.items():
    references = inspect.getdoc(function).split("References:", 1)[1]
    first = re.search(r"https?://\S+?(?=[\s,;)]|$)", references).group(0)
    assert f"({first})" in rows[name][-1], (
        f"the README's row of `{name}` does not link its docstring's reference {first}")


# --- the GPU figures: a compact copy of the benchmarks page's H200 table -------------------------

BENCHMARK_NAMES = {"the floor": "floor", "`optax.contrib.sam`": "optax_sam",
                   "`sam`, two-call form": "sam_two_call", "`looksam` (k=5)": "looksam"}


def test_the_gpu_figures_are_the_benchmarks_pages():
  """Every figure of the README's GPU table is the benchmarks page's, for the same contender."""
  page = pathlib.Path(ROOT, "docs", "benchmarks.md").read_text(encoding="utf-8")
  h200 = page.split("## On a GPU: NVIDIA H200, bfloat16", 1)[1].split("\nTargets,", 1)[0]
  full = {row[0].strip("`"): row[1:] for row in table_rows(h200)}
  compact = table_rows(section("Cost per step on a GPU"))
  assert len(compact) >= 5, compact
  for label, grads, *cells in compact:
    name = BENCHMARK_NAMES.get(label, label.strip("`"))
    assert name in full, f"README's GPU row {label!r}: no contender {name!r} on the page"
    assert full[name] == [grads, *cells], (label, [grads, *cells], full[name])
  for figure in ("1.34", "4.49", "11.12"):   # the hand-written step's milliseconds
    assert figure in section("Cost per step on a GPU") and figure in h200, figure


# --- links --------------------------------------------------------------------------------------

class Link(NamedTuple):
  line: int
  url: str


def links(path=README) -> list[Link]:
  """Every link of a markdown file: inline `[text](url)` and reference definitions
  `[key]: url` (code blocks left out)."""
  found, in_code = [], False
  for number, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(),
                                start=1):
    if line.strip().startswith("```"):
      in_code = not in_code
    if in_code:
      continue
    found += [Link(number, m) for m in re.findall(r"\]\(([^)\s]+)\)", line)]
    definition = re.match(r"\s*\[[^\]]+\]:\s*(\S+)", line)
    if definition:
      found.append(Link(number, definition.group(1)))
  return found


def slug(title: str) -> str:
  """A heading's anchor, as GitHub and the site (MyST's `github_slugify`) make it."""
  return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def heading_slugs(path) -> set[str]:
  text = pathlib.Path(path).read_text(encoding="utf-8")
  return {slug(re.sub(r"`", "", m)) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def site_source(page: str) -> pathlib.Path | None:
  """The docs/ source of a site page (`guides/flax.html`, `` for the front page), if any."""
  stem = page[:-len(".html")] if page.endswith(".html") else (page.rstrip("/") + "/index"
                                                               if page else "index")
  stem = stem.lstrip("/")
  for suffix in (".md", ".ipynb", ".rst"):
    candidate = pathlib.Path(ROOT, "docs", stem + suffix)
    if candidate.exists():
      return candidate
  return None


def site_links(path=README) -> list[tuple[str, str]]:
  """(page, fragment) of every link of a markdown file into the site."""
  return [tuple((link.url[len(SITE):] + "#").split("#")[:2])
          for link in links(path) if link.url.startswith(SITE)]


def test_links_lead_somewhere():
  """Links into the site name a page it builds (its source exists; the site's build test checks
  the built page and its anchor), links into the repository an existing path, links within the
  README a heading; there are no relative links, which PyPI cannot follow."""
  wrong = []
  own = heading_slugs(README)
  for line, url in links():
    if url.startswith(SITE):
      page, _, fragment = url[len(SITE):].partition("#")
      source = site_source(page)
      if source is None or "_build" in source.parts:
        wrong.append(f"README.md:{line}: {url}: no page of the site (no source in docs/)")
      elif fragment and source.suffix == ".md" and fragment not in heading_slugs(source):
        wrong.append(f"README.md:{line}: {url}: no heading #{fragment} in {source.name}")
    elif url.startswith(REPOSITORY + "/"):
      match = re.fullmatch(re.escape(REPOSITORY) + r"/(?:blob|tree)/main/([^#]+)(#.*)?", url)
      if not match or not pathlib.Path(ROOT, match.group(1)).exists():
        wrong.append(f"README.md:{line}: {url}: no such path in the repository")
    elif url.startswith(RAW + "/"):
      if not pathlib.Path(ROOT, url[len(RAW) + 1:]).is_file():
        wrong.append(f"README.md:{line}: {url}: no such file in the repository")
    elif url.startswith("#"):
      if url[1:] not in own:
        wrong.append(f"README.md:{line}: {url}: no such heading in README.md")
    elif not re.match(r"https?://", url):
      wrong.append(f"README.md:{line}: {url}: a relative link (PyPI cannot follow it)")
  assert not wrong, "\n".join(wrong)
  pages = {page for page, _ in site_links()}
  for page in ("how_it_works.html", "variants.html", "benchmarks.html", "api/index.html",
               "notebooks/index.html", "guides/getting_started.html"):
    assert page in pages, f"the README does not link the site's {page}"


def test_every_reference_link_is_defined():
  """A `[text][key]` with no `[key]: url` renders as plain brackets, silently."""
  text = pathlib.Path(README).read_text(encoding="utf-8")
  defined = set(re.findall(r"^\[([^\]]+)\]:", text, re.M))
  used = set(re.findall(r"\]\[([^\]]+)\]", text))
  assert used <= defined, f"reference links with no definition: {sorted(used - defined)}"


def test_the_site_url_is_the_documentation_url_of_the_package():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    urls = tomllib.load(f)["project"]["urls"]
  assert urls["Documentation"] == SITE
  assert urls["Source"] == REPOSITORY


def test_the_frontier_table_is_the_last_runs():
  """The README shows benchmarks/frontier.py's table as its last run wrote it (the run's date,
  machine and versions line, and every row): rerunning the benchmark without updating the
  README fails here, as does a row edited by hand."""
  written = pathlib.Path(ROOT, "benchmarks", "results", "frontier.md").read_text(encoding="utf-8")
  readme = pathlib.Path(README).read_text(encoding="utf-8").splitlines()
  run_line = [line for line in written.splitlines() if line.startswith("Run ")]
  rows = [line for line in written.splitlines() if line.startswith("|")]
  assert len(run_line) == 1 and len(rows) > 30, "benchmarks/results/frontier.md lost its table"
  assert run_line[0] in readme, "the README does not give the frontier run's date and machine"
  start = readme.index(rows[0])
  assert readme[start:start + len(rows)] == rows, "the README's frontier table is not the run's"
