"""Sparse SAM (SSAM-F and SSAM-D): the Fisher mask, the dynamic mask's options, the exact live
count, the limits sparsity = 0 and 1, where the Fisher is evaluated, and what is refused.

The catalogue (tests/catalogue.py) runs the dynamic mask (drop by |g|, grow at random) through
every shared test against tests/field_references.py; the Fisher mask needs `fisher_fn=` at
update, which the shared tests do not pass, so its trajectories are checked here.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_optax
from tests import field_references as fref
from tests import problems
from tests import references

TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}
LR, MOMENTUM, STEPS = 0.1, 0.9, 7
INNER = optax.sgd(LR, momentum=MOMENTUM)


def per_example_loss(p, batch):
  """The MLP problem's loss, one value per example (its mean is `problems.mlp`'s loss)."""
  x, y = batch
  h = jnp.tanh(x @ p["layer0"]["w"] + p["layer0"]["b"])
  out = (h @ p["layer1"]["w"] + p["layer1"]["b"]) * p["scale"]
  return jnp.mean((out - y) ** 2, axis=1)


def samples_of(problem, k=6):
  return jax.tree.map(lambda x: x[:k], problem.batch)


def flat_fisher(problem, k=6):
  """The Fisher diagonal on the flat params, written out: a Python loop over the samples, each
  one's gradient on a batch of that one example, squared and summed."""
  _, unravel = ravel_pytree(problem.params)
  samples = samples_of(problem, k)

  def fisher(w):
    total = jnp.zeros_like(w)
    for i in range(k):
      one = jax.tree.map(lambda x, i=i: x[i:i + 1], samples)
      g = jax.grad(lambda v: per_example_loss(unravel(v), one)[0])(w)
      total = total + g * g
    return total
  return fisher


def scanned(tx, problem, steps=STEPS, **update_kwargs):
  """The params after each of `steps` steps, one jitted `lax.scan` (a step traced once)."""
  grad_fn = problem.grad_fn()

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn, **update_kwargs)
      p = optax.apply_updates(p, u)
      return (p, s), p
    (_, state), out = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return out, state

  out, state = run(problem.params)
  return [jax.tree.map(lambda x, t=t: x[t], out) for t in range(steps)], state


def live_count(state):
  return int(sum(int(jnp.sum(m)) for m in jax.tree.leaves(state.ascent_state.mask)))


# --------------------------------------------------------------------- trajectories (SSAM-F)


@pytest.mark.parametrize("dtype", [jnp.float64, pytest.param(jnp.float32, marks=pytest.mark.slow)],
                         ids=["f64", "f32"])
def test_fisher_mask_matches_reference(dtype):
  """Mask from the Fisher of 6 examples at t = 0, 3, 6 (before the ascent), inside lax.scan."""
  problem = problems.mlp(dtype)
  fisher_fn = lambda p: sam_optax.fisher_diagonal(per_example_loss, p, samples_of(problem))
  tx = sam_optax.sparse_sam(INNER, rho=0.1, sparsity=0.6, strategy="fisher", update_every=3)
  ours, state = scanned(tx, problem, fisher_fn=fisher_fn)
  expected = references.run(
      problem, fref.sparse_fisher_direction(0.1, 0.6, 3, flat_fisher(problem)), STEPS)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[dtype])
  assert live_count(state) == math.floor(68 * 0.4)


@pytest.mark.slow
def test_fisher_two_call_equals_one_call():
  problem = problems.mlp(jnp.float64)
  fisher_fn = lambda p: sam_optax.fisher_diagonal(per_example_loss, p, samples_of(problem))
  make = functools.partial(sam_optax.sparse_sam, INNER, 0.1, 0.6, "fisher", update_every=2)
  one, _, _ = problems.run(make(), problem, 5, fisher_fn=fisher_fn)
  tx = make(two_call=True)
  grad = jax.jit(jax.grad(problem.loss))
  update = jax.jit(functools.partial(tx.update, fisher_fn=fisher_fn))
  params, state = problem.params, tx.init(problem.params)
  for t in range(5):
    for _ in range(2):  # the ascent call, then the descent call
      updates, state = update(grad(params, problem.batch), state, params)
      params = optax.apply_updates(params, updates)
    problems.assert_trees_close(params, one[t], 1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["vectorized", "sequential"])
def test_fisher_mask_with_m_sharpness_matches_reference(strategy):
  """chunk_size=4 (4 chunks): every chunk perturbs with the one Fisher mask, its own g_J and
  ||g_J||; the descent gradients are averaged."""
  problem = problems.mlp(jnp.float64)
  fisher_fn = lambda p: sam_optax.fisher_diagonal(per_example_loss, p, samples_of(problem))
  tx = sam_optax.sparse_sam(INNER, 0.1, 0.6, "fisher", update_every=2, chunk_size=4,
                            chunk_strategy=strategy)
  grad_fn = lambda p, b: jax.grad(problem.loss)(p, b)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params, batch=problem.batch, grad_fn=grad_fn,
                               fisher_fn=fisher_fn)
    return optax.apply_updates(params, updates), state

  w, unravel = ravel_pytree(problem.params)
  chunk_grads = [jax.jit(lambda v, j=j: ravel_pytree(grad_fn(unravel(v), jax.tree.map(
      lambda x: x[4 * j:4 * j + 4], problem.batch)))[0]) for j in range(4)]
  fisher, v, mask = flat_fisher(problem), jnp.zeros_like(w), None
  params, state = problem.params, tx.init(problem.params)
  for t in range(5):
    params, state = step(params, state)
    if t % 2 == 0:
      mask = fref.sparse_top(fisher(w), math.floor(68 * 0.4))
    d = sum(grad(w + fref.sparse_eps(grad(w), mask, 0.1)) for grad in chunk_grads) / 4
    w, v = references.heavy_ball(w, v, d, LR, MOMENTUM)
    problems.assert_trees_close(params, unravel(w), 1e-12)


# ------------------------------------------------------------------- trajectories (SSAM-D)


DYNAMIC_CASES = [
    # |w| decides the deaths and |g| the births, the drop rate a cosine schedule of the step.
    ("weight", "gradient", "cosine", jnp.float64),
    ("random", "weight", 0.3, jnp.float64),
    pytest.param("weight", "gradient", "cosine", jnp.float32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("drop_score, growth_score, drop_rate, dtype", DYNAMIC_CASES,
                         ids=["weight-gradient-cosine-f64", "random-weight-f64",
                              "weight-gradient-cosine-f32"])
def test_dynamic_mask_options_match_reference(drop_score, growth_score, drop_rate, dtype):
  problem = problems.mlp(dtype)
  if drop_rate == "cosine":
    # optax's schedule in the library; its formula, in float64, in the reference.
    rate, reference_rate = (optax.cosine_decay_schedule(0.8, 10),
                            lambda t: 0.8 * 0.5 * (1 + math.cos(math.pi * min(t, 10) / 10)))
  else:
    rate = reference_rate = drop_rate
  tx = sam_optax.sparse_sam(INNER, rho=0.1, sparsity=0.3, strategy="dynamic", update_every=2,
                            drop_rate=rate, drop_score=drop_score, growth_score=growth_score,
                            seed=5)
  ours, state, _ = problems.run(tx, problem, STEPS)
  masks = []
  expected = references.run(problem, fref.sparse_dynamic_direction(
      0.1, 0.3, 2, reference_rate, drop_score, growth_score, seed=5, masks=masks), STEPS)
  for a, e in zip(ours, expected):
    problems.assert_trees_close(a, e, TOL[dtype])
  flat_mask = np.asarray(ravel_pytree(state.ascent_state.mask)[0])
  np.testing.assert_array_equal(flat_mask, masks[-1])
  assert all(m.sum() == math.floor(68 * 0.7) for m in masks)
  changes = [int(np.sum(a != b)) for a, b in zip(masks, masks[1:])]
  # Renewed at t = 2, 4, 6 only (2 d entries change each time), never in between.
  assert [c > 0 for c in changes] == [False, True, False, True, False, True], changes


def test_the_catalogue_mask_changes_at_its_updates_only():
  """The catalogue's reference is checked at 1e-6 / 1e-12: here, that its mask moves."""
  problem = problems.mlp(jnp.float64)
  masks = []
  references.run(problem, fref.sparse_dynamic_direction(0.05, 0.5, 2, 0.5, masks=masks), 5)
  changes = [int(np.sum(a != b)) for a, b in zip(masks, masks[1:])]
  # live = 34, d = 34 - floor(17) = 17: 17 deaths and 17 births per update.
  assert changes == [0, 34, 0, 34], changes


# ---------------------------------------------------------------- the mask and its counts


def odd_params(dtype=jnp.float32):
  """20 entries over three leaves of odd shapes."""
  return {"a": jnp.zeros((7,), dtype), "b": jnp.zeros((3, 4), dtype), "c": jnp.zeros((), dtype)}


SPARSITIES = [0.0, 0.3, 0.55, 0.7, 0.95, 1.0]


@pytest.mark.parametrize("strategy", ["fisher", "dynamic"])
def test_exactly_live_entries_for_any_sparsity_and_ties(strategy):
  """floor(N (1 - s)) entries, traced sparsities and Python floats alike, through three mask
  updates with tied scores (gradients and Fisher values from a few distinct levels)."""
  params = odd_params()
  n = 20
  levels = jnp.asarray([0.0, 1.0, 1.0, 2.0, 0.0])

  def grads_at(t):
    # Scores with many ties (five levels over 20 entries), different at every step.
    flat = levels[(jnp.arange(n) * (t + 1)) % 5]
    return jax.tree.unflatten(jax.tree.structure(params), [
        flat[:7], flat[7:19].reshape(3, 4), flat[19]])

  def counts(ascent):
    state, out = ascent.init(params), []
    for t in range(4):
      g = grads_at(t)
      extra = {"fisher_fn": lambda p, g=g: g} if strategy == "fisher" else {}
      _, state = ascent.update(g, state, params, count=jnp.asarray(t), **extra)
      out.append(sum(jnp.sum(m) for m in jax.tree.leaves(state.mask)))
    return jnp.stack(out)

  make = functools.partial(sam_optax.sparse_ascent, 0.1, strategy=strategy, update_every=1,
                           drop_rate=0.5)
  traced = jax.jit(lambda s: counts(make(sparsity=s)))
  for s in SPARSITIES:
    expected = math.floor(n * (1 - s))
    assert list(np.asarray(traced(jnp.asarray(s, jnp.float64)))) == [expected] * 4, s
  for s in (0.3, 0.7):  # Python floats: the live count computed on the host
    assert list(np.asarray(jax.jit(lambda: counts(make(sparsity=s)))())) == [
        math.floor(n * (1 - s))] * 4, s


def test_global_ranking_ties_and_the_unmasked_norm():
  """One ranking over all leaves (one leaf may take every live entry), ties to the lower index
  in leaf order, and eps = rho m g / ||g|| with the unmasked ||g||."""
  ascent = sam_optax.sparse_ascent(1.0, sparsity=0.75, update_every=5)
  params = {"a": jnp.zeros(4), "b": jnp.zeros(4)}
  g = {"a": jnp.asarray([1.0, -2.0, 2.0, 0.0]), "b": jnp.asarray([4.0, 0.0, 0.0, 0.0])}
  # Fisher values: leaf b holds the two largest; per-layer top-k would take one from each.
  fisher = {"a": jnp.asarray([1.0, 1.0, 1.0, 1.0]), "b": jnp.asarray([3.0, 3.0, 0.0, 0.0])}
  eps, state = ascent.update(g, ascent.init(params), params, fisher_fn=lambda p: fisher)
  np.testing.assert_array_equal(state.mask["a"], [False] * 4)
  np.testing.assert_array_equal(state.mask["b"], [True, True, False, False])
  norm = math.sqrt(1 + 4 + 4 + 16)
  np.testing.assert_allclose(eps["b"], [4.0 / norm, 0, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(eps["a"], [0.0] * 4)
  # All tied: the first live entries in leaf order ('a' before 'b').
  tied = jax.tree.map(jnp.ones_like, params)
  _, state = ascent.update(g, ascent.init(params), params, fisher_fn=lambda p: tied)
  np.testing.assert_array_equal(state.mask["a"], [True, True, False, False])
  np.testing.assert_array_equal(state.mask["b"], [False] * 4)
  # A NaN score ranks last; an infinite one first.
  odd = {"a": jnp.asarray([jnp.nan, 1.0, 0.0, 0.0]), "b": jnp.asarray([jnp.inf, 0.0, 0, 0])}
  _, state = ascent.update(g, ascent.init(params), params, fisher_fn=lambda p: odd)
  np.testing.assert_array_equal(state.mask["a"], [False, True, False, False])
  np.testing.assert_array_equal(state.mask["b"], [True, False, False, False])


@pytest.mark.parametrize("strategy", ["fisher", pytest.param("dynamic", marks=pytest.mark.slow)])
def test_sparsity_zero_is_sam_and_one_is_the_inner_optimizer(strategy):
  """float64: s = 0 gives sam's trajectory and s = 1 the inner optimizer's (to 1e-12: two
  programs may fuse, so round, differently); within one program s = 1 hands the inner
  optimizer g itself, bit for bit."""
  problem = problems.mlp(jnp.float64)
  extra = {"fisher_fn": lambda p: jax.tree.map(jnp.abs, p)} if strategy == "fisher" else {}
  make = functools.partial(sam_optax.sparse_sam, INNER, 0.05, strategy=strategy,
                           update_every=2)
  dense, _, _ = problems.run(make(sparsity=0.0), problem, 4, **extra)
  sam, _, _ = problems.run(sam_optax.sam(INNER, 0.05), problem, 4)
  for a, e in zip(dense, sam):
    problems.assert_trees_close(a, e, TOL[jnp.float64])
  none, _, _ = problems.run(make(sparsity=1.0), problem, 4, **extra)
  plain, _, _ = problems.run(sam_optax.sam(INNER, 0.0), problem, 4)
  for a, e in zip(none, plain):
    problems.assert_trees_close(a, e, TOL[jnp.float64])
  tx = sam_optax.sparse_sam(optax.identity(), 0.05, 1.0, strategy, update_every=2)

  @jax.jit
  def direction_and_grad(params):
    grads = jax.grad(problem.loss)(params, problem.batch)
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=problem.grad_fn(), **extra)
    return updates, grads

  updates, grads = direction_and_grad(problem.params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(g))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fisher", "dynamic"])
def test_sparsity_zero_is_sam_in_float32(strategy):
  """float32: sam's trajectory to its rounding (the two programs may fuse differently)."""
  problem = problems.mlp(jnp.float32)
  extra = {"fisher_fn": lambda p: jax.tree.map(jnp.abs, p)} if strategy == "fisher" else {}
  tx = sam_optax.sparse_sam(INNER, 0.05, 0.0, strategy, update_every=2)
  dense, _, _ = problems.run(tx, problem, 4, **extra)
  sam, _, _ = problems.run(sam_optax.sam(INNER, 0.05), problem, 4)
  for a, e in zip(dense, sam):
    problems.assert_trees_close(a, e, 1e-6)


# ------------------------------------------------------- where fisher_fn is evaluated


_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _computations(hlo: str) -> tuple[dict, str]:
  """The compiled HLO's computations by name (their text), and the entry's name."""
  bodies, entry, name = {}, None, None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(2)
      bodies[name] = []
      if header.group(1):
        entry = name
    elif name is not None:
      bodies[name].append(line)
  return {k: "\n".join(v) for k, v in bodies.items()}, entry


def op_outside_conditionals(hlo: str, op: str) -> tuple[bool, bool]:
  """Whether `op` runs in the entry computation (or what it calls, other than a conditional's
  branches), and whether it runs in some conditional's branch."""
  bodies, entry = _computations(hlo)

  def callees(name, branches):
    body = bodies.get(name, "")
    plain = {m.group(2) for m in _CALLEE.finditer(body)
             if m.group(1) not in ("true_computation", "false_computation")}
    cond = {m.group(2) for m in _CALLEE.finditer(body)
            if m.group(1) in ("true_computation", "false_computation")}
    for m in _BRANCHES.finditer(body):
      cond |= {c.strip().lstrip("%") for c in m.group(1).split(",")}
    return cond if branches else plain

  def reachable(starts):
    seen, todo = set(), list(starts)
    while todo:
      name = todo.pop()
      if name not in seen:
        seen.add(name)
        todo.extend(callees(name, False))
    return seen

  always = reachable([entry])
  branch_roots = set().union(*(callees(n, True) for n in bodies))
  in_branches = reachable(branch_roots)
  has_op = lambda names: any(f" {op}(" in bodies.get(n, "") for n in names)
  return has_op(always), has_op(in_branches)


def test_fisher_fn_is_evaluated_inside_the_mask_update_conditional_only():
  """The compiled step holds the Fisher's computation (marked by a cosine, an op the step has
  nowhere else) in a conditional's branch only: evaluated on the mask's update steps, skipped
  at run time on the others."""
  problem = problems.mlp(jnp.float32)
  fisher_fn = lambda p: jax.tree.map(lambda w: jnp.cos(w) ** 2 + w * w, p)
  tx = sam_optax.sparse_sam(INNER, 0.05, 0.5, "fisher", update_every=4)

  def step(params, state):
    grads = jax.grad(problem.loss)(params, problem.batch)
    updates, state = tx.update(grads, state, params, grad_fn=problem.grad_fn(),
                               fisher_fn=fisher_fn)
    return optax.apply_updates(params, updates), state

  hlo = jax.jit(step).lower(problem.params, tx.init(problem.params)).compile().as_text()
  assert op_outside_conditionals(hlo, "cosine") == (False, True)
  # The parser sees a cosine outside a conditional when there is one.
  control = jax.jit(lambda p: jnp.sum(jnp.cos(p["scale"]))).lower(problem.params)
  assert op_outside_conditionals(control.compile().as_text(), "cosine") == (True, False)


def test_fisher_fn_result_is_read_on_update_steps_only():
  """A Fisher that ranks by the step's params: the mask follows the params of steps 0 and 3
  (update_every=3) and stays between them, whatever the params in between."""
  params = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
  ascent = sam_optax.sparse_ascent(0.1, sparsity=0.5, update_every=3)
  step = jax.jit(lambda g, s, p, t: ascent.update(g, s, p, count=t, fisher_fn=lambda q: q))
  state, masks = ascent.init(params), []
  for t in range(6):
    # Entry t % 6 has the largest value at step t, the next one the second largest.
    flat = jnp.zeros(6).at[t % 6].set(2.0).at[(t + 1) % 6].set(1.0).at[(t + 2) % 6].set(0.5)
    p = {"a": flat[:3], "b": flat[3:]}
    _, state = step(p, state, p, jnp.asarray(t))
    masks.append(np.concatenate([state.mask["a"], state.mask["b"]]))
  top = lambda t: {t % 6, (t + 1) % 6, (t + 2) % 6}
  assert [set(np.flatnonzero(m)) for m in masks] == [top(0)] * 3 + [top(3)] * 3


# --------------------------------------------------------------- hyperparameters at run time


def test_inject_hyperparams_fisher_matches_plain():
  problem = problems.mlp(jnp.float64)
  fisher_fn = lambda p: sam_optax.fisher_diagonal(per_example_loss, p, samples_of(problem))
  hparams = dict(rho=0.1, sparsity=0.6)
  plain, _, _ = problems.run(sam_optax.sparse_sam(INNER, update_every=2, **hparams), problem, 5,
                             fisher_fn=fisher_fn)
  injected_tx = optax.inject_hyperparams(
      sam_optax.sparse_sam, static_args=("update_every", "seed"))(INNER, update_every=2, **hparams)
  injected, state, step = problems.run(injected_tx, problem, 5, fisher_fn=fisher_fn)
  problems.assert_trees_close(injected[-1], plain[-1], 1e-12)
  assert step._cache_size() == 1


def test_a_sparsity_changed_at_run_time_takes_effect_at_the_next_update():
  """Injected sparsity 0.5 -> 0.75 after step 2 (update_every=3): the mask keeps 34 entries
  until step 3, then floor(68 / 4) = 17; the dynamic mask keeps 17 at later updates."""
  problem = problems.mlp(jnp.float32)
  tx = optax.inject_hyperparams(sam_optax.sparse_sam, static_args=("update_every", "seed"))(
      INNER, rho=0.05, sparsity=0.5, strategy="dynamic", update_every=3)
  grad_fn = problem.grad_fn()

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params, state, counts = problem.params, tx.init(problem.params), []
  for t in range(7):
    if t == 2:
      state = state._replace(hyperparams=dict(state.hyperparams,
                                              sparsity=jnp.asarray(0.75, jnp.float32)))
    params, state = step(params, state)
    counts.append(int(sum(jnp.sum(m) for m in jax.tree.leaves(
        state.inner_state.ascent_state.mask))))
  assert counts == [34, 34, 34, 17, 17, 17, 17], counts


@pytest.mark.slow
def test_vmap_over_runs_matches_each_run():
  """Two runs from different starting params, vmapped: the same values as each run alone."""
  problem = problems.mlp(jnp.float32)
  fisher_fn = lambda p: jax.tree.map(jnp.abs, p)
  tx = sam_optax.sparse_sam(INNER, 0.1, 0.5, "fisher", update_every=2)
  grad_fn = problem.grad_fn()

  def run(params):
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn,
                                 fisher_fn=fisher_fn)
      params = optax.apply_updates(params, updates)
    return params

  starts = [problem.params, jax.tree.map(lambda w: 0.5 * w - 0.1, problem.params)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *starts)
  both = jax.jit(jax.vmap(run))(stacked)
  for i, start in enumerate(starts):
    problems.assert_trees_close(jax.tree.map(lambda x, i=i: x[i], both), jax.jit(run)(start),
                                1e-6)


# --------------------------------------------------------------------------- fisher_diagonal


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_fisher_diagonal_is_the_summed_squared_per_example_gradient(dtype):
  problem = problems.mlp(dtype)
  samples = samples_of(problem, 7)
  expected = flat_fisher(problem, 7)(ravel_pytree(problem.params)[0])
  for batch_size in (None, 3, 7, 10):  # 3: two blocks of 3 and a remainder of 1
    ours = jax.jit(functools.partial(sam_optax.fisher_diagonal, per_example_loss,
                                     batch_size=batch_size))(problem.params, samples)
    for leaf, w in zip(jax.tree.leaves(ours), jax.tree.leaves(problem.params)):
      assert leaf.dtype == dtype and leaf.shape == w.shape
    np.testing.assert_allclose(ravel_pytree(ours)[0], expected, rtol=10 * TOL[dtype],
                               atol=10 * TOL[dtype])


def test_fisher_diagonal_checks_its_inputs():
  params = {"w": jnp.ones(2)}
  loss_i = lambda p, b: (b @ p["w"]) ** 2
  with pytest.raises(ValueError, match="leading example axis"):
    sam_optax.fisher_diagonal(loss_i, params, {"x": jnp.ones(())})
  with pytest.raises(ValueError, match="share the leading"):
    sam_optax.fisher_diagonal(lambda p, b: b[0] @ p["w"], params, (jnp.ones((3, 2)),
                                                                   jnp.ones((2, 2))))
  with pytest.raises(ValueError, match="batch_size"):
    sam_optax.fisher_diagonal(loss_i, params, jnp.ones((3, 2)), batch_size=0)
  with pytest.raises(ValueError, match="one loss per example"):
    sam_optax.fisher_diagonal(lambda p, b: jnp.sum(b @ p["w"]), params, jnp.ones((3, 2)))


# ------------------------------------------------------------------------------ misuse


def test_construction_checks():
  make = functools.partial(sam_optax.sparse_sam, INNER, update_every=2)
  with pytest.raises(ValueError, match="strategy must be one of"):
    make(strategy="grasp")  # pyright: ignore[reportArgumentType]
  with pytest.raises(ValueError, match="drop_score must be one of"):
    make(strategy="dynamic", drop_score="magnitude")  # pyright: ignore[reportArgumentType]
  with pytest.raises(ValueError, match="growth_score must be one of"):
    make(strategy="dynamic", growth_score=None)  # pyright: ignore[reportArgumentType]
  with pytest.raises(ValueError, match="sparsity"):
    make(sparsity=1.5)
  with pytest.raises(ValueError, match="drop_rate"):
    make(drop_rate=-0.1)
  with pytest.raises(TypeError, match="update_every"):
    sam_optax.sparse_sam(INNER)  # pyright: ignore[reportCallIssue]
  with pytest.raises(ValueError, match="update_every must be >= 1"):
    sam_optax.sparse_sam(INNER, update_every=0)
  with pytest.raises(TypeError, match="static_args"):
    sam_optax.sparse_sam(INNER, update_every=2.0)  # pyright: ignore[reportArgumentType]
  with pytest.raises(TypeError, match="seed"):
    make(seed=jnp.asarray(1))  # pyright: ignore[reportArgumentType]
  with pytest.raises(ValueError, match="param_axis_name"):
    make(param_axis_name="model")
  with pytest.raises(ValueError, match="chunk_size"):
    make(strategy="dynamic", chunk_size=4)
  with pytest.raises(ValueError, match="average_ascent=True"):
    make(strategy="dynamic", axis_name="data", average_ascent=False)
  with pytest.raises(ValueError, match="leaf mask"):
    make(mask={"w": True})
  # Allowed: scores that every chunk and device computes alike.
  make(strategy="dynamic", drop_score="weight", chunk_size=4)
  make(strategy="dynamic", axis_name="data", average_ascent=True)


def test_update_checks():
  problem = problems.quadratic(jnp.float32)
  grads = jax.grad(problem.loss)(problem.params, None)
  fisher = sam_optax.sparse_sam(INNER, update_every=2)
  with pytest.raises(ValueError, match="pass fisher_fn="):
    jax.jit(lambda s: fisher.update(grads, s, problem.params, grad_fn=problem.grad_fn()))(
        fisher.init(problem.params))
  with pytest.raises(ValueError, match="fisher_fn\\(params\\) does not have the structure"):
    fisher.update(grads, fisher.init(problem.params), problem.params,
                  grad_fn=problem.grad_fn(), fisher_fn=lambda p: p["x"])
  dynamic = sam_optax.sparse_sam(INNER, strategy="dynamic", update_every=2)
  with pytest.raises(ValueError, match="read by strategy='fisher' only"):
    dynamic.update(grads, dynamic.init(problem.params), problem.params,
                   grad_fn=problem.grad_fn(), fisher_fn=lambda p: p)
