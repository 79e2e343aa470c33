"""The documentation site's pages run as written: every ```python block of every page in docs/
(the guides, how a step works, the variants, the benchmarks, the front page), each in a fresh
interpreter.

The same rules as the README's blocks (tests/test_readme.py, whose block extraction and fresh
environment this reuses): a reader pastes a block into a new Python, so each block runs alone,
in float32, from an empty directory. Pages are found by walking docs/, so a new page's blocks
run without being listed here. Most guides' blocks train small models and together take tens of
seconds, so they are in the slow tier; the pages whose blocks are cheap stay in the fast tier.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.test_multihost import free_port, wait_all
from tests.test_readme import (LANGUAGES, README, REPOSITORY, TIMEOUT_S, Block, fenced_blocks,
                               fresh_env, heading_slugs, report, run_in_fresh_interpreter)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES_DIR = DOCS / "guides"
GUIDES = ("getting_started", "migrating_from_optax_contrib", "flax", "equinox", "distributed",
          "mixed_precision", "choosing_a_variant", "hyperparameter_sweeps", "diagnostics")
# The manual's pages next to the guides: what the README links to (tests/test_readme.py).
MANUAL = ("how_it_works", "variants", "benchmarks")
# Pages whose blocks are cheap (a few seconds each): the fast tier runs them.
FAST_PAGES = ("index", "how_it_works", "variants", "guides/getting_started")
# MyST directives that hold no code (a `{code-cell}` would be code that no test runs).
DIRECTIVES = ("{toctree}", "{include}")
# The several-hosts program: run as one process like every block, and as two processes below.
MULTIHOST = ("guides/distributed", "jax.distributed.initialize")


def pages() -> list[str]:
  """Every markdown page of the site, as its path under docs/ without the suffix (docs/README.md
  is the site's own notes, excluded from the build; build outputs are not pages)."""
  found = []
  for path in sorted(DOCS.rglob("*.md")):
    relative = path.relative_to(DOCS)
    if relative.parts[0] in ("_build", "_templates") or relative.as_posix() == "README.md":
      continue
    found.append(relative.with_suffix("").as_posix())
  return found


def page_path(page: str) -> pathlib.Path:
  return DOCS / f"{page}.md"


def page_blocks():
  for page in pages():
    for block in fenced_blocks(str(page_path(page))):
      if block.language == "python":
        marks = () if page in FAST_PAGES else (pytest.mark.slow,)
        yield pytest.param(page, block, id=f"{page}-line{block.line}", marks=marks)


def test_every_block_is_run():
  """Every fenced block of every page is python (run below), bash, or a directive without code;
  the pages this suite relies on are among those walked."""
  walked = pages()
  for page in (*(f"guides/{g}" for g in GUIDES), *MANUAL, "index", "notebooks/index"):
    assert page in walked, f"docs/{page}.md is not walked"
  others = []
  for page in walked:
    for block in fenced_blocks(str(page_path(page))):
      if block.language not in LANGUAGES + DIRECTIVES:
        others.append((page, block.line, block.language))
  assert not others, f"code blocks with a tag this test does not run (page, line, tag): {others}"
  with_code = {param.values[0] for param in page_blocks()}
  for page in (*(f"guides/{g}" for g in GUIDES), "how_it_works", "variants"):
    assert page in with_code, f"docs/{page}.md has no python block"


def test_every_guide_exists_and_has_code():
  on_disk = {p.stem for p in GUIDES_DIR.glob("*.md")} - {"index"}
  assert on_disk == set(GUIDES), f"guides on disk {sorted(on_disk)} != listed {GUIDES}"


def toctree_entries(path: pathlib.Path) -> list[str]:
  text = path.read_text(encoding="utf-8")
  assert "```{toctree}" in text, path
  return [line.strip() for line in text.split("```{toctree}", 1)[1].split("```", 1)[0]
          .splitlines() if line.strip() and not line.strip().startswith(":")]


def test_index_lists_every_guide_and_page():
  assert toctree_entries(GUIDES_DIR / "index.md") == list(GUIDES)
  root = toctree_entries(DOCS / "index.md")
  for page in (*MANUAL, "guides/index", "notebooks/index", "api/index"):
    assert page in root, f"{page} is not in docs/index.md's toctree"


ROLE = re.compile(r"\{(func|class|mod|meth|attr|data|doc)\}`([^`]+)`")
LOCAL_LINK = re.compile(r"\]\(([^)\s:]+?\.(?:md|ipynb))(#[^)\s]*)?\)|\]\((#[^)\s]+)\)")
# A link to a section of the README, as GitHub shows it (the site does not hold the README).
README_LINK = re.compile(re.escape(REPOSITORY) + r"#([\w-]+)")


def doc_exists(page: str, target: str) -> bool:
  """A `{doc}` target (relative to the page, or absolute from docs/) names a source file."""
  base = DOCS if target.startswith("/") else page_path(page).parent
  stem = (base / target.lstrip("/")).resolve()
  return any(stem.with_suffix(suffix).exists() for suffix in (".md", ".ipynb", ".rst"))


def test_cross_references_name_what_exists():
  """Every MyST role names a page or an importable public object, and every markdown link to a
  page names a file and, for a markdown page, one of its headings (the site's build checks the
  same; this catches a wrong name without building the site)."""
  wrong = []
  for page in pages():
    text = page_path(page).read_text(encoding="utf-8")
    for role, target in ROLE.findall(text):
      target = target.split("<")[-1].rstrip(">").lstrip("~")   # `title <target>` and `~a.b`
      if role == "doc":
        ok = doc_exists(page, target)
      else:
        module_name, _, attr = (target, "", "") if role == "mod" else target.rpartition(".")
        try:
          obj = importlib.import_module(module_name)
          ok = not attr or (hasattr(obj, attr) and not attr.startswith("_"))
          # Sphinx resolves {func} to functions and {class} to classes only.
          if ok and role == "func":
            ok = inspect.isfunction(getattr(obj, attr))
          elif ok and role == "class":
            ok = inspect.isclass(getattr(obj, attr))
        except ImportError:
          ok = False
      if not ok:
        wrong.append(f"{page}.md: {{{role}}}`{target}`")
    for file, fragment, own_fragment in LOCAL_LINK.findall(text):
      target = (page_path(page).parent / file).resolve() if file else page_path(page)
      if not target.exists():
        wrong.append(f"{page}.md: link to {file}: no such file")
      elif (fragment or own_fragment) and target.suffix == ".md":
        anchor = (fragment or own_fragment)[1:]
        if anchor not in heading_slugs(target):
          wrong.append(f"{page}.md: link to {file}#{anchor}: no such heading")
    for anchor in README_LINK.findall(text):
      if anchor != "readme" and anchor not in heading_slugs(README):
        wrong.append(f"{page}.md: link to the README's #{anchor}: no such heading")
  assert not wrong, "cross-references to nothing:\n" + "\n".join(wrong)


@pytest.mark.parametrize("page, block", page_blocks())
def test_page_block_runs(page: str, block: Block, tmp_path):
  path = str(page_path(page))
  try:
    result = run_in_fresh_interpreter(block.text, tmp_path)
  except subprocess.TimeoutExpired as error:
    pytest.fail(report(block, f"ran past {TIMEOUT_S}s", str(error.stderr or ""), path))
  assert result.returncode == 0, report(block, f"exited with {result.returncode}",
                                        result.stdout + result.stderr, path)


@pytest.mark.multidevice
@pytest.mark.slow  # two JAX processes meeting over gloo
def test_multihost_block_runs_on_two_processes(tmp_path):
  """The distributed guide's several-hosts program, as 2 processes on 127.0.0.1 with 4 virtual
  CPU devices each.

  As `tests/test_multihost.py` does: the environment variables the block reads, gloo
  collectives (the block sets them), output to files (a full pipe cannot block a process), and
  if one process fails the other, waiting for it in a collective, is killed at once.
  """
  page, phrase = MULTIHOST
  path = str(page_path(page))
  (block,) = [b for b in fenced_blocks(path) if b.language == "python" and phrase in b.text]
  script = tmp_path / "block.py"
  script.write_text(block.text)
  num_processes, port = 2, free_port()
  procs, logs = [], [tmp_path / f"process_{i}.log" for i in range(num_processes)]
  try:
    for rank, log_path in enumerate(logs):
      flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
      env = fresh_env(JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(),
                      COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES=str(num_processes),
                      RANK=str(rank))
      with open(log_path, "w") as log:
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
  finally:
    wait_all(procs, TIMEOUT_S)
  outputs = [log_path.read_text() for log_path in logs]
  losses = []
  for rank, (proc, output) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, report(
        block, f"exited with {proc.returncode} in process {rank} (negative: killed after the "
        f"other failed or past {TIMEOUT_S}s)", output, path)
    match = re.search(rf"process {rank} of 2: loss (\S+)", output)
    assert match, report(block, f"printed no result in process {rank}", output, path)
    losses.append(float(match.group(1)))
  # One global computation: both processes hold the same replicated params, hence the same loss.
  assert losses[0] == losses[1], losses
