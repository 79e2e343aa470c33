"""Ascents that read the inner optimizer's state (issue 14): `sam_optax.find_moment`.

The accessor is checked on states optax builds itself (moments computed here by hand from the
gradients fed in), through optax's wrappers; then an ascent written in this test preconditions
the perturbation by Adam's `nu`, against Adam and the ascent run by hand in plain `jax.numpy`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import problems

# Leaves named like moments: a dict key `nu` or `mu` of the params is not a state field.
PARAMS = {"nu": jnp.asarray([1.0, -2.0, 0.5], jnp.float32),
          "w": {"mu": jnp.asarray([[0.3, -0.1], [0.2, 0.4]], jnp.float32)}}
G1 = {"nu": jnp.asarray([0.5, -1.0, 2.0], jnp.float32),
      "w": {"mu": jnp.asarray([[1.0, 0.0], [-3.0, 0.25]], jnp.float32)}}
G2 = {"nu": jnp.asarray([-1.5, 0.5, 0.0], jnp.float32),
      "w": {"mu": jnp.asarray([[0.5, 2.0], [1.0, -1.0]], jnp.float32)}}


def after_two_updates(opt):
  state = opt.init(PARAMS)
  for g in (G1, G2):
    _, state = opt.update(g, state, PARAMS)
  return state


def ema(decay, square=False):
  """decay * (1 - decay) x1 + (1 - decay) x2 from zero, x = g or g^2: an optax moment after
  two updates."""
  f = (lambda x: x ** 2) if square else (lambda x: x)
  return jax.tree.map(lambda a, b: decay * (1 - decay) * f(a) + (1 - decay) * f(b), G1, G2)


MASK = {"nu": True, "w": {"mu": False}}

CASES = {  # name: (optimizer, field, expected moment)
    "adam_nu": (optax.adam(0.1, b2=0.9), "nu", ema(0.9, square=True)),
    "adam_mu": (optax.adam(0.1, b1=0.8), "mu", ema(0.8)),
    "adamw": (optax.adamw(0.1, b2=0.7, weight_decay=0.1), "nu", ema(0.7, square=True)),
    "nadam": (optax.nadam(0.1, b2=0.6), "nu", ema(0.6, square=True)),
    "amsgrad": (optax.amsgrad(0.1, b2=0.5), "nu", ema(0.5, square=True)),
    "lion": (optax.lion(0.1, b2=0.75), "mu", ema(0.75)),
    "rmsprop": (optax.rmsprop(0.1, decay=0.85), "nu", ema(0.85, square=True)),
    "sgd_momentum": (optax.sgd(0.1, momentum=0.5), "trace",
                     jax.tree.map(lambda a, b: b + 0.5 * a, G1, G2)),
    "chain": (optax.chain(optax.clip_by_global_norm(100.0), optax.scale_by_adam(b2=0.9),
                          optax.add_decayed_weights(0.1), optax.scale(-0.1)),
              "nu", ema(0.9, square=True)),
    "inject_hyperparams": (optax.inject_hyperparams(optax.adam)(learning_rate=0.1, b2=0.9),
                           "nu", ema(0.9, square=True)),
    "multi_steps": (optax.MultiSteps(optax.adam(0.1, b2=0.9), every_k_schedule=1),
                    "nu", ema(0.9, square=True)),
    "with_extra_args_support": (optax.with_extra_args_support(optax.adam(0.1, b2=0.9)), "nu",
                                ema(0.9, square=True)),
    "nested": (optax.chain(
        optax.MultiSteps(optax.chain(optax.clip(10.0), optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.1, b2=0.9)), every_k_schedule=1).gradient_transformation(),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)), "nu", ema(0.9, square=True)),
    "multi_transform": (  # an Adam-like optimizer per label: the two moments merge
        optax.multi_transform({"a": optax.adam(0.1, b2=0.9), "b": optax.rmsprop(0.1, decay=0.9)},
                              {"nu": "a", "w": {"mu": "b"}}),
        "nu", ema(0.9, square=True)),
}


def test_an_optimizer_that_skips_a_label_leaves_one_moment():
  """multi_transform with an unused label: its moment covers no leaf, the other all."""
  opt = optax.multi_transform({"a": optax.adam(0.1, b2=0.9), "b": optax.adam(0.1)},
                              {"nu": "a", "w": {"mu": "a"}})
  found = sam_optax.find_moment(after_two_updates(opt), "nu")
  for a, e in zip(jax.tree.leaves(found), jax.tree.leaves(ema(0.9, square=True))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", list(CASES))
def test_finds_the_moment(case):
  opt, field, expected = CASES[case]
  state = after_two_updates(opt)
  found = sam_optax.find_moment(state, field)
  assert jax.tree.structure(found) == jax.tree.structure(PARAMS)
  for a, e in zip(jax.tree.leaves(found), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7)
  # Under jit too, and with the params' structure checked.
  found = jax.jit(lambda s: sam_optax.find_moment(s, field, params=PARAMS))(state)
  assert jax.tree.structure(found) == jax.tree.structure(PARAMS)


def test_adabelief_nu_is_its_belief_state():
  state = after_two_updates(optax.adabelief(0.1))
  found = sam_optax.find_moment(state, "nu")
  # adabelief's nu is the EMA of (g - mu)^2 (plus eps_root): read it at its place in the chain.
  for a, e in zip(jax.tree.leaves(found), jax.tree.leaves(state[0].nu)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
  assert all(bool(jnp.all(x > 0)) for x in jax.tree.leaves(found))


def test_masked_moment_needs_a_fill_value():
  state = after_two_updates(optax.masked(optax.adam(0.1, b2=0.9), MASK))
  with pytest.raises(ValueError, match="covers only some leaves.*fill_value"):
    sam_optax.find_moment(state, "nu")
  found = sam_optax.find_moment(state, "nu", params=PARAMS, fill_value=1.0)
  np.testing.assert_allclose(np.asarray(found["nu"]),
                             np.asarray(ema(0.9, square=True)["nu"]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(found["w"]["mu"]), np.ones((2, 2), np.float32))


@pytest.mark.parametrize("opt, match", [
    (optax.sgd(0.1), r"found no field 'nu'.*EmptyState"),
    (optax.chain(optax.scale_by_adam(), optax.scale_by_rms()),
     r"found 2 fields 'nu'.*ScaleByAdamState.nu.*ScaleByRmsState.nu.*inner_state\[0\]"),
    (optax.chain(optax.masked(optax.scale_by_adam(), MASK), optax.scale_by_rms()),
     r"found 2 fields 'nu'.*do not split the params"),  # both cover params['nu']
])
def test_missing_or_ambiguous_moments_raise(opt, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.find_moment(opt.init(PARAMS), "nu")


def test_a_moment_of_other_params_raises():
  state = optax.adam(0.1).init({"a": jnp.zeros(2)})
  with pytest.raises(ValueError, match="not the one of an optimizer of these params"):
    sam_optax.find_moment(state, "nu", params=PARAMS)
  with pytest.raises(ValueError, match="fill_value fills"):
    sam_optax.find_moment(state, "nu", fill_value=1.0)


# ----------------------------------------------------------------------------- in the engine

LR, B1, B2, ADAM_EPS, RHO, E, STEPS = 0.05, 0.9, 0.99, 1e-8, 0.1, 1e-6, 4


def preconditioned_ascent(rho, e):
  r"""eps = rho u / ||u||, u = g / (sqrt(nu) + e), nu: the inner Adam's second moment."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, state, params=None, *, inner_state=None, **extra):
    del extra
    nu = sam_optax.find_moment(inner_state, "nu", params=params)
    u = jax.tree.map(lambda g, n: g / (jnp.sqrt(n) + e), grads, nu)
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(u)))
    return jax.tree.map(lambda x: rho * x / norm, u), state

  return optax.GradientTransformationExtraArgs(init, update)


def problem(dtype):
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), dtype),
            "v": jnp.asarray(rng.normal(size=(4,)), dtype)}
  x = jnp.asarray(rng.normal(size=(6, 3)), dtype)

  def loss(p):
    return jnp.mean(jnp.tanh(x @ p["w"]) ** 2) + jnp.sum(jnp.cos(p["v"]) * p["v"] ** 2)

  return params, loss


def reference(params, loss):
  """Adam on grad L(w + eps) by hand, eps from the second moment before the step."""
  grad = jax.jit(jax.grad(loss))
  w = params
  m, v = jax.tree.map(jnp.zeros_like, w), jax.tree.map(jnp.zeros_like, w)
  path = []
  for t in range(1, STEPS + 1):
    g = grad(w)
    u = jax.tree.map(lambda x, n: x / (jnp.sqrt(n) + E), g, v)
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(u)))
    d = grad(jax.tree.map(lambda p, x: p + RHO * x / norm, w, u))
    m = jax.tree.map(lambda a, x: B1 * a + (1 - B1) * x, m, d)
    v = jax.tree.map(lambda a, x: B2 * a + (1 - B2) * x ** 2, v, d)
    w = jax.tree.map(
        lambda p, a, b: p - LR * (a / (1 - B1 ** t)) / (jnp.sqrt(b / (1 - B2 ** t)) + ADAM_EPS),
        w, m, v)
    path.append(w)
  return path


INNERS = {
    "adam": lambda: optax.adam(LR, b1=B1, b2=B2, eps=ADAM_EPS),
    "wrapped": lambda: optax.chain(  # the moment found through a chain and inject_hyperparams
        optax.clip_by_global_norm(1e6),
        optax.inject_hyperparams(optax.adam)(learning_rate=LR, b1=B1, b2=B2, eps=ADAM_EPS)),
}


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, id="f32", marks=pytest.mark.slow),
                                   pytest.param(jnp.float64, id="f64")])  # f32: full suite
@pytest.mark.parametrize("two_call", [False, True], ids=["one_call", "two_call"])
@pytest.mark.parametrize("inner", list(INNERS))
def test_an_ascent_preconditioned_by_adams_nu(inner, two_call, dtype):
  params, loss = problem(dtype)
  tx = sam_optax.sharpness_aware(INNERS[inner](), preconditioned_ascent(RHO, E),
                                 two_call=two_call)
  grad = jax.grad(loss)

  step = problems.form_step(tx, grad, two_call)

  state, ours = tx.init(params), []
  w = params
  for _ in range(STEPS):
    w, state = step(w, state)
    ours.append(w)
  tol = {jnp.float32: 2e-5, jnp.float64: 1e-12}[dtype]
  for a, e in zip(ours, reference(params, loss)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(e)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)
