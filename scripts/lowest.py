"""Print pins of the lowest version each runtime dependency in pyproject.toml allows.

`make test-lowest` installs authgate with these as pip constraints, so the lower bounds in
pyproject.toml are the versions the suite really runs on, not a guess.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)$")


def lowest_pins(pyproject: Path) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for line in dependencies:
        match = _REQUIREMENT.match(line)
        if match is None:
            raise SystemExit(f"lowest.py: cannot read the requirement {line!r}")
        name, spec = match.groups()
        lower = [part[2:].strip() for part in spec.split(",") if part.strip().startswith(">=")]
        if len(lower) != 1:
            raise SystemExit(f"lowest.py: {name} needs exactly one lower bound (>=), got {spec!r}")
        pins.append(f"{name}=={lower[0]}")
    return pins


if __name__ == "__main__":
    sys.stdout.write("".join(pin + "\n" for pin in lowest_pins(ROOT / "pyproject.toml")))
