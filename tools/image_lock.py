"""Write requirements.lock, the image's pinned Python dependencies, from the current environment.

    .venv/bin/python tools/image_lock.py > requirements.lock

The dependency closure of pyproject.toml's `dependencies` for CPython 3.11 on linux/x86_64, at the
versions installed here (where the tests pass), without torch, triton and the nvidia-* wheels (the
CUDA base image brings them). xgrammar's own requirements are not followed (the Makefile installs it
with --no-deps: it names torch and triton); apache-tvm-ffi is the one it needs.
"""
from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

FROM_BASE_IMAGE = {"torch", "triton"}
NO_DEPS = {"xgrammar"}
EXTRA = ("apache-tvm-ffi",)
TARGET = {"python_version": "3.11", "python_full_version": "3.11.0", "platform_system": "Linux",
          "sys_platform": "linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "os_name": "posix", "platform_python_implementation": "CPython", "extra": ""}
HEADER = Path(__file__).with_name("image_lock_header.txt")


def closure(requirements: list[str]) -> dict[str, str]:
    pinned: dict[str, str] = {}
    todo = [(Requirement(r), ()) for r in requirements]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in FROM_BASE_IMAGE or name in pinned or name.startswith("nvidia-"):
            continue
        if req.marker and not any(req.marker.evaluate({**TARGET, "extra": e}) for e in ("", *extras)):
            continue
        dist = metadata.distribution(req.name)
        pinned[name] = dist.version
        if name not in NO_DEPS:
            todo += [(Requirement(r), tuple(req.extras)) for r in dist.requires or []]
    return pinned


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = closure([*deps, *EXTRA])
    sys.stdout.write(HEADER.read_text())
    sys.stdout.writelines(f"{name}=={version}\n" for name, version in sorted(pinned.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
