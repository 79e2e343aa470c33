"""Sphinx configuration of the sam_optax documentation site.

Why Sphinx (with myst-nb) rather than mkdocs-material: the docstrings are reStructuredText
with `.. math::` blocks and Google-style sections (Args, Returns, Example, References), which
Sphinx's autodoc and napoleon render as they are, with no conversion; optax and flax build
their sites the same way, so their users find the layout they know. myst-nb renders the
guides (MyST markdown) and the notebooks.

Build (warnings are errors, nitpicky: a broken cross-reference fails)::

  sphinx-build -W --keep-going -n -b html docs docs/_build/html

What this file adds to the stock extensions:

* a check that every function the API reference documents states its rule in math, its
  arguments, its return value, an example and its references (an `autodoc-process-docstring`
  hook: a missing section is a Sphinx warning, so the `-W` build fails);
* a default role for the docstrings' single backticks: a name of the public API links to its
  page, anything else renders as code;
* the executed notebooks of `docs/notebooks/` are rendered, not executed (see
  `docs/execute_notebooks.py`).
"""

from __future__ import annotations

import importlib
import pathlib
import re
import shutil
import sys

from docutils import nodes
from sphinx import addnodes
from sphinx.util import logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The checkout's package, installed or not.
sys.path.insert(0, str(ROOT))

import sam_optax  # noqa: E402

logger = logging.getLogger("sam_optax.docs")

project = "sam_optax"
author = "the sam_optax authors"
copyright = "the sam_optax authors"  # noqa: A001 (Sphinx's name)
release = version = sam_optax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

html_theme = "sphinx_book_theme"
html_title = f"sam_optax {release}"
html_theme_options = {
    "repository_url": "https://github.com/sam-optax/sam_optax",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "show_toc_level": 2,
}

# --- autodoc, autosummary, napoleon -------------------------------------------------------------

# One page per public symbol (docs/api/_generated, written at build time, not committed).
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
# Signatures keep their type hints; the descriptions come from the docstrings' Args sections.
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# The variants' shared options are documented once, in `SharedOptions`, and spelled out in
# each constructor's signature at run time (sam_optax._src.variants.variant).
autodoc_preserve_defaults = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" of a NamedTuple as a field list: autodoc documents the fields themselves, so
# `.. attribute::` entries would describe each field twice.
napoleon_use_ivar = True
napoleon_custom_sections = [("References", "notes_style")]

# Nitpicky mode checks every cross-reference into sam_optax. References into other projects
# (type hints naming jax, optax, numpy, flax and typing objects) are not resolved: linking them
# would need intersphinx inventories fetched over the network at every build, and a build from
# a clean clone must not depend on other sites being up.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|chex|numpy|np|jnp|flax|nnx|matplotlib|typing|"
               r"typing_extensions|collections|builtins)(\..*)?"),
    # Private types in public signatures (fields of the engine's state): no page to link to.
    (r"py:.*", r"(sam_optax\._src\.\w+\.)?(Decision|CadenceState)"),
    (r"py:.*", r"DynamicScale"),   # flax.training.dynamic_scale.DynamicScale
    (r"py:.*", r"(Any|Callable|Hashable|Mapping|Sequence|Iterable|Literal|Protocol|NamedTuple|"
               r"TypedDict|Unpack|ParamSpec|TypeVar|Union|Optional|Array|ArrayLike|ArrayTree|"
               r"PyTree|Params|Updates|OptState|Schedule|ScalarOrSchedule|"
               r"GradientTransformation|GradientTransformationExtraArgs|PRNGKey|Axes|"
               r"Figure|Axis|NoneType|ellipsis|int|float|bool|str|tuple|list|dict|object|type|"
               r"None|Ellipsis|_P|_T|P|T)"),
]

# --- myst / myst-nb ------------------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The notebooks in docs/notebooks are committed executed (docs/execute_notebooks.py; the
# suite executes the same notebooks in tests/test_notebooks.py): the build renders them.
nb_execution_mode = "off"
nb_execution_raise_on_error = True
nb_merge_streams = True

# --- the docstring check -------------------------------------------------------------------------

# What every public function's docstring states: the same rule as tests/test_docs.py (which
# tests/test_site.py checks against these constants).
REQUIRED_SECTIONS = ("Args:", "Returns:", "Example", "References:")
MATH_MARKERS = ("math::", ":math:")
REFERENCE_MARKERS = ("arxiv.org", "Golub")


def missing_sections(doc: str) -> list[str]:
  """What a public function's docstring lacks (empty when it states everything)."""
  missing = [section for section in REQUIRED_SECTIONS if section not in doc]
  if not any(marker in doc for marker in MATH_MARKERS):
    missing.append("the rule in math (a `.. math::` block)")
  if not any(marker in doc for marker in REFERENCE_MARKERS):
    missing.append("an arXiv link in References")
  return missing


def _returns_as_field(lines: list[str]) -> None:
  """Rewrites a `Returns:` section as a `:returns:` field, in place.

  The docstrings describe the return value in prose (`The sub-batch: ...`); napoleon would
  read the text before a colon as the return type.
  """
  for index, line in enumerate(lines):
    if line.strip() != "Returns:":
      continue
    indent = len(line) - len(line.lstrip())
    end = index + 1
    while end < len(lines) and (not lines[end].strip()
                                or len(lines[end]) - len(lines[end].lstrip()) > indent):
      end += 1
    while end > index + 1 and not lines[end - 1].strip():
      end -= 1
    body = [entry.strip() for entry in lines[index + 1:end]]
    if not body:
      return
    field = [" " * indent + ":returns: " + body[0]]
    field += [" " * (indent + 4) + entry if entry else "" for entry in body[1:]]
    lines[index:end] = field
    return


def check_docstring(app, what, name, obj, options, lines):
  """Warns (so that `-W` fails the build) when a documented function lacks a section.

  Runs before napoleon rewrites the docstring, on the text as written. Applies to every
  function of sam_optax that autodoc documents; classes and data are not held to it.
  """
  if not name.startswith("sam_optax."):
    return
  if not lines or not "".join(lines).strip():
    logger.warning("%s has no docstring", name, type="sam_optax", subtype="docstring")
    return
  if what != "function":
    return
  missing = missing_sections("\n".join(lines))
  if missing:
    logger.warning("%s's docstring lacks: %s", name, ", ".join(missing),
                   type="sam_optax", subtype="docstring")


_FIELD_ALIAS = re.compile(r"^Alias for field number \d+$")


def prepare_docstring(app, what, name, obj, options, lines):
  """The check, then the prose `Returns:` section made a field (for every object)."""
  if what == "attribute" and len(lines) <= 2 and lines and _FIELD_ALIAS.match(lines[0]):
    lines.clear()   # a NamedTuple field's generated docstring says nothing
    return
  if name.startswith("sam_optax."):
    check_docstring(app, what, name, obj, options, lines)
  _returns_as_field(lines)


def _alias_spellings() -> list[tuple[str, str]]:
  """(the expansion autodoc writes, the alias's name) for the type aliases of signatures."""
  from sphinx.util.typing import stringify_annotation

  from sam_optax._src.hyperparams import ScalarOrSchedule

  spellings = []
  # Radius first: its expansion contains ScalarOrSchedule's.
  for alias, name in ((sam_optax.Radius, "~sam_optax.Radius"),
                      (ScalarOrSchedule, "ScalarOrSchedule")):
    for mode in ("smart", "fully-qualified-except-typing", "fully-qualified"):
      spellings.append((stringify_annotation(alias, mode), name))
  return spellings


def shorten_aliases(app, what, name, obj, options, signature, return_annotation):
  """Signatures name `Radius` and `ScalarOrSchedule` instead of their three-line expansions."""
  if not name.startswith("sam_optax.") or signature is None:
    return None
  for expansion, alias in _alias_spellings():
    signature = signature.replace(expansion, alias)
  return signature, return_annotation


# --- single backticks ----------------------------------------------------------------------------

# The docstrings write code in single backticks (as optax's do); `setup` registers the role.
default_role = "code_or_reference"

def public_modules() -> list:
  """The modules whose `__all__` is the public API (what the API reference documents):
  the package and every module or subpackage of `sam_optax` whose name does not start with an
  underscore (tests/test_site.py finds them the same way)."""
  modules = [sam_optax]
  for path in sorted((ROOT / "sam_optax").iterdir()):
    if path.name.startswith("_") or not (path.suffix == ".py" or (path / "__init__.py").exists()):
      continue
    modules.append(importlib.import_module(f"sam_optax.{path.stem}"))
  return modules


def _public_names() -> dict[str, str]:
  """Each public symbol's short and qualified spellings -> its qualified name."""
  names = {}
  for module in public_modules():
    for name in module.__all__:
      full = f"{module.__name__}.{name}"
      names[full] = full
      if module is sam_optax:
        names.setdefault(name, full)
  return names


_PUBLIC = None
_CALL = re.compile(r"^([A-Za-z_][\w.]*)(\(\))?$")


def code_or_reference(name, rawtext, text, lineno, inliner, options=None, content=None):
  """The docstrings' `x`: a link when `x` (or `x()`) is a public symbol, else code."""
  global _PUBLIC
  if _PUBLIC is None:
    _PUBLIC = _public_names()
  match = _CALL.match(text)
  target = _PUBLIC.get(match.group(1)) if match else None
  literal = nodes.literal(rawtext, text, classes=["code"])
  if target is None:
    return [literal], []
  literal["classes"] += ["xref", "py", "py-obj"]
  node = addnodes.pending_xref(rawtext, refdomain="py", reftype="obj", reftarget=target,
                               refexplicit=False, refwarn=True)
  node += literal
  return [node], []


def resolve_private_path(app, env, node, contnode):
  """Links a private path of a public symbol (`sam_optax._src.cadences.Cadence` in a type
  hint, `engine.SharpnessAwareTransformation`) to the symbol's page."""
  global _PUBLIC
  if _PUBLIC is None:
    _PUBLIC = _public_names()
  target = node.get("reftarget", "")
  if node.get("refdomain") != "py" or target in _PUBLIC or "." not in target:
    return None
  if not (target.startswith("sam_optax._src.") or target.split(".")[0] in _PRIVATE_MODULES):
    return None
  short = target.rsplit(".", 1)[1]
  public = [full for full in set(_PUBLIC.values()) if full.rsplit(".", 1)[1] == short]
  if len(public) != 1:
    return None
  return env.domains["py"].resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                        public[0], node, contnode)


# The private modules' names as sam_optax's own modules import them (`engine.X` in a hint).
_PRIVATE_MODULES = {path.stem for path in (ROOT / "sam_optax" / "_src").glob("*.py")}


def clear_generated_pages(app):
  """Starts autosummary from an empty `api/_generated`: a page left over from a symbol since
  removed or renamed would otherwise stay, outside every toctree (a warning)."""
  shutil.rmtree(pathlib.Path(app.srcdir) / "api" / "_generated", ignore_errors=True)


def setup(app):
  # Before autosummary writes the pages (it also listens to builder-inited, at 500).
  app.connect("builder-inited", clear_generated_pages, priority=100)
  from docutils.parsers.rst import roles

  roles.register_local_role("code_or_reference", code_or_reference)
  # Before napoleon (priority 500) turns the sections into fields.
  app.connect("autodoc-process-docstring", prepare_docstring, priority=100)
  app.connect("missing-reference", resolve_private_path)
  app.connect("autodoc-process-signature", shorten_aliases)
  return {"parallel_read_safe": True, "parallel_write_safe": True}

