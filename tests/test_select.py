"""Selection: the select stage on an API candidate through a loopback server, choose's decision
(the better score wins, a tie within noise is said and broken by select.tie_break), and choosing by
the LLM judge's win rate over the reference answers (select.metric: judge)."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pytest
import yaml

from stages.choose import choose, table
from tests.openai_stub import ScriptedServer
from tests.tuned_project import ROOT
from tuneline.common import params
from tuneline.common.params import ParamsError
from tuneline.common.records import read_json, read_jsonl, write_json

RECORDS = read_jsonl(ROOT / "data" / "seeds" / "seeds.jsonl")[:6]


def local(score: float, low: float, high: float, parameters: int = 1000, loss: float = 5.0) -> dict:
    return {
        "kind": "local",
        "rouge_l": score,
        "loss": loss,
        "parameters": parameters,
        "ci95": {"rouge_l": {"low": low, "high": high}},
    }


def test_the_better_scoring_candidate_is_chosen_when_the_intervals_tell_them_apart():
    scores = {"small": local(0.10, 0.05, 0.15, parameters=10), "big": local(0.40, 0.30, 0.50, parameters=99)}
    best, why, tied = choose(scores, "rouge_l", "smaller_model")
    assert (best, tied) == ("big", [])
    assert (
        why
        == "highest validation rouge_l: big 0.4000 [0.3000, 0.5000] (others: small 0.1000 [0.0500, 0.1500])"
    )
    assert (
        choose(scores | {"big": local(0.40, 0.30, 0.50) | {"loss": 0.5}}, "loss", "smaller_model")[0] == "big"
    )


@pytest.mark.parametrize(
    ("tie_break", "chosen"), [("smaller_model", "small"), ("listed_order", "first"), ("lower_cost", "first")]
)
def test_a_winner_within_the_runner_ups_interval_is_reported_as_a_tie_and_broken_as_declared(
    tie_break, chosen
):
    scores = {
        "first": local(0.30, 0.25, 0.35, parameters=500),
        "small": local(0.28, 0.20, 0.36, parameters=100),  # 0.30 lies in its interval: a tie
        "hosted": {
            "kind": "api",
            "rouge_l": 0.31,
            "loss": None,
            "cost": 0.5,
            "ci95": {"rouge_l": {"low": 0.2, "high": 0.4}},
        },
        "far": local(0.10, 0.05, 0.15, parameters=1),  # clearly worse: not in the tie, though smallest
    }
    # lower_cost: the local ones cost no API fee; of those, the better score (first) wins
    best, why, tied = choose(scores, "rouge_l", tie_break)
    assert best == chosen
    assert sorted(tied + [best]) == ["first", "hosted", "small"]
    assert (
        f"within noise: hosted's rouge_l lies in the 95% interval of first, small, so select.tie_break "
        f"{tie_break} chose {chosen}" in why
    )


def test_without_intervals_only_equal_scores_tie():
    scores = {
        "a": {"kind": "local", "rouge_l": 0.0, "parameters": 5},
        "b": {"kind": "local", "rouge_l": 0.0, "parameters": 3},
        "c": {"kind": "local", "rouge_l": 0.0001, "parameters": 1},
    }
    best, why, tied = choose(scores, "rouge_l", "smaller_model")
    assert (best, tied) == ("c", [])
    scores["c"]["rouge_l"] = 0.0
    best, _, tied = choose(scores, "rouge_l", "smaller_model")
    assert (best, tied) == ("c", ["a", "b"])


def test_choosing_by_loss_with_an_api_candidate_fails_at_start_up_naming_the_key():
    data = copy.deepcopy(params.read_params_file(ROOT / "params.yaml"))
    data["select"]["metric"] = "loss"
    data["select"]["candidates"]["hosted"] = {
        "kind": "api",
        "model": "gpt-x",
        "base_url": "https://api.example.invalid/v1",
    }
    with pytest.raises(
        ParamsError,
        match=r"select.metric 'loss' is not available for API candidate select\.candidates\.hosted",
    ):
        params.section("select", data)
    data["select"]["metric"] = "rouge_l"
    data["select"]["tie_break"] = "cheapest"
    with pytest.raises(
        ParamsError,
        match=r"select\.tie_break 'cheapest' is not one of smaller_model, lower_cost, listed_order",
    ):
        params.section("select", data)


@pytest.fixture
def api_project(tmp_path, monkeypatch):
    """A project whose select.candidates has one API candidate served by a scripted loopback server."""
    server = ScriptedServer(respond=lambda body: "Grind the beans fresh.")
    with server:
        p = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        p["select"]["candidates"] = {
            "hosted": {
                "kind": "api",
                "model": "stub",
                "base_url": server.base_url,
                "price_prompt_per_mtok": 2.0,
                "price_completion_per_mtok": 10.0,
            }
        }
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(p), encoding="utf-8")
        write_json(tmp_path / "data" / "alpaca" / "val.json", RECORDS)
        write_json(tmp_path / "data" / "alpaca" / "train.json", RECORDS)
        monkeypatch.chdir(tmp_path)
        yield tmp_path, server


def test_an_api_candidate_is_scored_through_the_server_with_no_loss_and_a_rerun_asks_nothing(api_project):
    import stages.select

    project, server = api_project
    stages.select.main("hosted")
    assert server.requests == len(RECORDS)
    metrics = read_json(project / "metrics" / "select" / "hosted.json")
    assert metrics["loss"] is None and metrics["perplexity"] is None
    assert 0 < metrics["rouge_l"] < 1 and set(metrics["ci95"]) == {
        "rouge_1",
        "rouge_2",
        "rouge_l",
        "bleu",
        "exact_match",
    }
    # cost: price per million tokens x the tokens the server reported
    assert metrics["cost"] == pytest.approx(
        (2.0 * metrics["prompt_tokens"] + 10.0 * metrics["completion_tokens"]) / 1e6
    )
    assert metrics["cost"] > 0

    server.reset_counts()
    stages.select.main("hosted")
    assert server.requests == 0  # every reply came from the persisted cache
    assert read_json(project / "metrics" / "select" / "hosted.json") == metrics

    rows = table({"hosted": metrics}, "hosted", "the only one", "rouge_l").splitlines()
    header = [c.strip() for c in rows[2].strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in rows[4].strip("|").split("|"))))
    assert cells["loss"] == "n/a" and cells["perplexity"] == "n/a"
    assert cells["cost"] == f"{metrics['cost']:.4f}"
    assert (
        cells["rouge_l 95% interval"]
        == f"{metrics['ci95']['rouge_l']['low']:.4f} - {metrics['ci95']['rouge_l']['high']:.4f}"
    )


HOSTED_ANSWER = "Grind the beans fresh."


def hosted_or_judge(body: dict) -> str:
    """The API candidate answers HOSTED_ANSWER; the judge (model "judge") prefers that answer to the
    reference, and the reference to any other answer (the local candidate's)."""
    if body["model"] != "judge":
        return HOSTED_ANSWER
    a, b = re.search(
        r"Answer A: (.*?)\n\nAnswer B: (.*?)\n\nReply with", body["messages"][0]["content"], re.S
    ).groups()
    if HOSTED_ANSWER in (a, b):
        return json.dumps({"winner": "A" if a == HOSTED_ANSWER else "B"})
    return json.dumps({"winner": "A" if a in {r["output"] for r in RECORDS} else "B"})


def judge_params(server_url: str) -> dict:
    return {
        "enabled": True,
        "base_url": server_url,
        "model": "judge",
        "api_key_env": "TUNELINE_TEST_NO_KEY",
        "verdict": "json",
        "prompt": str(ROOT / "prompts" / "select_judge.txt"),
        "retry_prompt": str(ROOT / "prompts" / "retry.txt"),
        "max_tokens": 32,
        "reply_retries": 1,
        "concurrency": 4,
        "requests_per_minute": 6000,
        "max_retries": 0,
        "timeout_s": 10,
        "structured": "json_schema",
        "max_failed_fraction": 0.1,
    }


def test_choosing_by_the_judge_scores_a_local_and_an_api_candidate_and_a_rerun_asks_nothing(
    tmp_path, monkeypatch, tiny_model_dir
):
    import stages.choose
    import stages.select

    with ScriptedServer(respond=hosted_or_judge) as server:
        p = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        p["select"].update(
            metric="judge",
            max_new_tokens=8,
            judge=judge_params(server.base_url),
            candidates={
                "local": {"kind": "local", "model": str(tiny_model_dir)},
                "hosted": {"kind": "api", "model": "stub", "base_url": server.base_url},
            },
        )
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(p), encoding="utf-8")
        write_json(tmp_path / "data" / "alpaca" / "val.json", RECORDS)
        write_json(tmp_path / "data" / "alpaca" / "train.json", RECORDS)
        monkeypatch.chdir(tmp_path)
        stages.select.main("local")
        judged = [b for b in server.bodies() if b["model"] == "judge"]
        assert (
            len(judged) == server.requests == 2 * len(RECORDS)
        )  # the local model answers itself; each pair in both orders
        stages.select.main("hosted")
        stages.choose.main()

        server.reset_counts()
        for name in ("local", "hosted"):
            before = read_json(tmp_path / "metrics" / "select" / f"{name}.json")
            stages.select.main(name)
            after = read_json(tmp_path / "metrics" / "select" / f"{name}.json")
            for key in ("judge", "judge_rates"):
                assert after[key] == before[key]
            assert after["ci95"]["judge"] == before["ci95"]["judge"]
        assert server.requests == 0  # the candidate's and the judge's replies came from the cache

    local, hosted = (read_json(tmp_path / "metrics" / "select" / f"{n}.json") for n in ("local", "hosted"))
    # the judge prefers the hosted answer to every reference, and every reference to the local answers
    assert hosted["judge"] == 1.0 and hosted["ci95"]["judge"] == {"low": 1.0, "high": 1.0}
    assert local["judge"] == 0.0 and local["ci95"]["judge"] == {"low": 0.0, "high": 0.0}
    assert hosted["judge_rates"]["win"] == 1.0 and local["judge_rates"]["loss"] == 1.0
    assert hosted["judge_rates"]["pairs"] == local["judge_rates"]["pairs"] == len(RECORDS)
    selected = read_json(tmp_path / "models" / "selected.json")
    assert (selected["name"], selected["metric"], selected["score"]) == ("hosted", "judge", 1.0)
    assert selected["why"].startswith("highest validation judge: hosted 1.0000 [1.0000, 1.0000]")
    rows = (tmp_path / "metrics" / "select_table.md").read_text(encoding="utf-8").splitlines()
    header = [c.strip() for c in rows[2].strip("|").split("|")]
    cells = {
        r.split("|")[1].strip(): dict(zip(header, (c.strip() for c in r.strip("|").split("|"))))
        for r in rows[4:6]
    }
    assert cells["hosted **(chosen)**"]["judge"] == "1.0000" and cells["local"]["judge"] == "0.0000"
    assert cells["local"]["judge 95% interval"] == "0.0000 - 0.0000"


def test_a_win_rate_counts_ties_and_unparsed_pairs_half():
    from tuneline.eval.judge import win_rate

    rows = [{"outcome": o} for o in ("win", "tie", "loss", "unparsed")]
    rate, interval = win_rate(rows, seed=0)
    assert rate == 0.5 and interval["low"] <= 0.5 <= interval["high"] and interval["low"] < interval["high"]


def test_choosing_by_the_judge_without_a_judge_fails_at_start_up_naming_the_key(tmp_path):
    data = copy.deepcopy(params.read_params_file(ROOT / "params.yaml"))
    data["select"]["metric"] = "judge"
    assert data["select"]["judge"]["enabled"] is False  # the default
    with pytest.raises(
        ParamsError, match=r"select\.metric 'judge' needs the judge: set select\.judge\.enabled to true"
    ):
        params.section("select", data)
    data["select"]["judge"] = judge_params("")
    with pytest.raises(ParamsError, match=r"select\.judge\.base_url is empty; the judge is on"):
        params.section("select", data)
    data["select"]["judge"] = judge_params("http://127.0.0.1:9/v1") | {
        "prompt": str(tmp_path / "missing.txt")
    }
    with pytest.raises(ParamsError, match=r"select\.judge\.prompt: .*missing\.txt is not a file"):
        params.check_environment(
            "select", params.section("select", data)
        )  # what the stage runs after loading
    data["select"]["judge"]["prompt"] = str(ROOT / "prompts" / "select_judge.txt")
    params.check_environment("select", params.section("select", data))
    assert params.section("select", data).judge.enabled


@pytest.mark.parametrize(
    "model, online, expected",
    [
        (
            "models/base/not_built",
            False,
            r"select\.candidates\.missing\.model 'models/base/not_built': no such model directory; fix the "
            r"path",
        ),
        (
            "Qwen/Qwen2.5-0.5B",
            False,
            r"select\.candidates\.missing\.model 'Qwen/Qwen2.5-0.5B' is a hub id that is not in the "
            r"local hub cache .* the hub is off \(HF_HUB_OFFLINE\): download it while online",
        ),
        # not offline, but the hub (here a closed port on 127.0.0.1) cannot be reached: no minute of retries
        (
            "Qwen/Qwen2.5-0.5B",
            True,
            r"select\.candidates\.missing\.model 'Qwen/Qwen2.5-0.5B' is a hub id, but "
            r"http://127\.0\.0\.1:\d+ cannot be reached",
        ),
    ],
)
def test_a_candidate_that_cannot_load_fails_naming_its_key_and_the_fix(tmp_path, model, online, expected):
    from tests.stage_project import stage_command, stage_env
    from tuneline.llm.server import free_port

    p = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    p["select"]["candidates"] = {"missing": {"kind": "local", "model": model}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p), encoding="utf-8")
    write_json(tmp_path / "data" / "alpaca" / "val.json", RECORDS)
    # an empty hub cache: the hub id is not there, and offline it cannot be fetched
    result = subprocess.run(
        [*stage_command("select"), "missing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=stage_env(
            HF_HUB_CACHE=str(tmp_path / "hub-cache"),
            **({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"} if online else {}),
        ),
    )
    assert result.returncode == 2
    assert re.search(expected, result.stderr), result.stderr
    assert len(result.stderr.strip().splitlines()) < 5, result.stderr  # the message, not a traceback


def test_a_candidate_without_a_chat_template_fails_as_tokenize_does_naming_tokenize_template(tmp_path):
    from tests.conftest import seed_texts
    from tests.stage_project import stage_command, stage_env
    from tuneline.model.zoo import save_standin

    model_dir = save_standin("qwen2.5-base", seed_texts(), tmp_path / "no_template")
    (model_dir / "chat_template.jinja").unlink()  # a base that ships no template
    p = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    p["select"]["candidates"] = {"bare": {"kind": "local", "model": str(model_dir)}}
    p["tokenize"]["template"] = "auto"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p), encoding="utf-8")
    write_json(tmp_path / "data" / "alpaca" / "val.json", RECORDS)
    result = subprocess.run(
        [*stage_command("select"), "bare"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=stage_env(),
    )
    # select used to score it with ChatML, a template training would never use
    assert result.returncode == 2, result.stdout + result.stderr
    assert "has no chat template; set tokenize.template to one of chatml, llama3, alpaca" in result.stderr
