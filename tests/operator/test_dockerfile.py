"""The Dockerfile, .dockerignore and requirements.lock, checked by reading them (no Docker here):
a C compiler for Triton, dependencies pinned and installed before the source is copied, and
nothing the build copies ignored."""
from __future__ import annotations

import fnmatch
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.operator.helpers import ROOT


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)==([^\s;]+)", line.strip())
            assert m, f"not pinned with ==: {line!r}"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_parser():
    text = "# c\nFROM a\nRUN x \\\n && y\n\nCOPY b c\n"
    assert instructions(text) == [("FROM", "a"), ("RUN", "x && y"), ("COPY", "b c")]


def test_a_c_compiler_for_triton(dockerfile):
    base = next(v for k, v in dockerfile if k == "ARG" and v.startswith("BASE_IMAGE="))
    runs = " ".join(v for k, v in dockerfile if k == "RUN")
    installs_compiler = re.search(r"apt-get install[^&]*\b(gcc|build-essential|clang)\b", runs)
    assert "-devel" in base or installs_compiler, "Triton needs `cc` at the first kernel launch"
    assert "cc --version" in runs and "Python.h" in runs   # checked at build time


def test_dependencies_are_installed_from_the_lock_before_the_source(dockerfile):
    copies = [(i, v) for i, (k, v) in enumerate(dockerfile) if k == "COPY"]
    runs = [(i, v) for i, (k, v) in enumerate(dockerfile) if k == "RUN"]
    lock_copy = next(i for i, v in copies if "requirements.lock" in v.split()[:-1])
    source_copy = next(i for i, v in copies if v.split()[0] == "kubeinfer")
    lock_install = next(i for i, v in runs if "-r requirements.lock" in v)
    assert lock_copy < lock_install < source_copy
    # the project goes in on top without resolving anything again
    project_install = next(v for i, v in runs if i > source_copy and "pip install" in v)
    assert "--no-deps" in project_install
    assert all("pip install ." not in v for i, v in runs if i < source_copy)


def test_the_lock_pins_every_runtime_dependency_but_torch(lock):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = canonicalize_name(Requirement(dep).name)
        if name in ("torch", "triton"):
            assert name not in lock, f"{name} comes from the CUDA base image, not the lock"
        else:
            assert name in lock, f"{name} (pyproject.toml) is not pinned in requirements.lock"
    assert not [n for n in lock if n.startswith("nvidia-")]
    for name, version in lock.items():
        assert Requirement(f"{name}=={version}").specifier, name


def test_dockerignore_keeps_what_the_build_copies_and_drops_wheels(dockerfile):
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert ".whl" not in patterns and "*.whl" in patterns   # ".whl" matches a file named .whl only

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p)
                   or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    copied = [v.split()[:-1] for k, v in dockerfile if k == "COPY"]
    for sources in copied:
        for src in sources:
            assert (ROOT / src).exists(), src
            assert not ignored(src), f"{src} is copied by the Dockerfile but excluded by .dockerignore"
    assert ignored("dist/kubeinfer-0.1.0-py3-none-any.whl") and ignored("tests") and ignored(".venv")
