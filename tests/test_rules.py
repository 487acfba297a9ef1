"""The rule filters: each rule on tiny in-memory records, Chinese included."""

from pathlib import Path

import pytest

from tuneline.common import params
from tuneline.data.rules import (
    REVIEW_LIMITS,
    RuleLimits,
    broken_encoding,
    check_record,
    count_tokens,
    describe,
    empty_fields,
    exact_duplicates,
    html_remnants,
    language_guesses,
    language_problem,
    length_problem,
    normalised_key,
    phone_spans,
    pii_problem,
    record_language,
    redact_record,
    redact_text,
    refusal,
    repeats_instruction,
    review_problems,
)

# The phone regions of the shipped params (020 7946 0958 is read as British, 030 1234567 as German).
REGIONS = tuple(
    params.section("clean", path=Path(__file__).resolve().parents[1] / "params.yaml").phone_regions
)
LIMITS = RuleLimits(
    min_chars=2,
    max_chars=200,
    min_tokens=1,
    max_tokens=60,
    languages=("en", "zh"),
    language_min_chars=20,
    language_confidence=0.9,
)

ZH = {
    "instruction": "手冲咖啡的水温应该是多少？",
    "input": "",
    "output": "一般用 90 到 96 °C 的水，刚离火的开水最合适。深烘豆可以再低一两度。",
}
EN = {
    "instruction": "How long should a French press steep?",
    "input": "",
    "output": "Steep for about four minutes, then press slowly and pour it all out right away.",
}
MIXED = {
    "instruction": "Python 中的 list comprehension 是什么？",
    "input": "",
    "output": "它是一种用一行代码生成 list 的写法，例如 [x * 2 for x in items]。",
}


def rec(**kw) -> dict:
    return {**EN, **kw}


@pytest.mark.parametrize("record", [EN, ZH, MIXED])
def test_good_records_pass_every_rule(record):
    assert check_record(record, LIMITS) == []
    assert review_problems(record) == []


def test_count_tokens_counts_words_and_each_cjk_character():
    assert count_tokens("grind it  finer\nplease") == 4
    assert count_tokens("研磨更细") == 4
    assert count_tokens("用 Python 写") == 3


@pytest.mark.parametrize(
    ("record", "rules"),
    [
        ({"output": "a b"}, ["empty_instruction"]),
        (rec(instruction="   \n\t"), ["empty_instruction"]),
        (rec(output=""), ["empty_output"]),
        (rec(output=None), ["empty_output"]),
        (rec(instruction=3, output=" "), ["empty_instruction", "empty_output"]),
    ],
)
def test_empty_or_whitespace_only_fields(record, rules):
    assert [p.rule for p in empty_fields(record)] == rules
    # Nothing else is reported for a record without text.
    assert [p.rule for p in check_record(record, LIMITS)] == rules


def test_too_short_in_characters_and_tokens():
    short = length_problem(rec(output="a"), LIMITS)
    assert (short.rule, short.score) == ("too_short", 1)
    assert "output has 1 characters" in short.detail
    # A two-character Chinese answer is long enough, and so is a one-character one: 是 is a word.
    assert length_problem({**ZH, "output": "可以"}, LIMITS) is None
    assert length_problem({**ZH, "output": "是"}, LIMITS) is None
    assert length_problem({**ZH, "output": "对"}, LIMITS) is None
    by_tokens = length_problem(rec(output="ok"), RuleLimits(**{**LIMITS.__dict__, "min_tokens": 2}))
    assert (by_tokens.rule, by_tokens.score) == ("too_short", 1)


def test_too_long_in_characters_and_tokens():
    chars = length_problem(rec(output="x" * 300), LIMITS)
    assert chars.rule == "too_long" and "characters" in chars.detail and chars.score > 200
    tokens = length_problem(rec(output="a " * 61), LIMITS)
    assert tokens.rule == "too_long" and "tokens" in tokens.detail and tokens.score > 60
    # Chinese characters each count as a token.
    assert length_problem({**ZH, "output": "好" * 70}, LIMITS).rule == "too_long"
    # History turns count towards the length of the whole record.
    assert length_problem(rec(history=[["q " * 30, "a " * 30]]), LIMITS).rule == "too_long"


@pytest.mark.parametrize(
    "output",
    [
        "How long should a French press steep?",
        "how long should a french press steep",
        "Sure! How long should a French press steep?",
    ],
)
def test_output_that_only_repeats_the_instruction(output):
    assert repeats_instruction(rec(output=output)).rule == "repeats_instruction"


@pytest.mark.parametrize(
    ("instruction", "output"),
    [
        ("Which is larger, 3 or 5?", "5 is larger."),
        ("Name the grind for espresso.", "Fine."),
        (
            "How long should a French press steep?",
            "How long should a French press steep? About four minutes, then press.",
        ),
    ],
)
def test_answers_that_reuse_words_are_not_repeats(instruction, output):
    assert repeats_instruction({"instruction": instruction, "output": output}) is None


@pytest.mark.parametrize(
    "output",
    [
        "As an AI language model, I cannot taste coffee.",
        "I'm sorry, but I can't help with that.",
        "I cannot provide that information.",
        "作为一个人工智能语言模型，我无法品尝咖啡。",
        "抱歉，我无法回答这个问题。",
    ],
)
def test_refusal_boilerplate(output):
    assert refusal(rec(output=output)).rule == "refusal"


def test_refusal_words_inside_a_real_answer_are_fine():
    assert refusal(rec(output="If you cannot find a burr grinder, a blade grinder will do.")) is None


@pytest.mark.parametrize(
    "output",
    [
        "The cafÃ© serves Ã©tÃ© blends.",
        "â€œBloomâ€\x9d lets the gas out.",
        "Steep for four \ufffd minutes.",
        "Steep\x00 now.",
    ],
)
def test_broken_encoding(output):
    problem = broken_encoding(rec(output=output))
    assert problem.rule == "broken_encoding" and problem.detail.startswith("output")


@pytest.mark.parametrize(
    "text",
    [
        "手冲咖啡的水温应该是多少？",
        "冷萃咖啡需要泡多久？在冰箱中浸泡 12 到 18 小时。",
        "日本語のテキスト",
        "Привет, мир",
        "Café crème, naïve résumé — 95 °C",
    ],
)
def test_correct_non_latin_and_accented_text_is_not_broken_encoding(text):
    assert broken_encoding({"instruction": text, "output": text}) is None


def test_html_remnants():
    problem = html_remnants(rec(output="Steep for <b>four</b> minutes.&nbsp;Then press."))
    assert problem.rule == "html_remnants" and problem.score == 3
    assert html_remnants(rec(input="<div class='x'>Beans</div>")).detail.startswith("input")


def test_html_in_code_or_in_answers_about_markup_is_fine():
    assert html_remnants(rec(output="Wrap it in `<b>` and the `&amp;` entity.")) is None
    assert (
        html_remnants({"instruction": "What does the b tag do in HTML?", "output": "Use <b>bold</b>."})
        is None
    )


def test_html_in_a_crawled_fenced_code_block_is_fine_even_when_the_code_shows_a_fence():
    code = '```html\n<div class="x">\n  <p>Hi &amp; bye</p>\n</div>\n```'
    assert html_remnants(rec(output=f"Like this:\n\n{code}\n\nDone.")) is None
    nested = f"Write:\n\n````markdown\n{code}\n<b>after the inner fence</b>\n````"
    assert html_remnants(rec(output=nested)) is None
    assert html_remnants(rec(output=f"{nested}\n\nThen <b>this</b> is prose.")) is not None


def test_the_words_tag_or_html_do_not_switch_the_html_check_off():
    scraped = html_remnants(
        {"instruction": "What tags does this coffee have?", "output": "<div class='tags'>Fruity</div>"}
    )
    assert scraped is not None and scraped.rule == "html_remnants"
    entity = html_remnants({"instruction": "Is this HTML page about espresso?", "output": "Yes,&nbsp;it is."})
    assert entity is not None and "&nbsp;" in entity.detail
    # only the tags the question names are allowed in the answer
    other = html_remnants(
        {"instruction": "What does the br tag do?", "output": "It breaks a line: <br> <span>x</span>"}
    )
    assert other is not None and "<span>" in other.detail


@pytest.mark.parametrize(
    "record",
    [
        {
            "instruction": "Qu'est-ce que le café filtre ?",
            "output": "Le café filtre est préparé en versant de l'eau chaude sur du café moulu.",
        },
        {
            "instruction": "Wie lange sollte eine French Press ziehen?",
            "output": "Etwa vier Minuten, dann langsam drücken und sofort ausgießen.",
        },
    ],
)
def test_language_not_allowed_is_rejected_when_certain(record):
    problem = language_problem(record, LIMITS)
    assert problem.rule == "wrong_language" and problem.score >= 0.9
    # With the language allowed, the same record passes.
    assert language_problem(record, RuleLimits(**{**LIMITS.__dict__, "languages": ("fr", "de")})) is None


def test_chinese_mixed_and_short_texts_are_not_wrong_language():
    assert language_problem(ZH, LIMITS) is None
    assert language_problem(MIXED, LIMITS) is None
    # Too short to tell: kept whatever it is.
    assert language_problem({"instruction": "Merci", "output": "De rien"}, LIMITS) is None
    # Chinese is rejected when only English is allowed.
    en_only = RuleLimits(**{**LIMITS.__dict__, "languages": ("en",)})
    assert (
        language_problem(
            {**ZH, "output": "一般用九十到九十六度的水，刚离火的开水最合适，深烘豆可以再低一两度。"}, en_only
        ).rule
        == "wrong_language"
    )


@pytest.mark.parametrize(
    "text, language",
    [
        ("Why is my espresso sour?", "en"),
        ("Wie entkalke ich die Maschine?", "de"),
        ("Hoe ontkalk ik de machine?", "nl"),
        ("De koffie is klaar en de melk is warm.", "nl"),
        ("¿Por qué mi café es amargo?", "es"),
        ("为什么咖啡是酸的？", "zh"),
        ("コーヒーはなぜ酸っぱいの？", "ja"),
    ],
)
def test_short_texts_get_their_language(text, language):
    assert next(iter(language_guesses(text))) == language
    assert record_language({"instruction": text, "output": ""}) == language


def test_dutch_is_not_taken_for_english():
    # Short ASCII words the two languages share ("is", "in", "de") once let Dutch pass as English.
    dutch = {
        "instruction": "Hoe lang moet de koffie trekken?",
        "output": "De koffie is klaar en de melk is warm in de kan.",
    }
    problem = language_problem(dutch, RuleLimits(**{**LIMITS.__dict__, "languages": ("en",)}))
    assert problem is not None and problem.rule == "wrong_language" and "text is nl" in problem.detail
    assert record_language({"instruction": "123", "output": "4.5"}) == "und"


def test_language_decision_is_deterministic():
    record = {
        "instruction": "Hola, ¿cómo estás?",
        "output": "Bien, gracias. Vamos a preparar un café con leche.",
    }
    assert len({str(language_problem(record, LIMITS)) for _ in range(5)}) == 1


def test_pii_is_redacted_with_placeholders():
    text, found = redact_text(
        "Mail jane.doe@example.com, call +1 212 555 0187 or (212) 555-0188, card 4111 1111 1111 1111, "
        "SSN 123-45-6789, 身份证 11010519491231002X, 手机13812345678",
        REGIONS,
    )
    assert found == {"email": 1, "phone": 3, "card": 1, "id": 2}
    assert "jane" not in text and "4111" not in text and "6789" not in text and "138" not in text
    assert "[EMAIL]" in text and "[CARD]" in text and "[ID]" in text and "[PHONE]" in text


def test_ordinary_numbers_are_not_pii():
    text = (
        "Brew 18 g for 25-30 s at 93 °C; 1:16 ratio; years 2019-2020; 1234 5678 9012 3456; "
        "123456789012345678. "
        "At 10:30:00 use v1.2.3, ratio 1:2:3, not 999.1.1.1 or 1.2.3.4.5."
    )
    assert redact_text(text, REGIONS) == (text, {})


def test_national_phone_formats_are_found_through_phonenumbers():
    text, found = redact_text("Ring 020 7946 0958 (London), 030 1234567 (Berlin) or +49 30 1234567.", REGIONS)
    assert (text, found) == ("Ring [PHONE] (London), [PHONE] (Berlin) or [PHONE].", {"phone": 3})
    assert phone_spans("Ring 020 7946 0958.", REGIONS) == [(5, 18)]
    # A national number is read as dialled in the regions named: Berlin's is not a US number.
    assert phone_spans("030 1234567", ("US",)) == [] and phone_spans("+49 30 1234567", ("US",)) == [(0, 14)]


def test_iban_is_pii_only_with_a_valid_checksum():
    text, found = redact_text(
        "Pay DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432; DE89 3704 0044 0532 0130 01 is a typo.",
        REGIONS,
    )
    assert (text, found) == ("Pay [IBAN] or [IBAN]; DE89 3704 0044 0532 0130 01 is a typo.", {"iban": 2})
    redacted, problem, _ = pii_problem(
        rec(output="Transfer to DE89370400440532013000 today."), "reject", REGIONS
    )
    assert problem.rule == "pii" and problem.detail == "contains personal data: 1 iban"
    assert redacted["output"] == "Transfer to [IBAN] today."


def test_ipv4_and_ipv6_addresses_are_pii():
    text, found = redact_text(
        "Server 192.168.1.20, 2001:db8::1 and fe80::1ff:fe23:4567:890a; loopback 127.0.0.1.", REGIONS
    )
    assert (text, found) == ("Server [IP], [IP] and [IP]; loopback [IP].", {"ip": 4})


def test_pii_policy_redact_or_reject():
    record = rec(output="Write to jane@example.com for beans.", history=[["call me?", "555-123-4567"]])
    kept, problem, found = pii_problem(record, "redact", REGIONS)
    assert problem is None and found == {"email": 1, "phone": 1}
    assert kept["output"] == "Write to [EMAIL] for beans." and kept["history"] == [["call me?", "[PHONE]"]]
    assert record["output"].startswith("Write to jane")  # the input record is not changed
    redacted, problem, _ = pii_problem(record, "reject", REGIONS)
    assert (problem.rule, problem.detail, problem.score) == (
        "pii",
        "contains personal data: 1 email, 1 phone",
        2,
    )
    assert redacted == kept  # nothing personal reaches the rejects file either
    assert redact_record(EN, REGIONS) == (EN, {})


def test_exact_duplicates_after_normalisation_keep_the_preferred_source():
    records = [
        {**EN, "id": "b", "source": "generated"},
        {**EN, "instruction": "HOW LONG  should a French press steep?", "id": "c", "source": "crawl"},
        {**EN, "instruction": "ＨＯＷ long should a French press steep?", "id": "a", "source": "generated"},
        {**ZH, "id": "z", "source": "seed"},
    ]
    assert normalised_key(records[0]) == normalised_key(records[1]) == normalised_key(records[2])
    assert exact_duplicates(records) == {0: 1, 2: 1}
    # Without a preferred source, the smaller id is kept.
    same_source = [{**r, "source": "generated"} for r in records[:3]]
    assert exact_duplicates(same_source) == {0: 2, 1: 2}


def test_review_problems_uses_fixed_limits_and_names_reasons():
    assert REVIEW_LIMITS.languages is None
    assert review_problems(
        {"instruction": "Explain crema.", "output": "As an AI language model, I can't."}
    ) == ["refusal"]
    assert review_problems({"instruction": "Explain crema.", "output": ""}) == ["empty_output"]
    assert review_problems({"instruction": "Explain crema.", "output": "Explain crema!"}) == [
        "repeats_instruction"
    ]
    # Language is the clean stage's policy, not the review's.
    assert (
        review_problems(
            {"instruction": "Qu'est-ce que la crème?", "output": "La mousse dorée sur un espresso."}
        )
        == []
    )
    assert describe("refusal").startswith("the answer is a refusal")
