"""Property tests over random pytrees, for every variant in tests/catalogue.py.

Trees are nested dicts, lists and tuples of leaves with shapes among scalars, vectors, matrices
and empty arrays, dtypes float32/float64/bfloat16/float16, and values that may be all zero.
Every new structure, shape or dtype costs XLA compilations, so the tests run op by op under
`jax.disable_jit()` (JAX caches each primitive per shape and dtype, the vocabulary of shapes
and dtypes is small, and `lax.cond` then runs the branch taken instead of compiling both), with
few examples, derandomized and without a database so that CI is deterministic.

Each property runs twice per variant: on `COVERAGE_TREE` alone (every dtype, empty and all-zero
leaves, nesting: the fast tier) and on hypothesis's random trees (`slow`: most of the time).
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sam_optax
from sam_optax._src import tree as tree_lib
from sam_optax._src import variants as variants_lib
from tests.catalogue import CATALOGUE

SETTINGS = settings(max_examples=3, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), print_blob=True)

SHAPES = [(), (3,), (2, 3), (0,), (2, 0)]
DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16]
SCALES = [0.0, 1e-2, 1.0, 30.0]  # 0.0: an all-zero leaf


@st.composite
def leaves(draw, dtypes=tuple(DTYPES), shapes=tuple(SHAPES)):
  shape = draw(st.sampled_from(shapes))
  dtype = draw(st.sampled_from(dtypes))
  scale = draw(st.sampled_from(SCALES))
  seed = draw(st.integers(0, 2**16))
  values = np.random.default_rng(seed).normal(size=shape) * scale
  return jnp.asarray(values, dtype)


def trees(leaf_strategy=None):
  """Nested dicts/lists/tuples (at most 5 leaves); the top level is a dict."""
  leaf_strategy = leaves() if leaf_strategy is None else leaf_strategy
  keys = st.sampled_from(["a", "b", "c"])
  nested = st.recursive(
      leaf_strategy,
      lambda children: st.one_of(
          st.lists(children, min_size=0, max_size=3),
          st.tuples(children, children),
          st.dictionaries(keys, children, min_size=0, max_size=3)),
      max_leaves=5)
  return st.dictionaries(keys, nested, min_size=1, max_size=3)


# Always tried first: every dtype with elements, all-zero leaves, a scalar, empty arrays and an
# empty subtree, nested dicts, lists and tuples.
COVERAGE_TREE = {
    "a": jnp.asarray([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]], jnp.float16),
    "b": [jnp.zeros((), jnp.bfloat16), (jnp.asarray([1.0, -2.0, 0.1], jnp.float64),
                                        jnp.zeros((0,), jnp.float32))],
    "c": {"d": jnp.zeros((2, 3), jnp.float32), "e": {}},
    "f": jnp.asarray([-0.75, 0.3, 1.5], jnp.bfloat16),
}


def grad_fn(params):
  """The gradient of sum(w^2 + cos w) over every leaf, 2w - sin(w), computed in float32 or
  wider and returned in each leaf's dtype (written out: autodiff op by op costs more)."""
  def leaf(w):
    wide = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    return (2.0 * wide - jnp.sin(wide)).astype(w.dtype)
  return jax.tree.map(leaf, params)


def assert_finite(tree_, what):
  for path, leaf in jax.tree.leaves_with_path(tree_):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      assert bool(jnp.all(jnp.isfinite(leaf))), f"{what} not finite at {jax.tree_util.keystr(path)}"


def assert_like(actual, expected, what):
  """Same structure, and leafwise the same shapes and dtypes."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert (a.shape, a.dtype) == (e.shape, e.dtype), (what, a.shape, a.dtype, e.shape, e.dtype)


# The fast tier checks each property on COVERAGE_TREE; the random search is in the full suite.
SEARCH = [pytest.param(False, id="coverage_tree"),
          pytest.param(True, id="search", marks=pytest.mark.slow)]


def check_trees(check, search):
  """Runs `check(params)` op by op on COVERAGE_TREE, or on random trees when `search`."""
  with jax.disable_jit():
    if search:
      SETTINGS(given(params=trees())(check))()
    else:
      check(COVERAGE_TREE)


def metric_of(variant):
  """The elementwise weights `T(params)` of the variant's norms (ASAM), or None.

  Read from the `Pieces` a named constructor hands to `build_variant` (None for an entry built
  without one)."""
  captured = []

  def capture(inner, pieces, *args, **kwargs):
    captured.append(pieces)
    return build_variant(inner, pieces, *args, **kwargs)

  build_variant = variants_lib.build_variant
  with mock.patch.object(variants_lib, "build_variant", capture):
    variant.make(optax.identity(), **variant.hparams)
  return captured[0].metric if captured else None


@pytest.mark.parametrize("search", SEARCH)
@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_updates_are_finite_and_state_keeps_its_shape(variant, search):
  forms = [False, True] if variant.two_call else [False]

  def check(params):
    for two_call in forms:
      # optax.adam's default eps=1e-8 is 0 in float16, where a zero gradient then gives 0/0.
      tx = variant.make(optax.adam(1e-2, eps=1e-3), **variant.hparams, two_call=two_call)
      state0 = state = tx.init(params)
      p = params
      for _ in range(2):  # one-call: two steps; two-call: one ascent and one descent call
        if two_call:
          updates, state = tx.update(grad_fn(p), state, p)
        else:
          updates, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
        assert_like(updates, params, "updates")
        assert_finite(updates, "updates")
        p = optax.apply_updates(p, updates)
      assert_like(state, state0, "state")
      assert_like(p, params, "params")
      assert_finite(state, "state")

  check_trees(check, search)


@pytest.mark.parametrize("search", SEARCH)
@pytest.mark.parametrize("variant", [v for v in CATALOGUE if v.rho_zero_is_inner], ids=str)
def test_rho_zero_reproduces_the_inner_optimizer(variant, search):
  hparams = dict(variant.hparams, **{name: 0.0 for name in variant.rho_names})
  inner = optax.sgd(0.1, momentum=0.9)

  def check(params):
    tx = variant.make(inner, **hparams)
    ours, state = params, tx.init(params)
    theirs, inner_state = params, inner.init(params)
    for _ in range(2):
      updates, state = tx.update(grad_fn(ours), state, ours, grad_fn=grad_fn)
      expected, inner_state = inner.update(grad_fn(theirs), inner_state, theirs)
      for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(u, np.float64), np.asarray(e, np.float64))
      ours, theirs = optax.apply_updates(ours, updates), optax.apply_updates(theirs, expected)

  check_trees(check, search)


@pytest.mark.parametrize("search", SEARCH)
@pytest.mark.parametrize("variant", CATALOGUE, ids=str)
def test_renormalization_keeps_the_clean_norm(variant, search):
  """`||T d|| = ||T g||` (T = 1, or the variant's adaptive metric), to the rounding of d."""
  if "renormalize" in variant.unsupported_options:
    with pytest.raises(ValueError, match="renormalize"):
      variant.make(optax.identity(), **variant.hparams, renormalize=True)
    return
  metric = metric_of(variant)
  tx = variant.make(optax.identity(), **variant.hparams, renormalize=True)

  def check(params):
    grads = grad_fn(params)
    direction, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    weights = jax.tree.map(jnp.ones_like, params) if metric is None else metric(params)
    weigh = lambda x: jax.tree.map(lambda t, y: t.astype(y.dtype) * y, weights, x)
    clean = float(tree_lib.norm(weigh(grads)))
    ours = float(tree_lib.norm(weigh(direction)))
    # d is rounded to each leaf's dtype: its norm is then exact to that dtype's epsilon.
    eps = max([float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(params)] + [1e-7])
    np.testing.assert_allclose(ours, clean, rtol=2 * eps, atol=1e-30)

  check_trees(check, search)


# ---------------------------------------------------------------------------- ASAM equivariance
#
# With eta = 0, T = |w| and the paper's convention (every leaf adaptive), rescaling one leaf k of
# the params by c != 0 and its gradient by 1/c (the gradient of the reparametrized loss
# L'(w') = L(w with w_k = w'_k / c)) leaves ||T g|| unchanged and multiplies T^2 g on leaf k by
# c: eps'_k = c eps_k and eps'_j = eps_j elsewhere, so the perturbed point describes the same
# function. For c a power of two every product is scaled exactly, so the equality holds bit for
# bit; for other c to rounding. With eta > 0, T'_k = |c| |w_k| + eta and the statement holds
# only up to O(eta / |w|).

ASAM_LEAVES = leaves(dtypes=(jnp.float32, jnp.float64), shapes=((), (3,), (2, 3)))


def asam_perturbation(params, grads, **hparams):
  """ASAM's eps: the two-call form's ascent call returns it as its updates."""
  tx = sam_optax.asam(optax.sgd(0.1), two_call=True, **hparams)
  eps, _ = tx.update(grads, tx.init(params), params)
  return eps


@pytest.mark.skipif(not hasattr(sam_optax, "asam"), reason="ASAM not in this build")
@pytest.mark.parametrize("c", [-4.0, 0.5, 3.0, -0.7])  # exact (powers of two) and rounded
@pytest.mark.parametrize("k", [0, 2])
def test_asam_perturbation_is_equivariant_under_leaf_rescaling(k, c):
  """The fast tier's case: a fixed tree of float32 and float64 leaves."""
  params = {"a": jnp.asarray([[0.5, -1.0, 2.0], [0.25, 3.0, -0.1]], jnp.float32),
            "b": [jnp.asarray(-1.5, jnp.float64), jnp.asarray([0.7, -0.2, 1.1], jnp.float64)]}
  with jax.disable_jit():
    check_equivariance(params, k, c)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(sam_optax, "asam"), reason="ASAM not in this build")
@SETTINGS
@given(params=trees(ASAM_LEAVES), data=st.data(),
       c=st.sampled_from([2.0, 0.5, -4.0, 0.125, 3.0, -0.7, 10.0]))
def test_asam_perturbation_is_equivariant_under_leaf_rescaling_search(params, data, c):
  flat = jax.tree.leaves(params)
  assume(flat)
  with jax.disable_jit():
    check_equivariance(params, data.draw(st.integers(0, len(flat) - 1)), c)


def check_equivariance(params, k, c):
  """Rescaling leaf k by c (and its gradient by 1/c) multiplies eps on leaf k by c only."""
  flat, treedef = jax.tree.flatten(params)
  grads = grad_fn(params)
  hparams = dict(rho=0.5, eta=0.0)
  eps = jax.tree.leaves(asam_perturbation(params, grads, **hparams))
  scaled = lambda tree_, f: treedef.unflatten(
      [f(x) if i == k else x for i, x in enumerate(jax.tree.leaves(tree_))])
  eps_scaled = jax.tree.leaves(asam_perturbation(
      scaled(params, lambda x: (x * c).astype(x.dtype)), scaled(grads, lambda x: (x / c).astype(x.dtype)),
      **hparams))
  exact = float(np.log2(abs(c))).is_integer()
  for i, (a, e) in enumerate(zip(eps_scaled, eps)):
    expected = (e * c).astype(e.dtype) if i == k else e
    if exact:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(expected))
    else:
      # Rescaling a float32 leaf by such a c rounds it, which moves the shared norm ||T g||.
      tol = 1e-5 if any(x.dtype == jnp.float32 for x in flat) else 1e-12
      np.testing.assert_allclose(np.asarray(a), np.asarray(expected), rtol=tol,
                                 atol=tol * float(jnp.max(jnp.abs(expected), initial=0.0)))


def test_asam_with_positive_eta_is_only_approximately_equivariant():
  params = {"a": jnp.asarray([1.0, -2.0, 0.5], jnp.float32), "b": jnp.asarray([0.3], jnp.float32)}
  grads = grad_fn(params)
  eps = asam_perturbation(params, grads, rho=0.5, eta=0.01)
  eps_scaled = asam_perturbation({"a": params["a"] * 4, "b": params["b"]},
                                 {"a": grads["a"] / 4, "b": grads["b"]}, rho=0.5, eta=0.01)
  difference = np.max(np.abs(np.asarray(eps_scaled["a"]) - 4 * np.asarray(eps["a"])))
  assert 0 < difference < 0.05 * np.max(np.abs(4 * np.asarray(eps["a"])))
