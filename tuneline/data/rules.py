"""Rule filters shared by the clean stage and augment's review loop.

Every check is a pure function of one record (or, for duplicates, of a list of records) and
returns a `Problem` that names the rule, says what was found in words a person can act on, and
carries the measured value that crossed the limit. `check_record` runs the per-record rules in a
fixed order; `review_problems` is the same check with fixed limits, for generated records.

Rule names, which are also the `reason` of a clean-stage reject:
  empty_instruction, empty_output, too_short, too_long, repeats_instruction, refusal,
  broken_encoding, html_remnants, wrong_language, pii, exact_duplicate.
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from ftfy.badness import badness, is_bad
from phonenumbers import Leniency, PhoneNumberMatcher
from py3langid.langid import MODEL_FILE, LanguageIdentifier


@dataclass(frozen=True)
class Problem:
    """Why a record is unfit: the rule's name, a sentence for people, the measured value."""

    rule: str
    detail: str
    score: float | None = None


@dataclass(frozen=True)
class RuleLimits:
    """The limits the per-record rules apply (the clean stage builds them from `clean:` params).

    Lengths: `min_*` applies to the instruction and to the output each; `max_*` to the whole
    record (instruction, input, output, system and history together). `languages` None skips
    the language rule.
    """

    min_chars: int
    max_chars: int
    min_tokens: int
    max_tokens: int
    languages: tuple[str, ...] | None
    language_min_chars: int
    language_confidence: float


# augment's review loop has no params of its own for these: generated records are held to
# the same limits as the defaults of the clean stage; the dataset policies (language and PII)
# come from the clean stage's params when augment.review_clean_rules is on (`ReviewRules`).
REVIEW_LIMITS = RuleLimits(
    min_chars=2,
    max_chars=4000,
    min_tokens=1,
    max_tokens=1024,
    languages=None,
    language_min_chars=20,
    language_confidence=0.9,
)

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
# One token per CJK character (no spaces between words there), one per run of other non-space.
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_CJK_CHAR_RE = re.compile(rf"[{_CJK}]")
_HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA_HANGUL_RE = re.compile(r"[\u3040-\u30ff\uac00-\ud7af]")
_LETTER_RE = re.compile(r"[^\W\d_]")
# py3langid names some Chinese varieties apart; params name languages by ISO 639-1 code.
_SAME_LANGUAGE = {"wuu": "zh", "yue": "zh", "cmn": "zh"}
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

_REFUSAL_ANYWHERE = re.compile(
    r"\bas an? (?:ai|artificial intelligence)(?: language)? (?:model|assistant)\b"
    r"|\bi(?:'m| am) (?:just |only )?an? (?:ai|language model)\b"
    r"|作为(?:一[个名])?(?:人工智能|AI|ai)(?:语言模型|助手|模型)?",
    re.IGNORECASE,
)
_REFUSAL_START = re.compile(
    r"\s*(?:(?:i'?m|i am) (?:sorry|afraid),? (?:but )?(?:i|as)\b"
    r"|i (?:cannot|can ?not|can't|am unable to|won't|am not able to) "
    r"(?:help|assist|provide|answer|comply|fulfill|do that)"
    r"|(?:抱歉|对不起)[，,]?\s*(?:我|作为)"
    r"|我(?:无法|不能)(?:回答|提供|帮助|协助))",
    re.IGNORECASE,
)

# Fenced code (closed by a fence as long as the one that opened it: a crawled page's code block that
# shows a ``` fence is fenced with ````) and inline code spans.
_CODE_RE = re.compile(r"(`{3,}).*?\1(?!`)|`[^`\n]*`", re.DOTALL)
_HTML_TAG_RE = re.compile(
    r"</?(?:a|b|i|u|p|br|hr|div|span|li|ul|ol|table|thead|tbody|tr|td|th|script|style|img|"
    r"h[1-6]|strong|em|font|iframe|meta|link|head|body|html|nav|footer|header|section|article)"
    r"\b[^<>]*>",
    re.IGNORECASE,
)
_HTML_ENTITY_RE = re.compile(r"&(?:nbsp|amp|lt|gt|quot|apos|#\d{2,5}|#x[0-9a-f]{2,4});", re.IGNORECASE)
_ABOUT_MARKUP_RE = re.compile(r"html|xml|markup|\btags?\b|标签|网页", re.IGNORECASE)

_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_ID_RE = re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])|(?<![\dA-Za-z])\d{17}[\dXx](?![\dA-Za-z])")
# IBAN as printed (groups of four) or compact; kept only when its ISO 13616 checksum holds.
_IBAN_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: "
    r"[A-Z0-9]{1,4})?)(?![A-Za-z0-9])"
)
# IP address candidates; kept only when the `ipaddress` module parses them.
_IP_RE = re.compile(
    r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)"
    r"|(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"
)
# A run of seven or more digits (separators allowed): texts without one hold no phone number,
# and phonenumbers' matcher (milliseconds per text) is not run on them.
_PHONE_CANDIDATE_RE = re.compile(r"\d(?:[\s().-]{0,3}\d){6,}")
PII_PLACEHOLDERS = {
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "ip": "[IP]",
    "card": "[CARD]",
    "id": "[ID]",
    "phone": "[PHONE]",
}


def count_tokens(text: str) -> int:
    """A model-free token count: whitespace-separated words, and each CJK character as one."""
    return len(_TOKEN_RE.findall(text))


def text_fields(record: dict) -> list[tuple[str, str]]:
    """(field, text) for every text a record holds, history turns named `history[i][j]`."""
    fields = [
        (k, record[k]) for k in ("instruction", "input", "output", "system") if isinstance(record.get(k), str)
    ]
    history = record.get("history")
    if isinstance(history, list):
        for i, turn in enumerate(history):
            if isinstance(turn, (list, tuple)):
                fields.extend((f"history[{i}][{j}]", t) for j, t in enumerate(turn) if isinstance(t, str))
    return fields


def _text(record: dict, field: str) -> str:
    value = record.get(field)
    return value if isinstance(value, str) else ""


def empty_fields(record: dict) -> list[Problem]:
    """The required fields (instruction, output) that are missing, not text, or only whitespace."""
    return [
        Problem(f"empty_{field}", f"{field} is empty or whitespace only")
        for field in ("instruction", "output")
        if not _text(record, field).strip()
    ]


def length_problem(record: dict, limits: RuleLimits) -> Problem | None:
    """Too short (instruction or output under the minimum) or too long (whole record over the maximum)."""
    for field in ("instruction", "output"):
        text = _text(record, field).strip()
        # A CJK character is a word (是, 对 are whole answers): such text is held to min_tokens only.
        if len(text) < limits.min_chars and not _CJK_CHAR_RE.search(text):
            return Problem(
                "too_short", f"{field} has {len(text)} characters, fewer than {limits.min_chars}", len(text)
            )
        # Text that is not blank has at least one token, so counting is needed only above 1.
        tokens = count_tokens(text) if limits.min_tokens > 1 else 1
        if tokens < limits.min_tokens:
            return Problem(
                "too_short", f"{field} has {tokens} tokens, fewer than {limits.min_tokens}", tokens
            )
    whole = "\n".join(text for _, text in text_fields(record))
    if len(whole) > limits.max_chars:
        return Problem(
            "too_long", f"record has {len(whole)} characters, more than {limits.max_chars}", len(whole)
        )
    # A token is at least one character: a text this short cannot be over the token budget.
    tokens = count_tokens(whole) if len(whole) > limits.max_tokens else 0
    if tokens > limits.max_tokens:
        return Problem("too_long", f"record has {tokens} tokens, more than {limits.max_tokens}", tokens)
    return None


def _letters_only(text: str) -> str:
    # Punctuation, spaces and case are not what makes an answer different from its question.
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).casefold())


def repeats_instruction(record: dict) -> Problem | None:
    """The output only restates the instruction: equal to it, a large part of it, or it plus a few
    characters."""
    instruction, output = _letters_only(_text(record, "instruction")), _letters_only(_text(record, "output"))
    if not instruction or not output:
        return None
    if output in instruction and len(output) >= 0.5 * len(instruction):
        share = len(output) / len(instruction)
        return Problem("repeats_instruction", "output is a restatement of the instruction", round(share, 3))
    if instruction in output:
        rest = len(output) - len(instruction)
        if rest < max(3, 0.15 * len(output)):
            return Problem(
                "repeats_instruction",
                f"output repeats the instruction and adds only {rest} characters",
                round(len(instruction) / len(output), 3),
            )
    return None


def refusal(record: dict) -> Problem | None:
    """Refusal or assistant boilerplate in the output ("As an AI language model...", "I'm sorry, but I
    can't")."""
    output = _text(record, "output")
    match = _REFUSAL_ANYWHERE.search(output) or _REFUSAL_START.match(output)
    if match:
        return Problem("refusal", f"output contains refusal boilerplate: {match.group(0).strip()!r}")
    return None


def broken_encoding(record: dict) -> Problem | None:
    """Mojibake (ftfy's detector), U+FFFD replacement characters or control characters in any field.

    ftfy looks for the character sequences that wrong decoding produces (e.g. "Ã©" for "é");
    correctly decoded non-Latin scripts such as Chinese are not flagged.
    """
    for field, text in text_fields(record):
        if "\ufffd" in text:
            return Problem(
                "broken_encoding", f"{field} contains U+FFFD replacement characters", text.count("\ufffd")
            )
        if _CONTROL_RE.search(text):
            return Problem(
                "broken_encoding", f"{field} contains control characters", len(_CONTROL_RE.findall(text))
            )
        # Mojibake is made of non-ASCII characters: ASCII text cannot contain any.
        if not text.isascii() and is_bad(text):
            return Problem(
                "broken_encoding", f"{field} looks like mojibake (wrongly decoded text)", badness(text)
            )
    return None


def html_remnants(record: dict) -> Problem | None:
    """HTML tags or entities left over from scraping, outside code spans.

    A record whose instruction or input is about markup may show the tags it names (the `br`
    in "What does the br tag do?") in its answer; every other tag and entity is still flagged,
    so the words "tag" or "html" do not switch the check off.
    """
    question = _text(record, "instruction") + " " + _text(record, "input")
    named = (
        {w.lower() for w in re.findall(r"[A-Za-z][A-Za-z0-9]*", question)}
        if _ABOUT_MARKUP_RE.search(question)
        else set()
    )
    for field, text in text_fields(record):
        if "<" not in text and "&" not in text:
            continue
        prose = _CODE_RE.sub(" ", text)
        tags = [m.group(0) for m in _HTML_TAG_RE.finditer(prose) if _tag_name(m.group(0)) not in named]
        found = tags + _HTML_ENTITY_RE.findall(prose)
        if found:
            return Problem(
                "html_remnants", f"{field} contains HTML remnants such as {found[0]!r}", len(found)
            )
    return None


def _tag_name(tag: str) -> str:
    return re.match(r"</?([A-Za-z0-9]+)", tag).group(1).lower()


def _script_language(text: str) -> str | None:
    """Chinese when the characters alone make it certain, else None (then the detector decides).

    Han text without kana or hangul is Chinese, whatever Latin words are mixed in: the detector
    is unreliable on exactly these mixed texts. Latin-script text always goes to the detector
    (a shortcut by English function words let Dutch pass as English).
    """
    if text.isascii():
        return None
    letters = len(_LETTER_RE.findall(text)) or 1
    han = len(_HAN_RE.findall(text))
    if han and not _KANA_HANGUL_RE.search(text) and han >= 0.2 * letters:
        return "zh"
    return None


_IDENTIFIER: list[LanguageIdentifier] = []


def _identifier() -> LanguageIdentifier:
    # The model ships inside py3langid (offline) and loads in about a second: only when asked.
    if not _IDENTIFIER:
        _IDENTIFIER.append(LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True))
    return _IDENTIFIER[0]


def language_guesses(text: str) -> dict[str, float]:
    """Probability of each likely language (ISO 639-1 code) of `text`, highest first; {} for text without
    letters.

    py3langid (a naive Bayes over byte n-grams, deterministic) decides, after the Chinese
    shortcut of `_script_language`.
    """
    if not _LETTER_RE.search(text):
        return {}
    script = _script_language(text)
    if script is not None:
        return {script: 1.0}
    probs: dict[str, float] = {}
    # The detector's time grows with the text; its guess settles well within the first 400 characters.
    for code, prob in _identifier().rank(text[:400]):
        if prob < 1e-4:  # ranked highest first: the other ~140 languages are noise
            break
        code = _SAME_LANGUAGE.get(code, code)
        probs[code] = probs.get(code, 0.0) + float(prob)
    return dict(sorted(probs.items(), key=lambda kv: -kv[1]))


def _language_text(record: dict) -> str:
    return "\n".join(_text(record, k) for k in ("instruction", "input", "output"))


def record_guesses(record: dict) -> dict[str, float]:
    """`language_guesses` of a record's instruction, input and output together."""
    return language_guesses(_language_text(record))


def top_language(guesses: dict[str, float]) -> str:
    """The likeliest language of `guesses` ("und" when there is none: text without letters)."""
    return next(iter(guesses), "und")


def record_language(record: dict) -> str:
    """The likeliest language of a record's instruction, input and output ("und" for text without letters)."""
    return top_language(record_guesses(record))


def language_problem(
    record: dict, limits: RuleLimits, guesses: dict[str, float] | None = None
) -> Problem | None:
    """The record's language is not one of `limits.languages`, when that is certain.

    Short texts (fewer than language_min_chars non-space characters), mixed Chinese/English and
    uncertain guesses are kept: only a confident guess (probability >= language_confidence, and
    no allowed language above 0.1) rejects. `guesses`, when given, are the record's
    `record_guesses` already made (the clean stage makes one pass per record and reuses it).
    """
    if limits.languages is None:
        return None
    text = _language_text(record)
    if len("".join(text.split())) < limits.language_min_chars:
        return None
    allowed = set(limits.languages)
    probs = guesses if guesses is not None else language_guesses(text)
    if not probs:
        return None
    top, prob = next(iter(probs.items()))
    if top in allowed or prob < limits.language_confidence or any(probs.get(a, 0.0) > 0.1 for a in allowed):
        return None
    return Problem(
        "wrong_language",
        f"text is {top} (p={prob:.2f}), not one of {', '.join(sorted(allowed))}",
        round(prob, 4),
    )


def check_record(record: dict, limits: RuleLimits, guesses: dict[str, float] | None = None) -> list[Problem]:
    """Every per-record rule that the record fails, in a fixed order (PII and duplicates aside).

    `guesses`: the record's `record_guesses`, when the caller has made them already.
    """
    problems = empty_fields(record)
    if problems:
        # Length, language and repetition say nothing useful about a record with no text.
        return problems
    for problem in (
        length_problem(record, limits),
        repeats_instruction(record),
        refusal(record),
        broken_encoding(record),
        html_remnants(record),
        language_problem(record, limits, guesses),
    ):
        if problem is not None:
            problems.append(problem)
    return problems


@dataclass(frozen=True)
class ReviewRules:
    """What augment's review loop holds a generated record to.

    `limits` are the per-record rule limits (languages None: no language rule); with
    `reject_pii`, a record holding personal data (as the clean stage finds it, phone numbers
    read in `phone_regions`) is unfit, as the clean stage would reject it with clean.pii: reject.
    """

    limits: RuleLimits = REVIEW_LIMITS
    reject_pii: bool = False
    phone_regions: tuple[str, ...] = ()


def review_problems(record: dict, rules: ReviewRules = ReviewRules()) -> list[str]:
    """Reasons a generated record is unfit for training (empty list: fit).

    Used by augment's review loop; `describe` turns a reason into a sentence for a prompt.
    """
    problems = [problem.rule for problem in check_record(record, rules.limits)]
    if rules.reject_pii:
        _, pii, _ = pii_problem(record, "reject", rules.phone_regions)
        problems += [pii.rule] if pii is not None else []
    return problems


RULE_DESCRIPTIONS = {
    "empty_instruction": "the instruction is empty",
    "empty_output": "the answer is empty",
    "too_short": "the instruction or answer is too short",
    "too_long": "the record is too long",
    "repeats_instruction": "the answer only repeats the instruction",
    "refusal": "the answer is a refusal or 'as an AI' boilerplate",
    "broken_encoding": "the text has broken encoding (mojibake)",
    "html_remnants": "the text contains HTML tags or entities",
    "wrong_language": "the text is not in an allowed language",
    "pii": "the text contains personal data (e-mail, phone, IBAN, IP address, card or ID numbers)",
    "exact_duplicate": "the record duplicates another one",
    # augment's own checks of generated records and replies
    "not_grounded": "the answer is not supported by the passage",
    "duplicate": "the question was already asked",
    "invalid_json": "the reply was not valid JSON",
    "invalid_schema": "the reply did not have the JSON fields asked for",
    "empty_reply": "the reply was empty",
    "truncated": "the reply was cut off before it was complete; keep it shorter",
    "request_failed": "the request failed",
}


def describe(reason: str) -> str:
    """A sentence for a reason name, e.g. to tell a generator which mistakes to avoid."""
    return RULE_DESCRIPTIONS.get(reason, reason.replace("_", " "))


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cn_id_ok(number: str) -> bool:
    # GB 11643: the 18th character is an ISO 7064 MOD 11-2 check of the first 17 digits.
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(d) * w for d, w in zip(number[:17], weights))
    return "10X98765432"[total % 11] == number[17].upper()


def _id_ok(match: str) -> bool:
    return "-" in match or _cn_id_ok(match)


def _card_ok(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and _luhn_ok(digits)


def _iban_ok(match: str) -> bool:
    # ISO 13616: the country code and check digits go to the end, letters become 10..35, mod 97 is 1.
    compact = match.replace(" ", "")
    digits = "".join(str(int(c, 36)) for c in compact[4:] + compact[:4])
    return 15 <= len(compact) <= 34 and int(digits) % 97 == 1


def _ip_ok(match: str) -> bool:
    try:
        ipaddress.ip_address(match)
    except ValueError:
        return False
    # "a::b" parses too; an address someone could be traced by has digits.
    return any(c.isdigit() for c in match)


_PII_PATTERNS = (
    ("email", _EMAIL_RE, None),
    ("iban", _IBAN_RE, _iban_ok),
    ("ip", _IP_RE, _ip_ok),
    ("card", _CARD_RE, _card_ok),
    ("id", _ID_RE, _id_ok),
)
# Every number pattern needs two adjacent digits: texts without them skip those patterns.
_DIGIT_PAIR_RE = re.compile(r"\d\d")


def phone_spans(text: str, regions: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, end) of each phone number in `text` that Google's libphonenumber finds valid, in order.

    Numbers written with +country are found whatever the regions; national formats
    ("020 7946 0958", "030 1234567") are looked for as dialled in each of `regions`
    (ISO 3166 codes). Overlapping finds are merged.
    """
    if not _PHONE_CANDIDATE_RE.search(text):
        return []
    found = sorted(
        {
            (m.start, m.end)
            for region in regions
            for m in PhoneNumberMatcher(text, region, leniency=Leniency.VALID)
        }
    )
    merged: list[tuple[int, int]] = []
    for start, end in found:
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def redact_text(text: str, phone_regions: tuple[str, ...]) -> tuple[str, dict[str, int]]:
    """The text with e-mail addresses, IBANs, IP addresses, card, ID and phone numbers as placeholders;
    counts by kind.

    National phone numbers are looked for as dialled in `phone_regions` (clean.phone_regions).

    IBANs must pass their mod-97 checksum, IP addresses parse as such, card numbers pass the
    Luhn check, 18-digit Chinese ID numbers their check digit and phone numbers libphonenumber's
    validity check, so that ordinary long numbers are left alone.
    """
    found: dict[str, int] = {}
    has_at, has_digits = "@" in text, _DIGIT_PAIR_RE.search(text) is not None
    for kind, pattern, valid in _PII_PATTERNS:
        # An IPv4 address such as 1.2.3.4 has no two adjacent digits.
        if not (has_at if kind == "email" else has_digits or kind == "ip"):
            continue

        def replace(match: re.Match, kind: str = kind, valid=valid) -> str:
            if valid is not None and not valid(match.group(0)):
                return match.group(0)
            found[kind] = found.get(kind, 0) + 1
            return PII_PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    spans = phone_spans(text, phone_regions) if has_digits else []
    for start, end in reversed(spans):
        text = text[:start] + PII_PLACEHOLDERS["phone"] + text[end:]
    if spans:
        found["phone"] = len(spans)
    return text, found


def redact_record(record: dict, phone_regions: tuple[str, ...]) -> tuple[dict, dict[str, int]]:
    """The record with PII redacted in every text field (history included), and counts by kind."""
    out = dict(record)
    found: dict[str, int] = {}

    def redact(text: str) -> str:
        clean, counts = redact_text(text, phone_regions)
        for kind, n in counts.items():
            found[kind] = found.get(kind, 0) + n
        return clean

    for field in ("instruction", "input", "output", "system"):
        if isinstance(out.get(field), str):
            out[field] = redact(out[field])
    if isinstance(out.get("history"), list):
        out["history"] = [
            [redact(t) if isinstance(t, str) else t for t in turn]
            if isinstance(turn, (list, tuple))
            else turn
            for turn in out["history"]
        ]
    return out, found


def pii_problem(
    record: dict, mode: Literal["redact", "reject"], phone_regions: tuple[str, ...]
) -> tuple[dict, Problem | None, dict[str, int]]:
    """Apply the PII policy: (the record with PII redacted, a `pii` Problem in reject mode, counts by kind).

    The record comes back redacted in both modes, so that personal data is not written to the
    rejects file either.
    """
    redacted, found = redact_record(record, phone_regions)
    if not found:
        return record, None, found
    if mode == "reject":
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(found.items()))
        return redacted, Problem("pii", f"contains personal data: {kinds}", sum(found.values())), found
    return redacted, None, found


def normalised_key(record: dict) -> str:
    """The text a record is compared on for exact duplicates: NFKC, case-folded, whitespace collapsed."""

    def norm(value: object) -> object:
        if isinstance(value, str):
            return " ".join(unicodedata.normalize("NFKC", value).casefold().split())
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    return json.dumps(
        [norm(record.get(k)) for k in ("instruction", "input", "output", "system", "history")],
        ensure_ascii=False,
    )


SOURCE_RANK = {"seed": 0, "crawl": 1, "dataset": 2, "generated": 4}


def source_kind(record: dict) -> str:
    """The kind of a record's source: seed, crawl, dataset (for `dataset:<name>`), generated, or ""."""
    return str(record.get("source") or "").split(":")[0]


def source_rank(record: dict) -> int:
    """How much a record's source is preferred when one of several twins is kept (lower first).

    Hand-written seeds, then crawled pages, then public datasets (`dataset:<name>`), then
    anything unknown, then generated records.
    """
    return SOURCE_RANK.get(source_kind(record), 3)


def keep_order(record: dict) -> tuple[int, str]:
    """Sort key choosing which twin to keep: preferred source first, then the smaller id (stable)."""
    return source_rank(record), str(record.get("id", ""))


def exact_duplicates(records: list[dict]) -> dict[int, int]:
    """Index of each exact duplicate (after normalisation) -> index of the twin that is kept."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(normalised_key(record), []).append(i)
    twins: dict[int, int] = {}
    for members in groups.values():
        if len(members) > 1:
            kept = min(members, key=lambda i: keep_order(records[i]))
            twins.update({i: kept for i in members if i != kept})
    return twins
