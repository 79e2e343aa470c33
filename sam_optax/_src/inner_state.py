"""Reading the inner optimizer's state from an ascent: Adam-like moments in common optax states.

The engine passes every ascent the keyword `inner_state`, the inner optimizer's state before
the step's update. `find_moment` finds a moment (Adam's `mu` or `nu`, RMSProp's `nu`, Lion's
`mu`, SGD momentum's `trace`) in it, through `optax.chain`, `optax.inject_hyperparams`,
`optax.masked`, `optax.multi_transform`, `optax.MultiSteps` and `optax.with_extra_args_support`,
with optax's public `optax.tree.get_all_with_path`, and no private optax internals.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def find_moment(inner_state: Any, name: str = "nu", *, params: Any = None,
                fill_value: float | None = None) -> Any:
  r"""The moment called `name` in an optax state, as a tree shaped like the params.

  For Adam, after the descent directions `d_1..d_t` (elementwise, no bias correction):

  .. math::
    \mu_t = \beta_1 \mu_{t-1} + (1 - \beta_1)\, d_t, \qquad
    \nu_t = \beta_2 \nu_{t-1} + (1 - \beta_2)\, d_t^2, \qquad \mu_0 = \nu_0 = 0

  Searches the state for the fields called `name` of its `NamedTuple` states (optax's own
  `optax.tree.get_all_with_path`, keeping state fields only, not dictionary keys of the params'
  trees). Field names in optax's states:

  ==========================================================  ============  =============
  optimizer                                                   first moment  second moment
  ==========================================================  ============  =============
  `adam`, `adamw`, `nadam`, `nadamw`, `radam`, `adamax`       `"mu"`        `"nu"`
  `amsgrad` (`nu_max`: the running maximum)                   `"mu"`        `"nu"`
  `adabelief` (`nu`: the EMA of `(g - mu)^2`, the "belief")   `"mu"`        `"nu"`
  `lion`                                                      `"mu"`        none
  `rmsprop` (`centered=True`: `mu` is the EMA of `g`)         none          `"nu"`
  `sgd(momentum=...)`, `optax.trace`                          `"trace"`     none
  ==========================================================  ============  =============

  The moments are those of the state passed in: under `sam_optax.sharpness_aware`, the
  `inner_state` keyword is the state *before* this step's update, so `nu` holds the gradients
  up to the previous descent step, without bias correction (Adam's `nu_hat = nu / (1 -
  b2^t)` needs the count, e.g. `find_moment(inner_state, "count")`), and is zero at the
  first step.

  Wrappers are seen through: `optax.chain` (a tuple of states), `optax.inject_hyperparams`
  (`inner_state`), `optax.MultiSteps` (`inner_opt_state`: the moments of the accumulated
  gradients), `optax.with_extra_args_support` (the same state). Under `optax.masked` and
  `optax.multi_transform`, a moment covers the unmasked leaves only and holds
  `optax.MaskedNode()` at the others. Several moments that together cover every leaf once
  (`multi_transform` with an Adam-like optimizer per label) are merged into one tree. Where
  some leaves stay uncovered, pass `params` and `fill_value`: those leaves then hold
  `fill_value` (e.g. 1.0 for `nu` leaves the gradient unscaled by a `1/sqrt(nu)`
  preconditioner).

  Args:
    inner_state: an optax state, e.g. the engine's `inner_state` keyword.
    name: the field name of the moment: `"mu"`, `"nu"`, `"trace"`, or any other field of an
      optax state (`"nu_max"`, `"count"`).
    params: the params, to check the moment's structure against and to fill leaves that no
      moment covers (with `fill_value`).
    fill_value: the value of the leaves no moment covers (masked out); needs `params`.

  Returns:
    The moment: a tree shaped like the params (the same structure, shapes and dtypes as the
    optimizer keeps them).

  Raises:
    ValueError: when the state holds no field called `name`, or several that do not together
      cover each leaf exactly once, or leaves are masked out and no `fill_value` is given, or
      the moment does not match `params`. The message lists what was found.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(0.1, b2=0.5))
    >>> state = opt.init(params)
    >>> _, state = opt.update({'w': jnp.array([2.0, 0.0])}, state)
    >>> find_moment(state, "nu")['w']
    Array([2., 0.], dtype=float32)

  References:
    Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015,
    https://arxiv.org/abs/1412.6980
  """
  if not isinstance(name, str):
    raise TypeError(f"name must be a str (a field of an optax state, e.g. 'nu'), got "
                    f"{type(name).__name__}.")
  if fill_value is not None and params is None:
    raise ValueError("fill_value fills the leaves no moment covers: pass params too.")
  # Only fields of NamedTuple states (keys carrying a `tuple_name`): a dict key of the params
  # called `nu` inside a moment's tree is not a moment.
  found = [(path, value) for path, value in optax.tree.get_all_with_path(inner_state, name)
           if getattr(path[-1], "tuple_name", None) is not None]
  if not found:
    raise ValueError(
        f"find_moment found no field {name!r} in the inner optimizer's state; its states "
        f"are {_state_types(inner_state) or 'none (no NamedTuple state)'}. Adam-like "
        f"optimizers keep 'mu' and 'nu', RMSProp 'nu', Lion 'mu', SGD momentum 'trace'; an "
        f"optimizer without the moment (e.g. plain SGD) cannot precondition the ascent: use "
        f"an inner optimizer that keeps it, or an ascent with its own average (e.g. "
        f"sam_optax.fisher_ascent).")
  moment = _merge(found, name)
  return _complete(moment, name, params, fill_value)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _merge(found, name):
  """The one moment found, or the leafwise union of several that cover each leaf once."""
  if len(found) == 1:
    return found[0][1]
  where = ", ".join(jax.tree_util.keystr(path) for path, _ in found)
  flat = [jax.tree.flatten(value, is_leaf=_is_masked) for _, value in found]
  treedef = flat[0][1]
  if all(t == treedef for _, t in flat):
    columns = list(zip(*(leaves for leaves, _ in flat)))
    if all(sum(not _is_masked(x) for x in column) == 1 for column in columns):
      return jax.tree.unflatten(
          treedef, [next(x for x in column if not _is_masked(x)) for column in columns])
  raise ValueError(
      f"find_moment found {len(found)} fields {name!r} in the inner optimizer's state "
      f"({where}), which do not split the params between them: pick one by passing the "
      f"sub-state that holds it, e.g. find_moment(inner_state[0], {name!r}) for the first "
      f"transformation of an optax.chain.")


def _complete(moment, name, params, fill_value):
  """Checks the moment against the params and fills masked-out leaves with `fill_value`."""
  leaves, treedef = jax.tree.flatten(moment, is_leaf=_is_masked)
  masked = any(_is_masked(x) for x in leaves)
  if params is None:
    if masked:
      raise ValueError(
          f"The {name!r} moment covers only some leaves (optax.masked or multi_transform "
          f"leaves the others without one): pass params and fill_value to fill them, e.g. "
          f"find_moment(inner_state, {name!r}, params=params, fill_value=1.0).")
    return moment
  param_leaves, param_treedef = jax.tree.flatten(params)
  if treedef != param_treedef:
    raise ValueError(
        f"The {name!r} moment found in the inner optimizer's state has structure {treedef}, "
        f"the params {param_treedef}: the state is not the one of an optimizer of these "
        f"params.")
  if masked and fill_value is None:
    raise ValueError(
        f"The {name!r} moment covers only some leaves (optax.masked or multi_transform): "
        f"pass fill_value= for the others.")
  return jax.tree.unflatten(treedef, [
      jnp.full(jnp.shape(p), fill_value, jnp.result_type(p)) if _is_masked(x) else x
      for x, p in zip(leaves, param_leaves)])


def _state_types(state) -> str:
  """The NamedTuple states in `state` with their fields, for error messages."""
  seen: list[str] = []

  def walk(x):
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      fields = ", ".join(getattr(x, "_fields"))
      entry = f"{type(x).__name__}({fields})"
      if entry not in seen:
        seen.append(entry)
    if isinstance(x, (tuple, list)):
      for y in x:
        walk(y)
    elif isinstance(x, dict):
      for y in x.values():
        walk(y)

  walk(state)
  return ", ".join(seen)
