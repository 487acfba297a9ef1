"""lm-evaluation-harness in the evaluate stage: the shipped local task over the test split, run on the
base and the tuned tiny model, lands in eval.json; lm_eval's results are read and compared as
declared; naming tasks without lm_eval installed fails at start-up naming the extra."""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml

from tests.tuned_project import ROOT
from tuneline.common import params
from tuneline.common.params import ParamsError
from tuneline.common.records import read_json
from tuneline.eval.lmeval import compare, task_scores
from tuneline.interface.report import verdict_section


def test_task_scores_keep_the_requested_tasks_metrics_with_their_standard_errors():
    results = {
        "results": {
            "tuneline_test": {
                "alias": "tuneline_test",
                "acc,none": 0.25,
                "acc_stderr,none": 0.1,
                "perplexity,none": 30.0,
                "perplexity_stderr,none": "N/A",
            },
            "mmlu_anatomy": {"acc,none": 0.3, "acc_stderr,none": 0.04},
            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01},
        },
        "groups": {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.01}},
        "n-samples": {
            "tuneline_test": {"original": 16, "effective": 16},
            "gsm8k": {"original": 1319, "effective": 100},
        },
        "higher_is_better": {
            "tuneline_test": {"acc": True, "perplexity": False},
            "mmlu": {"acc": True},
            "gsm8k": {"exact_match": True},
        },
    }
    scores = task_scores(results, ["tuneline_test", "mmlu", "gsm8k"])
    assert scores == {
        "tuneline_test/acc": {"value": 0.25, "stderr": 0.1, "higher_is_better": True, "documents": 16},
        "tuneline_test/perplexity": {
            "value": 30.0,
            "stderr": None,
            "higher_is_better": False,
            "documents": 16,
        },
        # the group, not its subtasks
        "mmlu/acc": {"value": 0.4, "stderr": 0.01, "higher_is_better": True, "documents": None},
        "gsm8k/exact_match,strict-match": {
            "value": 0.1,
            "stderr": 0.01,
            "higher_is_better": True,
            "documents": 100,
        },
    }
    with pytest.raises(ParamsError, match=r"no results for 'hellaswag'"):
        task_scores(results, ["hellaswag"])


def test_compare_gives_each_delta_an_interval_from_both_standard_errors_and_a_verdict():
    def s(value, stderr, higher=True):
        return {"value": value, "stderr": stderr, "higher_is_better": higher}

    base = {
        "t/acc": s(0.5, 0.03),
        "t/perplexity": s(20.0, 1.0, False),
        "t/ppl_drop": s(20.0, 0.1, False),
        "t/x": s(1.0, None),
    }
    tuned = {
        "t/acc": s(0.6, 0.04),
        "t/perplexity": s(19.0, 1.0, False),
        "t/ppl_drop": s(25.0, 0.1, False),
        "t/x": s(2.0, 0.1),
    }
    out = compare(base, tuned)
    assert out["delta"] == {"t/acc": 0.1, "t/perplexity": -1.0, "t/ppl_drop": 5.0, "t/x": 1.0}
    # 0.1 +/- 1.96 * sqrt(0.03^2 + 0.04^2) = 0.1 +/- 0.098
    assert out["delta_ci95"]["t/acc"] == {
        "low": pytest.approx(0.002, abs=1e-4),
        "high": pytest.approx(0.198, abs=1e-4),
    }
    assert out["verdict"] == {"t/acc": "better", "t/perplexity": "within noise", "t/ppl_drop": "worse"}
    assert "t/x" not in out["delta_ci95"]  # the base score has no standard error
    assert out["stderr"]["tuned"]["t/acc"] == 0.04 and out["base"]["t/x"] == 1.0
    # eval.json's lm_eval section is shaped like a set's, so `tuneline report` shows it with the others
    section = verdict_section({"lm_eval": out}, None, "main")
    assert "| lm_eval | t/acc | 0.5000 | 0.6000 | +0.1000 [+0.0020, +0.1980] | **better** | new |" in section


def test_naming_tasks_without_lm_eval_installed_fails_naming_the_extra(monkeypatch):
    import importlib.util

    data = copy.deepcopy(params.read_params_file(ROOT / "params.yaml"))
    assert data["evaluate"]["lm_eval_tasks"] == []  # off by default
    data["evaluate"]["lm_eval_tasks"] = ["mmlu"]
    data["evaluate"]["lm_eval_include_path"] = str(ROOT / "configs" / "lm_eval")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a)
    )
    with pytest.raises(
        ParamsError,
        match=r"evaluate\.lm_eval_tasks \['mmlu'\] needs lm-evaluation-harness, which is not "
        r"installed: pip install -e '\.\[lmeval\]'",
    ):
        params.check_environment("evaluate", params.section("evaluate", data))


def test_the_local_task_runs_on_base_and_tuned_and_its_scores_land_in_eval_json(
    tuned_project, tmp_path, monkeypatch
):
    import stages.evaluate

    project = tmp_path / "project"
    shutil.copytree(tuned_project, project)
    p = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    p["evaluate"].update(
        lm_eval_tasks=["tuneline_test"], lm_eval_include_path=str(ROOT / "configs" / "lm_eval")
    )
    (project / "params.yaml").write_text(yaml.safe_dump(p), encoding="utf-8")
    monkeypatch.chdir(project)  # the task's data file, data/alpaca/test.json, is relative to the project
    stages.evaluate.main()

    bench = read_json(project / "metrics" / "eval.json")["lm_eval"]
    names = {"tuneline_test/acc", "tuneline_test/acc_norm"}
    assert set(bench["base"]) == set(bench["tuned"]) == set(bench["delta"]) == set(bench["verdict"]) == names
    assert bench["documents"] == {n: 16 for n in names}  # every record of the test split, each one question
    for model in ("base", "tuned"):
        for name in names:  # a share of the 16 questions answered right, with lm_eval's standard error
            assert (bench[model][name] * 16).is_integer() and 0 <= bench[model][name] <= 1
            assert bench["stderr"][model][name] > 0 or bench[model][name] in (0.0, 1.0)
    for name in names:
        assert bench["delta"][name] == pytest.approx(bench["tuned"][name] - bench["base"][name], abs=1e-6)
        assert bench["delta_ci95"][name]["low"] <= bench["delta"][name] <= bench["delta_ci95"][name]["high"]
    assert set(read_json(project / "metrics" / "eval.json")) == {"unseen", "seen", "lm_eval"}
