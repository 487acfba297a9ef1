"""The Alpaca build: validation that names file/line/field, the split, LLaMA-Factory and OpenAI files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.alpaca import count_tokens, dataset_info, record_problems, split, to_alpaca, to_openai_chat
from tuneline.records import read_jsonl, with_id

ROOT = Path(__file__).resolve().parents[1]


def rec(**kw) -> dict:
    return {"instruction": "How fine should I grind for espresso?", "input": "", "output": "Fine, like table salt.", **kw}


def test_to_alpaca_fills_the_optional_fields_and_keeps_provenance():
    out = to_alpaca({"instruction": "q", "output": "a", "id": "x1", "source": "seed", "category": "beans"})
    assert out == {"instruction": "q", "input": "", "output": "a", "system": "", "history": [],
                   "id": "x1", "source": "seed", "category": "beans"}


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"output": "a"}, "instruction", "missing"),
        ({"instruction": "q"}, "output", "missing"),
        ({"instruction": "q", "output": "   "}, "output", "empty"),
        ({"instruction": 3, "output": "a"}, "instruction", "should be a string, got int"),
        ({"instruction": "q", "output": "a", "input": ["x"]}, "input", "should be a string, got list"),
        ({"instruction": "q", "output": "a", "history": "hi"}, "history", "should be a list"),
        ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0]", "pair of 2 strings"),
        ({"instruction": "q", "output": "a", "history": [["u", 5]]}, "history[0]", "pair of 2 strings"),
        ({"instruction": "q " * 50, "output": "a"}, "*", "over the token budget: 51 > build.max_tokens 20"),
    ],
)
def test_each_bad_input_kind_is_named(record, field, reason):
    problems = record_problems(record, max_tokens=20)
    assert problems and problems[0][0] == field
    assert reason in problems[0][1]


def test_valid_record_has_no_problems():
    assert record_problems(rec(system="You are a barista.", history=[["hi", "hello"]]), max_tokens=100) == []


def test_token_count_counts_chinese_characters():
    assert count_tokens("咖啡豆") == 3
    assert count_tokens("grind 咖啡 fine") == 4


def test_split_is_deterministic_stratified_and_order_free():
    records = [with_id({"instruction": f"q{i}", "output": f"a{i}", "source": "seed" if i % 3 else "crawl"}) for i in range(60)]
    a = split(records, 0.2, 0.1, seed=7)
    b = split(list(reversed(records)), 0.2, 0.1, seed=7)
    assert a == b
    train, val, test = a
    assert (len(train), len(val), len(test)) == (42, 12, 6)
    assert {r["id"] for r in train + val + test} == {r["id"] for r in records}
    crawl_val = [r for r in val if r["source"] == "crawl"]
    assert len(crawl_val) == 4  # 20 crawl records x 0.2: the split holds within each source
    assert split(records, 0.2, 0.1, seed=8) != a


def test_dataset_info_has_llama_factory_shape():
    info = dataset_info("tuneline", {"train": "train.json"})
    assert info == {"tuneline_train": {
        "file_name": "train.json", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"},
    }}


def test_openai_chat_expands_history_into_turns():
    record = to_alpaca(rec(system="Be brief.", input="Breville", history=[["Hi", "Hello!"], ["Espresso?", "Sure."]]))
    assert to_openai_chat(record)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Espresso?"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "How fine should I grind for espresso?\n\nBreville"},
        {"role": "assistant", "content": "Fine, like table salt."},
    ]


def test_build_stage_writes_splits_rejects_and_metrics(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    good = [rec(instruction=f"Question {i}?", output=f"Answer {i}.", source="seed") for i in range(20)]
    bad = [{"instruction": "no answer"}, {"instruction": "q", "output": "a", "history": [["x"]]}]
    lines = good[:5] + bad[:1] + good[5:] + bad[1:]
    (tmp_path / "data/clean").mkdir(parents=True)
    (tmp_path / "data/clean/records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    subprocess.run([sys.executable, "-m", "stages.build"], cwd=tmp_path, check=True,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})

    out = tmp_path / "data/alpaca"
    parts = {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 20
    assert all(set(r) >= {"instruction", "input", "output", "system", "history"} for p in parts.values() for r in p)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert [(r["line"], r["field"]) for r in rejects] == [(6, "output"), (22, "history[0]")]
    assert all(r["file"].endswith("data/clean/records.jsonl") for r in rejects)
    info = json.loads((out / "dataset_info.json").read_text())
    assert all((out / entry["file_name"]).exists() for entry in info.values())
    chat = read_jsonl(out / "openai_train.jsonl")
    assert len(chat) == len(parts["train"]) and chat[0]["messages"][-1]["role"] == "assistant"
    metrics = json.loads((tmp_path / "metrics/build.json").read_text())
    assert metrics["records_in"] == 22 and metrics["records_out"] == 20 and metrics["rejected"] == 2
    assert metrics["rejects_by_field"] == {"output": 1, "history[0]": 1}
