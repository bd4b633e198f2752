"""Dependencies: the uvicorn internals authgate uses, the ranges, the constraints, and the
package a user installs (`python -m build`, then a fresh venv without the test tools)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
from scripts.lowest import lowest_pins

from authgate import __version__, _uvicorn
from tests.conftest import free_port, run_cli, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_installed_uvicorn_has_the_internals_authgate_uses() -> None:
    """The uvicorn installed offers the signatures `fasthttp` and `server` build on; when a
    release changes them this fails, and `serve` refuses to start, with the reason."""
    assert _uvicorn.describe_problems() is None, _uvicorn.describe_problems()


def test_uvicorn_internals_are_imported_in_one_module_only() -> None:
    """Only src/authgate/_uvicorn.py (and no test) imports uvicorn's modules."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
        if path.name != "_uvicorn.py"
        and re.search(r"^\s*(from uvicorn[.\s]|import uvicorn)", path.read_text(), re.M)
    ]
    assert offenders == []


def test_every_runtime_dependency_has_a_lower_and_an_upper_bound() -> None:
    """Each runtime range is closed: `>=` the version `make test-lowest` runs, `<` a bound."""
    pins = lowest_pins(ROOT / "pyproject.toml")
    assert len(pins) == len(PYPROJECT["project"]["dependencies"])
    for line in PYPROJECT["project"]["dependencies"]:
        assert ">=" in line and "<" in line.replace("<=", ""), line


def test_constraints_pin_every_runtime_dependency_inside_its_range() -> None:
    """constraints.txt (what the Dockerfile and make install) pins each runtime dependency
    to a version its range allows."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        version = pins[req.name.lower().replace("_", "-")]
        assert req.specifier.contains(version), (line, version)


def test_ci_runs_check_test_and_the_lowest_versions() -> None:
    """CI calls make check, make test and make test-lowest."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(f"make {t}\n" in ci for t in ("check", "test", "test-lowest"))


def test_version_is_written_once() -> None:
    """The version lives in src/authgate/__init__.py; pyproject reads it from there."""
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "authgate.__version__"
    assert run_cli({}, "--version").stdout.strip() == f"authgate {__version__}"
    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_built_wheel_installs_and_serves_in_a_fresh_venv(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """`python -m build` makes a wheel and an sdist; the wheel installs into a fresh venv
    without the test extra, `authgate --version` prints the version and `authgate serve`
    answers /auth against a real Valkey."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob(f"authgate-{__version__}-*.whl")
    assert list(dist.glob(f"authgate-{__version__}.tar.gz"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format=json"], capture_output=True, text=True
    )
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "uvicorn" in names and "pytest" not in names and "mypy" not in names
    exe = str(venv / "bin" / "authgate")
    env = {k: v for k, v in cli_env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env)
    assert version.stdout.strip() == f"authgate {__version__}"
    port, metrics = free_port(), free_port()
    env.update(AUTHGATE_LISTEN=f"127.0.0.1:{port}", AUTHGATE_METRICS_LISTEN=f"127.0.0.1:{metrics}")
    proc = subprocess.Popen([exe, "serve"], env=env, cwd=tmp_path)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", proc=proc)
        r = httpx.get(f"http://127.0.0.1:{port}/auth", headers={"X-Original-URI": "/x"})
        assert r.status_code == 401 and r.headers["x-authgate-status"] == "401"
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
