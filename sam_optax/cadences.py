"""Cadences: which steps take the perturbed pass.

A cadence is a piece with a state, like an optax transformation: `init(params) -> state` and
`update(grads, state, params, *, count, param_axis_name) -> (take, state)`, where `take` is a
boolean scalar. It may decide from the step count, a PRNG key carried in its state, statistics
of the clean gradient `g` (set `reads_grads=True`: the engine then hands it `g`, averaged over
devices under data parallelism so that every replica decides alike; otherwise `grads` is None
and the engine computes nothing for it) and its own state. The engine runs the perturbed pass
(the ascent and the second gradient evaluation) on the steps where `take` is True, inside a
`jax.lax.cond`, so the other steps evaluate no second gradient at run time.

The engine has two slots for such pieces, which differ in what an off step is:

  * `cadence=`: an off step still calls the descent correction, with `g_adv = g` and
    `perturbed=False` (LookSAM reuses its stored component there);
  * `window=`: an off step is the inner optimizer's own step on `g`, without correction.

A step takes the perturbed pass when both say so. `every(k)` (LookSAM), `bernoulli(p, seed)`
(RST: a counter-based random draw) and `adaptive(decay, threshold)` (AE-SAM: statistics of
`||g||^2` in its state) are cadences, `window(start, end)` (what `window=(start, end)` builds)
a window piece; any cadence may fill either slot, and
a plain function of the step count is accepted as `cadence=` (`from_function`). In the
two-call form the ascent call decides and the descent call follows that decision; the state
advances once per pair of calls.
"""

# The implementation lives in sam_optax._src.cadences, beside the engine that runs it; this
# module is the public path (`import sam_optax.cadences`, `from sam_optax.cadences import every`).
from sam_optax._src.cadences import AdaptiveCadenceState
from sam_optax._src.cadences import Cadence
from sam_optax._src.cadences import adaptive
from sam_optax._src.cadences import bernoulli
from sam_optax._src.cadences import every
from sam_optax._src.cadences import from_function
from sam_optax._src.cadences import window

__all__ = ["AdaptiveCadenceState", "Cadence", "adaptive", "bernoulli", "every", "from_function",
           "window"]
