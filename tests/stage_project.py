"""A temporary project directory for running the tokenize and train stages on a tiny model.

It holds what those stages read: a copy of params.yaml (its `base` paths are relative, so they
point into the directory), Alpaca `train.json`/`val.json` and `models/selected.json` naming a
tiny local model. Stages run in it as DVC runs them (`python -m stages.<name>`, cwd = project).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "data" / "seeds" / "seeds.jsonl"


def seed_records() -> list[dict]:
    """The bundled seed records, in file order."""
    with open(SEEDS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_project(
    dest: Path, model_dir: Path, train_records: list[dict], val_records: list[dict], **sections: dict
) -> Path:
    """A project in `dest` training `model_dir` on `train`/`val`; `sections` override params keys,
    e.g. `train={"method": "qlora"}`."""
    dest.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name, values in sections.items():
        params[name].update(values)
    write_params(dest, params)
    alpaca = dest / params["base"]["alpaca_dir"]
    alpaca.mkdir(parents=True, exist_ok=True)
    for split, records in (("train", train_records), ("val", val_records)):
        (alpaca / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    selected = dest / params["base"]["selected"]
    selected.parent.mkdir(parents=True, exist_ok=True)
    chosen = json.dumps(
        {
            "name": "tiny",
            "kind": "local",
            "model": str(model_dir),
            "revision": None,
            "trust_remote_code": False,
        }
    )
    selected.write_text(chosen, encoding="utf-8")
    (dest / params["base"]["tuning_base"]).write_text(
        chosen, encoding="utf-8"
    )  # the pretrain stage, off, hands it on
    return dest


def read_params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def set_params(project: Path, section: str, **values) -> None:
    """Change keys of one params.yaml section, as `dvc exp run -S section.key=value` would."""
    params = read_params(project)
    params[section].update(values)
    write_params(project, params)


def stage_env(**extra: str) -> dict:
    """The environment a stage runs in: the project's code importable, offline."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def stage_command(name: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}"]


def run_stage(project: Path, name: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m stages.<name>` in `project`; fail with its output when it fails."""
    result = subprocess.run(
        stage_command(name), cwd=project, env=stage_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"stages.{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result
