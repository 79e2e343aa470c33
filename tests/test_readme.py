"""The README runs as written: every ```python block, each in a fresh interpreter.

A reader pastes a block into a new Python, so each block runs in its own process (nothing
leaks from one block to the next, and the suite's float64 default does not apply), from an
empty directory. A block whose first line is
`# requires: ...` cannot run alone; a dedicated test below runs it in the environment it names.
`test_every_block_is_run` checks that every block is run by exactly one test, so none can be
skipped silently (and that no code block hides under another language tag).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

from tests.test_multihost import free_port, wait_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
REQUIRES = "# requires:"
TIMEOUT_S = 180  # per block; a block takes a few seconds on an idle machine
LANGUAGES = ("python", "bash")  # the fences the README may use; only python blocks run

# Blocks that need more than a fresh interpreter: a phrase that identifies the block, and the
# test here that runs it in the environment its `# requires:` line names.
DEDICATED = {
    "jax.distributed.initialize": "test_multihost_block_runs_on_two_processes",
}


class Block(NamedTuple):
  line: int      # 1-based line of the opening fence in README.md
  language: str  # the fence's tag
  text: str      # the code, with the fence's indentation removed


def fenced_blocks(path=README) -> list[Block]:
  """Every fenced code block of a markdown file, indented ones (inside list items) included."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  blocks, opening = [], None
  for number, line in enumerate(lines, start=1):
    stripped = line.strip()
    if opening is None:
      match = re.fullmatch(r"( *)```(\S*)\s*", line)
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
          f"README.md:{number}: code line indented less than its fence (line {start})")
      body.append(line[indent:])
  assert opening is None, f"README.md:{opening[0]}: code block never closed"
  return blocks


def python_blocks() -> list[Block]:
  return [b for b in fenced_blocks() if b.language == "python"]


def plain_blocks() -> list[Block]:
  return [b for b in python_blocks() if not b.text.startswith(REQUIRES)]


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


def report(block: Block, what: str, output: str) -> str:
  numbered = "\n".join(f"{block.line + i:4d} | {line}"
                       for i, line in enumerate(block.text.splitlines(), start=1))
  return (f"README.md block at line {block.line} {what}.\n--- block ---\n{numbered}\n"
          f"--- output ---\n{output[-6000:]}")


def test_every_block_is_run():
  blocks = fenced_blocks()
  others = [(b.line, b.language) for b in blocks if b.language not in LANGUAGES]
  assert not others, f"code blocks with a tag this test does not know (line, tag): {others}"
  python = python_blocks()
  assert len(python) >= 9, f"only {len(python)} python blocks found in README.md"
  claimed = {name: [] for name in DEDICATED.values()}
  for block in python:
    if block.text.startswith(REQUIRES):
      names = [name for phrase, name in DEDICATED.items() if phrase in block.text]
      assert len(names) == 1, (f"README.md:{block.line}: a `{REQUIRES}` block must be run by "
                               f"exactly one dedicated test in tests/test_readme.py, got {names}")
      claimed[names[0]].append(block.line)
    else:
      # A `# requires:` line further down would not stop the plain run: it must come first.
      assert REQUIRES not in block.text, f"README.md:{block.line}: `{REQUIRES}` not on line 1"
      assert block in plain_blocks()
  for name, lines in claimed.items():
    assert callable(globals().get(name)), f"{name} is not a test of this module"
    assert len(lines) == 1, f"{name} must run exactly one README block, runs {lines}"


@pytest.mark.parametrize("block", plain_blocks(), ids=block_id)
def test_block_runs(block, tmp_path):
  try:
    result = run_in_fresh_interpreter(block.text, tmp_path)
  except subprocess.TimeoutExpired as error:
    pytest.fail(report(block, f"ran past {TIMEOUT_S}s", str(error.stderr or "")))
  assert result.returncode == 0, report(block, f"exited with {result.returncode}",
                                        result.stdout + result.stderr)


@pytest.mark.multidevice
@pytest.mark.slow  # two JAX processes meeting over gloo
def test_multihost_block_runs_on_two_processes(tmp_path):
  """The several-hosts program, as 2 processes on 127.0.0.1 with 4 virtual CPU devices each.

  As `tests/test_multihost.py` does: the environment variables the block reads, gloo
  collectives (the block sets them), output to files (a full pipe cannot block a process), and
  if one process fails the other, waiting for it in a collective, is killed at once.
  """
  (block,) = [b for b in python_blocks() if "jax.distributed.initialize" in b.text]
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
        f"other failed or past {TIMEOUT_S}s)", output)
    match = re.search(rf"process {rank} of 2, 8 devices: loss (\S+)", output)
    assert match, report(block, f"printed no result in process {rank}", output)
    losses.append(float(match.group(1)))
  # One global computation: both processes hold the same replicated params, hence the same loss.
  assert losses[0] == losses[1], losses
