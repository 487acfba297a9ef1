"""Augmentation: records that pass through, and records an LLM writes, reviewed round by round.

Pass-through (no call): the seeds, crawled Q&A pairs, and ingested dataset records.
Generated, from two prompt templates under `augment.prompts_dir`:
  expand   - sample k seeds of one category, ask for new requests like them, then answer each
  grounded - chunk each crawled document, ask for Q&A pairs the chunk supports (url kept); the
             rounds after the pilot read every chunk once, or augment.chunk_budget of them

Review loop: round 1 asks for a small pilot batch; the shared rule checks
(`tuneline.data.rules.review_problems`) plus a grounding and a duplicate check flag bad records;
the flagged examples and their reasons go into the next round's prompts as "avoid these
mistakes", together with the records of the round that a person rejected in `tuneline review`
(matched by content hash, with the person's reason). A reply that is not the JSON asked for is retried in the
same conversation with
the reason, a bounded number of times, then rejected with the raw reply.

Each generator is one unit (`expansion`, `grounded_qa`: a Generator with its prompts, the parse of
their replies and the records it makes of them), and `run_rounds` is the method's loop over them:
pilot, review, feedback, next round. It takes a `call(requests, seed) -> list[Reply]` function, so
this module does no I/O of its own beyond reading input and template files.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jinja2

from tuneline.common.params import Augment, Clean
from tuneline.common.records import (
    InputError,
    content_hash,
    iter_numbered_jsonl,
    iter_numbered_jsonl_dir,
    text_hash,
    with_ids,
)
from tuneline.data.rules import REVIEW_LIMITS, ReviewRules, describe, review_problems
from tuneline.llm.client import EMPTY_REPLY, TRUNCATED, Endpoint, Reply, ReplyError, parse_json_object

TEMPLATES = ("expand", "answer", "grounded", "retry")
# call(requests, seed, response formats) -> one reply per request
Call = Callable[[list[list[dict]], int, list[dict | None]], list[Reply]]


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A piece of a crawled document, small enough for one grounded prompt."""

    url: str
    title: str
    text: str
    category: str | None


def read_numbered_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line fails naming file and line."""
    return list(iter_numbered_jsonl(path))


def _text_field(item: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        if isinstance(item.get(name), str) and item[name].strip():
            return item[name]
    raise InputError(f"{where}: needs a non-empty string field {' or '.join(repr(n) for n in names)}")


def alpaca_record(item: dict, source: str, **extra: Any) -> dict:
    """A record with all Alpaca fields (defaults filled in) and its provenance, without an id.

    `source` is one of seed | crawl | dataset | generated; `origin` (in `extra`) keeps the
    upstream stage's own source name, e.g. the crawl source or "dataset:faq_csv". Ids are
    given per input by `records.with_ids`, so identical copies still get one id each."""
    record = {
        "instruction": item["instruction"],
        "input": item.get("input") or "",
        "output": item["output"],
        "system": item.get("system") or "",
        "history": item.get("history") or [],
        "source": source,
    }
    for key in ("category", "url"):
        if item.get(key):
            record[key] = item[key]
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def seed_records(path: str | Path) -> list[dict]:
    """The hand-written seeds as records (source: seed); each needs instruction and output."""
    records = []
    for line_no, item in read_numbered_jsonl(path):
        where = f"{path}:{line_no}"
        _text_field(item, ("instruction",), where)
        _text_field(item, ("output",), where)
        records.append(alpaca_record(item, "seed"))
    if not records:  # an empty file would run the whole pipeline on crawled and dataset records alone
        raise InputError(
            f"{path} holds no seed record (base.seeds); add at least one JSON line with instruction "
            "and output, as data/seeds/seeds.jsonl has"
        )
    return with_ids(records)


def crawl_items(path: str | Path) -> tuple[list[dict], list[tuple[str, str, str, str | None]]]:
    """Crawled Q&A pairs as records (source: crawl), and documents as (url, title, text, category)."""
    records, docs = [], []
    for line_no, item in read_numbered_jsonl(path):
        where = f"{path}:{line_no}"
        kind = item.get("kind")
        url = item.get("url") or ""
        if kind == "qa":
            question = _text_field(item, ("question", "instruction"), where)
            answer = _text_field(item, ("answer", "output"), where)
            records.append(
                alpaca_record(
                    {**item, "instruction": question, "output": answer},
                    "crawl",
                    url=url or None,
                    origin=item.get("source"),
                )
            )
        elif kind == "doc":
            text = _text_field(item, ("text", "content"), where)
            docs.append((url, item.get("title") or "", text, item.get("category")))
        else:
            raise InputError(
                f"{where}: field 'kind' is {kind!r}; expected 'qa' or 'doc' (rerun the crawl stage)"
            )
    return with_ids(records), docs


def record_order(record: dict) -> tuple[str, str]:
    """The order of augment's records within a shard of records/: by id, then source."""
    return record["id"], record["source"]


def dataset_records(directory: str | Path) -> list[dict]:
    """Ingested public-dataset records (source: dataset), already mapped onto Alpaca fields, from the
    crawl stage's shards in order."""
    records = []
    for shard, line_no, item in iter_numbered_jsonl_dir(directory):
        where = f"{shard}:{line_no}"
        _text_field(item, ("instruction",), where)
        _text_field(item, ("output",), where)
        records.append(alpaca_record(item, "dataset", origin=item.get("source")))
    return with_ids(records)


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split text at paragraph, then sentence, then hard boundaries into chunks of <= max_chars."""
    pieces: list[str] = []
    for para in (p.strip() for p in re.split(r"\n+", text)):
        if len(para) <= max_chars:
            pieces.extend([para] if para else [])
            continue
        for sentence in re.split(r"(?<=[.!?。！？])\s*", para):
            pieces.extend(
                sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars) if sentence.strip()
            )
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] = f"{chunks[-1]}\n{piece}"
        else:
            chunks.append(piece)
    return chunks


def doc_chunks(docs: list[tuple[str, str, str, str | None]], max_chars: int) -> list[Chunk]:
    """All chunks of all documents, round-robin over the documents (the first chunk of every
    document, then every second chunk, ...; documents by url), so grounded calls spread over
    all documents before any gets a second one."""
    per_doc = [
        [Chunk(url, title, piece, category) for piece in chunk_text(text, max_chars)]
        for url, title, text, category in sorted(docs, key=lambda d: (d[0], d[1]))
    ]
    longest = max((len(c) for c in per_doc), default=0)
    return [chunks[i] for i in range(longest) for chunks in per_doc if i < len(chunks)]


def budgeted_chunks(chunks: list[Chunk], budget: int, seed: int) -> list[Chunk]:
    """The chunks grounded generation reads (augment.chunk_budget): all of them when there are at
    most `budget`, else a sample of `budget` drawn with `seed`, in the round-robin order."""
    if len(chunks) <= budget:
        return chunks
    keep = sorted(random.Random(step_seed(seed, "chunks")).sample(range(len(chunks)), budget))
    return [chunks[i] for i in keep]


# --- prompts ------------------------------------------------------------------------------


def load_templates(prompts_dir: str | Path) -> dict[str, jinja2.Template]:
    """The prompt templates `<name>.txt` under prompts_dir; a missing one fails naming the file."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    templates = {}
    for name in TEMPLATES:
        path = Path(prompts_dir, f"{name}.txt")
        if not path.is_file():
            raise InputError(
                f"{path}: prompt template is missing (augment.prompts_dir is {str(prompts_dir)!r})"
            )
        try:
            templates[name] = env.from_string(path.read_text(encoding="utf-8"))
        except jinja2.TemplateSyntaxError as err:
            raise InputError(f"{path}:{err.lineno}: template syntax error: {err.message}") from None
    return templates


def user(content: str) -> dict:
    return {"role": "user", "content": content.strip()}


def _examples(records: list[dict]) -> list[dict]:
    return [{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in records]


# --- parsing replies ----------------------------------------------------------------------


def parse_questions(text: str) -> list[str]:
    value = parse_json_object(text).get("questions")
    if not isinstance(value, list) or not value or not all(isinstance(q, str) for q in value):
        raise ReplyError("invalid_schema", 'expected {"questions": [...]} with a non-empty list of strings')
    return [q.strip() for q in value]


def parse_answer(text: str) -> str:
    value = parse_json_object(text).get("answer")
    if not isinstance(value, str):
        raise ReplyError("invalid_schema", 'expected {"answer": "..."} with a string')
    return value.strip()


def parse_pairs(text: str) -> list[tuple[str, str]]:
    value = parse_json_object(text).get("pairs")
    error = ReplyError("invalid_schema", 'expected {"pairs": [{"question": "...", "answer": "..."}, ...]}')
    if not isinstance(value, list) or not value:
        raise error
    pairs = []
    for item in value:
        question = item.get("question", item.get("instruction")) if isinstance(item, dict) else None
        answer = item.get("answer", item.get("output")) if isinstance(item, dict) else None
        if not isinstance(question, str) or not isinstance(answer, str):
            raise error
        pairs.append((question.strip(), answer.strip()))
    return pairs


def _text(min_chars: int, max_chars: int) -> dict:
    return {"type": "string", "minLength": min_chars, "maxLength": max_chars}


def _closed(properties: dict) -> dict:
    # OpenAI's strict mode needs every property required and no others allowed.
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def reply_schema(kind: str, n: int, p: Augment) -> dict:
    """The JSON schema of a reply of `kind` (questions | answer | pairs) asking for `n` items: what the
    parser reads, with bounded lengths and counts, so a reply decoded under it ends before max_tokens."""
    question, answer = _text(10, p.max_question_chars), _text(10, p.max_answer_chars)
    if kind == "questions":
        return _closed({"questions": {"type": "array", "items": question, "minItems": 1, "maxItems": n}})
    if kind == "answer":
        return _closed({"answer": answer})
    pair = _closed({"question": question, "answer": answer})
    return _closed({"pairs": {"type": "array", "items": pair, "minItems": 1, "maxItems": n}})


def response_format(structured: str, name: str, schema: dict) -> dict | None:
    """The response_format of a call: json_schema (strict, with `schema`), json_object, or None (none)."""
    if structured == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    return {"type": "json_object"} if structured == "json_object" else None


# --- review -------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    # CJK characters count one by one; other scripts by words of 3+ letters or numbers.
    return [
        t
        for t in re.findall(r"[\u3400-\u9fff]|[^\W_]+", text.lower())
        if len(t) >= 3 or not t.isascii() or t.isdigit()
    ]


def grounding(answer: str, passage: str) -> float:
    """The share of the answer's words that occur in the passage (0 for an empty answer)."""
    words = _tokens(answer)
    if not words:
        return 0.0
    vocabulary = set(_tokens(passage))
    return sum(w in vocabulary for w in words) / len(words)


def normalize(text: str) -> str:
    return " ".join(str(text).casefold().split())


def review_rules(p: Augment, clean: Clean) -> ReviewRules:
    """The rules the review loop applies: fixed limits, plus the clean stage's language and PII
    policy (clean.languages, clean.pii: reject) when augment.review_clean_rules is on, so that a
    generated record the clean stage would throw away is fed back as a mistake in the next round."""
    if not p.review_clean_rules:
        return ReviewRules()
    limits = dataclasses.replace(
        REVIEW_LIMITS,
        languages=tuple(clean.languages),
        language_min_chars=clean.language_min_chars,
        language_confidence=clean.language_confidence,
    )
    return ReviewRules(limits, clean.pii == "reject", tuple(clean.phone_regions))


def record_problems(
    record: dict,
    passage: str | None,
    min_grounding: float,
    seen: set[str],
    rules: ReviewRules = ReviewRules(),
) -> list[str]:
    """Why a generated record is unfit: the shared rule checks, grounding, duplicates."""
    problems = list(review_problems(record, rules))
    if passage is not None and grounding(record["output"], passage) < min_grounding:
        problems.append("not_grounded")
    if normalize(record["instruction"]) in seen:
        problems.append("duplicate")
    return problems


def _printable(text: str, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mistakes_from(rejects: list[dict], limit: int) -> list[dict]:
    """The first `limit` rejects of a round as prompt-ready examples: text and reasons."""
    examples = []
    for reject in rejects[:limit]:
        if reject["kind"] == "record":
            record = reject["record"]
            text = f"{record['instruction']} -> {record['output'] or '(empty answer)'}"
        else:
            text = reject["raw"] or "(no reply)"
        examples.append({"text": _printable(text), "reasons": [describe(r) for r in reject["reasons"]]})
    return examples


def reviewed_mistakes(records: list[dict], human: dict[str, str], limit: int) -> list[dict]:
    """The first `limit` of `records` that a person rejected, as prompt-ready examples with their reason.

    `human` maps content hashes to the reviewer's reason (tuneline.data.review.human_mistakes).
    """
    examples = []
    for record in records:
        reason = human.get(text_hash(record))
        if reason is not None and len(examples) < limit:
            text = f"{record['instruction']} -> {record['output'] or '(empty answer)'}"
            examples.append(
                {"text": _printable(text), "reasons": [f"a reviewer rejected it: {_printable(reason)}"]}
            )
    return examples


# --- generators ---------------------------------------------------------------------------


@dataclass
class Task:
    """One question put to the model: its prompt, the JSON it asks for (`step`, read by `parse`) and
    what it is about."""

    step: str  # questions | answer | pairs: the reply's shape, named in a reply reject
    generator: str  # expand | grounded
    messages: list[dict]
    parse: Callable[[str], Any]
    context: dict
    response_format: dict | None = None


class Candidate(NamedTuple):
    """A generated record before review, the passage its answer must be grounded in (None: no
    grounding check), and the problems known before review."""

    record: dict
    passage: str | None
    known: list[str]


@dataclass(frozen=True)
class Round:
    """What a generator writes one round's prompts from."""

    number: int  # 1 is the pilot
    p: Augment
    templates: dict
    mistakes: list[dict]  # the generator's own "avoid these mistakes", from the round before
    seen: set[str]  # the normalised requests of the records kept so far
    calls_before: int  # the generator's calls in the rounds before: where its round-robin goes on
    seed: int


@dataclass(frozen=True)
class Generator:
    """One generator of records, whole: how many records each of its calls asks for in a round
    (`sizes`), its prompts with the parse of their replies (`tasks`), and the records it makes of the
    parsed replies (`records`: candidates for review, and follow-up tasks; `answered`: the
    candidates of the follow-ups' replies)."""

    name: str
    sizes: Callable[[Augment, int, int], list[int]]  # (p, round number, calls before) -> records per call
    tasks: Callable[[Round, list[int]], list[Task]]
    records: Callable[[Round, list[tuple[Task, Any]]], tuple[list[Candidate], list[Task]]]
    answered: Callable[[Round, list[tuple[Task, Any]]], list[Candidate]] = lambda at, done: []


def _sizes(total: int, per_call: int) -> list[int]:
    """How many records to ask for in each call of a round: `per_call`, the last one the rest."""
    calls = math.ceil(total / per_call)
    return [min(per_call, total - j * per_call) for j in range(calls)]


def round_sizes(p: Augment, round_no: int) -> list[int]:
    """Records to ask for in each call of a round: the pilot's pilot_size, or per_round."""
    return _sizes(p.pilot_size if round_no == 1 else p.per_round, p.per_call)


def grounded_sizes(p: Augment, round_no: int, n_chunks: int, calls_so_far: int) -> list[int]:
    """Pairs to ask for in each grounded call of a round: the round's share of pilot_size or
    per_round, and more calls (per_call pairs each) until the rounds after the pilot have read
    every one of the `n_chunks` chunks once."""
    sizes = round_sizes(p, round_no)
    if round_no == 1 and p.rounds > 1:
        return sizes  # the pilot stays small: it is reviewed before the rest is spent
    unread = max(0, n_chunks - calls_so_far)
    share = math.ceil(unread / (p.rounds - round_no + 1))
    return sizes + [p.per_call] * max(0, share - len(sizes))


def generated_record(
    instruction: str, output: str, generator: str, round_no: int, category: str | None, url: str | None
) -> dict:
    item = {"instruction": instruction, "output": output, "category": category or None}
    return alpaca_record(item, "generated", generator=generator, round=round_no, url=url, origin=generator)


def expansion(seeds: list[dict]) -> Generator:
    """Few-shot expansion of the seeds: ask for new requests like k seeds of one category (call g of
    the run takes category g mod #categories), then ask for each new request's answer."""
    by_category: dict[str, list[dict]] = {}
    for record in sorted(seeds, key=lambda r: r["id"]):
        by_category.setdefault(record.get("category") or "", []).append(record)
    categories = sorted(by_category)

    def tasks(at: Round, sizes: list[int]) -> list[Task]:
        out = []
        for j, n in enumerate(sizes):
            g = at.calls_before + j
            category = categories[g % len(categories)]
            pool = by_category[category]
            rng = random.Random(step_seed(at.seed, "expand", g))
            examples = _examples(rng.sample(pool, min(at.p.few_shot_k, len(pool))))
            text = at.templates["expand"].render(
                examples=examples, category=category, n=n, mistakes=at.mistakes
            )
            fmt = response_format(at.p.structured, "questions", reply_schema("questions", n, at.p))
            out.append(
                Task(
                    "questions",
                    "expand",
                    [user(text)],
                    parse_questions,
                    {"examples": examples, "category": category},
                    fmt,
                )
            )
        return out

    def records(at: Round, done: list[tuple[Task, Any]]) -> tuple[list[Candidate], list[Task]]:
        candidates, answers = [], []
        asked = set(at.seen)
        for task, questions in done:
            for question in questions:
                if normalize(question) in asked:
                    # A repeated request is rejected before it costs an answer call.
                    record = generated_record(
                        question, "", "expand", at.number, task.context["category"], None
                    )
                    candidates.append(Candidate(record, None, ["duplicate"]))
                    continue
                asked.add(normalize(question))
                text = at.templates["answer"].render(
                    examples=task.context["examples"], question=question, mistakes=at.mistakes
                )
                fmt = response_format(at.p.structured, "answer", reply_schema("answer", 1, at.p))
                answers.append(
                    Task(
                        "answer",
                        "expand",
                        [user(text)],
                        parse_answer,
                        {**task.context, "question": question},
                        fmt,
                    )
                )
        return candidates, answers

    def answered(at: Round, done: list[tuple[Task, Any]]) -> list[Candidate]:
        return [
            Candidate(
                generated_record(
                    t.context["question"], answer, "expand", at.number, t.context["category"], None
                ),
                None,
                [],
            )
            for t, answer in done
        ]

    return Generator(
        "expand", lambda p, round_no, calls_before: round_sizes(p, round_no), tasks, records, answered
    )


def grounded_qa(chunks: list[Chunk]) -> Generator:
    """Q&A grounded in the crawled documents: ask for pairs one chunk supports (call g of the run
    takes chunk g mod #chunks); each answer is checked against its chunk."""

    def tasks(at: Round, sizes: list[int]) -> list[Task]:
        out = []
        for j, n in enumerate(sizes):
            chunk = chunks[(at.calls_before + j) % len(chunks)]
            text = at.templates["grounded"].render(
                chunk=chunk.text, url=chunk.url, title=chunk.title, n=n, mistakes=at.mistakes
            )
            fmt = response_format(at.p.structured, "pairs", reply_schema("pairs", n, at.p))
            out.append(Task("pairs", "grounded", [user(text)], parse_pairs, {"chunk": chunk}, fmt))
        return out

    def records(at: Round, done: list[tuple[Task, Any]]) -> tuple[list[Candidate], list[Task]]:
        candidates = []
        for task, pairs in done:
            chunk = task.context["chunk"]
            for question, answer in pairs:
                record = generated_record(question, answer, "grounded", at.number, chunk.category, chunk.url)
                candidates.append(Candidate(record, chunk.text, []))
        return candidates, []

    return Generator(
        "grounded",
        lambda p, round_no, calls_before: grounded_sizes(p, round_no, len(chunks), calls_before),
        tasks,
        records,
    )


# --- the round loop -----------------------------------------------------------------------


@dataclass
class RoundLog:
    round: int
    asked: int = 0
    calls: int = 0
    generated: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    failed_replies: Counter = field(default_factory=Counter)
    human_rejected: int = 0

    def as_dict(self) -> dict:
        return {
            "round": self.round,
            "asked": self.asked,
            "calls": self.calls,
            "generated": self.generated,
            "accepted": self.accepted,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "failed_replies": sum(self.failed_replies.values()),
            "failed_replies_by_reason": dict(sorted(self.failed_replies.items())),
            "human_rejected": self.human_rejected,
        }


@dataclass
class AugmentResult:
    records: list[dict]
    rejects: list[dict]
    rounds: list[dict]
    replies: list[Reply]


def step_seed(seed: int, *parts: Any) -> int:
    """A run seed for one step of one round, so equal prompts in two rounds are distinct calls."""
    return int(content_hash(seed, *parts), 16) % 2**31


def ask(
    tasks: list[Task], call: Call, templates: dict, retries: int, seed: int, log: RoundLog
) -> tuple[list[Any], list[dict], list[Reply]]:
    """Parsed replies for each task (None where it failed), the reply rejects, all replies.

    A reply that does not parse is answered with the reason and asked again in the same
    conversation, up to `retries` times. A failed request is not asked again here: the
    openai client has already retried it with backoff. Neither an empty reply nor a failed
    request is cached, so the next run asks them again.
    """
    conversations = [t.messages for t in tasks]
    values: list[Any] = [None] * len(tasks)
    failures: dict[int, tuple[str, str, str | None, int]] = {}
    replies: list[Reply] = []
    pending = list(range(len(tasks)))
    for attempt in range(1, retries + 2):
        if not pending:
            break
        got = call([conversations[i] for i in pending], seed, [tasks[i].response_format for i in pending])
        replies += got
        retry = []
        for i, reply in zip(pending, got):
            if reply.error is not None:
                # Not cached, so the next run asks again; a deterministic model would
                # answer the same now, so it is not re-asked here.
                reason = {EMPTY_REPLY: "empty_reply", TRUNCATED: "truncated"}.get(
                    reply.error, "request_failed"
                )
                failures[i] = (reason, reply.error, None, attempt)
                continue
            try:
                values[i] = tasks[i].parse(reply.text or "")
                failures.pop(i, None)
            except ReplyError as err:
                failures[i] = (err.reason, err.detail, reply.text, attempt)
                fix = templates["retry"].render(reason=err.detail)
                conversations[i] = conversations[i] + [
                    {"role": "assistant", "content": reply.text},
                    user(fix),
                ]
                retry.append(i)
        pending = retry if attempt <= retries else []
    log.calls += len(replies)
    rejects = []
    for i, (reason, detail, raw, attempts) in sorted(failures.items()):
        log.failed_replies[reason] += 1
        rejects.append(
            {
                "kind": "reply",
                "generator": tasks[i].generator,
                "step": tasks[i].step,
                "round": log.round,
                "reason": reason,
                "reasons": [reason],
                "detail": detail,
                "raw": raw,
                "attempts": attempts,
                **({"url": tasks[i].context["chunk"].url} if "chunk" in tasks[i].context else {}),
            }
        )
    return values, rejects, replies


def _parsed(generator: Generator, tasks: list[Task], values: list[Any]) -> list[tuple[Task, Any]]:
    """The generator's tasks whose reply parsed, with the parsed reply."""
    return [(t, v) for t, v in zip(tasks, values) if t.generator == generator.name and v is not None]


def generate(
    generators: list[Generator],
    at: dict[str, Round],
    sizes: dict[str, list[int]],
    call: Call,
    templates: dict,
    retries: int,
    seed: int,
    log: RoundLog,
) -> tuple[list[Candidate], list[dict], list[Reply]]:
    """One round's generation: every generator's calls (`sizes[name]` records each) asked together,
    then the follow-ups their replies ask for (expansion's answers); the candidate records, the
    reply rejects, every reply."""
    tasks = [t for g in generators for t in g.tasks(at[g.name], sizes[g.name])]
    values, rejects, replies = ask(tasks, call, templates, retries, step_seed(seed, log.round, "ask"), log)
    candidates, follow_ups = [], []
    for g in generators:
        made, more = g.records(at[g.name], _parsed(g, tasks, values))
        candidates += made
        follow_ups += more
    values, more_rejects, more_replies = ask(
        follow_ups, call, templates, retries, step_seed(seed, log.round, "answer"), log
    )
    for g in generators:
        candidates += g.answered(at[g.name], _parsed(g, follow_ups, values))
    return candidates, rejects + more_rejects, replies + more_replies


def review(
    candidates: list[Candidate], min_grounding: float, seen: set[str], rules: ReviewRules, log: RoundLog
) -> tuple[list[dict], list[dict]]:
    """A round's accepted records and record rejects, reviewed in order: an accepted record's request
    joins `seen`, so a later candidate that repeats it is a duplicate."""
    accepted, rejected = [], []
    for record, passage, known in candidates:
        log.generated += 1
        problems = known or record_problems(record, passage, min_grounding, seen, rules)
        if problems:
            log.rejected.update(problems)
            rejected.append(
                {
                    "kind": "record",
                    "generator": record["generator"],
                    "round": log.round,
                    "reason": problems[0],
                    "reasons": problems,
                    "record": record,
                }
            )
        else:
            log.accepted += 1
            seen.add(normalize(record["instruction"]))
            accepted.append(record)
    return accepted, rejected


def feedback(
    generator: Generator, accepted: list[dict], rejects: list[dict], human: dict[str, str], limit: int
) -> list[dict]:
    """The generator's "avoid these mistakes" for the next round: its accepted records a person
    rejected, then its own flagged records and replies."""
    reviewed = reviewed_mistakes([r for r in accepted if r["generator"] == generator.name], human, limit)
    return reviewed + mistakes_from([r for r in rejects if r["generator"] == generator.name], limit)


def run_rounds(
    p: Augment,
    seeds: list[dict],
    chunks: list[Chunk],
    existing: list[dict],
    templates: dict,
    call: Call,
    seed: int,
    rules: ReviewRules = ReviewRules(),
    human: dict[str, str] | None = None,
) -> AugmentResult:
    """The seed's method for `p.rounds` rounds: a small pilot, review (against `rules`), its mistakes
    fed back into the next round's prompts, and the next round; return accepted records and rejects.

    `human` ({content hash: reason}) holds a person's rejects; those among a round's accepted
    records join the rule flags in the next round's "avoid these mistakes" (the clean stage
    removes them).
    """
    human = human or {}
    generators = ([expansion(seeds)] if seeds else []) + ([grounded_qa(chunks)] if chunks else [])
    seen = {normalize(r["instruction"]) for r in existing}
    mistakes: dict[str, list[dict]] = {g.name: [] for g in generators}
    calls_before: Counter = Counter()
    records, rejects, replies, rounds = [], [], [], []
    every_candidate: list[dict] = []

    for round_no in range(1, p.rounds + 1):
        log = RoundLog(round_no)
        at = {
            g.name: Round(round_no, p, templates, mistakes[g.name], seen, calls_before[g.name], seed)
            for g in generators
        }
        sizes = {
            g.name: g.sizes(p, round_no, calls_before[g.name]) for g in generators
        }  # round 1: the pilot's
        calls_before.update({name: len(s) for name, s in sizes.items()})
        log.asked = sum(sum(s) for s in sizes.values())
        candidates, reply_rejects, got = generate(
            generators, at, sizes, call, templates, p.reply_retries, seed, log
        )
        replies += got
        every_candidate += [c.record for c in candidates]
        accepted, record_rejects = review(candidates, p.min_grounding, seen, rules, log)
        records += accepted
        log.human_rejected = sum(text_hash(r) in human for r in accepted)
        round_rejects = record_rejects + reply_rejects
        mistakes = {
            g.name: feedback(g, accepted, round_rejects, human, p.feedback_examples) for g in generators
        }
        rejects += round_rejects
        rounds.append(log.as_dict())
    # Ids are given last, over the whole run, so identical records of two rounds get one id each;
    # the dicts are updated in place because `records` and `rejects` share them.
    for record, identified in zip(every_candidate, with_ids(every_candidate)):
        record.update(identified)
    return AugmentResult(records, rejects, rounds, replies)


def endpoint(p: Augment, base_url: str) -> Endpoint:
    """The augment params as an llm.Endpoint, with `base_url` already resolved (not "local")."""
    return Endpoint(
        base_url=base_url,
        model=p.model,
        api_key_env=p.api_key_env,
        temperature=p.temperature,
        max_tokens=p.max_tokens,
        concurrency=p.concurrency,
        requests_per_minute=p.requests_per_minute,
        max_retries=p.max_retries,
        timeout_s=p.timeout_s,
        tokens_per_minute=p.tokens_per_minute,
    )


def summary(passthrough: list[dict], result: AugmentResult) -> dict:
    """Record counts by source and rejects by reason, for metrics/augment.json."""
    by_source = Counter(r["source"] for r in passthrough + result.records)
    record_reasons = Counter(
        reason for r in result.rejects if r["kind"] == "record" for reason in r["reasons"]
    )
    reply_reasons = Counter(r["reason"] for r in result.rejects if r["kind"] == "reply")
    return {
        "records": len(passthrough) + len(result.records),
        "records_by_source": dict(sorted(by_source.items())),
        "generated": sum(r["generated"] for r in result.rounds),
        "accepted": len(result.records),
        "rejected_records": sum(r["kind"] == "record" for r in result.rejects),
        "rejected_records_by_reason": dict(sorted(record_reasons.items())),
        "failed_replies": sum(r["kind"] == "reply" for r in result.rejects),
        "failed_replies_by_reason": dict(sorted(reply_reasons.items())),
        # Calls that still failed after the client's retries: the next run asks exactly these again.
        "failed_calls": [
            {k: r.get(k) for k in ("generator", "step", "round", "url", "detail")}
            for r in result.rejects
            if r["kind"] == "reply" and r["reason"] == "request_failed"
        ],
        "rounds": result.rounds,
    }


def pilot_line(pilot: dict, rejects: list[dict], top: int = 3) -> str:
    """One line on the pilot round (round 1): asked, generated, accepted, rejected, and the top reasons."""
    reasons = Counter(r["reason"] for r in rejects if r["round"] == pilot["round"])
    listed = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(top)) or "none"
    return (
        f"augment: pilot round: asked {pilot['asked']}, generated {pilot['generated']}, accepted "
        f"{pilot['accepted']}, "
        f"rejected {pilot['rejected']} records and {pilot['failed_replies']} replies; top reasons: {listed} "
        "(all in rejects.jsonl; `tuneline review` shows the round)"
    )
