"""The LLM judge against a scripted loopback server: both orders are asked, disagreeing orders are a
tie, a malformed reply is asked again and then counted as unparsed, and a rerun sends no request."""

from __future__ import annotations

import json
import re

import pytest

from tests.openai_stub import ScriptedServer
from tests.tuned_project import ROOT
from tuneline.judge import judge, load_prompt, outcome
from tuneline.llm import Endpoint, lazy_caller

RECORDS = [{"id": f"r{i}", "instruction": f"How do I brew coffee number {i}?", "input": "", "output": f"Brew it well {i}."} for i in range(3)]
TUNED = [f"tuned answer {i}" for i in range(3)]
BASE = [f"base answer {i}" for i in range(3)]


def answers_shown(body: dict) -> tuple[str, str]:
    text = body["messages"][0]["content"]
    return re.search(r"Answer A: (.*)", text).group(1), re.search(r"Answer B: (.*)", text).group(1)


def prefers_tuned(body: dict) -> str:
    a, _ = answers_shown(body)
    return json.dumps({"winner": "A" if a.startswith("tuned") else "B"})


def run(server: ScriptedServer, cache_dir, retries: int = 1) -> tuple[dict, list[dict]]:
    endpoint = Endpoint(base_url=server.base_url, model="judge", api_key_env="TUNELINE_TEST_NO_KEY", temperature=0.0,
                        max_tokens=32, concurrency=2, requests_per_minute=6000, max_retries=0, timeout_s=10)
    template, retry = load_prompt(ROOT / "prompts" / "judge.txt", "p"), load_prompt(ROOT / "prompts" / "retry.txt", "r")
    with lazy_caller(endpoint, cache_dir, json_mode=True) as call:
        summary, rows, _ = judge(call, template, retry, RECORDS, TUNED, BASE, retries, seed=42)
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
    with pytest.raises(SystemExit, match=r"judge\.txt: the prompt file named by evaluate\.judge\.prompt is missing"):
        load_prompt(tmp_path / "judge.txt", "evaluate.judge.prompt")
