"""Params masks for the engine's `mask=` option (SAM-ON: perturb the normalization layers only).

Two kinds of mask restrict the perturbation, and the norms the ascent takes, to some entries:

  * static, leaf-wise: a tree of bools (a prefix of the params) or a function of the params
    returning one (`normalization_mask`); the ascent sees the selected leaves only;
  * a `Mask` piece, element-wise and stateful: `init(params) -> state` and `update(grads,
    state, params, *, count, param_axis_name) -> (mask, state)`, where `mask` is a tree (a
    prefix of the params) of bools or bool arrays broadcastable to each leaf, recomputed at
    every step from the clean gradient (`reads_grads=True`: averaged over devices, so every
    replica masks alike), the step count and its own state. The ascent then receives `g`
    with the unselected entries set to zero (so its norms are over the selected entries), and
    `eps` is zero there; the state advances once per step (on the ascent call in the two-call
    form). Example: keep the top fraction of entries by a score recomputed every T steps.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

DEFAULT_NORM_NAMES = ("norm", "bn")


def normalization_mask(params: Any, names: Sequence[str] = DEFAULT_NORM_NAMES) -> Any:
  r"""SAM-ON's mask: True on the leaves of normalization layers, False elsewhere.

  A leaf is selected when some key on its path contains one of `names`, case-insensitively
  (Flax's `BatchNorm_0`, `LayerNorm_3`, `GroupNorm`, `RMSNorm`, Haiku's `batch_norm`, ...; `bn`
  matches `bn1`). Pass it (or `functools.partial(normalization_mask, names=...)`) as the
  `mask=` of any variant: the ascent and its norms then see the selected leaves only
  (`||g||` over the normalization parameters), and `eps` is zero on the others,

  .. math::
    \epsilon = \rho \frac{g_{\mathcal N}}{\|g_{\mathcal N}\|} \text{ on the normalization
    leaves } \mathcal N, \quad 0 \text{ elsewhere}.

  Args:
    params: the params tree (only its structure and key names are read).
    names: substrings that mark a normalization layer's key.

  Returns:
    A tree of bools with the structure of `params`.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2))},
    ...           'LayerNorm_0': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)}}
    >>> normalization_mask(params)
    {'Dense_0': {'kernel': False}, 'LayerNorm_0': {'bias': True, 'scale': True}}

  References:
    Mueller et al., *Normalization Layers Are All That Sharpness-Aware Minimization Needs*,
    NeurIPS 2023, https://arxiv.org/abs/2306.04226
  """
  if isinstance(names, str):
    names = (names,)
  lowered = tuple(n.lower() for n in names)
  if not lowered:
    raise ValueError("names must list at least one substring, e.g. ('norm', 'bn').")

  def selected(path, _):
    for entry in path:
      key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", "")))
      if any(n in str(key).lower() for n in lowered):
        return True
    return False

  return jax.tree_util.tree_map_with_path(selected, params)


class Mask(NamedTuple):
  """An element-wise, stateful mask piece (see the module docstring)."""
  init: Callable[[Any], Any]            # params -> state
  update: Callable[..., tuple[Any, Any]]  # (grads, state, params, *, count, param_axis_name)
  # -> (mask: a prefix tree of bools / bool arrays broadcastable to each leaf, state)
  reads_grads: bool = False  # whether `update` reads `grads` (else the engine passes None)


def apply(mask: Any, tree_: Any) -> Any:
  """`tree_` with the entries outside `mask` (a prefix tree of broadcastable bools) zeroed."""
  return jax.tree.map(
      lambda keep, sub: jax.tree.map(lambda x: jnp.where(keep, x, jnp.zeros_like(x)), sub),
      mask, tree_)
