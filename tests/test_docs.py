"""The public API's documentation: every docstring example runs, and every public function
states its rule, arguments, return value, an example and its references."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

import sam_optax
import sam_optax.diagnostics
import sam_optax.equinox
import sam_optax.flax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC_MODULES = (sam_optax, sam_optax.cadences, sam_optax.diagnostics, sam_optax.equinox,
                  sam_optax.flax)
SECTIONS = ("Args:", "Returns:", "Example", "References:")


def public_functions():
  for module in PUBLIC_MODULES:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in names:
      obj = getattr(module, name)
      if inspect.isfunction(obj):
        yield f"{module.__name__}.{name}", obj


@pytest.mark.parametrize("name, function", sorted(set(public_functions())), ids=lambda x: (
    x if isinstance(x, str) else ""))
def test_public_function_docstring_has_every_section(name, function):
  doc = inspect.getdoc(function) or ""
  missing = [section for section in SECTIONS if section not in doc]
  if "math::" not in doc and ":math:" not in doc:
    missing.append("the rule in math (a `.. math::` block)")
  if "arxiv.org" not in doc and "Golub" not in doc:
    missing.append("an arXiv link in References")
  assert not missing, f"{name}'s docstring lacks: {', '.join(missing)}"


@pytest.mark.slow  # about 26 s (a subprocess of doctests); the full suite runs it
def test_docstring_examples_run():
  """Doctests run in a fresh process: the suite's float64 default would change their output."""
  env = dict(os.environ)
  env.pop("JAX_ENABLE_X64", None)
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
       "--doctest-modules", "--rootdir", ROOT, "--noconftest",
       os.path.join(ROOT, "sam_optax")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
