"""The guides in docs/guides/ run as written: every ```python block, each in a fresh interpreter.

The same rules as the README's blocks (tests/test_readme.py, whose block extraction and fresh
environment this reuses): a reader pastes a block into a new Python, so each block runs alone,
in float32, from an empty directory. Most guides' blocks train small models and together take
tens of seconds, so they are in the slow tier; the cheapest guide stays in the fast tier.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import subprocess

import pytest

from tests.test_readme import (LANGUAGES, TIMEOUT_S, Block, fenced_blocks,
                               run_in_fresh_interpreter)

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES_DIR = ROOT / "docs" / "guides"
GUIDES = ("getting_started", "migrating_from_optax_contrib", "flax", "equinox", "distributed",
          "mixed_precision", "choosing_a_variant", "hyperparameter_sweeps", "diagnostics")
FAST_GUIDES = ("getting_started",)  # two cheap blocks: the fast tier runs them


def guide_blocks():
  for guide in GUIDES:
    path = GUIDES_DIR / f"{guide}.md"
    if not path.exists():  # test_every_guide_exists_and_has_code reports it
      continue
    for block in fenced_blocks(str(path)):
      if block.language == "python":
        marks = () if guide in FAST_GUIDES else (pytest.mark.slow,)
        yield pytest.param(guide, block, id=f"{guide}-line{block.line}", marks=marks)


def test_every_guide_exists_and_has_code():
  on_disk = {p.stem for p in GUIDES_DIR.glob("*.md")} - {"index"}
  assert on_disk == set(GUIDES), f"guides on disk {sorted(on_disk)} != listed {GUIDES}"
  for guide in GUIDES:
    blocks = fenced_blocks(str(GUIDES_DIR / f"{guide}.md"))
    others = [(b.line, b.language) for b in blocks if b.language not in LANGUAGES]
    assert not others, f"{guide}.md: code blocks with another tag (line, tag): {others}"
    assert any(b.language == "python" for b in blocks), f"{guide}.md has no python block"


def test_index_lists_every_guide():
  index = (GUIDES_DIR / "index.md").read_text(encoding="utf-8")
  assert "```{toctree}" in index
  listed = [line.strip() for line in index.split("```{toctree}", 1)[1].split("```", 1)[0]
            .splitlines() if line.strip() and not line.strip().startswith(":")]
  assert listed == list(GUIDES), listed


ROLE = re.compile(r"\{(func|class|mod|meth|attr|data|doc)\}`([^`]+)`")


def test_cross_references_name_what_exists():
  """Every MyST role names a guide or an importable public object (the site's build checks the
  same against its API pages; this catches a wrong name without building the site)."""
  wrong = []
  for guide in GUIDES:
    text = (GUIDES_DIR / f"{guide}.md").read_text(encoding="utf-8")
    for role, target in ROLE.findall(text):
      target = target.split("<")[-1].rstrip(">").lstrip("~")   # `title <target>` and `~a.b`
      if role == "doc":
        ok = (GUIDES_DIR / f"{target}.md").exists()
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
        wrong.append(f"{guide}.md: {{{role}}}`{target}`")
  assert not wrong, "cross-references to nothing:\n" + "\n".join(wrong)


@pytest.mark.parametrize("guide, block", guide_blocks())
def test_guide_block_runs(guide: str, block: Block, tmp_path):
  try:
    result = run_in_fresh_interpreter(block.text, tmp_path)
  except subprocess.TimeoutExpired as error:
    pytest.fail(f"docs/guides/{guide}.md block at line {block.line} ran past {TIMEOUT_S}s\n"
                f"{error.stderr or ''}")
  numbered = "\n".join(f"{block.line + i:4d} | {line}"
                       for i, line in enumerate(block.text.splitlines(), start=1))
  assert result.returncode == 0, (
      f"docs/guides/{guide}.md block at line {block.line} exited with {result.returncode}\n"
      f"--- block ---\n{numbered}\n--- output ---\n{(result.stdout + result.stderr)[-6000:]}")
