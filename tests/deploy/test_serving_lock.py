"""The serving lock (deploy/requirements-serving.txt) is what the Docker image installs with pip's
resolver off for the wheel, so it must be complete and match pyproject; and `make test` installs
with it as constraints, so the tests run on exactly the versions the image ships."""

from __future__ import annotations

import importlib.metadata as md
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "deploy" / "requirements-serving.txt"


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and name and version and ";" not in line, f"not a plain pin: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def project_requirements() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in pyproject["project"]["dependencies"]]


def test_the_lock_pins_every_serving_dependency_within_its_range() -> None:
    pins = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} in the lock is outside pyproject's {req.specifier}: run `make lock`"


def test_the_lock_has_no_torch_and_no_cuda_wheels() -> None:
    heavy = [n for n in locked() if n in {"torch", "torchvision", "triton"} or n.startswith("nvidia-")]
    assert heavy == []


def test_the_lock_is_closed_under_its_packages_requirements() -> None:
    """The image installs the lock, then the wheel with --no-deps: a requirement missing from the lock
    would be missing in the image (pip check there would fail the build). Walked through installed
    metadata, with extras (uvicorn[standard]) followed."""
    pins = locked()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in project_requirements()]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for raw in md.distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name} needs {raw!r}, which the lock does not pin: run `make lock`"
            assert req.specifier.contains(pins[dep], prereleases=True), f"{name} needs {raw!r}; lock has {pins[dep]}"
            todo.append((dep, frozenset(req.extras)))


def test_the_tests_run_on_the_locked_versions() -> None:
    """`make test` installs with the lock as a constraints file; an environment built otherwise (or a lock
    edited without reinstalling) would test other versions than the image ships."""
    differ = {}
    for name, version in locked().items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            differ[name] = (version, None)
            continue
        if installed != version:
            differ[name] = (version, installed)
    assert differ == {}, f"locked vs installed: {differ}; run `make test` (it reinstalls with the lock)"
