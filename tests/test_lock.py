"""requirements.lock against pyproject.toml: `make test` runs `tools/lock.py check` first, and it fails,
naming `make lock`, when a dependency is added or its range moves without relocking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(pyproject: Path, lock: Path = ROOT / "requirements.lock") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "lock.py"),
            "check",
            "--pyproject",
            str(pyproject),
            "--lock",
            str(lock),
        ],
        capture_output=True,
        text=True,
    )


def test_the_committed_lock_satisfies_pyproject():
    result = check(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stderr


def test_a_dependency_added_without_relocking_fails_naming_make_lock(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pyproject.write_text(
        text.replace('    "pyyaml>=6.0",\n', '    "pyyaml>=6.0",\n    "polars>=1.0",\n'), encoding="utf-8"
    )
    result = check(pyproject)
    assert result.returncode == 1
    assert "polars>=1.0 is in pyproject.toml but not in requirements.lock" in result.stderr
    assert "run `make lock`" in result.stderr


def test_a_lower_bound_above_the_locked_version_fails(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"pyyaml>=6.0"' in text
    pyproject.write_text(text.replace('"pyyaml>=6.0"', '"pyyaml>=99"'), encoding="utf-8")
    result = check(pyproject)
    assert (
        result.returncode == 1
        and "pyyaml>=99 is in pyproject.toml but requirements.lock pins pyyaml==" in result.stderr
    )


def test_every_pin_carries_a_hash_and_torch_is_left_to_the_makefile():
    lines = (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()
    pins = [i for i, line in enumerate(lines) if line and not line.startswith((" ", "#"))]
    assert len(pins) > 100
    assert all(lines[i].endswith("\\") and "--hash=sha256:" in lines[i + 1] for i in pins)
    names = {lines[i].split("==")[0].lower() for i in pins}
    assert "torch" not in names and not any(
        n.startswith(("nvidia-cu", "cuda-")) or n == "triton" for n in names
    )
