"""The locks in requirements/ (what `make` installs, compiled by `make lock`) agree with what they
are compiled from, and the running venv holds exactly its lock."""

from __future__ import annotations

import importlib.metadata
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"


def pins(lock: Path) -> dict[str, str]:
    """name -> version of every `name==version` line."""
    pinned = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            name, version = line.split(";")[0].strip().split("==")
            pinned[canonicalize_name(name)] = version
    return pinned


def requirements_in(path: Path) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def project_requirements(extra: str) -> list[Requirement]:
    """pyproject's dependencies plus `extra`'s, with the extras it names of the project itself."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted, seen, found = [extra], set(), [Requirement(r) for r in project["dependencies"]]
    while wanted:
        name = wanted.pop()
        seen.add(name)
        for req in map(Requirement, project["optional-dependencies"][name]):
            if req.name == project["name"]:
                wanted += [e for e in req.extras if e not in seen]
            else:
                found.append(req)
    return found


def check_satisfied(requirements: list[Requirement], lock: Path) -> None:
    pinned = pins(lock)
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{lock.name} lacks {req}: run `make lock`"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{lock.name} pins {name}=={pinned[name]}, outside {req}: run `make lock`"
        )


@pytest.mark.parametrize("lock", ["cpu.txt", "cuda.txt"])
def test_each_project_lock_satisfies_pyproject(lock: str):
    check_satisfied(project_requirements("dev"), REQUIREMENTS / lock)


def test_the_locks_hold_the_torch_of_torch_in():
    (torch,) = requirements_in(REQUIREMENTS / "torch.in")
    for lock, build in (("cpu.txt", "+cpu"), ("cuda.txt", "")):
        version = pins(REQUIREMENTS / lock)["torch"]
        assert torch.specifier.contains(version) and version.endswith(build), (lock, version)


def test_the_fastchat_lock_satisfies_its_input():
    check_satisfied(requirements_in(REQUIREMENTS / "fastchat.in"), REQUIREMENTS / "fastchat.txt")


@pytest.mark.skipif(
    Path(sys.prefix) != ROOT / ".venv", reason="runs in the venv `make` installs from the lock"
)
def test_the_venv_holds_exactly_its_lock():
    import torch

    lock = REQUIREMENTS / ("cuda.txt" if torch.version.cuda else "cpu.txt")
    site = [sysconfig.get_path("purelib")]  # not what setuptools adds (its vendored packages)
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions(path=site)
    }
    assert installed.pop("pagedserve")
    assert installed == pins(lock)
