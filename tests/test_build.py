"""The Alpaca build: validation that names file/line/field, the split, LLaMA-Factory and OpenAI files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.common.records import read_jsonl, with_id
from tuneline.data.alpaca import count_tokens, dataset_info, record_problems, split, to_alpaca, to_openai_chat

ROOT = Path(__file__).resolve().parents[1]


def rec(**kw) -> dict:
    return {
        "instruction": "How fine should I grind for espresso?",
        "input": "",
        "output": "Fine, like table salt.",
        **kw,
    }


def test_to_alpaca_fills_the_optional_fields_and_keeps_provenance():
    out = to_alpaca({"instruction": "q", "output": "a", "id": "x1", "source": "seed", "category": "beans"})
    assert out == {
        "instruction": "q",
        "input": "",
        "output": "a",
        "system": "",
        "history": [],
        "id": "x1",
        "source": "seed",
        "category": "beans",
    }


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


def test_split_is_deterministic_order_free_and_follows_the_fractions():
    records = [
        with_id({"instruction": f"q{i}", "output": f"a{i}", "source": "seed" if i % 3 else "crawl"})
        for i in range(600)
    ]
    a = split(records, 0.2, 0.1, seed=7)
    b = split(list(reversed(records)), 0.2, 0.1, seed=7)
    assert a == b
    train, val, test = a
    assert {r["id"] for r in train + val + test} == {r["id"] for r in records}
    assert 0.15 < len(val) / 600 < 0.25 and 0.06 < len(test) / 600 < 0.14
    crawl = [r for r in val if r["source"] == "crawl"]
    assert 0.13 < len(crawl) / 200 < 0.27  # each source is split by the same fractions
    assert split(records, 0.2, 0.1, seed=8) != a


def test_adding_20_records_moves_no_earlier_record():
    def make(i: int) -> dict:
        return with_id(
            {
                "instruction": f"Question {i}?",
                "output": f"Answer {i}.",
                "source": ("seed", "crawl", "dataset")[i % 3],
            }
        )

    before = [make(i) for i in range(100)]
    after = [make(i) for i in range(120)]
    after = after[50:] + after[:50]  # added and reordered
    old = dict(zip(("train", "val", "test"), split(before, 0.15, 0.15, seed=42)))
    new = dict(zip(("train", "val", "test"), split(after, 0.15, 0.15, seed=42)))
    assert old["test"] and old["train"] and old["val"]
    for name in ("train", "val", "test"):
        assert {r["id"] for r in old[name]} <= {r["id"] for r in new[name]}, name
    assert sum(len(p) for p in new.values()) == 120


def test_dataset_info_has_llama_factory_shape():
    info = dataset_info("tuneline", {"train": "train.json"})
    assert info == {
        "tuneline_train": {
            "file_name": "train.json",
            "formatting": "alpaca",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "system": "system",
                "history": "history",
            },
        }
    }


def test_openai_chat_expands_history_into_turns():
    record = to_alpaca(
        rec(system="Be brief.", input="Breville", history=[["Hi", "Hello!"], ["Espresso?", "Sure."]])
    )
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
    shards = tmp_path / "data/clean/records"
    shards.mkdir(parents=True)
    for name, part in (
        ("part-00000.jsonl", lines[:6]),
        ("part-00001.jsonl", lines[6:]),
    ):  # two shards, as clean cuts them
        (shards / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    subprocess.run(
        [sys.executable, "-m", "stages.build"],
        cwd=tmp_path,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )

    out = tmp_path / "data/alpaca"
    parts = {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 20
    assert all(
        set(r) >= {"instruction", "input", "output", "system", "history"} for p in parts.values() for r in p
    )
    rejects = read_jsonl(out / "rejects.jsonl")
    # each reject names its shard and its line there
    assert [(Path(r["file"]).name, r["line"], r["field"]) for r in rejects] == [
        ("part-00000.jsonl", 6, "output"),
        ("part-00001.jsonl", 16, "history[0]"),
    ]
    assert all(Path(r["file"]).parent == Path("data/clean/records") for r in rejects)
    info = json.loads((out / "dataset_info.json").read_text())
    assert all((out / entry["file_name"]).exists() for entry in info.values())
    chat = read_jsonl(out / "openai_train.jsonl")
    assert len(chat) == len(parts["train"]) and chat[0]["messages"][-1]["role"] == "assistant"
    metrics = json.loads((tmp_path / "metrics/build.json").read_text())
    assert metrics["records_in"] == 22 and metrics["records_out"] == 20 and metrics["rejected"] == 2
    assert metrics["rejects_by_field"] == {"output": 1, "history[0]": 1}


def run_build(
    tmp_path: Path, clean_records: list[dict], clean_rejects: list[dict]
) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    for name, rows in (("records", clean_records), ("rejects", clean_rejects)):
        (tmp_path / "data/clean" / name).mkdir(parents=True)
        (tmp_path / "data/clean" / name / "part-00000.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    return subprocess.run(
        [sys.executable, "-m", "stages.build"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("records", "rejects", "message"),
    [
        (
            [],
            [{"id": "a", "reason": "wrong_language"}, {"id": "b", "reason": "wrong_language"}],
            "the clean stage rejected all 2 records it received (wrong_language 2)",
        ),
        ([], [], "the augment stage (or crawl before it) produced none"),
        ([{"instruction": "no answer"}], [], "build rejected all 1 records"),
    ],
)
def test_zero_records_reaching_build_names_the_stage_that_emptied_them(tmp_path, records, rejects, message):
    proc = run_build(tmp_path, records, rejects)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_generated_records_stay_out_of_test_unless_asked():
    records = [{"id": f"g{i:03d}", "source": "generated"} for i in range(200)] + [
        {"id": f"s{i:03d}", "source": "seed"} for i in range(200)
    ]
    train, val, test = split(records, 0.15, 0.15, seed=1, generated_in_test=False)
    assert test and all(r["source"] == "seed" for r in test)
    together, val_together, test_together = split(records, 0.15, 0.15, seed=1, generated_in_test=True)
    moved = [r for r in test_together if r["source"] == "generated"]
    assert moved and all(r in train for r in moved)  # a generated test draw goes to train instead
    assert val == val_together and len(train) == len(together) + len(moved)
