"""`tuneline report`: the verdict first (each eval delta, its interval and a word), then the params
diff, the other metrics folded, timings left out unless asked, the training curves as images."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from tests.pipeline_repo import env
from tests.tuned_project import ROOT
from tuneline.common import params
from tuneline.interface.report import other_metrics, render, verdict_section, write_report


def evaluation(rouge_delta: float, verdict: str, loss_delta: float = -0.5) -> dict:
    def one(delta: float, low: float, high: float) -> dict:
        return {"delta": delta, "delta_ci95": {"low": low, "high": high}}

    rouge, loss = one(rouge_delta, rouge_delta - 0.05, rouge_delta + 0.05), one(loss_delta, -0.7, -0.3)
    return {
        "unseen": {
            "base": {"loss": 6.0, "rouge_l": 0.1},
            "tuned": {"loss": 6.0 + loss_delta, "rouge_l": 0.1 + rouge_delta},
            "delta": {"loss": loss_delta, "rouge_l": rouge_delta},
            "delta_ci95": {"loss": loss["delta_ci95"], "rouge_l": rouge["delta_ci95"]},
            "verdict": {"loss": "better", "rouge_l": verdict},
            "records": 13,
        }
    }


def test_the_verdict_names_each_delta_its_interval_its_word_and_what_it_was():
    section = verdict_section(evaluation(0.2, "better"), evaluation(0.01, "within noise"), "main")
    rows = {line.split("|")[2].strip(): line for line in section.splitlines() if line.startswith("| unseen")}
    assert (
        rows["rouge_l"]
        == "| unseen | rouge_l | 0.1000 | 0.3000 | +0.2000 [+0.1500, +0.2500] | **better** | +0.0100 (within "
        "noise) |"
    )
    assert rows["loss"].endswith("| **better** | same |")
    assert "LLM judge: off" in section
    judged = evaluation(0.2, "better")
    judged["unseen"]["judge"] = {
        "win": 0.5,
        "tie": 0.25,
        "loss": 0.25,
        "unparsed": 0.0,
        "pairs": 4,
        "position_consistency": 0.75,
        "net_win_ci95": {"low": -0.25, "high": 0.75},
    }
    assert (
        "LLM judge on unseen (4 pairs, each judged in both orders): the tuned model wins 50%, ties 25%, "
        "loses 25%, "
        "unparsed 0%; position consistency 75%; win - loss 95% interval [-0.25, +0.75]."
    ) in verdict_section(judged, None, "main")
    assert "| new |" in verdict_section(judged, None, "main")


METRICS_MD = """| Path | Metric | HEAD | workspace | Change |
|---|---|---|---|---|
| metrics/eval.json | unseen.tuned.loss | 5.8 | 5.9 | 0.1 |
| metrics/train/metrics.json | train_runtime | 40.1 | 42.0 | 1.9 |
| metrics/train/metrics.json | train_samples_per_second | 45.0 | 43.0 | -2.0 |
| metrics/augment.json | mean_latency_s | 0.5 | 0.6 | 0.1 |
"""


def test_timings_and_the_rows_the_verdict_shows_are_left_out_of_the_other_metrics_unless_asked():
    lines = METRICS_MD.splitlines()
    assert other_metrics(METRICS_MD, "metrics/eval.json").splitlines() == lines[:2]
    assert other_metrics(METRICS_MD, "metrics/other.json").splitlines() == lines[:3]
    assert other_metrics(METRICS_MD, "metrics/eval.json", timings=True).splitlines() == lines[:2] + lines[3:]


def test_the_verdict_comes_first_and_the_other_metrics_are_folded():
    others = other_metrics(METRICS_MD, "metrics/other.json")
    report = render("HEAD", "VERDICT", "PARAMS", others, ["report_plots/loss.png"])
    assert (
        report.index("## Verdict")
        < report.index("VERDICT")
        < report.index("## Params changed")
        < report.index("<details>")
    )
    assert report.index("<details>") < report.index("unseen.tuned.loss") < report.index("</details>")
    assert "![loss](report_plots/loss.png)" in report


def git(repo, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, env=env(), check=True, capture_output=True)


def test_after_a_param_change_the_report_opens_with_the_metric_that_changed_and_its_verdict(tmp_path):
    repo = tmp_path / "repo"
    curves = repo / "metrics" / "train" / "plots" / "metrics"
    curves.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(
        "plots:\n  - metrics/train/plots/metrics:\n      x: step\n", encoding="utf-8"
    )
    (curves / "loss.tsv").write_text("step\tloss\n0\t3.0\n10\t2.0\n", encoding="utf-8")
    (curves / "train_runtime.tsv").write_text("step\ttrain_runtime\n10\t40.0\n", encoding="utf-8")
    (curves / "epoch.tsv").write_text("step\tepoch\n0\t0\n10\t1\n", encoding="utf-8")  # no help: not drawn
    (repo / "metrics" / "eval.json").write_text(
        json.dumps(evaluation(0.01, "within noise")), encoding="utf-8"
    )
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, env=env(), check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "before")
    # the change: a higher learning rate, and what the pipeline measured after it
    text = (repo / "params.yaml").read_text(encoding="utf-8")
    (repo / "params.yaml").write_text(
        text.replace("learning_rate: 0.004", "learning_rate: 0.01"), encoding="utf-8"
    )
    (repo / "metrics" / "eval.json").write_text(json.dumps(evaluation(-0.2, "worse")), encoding="utf-8")
    (curves / "loss.tsv").write_text("step\tloss\n0\t3.0\n10\t1.0\n", encoding="utf-8")

    report = write_report("HEAD", cwd=repo).read_text(encoding="utf-8")
    first = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert (
        "| unseen | rouge_l | 0.1000 | -0.1000 | -0.2000 [-0.2500, -0.1500] | **worse** | +0.0100 (within "
        "noise) |" in first
    )
    params_section = report.split("## Params changed", 1)[1].split("\n## ", 1)[0]
    assert "train.learning_rate" in params_section and "0.01" in params_section
    assert "![loss](report_plots/loss.png)" in report
    assert (repo / "report_plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (repo / "report_plots" / "train_runtime.png").exists() and "train_runtime" not in report
    assert not (repo / "report_plots" / "epoch.png").exists() and "epoch.png" not in report


STAGE = """
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))["train"]
r = p["lora_r"] / 100
pathlib.Path("metrics/timings").mkdir(parents=True, exist_ok=True)
unseen = {"tuned": {"loss": 5 - r, "rouge_l": r}, "verdict": {"loss": "better", "rouge_l": "within noise"}}
seen = {"tuned": {"rouge_l": 2 * r}, "verdict": {"rouge_l": "better"}}
json.dump({"unseen": unseen, "seen": seen}, open("metrics/eval.json", "w"))
json.dump({"train_seconds": 12.5}, open("metrics/timings/train.json", "w"))
"""


def test_exps_shows_the_params_that_differ_and_the_headline_metrics_of_real_experiments(
    tmp_path, monkeypatch, capsys
):
    from tuneline.interface.cli import main

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "stage.py").write_text(STAGE, encoding="utf-8")
    (repo / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: python stage.py\n    deps: [stage.py]\n"
        "    params: [train.lora_r, train.epochs]\n"
        "    metrics:\n      - metrics/eval.json:\n          cache: false\n",
        encoding="utf-8",
    )
    git(repo, "init", "-q")
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["init", "-q"], ["repro", "-q"]):
        subprocess.run(dvc + args, cwd=repo, env=env(), check=True, capture_output=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    for name, change in (("rank16", "train.lora_r=16"), ("long", "train.epochs=5")):
        subprocess.run(
            dvc + ["exp", "run", "--temp", "-q", "-n", name, "-S", change],
            cwd=repo,
            env=env(),
            check=True,
            capture_output=True,
        )
    monkeypatch.chdir(repo)
    main(["exps"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "experiment",
        "train.epochs",
        "train.lora_r",
        "unseen",
        "loss",
        "unseen",
        "rouge_l",
        "seen",
        "rouge_l",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    raw = params.read_params_file("params.yaml")["train"]
    assert rows["rank16"][1:4] == [str(raw["epochs"]), "16", "4.8400"]
    assert rows["long"][1:3] == ["5", str(raw["lora_r"])]
    assert "0.1600 (within noise)" in lines[[line.split()[0] for line in lines].index("rank16")]
    assert "seconds" not in "\n".join(lines)  # timings stay out
    (repo / "metrics" / "timings" / "train.json").write_text('{"train_seconds": 20.0}', encoding="utf-8")
    assert "train_seconds" not in write_report("HEAD", cwd=repo).read_text(encoding="utf-8")
    report = write_report("HEAD", cwd=repo, timings=True).read_text(encoding="utf-8")
    assert re.search(r"\| metrics/timings/train.json \| train_seconds \| 12.5 +\| 20.0 ", report)
    assert report.count("| Path") == 1  # the timings table; the empty diff of the other metrics is left out
    assert "No tuned-vs-base deltas in eval.json." in report


def records(losses: list[float], rouges: list[float]) -> str:
    return "".join(
        json.dumps({"id": f"r{i}", "index": i, "tuned_loss": loss, "tuned_rouge_l": rouge}) + "\n"
        for i, (loss, rouge) in enumerate(zip(losses, rouges))
    )


def test_the_summary_pairs_the_tuned_model_at_the_revision_with_the_tuned_model_now(tmp_path):
    from tuneline.interface.report import summary_lines

    repo = tmp_path / "repo"
    (repo / "metrics" / "eval").mkdir(parents=True)
    ev = repo / "metrics" / "eval"
    (ev / "records.jsonl").write_text(
        records([5.0, 5.2, 4.8, 5.1] * 4, [0.30, 0.35, 0.25, 0.32] * 4), encoding="utf-8"
    )
    (ev / "seen_records.jsonl").write_text(records([2.0] * 8, [0.66] * 8), encoding="utf-8")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "before")
    # now: rouge_l falls on every test record, the loss does not move beyond noise; seen is unchanged
    (ev / "records.jsonl").write_text(
        records([5.1, 5.1, 4.8, 5.1] * 4, [0.10, 0.12, 0.08, 0.11] * 4), encoding="utf-8"
    )
    lines = summary_lines("metrics", "HEAD", 42, cwd=repo)
    assert len(lines) == 3
    loss, rouge, seen = lines
    assert rouge.startswith("- **unseen rouge_l**: tuned at `HEAD` 0.3050 -> tuned now 0.1025, -0.2025 [")
    assert rouge.endswith("over the same 16 records: **worse**")
    assert loss.startswith(
        "- **unseen loss** (mean over records): tuned at `HEAD` 5.0250 -> tuned now 5.0250"
    )
    assert loss.endswith("**within noise**")
    assert seen.endswith("+0.0000 [+0.0000, +0.0000] over the same 8 records: **within noise**")
    (ev / "seen_records.jsonl").unlink()
    assert summary_lines("metrics", "HEAD", 42, cwd=repo)[2] == (
        "- **seen rouge_l**: no per-record scores to pair (in the workspace: run `dvc repro`)"
    )


def test_a_report_section_with_nothing_in_it_is_one_line_not_an_empty_table():
    empty_params = (
        "| Path   | Param   | HEAD   | workspace   |\n|--------|---------|--------|-------------|\n"
    )
    empty_metrics = "| Path   | Metric   | HEAD   | workspace   | Change   |\n|---|---|---|---|---|\n"
    report = render("HEAD", "VERDICT", empty_params, empty_metrics, [], summary=["- **unseen loss**: ..."])
    assert "No params changed." in report and "No other metrics changed." in report
    assert "| Path" not in report and "<details>" not in report
    assert report.index("- **unseen loss**") < report.index("## Verdict")
