"""sam_optax.flax: NNX and Linen train steps against hand-written SAM steps on the same models.

The hand-written references below use only Flax and jax.numpy (the functional split/merge of
NNX, closures over the BatchNorm statistics and the dropout key for Linen) and SAM's rule
`eps = rho g / ||g||`, `d = grad L(w + eps)`, heavy-ball SGD. Params are compared in float32
to rtol 1e-6 (the norm is summed in another order than the library's, so the last bit may
differ); BatchNorm statistics and RNG counters to the same tolerance or exactly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
# flax 0.12.7 renamed nnx.pure to nnx.as_pure (the declared floor is older).
as_pure = getattr(nnx, "as_pure", None) or nnx.pure

import sam_optax
import sam_optax.flax as sam_flax

RHO, LR, BETA = 0.1, 0.1, 0.9
TOL = dict(rtol=1e-6, atol=1e-7)


def assert_trees_close(a, b, **tol):
  a_leaves, b_leaves = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a_leaves) == len(b_leaves)
  for x, y in zip(a_leaves, b_leaves):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


def make_batch(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
          jnp.asarray(rng.normal(size=(n, 3)), jnp.float32))


def sam_sgd(**kw):
  return sam_optax.sam(optax.sgd(LR, momentum=BETA), rho=RHO, has_aux=True, **kw)


def hand_written_sam(params, g, grads_at, momentum):
  """One SAM step with heavy-ball SGD from the clean gradient g and the perturbed pass
  `grads_at`: returns (new params, new momentum, perturbed pass's output)."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, x: w + RHO * x / norm, params, g)
  g_adv, out = grads_at(perturbed)
  momentum = jax.tree.map(lambda m, x: BETA * m + x, momentum, g_adv)
  params = jax.tree.map(lambda w, m: w - LR * m, params, momentum)
  return params, momentum, out


# --------------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------------


class Net(nnx.Module):
  """Linear - BatchNorm - relu - Dropout - Linear."""

  def __init__(self, rngs):
    self.dense1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
    self.dropout = nnx.Dropout(0.4, rngs=rngs)
    self.dense2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.dense2(self.dropout(nnx.relu(self.bn(self.dense1(x)))))


def mse(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


def nnx_reference(steps, batch, *, keep_perturbed=False, fresh=False):
  """SAM by hand on Net with NNX's split/merge: per step the model state and both losses."""
  model = Net(nnx.Rngs(0, dropout=1))
  graphdef, params, rngs, stats = nnx.split(model, nnx.Param, nnx.RngState, nnx.BatchStat)
  params, rngs, stats = as_pure(params), as_pure(rngs), as_pure(stats)
  momentum = jax.tree.map(jnp.zeros_like, params)

  def loss_at(p, rngs, stats):
    copy = nnx.merge(graphdef, p, rngs, stats)
    loss = mse(copy, batch)
    _, new_rngs, new_stats = nnx.state(copy, nnx.Param, nnx.RngState, nnx.BatchStat)
    return loss, (as_pure(new_rngs), as_pure(new_stats))

  @jax.jit
  def step(params, rngs, stats, momentum):
    (loss, (rngs_clean, stats_clean)), g = jax.value_and_grad(loss_at, has_aux=True)(
        params, rngs, stats)
    start = rngs_clean if fresh else rngs  # the perturbed pass's RNG streams

    def grads_at(p):
      (value, new_state), g = jax.value_and_grad(loss_at, has_aux=True)(p, start, stats)
      return g, (value, new_state)

    params, momentum, (p_loss, (rngs_pert, stats_pert)) = hand_written_sam(
        params, g, grads_at, momentum)
    new_stats = stats_pert if keep_perturbed else stats_clean
    return params, rngs_pert, new_stats, momentum, loss, p_loss, stats_clean, stats_pert

  out = []
  for _ in range(steps):
    params, rngs, stats, momentum, loss, p_loss, clean, pert = step(params, rngs, stats,
                                                                   momentum)
    out.append(dict(params=params, rngs=rngs, stats=stats, loss=loss, perturbed_loss=p_loss,
                    clean_stats=clean, perturbed_stats=pert))
  return out


def nnx_ours(steps, batch, tx=None, **options):
  model = Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, sam_sgd() if tx is None else tx, wrt=nnx.Param)
  train_step = nnx.jit(lambda m, o, b: sam_flax.sam_step(m, o, mse, b, **options))
  out = []
  for _ in range(steps):
    metrics = train_step(model, optimizer, batch)
    _, params, rngs, stats = nnx.split(model, nnx.Param, nnx.RngState, nnx.BatchStat)
    out.append(dict(params=as_pure(params), rngs=as_pure(rngs),
                    stats=as_pure(stats), loss=metrics.loss,
                    perturbed_loss=metrics.perturbed_loss, step=optimizer.step[...]))
  return out


def rng_counts(rngs):
  return [int(x) for x in jax.tree.leaves(rngs) if x.dtype == jnp.uint32]


def test_nnx_step_equals_hand_written_sam_with_batchnorm_and_dropout():
  batch = make_batch()
  ours, ref = nnx_ours(3, batch), nnx_reference(3, batch)
  for o, r in zip(ours, ref):
    assert_trees_close(o["params"], r["params"])
    # BatchNorm statistics are the clean pass's; the RNG streams advanced by one pass.
    assert_trees_close(o["stats"], r["clean_stats"])
    assert_trees_close(o["rngs"], r["rngs"], rtol=0, atol=0)
    np.testing.assert_allclose(float(o["loss"]), float(r["loss"]), **TOL)
    np.testing.assert_allclose(float(o["perturbed_loss"]), float(r["perturbed_loss"]), **TOL)
    assert float(o["perturbed_loss"]) != float(o["loss"])
  assert rng_counts(ours[-1]["rngs"]) == [3]
  assert int(ours[-1]["step"]) == 3


def test_nnx_same_dropout_masks_by_default():
  """With BatchNorm and dropout, the perturbed pass at eps -> 0 reproduces the clean loss only
  if it drew the clean pass's dropout masks."""
  batch = make_batch()
  tiny = sam_optax.sam(optax.sgd(LR), rho=1e-6, has_aux=True)
  same = nnx_ours(1, batch, tx=tiny)[0]
  fresh = nnx_ours(1, batch, tx=tiny, fresh_rngs=True)[0]
  np.testing.assert_allclose(float(same["perturbed_loss"]), float(same["loss"]), rtol=1e-4)
  assert abs(float(fresh["perturbed_loss"]) - float(fresh["loss"])) > 1e-3


def test_nnx_fresh_rngs_and_keep_perturbed_state():
  batch = make_batch()
  ours = nnx_ours(2, batch, keep_perturbed_state=True, fresh_rngs=True)
  ref = nnx_reference(2, batch, keep_perturbed=True, fresh=True)
  for o, r in zip(ours, ref):
    assert_trees_close(o["params"], r["params"])
    assert_trees_close(o["stats"], r["perturbed_stats"])
    assert_trees_close(o["rngs"], r["rngs"], rtol=0, atol=0)
    np.testing.assert_allclose(float(o["perturbed_loss"]), float(r["perturbed_loss"]), **TOL)
  assert rng_counts(ours[-1]["rngs"]) == [4]  # two passes per step, each with its own keys


def test_nnx_keep_perturbed_state_only():
  batch = make_batch()
  ours = nnx_ours(1, batch, keep_perturbed_state=True)[0]
  ref = nnx_reference(1, batch, keep_perturbed=True)[0]
  assert_trees_close(ours["stats"], ref["perturbed_stats"])
  assert_trees_close(ours["params"], ref["params"])
  assert not np.allclose(jax.tree.leaves(ref["perturbed_stats"])[0],
                         jax.tree.leaves(ref["clean_stats"])[0])


def test_nnx_cadence_variant_skips_the_pass_and_keeps_clean_state():
  """LookSAM (perturbed pass every k steps): off steps report the clean loss and keep the
  clean pass's state even with keep_perturbed_state."""
  batch = make_batch()
  tx = sam_optax.looksam(optax.sgd(LR), rho=RHO, k=2, has_aux=True)
  ours = nnx_ours(3, batch, tx=tx, keep_perturbed_state=True)
  perturbed = [float(o["perturbed_loss"]) != float(o["loss"]) for o in ours]
  assert perturbed == [True, False, True]
  for o in ours:
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(o["params"]))


def test_nnx_minimal_path_through_optimizer_update():
  """The documented path without the helper: Optimizer.update forwards grad_fn to tx.update."""
  batch = make_batch()
  model = Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, sam_optax.sam(optax.sgd(LR, momentum=BETA), rho=RHO),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = as_pure(rest)  # a snapshot of the state before the clean pass
    grads = nnx.grad(mse)(model, batch)

    def grad_fn(p):
      return as_pure(nnx.grad(mse)(nnx.merge(graphdef, p, rest), batch))
    optimizer.update(model, grads, grad_fn=grad_fn)

  ref = nnx_reference(2, batch)
  for r in ref:
    step(model, optimizer, batch)
    assert_trees_close(as_pure(nnx.state(model, nnx.Param)), r["params"])


def test_nnx_plain_optimizer_takes_an_ordinary_step():
  batch = make_batch()
  model, twin = Net(nnx.Rngs(0, dropout=1)), Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
  twin_optimizer = nnx.Optimizer(twin, optax.sgd(LR), wrt=nnx.Param)
  metrics = nnx.jit(lambda m, o, b: sam_flax.sam_step(m, o, mse, b))(model, optimizer, batch)
  nnx.jit(lambda m, o, b: o.update(m, nnx.grad(mse)(m, b)))(twin, twin_optimizer, batch)
  assert_trees_close(as_pure(nnx.state(model)), as_pure(nnx.state(twin)))
  assert np.isnan(float(metrics.perturbed_loss))
  with pytest.raises(ValueError, match="has_aux=True"):
    nnx.jit(lambda m, o, b: sam_flax.sam_step(m, o, mse, b, keep_perturbed_state=True))(
        model, optimizer, batch)


def test_nnx_has_aux_loss():
  batch = make_batch()
  model = Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, sam_sgd(), wrt=nnx.Param)

  def loss_with_aux(model, batch):
    out = model(batch[0])
    return jnp.mean((out - batch[1]) ** 2), {"mean_output": jnp.mean(out)}

  metrics = nnx.jit(lambda m, o, b: sam_flax.sam_step(m, o, loss_with_aux, b, has_aux=True))(
      model, optimizer, batch)
  assert set(metrics.aux) == {"mean_output"}


@pytest.mark.parametrize("tx, match", [
    (sam_optax.sam(optax.sgd(0.1)), "has_aux=True"),
    (sam_optax.sam(optax.sgd(0.1), two_call=True, has_aux=True), "one-call"),
])
def test_nnx_errors(tx, match):
  model = Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  with pytest.raises(ValueError, match=match):
    nnx.jit(lambda m, o, b: sam_flax.sam_step(m, o, mse, b))(model, optimizer, make_batch())
  with pytest.raises(TypeError, match="nnx.Optimizer"):
    sam_flax.sam_step(model, tx, mse, make_batch())


def test_nnx_loss_returning_a_tuple_without_has_aux():
  model = Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, sam_sgd(), wrt=nnx.Param)
  with pytest.raises(ValueError, match="has_aux=True"):
    nnx.jit(lambda m, o, b: sam_flax.sam_step(m, o, lambda m, b: (mse(m, b), None), b))(
        model, optimizer, make_batch())


# --------------------------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------------------------


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
    x = nn.Dropout(0.4, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


def linen_setup(tx):
  model = LinenNet()
  batch = make_batch()
  variables = model.init(jax.random.key(0), batch[0], train=False)
  state = sam_flax.SAMTrainState.create(apply_fn=model.apply, params=variables["params"],
                                        batch_stats=variables["batch_stats"], tx=tx)
  return state, batch


def linen_loss(state, batch, key):
  """The Flax BatchNorm guide's loss closure: reads batch_stats and the key from the scope."""
  def loss_fn(params):
    out, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                  batch[0], train=True, mutable=["batch_stats"],
                                  rngs={"dropout": key})
    return jnp.mean((out - batch[1]) ** 2), updates
  return loss_fn


def linen_reference(steps, keys, perturbed_keys=None, keep_perturbed=False):
  state, batch = linen_setup(optax.identity())
  params, stats = state.params, state.batch_stats
  momentum = jax.tree.map(jnp.zeros_like, params)
  perturbed_keys = keys if perturbed_keys is None else perturbed_keys

  @jax.jit
  def step(params, stats, momentum, key, perturbed_key):
    def loss_at(p, k):
      out, updates = state.apply_fn({"params": p, "batch_stats": stats}, batch[0], train=True,
                                    mutable=["batch_stats"], rngs={"dropout": k})
      return jnp.mean((out - batch[1]) ** 2), updates["batch_stats"]
    (loss, clean_stats), g = jax.value_and_grad(loss_at, has_aux=True)(params, key)

    def grads_at(p):
      (value, new_stats), g = jax.value_and_grad(loss_at, has_aux=True)(p, perturbed_key)
      return g, (value, new_stats)

    params, momentum, (p_loss, pert_stats) = hand_written_sam(params, g, grads_at, momentum)
    return params, (pert_stats if keep_perturbed else clean_stats), momentum, loss, p_loss

  out = []
  for key, perturbed_key in zip(keys[:steps], perturbed_keys[:steps]):
    params, stats, momentum, loss, p_loss = step(params, stats, momentum, key, perturbed_key)
    out.append(dict(params=params, batch_stats=stats, loss=loss, perturbed_loss=p_loss))
  return out


KEYS = [jax.random.key(i) for i in range(10, 13)]
OTHER_KEYS = [jax.random.key(i) for i in range(20, 23)]


@pytest.mark.parametrize("keep, fresh", [(False, False), (True, True)])
def test_linen_step_equals_hand_written_sam(keep, fresh):
  state, batch = linen_setup(sam_sgd())

  @jax.jit
  def train_step(state, key, other_key):
    perturbed = linen_loss(state, batch, other_key) if fresh else None
    return state.sam_step(linen_loss(state, batch, key), mutable=True,
                          keep_perturbed_state=keep, perturbed_loss_fn=perturbed)

  ref = linen_reference(3, KEYS, OTHER_KEYS if fresh else None, keep_perturbed=keep)
  for key, other_key, r in zip(KEYS, OTHER_KEYS, ref):
    state, metrics = train_step(state, key, other_key)
    assert_trees_close(state.params, r["params"])
    assert_trees_close(state.batch_stats, r["batch_stats"])
    np.testing.assert_allclose(float(metrics.loss), float(r["loss"]), **TOL)
    np.testing.assert_allclose(float(metrics.perturbed_loss), float(r["perturbed_loss"]), **TOL)
  assert int(state.step) == 3


def test_linen_batch_stats_are_the_clean_pass_by_default():
  state, batch = linen_setup(sam_sgd())

  @jax.jit
  def run(state):
    loss_fn = linen_loss(state, batch, KEYS[0])
    return loss_fn(state.params)[1], sam_flax.linen_sam_step(state, loss_fn, mutable=True)[0]

  clean_updates, new_state = run(state)
  assert_trees_close(new_state.batch_stats, clean_updates["batch_stats"], rtol=0, atol=0)


def test_linen_apply_gradients_with_grad_fn_and_plain_train_state():
  """SAMTrainState.apply_gradients(grad_fn=...) and linen_sam_step on Flax's own TrainState
  take the same step."""
  model = nn.Dense(3)
  x, y = make_batch()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  tx = sam_optax.sam(optax.sgd(LR, momentum=BETA), rho=RHO)
  ours = sam_flax.SAMTrainState.create(apply_fn=model.apply, params=params, tx=tx)
  ours = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(loss)(s.params),
                                             grad_fn=jax.grad(loss)))(ours)
  plain = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=sam_sgd())
  plain, metrics = jax.jit(lambda s: sam_flax.linen_sam_step(s, loss))(plain)
  assert_trees_close(ours.params, plain.params)
  assert int(plain.step) == 1 and metrics.aux is None
  # Without grad_fn, apply_gradients is Flax's: plain optimizers work unchanged.
  sgd = sam_flax.SAMTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(LR))
  sgd = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(loss)(s.params)))(sgd)
  assert int(sgd.step) == 1


def test_linen_errors():
  state, batch = linen_setup(sam_sgd())
  loss_fn = linen_loss(state, batch, KEYS[0])
  with pytest.raises(ValueError, match="mutable=True"):
    # loss_fn returns (loss, updates), but mutable=True is missing.
    jax.jit(lambda s: sam_flax.linen_sam_step(s, loss_fn))(state)
  plain = train_state.TrainState.create(apply_fn=state.apply_fn, params=state.params,
                                        tx=sam_sgd())
  with pytest.raises(ValueError, match="SAMTrainState"):
    # Flax's TrainState has no batch_stats field to write the updates into.
    jax.jit(lambda s: sam_flax.linen_sam_step(s, loss_fn, mutable=True))(plain)


def test_flax_is_optional():
  """`import sam_optax` works without Flax; `sam_optax.flax` then says how to install it."""
  code = textwrap.dedent("""
      import sys
      sys.modules["flax"] = None  # what Python does for a package that is not installed
      import sam_optax
      assert "flax" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
      try:
        import sam_optax.flax
      except ImportError as error:
        assert "sam_optax[flax]" in str(error), error
      else:
        raise AssertionError("sam_optax.flax imported without flax")
  """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# A skipped step leaves every model variable untouched
# --------------------------------------------------------------------------------------------


def nan_batch():
  x, y = make_batch(seed=3)
  return x.at[0, 0].set(jnp.nan), y


@pytest.mark.parametrize("wrap", ["skip_if_nonfinite", "apply_if_finite"])
def test_nnx_skipped_step_leaves_every_model_variable_untouched(wrap):
  """A NaN batch under skip_if_nonfinite (or optax.apply_if_finite) changes no params, no
  BatchNorm statistics and no RNG counter: eval-mode outputs stay finite and equal; the next
  good batch then takes the step it would have taken without the bad one."""
  def make_tx():
    if wrap == "skip_if_nonfinite":
      return sam_optax.skip_if_nonfinite(sam_sgd(), 3)
    # optax's wrapper hides update_with_aux: the step takes the path of other transformations.
    return optax.apply_if_finite(sam_optax.sam(optax.sgd(LR, momentum=BETA), rho=RHO), 3)
  model = Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  reference = Net(nnx.Rngs(0, dropout=1))
  reference_optimizer = nnx.Optimizer(reference, make_tx(), wrt=nnx.Param)
  train_step = nnx.jit(lambda m, o, b: sam_flax.sam_step(m, o, mse, b))
  before = as_pure(nnx.state(model))

  train_step(model, optimizer, nan_batch())  # skipped
  after = as_pure(nnx.state(model))
  assert_trees_close(after, before, rtol=0, atol=0)
  model.eval()
  assert bool(jnp.all(jnp.isfinite(model(make_batch()[0]))))
  model.train()

  # The good batch then gives what it gives on a model that never saw the bad one.
  train_step(model, optimizer, make_batch())
  train_step(reference, reference_optimizer, make_batch())
  assert_trees_close(as_pure(nnx.state(model)), as_pure(nnx.state(reference)))


def test_nnx_applied_step_still_writes_the_statistics():
  """Control for the test above: a good batch under skip_if_nonfinite moves the statistics."""
  model = Net(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, sam_optax.skip_if_nonfinite(sam_sgd(), 3), wrt=nnx.Param)
  stats = as_pure(nnx.state(model, nnx.BatchStat))
  nnx.jit(lambda m, o, b: sam_flax.sam_step(m, o, mse, b))(model, optimizer, make_batch())
  moved = as_pure(nnx.state(model, nnx.BatchStat))
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(moved),
                                                   jax.tree.leaves(stats)))


def test_linen_skipped_step_keeps_the_batch_stats():
  state, _ = linen_setup(sam_optax.skip_if_nonfinite(sam_sgd(), 3))
  step = jax.jit(lambda s, b: sam_flax.linen_sam_step(s, linen_loss(s, b, KEYS[0]),
                                                      mutable=True)[0])
  skipped = step(state, nan_batch())
  assert_trees_close(skipped.batch_stats, state.batch_stats, rtol=0, atol=0)
  assert_trees_close(skipped.params, state.params, rtol=0, atol=0)
  applied = step(state, make_batch())
  assert not np.allclose(jax.tree.leaves(applied.batch_stats)[0],
                         jax.tree.leaves(state.batch_stats)[0])
