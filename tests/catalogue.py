"""The variant catalogue: every entry here joins every shared test in test_catalogue.py.

An entry names a constructor, the hyperparameters the tests use, and a reference direction
written in plain jax.numpy (tests/references.py), so adding a variant means adding one entry.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import optax

import sam_optax
from tests import field_references as fref
from tests import references as ref


# GSAM's catalogue entry ties rho to this warmup-cosine schedule, evaluated at float64 counts
# (optax schedules run in the count's precision) so that float64 runs compare at 1e-12.
_WARMUP_COSINE = optax.warmup_cosine_decay_schedule(0.0, 0.1, 5, 20, end_value=0.01)
GSAM_LR = lambda count: _WARMUP_COSINE(jax.numpy.asarray(count, jax.numpy.float64))


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  make: Callable[..., Any]                  # make(inner, **hparams) -> transformation
  hparams: dict                             # hyperparameters used by the shared tests
  reference: Callable[[dict], Callable]     # hparams -> direction(grad, w, t) for ref.run
  rho_zero_is_inner: bool = True            # rho=0 reproduces the inner optimizer
  static_args: tuple = ()                   # structural args for optax.inject_hyperparams
  two_call: bool = True                     # has a two-call form (else it must refuse one)
  rho_names: tuple = ("rho",)               # hparams set to 0 in the rho=0 test (GSAM: two)
  exact_at_rho_zero: bool = True            # rho=0 hands the inner optimizer g bit for bit
                                            # (False: the ascent never reads g, so only to
                                            # rounding: the gradient is re-evaluated at w)
  unsupported_options: tuple = ()           # shared options it refuses at construction
                                            # (ValueError), e.g. renormalize for Lookbehind

  def __str__(self):
    return self.name


CATALOGUE = [
    Variant("sam", sam_optax.sam, {"rho": 0.05},
            lambda h: ref.sam_direction(lambda g, t: ref.sam_eps(g, h["rho"]))),
    Variant("usam", sam_optax.usam, {"rho": 0.1},
            lambda h: ref.sam_direction(lambda g, t: ref.usam_eps(g, h["rho"]))),
    Variant("unified_sam", sam_optax.unified_sam, {"rho": 0.08, "lam": 0.3},
            lambda h: ref.sam_direction(lambda g, t: ref.unified_eps(g, h["rho"], h["lam"]))),
    Variant("ssam", sam_optax.ssam, {"rho": 0.05},
            lambda h: ref.sam_direction(lambda g, t: ref.sam_eps(g, h["rho"]), renorm=True)),
    Variant("usam_renormalized", functools.partial(sam_optax.usam, renormalize=True),
            {"rho": 0.1},
            lambda h: ref.sam_direction(lambda g, t: ref.usam_eps(g, h["rho"]), renorm=True)),
    Variant("dnsam", sam_optax.dnsam, {"rho": 0.05, "decay": 0.9},
            lambda h: ref.sam_direction(ref.dnsam_eps_fn(h["rho"], h["decay"]))),
    Variant("usam2", sam_optax.usam2, {"rho": 0.1},
            lambda h: ref.usam2_direction(h["rho"]), two_call=False),
    Variant("husam", sam_optax.husam, {"rho": 0.1},
            lambda h: ref.husam_direction(h["rho"]), two_call=False),
    Variant("penalty_sam", sam_optax.penalty_sam, {"rho": 0.1},
            lambda h: ref.penalty_direction(h["rho"]), two_call=False),
    Variant("multistep_sam", functools.partial(sam_optax.multistep_sam, steps=3),
            {"rho": 0.05, "step_size": 0.03},
            lambda h: ref.multistep_direction(h["rho"], 3, step_size=h["step_size"]),
            static_args=("steps",), two_call=False),
    # The wider field (issue 5); references in tests/field_references.py.
    Variant("asam", sam_optax.asam, {"rho": 0.5, "eta": 0.01},
            lambda h: fref.asam_direction(h["rho"], h["eta"])),
    Variant("gsam", functools.partial(sam_optax.gsam, learning_rate=GSAM_LR, lr_max=0.1,
                                      lr_min=0.01),
            {"rho_max": 0.1, "rho_min": 0.02, "alpha": 0.3},
            lambda h: fref.gsam_direction(fref.gsam_rho(fref.warmup_cosine(0.0, 0.1, 5, 20, 0.01),
                                                        h["rho_max"], h["rho_min"], 0.1, 0.01),
                                          h["alpha"]),
            rho_names=("rho_max", "rho_min")),
    # rho large enough that g_v is not tiny next to g: the reuse step rescales it to ||g||,
    # which would amplify float32 rounding of the two gradients past the 1e-6 tolerance.
    Variant("looksam", sam_optax.looksam, {"rho": 0.3, "alpha": 0.7},  # k = 5: 4 periods
            lambda h: fref.looksam_direction(h["rho"], 5, h["alpha"]), static_args=("k",)),
    # Issue 15's cheap cadences. RST's seed 3 draws SAM steps at t = 0..3, a plain one at 4, and
    # a mix after (both kinds within the 5 steps of the shortest shared test); AE-SAM's
    # decay 0.5 and threshold -0.5 give both kinds within 5 steps on the MLP and the quadratic,
    # each decision at least 3e-3 (relative) away from a tie.
    Variant("rst", functools.partial(sam_optax.rst, seed=3), {"rho": 0.05, "probability": 0.5},
            lambda h: fref.rst_direction(h["rho"], h["probability"], seed=3),
            static_args=("seed",)),
    Variant("ae_sam", sam_optax.ae_sam, {"rho": 0.05, "decay": 0.5, "threshold": -0.5},
            lambda h: fref.ae_sam_direction(h["rho"], h["decay"], h["threshold"])),
    Variant("ae_looksam", sam_optax.ae_looksam,
            {"rho": 0.3, "decay": 0.5, "threshold": -0.5, "alpha": 0.7},
            lambda h: fref.ae_looksam_direction(h["rho"], h["decay"], h["threshold"],
                                                h["alpha"])),
    Variant("friendly_sam", sam_optax.friendly_sam, {"rho": 0.05, "sigma": 1.0, "lam": 0.6},
            lambda h: fref.friendly_direction(h["rho"], h["sigma"], h["lam"])),
    Variant("vasso", sam_optax.vasso, {"rho": 0.05, "theta": 0.4},
            lambda h: fref.vasso_direction(h["rho"], h["theta"])),
    Variant("momentum_sam", sam_optax.momentum_sam, {"rho": 0.1},
            lambda h: fref.momentum_sam_direction(h["rho"]), exact_at_rho_zero=False),
    # SAMPa in the code's form: y peeks at the inner heavy ball's momentum.
    # rho = lam = 0 is the inner optimizer (the gradient re-evaluated at w + 0).
    Variant("sampa", sam_optax.sampa, {"rho": 0.1, "lam": 0.2},
            lambda h: fref.sampa_direction(h["rho"], h["lam"]), two_call=False,
            rho_names=("rho", "lam"), exact_at_rho_zero=False),
    Variant("fisher_sam", sam_optax.fisher_sam, {"rho": 0.1, "eta": 1.0},
            lambda h: fref.fisher_direction(h["rho"], h["eta"])),
    Variant("random_sam", sam_optax.random_sam, {"rho": 0.05, "sigma": 0.01, "lam": 1.0},
            lambda h: fref.random_sam_direction(h["rho"], h["sigma"], h["lam"]),
            static_args=("seed",), two_call=False, rho_names=("rho", "sigma"),
            exact_at_rho_zero=False),
    Variant("esam", sam_optax.esam, {"rho": 0.05, "beta": 0.6},
            lambda h: fref.esam_direction(h["rho"], h["beta"]), static_args=("seed",)),
    Variant("wsam", sam_optax.wsam, {"rho": 0.05, "gamma": 0.9},
            lambda h: fref.wsam_direction(h["rho"], h["gamma"])),
    Variant("bsam", sam_optax.bsam,
            {"rho": 0.01, "num_data": 1000.0, "b1": 0.9, "b2": 0.999, "weight_decay": 1e-3,
             "damping": 0.1},
            lambda h: fref.bsam_direction(h["rho"], h["num_data"], h["b1"], h["b2"],
                                          h["weight_decay"], h["damping"]),
            static_args=("seed",), rho_zero_is_inner=False, two_call=False),
    # Issue 16. SAGM perturbs by -alpha g even at rho = 0: its zero-radius case zeroes both.
    Variant("gcsam", sam_optax.gcsam, {"rho": 0.05},
            lambda h: fref.gcsam_direction(h["rho"])),
    Variant("sagm", sam_optax.sagm, {"rho": 0.05, "alpha": 0.02},
            lambda h: fref.sagm_direction(h["rho"], h["alpha"]), rho_names=("rho", "alpha")),
    # big_vision's GSAM options, both away from the defaults (|w|-scaled perturbation, the
    # clean gradient plus the orthogonal part of the perturbed one).
    Variant("gsam_big_vision",
            functools.partial(sam_optax.gsam, learning_rate=GSAM_LR, lr_max=0.1, lr_min=0.01,
                              adaptive_perturbation=True, minimize_fp=False),
            {"rho_max": 0.5, "rho_min": 0.1, "alpha": 0.3},
            lambda h: fref.big_vision_gsam_direction(
                fref.gsam_rho(fref.warmup_cosine(0.0, 0.1, 5, 20, 0.01), h["rho_max"],
                              h["rho_min"], 0.1, 0.01), h["alpha"], True, False),
            rho_names=("rho_max", "rho_min")),
    # Accelerated GAM, four gradients, in the paper's form. Weights near CIFAR-100's ResNet
    # config, but beta away from 0.5, where swapping the weights of g0 and g2 in h- would go
    # unseen. rho = rho' = 0 gives d = g0 bit for bit.
    Variant("gam", sam_optax.gam,
            {"rho": 0.2, "rho_prime": 0.02, "alpha": 0.6, "beta": 0.3, "gamma": 0.05},
            lambda h: fref.gam_direction(h["rho"], h["rho_prime"], h["alpha"], h["beta"],
                                         h["gamma"]),
            two_call=False, rho_names=("rho", "rho_prime")),
    # Sparse SAM's dynamic mask (SSAM-D), renewed at steps 2 and 4 within the shortest shared
    # test's 5 steps: |g| decides which live entries die, random draws which dead ones grow.
    # SSAM-F needs fisher_fn= at update, which the shared tests do not pass: its tests are in
    # tests/test_sparse_sam.py.
    Variant("sparse_sam", functools.partial(sam_optax.sparse_sam, strategy="dynamic",
                                            update_every=2),
            {"rho": 0.05, "sparsity": 0.5, "drop_rate": 0.5},
            lambda h: fref.sparse_dynamic_direction(h["rho"], h["sparsity"], 2, h["drop_rate"]),
            static_args=("update_every", "seed")),
    # Lookbehind-SAM takes k inner steps per update: its references take them through the
    # heavy ball's `inner` (tests/references.py). rho = 0 is k inner steps on g, not the inner
    # optimizer's step; renormalization (one descent gradient's norm) has no meaning there.
    Variant("lookbehind_sam", functools.partial(sam_optax.lookbehind_sam, k=3),
            {"rho": 0.05, "alpha": 0.5},
            lambda h: fref.lookbehind_direction(h["rho"], 3, h["alpha"]),
            static_args=("k",), rho_zero_is_inner=False, two_call=False,
            unsupported_options=("renormalize",)),
    Variant("lookbehind_sam_adaptive", functools.partial(sam_optax.lookbehind_sam, alpha=None),
            {"rho": 0.05}, lambda h: fref.lookbehind_direction(h["rho"], 2, None),
            static_args=("k",), rho_zero_is_inner=False, two_call=False,
            unsupported_options=("renormalize",)),
]

BY_NAME = {v.name: v for v in CATALOGUE}

# The variants every catalogue-wide test keeps in the fast tier (`-m "not slow"`); tests/conftest.py
# moves the other variants' cases of such a test to the slow tier, unless the test is marked
# `whole_catalogue`. Together they reach every piece of the engine: a normalized ascent, a
# cadence with a stored buffer and a correction reading it (LookSAM), and a random draw with an
# ascent state (ESAM). SSAM's renormalization is one more correction: the slow tier has it.
FAST_TIER = ("sam", "looksam", "esam")
