"""The augment library and stage, end to end against real servers on 127.0.0.1.

The stage runs as DVC runs it (`python -m stages.augment` in a project directory) against
a scripted OpenAI-compatible server whose replies include good records, records the rule
checks must flag, and malformed JSON; one test uses the real `transformers serve`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.openai_stub import ScriptedServer
from tuneline.common import params
from tuneline.common.records import InputError, read_jsonl, read_jsonl_dir, shard_files, write_jsonl_shards
from tuneline.data import augment

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "TUNELINE_TEST_AUGMENT_KEY"
KEY = "sk-tuneline-augment-test-52b9a0e4"

SEEDS = [
    {
        "instruction": "How long should a French press steep?",
        "input": "",
        "output": "About four minutes.",
        "category": "brewing",
    },
    {
        "instruction": "What ratio for pour-over?",
        "input": "",
        "output": "Start at 1:16.",
        "category": "brewing",
    },
    {
        "instruction": "Why is my espresso sour?",
        "input": "",
        "output": "Under-extraction: grind finer.",
        "category": "brewing",
    },
    {
        "instruction": "How fine for espresso?",
        "input": "",
        "output": "Like table salt, a bit finer.",
        "category": "grinding",
    },
    {
        "instruction": "Burr or blade grinder?",
        "input": "",
        "output": "Burr: the particles are even.",
        "category": "grinding",
    },
]
DOC = (
    "Coffee beans keep best in an airtight container away from light, heat and moisture.\n"
    "Whole beans stay fresh for about a month after roasting; ground coffee loses aroma within days.\n"
    "Freezing is fine for long storage if the beans are sealed and thawed only once."
)
CRAWL = [
    {
        "kind": "qa",
        "url": "http://site/faq.html",
        "question": "Do I need to descale?",
        "answer": "Yes, monthly.",
        "category": "cleaning",
    },
    {"kind": "doc", "url": "http://site/storage.html", "title": "Storing beans", "text": DOC},
]
DATASETS = [
    {
        "instruction": "Is decaf caffeine-free?",
        "input": "",
        "output": "Almost: about 97% is removed.",
        "category": "beans",
        "source": "dataset:faq",
    }
]


# --- the scripted model -------------------------------------------------------------------


def _n(prompt: str, pattern: str) -> int:
    return int(re.search(pattern, prompt).group(1))


def respond(body: dict) -> str:
    """Deterministic replies by prompt kind, with planted faults the review must catch.

    expand:   n requests; the second of each batch says MALFORMED (its answer call gets
              broken JSON) and the third EMPTY (its answer is an empty string)
    grounded: n pairs; the first question is the same in every call (duplicate after the
              first), the last answer is not in the passage (not_grounded)
    Like a sampling model, the rest varies with the prompt and the request seed.
    """
    first = body["messages"][0]["content"]
    tag = hashlib.sha256(f"{first}{body['seed']}".encode()).hexdigest()[:6]
    if '{"questions"' in first:
        n = _n(first, r"Write (\d+) new requests")
        kinds = ["plain", "MALFORMED", "EMPTY"]
        return json.dumps(
            {"questions": [f"Request {tag}-{i} {kinds[i % 3]} about coffee?" for i in range(n)]}
        )
    if '{"pairs"' in first:
        n = _n(first, r"Write (\d+) question-and-answer pairs")
        passage = re.search(r"<passage>\n(.*?)\n</passage>", first, re.S).group(1)
        sentences = [s for s in passage.split("\n") if s]
        pairs = [
            {"question": f"Question {tag}-{i} on storage?", "answer": sentences[i % len(sentences)]}
            for i in range(n)
        ]
        pairs[0]["question"] = "How should coffee beans be stored?"
        pairs[-1]["answer"] = "Roast the beans twice on a moonlit beach for ultimate flavour."
        return json.dumps({"pairs": pairs})
    if '{"answer"' in first:
        question = re.findall(r"\nRequest: (.*)\n", first)[-1]  # the examples come first
        if "MALFORMED" in question:
            return '{"answer": "unterminated'
        if "EMPTY" in question:
            return json.dumps({"answer": ""})
        return "Sure! ```json\n" + json.dumps({"answer": f"Answer to {question}"}) + "\n```"
    raise AssertionError(f"unexpected prompt: {first[:200]}")


# --- a project directory like the repository ----------------------------------------------


def make_project(root: Path, base_url: str, model: str = "stub", **augment_params) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "prompts", root / "prompts", dirs_exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["augment"].update(
        base_url=base_url,
        model=model,
        api_key_env=KEY_ENV,
        rounds=2,
        pilot_size=3,
        per_round=6,
        per_call=3,
        concurrency=2,
        requests_per_minute=60_000,
        reply_retries=1,
        max_retries=2,
    )
    params["augment"].update(augment_params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base = params["base"]
    for path, rows in ((base["seeds"], SEEDS), (f"{base['raw_dir']}/crawl.jsonl", CRAWL)):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_jsonl_shards(root / base["raw_dir"] / "datasets", DATASETS, base["shard_records"])
    (root / base["feedback"]).parent.mkdir(parents=True, exist_ok=True)
    (root / base["feedback"]).write_text("{}\n")  # the feedback stage's output with no review decisions yet
    return root


def stage_env() -> dict:
    return {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def run_stage(project: Path) -> subprocess.CompletedProcess:
    """The feedback stage (the review decisions as augment reads them), then augment, as `dvc repro` runs
    them."""
    for stage in ("feedback", "augment"):
        result = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=project,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def stage_log(project: Path) -> str:
    """The stage's log file (tuneline.common.logs): library and per-call lines that the terminal does not
    show."""
    return (project / "metrics/logs/augment.log").read_text()


def outputs(project: Path) -> tuple[list[dict], list[dict], dict]:
    return (
        read_jsonl_dir(project / "data/augmented/records"),
        read_jsonl(project / "data/augmented/rejects.jsonl"),
        json.loads((project / "metrics/augment.json").read_text()),
    )


@pytest.fixture(scope="module")
def stub():
    with ScriptedServer(respond=respond) as server:
        yield server


@pytest.fixture(scope="module")
def first_run(stub, tmp_path_factory):
    """The stage run once against the scripted server: (project, server bodies, server requests, log)."""
    project = make_project(tmp_path_factory.mktemp("augment"), stub.base_url)
    stub.reset_counts()
    result = run_stage(project)
    return project, stub.bodies(), stub.requests, result.stdout + result.stderr


# --- the stage ----------------------------------------------------------------------------


def test_records_pass_through_and_are_generated(first_run):
    project, _, _, _ = first_run
    records, _, metrics = outputs(project)
    by_source = {
        s: [r for r in records if r["source"] == s] for s in ("seed", "crawl", "dataset", "generated")
    }
    assert len(by_source["seed"]) == 5 and len(by_source["crawl"]) == 1 and len(by_source["dataset"]) == 1
    assert (
        by_source["crawl"][0]["url"] == "http://site/faq.html"
        and by_source["crawl"][0]["category"] == "cleaning"
    )
    assert (
        by_source["dataset"][0]["origin"] == "dataset:faq" and by_source["dataset"][0]["category"] == "beans"
    )
    generated = by_source["generated"]
    assert generated and metrics["records_by_source"]["generated"] == len(generated) == metrics["accepted"]
    grounded = [r for r in generated if r["generator"] == "grounded"]
    expanded = [r for r in generated if r["generator"] == "expand"]
    assert grounded and all(r["url"] == "http://site/storage.html" and r["output"] in DOC for r in grounded)
    assert expanded and all(
        "plain" in r["instruction"] and r["category"] in ("brewing", "grinding") for r in expanded
    )
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    assert all(
        set(r) >= {"instruction", "input", "output", "system", "history", "id", "source"} for r in records
    )


def test_flagged_records_and_bad_replies_are_rejected_with_reasons(first_run):
    project, _, _, _ = first_run
    _, rejects, metrics = outputs(project)
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append(r)
    assert set(by_reason) == {"empty_output", "not_grounded", "invalid_json", "duplicate"}
    assert len(by_reason["duplicate"]) == 2  # 3 grounded calls, each repeating one question
    assert {r["record"]["instruction"] for r in by_reason["duplicate"]} == {
        "How should coffee beans be stored?"
    }
    assert all("EMPTY" in r["record"]["instruction"] for r in by_reason["empty_output"])
    assert all("moonlit" in r["record"]["output"] for r in by_reason["not_grounded"])
    malformed = by_reason["invalid_json"]
    assert all(r["raw"] == '{"answer": "unterminated' and r["attempts"] == 2 for r in malformed)
    assert metrics["rejected_records_by_reason"] == {
        reason: len(by_reason[reason]) for reason in ("duplicate", "empty_output", "not_grounded")
    }
    assert metrics["failed_replies_by_reason"] == {"invalid_json": len(malformed)}
    for round_log in metrics["rounds"]:
        assert round_log["generated"] == round_log["accepted"] + round_log["rejected"]
    # round 1: 3 requests and 3 pairs asked; round 2: 6 and 6
    assert [r["asked"] for r in metrics["rounds"]] == [6, 12]


def test_malformed_reply_is_asked_again_with_the_reason(first_run):
    _, bodies, _, _ = first_run
    retries = [b for b in bodies if len(b["messages"]) == 3]
    assert retries and all(b["messages"][1]["content"] == '{"answer": "unterminated' for b in retries)
    assert all(
        "could not be used (the reply is not a JSON object)" in b["messages"][2]["content"] for b in retries
    )


def test_round_two_prompts_carry_round_one_mistakes(first_run):
    _, bodies, _, _ = first_run
    prompts = [b["messages"][0]["content"] for b in bodies]
    grounded = [p for p in prompts if '{"pairs"' in p]
    expand = [p for p in prompts if '{"questions"' in p]
    # round 1 asks 3 per generator in one call each; round 2 asks 6 in two calls each
    assert len(grounded) == 3 and len(expand) == 3
    assert "Avoid these mistakes" not in grounded[0] and "Avoid these mistakes" not in expand[0]
    for p in grounded[1:]:
        assert "Avoid these mistakes" in p and "moonlit beach" in p and "not supported by the passage" in p
        assert "not_grounded" not in p  # reasons in words, not rule ids
    for p in expand[1:]:
        assert "Avoid these mistakes" in p and "the answer is empty" in p and "not valid JSON" in p
        assert "empty_output" not in p and "invalid_json" not in p


def test_reviewer_rejects_join_the_next_rounds_mistakes(first_run, stub, tmp_path):
    from tuneline.data.review import append_decision, make_decision

    project = make_project(tmp_path / "reviewed", stub.base_url)
    shutil.copytree(first_run[0] / "cache", project / "cache")
    records, _, _ = outputs(first_run[0])
    pilot = next(
        r for r in records if r["source"] == "generated" and r["round"] == 1 and r["generator"] == "grounded"
    )
    decision = make_decision(pilot, "reject", "a reviewer", "answers a question nobody asked")
    append_decision(project / "data/review/decisions.jsonl", decision)
    stub.reset_counts()
    run_stage(project)
    prompts = [b["messages"][0]["content"] for b in stub.bodies()]
    # Only the grounded round-2 prompts changed (expand's came from the cache), and they carry
    # the person's reason next to the rule flags.
    assert len(prompts) == 2 and all('{"pairs"' in p for p in prompts)
    for p in prompts:
        assert (
            f'"{pilot["instruction"]} -> ' in p
            and "a reviewer rejected it: answers a question nobody asked" in p
        )
        assert "not supported by the passage" in p
    rounds = outputs(project)[2]["rounds"]
    assert [r["human_rejected"] for r in rounds] == [1, 0]


def test_tokens_are_counted_and_the_key_is_never_written(first_run, stub):
    project, bodies, requests, log = first_run
    _, _, metrics = outputs(project)
    assert metrics["llm"]["calls"] == requests == metrics["llm"]["this_run"]["calls"]
    assert metrics["llm"]["prompt_tokens"] > 0 and metrics["llm"]["completion_tokens"] > 0
    assert all(b["seed"] is not None and b["response_format"]["type"] == "json_schema" for b in bodies)
    # Each call carries the schema of the JSON its step parses (augment.structured: json_schema).
    schemas = {next(iter(b["response_format"]["json_schema"]["schema"]["properties"])) for b in bodies}
    assert schemas == {"questions", "answer", "pairs"}
    files = [p for p in project.rglob("*") if p.is_file()]
    assert any("cache/llm" in str(p) for p in files)
    for path in files:
        assert KEY not in path.read_text(errors="replace"), path
    assert KEY not in log and "calls" in log and KEY not in stage_log(project)


def test_second_run_makes_no_request_and_writes_the_same(first_run, stub):
    project, _, _, _ = first_run
    before = [
        p.read_bytes()
        for p in [*shard_files(project / "data/augmented/records"), project / "data/augmented/rejects.jsonl"]
    ]
    stub.reset_counts()
    run_stage(project)
    assert stub.requests == 0
    after = [
        p.read_bytes()
        for p in [*shard_files(project / "data/augmented/records"), project / "data/augmented/rejects.jsonl"]
    ]
    assert after == before
    assert outputs(project)[2]["llm"]["this_run"]["calls"] == 0


def test_replies_of_a_loopback_url_are_not_reused_for_another_endpoint(first_run, tmp_path):
    # The first run's replies came from a server on one loopback port. "local" (the server the stage
    # starts for a model directory) is another endpoint: with those replies in the cache, the stage still
    # has to start its server, which fails here because 'stub' is no model directory.
    project = make_project(tmp_path / "local", "local")
    shutil.copytree(first_run[0] / "cache", project / "cache")
    result = subprocess.run(
        [sys.executable, "-m", "stages.feedback"], cwd=project, env=stage_env(), capture_output=True
    )
    result = subprocess.run(
        [sys.executable, "-m", "stages.augment"],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode == 2
        and "error: augment.model 'stub' is not a local model directory" in result.stderr
    )


def test_editing_a_prompt_template_asks_again(first_run, stub, tmp_path):
    project = make_project(tmp_path / "edited", stub.base_url)
    shutil.copytree(first_run[0] / "cache", project / "cache")
    template = project / "prompts/grounded.txt"
    template.write_text(template.read_text().replace("might ask.", "might ask, in plain words."))
    stub.reset_counts()
    run_stage(project)
    prompts = [b["messages"][0]["content"] for b in stub.bodies()]
    assert prompts and all('{"pairs"' in p for p in prompts)  # only the edited template's calls


def test_killed_run_resumes_with_exactly_the_missing_requests(tmp_path):
    with ScriptedServer(respond=respond, latency_s=0.05) as server:
        whole = make_project(tmp_path / "whole", server.base_url, concurrency=1)
        run_stage(whole)
        total = server.requests

        server.reset_counts()
        killed = make_project(tmp_path / "killed", server.base_url, concurrency=1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.augment"],
            cwd=killed,
            env=stage_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while len(list((killed / "cache/llm").rglob("*.json"))) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: as hard as a crash
        proc.wait()
        saved = len(list((killed / "cache/llm").rglob("*.json")))
        assert 5 <= saved < total and server.answered >= saved
        assert not (killed / "data/augmented/records").exists()

        server.reset_counts()
        run_stage(killed)
        assert server.requests == total - saved
    assert outputs(killed)[0] == outputs(whole)[0]
    assert outputs(killed)[1] == outputs(whole)[1]


def test_batch_stage_killed_while_polling_resumes_the_recorded_batch(first_run, tmp_path):
    with ScriptedServer(respond=respond, batch_delay_s=1.0) as server:
        project = make_project(tmp_path / "batch", server.base_url, batch=True, batch_poll_s=0.1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.augment"],
            cwd=project,
            env=stage_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not list((project / "cache/llm/batches").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # killed while its first batch runs
        proc.wait()
        assert len(server.batches) == 1

        run_stage(project)
        submitted = server.batch_requests()
        # The rerun polled the recorded batch instead of submitting it again: no request is in two batches.
        assert len(submitted) > 1 and sum(map(len, submitted)) == len({k for ids in submitted for k in ids})
        assert server.requests == 0  # no live call: every reply came through the Batch API
        records, rejects, metrics = outputs(project)
        assert metrics["llm"]["batch_calls"] == metrics["llm"]["calls"] == sum(map(len, submitted))
        # Same requests, seeds and replies as the live run: the same records and rejects.
        assert records == outputs(first_run[0])[0]
        assert [r["reasons"] for r in rejects] == [r["reasons"] for r in outputs(first_run[0])[1]]

        run_stage(project)  # fully cached: nothing submitted
        assert len(server.batch_requests()) == len(submitted)


def test_batch_with_the_local_server_is_refused_naming_the_key(tmp_path):
    project = make_project(tmp_path / "local", "local", batch=True)
    result = subprocess.run(
        [sys.executable, "-m", "stages.augment"],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode == 2
        and "augment.batch: true needs an endpoint with the OpenAI Batch API" in result.stderr
    )


# --- the real server ----------------------------------------------------------------------


@pytest.mark.slow
def test_stage_with_the_local_server_writes_records_under_the_schema(tmp_path, tiny_model_dir):
    model = tiny_model_dir  # built like the `models` stage builds the default model, with random weights
    project = make_project(
        tmp_path / "project",
        "local",
        model=str(model),
        max_tokens=512,
        rounds=1,
        pilot_size=2,
        per_call=2,
        max_question_chars=40,
        max_answer_chars=60,
    )
    run_stage(project)
    records, rejects, metrics = outputs(project)
    assert "started `transformers serve" in stage_log(project)
    assert subprocess.run(["pgrep", "-f", f"serve.*{model}"], capture_output=True).returncode == 1
    assert metrics["records_by_source"]["seed"] == 5
    # Decoded under the JSON schema, even a random-weight model's replies parse: every generated record
    # is accepted or rejected with its reasons, and no reply fails as invalid JSON.
    assert (
        metrics["generated"] >= 2
        and metrics["accepted"] + metrics["rejected_records"] == metrics["generated"]
    )
    assert not {"invalid_json", "invalid_schema"} & set(metrics["failed_replies_by_reason"])
    for reject in rejects:
        assert reject["reasons"], reject
    generated = [r for r in records if r["source"] == "generated"]
    assert all(
        len(r["instruction"]) <= 40 and len(r["output"]) <= 60 for r in generated
    )  # the schema bounds them
    # A fully cached rerun starts no server and sends nothing.
    (project / "metrics/logs/augment.log").unlink()
    run_stage(project)
    assert "started `transformers serve" not in stage_log(project)
    assert outputs(project)[2]["llm"]["this_run"]["calls"] == 0


# --- the pure parts -----------------------------------------------------------------------


def test_parse_json_object_tolerates_fences_and_chatter():
    assert augment.parse_json_object('{"a": 1}') == {"a": 1}
    assert augment.parse_json_object('Here:\n```json\n{"a": 2}\n```\nDone.') == {"a": 2}
    assert augment.parse_json_object('Sure. {"a": 3} Hope that helps') == {"a": 3}
    for bad in ("", "[1, 2]", '{"a": ', "no json here"):
        with pytest.raises(augment.ReplyError) as err:
            augment.parse_json_object(bad)
        assert err.value.reason == "invalid_json"


def test_parsers_validate_the_schema():
    assert augment.parse_questions('{"questions": [" a ", "b"]}') == ["a", "b"]
    assert augment.parse_pairs('{"pairs": [{"question": "q", "answer": "a"}]}') == [("q", "a")]
    assert augment.parse_answer('{"answer": " x "}') == "x"
    for parser, bad in (
        (augment.parse_questions, '{"questions": []}'),
        (augment.parse_questions, '{"questions": [1]}'),
        (augment.parse_pairs, '{"pairs": [{"question": "q"}]}'),
        (augment.parse_answer, '{"text": "a"}'),
    ):
        with pytest.raises(augment.ReplyError) as err:
            parser(bad)
        assert err.value.reason == "invalid_schema"


def test_chunks_respect_the_size_and_keep_all_text():
    text = "First paragraph is short.\n" + "A long sentence goes on. " * 40 + "\nLast one."
    chunks = augment.chunk_text(text, 120)
    assert all(len(c) <= 120 for c in chunks) and len(chunks) > 5
    assert "".join(chunks).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_grounding_share():
    passage = "Whole beans stay fresh for about a month after roasting."
    assert augment.grounding("Whole beans stay fresh for about a month.", passage) == 1.0
    assert augment.grounding("Roast twice on a moonlit beach.", passage) < 0.5
    assert augment.grounding("", passage) == 0.0
    assert augment.grounding("咖啡豆新鲜", "咖啡豆在烘焙后一个月内保持新鲜") == 1.0


def test_bad_input_lines_name_file_line_and_field(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps(SEEDS[0]) + "\n\n" + json.dumps({"instruction": "q", "output": ""}) + "\n")
    with pytest.raises(InputError, match=r"seeds.jsonl:3: .*'output'"):
        augment.seed_records(seeds)
    crawl = tmp_path / "crawl.jsonl"
    crawl.write_text(json.dumps({"kind": "page", "url": "u"}) + "\n")
    with pytest.raises(InputError, match=r"crawl.jsonl:1: field 'kind' is 'page'"):
        augment.crawl_items(crawl)
    crawl.write_text("{not json\n")
    with pytest.raises(InputError, match=r"crawl.jsonl:1: not valid JSON"):
        augment.crawl_items(crawl)


def test_grounded_chunks_go_round_robin_over_documents():
    docs = [
        (
            f"http://site/{name}.html",
            name,
            "\n".join(f"{name} paragraph {i} " + "x" * 40 for i in range(3)),
            None,
        )
        for name in ("c", "a", "b")
    ]
    chunks = augment.doc_chunks(docs, 60)
    assert [c.url.rsplit("/", 1)[1] for c in chunks[:3]] == ["a.html", "b.html", "c.html"]
    assert len(chunks) == 9 and chunks[3].url.endswith("a.html") and "paragraph 1" in chunks[3].text


def test_chunk_budget_keeps_a_small_crawl_and_samples_a_large_one_the_same_way_each_run():
    docs = [
        (
            f"http://site/{i}.html",
            f"page {i}",
            "\n".join(f"page {i} paragraph {j} " + "x" * 40 for j in range(4)),
            None,
        )
        for i in range(25)
    ]
    chunks = augment.doc_chunks(docs, 60)
    assert len(chunks) == 100
    assert augment.budgeted_chunks(chunks, 100, seed=1) == chunks
    sample = augment.budgeted_chunks(chunks, 30, seed=1)
    assert len(sample) == 30 and len(set(sample)) == 30
    assert sample == augment.budgeted_chunks(chunks, 30, seed=1)  # deterministic
    assert sample != augment.budgeted_chunks(chunks, 30, seed=2)
    assert sample == [c for c in chunks if c in sample]  # the round-robin order is kept
    assert len({c.url for c in sample}) > 10  # a sample of the whole crawl, not of its first pages


def _passage(prompt: str) -> str:
    return re.search(r"<passage>\n(.*?)\n</passage>", prompt, re.S).group(1)


@pytest.mark.parametrize(("budget", "read"), [(200, 7), (4, 4)])
def test_grounded_rounds_read_every_chunk_in_the_budget(tmp_path, budget, read):
    # Seven one-chunk documents; the pilot (pilot_size 3 = one call) reads one, round 2 the rest.
    pages = [
        {
            "kind": "doc",
            "url": f"http://site/p{i}.html",
            "title": f"Page {i}",
            "text": DOC.replace("Coffee beans", f"Page {i} beans"),
        }
        for i in range(7)
    ]
    with ScriptedServer(respond=respond) as server:
        project = make_project(tmp_path / str(budget), server.base_url, chunk_budget=budget)
        (project / "data/raw/crawl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pages))
        run_stage(project)
        grounded = [
            b["messages"][0]["content"] for b in server.bodies() if '{"pairs"' in b["messages"][0]["content"]
        ]
    _, _, metrics = outputs(project)
    assert metrics["chunks"] == 7 and metrics["chunks_in_budget"] == read
    first_round = [p for p in grounded if "Avoid these mistakes" not in p]
    assert len(first_round) == 1  # the pilot stays one call (pilot_size 3, per_call 3)
    # Round 2 reads each unread chunk of the budget once, and asks at least per_round (6 = 2 calls).
    assert len(grounded) == 1 + max(2, read - 1)
    assert len({_passage(p) for p in grounded}) == read


def test_too_many_failed_calls_fail_the_stage_and_are_listed(tmp_path):
    with ScriptedServer(respond=respond, faults=["500"]) as server:
        project = make_project(
            tmp_path / "failing", server.base_url, rounds=1, max_retries=0, max_failed_fraction=0.1
        )
        result = subprocess.run(
            [sys.executable, "-m", "stages.augment"],
            cwd=project,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 3  # an endpoint error, not a user's mistake (2)
    assert "more than augment.max_failed_fraction 0.1" in result.stderr
    metrics = json.loads((project / "metrics/augment.json").read_text())
    assert [c["detail"].split(":")[0] for c in metrics["failed_calls"]] == ["InternalServerError"]
    assert (
        len(list((project / "cache/llm").rglob("*.json"))) == metrics["llm"]["calls"] - 1
    )  # the answered ones are kept


def test_review_applies_the_clean_stages_language_and_pii_policy():
    p, clean = (
        params.section("augment", path=ROOT / "params.yaml"),
        params.section("clean", path=ROOT / "params.yaml"),
    )
    german = {
        "instruction": "Wie lange sollte eine French Press ziehen?",
        "output": "Etwa vier Minuten, dann langsam drücken und sofort ausgießen.",
    }
    iban = {
        "instruction": "Where do I pay for the beans?",
        "output": "Transfer the money to DE89 3704 0044 0532 0130 00 first.",
    }

    def problems(record: dict, rules) -> list[str]:
        return augment.record_problems(record, None, p.min_grounding, set(), rules)

    off = augment.review_rules(
        dataclasses.replace(p, review_clean_rules=False), dataclasses.replace(clean, pii="reject")
    )
    assert problems(german, off) == [] and problems(iban, off) == []
    on = augment.review_rules(p, dataclasses.replace(clean, pii="reject"))
    assert problems(german, on) == ["wrong_language"] and problems(iban, on) == ["pii"]
    # With clean.pii: redact the clean stage keeps such a record (redacted), so the review does too.
    assert problems(iban, augment.review_rules(p, clean)) == []
    # The next round's prompt says why in words, not by rule id.
    feedback = augment.mistakes_from([{"kind": "record", "record": german, "reasons": ["wrong_language"]}], 3)
    assert feedback[0]["reasons"] == ["the text is not in an allowed language"]


def test_an_empty_seeds_file_fails_the_stage_naming_the_file(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    seeds = tmp_path / "data" / "seeds" / "seeds.jsonl"
    seeds.parent.mkdir(parents=True)
    seeds.write_text("\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "stages.augment"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode != 0, done.stderr[-2000:]
    assert "data/seeds/seeds.jsonl holds no seed record (base.seeds)" in done.stderr
    assert not (tmp_path / "data" / "augmented").exists()
