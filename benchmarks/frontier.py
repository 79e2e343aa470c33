#!/usr/bin/env python
"""The frontier of cost against accuracy: every variant of the catalogue on the main job.

The protocol is examples/train.py's, imported from it (noisy-label digits, 40% noise; a Flax
NNX MLP 64-256-10; inner optimizer SGD(0.05, momentum 0.9), batch 64; each variant's radius
swept inside one compiled run with `jax.vmap` over rho and seeds, and selected on the
validation split; cost measured on unvmapped runs at the selected radius), with 5 seeds by
default and every named constructor of the catalogue (tests/catalogue.py: 32 entries) plus
sparse SAM's Fisher mask, which needs `fisher_fn=` at update (given here: the empirical Fisher
diagonal of a quarter of the batch, one example at a time).

Radius grids: where the main job measured a variant's scale, its grid; else a log grid
(0.03 ... 3) on the radius's own scale, moved where a first full run selected an end of it.
A selection at an end of its grid is marked * in the table: there the grid, not the variant,
may limit the accuracy. Sparse SAM's sweeps take most of the run (SSAM-D's about 7 minutes):
under vmap its mask's `lax.cond` computes the mask update (or the Fisher) at every step.

Writes `<out-dir>/frontier.md` (the table, with the machine, the versions and the date of the
run), `frontier.png` (test accuracy against gradient evaluations and time per step) and
`frontier.json` (everything, per seed)::

  python benchmarks/frontier.py                     # all 33 and SGD, 5 seeds (24 min, 2 shared cores)
  python benchmarks/frontier.py --variants sgd,sam,looksam --seeds 3
  python benchmarks/frontier.py --smoke             # a few variants that take every path (CI)
"""

from __future__ import annotations

import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, os.pardir, "examples"))
import train  # noqa: E402  (examples/train.py: the protocol)

sys.path.pop(0)

import optax  # noqa: E402

import sam_optax  # noqa: E402

Method = train.Method
MAIN = train.METHODS
LOG_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
SAM_GRID = MAIN["sam"].grid
# Where the first full run selected the top of LOG_GRID or of SAM_GRID: the grid moved up.
HIGH_GRID = (0.3, 1.0, 3.0, 10.0)
SAM_HIGH_GRID = (0.5, 1.0, 1.5, 2.5)
DIGITS_TRAIN = 1150  # bsam's num_data: the training set's size


def train_lr(inner) -> float:
  """The main job's inner learning rate (its --lr default; bSAM rebuilds its inner SGD)."""
  del inner
  return LR


LR = 0.05


def _m(label, build, grid=LOG_GRID, note="", **kwargs) -> Method:
  return Method(label, build, tuple(grid), note, **kwargs)


S = sam_optax
VARIANTS: dict[str, Method] = {
    "sgd": MAIN["sgd"],
    "sam": MAIN["sam"],
    "usam": _m("USAM", lambda i, r: S.usam(i, r), HIGH_GRID),
    "unified_sam": _m("UnifiedSAM", lambda i, r: S.unified_sam(i, r, lam=0.5), note="lam=0.5"),
    "ssam": _m("SSAM", lambda i, r: S.ssam(i, r), SAM_GRID),
    "usam_renormalized": _m("USAM renorm.", lambda i, r: S.usam(i, r, renormalize=True), HIGH_GRID),
    "dnsam": _m("DNSAM", lambda i, r: S.dnsam(i, r), SAM_GRID),
    "usam2": _m("USAM2", lambda i, r: S.usam2(i, r)),
    "husam": _m("HUSAM", lambda i, r: S.husam(i, r), HIGH_GRID),
    "penalty_sam": _m("Penalty-SAM", lambda i, r: S.penalty_sam(i, r), HIGH_GRID),
    "multistep_sam": _m("Multistep-SAM", lambda i, r: S.multistep_sam(i, r, steps=2), SAM_GRID,
                        "2 ascent steps"),
    "asam": MAIN["asam"],
    "gsam": MAIN["gsam"],
    "looksam": MAIN["looksam"],
    "rst": MAIN["rst"],
    "ae_sam": MAIN["ae_sam"],
    "ae_looksam": _m("AE-LookSAM", lambda i, r: S.ae_looksam(i, r), (0.1, 0.3, 1.0, 3.0),
                     cheap=True),
    "friendly_sam": _m("F-SAM", lambda i, r: S.friendly_sam(i, r), SAM_GRID),
    "vasso": _m("VaSSO", lambda i, r: S.vasso(i, r), SAM_GRID),
    "momentum_sam": MAIN["momentum_sam"],
    "sampa": MAIN["sampa"],
    "fisher_sam": _m("Fisher-SAM", lambda i, r: S.fisher_sam(i, r)),
    "random_sam": _m("Random-SAM", lambda i, r: S.random_sam(i, r)),
    "esam": MAIN["esam"],
    # gamma = 0.9 weighs the sharpness term 9x (gamma / (1 - gamma)): SAM's grid diverges.
    "wsam": _m("WSAM", lambda i, r: S.wsam(i, r), (0.01, 0.03, 0.1, 0.25), "gamma=0.9"),
    # bSAM's descent needs plain SGD as its inner optimizer (no momentum): the protocol's
    # learning rate without the protocol's momentum.
    "bsam": _m("BSAM", lambda i, r: S.bsam(optax.sgd(train_lr(i)), r,
                                          num_data=float(DIGITS_TRAIN)),
               (0.03, 0.1, 0.3, 1.0), f"num_data={DIGITS_TRAIN}, inner SGD without "
                                              f"momentum"),
    "gcsam": _m("GCSAM", lambda i, r: S.gcsam(i, r), SAM_HIGH_GRID),
    "sagm": _m("SAGM", lambda i, r: S.sagm(i, r), SAM_HIGH_GRID),
    "gsam_big_vision": _m("GSAM (big_vision)", lambda i, r: S.gsam(
        i, r, r, adaptive_perturbation=True, minimize_fp=False), (2.5, 5.0, 10.0, 20.0),
                          "adaptive, minimize_fp=False"),
    "gam": _m("GAM", lambda i, r: S.gam(i, r, rho_prime=0.1 * r), note="rho'=rho/10"),
    "sparse_sam": _m("SSAM-D", lambda i, r: S.sparse_sam(i, r, 0.5, "dynamic", update_every=5),
                     SAM_GRID, "dynamic mask, s=0.5"),
    "sparse_sam_fisher": _m("SSAM-F", lambda i, r: S.sparse_sam(i, r, 0.5, "fisher",
                                                               update_every=5),
                            SAM_GRID, "Fisher mask, s=0.5", needs_fisher=True),
    "lookbehind_sam": _m("Lookbehind-SAM", lambda i, r: S.lookbehind_sam(i, r, k=3, alpha=0.5),
                         (0.05, 0.1, 0.25, 0.5), "k=3, alpha=0.5"),
    "lookbehind_sam_adaptive": _m("Lookbehind-SAM adapt.", lambda i, r: S.lookbehind_sam(
        i, r, k=2, alpha=None), SAM_GRID, "k=2, adaptive alpha"),
}
# Every path the protocol has: the inner optimizer, a plain and a cadenced variant, a
# Hessian-vector product (HUSAM), the Fisher mask's extra input, k inner steps (Lookbehind).
SMOKE_VARIANTS = "sgd,sam,husam,sparse_sam_fisher,lookbehind_sam"


def markdown(results, args, data, machine, total) -> str:
  lines = [
      "# The frontier of cost against accuracy (benchmarks/frontier.py)",
      "",
      f"Run {machine['date']} on {machine['platform']}, {machine['cpu_count']} CPUs "
      f"({machine['devices']}; load average at the end {machine['load_average']}); "
      f"jax {machine['jax']}, optax {machine['optax']}, flax {machine['flax']}, "
      f"sam_optax {machine['sam_optax']}. Total {total / 60:.1f} minutes.",
      "",
      f"{data.describe()}; {args.epochs} epochs; {args.seeds} seeds; "
      f"{100 * args.noise:g}% label noise (data seed {args.data_seed}).",
      "",
      train.format_table(results, markdown=True),
      "",
      train.table_notes(results, args, data),
  ]
  notes = [f"{r['label']}: {r['note']}" for r in results if r["note"]]
  if notes:
    lines += ["", "; ".join(notes) + "."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  args = train.parse_args(argv, VARIANTS, smoke_variants=SMOKE_VARIANTS, default_seeds=5,
                          default_out_dir=os.path.join("benchmarks", "results"),
                          description=__doc__.split("\n\n")[0])
  from tqdm.auto import tqdm as progress
  started = time.perf_counter()
  try:
    results, data = train.train_all(args, progress)
  except (train.DatasetUnavailable, ValueError) as error:
    sys.exit(f"error: {error}")
  total = time.perf_counter() - started
  machine = train.machine()
  print()
  print(train.format_table(results))
  print(train.table_notes(results, args, data))
  print(f"Total {total:.1f}s.")
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "frontier.md"), "w") as f:
    f.write(markdown(results, args, data, machine, total))
  settings = {k: v for k, v in vars(args).items() if k != "methods"}
  with open(os.path.join(args.out_dir, "frontier.json"), "w") as f:
    json.dump({"settings": settings, "data": data.describe(), "machine": machine,
               "results": results, "total_seconds": total}, f, indent=1)
  if not args.no_plot:
    train.plot_frontier(results, os.path.join(args.out_dir, "frontier.png"),
                        f"{data.name}, {100 * args.noise:g}% label noise: every variant, "
                        f"{args.seeds} seeds")
  print(f"Wrote frontier.md, frontier.json and frontier.png to {args.out_dir}.")
  return results


if __name__ == "__main__":
  main()
