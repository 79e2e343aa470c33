"""Small matplotlib helpers for Hessian spectra (matplotlib is an optional dependency).

``matplotlib`` is imported lazily inside each function, so importing
``sam_optax.diagnostics`` never requires it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["plot_spectrum", "plot_spectra"]

_INSTALL_HINT = (
    "The sam_optax.diagnostics plotting helpers need matplotlib, which is an optional "
    "dependency. Install it with `pip install matplotlib`."
)


def _pyplot():
  try:
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy optional import)
  except ImportError as e:  # pragma: no cover - exercised via monkeypatch in tests
    raise ImportError(_INSTALL_HINT) from e
  return plt


def _as_curve(spectrum: Any) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
  """Returns ``((grid, density), [])`` for a SpectralDensity, else ``(None, point_eigs)``."""
  if hasattr(spectrum, "grid") and hasattr(spectrum, "density"):
    grid = np.asarray(spectrum.grid, dtype=float)
    dens = np.asarray(spectrum.density, dtype=float)
    return (grid, dens), np.zeros(0)
  eigs = np.sort(np.asarray(spectrum, dtype=float).reshape(-1))
  if eigs.size == 0:
    raise ValueError("Got an empty array of eigenvalues to plot.")
  return None, eigs


def plot_spectrum(
    spectrum: Any,
    *,
    ax: Optional[Any] = None,
    eigenvalues: Optional[Any] = None,
    log_scale: bool = True,
    label: Optional[str] = None,
    title: Optional[str] = "Hessian eigenvalue density",
    floor: float = 1e-8,
):
  r"""Plots one Hessian spectrum.

  .. math::
      y(t) = \max(\phi(t), \text{floor}) \quad \text{on a log axis, or a rug at each }
      \lambda_i \text{ for an array of eigenvalues.}

  ``spectrum`` is either a :class:`SpectralDensity` (its smoothed density is drawn,
  with a log y-axis by default as in Ghorbani et al.) or a 1-D array of
  eigenvalues (drawn as a rug / stem plot). ``eigenvalues`` optionally overlays
  reference eigenvalues (e.g. from :func:`hessian_eigenvalues` or a dense
  ``eigh``) as vertical ticks.

  Args:
    spectrum: :class:`SpectralDensity` or array of eigenvalues.
    ax: Optional matplotlib ``Axes`` to draw into (a new figure otherwise).
    eigenvalues: Optional array of eigenvalues to mark.
    log_scale: Log-scale y axis for densities (values clipped at ``floor``).
    label: Legend label.
    title: Axes title (``None`` for none).
    floor: Lower clip for the log-scale density.

  Returns:
    The matplotlib ``Figure``.

  Raises:
    ImportError: If matplotlib is not installed (``pip install matplotlib``).

  Example:
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax.diagnostics import spectral_density, plot_spectrum
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * p["w"] ** 2)
    >>> sd = spectral_density(loss, {"w": jnp.zeros(4)}, key=jax.random.key(0),
    ...                       num_probes=2, num_iters=4)
    >>> fig = plot_spectrum(sd, eigenvalues=jnp.arange(1.0, 5.0))
    >>> type(fig).__name__
    'Figure'

  References:
    Ghorbani, Krishnan, Xiao, 2019, https://arxiv.org/abs/1901.10159.
  """
  plt = _pyplot()
  if ax is None:
    fig, ax = plt.subplots(figsize=(6, 4))
  else:
    fig = ax.figure
  curve, eigs = _as_curve(spectrum)
  if curve is not None:
    grid, dens = curve
    y = np.maximum(dens, floor) if log_scale else dens
    ax.plot(grid, y, label=label)
    if log_scale:
      ax.set_yscale("log")
    ax.set_ylabel("density")
  else:
    ax.vlines(eigs, 0.0, 1.0, label=label, linewidth=1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_yticks([])
  if eigenvalues is not None:
    marks = np.asarray(eigenvalues, dtype=float).reshape(-1)
    ax.plot(
        marks,
        np.zeros_like(marks),
        "|",
        markersize=12,
        color="k",
        transform=ax.get_xaxis_transform(),
        label="eigenvalues",
    )
  ax.set_xlabel("eigenvalue")
  if title:
    ax.set_title(title)
  if label is not None or eigenvalues is not None:
    ax.legend()
  return fig


def plot_spectra(
    runs: Union[Mapping[str, Any], Sequence[Any]],
    *,
    labels: Optional[Sequence[str]] = None,
    log_scale: bool = True,
    title: Optional[str] = "Hessian spectra",
    floor: float = 1e-8,
):
  r"""Compares spectra of several runs (e.g. SGD vs SAM vs ASAM) on one figure.

  .. math::
      \lambda_{\max}(\text{run}) = \max\{\theta_i : w_i > 10^{-8}\}
      \quad \text{(the largest SLQ node with weight, or the largest eigenvalue)}

  Left panel: the densities overlaid (or eigenvalue rugs for arrays). Right
  panel: a bar chart of each run's largest eigenvalue (the largest SLQ node with
  non-negligible weight, or the largest array entry), a common sharpness proxy.

  Args:
    runs: Mapping ``name -> SpectralDensity | eigenvalues`` (or a sequence with
      ``labels``).
    labels: Names when ``runs`` is a sequence.
    log_scale: Log-scale y axis for densities.
    title: Figure title.
    floor: Lower clip for the log-scale densities.

  Returns:
    The matplotlib ``Figure`` (two axes).

  Raises:
    ImportError: If matplotlib is not installed (``pip install matplotlib``).
    ValueError: If ``runs`` is empty or ``labels`` has the wrong length.

  Example:
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import jax.numpy as jnp
    >>> from sam_optax.diagnostics import plot_spectra
    >>> fig = plot_spectra({"sgd": jnp.array([0.1, 5.0]), "sam": jnp.array([0.1, 2.0])})
    >>> len(fig.axes)
    2

  References:
    Ghorbani, Krishnan, Xiao, *An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density*, ICML 2019, https://arxiv.org/abs/1901.10159.
  """
  if isinstance(runs, Mapping):
    names = list(runs.keys())
    items = list(runs.values())
  else:
    items = list(runs)
    names = list(labels) if labels is not None else [f"run {i}" for i in range(len(items))]
    if len(names) != len(items):
      raise ValueError(f"Got {len(items)} runs but {len(names)} labels.")
  if not items:
    raise ValueError("runs is empty: pass at least one spectrum to compare.")
  plt = _pyplot()
  fig, (ax, ax_bar) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
  tops = []
  for name, spec in zip(names, items):
    curve, eigs = _as_curve(spec)
    if curve is not None:
      grid, dens = curve
      y = np.maximum(dens, floor) if log_scale else dens
      ax.plot(grid, y, label=name)
      nodes = np.asarray(spec.nodes, dtype=float)
      weights = np.asarray(spec.weights, dtype=float)
      significant = nodes[weights > 1e-6 * weights.max()]
      tops.append(float(significant.max()) if significant.size else float(nodes.max()))
    else:
      ax.vlines(eigs, 0.0, 1.0, label=name, colors=f"C{len(tops)}", linewidth=1.0)
      tops.append(float(eigs.max()))
  if log_scale and any(hasattr(s, "density") for s in items):
    ax.set_yscale("log")
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density")
  ax.legend()
  ax_bar.bar(range(len(tops)), tops, color=[f"C{i}" for i in range(len(tops))])
  ax_bar.set_xticks(range(len(tops)))
  ax_bar.set_xticklabels(names, rotation=30, ha="right")
  ax_bar.set_title(r"$\lambda_{\max}$")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig
