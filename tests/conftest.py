"""Test configuration: float64 available everywhere, so every test states its dtypes.

XLA compiles fast here: the suite compiles thousands of small functions and runs each a few
times, so LLVM's optimization of the compiled code was about half of the suite's CPU time.
Optimization level 0 and the older fusion emitter change no value a test checks (both forms are
exact to the tolerances used) and halve the time. `SAM_OPTAX_TEST_OPTIMIZE=1` keeps XLA's
defaults, e.g. to check that the fast compilation hides nothing. Notebook kernels, the benchmark
smoke run and the 8-device checks inherit the setting; the examples and README blocks run with
XLA's defaults, as a user's do (their tests drop XLA_FLAGS).
"""

import importlib.metadata
import os

import pytest


def _fast_compile_flags() -> str:
  """XLA flags that skip the backend's optimization, for the flags this jaxlib knows."""
  flags = ["--xla_backend_optimization_level=0"]
  # Read from the metadata: importing jax or jaxlib here could start XLA before its flags are set.
  version = tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
  if version >= (0, 6):  # the MLIR fusion emitters and their flag; unknown flags abort XLA
    flags.append("--xla_cpu_use_fusion_emitters=false")
  return " ".join(flags)


# Single-device tests; multi-device tests start their own subprocess with 8 virtual devices.
os.environ.setdefault("XLA_FLAGS", "")
if os.environ.get("SAM_OPTAX_TEST_OPTIMIZE", "") in ("", "0"):
  if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_fast_compile_flags()}".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_configure(config):
  """Under pytest-xdist, hands tests out one at a time (each worker keeps two queued).

  xdist's default sends each worker a quarter of the suite at once, in collection order: one
  worker then got every slow test and ran alone at the end. One at a time, the slow tests
  (collected first, below) are shared by the workers, which finish together.
  """
  if getattr(config.option, "maxschedchunk", False) is None:  # xdist present, not set by hand
    config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
  """Catalogue-wide cases of variants outside `catalogue.FAST_TIER` join the slow tier; then slow
  tests go first, so that the long ones (subprocesses of a minute or more) start at once and the
  short ones fill in around them instead of running alone at the end. A run with the slow tier
  leaves out the fast tier's stand-ins for slow tests."""
  from tests import catalogue  # pylint: disable=import-outside-toplevel
  for item in items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    variants = [v for v in params.values() if isinstance(v, catalogue.Variant)]
    whole = item.get_closest_marker("whole_catalogue")
    # `whole_catalogue(when=predicate)` keeps only the cases whose parameters satisfy it.
    keeps_every_variant = whole is not None and whole.kwargs.get("when", lambda _: True)(params)
    if (variants and not keeps_every_variant
        and any(v.name not in catalogue.FAST_TIER for v in variants)):
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: else unchanged
  # A run that keeps the slow tier (no "not slow" in -m) runs the slow tests that the
  # `fast_tier_stand_in` tests stand in for, so it leaves the stand-ins out.
  if "not slow" not in (config.getoption("markexpr", "") or ""):
    stand_ins = [item for item in items if item.get_closest_marker("fast_tier_stand_in")]
    if stand_ins:
      items[:] = [item for item in items if item not in stand_ins]
      config.hook.pytest_deselected(items=stand_ins)
