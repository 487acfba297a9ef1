"""`tuneline report`: the verdict first (each eval delta, its interval and a word), then the params
diff, the other metrics folded, timings left out unless asked, the training curves as images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.pipeline_repo import env
from tests.tuned_project import ROOT
from tuneline.report import other_metrics, render, verdict_section, write_report


def evaluation(rouge_delta: float, verdict: str, loss_delta: float = -0.5) -> dict:
    def one(delta: float, low: float, high: float) -> dict:
        return {"delta": delta, "delta_ci95": {"low": low, "high": high}}

    rouge, loss = one(rouge_delta, rouge_delta - 0.05, rouge_delta + 0.05), one(loss_delta, -0.7, -0.3)
    return {"unseen": {"base": {"loss": 6.0, "rouge_l": 0.1}, "tuned": {"loss": 6.0 + loss_delta, "rouge_l": 0.1 + rouge_delta},
                       "delta": {"loss": loss_delta, "rouge_l": rouge_delta},
                       "delta_ci95": {"loss": loss["delta_ci95"], "rouge_l": rouge["delta_ci95"]},
                       "verdict": {"loss": "better", "rouge_l": verdict}, "records": 13}}


def test_the_verdict_names_each_delta_its_interval_its_word_and_what_it_was():
    section = verdict_section(evaluation(0.2, "better"), evaluation(0.01, "within noise"), "main")
    rows = {line.split("|")[2].strip(): line for line in section.splitlines() if line.startswith("| unseen")}
    assert rows["rouge_l"] == "| unseen | rouge_l | 0.1000 | 0.3000 | +0.2000 [+0.1500, +0.2500] | **better** | +0.0100 (within noise) |"
    assert rows["loss"].endswith("| **better** | same |")
    assert "LLM judge: off" in section
    judged = evaluation(0.2, "better")
    judged["unseen"]["judge"] = {"win": 0.5, "tie": 0.25, "loss": 0.25, "unparsed": 0.0, "pairs": 4,
                                 "position_consistency": 0.75, "net_win_ci95": {"low": -0.25, "high": 0.75}}
    assert ("LLM judge on unseen (4 pairs, each judged in both orders): the tuned model wins 50%, ties 25%, loses 25%, "
            "unparsed 0%; position consistency 75%; win - loss 95% interval [-0.25, +0.75].") in verdict_section(judged, None, "main")
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
    assert report.index("## Verdict") < report.index("VERDICT") < report.index("## Params changed") < report.index("<details>")
    assert report.index("<details>") < report.index("unseen.tuned.loss") < report.index("</details>")
    assert "![loss](report_plots/loss.png)" in report


def git(repo, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, env=env(), check=True, capture_output=True)


def test_after_a_param_change_the_report_opens_with_the_metric_that_changed_and_its_verdict(tmp_path):
    repo = tmp_path / "repo"
    curves = repo / "metrics" / "train" / "plots" / "metrics"
    curves.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text("plots:\n  - metrics/train/plots/metrics:\n      x: step\n", encoding="utf-8")
    (curves / "loss.tsv").write_text("step\tloss\n0\t3.0\n10\t2.0\n", encoding="utf-8")
    (curves / "train_runtime.tsv").write_text("step\ttrain_runtime\n10\t40.0\n", encoding="utf-8")
    (repo / "metrics" / "eval.json").write_text(json.dumps(evaluation(0.01, "within noise")), encoding="utf-8")
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, env=env(), check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "before")
    # the change: a higher learning rate, and what the pipeline measured after it
    text = (repo / "params.yaml").read_text(encoding="utf-8")
    (repo / "params.yaml").write_text(text.replace("learning_rate: 0.004", "learning_rate: 0.01"), encoding="utf-8")
    (repo / "metrics" / "eval.json").write_text(json.dumps(evaluation(-0.2, "worse")), encoding="utf-8")
    (curves / "loss.tsv").write_text("step\tloss\n0\t3.0\n10\t1.0\n", encoding="utf-8")

    report = write_report("HEAD", cwd=repo).read_text(encoding="utf-8")
    first = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "| unseen | rouge_l | 0.1000 | -0.1000 | -0.2000 [-0.2500, -0.1500] | **worse** | +0.0100 (within noise) |" in first
    params_section = report.split("## Params changed", 1)[1].split("\n## ", 1)[0]
    assert "train.learning_rate" in params_section and "0.01" in params_section
    assert "![loss](report_plots/loss.png)" in report
    assert (repo / "report_plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (repo / "report_plots" / "train_runtime.png").exists() and "train_runtime" not in report
