"""A temporary git + DVC repository copy of the project, for end-to-end pipeline tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
RAN = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs")

GIT_ENV = {
    "GIT_AUTHOR_NAME": "tuneline-test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "tuneline-test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
}


def project_files() -> list[str]:
    """The files of the project as a clone would have them: tracked, plus untracked not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).exists()]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    e.update(GIT_ENV)
    e.update(
        PATH=f"{VENV_BIN}:{e.get('PATH', '/usr/bin:/bin')}",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return e


def run(
    repo: Path, *cmd: str, check: bool = True, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=repo, env={**env(), **(extra_env or {})}, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def make_repo(dest: Path) -> Path:
    """Copy the project into `dest` and commit it to a fresh git repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in project_files():
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)
    run(dest, "git", "init", "-q", "-b", "main")
    if not (dest / ".dvc").exists():
        run(dest, "dvc", "init", "-q")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "tuneline test copy")
    return dest


def repro(repo: Path, *args: str, extra_env: dict | None = None) -> dict[str, set[str]]:
    """Run `dvc repro`; return the stages that ran, were skipped, or were restored from the run cache."""
    out = run(repo, "dvc", "repro", *args, extra_env=extra_env)
    text = out.stdout + out.stderr
    return {
        "ran": set(RAN.findall(text)),
        "skipped": set(SKIPPED.findall(text)),
        "restored": set(RESTORED.findall(text)),
    }


def declared_params(repo: Path) -> dict[str, set[str]]:
    """The params keys each stage of the resolved pipeline declares (`dvc.yaml` after templating)."""
    from dvc.repo import Repo

    declared = {}
    with Repo(str(repo)) as dvc_repo:
        for stage in dvc_repo.index.stages:
            keys = set()
            for dep in stage.deps:
                if dep.def_path.endswith("params.yaml") and hasattr(dep, "params"):
                    keys |= set(dep.params)
            declared[stage.name] = keys
    return declared


def set_param(repo: Path, dotted: str, value) -> None:
    """Change one key of params.yaml in place, keeping the file's comments."""
    import ruamel.yaml

    yaml = ruamel.yaml.YAML()
    path = repo / "params.yaml"
    data = yaml.load(path.read_text())
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    with open(path, "w") as f:
        yaml.dump(data, f)


def build_pipeline(dest: Path) -> dict:
    """The `pipeline` fixture's repository: a project copy in `dest`/project after one full `dvc repro`.

    Each stage records the params keys it read in `dest`/params_reads.jsonl. Returns which stages
    ran, were skipped or restored (lists), also written to `dest`/first.json last, as the sign that
    the build is complete."""
    import json

    repo = make_repo(dest / "project")
    audit = {"TUNELINE_PARAMS_AUDIT": str(dest / "params_reads.jsonl")}
    first = repro(repo, extra_env=audit)
    # A stage whose outputs git already holds (choose's: models/selected.json, its table) is skipped
    # when its deps came out as main's dvc.lock records them. Run it once more so the audit has its reads.
    for stage in sorted(first["skipped"]):
        repro(repo, "--force", "--single-item", stage, extra_env=audit)
    first = {key: sorted(stages) for key, stages in first.items()}
    (dest / "first.json.tmp").write_text(json.dumps(first))
    (dest / "first.json.tmp").rename(dest / "first.json")  # whole or absent: another process waits for it
    return first


if __name__ == "__main__":  # python -m tests.pipeline_repo DEST: build the pipeline repository in DEST
    build_pipeline(Path(sys.argv[1]))


def with_downstream(repo: Path, stages: set[str]) -> set[str]:
    """`stages` and every stage that depends on one of them, directly or through others (DVC's DAG)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # an edge runs from a stage to a stage it depends on
        affected = set()
        for stage in reversed(list(nx.topological_sort(graph))):  # dependencies before their dependents
            if stage.name in stages or any(dep in affected for dep in graph.successors(stage)):
                affected.add(stage)
        return {stage.name for stage in affected}  # not `addressing`: that holds dvc.yaml's path from here
