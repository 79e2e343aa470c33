"""Static typing: what pyright (basic mode) sees of the public API.

A user-code file is checked by pyright: correct calls (the shared options, schedules,
`update_with_aux`, `has_aux`, `sharpness_aware` with pieces, `optax.inject_hyperparams`) give no
error, while a misspelled hyperparameter, a wrong-typed one and another variant's keyword are
each flagged on their own line (also at the declared floors). A second run checks the
package itself (slow tier). Each test is one pyright run; pyright comes with the `test` extra
(`pyright[nodejs]`, which brings node as a wheel).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lines ending in `# expect-error` must each get an error; every other line none.
USER_CODE = textwrap.dedent('''\
    import jax
    import jax.numpy as jnp
    import optax

    import sam_optax


    def loss(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
      return jnp.mean((x @ params["w"]) ** 2)


    params = {"w": jnp.ones((3,))}
    x = jnp.eye(3)
    grads = jax.grad(loss)(params, x)


    def grad_fn(p):
      return jax.grad(loss)(p, x)


    def grad_and_aux(p):
      return jax.grad(loss, has_aux=False)(p, x), {"loss": loss(p, x)}


    # Correct calls: no error.
    tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    tx = sam_optax.sam(optax.sgd(0.1), 0.05, renormalize=True, window=(0, 100), mask=None)
    tx = sam_optax.ssam(optax.adamw(1e-3), rho=optax.linear_schedule(0.01, 0.05, 100))
    tx = sam_optax.asam(optax.sgd(0.1), rho=0.5, eta=0.01, bias_convention="adaptive")
    tx = sam_optax.gsam(optax.sgd(0.1), rho_max=0.04, rho_min=0.02, alpha=0.4,
                        learning_rate=optax.cosine_decay_schedule(0.1, 100))
    tx = sam_optax.looksam(optax.sgd(0.1), k=5, alpha=0.7, two_call=True)
    tx = sam_optax.unified_sam(optax.sgd(0.1), rho=0.05, lam=lambda t: 1.0 / (t + 1))
    tx = sam_optax.usam(optax.sgd(0.1), chunk_size=4, chunk_strategy="sequential")
    tx = sam_optax.sam(optax.sgd(0.1), axis_name="batch", average_ascent=False)
    tx = sam_optax.sam(optax.sgd(0.1), rho={"w": 0.05})  # a radius per leaf
    options: sam_optax.SharedOptions = {"renormalize": True, "window": (10, None)}
    tx = sam_optax.vasso(optax.sgd(0.1), theta=0.9, **options)
    injected = optax.inject_hyperparams(sam_optax.sam)(optax.sgd(0.1), rho=0.05)
    tx = sam_optax.sharpness_aware(optax.sgd(0.1), sam_optax.normalized_ascent(0.05),
                                   correction=sam_optax.renormalize(), window=(0, 10))

    tx = sam_optax.sam(optax.sgd(0.1), rho=0.05, has_aux=True)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    updates, state, aux = tx.update_with_aux(grads, state, params, grad_fn=grad_and_aux)
    params = optax.apply_updates(params, updates)
    needs_pairs: bool = tx.has_aux and not tx.two_call
    skipping = sam_optax.skip_if_nonfinite(tx, 3)
    updates, state, aux = skipping.update_with_aux(grads, skipping.init(params), params,
                                                   grad_fn=grad_and_aux)

    # Mistakes: each flagged on its line.
    sam_optax.sam(optax.sgd(0.1), rh0=0.05)  # expect-error
    sam_optax.sam(optax.sgd(0.1), rho="big")  # expect-error
    sam_optax.sam(optax.sgd(0.1), alpha=0.5)  # expect-error
    sam_optax.looksam(optax.sgd(0.1), k=2.5)  # expect-error
    sam_optax.usam(optax.sgd(0.1), renormalise=True)  # expect-error
    sam_optax.sam(optax.sgd(0.1), chunk_strategy="parallel")  # expect-error
    sam_optax.sam(0.05)  # expect-error
    tx.update_with_aux(grads)  # expect-error
''')


def _pyright(*args: str, cwd: pathlib.Path) -> list[dict]:
  """pyright's diagnostics of severity error, run with this Python's packages."""
  env = dict(os.environ, PYRIGHT_PYTHON_IGNORE_WARNINGS="1")  # no version check on the network
  run = subprocess.run(
      [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable, *args],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  try:
    report = json.loads(run.stdout)
  except json.JSONDecodeError:
    pytest.fail(f"pyright gave no report (exit {run.returncode}):\n{run.stdout}\n{run.stderr}")
  return [d for d in report["generalDiagnostics"] if d["severity"] == "error"]


def _show(errors: list[dict]) -> str:
  return "\n".join(f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}"
                   for d in errors)


def test_pyright_accepts_correct_calls_and_flags_mistakes_on_their_lines(tmp_path):
  (tmp_path / "user_code.py").write_text(USER_CODE)
  # The checkout's package, whatever the install (an editable install hides it from pyright).
  config = {"typeCheckingMode": "basic", "pythonVersion": "3.11",
            "include": ["user_code.py"], "extraPaths": [str(ROOT)]}
  (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
  errors = _pyright("-p", str(tmp_path / "pyrightconfig.json"), cwd=tmp_path)

  lines = USER_CODE.splitlines()
  expected = {i + 1 for i, line in enumerate(lines) if line.endswith("# expect-error")}
  flagged = {d["range"]["start"]["line"] + 1 for d in errors}
  assert {n for n in flagged if n not in expected} == set(), (
      "errors on correct calls:\n" + _show(errors))
  assert {lines[n - 1] for n in expected if n not in flagged} == set(), (
      "mistakes pyright did not flag; all errors:\n" + _show(errors))
  assert all(pathlib.Path(d["file"]).name == "user_code.py" for d in errors), _show(errors)


@pytest.mark.slow  # about 20-40 s; and the floors' older jax/optax annotations differ
def test_pyright_basic_passes_on_the_package():
  """`pyright` with the project's [tool.pyright] config (basic mode on sam_optax/): no error.

  Issue 14 made the whole package type-check (with the newest jax and optax, which the
  README's test command installs); a new error anywhere in sam_optax/ fails here.
  """
  errors = _pyright(cwd=ROOT)
  assert errors == [], f"{len(errors)} pyright errors in sam_optax/:\n" + _show(errors)


def test_all_lists_every_public_name():
  public = {name for name, value in vars(sam_optax).items()
            if not name.startswith("_") and (not isinstance(value, type(sam_optax))
                                             or name == "cadences")}
  assert sorted(public - set(sam_optax.__all__)) == []
  assert sorted(set(sam_optax.__all__) - public) == []
  assert len(sam_optax.__all__) == len(set(sam_optax.__all__))


def test_the_package_ships_its_types():
  """PEP 561's marker, which pyproject.toml's package-data puts in the wheel and sdist."""
  assert (ROOT / "sam_optax" / "py.typed").is_file()


def test_public_modules_import_by_their_public_path():
  """`import sam_optax.cadences` works, as does every module the package exports: a module
  exported only as an attribute (`from sam_optax._src import cadences`) would not import."""
  modules = {name: value for name, value in vars(sam_optax).items()
             if name in sam_optax.__all__ and isinstance(value, type(sam_optax))}
  assert modules, "no public module found: the check would pass vacuously"
  for name, module in modules.items():
    assert importlib.import_module(f"sam_optax.{name}") is module
    assert module.__name__ == f"sam_optax.{name}"
