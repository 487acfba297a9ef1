"""The LLM judge against a scripted loopback server: both orders are asked, disagreeing orders are a
tie, a malformed reply is asked again and then counted as unparsed, and a rerun sends no request."""

from __future__ import annotations

import json
import re
import socket
import time
from types import SimpleNamespace

import pytest

from tests.openai_stub import ScriptedServer
from tests.tuned_project import ROOT
from tuneline.common.params import ParamsError
from tuneline.common.records import EndpointError
from tuneline.eval import judge as judge_module
from tuneline.eval.judge import judge, load_prompt, outcome
from tuneline.llm.client import Endpoint, lazy_caller

RECORDS = [
    {
        "id": f"r{i}",
        "instruction": f"How do I brew coffee number {i}?",
        "input": "",
        "output": f"Brew it well {i}.",
    }
    for i in range(3)
]
TUNED = [f"tuned answer {i}" for i in range(3)]
BASE = [f"base answer {i}" for i in range(3)]


def answers_shown(body: dict) -> tuple[str, str]:
    text = body["messages"][0]["content"]
    return re.search(r"Answer A: (.*)", text).group(1), re.search(r"Answer B: (.*)", text).group(1)


def prefers_tuned(body: dict) -> str:
    a, _ = answers_shown(body)
    return json.dumps({"winner": "A" if a.startswith("tuned") else "B"})


def run(server: ScriptedServer, cache_dir, retries: int = 1) -> tuple[dict, list[dict]]:
    endpoint = Endpoint(
        base_url=server.base_url,
        model="judge",
        api_key_env="TUNELINE_TEST_NO_KEY",
        temperature=0.0,
        max_tokens=32,
        concurrency=2,
        requests_per_minute=6000,
        max_retries=0,
        timeout_s=10,
    )
    template, retry = (
        load_prompt(ROOT / "prompts" / "judge.txt", "p"),
        load_prompt(ROOT / "prompts" / "retry.txt", "r"),
    )
    with lazy_caller(endpoint, cache_dir) as call:
        summary, rows, _ = judge(
            lambda requests, seed: call(requests, seed, {"type": "json_object"}),
            template,
            retry,
            RECORDS,
            TUNED,
            BASE,
            retries,
            seed=42,
        )
    return summary, rows


def test_each_pair_is_asked_in_both_orders_and_a_consistent_judge_gives_wins(tmp_path):
    with ScriptedServer(respond=prefers_tuned) as server:
        summary, rows = run(server, tmp_path)
        shown = sorted(answers_shown(b) for b in server.bodies())
    assert shown == sorted([(t, b) for t, b in zip(TUNED, BASE)] + [(b, t) for t, b in zip(TUNED, BASE)])
    assert summary["win"] == 1.0 and summary["loss"] == summary["tie"] == summary["unparsed"] == 0.0
    assert summary["position_consistency"] == 1.0 and summary["pairs"] == 3
    assert summary["net_win_ci95"] == {"low": 1.0, "high": 1.0}
    assert [r["outcome"] for r in rows] == ["win"] * 3 and rows[0]["id"] == "r0"


def test_a_judge_that_always_picks_the_first_answer_gives_ties_not_wins(tmp_path):
    with ScriptedServer(respond=lambda body: '{"winner": "A"}') as server:
        summary, rows = run(server, tmp_path)
    assert summary["tie"] == 1.0 and summary["win"] == 0.0 and summary["loss"] == 0.0
    assert summary["position_consistency"] == 0.0
    assert rows[0] == {"id": "r0", "tuned_first": "A", "tuned_second": "A", "outcome": "tie"}


def test_a_rerun_sends_no_request(tmp_path):
    with ScriptedServer(respond=prefers_tuned) as server:
        first = run(server, tmp_path)
        assert server.requests == 6
        server.reset_counts()
        assert run(server, tmp_path) == first
        assert server.requests == 0


def test_a_malformed_reply_is_asked_again_then_counted_as_unparsed(tmp_path):
    with ScriptedServer(respond=lambda body: "I think the first one is nicer.") as server:
        summary, rows = run(server, tmp_path, retries=1)
        bodies = server.bodies()
    assert server.requests == 12  # 6 conversations, each asked once and once again
    again = [b for b in bodies if len(b["messages"]) == 3]
    assert len(again) == 6
    assert again[0]["messages"][1] == {"role": "assistant", "content": "I think the first one is nicer."}
    assert "could not be used" in again[0]["messages"][2]["content"]
    assert summary["unparsed"] == 1.0 and summary["position_consistency"] is None
    assert {r["outcome"] for r in rows} == {"unparsed"}


def test_a_reply_fixed_on_the_retry_counts(tmp_path):
    def malformed_first(body: dict) -> str:
        return "Hmm." if len(body["messages"]) == 1 else prefers_tuned(body)

    with ScriptedServer(respond=malformed_first) as server:
        summary, _ = run(server, tmp_path, retries=1)
    assert server.requests == 12 and summary["win"] == 1.0 and summary["unparsed"] == 0.0


def test_outcome_counts_a_verdict_only_when_both_orders_agree():
    assert outcome("A", "B") == "win"
    assert outcome("B", "A") == "loss" and outcome("tie", "tie") == "tie" and outcome("A", "tie") == "tie"
    assert outcome(None, "B") == "unparsed"


def test_a_missing_prompt_file_names_it_and_the_key(tmp_path):
    with pytest.raises(
        ParamsError, match=r"judge\.txt: the prompt file named by evaluate\.judge\.prompt is missing"
    ):
        load_prompt(tmp_path / "judge.txt", "evaluate.judge.prompt")


def label_judge(base_url: str, model: str) -> SimpleNamespace:
    """evaluate.judge's keys, with label verdicts."""
    return SimpleNamespace(
        base_url=base_url,
        model=model,
        api_key_env="TUNELINE_TEST_NO_KEY",
        verdict="label",
        prompt=str(ROOT / "prompts" / "judge_label.txt"),
        retry_prompt=str(ROOT / "prompts" / "retry.txt"),
        max_tokens=32,
        reply_retries=1,
        concurrency=2,
        requests_per_minute=6000,
        max_retries=0,
        timeout_s=10,
        structured="json_schema",
        max_failed_fraction=0.1,
    )


def json_judge(base_url: str, **overrides) -> SimpleNamespace:
    """evaluate.judge's keys, with json verdicts from an API judge."""
    return SimpleNamespace(
        **{
            **vars(label_judge(base_url, "judge")),
            "verdict": "json",
            "prompt": str(ROOT / "prompts" / "judge.txt"),
            **overrides,
        }
    )


def test_label_verdicts_ask_for_one_token_biased_to_the_labels_and_c_is_a_tie(tmp_path, tiny_model_dir):
    from tuneline.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    label_ids = {str(tokenizer.encode(label, add_special_tokens=False)[0]): 100.0 for label in "ABC"}

    def label(body: dict) -> str:  # tuned better on r0, a tie on r1, base better on r2
        a, _ = answers_shown(body)
        k = int(a[-1])
        return "C" if k == 1 else ("A" if a.startswith("tuned") == (k == 0) else "B")

    with ScriptedServer(respond=label) as server:
        summary, rows, _ = judge_module.run(
            label_judge(server.base_url, str(tiny_model_dir)),
            "evaluate.judge",
            RECORDS,
            TUNED,
            BASE,
            tmp_path,
            seed=42,
        )
        bodies = server.bodies()
    assert len(bodies) == 6 and all(b["max_tokens"] == 1 and b["logit_bias"] == label_ids for b in bodies)
    assert all("response_format" not in b for b in bodies)  # no JSON asked for
    assert "Reply with one letter" in bodies[0]["messages"][0]["content"]
    assert [r["outcome"] for r in rows] == ["win", "tie", "loss"]
    assert rows[1]["tuned_first"] == rows[1]["tuned_second"] == "tie"
    assert summary["position_consistency"] == 1.0 and summary["unparsed"] == 0.0


def test_label_verdicts_need_a_local_judge_whose_labels_are_single_tokens(tmp_path):
    with pytest.raises(
        ParamsError, match=r"evaluate\.judge\.model must be a local model directory.*verdict: json"
    ):
        judge_module.run(
            label_judge("http://127.0.0.1:9/v1", "gpt-4o-mini"),
            "evaluate.judge",
            RECORDS,
            TUNED,
            BASE,
            tmp_path,
            seed=42,
        )
    assert judge_module.parse_label(" B\n") == "B" and judge_module.parse_label("C") == "tie"
    with pytest.raises(judge_module.ReplyError):
        judge_module.parse_label("Answer A")


def test_json_verdicts_send_the_verdict_schema(tmp_path):
    with ScriptedServer(respond=prefers_tuned) as server:
        summary, _, _ = judge_module.run(
            json_judge(server.base_url), "evaluate.judge", RECORDS, TUNED, BASE, tmp_path, 42
        )
        formats = [b["response_format"] for b in server.bodies()]
    assert summary["win"] == 1.0
    assert all(
        f["type"] == "json_schema" and f["json_schema"]["schema"] == judge_module.VERDICT_SCHEMA
        for f in formats
    )


def test_a_dead_judge_endpoint_fails_the_stage_within_seconds_naming_the_key(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: every connection is refused
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        started = time.monotonic()
        with pytest.raises(
            EndpointError, match=r"evaluate\.judge: evaluate\.judge\.base_url .*did not answer GET /models"
        ):
            judge_module.run(
                json_judge(dead, max_retries=3), "evaluate.judge", RECORDS, TUNED, BASE, tmp_path, 42
            )
    assert time.monotonic() - started < 10


def test_more_failed_judge_calls_than_allowed_fail_naming_base_url(tmp_path):
    # The server is up (GET /models answers) but every verdict call fails: no "unparsed 1.00" exit 0.
    with ScriptedServer(faults=["500"] * 6) as server:
        with pytest.raises(
            EndpointError,
            match=r"select\.judge: 6 of 6 judge calls failed.*select\.judge\.max_failed_fraction "
            r"0\.1.*Check select\.judge\.base_url \('http://127\.0\.0\.1",
        ):
            judge_module.run(json_judge(server.base_url), "select.judge", RECORDS, TUNED, BASE, tmp_path, 42)
    with ScriptedServer(respond=prefers_tuned, faults=["500"]) as server:  # one of six: within 0.2
        judge_module.run(
            json_judge(server.base_url, max_failed_fraction=0.2),
            "select.judge",
            RECORDS,
            TUNED,
            BASE,
            tmp_path / "again",
            42,
        )
