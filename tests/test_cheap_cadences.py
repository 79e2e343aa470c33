"""RST, AE-SAM and AE-LookSAM (issue 15): their cadences, exactness at the edges, cost, devices.

The catalogue (tests/catalogue.py) already runs the three variants through every shared test
against plain-jnp references (tests/field_references.py). Here: the cadences on their own
(`cadences.bernoulli`, `cadences.adaptive`) against jax.random and the plain statistics;
`probability=1` is SAM and `probability=0` the inner optimizer, bit for bit, in both forms; off
steps evaluate no second gradient at run time (a counter in `grad_fn`); in the two-call form the
ascent call decides and the descent call follows; hostile hyperparameters and gradients; and,
on 8 virtual CPU devices, every replica deciding alike.

Each trajectory is one jitted `lax.scan` (a step is traced once).
"""

from __future__ import annotations

import os
import textwrap

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
from tests.test_distributed import run_script

cadences = sam_optax.cadences
F32, F64 = jnp.float32, jnp.float64
LR, MOMENTUM = 0.1, 0.9


def trajectory(tx, problem, steps, *, two_call=False, count_calls=False):
  """Params after each of `steps` steps of `tx` (one jitted scan), and grad_fn's call count."""
  calls = []
  grad = lambda p: jax.grad(problem.loss)(p, problem.batch)

  def grad_fn(p):
    if count_calls:
      jax.debug.callback(lambda: calls.append(1))
    return grad(p)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      if two_call:
        u, s = tx.update(grad(p), s, p)          # ascent call: params to w + eps
        p = optax.apply_updates(p, u)
        u, s = tx.update(grad_fn(p), s, p)       # descent call
      else:
        u, s = tx.update(grad(p), s, p, grad_fn=grad_fn)
      p = optax.apply_updates(p, u)
      return (p, s), p
    (_, state), params = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return params, state

  params, state = run(problem.params)
  jax.effects_barrier()
  return params, state, len(calls)


def assert_bitwise(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_reference(problem, direction, steps):
  """The last params of heavy-ball SGD along a plain-jnp `direction`."""
  return references.run(problem, direction, steps, lr=LR, momentum=MOMENTUM)[-1]


def flat_grads(problem):
  return lambda p: ravel_pytree(jax.grad(problem.loss)(p, problem.batch))[0]


# ------------------------------------------------------------------------ cadences.bernoulli


def test_bernoulli_is_the_counter_based_draw_and_exact_at_zero_and_one():
  counts = jnp.arange(1000)
  for p in (0.3, 0.5):
    ours = jax.vmap(cadences.bernoulli(p, seed=7))(counts)
    # p in float32: the uniform draw takes p's dtype (float64 for a Python float here, x64).
    theirs = jax.vmap(lambda t: jax.random.bernoulli(
        jax.random.fold_in(jax.random.key(7), t), jnp.float32(p)))(counts)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert abs(float(jnp.mean(ours)) - p) < 0.05
  assert bool(jnp.all(jax.vmap(cadences.bernoulli(1.0))(counts)))
  assert not bool(jnp.any(jax.vmap(cadences.bernoulli(0.0))(counts)))
  # A schedule of the step count; its ends exact too.
  ramp = cadences.bernoulli(lambda t: jnp.where(t < 500, 0.0, 1.0), seed=1)
  taken = np.asarray(jax.vmap(ramp)(counts))
  assert not taken[:500].any() and taken[500:].all()


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf")])
def test_bernoulli_and_rst_refuse_a_probability_outside_zero_one(value):
  with pytest.raises(ValueError, match="probability"):
    cadences.bernoulli(value)
  with pytest.raises(ValueError, match="probability"):
    sam_optax.rst(optax.sgd(0.1), probability=value)
  with pytest.raises(TypeError, match="seed"):
    sam_optax.rst(optax.sgd(0.1), seed=1.5)


# ------------------------------------------------------------------------- cadences.adaptive


def plain_policy(norms_sq, decay, threshold):
  """AE-SAM's decisions on a sequence of ||g||^2, in float64 from mu = s2 = 0."""
  mu = s2 = 0.0
  out = []
  for n in norms_sq:
    mu = decay * mu + (1 - decay) * n
    s2 = decay * s2 + (1 - decay) * (n - mu) ** 2
    out.append(n >= mu + threshold * np.sqrt(s2))
  return out


def run_policy(cadence, grads):
  """The cadence's decisions and states over a stack of gradients (one jitted scan)."""
  def body(state, g):
    take, state = cadence.update(g, state, None, count=jnp.asarray(0))
    return state, (take, state)
  _, (takes, states) = jax.jit(lambda gs: jax.lax.scan(body, cadence.init(None), gs))(grads)
  return np.asarray(takes), states


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-25], ids=["unit", "1e20", "1e-25"])
def test_adaptive_matches_the_plain_statistics_at_every_scale(scale):
  """float32 gradients whose ||g||^2 leaves float32's range (1e40, 1e-50) decide as the plain
  float64 statistics do, which are scale-invariant."""
  rng = np.random.default_rng(0)
  sizes = rng.lognormal(0.0, 0.5, size=40)
  directions = rng.normal(size=(40, 2, 3))
  g64 = directions / np.linalg.norm(directions.reshape(40, -1), axis=1)[:, None, None]
  g64 = g64 * sizes[:, None, None]
  grads = {"a": jnp.asarray(g64[:, 0] * scale, F32), "b": jnp.asarray(g64[:, 1] * scale, F32)}
  expected = plain_policy(sizes ** 2, 0.8, 0.3)
  assert 5 < sum(expected) < 35
  takes, states = run_policy(cadences.adaptive(0.8, 0.3), grads)
  np.testing.assert_array_equal(takes, expected)
  assert states.root_mean.dtype == F32 and bool(jnp.all(jnp.isfinite(states.root_mean)))


def test_adaptive_threshold_schedule_and_first_step():
  grads = {"w": jnp.ones((6, 3), F32)}  # a constant ||g||^2 = 3
  # mu_t rises to 3 from below: with c_0 = 4 > sqrt(0.9)/0.1 = 3.16 the first step is off,
  # and with c_t = -1 after it every later step is on.
  schedule = lambda t: jnp.where(t == 0, 4.0, -1.0)
  cadence = cadences.adaptive(0.9, schedule)

  def body(state, inputs):
    g, t = inputs
    take, state = cadence.update(g, state, None, count=t)
    return state, take
  _, takes = jax.lax.scan(body, cadence.init(None), (grads, jnp.arange(6)))
  np.testing.assert_array_equal(np.asarray(takes), [False] + [True] * 5)
  # c_0 just below sqrt(delta)/(1 - delta) takes the first step.
  take, _ = cadences.adaptive(0.9, 3.1).update({"w": jnp.ones(3)}, cadence.init(None), None,
                                               count=jnp.asarray(0))
  assert bool(take)


def test_adaptive_nonfinite_gradient_leaves_the_statistics_and_takes_the_step():
  cadence = cadences.adaptive(0.5, 0.0)
  good = jnp.asarray([[1.0, 2.0], [0.5, 0.5], [3.0, 0.0], [0.2, 0.1]], F32)
  bad = good.at[1, 0].set(jnp.nan).at[2, 1].set(jnp.inf)
  takes_good, states_good = run_policy(cadence, {"w": good[jnp.asarray([0, 3])]})
  takes_bad, states_bad = run_policy(cadence, {"w": bad})
  assert takes_bad[1] and takes_bad[2]  # non-finite: the perturbed pass (NaN reaches updates)
  # The statistics skip the two bad steps: the last state equals the good-only run's.
  for field in ("root_mean", "root_spread"):
    assert bool(jnp.all(jnp.isfinite(getattr(states_bad, field))))
    np.testing.assert_array_equal(np.asarray(getattr(states_bad, field))[-1],
                                  np.asarray(getattr(states_good, field))[-1])
  assert takes_bad[3] == takes_good[1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay=1.0), "decay"), (dict(decay=-0.1), "decay"),
    (dict(threshold=float("nan")), "threshold"), (dict(threshold=float("inf")), "threshold")])
def test_adaptive_refuses_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    cadences.adaptive(**kwargs)
  with pytest.raises(ValueError, match=match):
    sam_optax.ae_sam(optax.sgd(0.1), **kwargs)
  with pytest.raises(ValueError, match=match):
    sam_optax.ae_looksam(optax.sgd(0.1), **kwargs)


def test_adaptive_refuses_chunking():
  with pytest.raises(ValueError, match="reads the clean gradient"):
    sam_optax.ae_sam(optax.sgd(0.1), chunk_size=2)


# ------------------------------------------------------ RST at p = 1 and p = 0, bit for bit


def inner_trajectory(inner, problem, steps):
  """The inner optimizer alone on g, in the same scan as `trajectory`."""
  grad = lambda p: jax.grad(problem.loss)(p, problem.batch)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      u, s = inner.update(grad(p), s, p)
      p = optax.apply_updates(p, u)
      return (p, s), p
    return jax.lax.scan(body, (params, inner.init(params)), None, length=steps)[1]
  return run(problem.params)


# The fast tier keeps float64 one-call; the full suite adds the two-call form and float32.
@pytest.mark.parametrize("two_call", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["one_call", "two_call"])
@pytest.mark.parametrize("dtype", [F64, pytest.param(F32, marks=pytest.mark.slow)],
                         ids=["f64", "f32"])
def test_rst_at_probability_one_is_sam_and_at_zero_the_inner_optimizer(dtype, two_call):
  problem = problems.mlp(dtype)
  inner = optax.sgd(LR, momentum=MOMENTUM)
  steps = 6
  rst = lambda p: sam_optax.rst(inner, rho=0.05, probability=p, two_call=two_call)
  sam, _, _ = trajectory(sam_optax.sam(inner, rho=0.05, two_call=two_call), problem, steps,
                         two_call=two_call)
  rst1, _, _ = trajectory(rst(1.0), problem, steps, two_call=two_call)
  assert_bitwise(rst1, sam)
  rst0, _, _ = trajectory(rst(0.0), problem, steps, two_call=two_call)
  assert_bitwise(rst0, inner_trajectory(inner, problem, steps))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), rst1, rst0)
  assert any(jax.tree.leaves(moved))
  if not two_call:  # counted apart: a callback in grad_fn changes the program's rounding
    assert trajectory(rst(0.0), problem, steps, count_calls=True)[2] == 0


@pytest.mark.slow
def test_rst_off_steps_evaluate_no_second_gradient_and_match_the_reference():
  problem = problems.mlp(F64)
  steps, p, seed = 12, 0.4, 5
  tx = sam_optax.rst(optax.sgd(LR, momentum=MOMENTUM), rho=0.05, probability=p, seed=seed)
  params, _, calls = trajectory(tx, problem, steps, count_calls=True)
  drawn = [fref.rst_draw(seed, p)(t) for t in range(steps)]
  assert 0 < sum(drawn) < steps
  assert calls == sum(drawn)
  expected = run_reference(problem, fref.rst_direction(0.05, p, seed), steps)
  problems.assert_trees_close(jax.tree.map(lambda x: x[-1], params), expected, 1e-12)


@pytest.mark.slow
def test_rst_probability_schedule_follows_the_training_step():
  problem = problems.mlp(F64)
  schedule = optax.linear_schedule(0.0, 1.0, 8)
  tx = sam_optax.rst(optax.sgd(LR, momentum=MOMENTUM), rho=0.05, probability=schedule, seed=2)
  params, _, calls = trajectory(tx, problem, 10, count_calls=True)
  drawn = [fref.rst_draw(2, schedule)(t) for t in range(10)]
  assert calls == sum(drawn) and not drawn[0] and drawn[-1]
  expected = run_reference(problem, fref.rst_direction(0.05, schedule, 2), 10)
  problems.assert_trees_close(jax.tree.map(lambda x: x[-1], params), expected, 1e-12)


# -------------------------------------------------------------------- AE-SAM and AE-LookSAM


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ae_sam", "ae_looksam"])
def test_ae_off_steps_evaluate_no_second_gradient(name):
  problem = problems.quadratic(F64)
  steps, decay, threshold = 12, 0.5, -0.5
  taken = []
  if name == "ae_sam":
    tx = sam_optax.ae_sam(optax.sgd(LR, momentum=MOMENTUM), rho=0.05, decay=decay,
                          threshold=threshold)
    direction = fref.ae_sam_direction(0.05, decay, threshold, taken)
  else:
    tx = sam_optax.ae_looksam(optax.sgd(LR, momentum=MOMENTUM), rho=0.3, decay=decay,
                              threshold=threshold, alpha=0.7)
    direction = fref.ae_looksam_direction(0.3, decay, threshold, 0.7, taken)
  params, _, calls = trajectory(tx, problem, steps, count_calls=True)
  expected = run_reference(problem, direction, steps)
  assert 0 < sum(taken) < steps
  assert calls == sum(taken)
  problems.assert_trees_close(jax.tree.map(lambda x: x[-1], params), expected, 1e-12)


@pytest.mark.slow
def test_ae_sam_threshold_schedule_matches_the_reference():
  """The paper's form: c_t linear from 1 to -1 (decisions at least 1e-3 from a tie here)."""
  problem = problems.mlp(F64)
  schedule = optax.linear_schedule(1.0, -1.0, 12)
  tx = sam_optax.ae_sam(optax.sgd(LR, momentum=MOMENTUM), rho=0.05, threshold=schedule)
  params, _, calls = trajectory(tx, problem, 12, count_calls=True)
  taken = []
  expected = run_reference(problem, fref.ae_sam_direction(0.05, 0.9, schedule, taken), 12)
  assert 0 < sum(taken) < 12 and calls == sum(taken)
  problems.assert_trees_close(jax.tree.map(lambda x: x[-1], params), expected, 1e-12)


@pytest.mark.slow
def test_ae_sam_two_call_ascent_decides_and_descent_follows():
  """The ascent call decides (and advances the statistics); the descent call, whose gradient
  at w + eps would decide otherwise, follows the stored decision and leaves the statistics."""
  problem = problems.quadratic(F64)
  tx = sam_optax.ae_sam(optax.sgd(LR), rho=0.05, decay=0.5, threshold=-0.5, two_call=True)
  grad = jax.jit(lambda p: jax.grad(problem.loss)(p, None))
  update = jax.jit(tx.update)
  params, state = problem.params, tx.init(problem.params)
  decide = fref.ae_policy(0.5, -0.5)
  flat = flat_grads(problem)
  decisions = []
  for t in range(8):
    expected = decide(flat(params), t)
    decisions.append(expected)
    eps, state = update(grad(params), state, params)  # ascent call
    assert bool(state.pending.decision.perturbed) == expected
    stats = state.cadence_state.cadence
    moved = optax.apply_updates(params, eps)
    assert any(bool(jnp.any(e != 0)) for e in jax.tree.leaves(eps)) == expected
    # A descent gradient 1e3 times larger: a statistic taken here would change the decision.
    huge = jax.tree.map(lambda g: 1e3 * g, grad(moved))
    g_descent = huge if not expected else grad(moved)
    updates, state = update(g_descent, state, moved)  # descent call
    assert_bitwise(state.cadence_state.cadence, stats)
    params_next = optax.apply_updates(moved, updates)
    if not expected:  # the plain step on the stored clean g, not on what the call received
      plain = jax.tree.map(lambda w, g: w - LR * g, params, grad(params))
      problems.assert_trees_close(params_next, plain, 1e-12)
    params = params_next
  assert 0 < sum(decisions) < 8


@pytest.mark.parametrize("make, bad", [
    (lambda h: sam_optax.rst(optax.sgd(0.1), probability=h), lambda t: 1.5),
    (lambda h: sam_optax.ae_sam(optax.sgd(0.1), threshold=h), lambda t: jnp.nan),
    (lambda h: sam_optax.ae_looksam(optax.sgd(0.1), decay=h), lambda t: 1.0)],
    ids=["rst-probability", "ae_sam-threshold", "ae_looksam-decay"])
def test_invalid_run_time_hyperparameters_make_the_updates_nan(make, bad):
  params = {"w": jnp.asarray([1.0, -2.0], F32)}
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
  tx = make(bad)
  updates, _ = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))(
      params, tx.init(params))
  assert not bool(jnp.all(jnp.isfinite(updates["w"])))


# ------------------------------------------------------------------ 8 devices decide alike

DEVICE_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, sam_optax
    from tests import problems
    assert jax.device_count() == 8
    problem = problems.mlp(jnp.float32, n=32)
    x, y = problem.batch
    shards = (x.reshape(8, 4, -1), y.reshape(8, 4, -1))
    grad = lambda p, b: jax.grad(problem.loss)(p, b)
    inner = optax.sgd(0.1, momentum=0.9)
    steps = 6

    def replicated(tx):
      def step(carry, _):
        p, s = carry
        def one(b):
          return tx.update(grad(p, b), s, p, grad_fn=lambda q: grad(q, b))
        u, s = one(jax.tree.map(lambda a: a[jax.lax.axis_index("data")], shards))
        return (optax.apply_updates(p, u), s), s.cadence_state.cadence
      def run(_):
        (p, s), stats = jax.lax.scan(step, (problem.params, tx.init(problem.params)), None,
                                     length=steps)
        return p, stats
      return jax.pmap(run, axis_name="data")(jnp.arange(8))

    def single(tx):
      p, s = problem.params, tx.init(problem.params)
      for _ in range(steps):
        u, s = tx.update(grad(p, problem.batch), s, p, grad_fn=lambda q: grad(q, problem.batch))
        p = optax.apply_updates(p, u)
      return p

    for name, make in [("ae_sam", lambda **o: sam_optax.ae_sam(inner, rho=0.1, decay=0.5,
                                                               threshold=-0.5, **o)),
                       ("ae_looksam", lambda **o: sam_optax.ae_looksam(
                           inner, rho=0.1, decay=0.5, threshold=-0.5, **o)),
                       ("rst", lambda **o: sam_optax.rst(inner, rho=0.1, seed=3, **o))]:
      for average in (False, True):
        params, stats = replicated(make(axis_name="data", average_ascent=average))
        for leaf in jax.tree.leaves((params, stats)):  # every replica alike, bit for bit
          leaf = np.asarray(leaf)
          assert (leaf == leaf[:1]).all(), (name, average)
        if average:  # global SAM on 8 devices = one device on the full batch
          want = single(make())
          for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b), rtol=1e-5, atol=1e-5)
        print("PASS", name, "average_ascent", average)
""")


@pytest.mark.slow
@pytest.mark.multidevice
def test_every_replica_decides_alike_on_eight_devices(tmp_path):
  script = tmp_path / "cheap_cadences_devices.py"
  script.write_text(DEVICE_CHECK)
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if "device_count" not in f)
  code, out = run_script([str(script)], extra_xla_flags=flags)
  assert code == 0, out[-4000:]
  assert out.count("PASS") == 6, out[-4000:]
