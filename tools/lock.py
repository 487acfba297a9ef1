"""The locked environment: `requirements.lock` holds every package `make run` and `make test` install,
with its exact version and hashes; torch and the CUDA libraries only torch needs are the one exception.

torch is installed by pip from the Makefile's TORCH pin (`torch==2.13.0`: the CPU build on this kind of
machine; `make TORCH=torch` takes PyPI's CUDA build on a GPU machine), because its CPU and CUDA builds
are different files with different hashes and different dependencies. The lock is resolved against
that pin, so what it pins fits the torch the tests ran with; torch's own pure-Python dependencies
(filelock, sympy, jinja2, ...) are in the lock.

    python tools/lock.py compile [--upgrade]   # make lock: re-resolve and rewrite requirements.lock
    python tools/lock.py check                 # make test runs it: pyproject.toml and the lock agree
    python tools/lock.py keep OUT              # what a sync must keep besides the lock (torch, uv, pip,
    tuneline)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
TORCH_PIN = "torch==2.13.0"  # the Makefile's TORCH default; the lock is resolved against it
LOCAL_WHEELS = Path("/opt/wheels")  # where this kind of machine keeps the CPU build of torch


def project_requirements(pyproject: Path) -> list[Requirement]:
    """Every requirement pyproject.toml declares: dependencies and all optional extras."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def locked_versions(lock: Path) -> dict[str, Version]:
    """{canonical name: pinned version} of a `name==version` requirements file."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = Version(match.group(3))
    return pins


def disagreements(pyproject: Path, lock: Path) -> list[str]:
    """What in pyproject.toml the lock does not satisfy: a requirement missing from it, or pinned
    outside the requirement's range. torch is checked against TORCH_PIN, which the lock was resolved for."""
    if not lock.exists():
        return [f"{lock.name} does not exist"]
    pins = locked_versions(lock)
    pins[canonicalize_name("torch")] = Version(TORCH_PIN.split("==")[1])
    problems = []
    for req in project_requirements(pyproject):
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is in {pyproject.name} but not in {lock.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} is in {pyproject.name} but {lock.name} pins {req.name}=={pins[name]}")
    return problems


def compile_lock(upgrade: bool) -> None:
    """Resolve pyproject.toml (all extras) against TORCH_PIN for CPython 3.11 on x86-64 Linux, with hashes."""
    constraints = ROOT / "build" / "torch-constraint.txt"
    constraints.parent.mkdir(exist_ok=True)
    constraints.write_text(TORCH_PIN + "\n", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "uv",
        "pip",
        "compile",
        "pyproject.toml",
        "--all-extras",
        "--generate-hashes",
        "--python-version",
        "3.11",
        "--python-platform",
        "x86_64-manylinux_2_28",
        "--no-emit-package",
        "torch",
        "-c",
        str(constraints.relative_to(ROOT)),
        "--custom-compile-command",
        "make lock",
        "-o",
        LOCK.name,
        "-q",
    ]
    if LOCAL_WHEELS.is_dir():  # resolve against the CPU build's metadata, which needs no CUDA libraries
        command += ["--find-links", str(LOCAL_WHEELS)]
    if upgrade:
        command.append("--upgrade")
    subprocess.run(command, cwd=ROOT, check=True)
    cuda = [
        name for name in locked_versions(LOCK) if name.startswith(("nvidia-cu", "cuda-")) or name == "triton"
    ]
    if cuda:
        raise SystemExit(
            f"{LOCK.name} resolved torch's CUDA build ({', '.join(cuda)}): keep {LOCAL_WHEELS} "
            f"with the CPU wheel of {TORCH_PIN}, or pass --find-links to it"
        )


def requirement_closure(roots: list[str]) -> dict[str, str]:
    """{name: installed version} of `roots` and everything they require, as installed in this environment."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def write_keep(out: Path) -> None:
    """The requirements a sync keeps beside the lock: the installed torch (whichever build) and what only
    it needs, uv and pip, and tuneline itself (editable)."""
    locked = locked_versions(LOCK)
    keep = {
        name: version
        for name, version in requirement_closure(["torch", "uv", "pip"]).items()
        if name not in locked
    }
    lines = [f"{name}=={version}" for name, version in sorted(keep.items())] + [f"-e {ROOT}"]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("compile").add_argument("--upgrade", action="store_true")
    check = sub.add_parser("check")
    check.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    check.add_argument("--lock", type=Path, default=LOCK)
    sub.add_parser("keep").add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "compile":
        compile_lock(args.upgrade)
    elif args.command == "check":
        problems = disagreements(args.pyproject, args.lock)
        if problems:
            print("\n".join(f"lock check: {p}" for p in problems), file=sys.stderr)
            print(
                "lock check: run `make lock` and commit requirements.lock (a commit of its own, "
                "with `make test` run on it)",
                file=sys.stderr,
            )
            raise SystemExit(1)
        print(f"lock check: {args.lock.name} satisfies {args.pyproject.name}")
    else:
        write_keep(args.out)


if __name__ == "__main__":
    main()
