"""Sparse SAM: the perturbation restricted to a binary mask over all entries of the params.

The mask lives in the ascent's state and is recomputed every `update_every` steps, inside a
`lax.cond` (so the scores, a Fisher diagonal among them, cost nothing on the other steps): one
global ranking over every entry of every leaf, which keeps exactly `live = floor(N (1 - s))`
entries. The engine's own `mask=` is a different thing: it selects whole leaves, and its norms
are over the selected leaves only; here the norm is that of the whole, unmasked gradient.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Literal, NamedTuple, Unpack, cast

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import control
from sam_optax._src import masks
from sam_optax._src import tree
from sam_optax._src.ascents import _ascent
from sam_optax._src.ascents import _check_seed
from sam_optax._src.ascents import _increment
from sam_optax._src.ascents import _step
from sam_optax._src.hyperparams import ScalarOrSchedule
from sam_optax._src.hyperparams import check_hparam
from sam_optax._src.hyperparams import check_positive_int
from sam_optax._src.hyperparams import value_at
from sam_optax._src.selection import example_count
from sam_optax._src.transformation import SharpnessAwareTransformation
from sam_optax._src.variants import Pieces
from sam_optax._src.variants import SharedOptions
from sam_optax._src.variants import build_variant
from sam_optax._src.variants import variant

STRATEGIES = ("fisher", "dynamic")
SCORES = ("gradient", "weight", "random")

Strategy = Literal["fisher", "dynamic"]
Score = Literal["gradient", "weight", "random"]


class SparseMaskState(NamedTuple):
  """State of Sparse SAM's ascent."""
  count: jax.Array  # int32 scalar: ascents taken so far (the first one of a Fisher mask
  # computes the mask whatever the step).
  key: jax.Array | None  # uint32[2]: raw PRNG key of the dynamic mask's random scores, split
  # once per mask update; None for Fisher masks.
  mask: Any  # tree like params of bools: the entries the perturbation may move.


def _flat(values: Any, dtype) -> jax.Array:
  """Every entry of every leaf, in leaf order, as one vector of `dtype`."""
  leaves = jax.tree.leaves(values)
  if not leaves:
    return jnp.zeros((0,), dtype)
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def _unflat(vector: jax.Array, like: Any) -> Any:
  """`vector` cut into the leaves of `like` (their shapes), in leaf order."""
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for leaf in leaves:
    size = math.prod(jnp.shape(leaf))
    out.append(vector[start:start + size].reshape(jnp.shape(leaf)))
    start += size
  return jax.tree.unflatten(treedef, out)


def _size(values: Any) -> int:
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(values))


def top_entries(scores: jax.Array, count: Any, eligible: jax.Array | None = None) -> jax.Array:
  """A bool vector, True on the `count` entries with the largest `scores` among `eligible`.

  Ties go to the lower index; a NaN score ranks last. `count` may be traced: the entries are
  ranked by one sort (eligible first, then by decreasing score, then by index) and the first
  `count` ranks are kept, so that exactly `min(count, #eligible)` entries are True whatever
  the ties, where a threshold on the scores would keep every tied entry.
  """
  n = scores.shape[0]
  index = jnp.arange(n, dtype=jnp.int32)
  # -0.0 and 0.0 compare equal in lax.sort; a NaN is mapped below every number.
  key = -jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  operands = (key, index) if eligible is None else ((~eligible).astype(jnp.int8), key, index)
  order = jax.lax.sort(operands, num_keys=len(operands))[-1]
  rank = jnp.zeros((n,), jnp.int32).at[order].set(index)
  return rank < count


def _live_count(sparsity: Any, n: int, count: jax.Array) -> Any:
  """`floor(N (1 - s))`: a Python int for a number, a traced int32 for a schedule or an
  injected value (0 where that value is invalid: the radius is NaN there)."""
  if not callable(sparsity):
    return min(n, max(0, math.floor(n * (1.0 - float(sparsity)))))
  s = value_at(cast(ScalarOrSchedule, sparsity), count)
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  live = jnp.floor(n * (1 - s))
  return jnp.where(jnp.isfinite(live), jnp.clip(live, 0, n), 0).astype(jnp.int32)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got "
                     f"{value!r}.")


def sparse_ascent(rho: ScalarOrSchedule = 0.05, sparsity: ScalarOrSchedule = 0.5,
                  strategy: Strategy = "fisher", *, update_every: int,
                  drop_rate: ScalarOrSchedule = 0.5, drop_score: Score = "gradient",
                  growth_score: Score = "random", seed: int = 0
                  ) -> optax.GradientTransformationExtraArgs:
  r"""Sparse SAM's ascent: SAM's step on a binary mask `m` of the entries, scaled by the full norm.

  .. math::
    \epsilon = \rho\, \frac{m \odot g}{\|g\|}, \qquad
    \textstyle\sum_i m_i = \lfloor N (1 - s) \rfloor

  with `N` the number of entries of all leaves, `s` the sparsity, and `||g||` the norm of the
  unmasked gradient, so that `||eps|| <= rho`. The mask is chosen globally: one ranking over
  the concatenation of every leaf, not one per layer; ties go to the lower index (leaf order,
  then row-major within a leaf), a NaN score ranks last.

  * `strategy="fisher"` (SSAM-F): at every step `t` with `t % update_every == 0` (and at the
    ascent's first call), before the ascent, `m` = the `live` largest entries of
    `fisher_fn(params)`, a tree like the params handed to `update` as a keyword (e.g. from
    `sam_optax.fisher_diagonal`), evaluated inside a `lax.cond` on those steps only.
  * `strategy="dynamic"` (SSAM-D): `m_0` = the `live` largest of uniform random scores. At
    every later step with `t % update_every == 0`, before the ascent, with the drop rate
    `dr_t` (a float or a schedule),

    .. math::
      d = \min\big(live - \lfloor live\,(1 - dr_t) \rfloor,\; N - live\big)

    the `d` live entries with the smallest drop score die and the `d` dead entries (dead
    before this update) with the largest growth score come alive, so exactly `live` entries
    stay live. Scores: `"gradient"` `|g|`, `"weight"` `|w|`, `"random"` uniform draws. The
    key is split once per update, `key, sub = split(key)`, `k_drop, k_grow = split(sub)`, and
    a random score is `jax.random.uniform(k, (N,), float32)` over the concatenated entries
    (`m_0`'s scores: `uniform(sub, (N,))` after the first split of `PRNGKey(seed)`).

  `t` is the engine's step count (the keyword `count`), the argument of the schedules. If
  the sparsity changes at run time (a schedule, an injected value), the live count follows
  at the next mask update: `live - d` of the old live entries are kept and the rest grown.
  Scores are compared in float32, or float64 with float64 leaves.

  Args:
    rho: the radius, >= 0; a float or a schedule of the step count.
    sparsity: `s` in [0, 1], the fraction of entries left unperturbed (0: SAM, 1: none); a
      float or a schedule.
    strategy: `"fisher"` or `"dynamic"`.
    update_every: the mask's period in steps, a Python int >= 1.
    drop_rate: the dynamic mask's `dr_t` in [0, 1]; a float or a schedule of the step count.
    drop_score: the score that keeps live entries alive (dynamic): `"gradient"` (default),
      `"weight"` or `"random"`.
    growth_score: the score that brings dead entries to life (dynamic): `"random"` (default),
      `"gradient"` or `"weight"`.
    seed: the seed of the dynamic mask's random scores (a Python int).

  Returns:
    An ascent (`optax.GradientTransformationExtraArgs` mapping `g` to `eps`) whose state is a
    `SparseMaskState`; with `strategy="fisher"`, `update` needs the keyword `fisher_fn`.

  Example:
    >>> import jax.numpy as jnp
    >>> ascent = sparse_ascent(1.0, sparsity=0.5, update_every=10)
    >>> g = {'w': jnp.array([3.0, 0.0]), 'b': jnp.array([0.0, 4.0])}
    >>> fisher_fn = lambda p: {'w': jnp.array([1.0, 0.0]), 'b': jnp.array([0.0, 2.0])}
    >>> eps, state = ascent.update(g, ascent.init(g), g, fisher_fn=fisher_fn)
    >>> eps['w'], eps['b']  # ||g|| = 5; the two entries of largest Fisher value are live
    (Array([0.6, 0. ], dtype=float32), Array([0. , 0.8], dtype=float32))

  References:
    Mi et al., *Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation
    Approach*, NeurIPS 2022, https://arxiv.org/abs/2210.05177 (code:
    https://github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization)
  """
  rho = check_hparam("rho", rho, hint="rho is the radius of the perturbation ball.")
  sparsity = check_hparam("sparsity", sparsity, high=1.0,
                          hint="sparsity is the fraction of entries left unperturbed.")
  drop_rate = check_hparam("drop_rate", drop_rate, high=1.0,
                           hint="drop_rate is the fraction of live entries renewed per update.")
  _check_choice("strategy", strategy, STRATEGIES)
  update_every = check_positive_int("update_every", update_every)
  _check_choice("drop_score", drop_score, SCORES)
  _check_choice("growth_score", growth_score, SCORES)
  _check_seed(seed)
  dynamic = strategy == "dynamic"
  reads_params = (dynamic and "weight" in (drop_score, growth_score)) or not dynamic

  def init(params):
    n = _size(params)
    count = jnp.zeros([], jnp.int32)
    if not dynamic:
      # Replaced at the first ascent, whatever its step.
      return SparseMaskState(count, None, jax.tree.map(
          lambda w: jnp.zeros(jnp.shape(w), jnp.bool_), params))
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    scores = jax.random.uniform(sub, (n,), jnp.float32)
    live = _live_count(sparsity, n, count)
    return SparseMaskState(count, key, _unflat(top_entries(scores, live), params))

  def scores_of(kind, key, grads, params, n):
    if kind == "random":
      return jax.random.uniform(key, (n,), jnp.float32)
    values = grads if kind == "gradient" else params
    return jnp.abs(_flat(values, tree.accumulation_dtype(values)))

  def fisher_mask(state, params, fisher_fn, step, n):
    fisher = fisher_fn(params)
    tree.check_same_structure(params, fisher, what="fisher_fn(params)")
    scores = _flat(fisher, tree.accumulation_dtype(fisher))
    return _unflat(top_entries(scores, _live_count(sparsity, n, step)), params), state.key

  def dynamic_mask(state, grads, params, step, n):
    key, sub = jax.random.split(state.key)
    k_drop, k_grow = jax.random.split(sub)
    old = _flat(state.mask, jnp.bool_)
    old_live = jnp.sum(old, dtype=jnp.int32)
    live = jnp.asarray(_live_count(sparsity, n, step), jnp.int32)
    rate = value_at(drop_rate, step)
    rate = rate.astype(jnp.promote_types(rate.dtype, jnp.float32))
    target = jnp.floor(live.astype(rate.dtype) * (1 - rate))
    target = jnp.where(jnp.isfinite(target), target, 0).astype(jnp.int32)
    # Kept entries come from the old live ones and grown ones from the old dead ones, so the
    # kept count lies in [live - (N - old_live), min(old_live, live)]: with live == old_live,
    # kept = live - d for the d of the docstring.
    kept = jnp.clip(target, jnp.maximum(live - (n - old_live), 0),
                    jnp.minimum(old_live, live))
    keep = top_entries(scores_of(drop_score, k_drop, grads, params, n), kept, eligible=old)
    grow = top_entries(scores_of(growth_score, k_grow, grads, params, n), live - kept,
                       eligible=~old)
    return _unflat(keep | grow, state.mask), key

  def update(grads, state, params=None, *, count=None, fisher_fn=None, param_axis_name=None,
             **extra):
    del extra
    _check_update_inputs(dynamic, reads_params, params, fisher_fn, param_axis_name)
    step = _step(state.count, count)
    n = _size(grads)
    due = step % update_every == 0
    first = state.count == 0
    if dynamic:
      refresh = due & ~first
      new_mask = lambda s: dynamic_mask(s, grads, params, step, n)
    else:
      refresh = due | first
      new_mask = lambda s: fisher_mask(s, params, fisher_fn, step, n)
    mask, key = control.cond(refresh, new_mask, lambda s: (s.mask, s.key), state)
    radius = value_at(rho, step)
    # An invalid run-time sparsity or drop rate (NaN from value_at) would only reach the
    # mask's counts: it makes the radius NaN, so the step's updates carry it.
    checked = [value_at(sparsity, step)] + ([value_at(drop_rate, step)] if dynamic else [])
    valid = jnp.all(jnp.asarray([jnp.isfinite(v) for v in checked]))
    radius = jnp.where(valid, radius, jnp.nan)
    factor = radius * tree.safe_inverse(tree.norm(grads))
    eps = tree.scale(factor, masks.apply(mask, grads))
    return eps, SparseMaskState(_increment(state.count), key, mask)

  return _ascent(init, update)


def _check_update_inputs(dynamic: bool, reads_params: bool, params: Any, fisher_fn: Any,
                         param_axis_name: Any) -> None:
  """The update keywords a mask strategy needs, checked at the first trace."""
  if param_axis_name is not None:
    raise ValueError(
        "sparse_ascent ranks every entry of the params at once, which params sharded over "
        "param_axis_name (inside shard_map) do not hold on one device: run the step under "
        "jax.jit with sharded arrays instead (XLA then ranks the global entries).")
  if not dynamic and fisher_fn is None:
    raise ValueError(
        "Sparse SAM with strategy='fisher' ranks the entries by a Fisher diagonal: pass "
        "fisher_fn= (params -> a tree like params) to update, e.g. fisher_fn=lambda p: "
        "sam_optax.fisher_diagonal(per_example_loss, p, samples).")
  if dynamic and fisher_fn is not None:
    raise ValueError("fisher_fn= is read by strategy='fisher' only; this mask is dynamic "
                     "(drop and growth scores). Drop fisher_fn, or use strategy='fisher'.")
  if reads_params and params is None:
    raise ValueError("sparse_ascent needs the params (a Fisher mask's fisher_fn(params), or "
                     "the |w| score): call update(g, state, params, ...).")


def fisher_diagonal(per_example_loss: Callable[[Any, Any], jax.Array], params: Any,
                    samples: Any, *, batch_size: int | None = None) -> Any:
  r"""The empirical Fisher diagonal: squared per-example gradients, summed over the samples.

  .. math::
    F = \sum_{i=1}^{N_s} \big(\nabla_w \ell_i(w)\big)^2 \quad \text{(elementwise)}

  Each example's gradient is taken on a batch of that one example,
  `per_example_loss(params, example[None])[0]`, as the Sparse SAM authors' code does (a
  data loader with batch size 1), mapped over the examples with `jax.vmap`. Returned in float32,
  or float64 for float64 leaves. Pass it to Sparse SAM's update as
  `fisher_fn=lambda p: sam_optax.fisher_diagonal(per_example_loss, p, samples)`: it is then
  evaluated on the mask's update steps only.

  Args:
    per_example_loss: `(params, batch) -> losses`, one loss per example of the batch (the
      convention of `sam_optax.top_k_examples`).
    params: the params `w`.
    samples: a tree of arrays with a leading example axis of size `N_s` (the authors draw
      them at random from the training set: 16 on CIFAR, 128 on ImageNet in their runs).
    batch_size: None to map over all examples at once (memory: `N_s` gradients), or a Python
      int `b`: `b` examples at a time in a `lax.scan`, the squares summed as they come (memory:
      `b` gradients; `N_s` need not be a multiple of `b`).

  Returns:
    A tree like `params`: the summed squared per-example gradients.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> loss_i = lambda p, b: (b[0] @ p['w'] - b[1]) ** 2
    >>> samples = (jnp.eye(2), jnp.array([1.0, -1.0]))
    >>> sam_optax.fisher_diagonal(loss_i, {'w': jnp.zeros(2)}, samples)['w']
    Array([4., 4.], dtype=float32)

  References:
    Mi et al., *Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation
    Approach*, NeurIPS 2022, https://arxiv.org/abs/2210.05177 (code:
    https://github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization, `SSAMF.update_mask`)
  """
  n = example_count(samples, "samples")
  if batch_size is not None and (isinstance(batch_size, bool)
                                 or not isinstance(batch_size, numbers.Integral)
                                 or batch_size < 1):
    raise ValueError(f"batch_size must be None or a Python int >= 1 (examples whose gradients "
                     f"are held at once), got {batch_size!r}.")

  def example_loss(p, example):
    losses = per_example_loss(p, jax.tree.map(lambda x: x[None], example))
    if jnp.shape(losses) != (1,):
      raise ValueError(f"per_example_loss must return one loss per example: on a batch of one "
                       f"it returned shape {jnp.shape(losses)}, not (1,).")
    return losses[0]

  acc = lambda w: jnp.promote_types(jnp.result_type(w), jnp.float32)

  def squares_summed(batch):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)
    return jax.tree.map(lambda g, w: jnp.sum(jnp.square(g.astype(acc(w))), axis=0), grads,
                        params)

  if batch_size is None or batch_size >= n:
    return squares_summed(samples)
  full = n // batch_size * batch_size
  blocks = jax.tree.map(lambda x: x[:full].reshape((-1, batch_size) + x.shape[1:]), samples)
  zero = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), acc(w)), params)
  total, _ = jax.lax.scan(lambda t, b: (_tree_add(t, squares_summed(b)), None), zero, blocks)
  if full < n:
    total = _tree_add(total, squares_summed(jax.tree.map(lambda x: x[full:], samples)))
  return total


def _tree_add(a: Any, b: Any) -> Any:
  return jax.tree.map(jnp.add, a, b)


@variant
def sparse_sam(inner: optax.GradientTransformation, rho: ScalarOrSchedule = 0.05,
               sparsity: ScalarOrSchedule = 0.5, strategy: Strategy = "fisher", *,
               update_every: int, drop_rate: ScalarOrSchedule = 0.5,
               drop_score: Score = "gradient", growth_score: Score = "random", seed: int = 0,
               **options: Unpack[SharedOptions]) -> SharpnessAwareTransformation:
  r"""Sparse SAM (SSAM-F, SSAM-D): SAM's perturbation on a sparse binary mask of the entries.

  .. math::
    \epsilon = \rho\, \frac{m \odot g}{\|g\|}, \qquad d = \nabla L(w + \epsilon), \qquad
    w \leftarrow w + \mathrm{Opt}(d)

  with `m` a binary mask over all entries of all leaves with exactly
  `live = floor(N (1 - sparsity))` ones, chosen by one global ranking (not per layer), and
  `||g||` the norm of the unmasked gradient (`||eps|| <= rho`). `sparsity=0` is `sam` (the
  same perturbation, bit for bit) and `sparsity=1` the inner optimizer (the descent gradient
  is the clean `g` itself). The mask is recomputed every `update_every` steps, before that
  step's ascent, inside a `lax.cond`:

  * `strategy="fisher"` (SSAM-F): `m` = the `live` largest entries of the Fisher diagonal,
    which the caller computes with `fisher_fn=` (params -> a tree like params), an update
    keyword evaluated on the mask's update steps only (t = 0 included, and the first step of
    a `window`; in the two-call form, pass it to the ascent call), e.g.
    `fisher_fn=lambda p: sam_optax.fisher_diagonal(per_example_loss, p, samples)`, which
    sums the squared per-example gradients of `N_s` examples.
  * `strategy="dynamic"` (SSAM-D): a random initial mask; at each later update step the
    `d = min(live - floor(live (1 - dr_t)), N - live)` live entries of smallest drop score
    (`|g|` by default; `|w|`, random) die and as many dead ones of largest growth score
    (random by default; `|g|`, `|w|`) come alive.

  See `sam_optax.sparse_ascent` for the ranking, tie and key rules. Two gradient evaluations
  per step, plus the Fisher on its update steps; state: the mask (one bool per entry) and, for
  the dynamic mask, a PRNG key. Dense JAX computes the whole perturbation: the sparsity saves
  no time (the paper reports FLOPs).

  Source: the authors' code (`Mi-Peng/Sparse-Sharpness-Aware-Minimization`, `solver/sam.py`,
  `SSAMF` and `SSAMD`; defaults in `configs/defaulf_cfg.py`). Deviations, all deliberate:
  periods in steps, not epochs (`update_every` is required: no epoch default transfers); the
  mask is updated before the step's ascent (the code's first Fisher step is unperturbed, its
  mask all zero until after that step, and its dynamic update follows the ascent); exactly
  `live` entries stay live (the code keeps `int(live (1 - dr))` but grows
  `int(min(live dr, N s))`, so its count drifts down and halves at `s = 0`; its initial dynamic
  mask keeps `N - ceil(N s)`); the code's death rate is a cosine over epochs,
  `dr (1 + cos(pi e / E)) / 2`, here any schedule of the step, e.g.
  `optax.cosine_decay_schedule(0.5, total_steps)`; the Fisher comes from the caller's
  `fisher_fn` (the code takes `N_s` random training examples one at a time, model in train
  mode); its `1e-7` in the norm is the library's guard (a zero gradient perturbs nothing).

  Data parallelism: the mask must be the same on every device. Gradient scores then read the
  averaged gradient: a dynamic mask with a `"gradient"` score needs `average_ascent=True`
  (refused with `False`); `fisher_fn` must return the same Fisher on every device (the same
  samples, or reduced with `jax.lax.pmean` inside it). `param_axis_name` is refused (the
  ranking needs every entry; sharded arrays under `jax.jit` work). Under m-sharpness
  (`chunk_size`) every chunk perturbs with the same mask, its own `g_J` and `||g_J||`
  (`fisher_fn` runs once per chunk with `chunk_strategy="sequential"`); a dynamic mask with a
  `"gradient"` score would rank each chunk's own gradient and keep the first chunk's mask, so
  it is refused there.

  Args:
    inner: the optimizer that takes the descent step.
    rho: the radius (the authors' runs: 0.1 on CIFAR); a float or a schedule of the step count.
    sparsity: the fraction of entries not perturbed, in [0, 1] (the authors' runs: 0.5; their
      code's default 0.2); a float or a schedule (the live count follows at mask updates).
    strategy: `"fisher"` (SSAM-F, needs `fisher_fn=` at update) or `"dynamic"` (SSAM-D).
    update_every: the mask's period in steps, a Python int >= 1 (required; the authors update
      every epoch or every 5 epochs: pass their number of steps).
    drop_rate: the dynamic mask's renewal fraction `dr_t` in [0, 1] (code default 0.5); a
      float or a schedule of the step count.
    drop_score: `"gradient"` (`|g|`, default), `"weight"` (`|w|`) or `"random"`.
    growth_score: `"random"` (default), `"gradient"` or `"weight"`.
    seed: the seed of the dynamic mask's random scores, a Python int (list it in
      `static_args` under `optax.inject_hyperparams`, with `update_every`).
    **options: the options every variant shares (`SharedOptions`): `renormalize`, `window`,
      `mask`, `two_call`, `chunk_size`, ...

  Returns:
    A `SharpnessAwareTransformation`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_i = lambda p, b: (b[0] @ p['w'] - b[1]) ** 2
    >>> loss = lambda p, b: loss_i(p, b).mean()
    >>> params = {'w': jnp.ones(3)}
    >>> batch = (jnp.eye(4, 3), jnp.arange(4.0))
    >>> tx = sam_optax.sparse_sam(optax.sgd(0.1), rho=0.05, sparsity=0.5, update_every=10)
    >>> fisher_fn = lambda p: sam_optax.fisher_diagonal(loss_i, p, batch)
    >>> updates, state = tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
    ...                            grad_fn=lambda p: jax.grad(loss)(p, batch),
    ...                            fisher_fn=fisher_fn)
    >>> int(sum(m.sum() for m in jax.tree.leaves(state.ascent_state.mask)))  # floor(3 / 2)
    1

  References:
    Mi et al., *Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation
    Approach*, NeurIPS 2022, https://arxiv.org/abs/2210.05177 (code:
    https://github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization)
  """
  ascent = sparse_ascent(rho, sparsity, strategy, update_every=update_every,
                         drop_rate=drop_rate, drop_score=drop_score, growth_score=growth_score,
                         seed=seed)
  reads_gradient = strategy == "dynamic" and "gradient" in (drop_score, growth_score)
  if options.get("param_axis_name") is not None:
    raise ValueError(
        "sparse_sam ranks every entry of the params at once, which params sharded over "
        "param_axis_name (inside shard_map) do not hold on one device: drop param_axis_name "
        "and run the step under jax.jit with sharded arrays (XLA then ranks the global "
        "entries).")
  if reads_gradient and options.get("chunk_size") is not None:
    raise ValueError(
        "A dynamic mask with a 'gradient' score ranks the clean gradient, which chunk_size "
        "splits into one per chunk: each chunk would draw its own mask. Use drop_score and "
        "growth_score from 'weight' and 'random', strategy='fisher', or drop chunk_size.")
  if reads_gradient and options.get("axis_name") is not None and options.get(
      "average_ascent") is False:
    raise ValueError(
        "A dynamic mask with a 'gradient' score must be the same on every device, but with "
        "average_ascent=False the ascent sees each device's own gradient: use "
        "average_ascent=True, or scores from 'weight' and 'random'.")
  leaf_mask = options.get("mask")
  if strategy == "fisher" and leaf_mask is not None and not isinstance(leaf_mask, masks.Mask):
    raise ValueError(
        "sparse_sam(strategy='fisher') cannot take a leaf mask (mask=): the ascent would see "
        "the selected leaves only, and fisher_fn(params) would be called on them. Leave the "
        "other leaves out of the ranking by returning a zero Fisher there instead.")
  pieces = Pieces(ascent=ascent)
  # The dead entries' radius is zero whatever rho: a mask may leave no entry live (sparsity=1),
  # and the zero perturbation must then hand the inner optimizer g bit for bit.
  hparams = dict(rho=rho, rho_of_dead_entries=0.0, sparsity=sparsity, drop_rate=drop_rate)
  return build_variant(inner, pieces, hparams, options, name="sparse_sam")
