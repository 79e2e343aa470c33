"""sam_optax: Sharpness-Aware Minimization and its variants as optax GradientTransformations.

Wrap the optimizer you already have::

  tx = sam_optax.sam(optax.adamw(1e-3), rho=0.05)
  updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))

Layout: the variants (`sam`, `asam`, ...) are thin constructors over one engine,
`sharpness_aware`, which composes the pieces below (ascents, descent corrections, cadences,
masks). `sam_optax.diagnostics` measures sharpness; `sam_optax.flax` (needs Flax) runs train
steps for NNX and Linen.
"""

# The engine.
from sam_optax._src.engine import PendingDescent
from sam_optax._src.engine import SharpnessAwareState
from sam_optax._src.engine import SharpnessAwareTransformation
from sam_optax._src.engine import sharpness_aware
from sam_optax._src.transformation import UpdateWithAux
from sam_optax._src.variants import SharedOptions

# Variants.
from sam_optax._src.variants import ae_looksam
from sam_optax._src.variants import ae_sam
from sam_optax._src.variants import asam
from sam_optax._src.variants import bsam
from sam_optax._src.variants import dnsam
from sam_optax._src.variants import esam
from sam_optax._src.variants import fisher_sam
from sam_optax._src.variants import friendly_sam
from sam_optax._src.variants import gam
from sam_optax._src.variants import gcsam
from sam_optax._src.variants import gsam
from sam_optax._src.variants import husam
from sam_optax._src.lookbehind import lookbehind_sam
from sam_optax._src.variants import looksam
from sam_optax._src.variants import momentum_sam
from sam_optax._src.variants import multistep_sam
from sam_optax._src.variants import penalty_sam
from sam_optax._src.variants import random_sam
from sam_optax._src.variants import rst
from sam_optax._src.variants import sagm
from sam_optax._src.variants import sam
from sam_optax._src.variants import sampa
from sam_optax._src.variants import ssam
from sam_optax._src.variants import unified_sam
from sam_optax._src.variants import usam
from sam_optax._src.variants import usam2
from sam_optax._src.variants import vasso
from sam_optax._src.variants import wsam

# Ascents: optax transformations mapping the clean gradient to the perturbation.
from sam_optax._src.ascents import adaptive_ascent
from sam_optax._src.ascents import ascent_reads_grads
from sam_optax._src.ascents import AdaptiveWeights
from sam_optax._src.ascents import bayesian_ascent
from sam_optax._src.ascents import centralized_ascent
from sam_optax._src.ascents import deterministic_normalized_ascent
from sam_optax._src.ascents import fisher_ascent
from sam_optax._src.ascents import GradientFreeAscent
from sam_optax._src.ascents import friendly_ascent
from sam_optax._src.ascents import hessian_ascent
from sam_optax._src.ascents import lr_proportional_rho
from sam_optax._src.ascents import momentum_ascent
from sam_optax._src.ascents import multistep_ascent
from sam_optax._src.ascents import normalized_ascent
from sam_optax._src.ascents import Radius
from sam_optax._src.ascents import NormEstimateState
from sam_optax._src.ascents import random_smoothing_ascent
from sam_optax._src.ascents import sagm_ascent
from sam_optax._src.ascents import step_count_ascent
from sam_optax._src.ascents import stochastic_weight_ascent
from sam_optax._src.ascents import unified_ascent
from sam_optax._src.ascents import unnormalized_ascent
from sam_optax._src.ascents import variance_suppressed_ascent
from sam_optax._src.ascents import weight_scaled_ascent

# SAMPa's pieces, and the ascent's extra points the engine evaluates.
from sam_optax._src.evaluation import Perturbation
from sam_optax._src.sampa import SampaState
from sam_optax._src.sampa import sampa_ascent
from sam_optax._src.sampa import sampa_correction

# GAM's pieces: an ascent that hands its intermediate gradients to the correction (a carry).
from sam_optax._src.gam import GamCarry
from sam_optax._src.gam import gam_ascent
from sam_optax._src.gam import gam_correction
# Sparse SAM: its mask-keeping ascent, and the Fisher diagonal that ranks SSAM-F's entries.
from sam_optax._src.sparse import fisher_diagonal
from sam_optax._src.sparse import sparse_ascent
from sam_optax._src.sparse import sparse_sam
from sam_optax._src.sparse import SparseMaskState

# Reading the inner optimizer's state (e.g. Adam's second moment) from an ascent.
from sam_optax._src.inner_state import find_moment

# Descent corrections: optax transformations mapping the perturbed gradient to the direction.
from sam_optax._src.corrections import average_with_clean
from sam_optax._src.corrections import bayesian_descent
from sam_optax._src.corrections import decoupled_sharpness_step
from sam_optax._src.corrections import look_ahead_reuse
from sam_optax._src.corrections import renormalize
from sam_optax._src.corrections import surrogate_gap
from sam_optax._src.corrections import weighted_sharpness

# Cadences (which steps take the perturbed pass) and masks (which entries are perturbed).
from sam_optax import cadences
from sam_optax._src.masks import Mask
from sam_optax._src.masks import normalization_mask

# ESAM's and K-SAM's data selection, Functional-SAM's perturbed pass, skipping non-finite
# steps, and loss scaling.
from sam_optax._src.functional import functional_grad_fn
from sam_optax._src.nonfinite import skip_if_nonfinite
from sam_optax._src.nonfinite import SkipIfNonfiniteState
# Dynamic loss scaling (float16 training) through both passes, built on skip_if_nonfinite.
from sam_optax._src.loss_scaling import DynamicLossScaleState
from sam_optax._src.loss_scaling import dynamic_loss_scale
from sam_optax._src.loss_scaling import loss_scale
from sam_optax._src.selection import sharpness_sensitive_grad_fn
from sam_optax._src.selection import top_k_examples

# The one place the version is written: pyproject.toml reads it (setuptools `dynamic`).
__version__ = "0.2.0"

# The public API: what `from sam_optax import *` brings, and what type checkers treat as
# exported (tests/test_typing.py checks that it lists every public name).
__all__ = [
    "adaptive_ascent",
    "ascent_reads_grads",
    "AdaptiveWeights",
    "ae_looksam",
    "ae_sam",
    "asam",
    "average_with_clean",
    "bayesian_ascent",
    "bayesian_descent",
    "bsam",
    "cadences",
    "centralized_ascent",
    "decoupled_sharpness_step",
    "deterministic_normalized_ascent",
    "dnsam",
    "dynamic_loss_scale",
    "DynamicLossScaleState",
    "esam",
    "find_moment",
    "fisher_ascent",
    "fisher_diagonal",
    "GradientFreeAscent",
    "fisher_sam",
    "functional_grad_fn",
    "friendly_ascent",
    "friendly_sam",
    "gam",
    "gam_ascent",
    "gam_correction",
    "GamCarry",
    "gcsam",
    "gsam",
    "hessian_ascent",
    "husam",
    "look_ahead_reuse",
    "lookbehind_sam",
    "loss_scale",
    "looksam",
    "lr_proportional_rho",
    "momentum_ascent",
    "momentum_sam",
    "multistep_ascent",
    "multistep_sam",
    "Mask",
    "normalization_mask",
    "normalized_ascent",
    "NormEstimateState",
    "penalty_sam",
    "PendingDescent",
    "Perturbation",
    "Radius",
    "random_sam",
    "random_smoothing_ascent",
    "renormalize",
    "rst",
    "sagm",
    "sagm_ascent",
    "sam",
    "sampa",
    "sampa_ascent",
    "sampa_correction",
    "SampaState",
    "SharedOptions",
    "sharpness_aware",
    "sharpness_sensitive_grad_fn",
    "SharpnessAwareState",
    "SharpnessAwareTransformation",
    "skip_if_nonfinite",
    "SkipIfNonfiniteState",
    "sparse_ascent",
    "sparse_sam",
    "SparseMaskState",
    "ssam",
    "step_count_ascent",
    "stochastic_weight_ascent",
    "surrogate_gap",
    "top_k_examples",
    "unified_ascent",
    "unified_sam",
    "unnormalized_ascent",
    "UpdateWithAux",
    "usam",
    "usam2",
    "variance_suppressed_ascent",
    "vasso",
    "weight_scaled_ascent",
    "weighted_sharpness",
    "wsam",
]
