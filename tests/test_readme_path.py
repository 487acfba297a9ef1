"""The README's path, walked as written: `make run`, your own data and model, an experiment,
`tuneline exps` and `tuneline report`. The commands and the params example are read from README.md
itself, so this test breaks when the README drifts. Only what needs the network is pointed at
loopback: the generating LLM at a scripted OpenAI-compatible server, the hub model at a stand-in of
its family saved to disk (tuneline.model.zoo)."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import seed_texts
from tests.openai_stub import ScriptedServer
from tests.pipeline_repo import ROOT, repro, run
from tests.stage_project import seed_records
from tests.test_augment import respond
from tuneline.common.records import read_jsonl_dir

pytestmark = pytest.mark.slow

README = (ROOT / "README.md").read_text(encoding="utf-8")
KEY = "sk-tuneline-readme-path-test"
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
VERDICT = r"\*\*(better|worse|within noise)\*\*"


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def fenced(text: str, lang: str) -> list[str]:
    """The fenced blocks of `text` whose info string is `lang` ("" for a plain block)."""
    return [body for info, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if info == lang]


def commands(text: str, prefix: str) -> list[str]:
    """The inline commands of `text` that start with `prefix`, as written between backticks."""
    return re.findall(rf"`({re.escape(prefix)}[^`]*)`", text)


def make_run_recipe() -> list[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return re.search(r"^run: .*\n((?:\t.*\n)+)", makefile, re.M).group(1).splitlines()


def with_readme_example(params: dict, example: dict) -> dict:
    """params.yaml edited as the README says: each `section: {key: value}` of the example replaces that
    key."""
    for name, keys in example.items():
        params[name].update(keys)
    return params


def write_own_data(repo: Path, params: dict) -> int:
    """A small seeds file and dataset where the example puts them, in the example's format and columns."""
    seeds = seed_records()[:16]
    (repo / params["base"]["seeds"]).write_text(
        "".join(json.dumps(r) + "\n" for r in seeds), encoding="utf-8"
    )
    (dataset,) = params["crawl"]["datasets"]
    columns = dataset["columns"]
    with open(ROOT / "data/datasets/faq.csv", encoding="utf-8") as f:
        rows = [
            {columns["instruction"]: row["question"], columns["output"]: row["answer"]}
            for row in csv.DictReader(f)
        ]
    assert dataset["format"] == "jsonl"
    (repo / dataset["path"]).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def test_the_readme_path_from_make_run_to_the_report(pipeline_build, tmp_path):
    # 1. `make run`: `dvc repro` (the pipeline build ran it), then the verdict table the README shows
    quick = section("Install and the two commands")
    assert fenced(quick, "bash")[0].startswith("make run")
    recipe = make_run_recipe()
    assert recipe[-2].strip() == "dvc repro" and recipe[-1].strip().endswith("tuneline verdict"), recipe
    repo = tmp_path / "project"
    shutil.copytree(pipeline_build / "project", repo, symlinks=True)
    verdict = run(repo, "tuneline", "verdict").stdout.splitlines()
    shown = fenced(quick, "")[0].splitlines()
    assert verdict[0].split() == shown[0].split()
    assert any(
        re.match(r"seen\s+rouge_l\s+[\d.]+\s+[\d.]+\s+[+-][\d.]+ \[.*\]\s+(better|worse|within noise)$", line)
        for line in verdict
    ), verdict

    # 2. your own data and model: the example as written, but for the two hosts it names
    own = section("Your own data and model")
    example = yaml.safe_load(fenced(own, "yaml")[0])
    params = with_readme_example(yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8")), example)
    ((name, candidate),) = params["select"]["candidates"].items()
    assert candidate["model"] == HUB_ID and params["augment"]["base_url"] == "https://api.openai.com/v1"
    candidate["model"] = str(hub_standin(tmp_path / HUB_ID))
    # Two defaults the example leaves alone, shortened: the path is under test, not what 70 epochs learn
    # (about 2 of the 6 minutes this test took with them on 2 cores)
    params["train"]["epochs"] = 10
    params["evaluate"]["judge"]["enabled"] = False  # its `transformers serve` start, in each of the two runs
    records = write_own_data(repo, params)
    with ScriptedServer(respond=respond) as llm:
        params["augment"]["base_url"] = llm.base_url
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        key = {params["augment"]["api_key_env"]: KEY}
        assert "is fine" in run(repo, "tuneline", "check").stdout
        ran = repro(repo, extra_env=key)["ran"]
        assert {"crawl", "augment", "clean", "build", f"select@{name}", "train", "evaluate"} <= ran
        assert llm.requests > 0
    (dataset,) = params["crawl"]["datasets"]
    assert [r["source"] for r in read_jsonl_dir(repo / "data/raw/datasets")] == [
        f"dataset:{dataset['name']}"
    ] * records
    selected = json.loads((repo / "models/selected.json").read_text())
    assert selected["name"] == name and selected["model"] == candidate["model"]
    committing = commands(own, "git ")
    assert committing, "the README says to commit the own-data run before experiments"
    for command in committing:
        for part in command.split(" && "):
            run(repo, *shlex.split(part))

    # 3. the experiment, exactly as the README writes it
    (experiment,) = commands(own, "dvc exp run")
    changed, value = re.search(r"-S (\S+)=(\S+)", experiment).groups()
    run(repo, *shlex.split(experiment))

    # 4. `tuneline exps`: the changed param and the headline metrics
    table = run(repo, "tuneline", "exps").stdout.splitlines()
    header = table[0]
    assert changed in header.split() and "unseen loss" in header and "seen rouge_l" in header, table
    column = header.index(changed)  # an aligned table: a value starts where its column's name does
    exp_rows = [row for row in table[1:] if row[column:].split()[:1] == [value]]
    assert len(exp_rows) == 1 and exp_rows[0].split()[0] not in ("workspace", "main"), table
    exp_name = exp_rows[0].split()[0]

    # 5. keep it, and `tuneline report` says whether it helped
    for command in commands(own, "dvc exp apply") + commands(own, "tuneline report"):
        run(repo, *shlex.split(command.replace("<name>", exp_name)))
    report = (repo / "report.md").read_text(encoding="utf-8")
    summary = report.split("## Verdict", 1)[0]
    assert re.search(
        rf"- \*\*unseen loss\*\* \(mean over records\): tuned at `HEAD` [\d.]+ -> tuned now [\d.]+, "
        rf"[+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] over the same \d+ records: {VERDICT}",
        summary,
    ), summary
    assert re.search(rf"- \*\*unseen rouge_l\*\*: .* over the same \d+ records: {VERDICT}", summary), summary
    params_diff = report.split("## Params changed", 1)[1].split("\n## ", 1)[0]
    assert changed in params_diff and value in params_diff, report


def hub_standin(out_dir: Path) -> Path:
    """The hub model's stand-in: its family's tokens, template and EOS, tiny random weights, on disk."""
    from tuneline.model.zoo import save_standin

    return save_standin("qwen2.5-instruct", seed_texts(), out_dir)
