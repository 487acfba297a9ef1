"""tuneline.model.tokenization and the tokenize stage: rendering, label masks, length limits, packing."""

from __future__ import annotations

import datetime
import json

import flash_like
import pytest
import torch
from datasets import load_from_disk
from stage_project import make_project, seed_records

from tuneline.data.alpaca import to_messages
from tuneline.model.modeling import load_tokenizer
from tuneline.model.templates import CHATML, TEMPLATES, render, render_many, with_fixed_date
from tuneline.model.tokenization import (
    IGNORE,
    best_fit_decreasing,
    collate,
    encode,
    fit_length,
    pack,
    pack_batch,
    piece_ids,
    tokenize_batch,
    tokenize_example,
)

RECORD = {
    "system": "You are a patient barista.",
    "history": [
        ["What is a flat white?", "Espresso with thin, velvety steamed milk."],
        ["And a cortado?", "Espresso cut with an equal part of warm milk."],
    ],
    "instruction": "Which one is stronger?",
    "input": "Same cup size.",
    "output": "The cortado: it has less milk per shot.",
}
ANSWERS = [RECORD["history"][0][1], RECORD["history"][1][1], RECORD["output"]]
# What ends an assistant turn in each template: the answer's label span is the answer plus this.
TURN_END = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
}  # what follows the end of turn (a newline) is no answer
MODELS = [("tiny_model_dir", "chatml"), ("tiny_llama_dir", "llama3")]


@pytest.fixture(params=MODELS, ids=[t for _, t in MODELS])
def tokenizer_and_template(request):
    fixture, template = request.param
    return load_tokenizer(str(request.getfixturevalue(fixture))), template


def labelled_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive tokens that carry a label."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    return spans + [current] if current else spans


def test_decode_gives_back_the_rendered_conversation(tokenizer_and_template):
    tokenizer, template = tokenizer_and_template
    input_ids, labels = encode(tokenizer, RECORD, "auto", train_on_prompt=False)
    rendered = render(tokenizer, to_messages(RECORD), "auto")
    assert tokenizer.decode(input_ids) == rendered
    assert len(labels) == len(input_ids)
    # the template is the tokenizer's own, and the bos token (Llama 3 has one) appears exactly once
    assert rendered.count(RECORD["system"]) == 1 and rendered.startswith(
        tokenizer.bos_token or "<|im_start|>"
    )
    if tokenizer.bos_token:
        assert input_ids.count(tokenizer.bos_token_id) == 1


def test_labels_cover_exactly_the_assistant_answers(tokenizer_and_template):
    tokenizer, template = tokenizer_and_template
    input_ids, labels = encode(tokenizer, RECORD, "auto", train_on_prompt=False)
    assert all(label in (IGNORE, token) for token, label in zip(input_ids, labels))
    spans = [tokenizer.decode(span) for span in labelled_spans(input_ids, labels)]
    assert spans == [answer + TURN_END[template] for answer in ANSWERS]


def test_named_template_overrides_the_tokenizer_s_own(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    input_ids, labels = encode(tokenizer, RECORD, "alpaca", train_on_prompt=False)
    assert tokenizer.decode(input_ids) == render(tokenizer, to_messages(RECORD), "alpaca")
    assert "### Instruction:" in tokenizer.decode(input_ids)
    spans = [tokenizer.decode(span) for span in labelled_spans(input_ids, labels)]
    assert spans == [
        answer + tokenizer.eos_token for answer in ANSWERS
    ]  # the blank line after it is no answer


# Llama 3.1's way of printing the date in the system header, over ChatML turns.
DATED = (
    '{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
    '{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n" + CHATML
)


def test_a_template_that_prints_today_s_date_prints_the_fixed_one(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    today = datetime.date.today().strftime("%d %b %Y")
    tokenizer.chat_template = DATED
    assert f"Today Date: {today}" in render(
        tokenizer, to_messages(RECORD), "auto"
    )  # transformers' own behaviour
    tokenizer.chat_template = with_fixed_date(DATED, "2025-03-01")
    text = render(tokenizer, to_messages(RECORD), "auto")
    assert "Today Date: 01 Mar 2025" in text and today not in text
    assert with_fixed_date(CHATML, "2025-03-01") == CHATML
    with pytest.raises(ValueError, match="not a string literal"):
        with_fixed_date("{{ strftime_now(fmt) }}", "2025-03-01")
    with pytest.raises(ValueError, match="Invalid isoformat"):
        with_fixed_date(DATED, "01/03/2025")


def test_select_scores_a_dated_template_with_the_fixed_date_too(tiny_model_dir, tmp_path):
    from stages.select import local_tokenizer
    from tuneline.common.params import Candidate

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = DATED
    tokenizer.save_pretrained(tmp_path)
    today = datetime.date.today().strftime("%d %b %Y")
    scored = local_tokenizer(Candidate(kind="local", model=str(tmp_path)), "auto", "2025-03-01")
    text = render(scored, to_messages(RECORD), "auto")
    assert "Today Date: 01 Mar 2025" in text and today not in text


def test_train_on_prompt_labels_everything_but_the_first_token(tokenizer_and_template):
    tokenizer, _ = tokenizer_and_template
    input_ids, labels = encode(tokenizer, RECORD, "auto", train_on_prompt=True)
    assert labels[0] == IGNORE
    assert labels[1:] == input_ids[1:]


def test_truncation_leaves_out_the_oldest_history_turns_and_never_cuts_an_answer(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    full = encode(tokenizer, RECORD, "auto", train_on_prompt=False)
    one_turn, no_history = (
        encode(tokenizer, {**RECORD, "history": RECORD["history"][k:]}, "auto", False) for k in (1, 2)
    )
    n, n1, n0 = (len(ids) for ids, _ in (full, one_turn, no_history))
    assert n > n1 > n0
    for max_length, expected in (
        (n, full),
        (n - 1, one_turn),
        (n1, one_turn),
        (n1 - 1, no_history),
        (n0, no_history),
    ):
        row = tokenize_example(RECORD, tokenizer, "auto", max_length, "truncate", False)
        assert (row["input_ids"], row["labels"]) == expected
        assert (row["status"], row["original_length"]) == ("ok" if max_length == n else "truncated", n)
        assert row["answer_tokens"] == sum(1 for label in row["labels"] if label != IGNORE)
        spans = labelled_spans(row["input_ids"], row["labels"])
        assert (
            tokenizer.decode(spans[-1]) == RECORD["output"] + TURN_END["chatml"]
        )  # the answer whole, with its end
        assert all(im_end in span for span in spans)
    # even without its history the record does not fit: dropped, never cut
    assert (
        tokenize_example(RECORD, tokenizer, "auto", n0 - 1, "truncate", False)["status"] == "dropped_overlong"
    )
    assert tokenize_example(RECORD, tokenizer, "auto", n - 1, "drop", False)["status"] == "dropped_overlong"
    # an answer longer than the limit is dropped too: its end of turn would be cut
    long_answer = {**RECORD, "history": [], "output": " ".join(["velvety"] * 400)}
    assert (
        tokenize_example(long_answer, tokenizer, "auto", 256, "truncate", False)["status"]
        == "dropped_overlong"
    )
    assert fit_length(*full, n, "truncate") == (*full, "ok")
    assert fit_length(*full, n - 1, "truncate") == ([], [], "dropped_overlong")  # no shorter version offered


def test_pack_keeps_whole_examples_in_order_with_restarting_positions():
    examples = [([i] * length, [i] * length) for i, length in enumerate([5, 3, 4, 6, 2, 7], start=1)]
    packs = list(pack(iter(examples), max_length=9))
    assert [p["num_examples"] for p in packs] == [2, 1, 2, 1]
    assert all(len(p["input_ids"]) <= 9 for p in packs)
    assert [t for p in packs for t in p["input_ids"]] == [t for ids, _ in examples for t in ids]
    assert packs[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]


def test_best_fit_decreasing_fills_bins_that_in_order_packing_leaves_part_empty():
    lengths = [5, 3, 4, 6, 2, 7]
    bins = best_fit_decreasing(lengths, max_length=9)
    # longest first, each into the bin it leaves least room in: three full bins where packing in order needs
    # four
    assert bins == [[5, 4], [3, 1], [0, 2]]
    assert len(list(pack(iter([([0] * n, [0] * n) for n in lengths]), max_length=9))) == 4
    assert best_fit_decreasing([12, 3], max_length=9) == [[0], [1]]  # too long for any bin: a bin of its own
    assert best_fit_decreasing([6, 5, 4, 3], max_length=10) == [
        [0, 2],
        [1, 3],
    ]  # the 4 fills the bin with 4 left, not 5


def test_pack_batch_keeps_every_example_whole_with_restarting_positions():
    examples = [([i] * n, [-i] * n) for i, n in enumerate([5, 3, 4, 6, 2, 7], start=1)]
    packed = pack_batch(
        {"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}, max_length=9
    )
    assert packed["num_examples"] == [2, 2, 2] and all(len(ids) == 9 for ids in packed["input_ids"])
    assert sorted(t for ids in packed["input_ids"] for t in ids) == sorted(
        t for ids, _ in examples for t in ids
    )
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        assert labels == [-t for t in ids]  # labels travel with their tokens
        # positions restart exactly where one example's tokens end and the next one's begin
        assert [k for k, pos in enumerate(positions) if pos == 0] == [0] + [
            k for k in range(1, 9) if ids[k] != ids[k - 1]
        ]


def reference_encode(tokenizer, record: dict, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """The label mask spelled out the slow way: one render per turn prefix, one tokenizer call per piece."""
    messages = to_messages(record)
    ids, labels, done = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(tokenizer, messages[:i], "auto", add_generation_prompt=True)
            full = render(tokenizer, messages[: i + 1], "auto")
            answer = full[len(prompt) :]
            # the tiny models end turns with their EOS; what follows the end of turn is no answer
            cut = answer.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)
            for text, is_answer in (
                (prompt[len(done) :], False),
                (answer[:cut], True),
                (answer[cut:], False),
            ):
                piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
                ids += piece
                labels += piece if is_answer or train_on_prompt else [IGNORE] * len(piece)
            done = full
    labels[0] = IGNORE
    return ids, labels


def test_batched_tokenize_gives_what_one_render_per_prefix_and_one_call_per_piece_give(
    tokenizer_and_template,
):
    tokenizer, _ = tokenizer_and_template
    records = [RECORD, *seed_records()[:30]]
    for train_on_prompt in (False, True):
        batch = tokenize_batch(
            {k: [r.get(k) for r in records] for k in RECORD},
            tokenizer,
            "auto",
            10**6,
            "truncate",
            train_on_prompt,
        )
        expected = [reference_encode(tokenizer, r, train_on_prompt) for r in records]
        assert list(zip(batch["input_ids"], batch["labels"])) == expected
        assert (
            batch["input_ids"][0]
            == tokenize_example(RECORD, tokenizer, "auto", 10**6, "truncate", train_on_prompt)["input_ids"]
        )


def test_render_many_gives_what_apply_chat_template_renders(tokenizer_and_template):
    """render_many skips apply_chat_template's message normalisation; the text must not change, for
    the tokenizer's own template and every named one, with and without the generation prompt."""
    tokenizer, _ = tokenizer_and_template
    conversations = [to_messages(RECORD), to_messages(RECORD, with_answer=False)] + [
        to_messages(r) for r in seed_records()[:20]
    ]
    for template in ["auto", *TEMPLATES]:
        chat_template = tokenizer.chat_template if template == "auto" else TEMPLATES[template]
        for add_generation_prompt in (False, True):
            expected = tokenizer.apply_chat_template(
                conversations,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            assert render_many(tokenizer, conversations, template, add_generation_prompt) == expected


def test_piece_ids_are_the_tokenizer_s_own_ids_and_respect_its_settings(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = [
        "<|im_start|>user\nHow fine for espresso?<|im_end|>\n",
        "Fine, like table salt.",
        "",
        "咖啡 ☕ ok",
    ]
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert piece_ids(tokenizer, texts) == expected
    assert expected[0][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens stay whole
    # a backend left truncating (a tokenizer.json can ship so) is not used as is: the tokenizer's own call
    # turns truncation off, so piece_ids must give the same untruncated ids
    tokenizer.backend_tokenizer.enable_truncation(max_length=2)
    assert piece_ids(tokenizer, texts) == expected


def per_example_losses(model, batch: dict, example_of_token: torch.Tensor) -> dict[int, float]:
    """Mean answer-token loss of each example, from one forward pass over `batch`."""
    with torch.no_grad():
        logits = model(
            **{k: v for k, v in batch.items() if k not in ("labels", "use_cache")}, use_cache=False
        ).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )
    owners = example_of_token[:, 1:]
    mask = labels != IGNORE
    return {int(e): float(loss[mask & (owners == e)].mean()) for e in owners[mask].unique()}


def test_packed_and_unpacked_give_the_same_per_example_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    records = [RECORD, *seed_records()[:5]]
    examples = [encode(tokenizer, r, "auto", train_on_prompt=False) for r in records]
    pad = tokenizer.pad_token_id

    unpacked = collate([{"input_ids": ids, "labels": labels} for ids, labels in examples], pad)
    row_of = torch.arange(len(examples)).unsqueeze(1).expand_as(unpacked["input_ids"])
    expected = per_example_losses(model, unpacked, row_of)

    packs = list(pack(iter(examples), max_length=max(len(i) for i, _ in examples) * 3))
    assert len(packs) < len(examples) and any(p["num_examples"] > 1 for p in packs)
    packed = collate(packs, pad)
    assert "attention_mask" not in packed
    # the example of every token: a new one starts wherever the position ids restart (padding at
    # the end of a row counts as one more, but carries no labels)
    starts = (packed["position_ids"] == 0).long()
    offsets = torch.tensor([sum(p["num_examples"] for p in packs[:k]) for k in range(len(packs))])
    example_of_token = starts.cumsum(1) - 1 + offsets.unsqueeze(1)
    got = per_example_losses(model, packed, example_of_token)

    assert sorted(got) == sorted(expected) == list(range(len(examples)))
    for e in expected:
        assert got[e] == pytest.approx(expected[e], abs=1e-5), f"example {e}"

    # The control: the same packs as one causal sequence (no position ids) let examples see each
    # other, and the later examples' losses change. Without this the test above could not fail.
    leaky = {
        "input_ids": packed["input_ids"],
        "labels": packed["labels"],
        "attention_mask": torch.ones_like(packed["input_ids"]),
    }
    leaked = per_example_losses(model, leaky, example_of_token)
    assert max(abs(leaked[e] - expected[e]) for e in expected) > 1e-3


def example_spans(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row: a new one starts wherever the positions restart."""
    starts = [i for i, pos in enumerate(position_ids) if pos == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


@pytest.mark.parametrize("attn", ["sdpa", "eager", flash_like.NAME])
def test_packed_examples_in_a_batch_of_rows_see_only_themselves_on_every_attention(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    flash_like.register()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    examples = [encode(tokenizer, r, "auto", train_on_prompt=False) for r in [RECORD, *seed_records()[:7]]]
    packs = list(pack(iter(examples), max_length=max(len(i) for i, _ in examples) * 2))
    assert len(packs) >= 2 and sum(p["num_examples"] > 1 for p in packs) >= 2
    assert len({len(p["input_ids"]) for p in packs}) > 1  # rows of different lengths: padding too
    batch = collate(packs, tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def isolated(logits: torch.Tensor) -> bool:
        """Whether every example's logits in the batch are those it gets run alone."""
        with torch.no_grad():
            return all(
                torch.allclose(
                    logits[r, a:b], model(input_ids=torch.tensor([p["input_ids"][a:b]])).logits[0], atol=1e-5
                )
                for r, p in enumerate(packs)
                for a, b in example_spans(p["position_ids"])
            )

    with torch.no_grad():
        assert isolated(model(**inputs).logits)
        if attn == flash_like.NAME:
            # The control: flash-attention given the rows' position ids alone (the collate of before)
            # attends each row as one causal sequence, so the examples see each other...
            without = {k: v for k, v in inputs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
            assert not isolated(model(**without).logits)
            # ...but it finds the boundaries from the position ids of a batch of one row, as transformers'
            # does.
            one_row = collate(packs[:1], tokenizer.pad_token_id)
            logits = model(
                input_ids=one_row["input_ids"], position_ids=one_row["position_ids"], use_cache=False
            ).logits
            assert all(
                torch.allclose(
                    logits[0, a:b],
                    model(input_ids=torch.tensor([packs[0]["input_ids"][a:b]])).logits[0],
                    atol=1e-5,
                )
                for a, b in example_spans(packs[0]["position_ids"])
            )


def test_varlen_metadata_bounds_every_example_and_each_row_s_padding():
    packs = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, 7, IGNORE, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [3, 4], "labels": [IGNORE, 4], "position_ids": [0, 1]},
    ]
    batch = collate(packs, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 7, 10]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9], [IGNORE, 4, IGNORE, IGNORE, IGNORE]]


def long_record(i: int, field: str) -> dict:
    text = " ".join(f"grind{i} setting{j} bloom{j % 7}" for j in range(120))
    record = {
        "instruction": f"Describe brew {i}.",
        "input": "",
        "output": f"Answer {i}.",
        "system": "",
        "history": [],
    }
    record[field] = text
    return record


def long_history_record(i: int) -> dict:
    text = " ".join(f"grind{i} setting{j} bloom{j % 7}" for j in range(120))
    return {
        "instruction": f"Describe brew {i}.",
        "input": "",
        "output": f"Answer {i}.",
        "system": "",
        "history": [[text, "Noted."], ["And the grind?", "Medium fine."]],
    }


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_tokenize_stage_counts_truncated_and_dropped_records(tmp_path, monkeypatch, tiny_model_dir, overlong):
    from stages import tokenize as stage

    max_length = 256
    tokenizer = load_tokenizer(str(tiny_model_dir))
    short = [r for r in seed_records() if len(encode(tokenizer, r, "auto", False)[0]) <= max_length][:8]
    long_answer = [long_record(i, "output") for i in range(3)]  # cut, it would lose its end of turn
    long_prompt = [long_record(i, "instruction") for i in range(3, 5)]  # too long even without history
    long_history = [long_history_record(i) for i in range(5, 7)]  # fits once its oldest turn is left out
    for r in long_answer + long_prompt + long_history:
        assert len(encode(tokenizer, r, "auto", False)[0]) > max_length
    train = short[:2] + long_answer + short[2:5] + long_prompt + short[5:] + long_history
    val = short[:3]
    project = make_project(
        tmp_path,
        tiny_model_dir,
        train,
        val,
        tokenize={"max_length": max_length, "overlong": overlong, "num_proc": 1},
    )
    monkeypatch.chdir(project)
    stage.main()

    metrics = json.loads((project / "metrics" / "tokenize.json").read_text())["train"]
    ds = load_from_disk(str(project / "data" / "tokenized" / "train"))
    rejects = [
        json.loads(line)
        for line in (project / "data" / "tokenized" / "rejects.jsonl").read_text().splitlines()
    ]
    assert metrics["records_in"] == len(train) == 15
    if overlong == "truncate":
        assert (metrics["truncated"], metrics["dropped_overlong"], metrics["dropped_no_answer"]) == (2, 5, 0)
        assert metrics["records_out"] == 8 + 2
    else:
        assert (metrics["truncated"], metrics["dropped_overlong"], metrics["dropped_no_answer"]) == (0, 7, 0)
        assert metrics["records_out"] == 8
    assert len(ds) == metrics["records_out"]
    assert sorted(r["index"] for r in rejects) == [2, 3, 4, 8, 9] + (
        [] if overlong == "truncate" else [13, 14]
    )
    assert all(r["tokens"] > max_length and r["reason"] == "dropped_overlong" for r in rejects)
    assert max(len(x) for x in ds["input_ids"]) <= max_length
    assert metrics["tokens"] == sum(len(x) for x in ds["input_ids"])
    assert metrics["answer_tokens"] == sum(sum(1 for t in x if t != IGNORE) for x in ds["labels"])
    # every kept answer ends its turn
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(im_end in span for x, y in zip(ds["input_ids"], ds["labels"]) for span in labelled_spans(x, y))
    # the kept records, in order, are exactly what tokenize_example gives for them
    rows = [tokenize_example(r, tokenizer, "auto", max_length, overlong, False) for r in train]
    assert ds["input_ids"] == [row["input_ids"] for row in rows if row["status"] in ("ok", "truncated")]
    assert (project / "data" / "tokenized" / "chat_template.jinja").read_text() == tokenizer.chat_template


def test_tokenize_stage_packs_and_num_proc_gives_the_same_data(tmp_path, monkeypatch, tiny_model_dir):
    from stages import tokenize as stage

    records = seed_records()
    runs = {}
    for num_proc in (1, 2):
        project = make_project(
            tmp_path / f"p{num_proc}",
            tiny_model_dir,
            records[:40],
            records[40:],
            tokenize={"packing": True, "max_length": 512, "num_proc": num_proc},
        )
        monkeypatch.chdir(project)
        stage.main()
        runs[num_proc] = (
            json.loads((project / "metrics" / "tokenize.json").read_text()),
            load_from_disk(str(project / "data" / "tokenized" / "train")).to_dict(),
        )
    (metrics, packed), (metrics2, packed2) = runs[1], runs[2]
    assert (metrics, packed) == (metrics2, packed2)
    train = metrics["train"]
    assert train["records_out"] == 40 and train["packed_sequences"] == len(packed["input_ids"]) < 40
    assert sum(packed["num_examples"]) == 40
    assert train["padding_fraction_packed"] < train["padding_fraction_unpacked"]
    assert all(len(ids) <= 512 for ids in packed["input_ids"])
    assert sum(p.count(0) for p in packed["position_ids"]) == 40
    assert "position_ids" not in load_from_disk(str(project / "data" / "tokenized" / "val")).column_names


def test_pin_fingerprint_is_the_hash_of_the_arrow_files_in_order(tmp_path):
    import hashlib

    from stages.tokenize import pin_fingerprint

    parts = [b"a" * (3 << 20), b"b" * 7, b"c" * ((1 << 20) + 1)]  # files around the 1 MiB read size
    for i, blob in enumerate(parts):
        (tmp_path / f"data-{i:05d}-of-00003.arrow").write_bytes(blob)
    (tmp_path / "state.json").write_text(
        json.dumps({"_fingerprint": "random", "_split": "train"}), encoding="utf-8"
    )
    pin_fingerprint(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert state == {"_fingerprint": hashlib.sha256(b"".join(parts)).hexdigest()[:16], "_split": "train"}
