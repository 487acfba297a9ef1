"""tuneline.llm and tuneline.llmserver against real servers on 127.0.0.1.

The scripted server counts requests, answers and in-flight requests on its side, so these
tests see what the client really sent.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.openai_stub import ScriptedServer
from tuneline.llm import EMPTY_REPLY, TRUNCATED, Endpoint, cache_key, complete_many_sync, ledger, model_fingerprint, request_seed
from tuneline.llmserver import endpoint_url, local_server

KEY_ENV = "TUNELINE_TEST_LLM_KEY"
KEY = "sk-tuneline-llm-test-7d1f3c9e"


def endpoint(base_url: str, **overrides) -> Endpoint:
    values = dict(
        base_url=base_url, model="stub", api_key_env=KEY_ENV, temperature=0.7, max_tokens=32,
        concurrency=4, requests_per_minute=60_000, max_retries=3, timeout_s=10.0,
    )  # fmt: skip
    return Endpoint(**{**values, **overrides})


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"question {i}"}] for i in range(n)]


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.json"))


def test_replies_in_order_cached_and_not_asked_again(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer() as server:
        ep = endpoint(server.base_url)
        first = complete_many_sync(ep, conversations(6), tmp_path, seed=1, json_mode=True)
        assert [json.loads(r.text)["echo"] for r in first] == [f"question {i}" for i in range(6)]
        assert server.requests == 6 and not any(r.cached for r in first)
        assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in first)
        assert all(b["response_format"] == {"type": "json_object"} for b in server.bodies())
        assert len(cache_files(tmp_path)) == 6

        again = complete_many_sync(ep, conversations(6), tmp_path, seed=1, json_mode=True)
        assert server.requests == 6  # nothing asked twice
        assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in first]
        assert ledger(again)["this_run"]["calls"] == 0 and ledger(again)["calls"] == 6

        complete_many_sync(ep, conversations(6), tmp_path, seed=2, json_mode=True)
        assert server.requests == 12  # another seed is another call


def test_cache_fans_out_two_levels_and_still_reads_the_one_level_layout(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedServer() as server:
        ep = endpoint(server.base_url)
        first = complete_many_sync(ep, conversations(4), tmp_path, seed=1)
        files = cache_files(tmp_path)
        # ab/cd/abcd....json: two directory levels of two hex digits each, named by the key
        assert len(files) == 4
        assert all(f.parent.parent.parent == tmp_path and f.stem.startswith(f.parent.parent.name + f.parent.name)
                   for f in files)
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
        (reply,) = complete_many_sync(endpoint(server.base_url, concurrency=1), conversations(1), tmp_path, seed=1)
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
    with ScriptedServer(respond=lambda body: "" if body["messages"][0]["content"] == "question 1" else "ok") as server:
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
        complete_many_sync(endpoint(server.base_url, concurrency=8, requests_per_minute=120), conversations(5), tmp_path, seed=1)
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
    key = cache_key(ep, messages, 1, False)
    variants = [
        cache_key(endpoint("http://127.0.0.1:1/v1", model="other"), messages, 1, False),
        cache_key(endpoint("http://127.0.0.1:1/v1", temperature=0.1), messages, 1, False),
        cache_key(endpoint("http://127.0.0.1:1/v1", max_tokens=8), messages, 1, False),
        cache_key(ep, [{"role": "user", "content": "hi!"}], 1, False),
        cache_key(ep, messages, 2, False),
        cache_key(ep, messages, 1, True),
        cache_key(ep, messages, 1, False, salt="weights-v2"),
    ]
    assert len({key, *variants}) == 1 + len(variants)
    # The server address and the key do not change the reply, so they do not change the key.
    assert cache_key(endpoint("http://127.0.0.1:2/v1", api_key_env="OTHER"), messages, 1, False) == key


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
    with pytest.raises(FileNotFoundError, match="dvc repro models"):
        with local_server(str(tmp_path / "missing")):
            pass


@pytest.mark.slow
def test_transformers_serve_answers_and_is_stopped(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.delenv(KEY_ENV, raising=False)  # a loopback server needs no key
    model = str(tiny_model_dir)  # built like the `models` stage builds the default model
    with endpoint_url("local", model) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        ep = endpoint(url, model=model, max_tokens=8, concurrency=2)
        replies = complete_many_sync(ep, conversations(3), tmp_path / "cache", seed=1, json_mode=True)
    # A random-weight model may stop at once: that is an empty reply, reported and not cached.
    # Cut off at max_tokens, its text is the reply (truncated_is_error is off: generation metrics).
    assert all((r.error is None and r.text) or r.error == EMPTY_REPLY for r in replies), [r.error for r in replies]
    assert all(r.prompt_tokens > 0 and r.completion_tokens <= 8 for r in replies)  # usage is reported
    assert len(cache_files(tmp_path / "cache")) == sum(r.error is None for r in replies)
    with socket.socket() as s:  # the server is gone once the block ends
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_truncated_reply_is_an_error_and_never_cached(tmp_path):
    with ScriptedServer(faults=["length"]) as server:
        (reply,) = complete_many_sync(endpoint(server.base_url), conversations(1), tmp_path, seed=1, truncated_is_error=True)
        assert reply.error == TRUNCATED and reply.text is None
        assert list(tmp_path.rglob("*.json")) == []
        (again,) = complete_many_sync(endpoint(server.base_url), conversations(1), tmp_path, seed=1, truncated_is_error=True)
        assert again.error is None and server.requests == 2


def test_null_temperature_and_max_tokens_are_not_sent(tmp_path):
    with ScriptedServer() as server:
        complete_many_sync(endpoint(server.base_url, temperature=None, max_tokens=None), conversations(1), tmp_path, seed=1)
        body = server.bodies()[0]
        assert "temperature" not in body and "max_tokens" not in body and body["seed"] is not None


def test_cache_key_includes_the_normalised_endpoint():
    messages = [{"role": "user", "content": "hi"}]

    def key(url: str) -> str:
        return cache_key(endpoint(url), messages, 1, False)

    assert key("https://api.example.com/v1") == key("HTTPS://API.example.com:443/v1/")
    assert key("https://api.example.com/v1") != key("https://other.example.com/v1")
    assert key("https://api.example.com/v1") != key("http://127.0.0.1:8000/v1")
    assert key("http://127.0.0.1:8000/v1") == key("http://localhost:9000/v1") == key("local")
