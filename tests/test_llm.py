"""tuneline.llm.client and tuneline.llm.server against real servers on 127.0.0.1.

The scripted server counts requests, answers and in-flight requests on its side, so these
tests see what the client really sent.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.openai_stub import ScriptedServer
from tuneline.common.params import ParamsError
from tuneline.llm.client import (
    EMPTY_REPLY,
    TRUNCATED,
    Endpoint,
    TokenBudget,
    cache_key,
    complete_batch,
    complete_many_sync,
    ledger,
    model_fingerprint,
    preflight,
    request_seed,
)
from tuneline.llm.server import endpoint_url, local_server

JSON_OBJECT = {"type": "json_object"}

KEY_ENV = "TUNELINE_TEST_LLM_KEY"
KEY = "sk-tuneline-llm-test-7d1f3c9e"


def endpoint(base_url: str, **overrides) -> Endpoint:
    values = dict(
        base_url=base_url,
        model="stub",
        api_key_env=KEY_ENV,
        temperature=0.7,
        max_tokens=32,
        concurrency=4,
        requests_per_minute=60_000,
        max_retries=3,
        timeout_s=10.0,
    )
    return Endpoint(**{**values, **overrides})


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"question {i}"}] for i in range(n)]


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.json"))


def test_replies_in_order_cached_and_not_asked_again(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer() as server:
        ep = endpoint(server.base_url)
        first = complete_many_sync(ep, conversations(6), tmp_path, seed=1, response_format=JSON_OBJECT)
        assert [json.loads(r.text)["echo"] for r in first] == [f"question {i}" for i in range(6)]
        assert server.requests == 6 and not any(r.cached for r in first)
        assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in first)
        assert all(b["response_format"] == {"type": "json_object"} for b in server.bodies())
        assert len(cache_files(tmp_path)) == 6

        again = complete_many_sync(ep, conversations(6), tmp_path, seed=1, response_format=JSON_OBJECT)
        assert server.requests == 6  # nothing asked twice
        assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in first]
        assert ledger(again)["this_run"]["calls"] == 0 and ledger(again)["calls"] == 6

        complete_many_sync(ep, conversations(6), tmp_path, seed=2, response_format=JSON_OBJECT)
        assert server.requests == 12  # another seed is another call


def test_cache_fans_out_two_levels_and_still_reads_the_one_level_layout(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer() as server:
        ep = endpoint(server.base_url)
        first = complete_many_sync(ep, conversations(4), tmp_path, seed=1)
        files = cache_files(tmp_path)
        # ab/cd/abcd....json: two directory levels of two hex digits each, named by the key
        assert len(files) == 4
        assert all(
            f.parent.parent.parent == tmp_path and f.stem.startswith(f.parent.parent.name + f.parent.name)
            for f in files
        )
        # An entry written by an earlier version (ab/abcd....json) is still a hit, not a new call.
        for f in files:
            f.rename(tmp_path / f.parent.parent.name / f.name)
        again = complete_many_sync(ep, conversations(4), tmp_path, seed=1)
        assert server.requests == 4 and all(r.cached for r in again)
        assert [r.text for r in again] == [r.text for r in first]


def test_seed_is_sent_and_identical_requests_get_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    same = [[{"role": "user", "content": "same"}]] * 3
    with ScriptedServer() as server:
        complete_many_sync(endpoint(server.base_url), same, tmp_path, seed=5)
        sent = sorted(b["seed"] for b in server.bodies())
    assert sent == sorted(request_seed(5, same[0], k) for k in range(3))
    assert len(set(sent)) == 3 and len(cache_files(tmp_path)) == 3


def test_429_with_retry_after_and_500_are_retried(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer(faults=["429:1", "500"]) as server:
        (reply,) = complete_many_sync(
            endpoint(server.base_url, concurrency=1), conversations(1), tmp_path, seed=1
        )
        assert reply.error is None and json.loads(reply.text)["echo"] == "question 0"
        assert [e["status"] for e in server.log] == [429, 500, 200]
        # Retry-After: 1 was honoured before the second attempt.
        assert server.log[1]["t"] - server.log[0]["t"] >= 0.95


def test_failed_reply_is_reported_not_cached_and_asked_again(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer(faults=["500", "garbage"]) as server:
        ep = endpoint(server.base_url, max_retries=0)
        replies = complete_many_sync(ep, conversations(2), tmp_path, seed=1)
        assert sorted(r.error is None for r in replies) == [False, False]
        assert all(r.text is None for r in replies)
        assert cache_files(tmp_path) == []

        replies = complete_many_sync(ep, conversations(2), tmp_path, seed=1)
        assert server.requests == 4 and all(r.error is None for r in replies)


def test_empty_reply_is_reported_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer(
        respond=lambda body: "" if body["messages"][0]["content"] == "question 1" else "ok"
    ) as server:
        ep = endpoint(server.base_url)
        replies = complete_many_sync(ep, conversations(2), tmp_path, seed=1)
        assert [r.error for r in replies] == [None, EMPTY_REPLY] and replies[1].completion_tokens > 0
        assert len(cache_files(tmp_path)) == 1
        complete_many_sync(ep, conversations(2), tmp_path, seed=1)
        assert server.requests == 3  # only the empty one is asked again


def test_concurrency_limit_is_respected_server_side(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer(latency_s=0.1) as server:
        complete_many_sync(endpoint(server.base_url, concurrency=3), conversations(12), tmp_path, seed=1)
        assert server.requests == 12
        assert server.max_in_flight == 3


def test_requests_per_minute_spaces_request_starts(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer() as server:
        # 120 per minute: one start every 0.5 s, whatever the concurrency. (Arrivals are stamped by
        # the server, which a loaded machine can delay by a fraction of a second: hence the margin.)
        complete_many_sync(
            endpoint(server.base_url, concurrency=8, requests_per_minute=120),
            conversations(5),
            tmp_path,
            seed=1,
        )
        starts = sorted(e["t"] for e in server.log)
    assert starts[-1] - starts[0] >= 1.6


def test_api_key_is_sent_but_never_stored(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer() as server:
        complete_many_sync(endpoint(server.base_url), conversations(3), tmp_path, seed=1)
        assert {e["authorization"] for e in server.log} == {f"Bearer {KEY}"}
    for path in cache_files(tmp_path):
        assert KEY not in path.read_text()


def test_remote_endpoint_without_key_fails_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=KEY_ENV):
        complete_many_sync(endpoint("https://api.example.invalid/v1"), conversations(1), tmp_path, seed=1)


def test_cache_key_covers_everything_that_changes_the_reply():
    ep = endpoint("http://127.0.0.1:1/v1")
    messages = [{"role": "user", "content": "hi"}]
    key = cache_key(ep, messages, 1, None)
    variants = [
        cache_key(endpoint("http://127.0.0.1:1/v1", model="other"), messages, 1, None),
        cache_key(endpoint("http://127.0.0.1:1/v1", temperature=0.1), messages, 1, None),
        cache_key(endpoint("http://127.0.0.1:1/v1", max_tokens=8), messages, 1, None),
        cache_key(ep, [{"role": "user", "content": "hi!"}], 1, None),
        cache_key(ep, messages, 2, None),
        cache_key(ep, messages, 1, JSON_OBJECT),
        cache_key(
            ep,
            messages,
            1,
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
        ),
        cache_key(ep, messages, 1, False, salt="weights-v2"),
    ]
    assert len({key, *variants}) == 1 + len(variants)
    # The key does not change the reply, so it does not change the key.
    assert cache_key(endpoint("http://127.0.0.1:1/v1", api_key_env="OTHER"), messages, 1, None) == key


def test_model_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 10)
    before = model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"b" * 10)
    assert model_fingerprint(tmp_path) != before


def test_endpoint_url_passes_a_remote_url_through():
    with endpoint_url("https://api.example.invalid/v1", "unused") as url:
        assert url == "https://api.example.invalid/v1"


def test_local_server_needs_a_model_directory(tmp_path):
    with pytest.raises(ParamsError, match="dvc repro models"):
        with local_server(str(tmp_path / "missing")):
            pass


@pytest.mark.slow
def test_transformers_serve_answers_and_is_stopped(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.delenv(KEY_ENV, raising=False)  # a loopback server needs no key
    model = str(tiny_model_dir)  # built like the `models` stage builds the default model
    with endpoint_url("local", model) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        ep = endpoint(url, model=model, max_tokens=8, concurrency=2)
        replies = complete_many_sync(
            ep, conversations(3), tmp_path / "cache", seed=1, response_format=JSON_OBJECT
        )
    # A random-weight model may stop at once: that is an empty reply, reported and not cached.
    # Cut off at max_tokens, its text is the reply (truncated_is_error is off: generation metrics).
    assert all((r.error is None and r.text) or r.error == EMPTY_REPLY for r in replies), [
        r.error for r in replies
    ]
    assert all(r.prompt_tokens > 0 and r.completion_tokens <= 8 for r in replies)  # usage is reported
    assert len(cache_files(tmp_path / "cache")) == sum(r.error is None for r in replies)
    with socket.socket() as s:  # the server is gone once the block ends
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_truncated_reply_is_an_error_and_never_cached(tmp_path):
    with ScriptedServer(faults=["length"]) as server:
        (reply,) = complete_many_sync(
            endpoint(server.base_url), conversations(1), tmp_path, seed=1, truncated_is_error=True
        )
        assert reply.error == TRUNCATED and reply.text is None
        assert list(tmp_path.rglob("*.json")) == []
        (again,) = complete_many_sync(
            endpoint(server.base_url), conversations(1), tmp_path, seed=1, truncated_is_error=True
        )
        assert again.error is None and server.requests == 2


def test_null_temperature_and_max_tokens_are_not_sent(tmp_path):
    with ScriptedServer() as server:
        complete_many_sync(
            endpoint(server.base_url, temperature=None, max_tokens=None), conversations(1), tmp_path, seed=1
        )
        body = server.bodies()[0]
        assert "temperature" not in body and "max_tokens" not in body and body["seed"] is not None


def test_cache_key_includes_the_normalised_endpoint():
    messages = [{"role": "user", "content": "hi"}]

    def key(url: str) -> str:
        return cache_key(endpoint(url), messages, 1, None)

    assert key("https://api.example.com/v1") == key("HTTPS://API.example.com:443/v1/")
    assert key("https://api.example.com/v1") != key("https://other.example.com/v1")
    assert key("https://api.example.com/v1") != key("http://127.0.0.1:8000/v1")
    # Two loopback servers may serve different weights under one name: their ports tell them apart. "local",
    # the server a stage starts on a new port each run, is named by that name (and its model's fingerprint).
    assert len({key("http://127.0.0.1:8000/v1"), key("http://127.0.0.1:8001/v1"), key("local")}) == 3
    started = Endpoint(**{**endpoint("http://127.0.0.1:45678/v1").__dict__, "key_url": "local"})
    assert cache_key(started, messages, 1, None) == key("local")


# --- budgets, structured outputs, preflight -----------------------------------------------


def test_response_format_is_sent_per_request_and_joins_the_key(tmp_path):
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": True},
    }
    with ScriptedServer() as server:
        complete_many_sync(
            endpoint(server.base_url), conversations(2), tmp_path, seed=1, response_format=[schema, None]
        )
        by_question = {b["messages"][0]["content"]: b for b in server.bodies()}
        assert by_question["question 0"]["response_format"] == schema
        assert "response_format" not in by_question["question 1"]
        complete_many_sync(
            endpoint(server.base_url), conversations(2), tmp_path, seed=1, response_format=JSON_OBJECT
        )
        assert server.requests == 4  # another format is another call


def test_one_429_pauses_every_call_for_its_retry_after(tmp_path):
    # Three calls at a time, each answered after 0.5 s; the first gets a 429 at once asking for 2 s.
    # Calls that start after it wait out the same 2 s, not only the one that got it.
    with ScriptedServer(latency_s=0.5, faults=["429:2"]) as server:
        replies = complete_many_sync(
            endpoint(server.base_url, concurrency=3), conversations(6), tmp_path, seed=1
        )
        assert all(r.error is None for r in replies)
        rate_limited = next(e["t"] for e in server.log if e["status"] == 429)
        later = [e["t"] for e in server.log[3:]]  # every request that started after the first three
    assert later and min(later) >= rate_limited + 1.9


def test_tokens_per_minute_budget_holds_calls_back():
    async def take_two() -> float:
        budget = TokenBudget(600)  # 10 tokens a second, a minute's worth to start with
        await budget.take(600)
        started = time.monotonic()
        await budget.take(6)  # the bucket is empty: 0.6 s of refill
        return time.monotonic() - started

    assert asyncio.run(take_two()) >= 0.5
    budget = TokenBudget(600)
    budget.settle(estimate=100, used=400)  # the reply used more than the estimate: the debt is carried
    assert budget.tokens <= 300


def test_tokens_per_minute_is_settled_with_the_replies_usage(tmp_path):
    with ScriptedServer() as server:
        ep = endpoint(server.base_url, tokens_per_minute=1_000_000)
        replies = complete_many_sync(ep, conversations(3), tmp_path, seed=1)
        assert all(r.error is None for r in replies) and server.requests == 3


def test_preflight_catches_a_dead_endpoint_within_seconds():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # bound, not listening: connection refused
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"evaluate\.judge\.base_url .*did not answer GET /models"):
            preflight(endpoint(dead), "evaluate.judge.base_url")
    assert time.monotonic() - started < 10
    with ScriptedServer() as server:
        assert preflight(endpoint(server.base_url), "augment.base_url") == ["stub"]


# --- the Batch API ------------------------------------------------------------------------


def test_batch_answers_land_in_the_cache_and_a_rerun_sends_nothing(tmp_path):
    with ScriptedServer() as server:
        ep = endpoint(server.base_url)
        replies = complete_batch(
            ep, conversations(5), tmp_path, seed=1, response_format=JSON_OBJECT, poll_s=0.05
        )
        assert [json.loads(r.text)["echo"] for r in replies] == [f"question {i}" for i in range(5)]
        assert all(r.batch and not r.cached for r in replies)
        assert server.requests == 0 and len(server.batches) == 1  # no live call: one batch of five lines
        (body,) = {
            json.dumps(b, sort_keys=True)
            for b in [
                json.loads(line)["body"]
                for line in server.files[next(iter(server.batches.values()))["input_file_id"]]
                .decode()
                .splitlines()
            ][:1]
        }
        assert json.loads(body)["response_format"] == JSON_OBJECT and json.loads(body)["seed"] is not None
        assert not list((tmp_path / "batches").glob("*.json"))  # settled: no batch left to resume

        again = complete_batch(
            ep, conversations(5), tmp_path, seed=1, response_format=JSON_OBJECT, poll_s=0.05
        )
        assert all(r.cached for r in again) and len(server.batches) == 1
        # The same calls made live find the batch's replies: one cache for both paths.
        live = complete_many_sync(ep, conversations(5), tmp_path, seed=1, response_format=JSON_OBJECT)
        assert all(r.cached for r in live) and server.requests == 0
    usage = ledger(replies, price_prompt_per_mtok=1e6, price_completion_per_mtok=0.0, batch_price_factor=0.5)
    assert usage["batch_calls"] == 5 and usage["cost"] == 0.5 * usage["prompt_tokens"]


def test_a_killed_batch_run_resumes_polling_the_same_batch(tmp_path):
    with ScriptedServer(batch_delay_s=60) as server:
        script = (
            "import sys; sys.path.insert(0, %r)\n"
            "from tests.test_llm import endpoint, conversations\n"
            "from tuneline.llm.client import complete_batch\n"
            "complete_batch(endpoint(%r), conversations(4), %r, seed=1, poll_s=0.1)\n"
        ) % (str(Path(__file__).resolve().parent.parent), server.base_url, str(tmp_path))
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 120
        while not list((tmp_path / "batches").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        # Recorded, nothing answered yet: the state file is the only file.
        assert len(server.batches) == 1 and [p.parent.name for p in cache_files(tmp_path)] == ["batches"]
        server.batch_delay_s = 0.0
        replies = complete_batch(endpoint(server.base_url), conversations(4), tmp_path, seed=1, poll_s=0.05)
        assert all(r.error is None and r.batch for r in replies)
        assert len(server.batches) == 1  # polled the recorded batch, submitted none


@pytest.mark.parametrize(
    "outcome, failed_lines, answered", [("expired", 0, 2), ("failed", 0, 0), ("completed", 1, 3)]
)
def test_expired_failed_and_partly_failed_batches_fail_naming_what_to_rerun(
    tmp_path, outcome, failed_lines, answered
):
    with ScriptedServer(batch_outcome=outcome, batch_failed_lines=failed_lines) as server:
        with pytest.raises(
            RuntimeError,
            match=rf"batch batch_\w+ {outcome}.*{answered} of 4 requests answered and cached, "
            rf"{4 - answered} not.*rerun `dvc repro augment` to submit only those",
        ):
            complete_batch(
                endpoint(server.base_url),
                conversations(4),
                tmp_path,
                seed=1,
                poll_s=0.05,
                rerun="rerun `dvc repro augment`",
            )
        assert len(cache_files(tmp_path)) == answered  # what it answered is kept
        server.batch_outcome, server.batch_failed_lines = "completed", 0
        replies = complete_batch(endpoint(server.base_url), conversations(4), tmp_path, seed=1, poll_s=0.05)
        assert all(r.error is None for r in replies)
        assert server.batch_requests()[-1].__len__() == 4 - answered  # the rerun submits only the rest
