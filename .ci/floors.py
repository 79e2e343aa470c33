"""Prints pip constraints pinning every declared dependency to its floor.

Usage: `python .ci/floors.py [EXTRA ...] > constraints.txt`, then
`pip install -c constraints.txt -e ".[EXTRA]"`. Reads `[project] dependencies` and the named
`[project.optional-dependencies]` from pyproject.toml, so the pins never drift from what is
declared. Every requirement must carry a `>=` floor: one without fails here, since a floor
that is not declared cannot be tested.
"""

import pathlib
import re
import sys

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10
  import tomli as tomllib

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def floors(project: dict, extras: list[str]) -> dict[str, str]:
  """{name: floor version} over the core dependencies and the given extras."""
  requirements = list(project.get("dependencies", []))
  optional = project.get("optional-dependencies", {})
  for extra in extras:
    if extra not in optional:
      raise SystemExit(f"floors.py: no extra {extra!r} in pyproject.toml ({sorted(optional)})")
    requirements += optional[extra]
  pins = {}
  for requirement in requirements:
    match = _REQUIREMENT.match(requirement)
    if match is None:
      raise SystemExit(f"floors.py: cannot parse {requirement!r}")
    name, _, specifiers, marker = match.groups()
    if marker:
      raise SystemExit(f"floors.py: markers are not supported here: {requirement!r}")
    lower = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
    if len(lower) != 1:
      raise SystemExit(f"floors.py: {requirement!r} needs exactly one '>=' floor")
    key = re.sub(r"[-_.]+", "-", name).lower()
    if pins.setdefault(key, lower[0]) != lower[0]:
      raise SystemExit(f"floors.py: {name} has two floors, {pins[key]} and {lower[0]}: "
                       "declare the same one everywhere")
  return pins


def main(argv: list[str]) -> None:
  pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
  project = tomllib.loads(pyproject.read_text())["project"]
  for name, version in floors(project, argv).items():
    print(f"{name}=={version}")


if __name__ == "__main__":
  main(sys.argv[1:])
