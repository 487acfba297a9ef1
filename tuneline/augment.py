"""Augmentation: records that pass through, and records an LLM writes, reviewed round by round.

Pass-through (no call): the seeds, crawled Q&A pairs, and ingested dataset records.
Generated, from two prompt templates under `augment.prompts_dir`:
  expand   - sample k seeds of one category, ask for new requests like them, then answer each
  grounded - chunk each crawled document, ask for Q&A pairs the chunk supports (url kept)

Review loop: round 1 asks for a small pilot batch; the shared rule checks
(`tuneline.rules.review_problems`) plus a grounding and a duplicate check flag bad records;
the flagged examples and their reasons go into the next round's prompts as "avoid these
mistakes", together with the records of the round that a person rejected in `tuneline review`
(matched by content hash, with the person's reason). A reply that is not the JSON asked for is retried in the same conversation with
the reason, a bounded number of times, then rejected with the raw reply.

The round loop takes a `call(requests, seed) -> list[Reply]` function, so this module does
no I/O of its own beyond reading input and template files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from tuneline.llm import EMPTY_REPLY, TRUNCATED, Endpoint, Reply, ReplyError, parse_json_object
from tuneline.params import Augment, Clean
from tuneline.records import InputError, content_hash, iter_numbered_jsonl, iter_numbered_jsonl_dir, text_hash, with_ids
from tuneline.rules import REVIEW_LIMITS, ReviewRules, describe, review_problems

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
        raise InputError(f"{path} holds no seed record (base.seeds); add at least one JSON line with instruction "
                         "and output, as data/seeds/seeds.jsonl has")
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
            records.append(alpaca_record({**item, "instruction": question, "output": answer}, "crawl",
                                         url=url or None, origin=item.get("source")))  # fmt: skip
        elif kind == "doc":
            text = _text_field(item, ("text", "content"), where)
            docs.append((url, item.get("title") or "", text, item.get("category")))
        else:
            raise InputError(f"{where}: field 'kind' is {kind!r}; expected 'qa' or 'doc' (rerun the crawl stage)")
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
            pieces.extend(sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars) if sentence.strip())
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


# --- prompts ------------------------------------------------------------------------------


def load_templates(prompts_dir: str | Path) -> dict[str, jinja2.Template]:
    """The prompt templates `<name>.txt` under prompts_dir; a missing one fails naming the file."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    templates = {}
    for name in TEMPLATES:
        path = Path(prompts_dir, f"{name}.txt")
        if not path.is_file():
            raise InputError(f"{path}: prompt template is missing (augment.prompts_dir is {str(prompts_dir)!r})")
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


PARSERS: dict[str, Callable[[str], Any]] = {"questions": parse_questions, "answer": parse_answer, "pairs": parse_pairs}


def _text(min_chars: int, max_chars: int) -> dict:
    return {"type": "string", "minLength": min_chars, "maxLength": max_chars}


def _closed(properties: dict) -> dict:
    # OpenAI's strict mode needs every property required and no others allowed.
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


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
    return [t for t in re.findall(r"[\u3400-\u9fff]|[^\W_]+", text.lower()) if len(t) >= 3 or not t.isascii() or t.isdigit()]


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
    record: dict, passage: str | None, min_grounding: float, seen: set[str], rules: ReviewRules = ReviewRules()
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

    `human` maps content hashes to the reviewer's reason (tuneline.review.human_mistakes).
    """
    examples = []
    for record in records:
        reason = human.get(text_hash(record))
        if reason is not None and len(examples) < limit:
            text = f"{record['instruction']} -> {record['output'] or '(empty answer)'}"
            examples.append({"text": _printable(text), "reasons": [f"a reviewer rejected it: {_printable(reason)}"]})
    return examples


# --- the round loop -----------------------------------------------------------------------


@dataclass
class Task:
    """One question put to the model: what kind of JSON it asks for, and what it is about."""

    kind: str  # questions | answer | pairs
    generator: str  # expand | grounded
    messages: list[dict]
    context: dict
    response_format: dict | None = None


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


def ask(tasks: list[Task], call: Call, templates: dict, retries: int, seed: int, log: RoundLog) -> tuple[list[Any], list[dict], list[Reply]]:
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
                reason = {EMPTY_REPLY: "empty_reply", TRUNCATED: "truncated"}.get(reply.error, "request_failed")
                failures[i] = (reason, reply.error, None, attempt)
                continue
            try:
                values[i] = PARSERS[tasks[i].kind](reply.text or "")
                failures.pop(i, None)
            except ReplyError as err:
                failures[i] = (err.reason, err.detail, reply.text, attempt)
                fix = templates["retry"].render(reason=err.detail)
                conversations[i] = conversations[i] + [{"role": "assistant", "content": reply.text}, user(fix)]
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
                "step": tasks[i].kind,
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


def _sizes(total: int, per_call: int) -> list[int]:
    """How many records to ask for in each call of a round: `per_call`, the last one the rest."""
    calls = math.ceil(total / per_call)
    return [min(per_call, total - j * per_call) for j in range(calls)]


def expand_tasks(seeds_by_category: dict[str, list[dict]], sizes: list[int], first: int, p: Augment,
                 templates: dict, mistakes: list[dict], seed: int) -> list[Task]:  # fmt: skip
    """Few-shot tasks; call g (counted over the whole run) uses category g mod #categories."""
    categories = sorted(seeds_by_category)
    tasks = []
    for j, n in enumerate(sizes):
        g = first + j
        category = categories[g % len(categories)]
        pool = seeds_by_category[category]
        rng = random.Random(step_seed(seed, "expand", g))
        examples = _examples(rng.sample(pool, min(p.few_shot_k, len(pool))))
        text = templates["expand"].render(examples=examples, category=category, n=n, mistakes=mistakes)
        fmt = response_format(p.structured, "questions", reply_schema("questions", n, p))
        tasks.append(Task("questions", "expand", [user(text)], {"examples": examples, "category": category}, fmt))
    return tasks


def grounded_tasks(chunks: list[Chunk], sizes: list[int], first: int, p: Augment, templates: dict,
                   mistakes: list[dict]) -> list[Task]:  # fmt: skip
    """Grounded tasks; call g (counted over the whole run) uses chunk g mod #chunks."""
    tasks = []
    for j, n in enumerate(sizes):
        chunk = chunks[(first + j) % len(chunks)]
        text = templates["grounded"].render(chunk=chunk.text, url=chunk.url, title=chunk.title, n=n, mistakes=mistakes)
        fmt = response_format(p.structured, "pairs", reply_schema("pairs", n, p))
        tasks.append(Task("pairs", "grounded", [user(text)], {"chunk": chunk}, fmt))
    return tasks


def generated_record(instruction: str, output: str, generator: str, round_no: int, category: str | None,
                     url: str | None) -> dict:  # fmt: skip
    item = {"instruction": instruction, "output": output, "category": category or None}
    return alpaca_record(item, "generated", generator=generator, round=round_no, url=url, origin=generator)


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
    """Generate, review (against `rules`) and feed back for `p.rounds` rounds; return accepted
    records and rejects.

    `human` ({content hash: reason}) holds a person's rejects; those among a round's accepted
    records join the rule flags in the next round's "avoid these mistakes" (the clean stage
    removes them).
    """
    seeds_by_category: dict[str, list[dict]] = {}
    for record in sorted(seeds, key=lambda r: r["id"]):
        seeds_by_category.setdefault(record.get("category") or "", []).append(record)
    seen = {normalize(r["instruction"]) for r in existing}
    generators = [g for g, ok in (("expand", bool(seeds)), ("grounded", bool(chunks))) if ok]
    mistakes: dict[str, list[dict]] = {g: [] for g in generators}
    calls_so_far: Counter = Counter()
    records, rejects, replies, rounds = [], [], [], []
    every_candidate: list[dict] = []

    for round_no in range(1, p.rounds + 1):
        log = RoundLog(round_no)
        sizes = _sizes(p.pilot_size if round_no == 1 else p.per_round, p.per_call)
        tasks: list[Task] = []
        if "expand" in generators:
            tasks += expand_tasks(seeds_by_category, sizes, calls_so_far["expand"], p, templates, mistakes["expand"], seed)
        if "grounded" in generators:
            tasks += grounded_tasks(chunks, sizes, calls_so_far["grounded"], p, templates, mistakes["grounded"])
        calls_so_far.update({g: len(sizes) for g in generators})
        log.asked = sum(sizes) * len(generators)

        values, round_rejects, got = ask(tasks, call, templates, p.reply_retries, step_seed(seed, round_no, "ask"), log)
        replies += got
        # (record, passage for the grounding check, problems known before review)
        candidates: list[tuple[dict, str | None, list[str]]] = []
        answer_tasks: list[Task] = []
        asked = set(seen)
        for task, value in zip(tasks, values):
            if value is None:
                continue
            if task.kind == "pairs":
                chunk = task.context["chunk"]
                for question, answer in value:
                    record = generated_record(question, answer, "grounded", round_no, chunk.category, chunk.url)
                    candidates.append((record, chunk.text, []))
                continue
            for question in value:
                if normalize(question) in asked:
                    # A repeated request is rejected before it costs an answer call.
                    record = generated_record(question, "", "expand", round_no, task.context["category"], None)
                    candidates.append((record, None, ["duplicate"]))
                    continue
                asked.add(normalize(question))
                text = templates["answer"].render(examples=task.context["examples"], question=question,
                                                  mistakes=mistakes["expand"])  # fmt: skip
                fmt = response_format(p.structured, "answer", reply_schema("answer", 1, p))
                answer_tasks.append(Task("answer", "expand", [user(text)], {**task.context, "question": question}, fmt))
        answers, answer_rejects, got = ask(answer_tasks, call, templates, p.reply_retries,
                                           step_seed(seed, round_no, "answer"), log)  # fmt: skip
        replies += got
        round_rejects += answer_rejects
        for task, answer in zip(answer_tasks, answers):
            if answer is not None:
                record = generated_record(task.context["question"], answer, "expand", round_no, task.context["category"], None)
                candidates.append((record, None, []))

        record_rejects = []
        for record, passage, known in candidates:
            every_candidate.append(record)
            log.generated += 1
            problems = known or record_problems(record, passage, p.min_grounding, seen, rules)
            if problems:
                log.rejected.update(problems)
                record_rejects.append({"kind": "record", "generator": record["generator"], "round": round_no,
                                       "reason": problems[0], "reasons": problems, "record": record})  # fmt: skip
            else:
                log.accepted += 1
                seen.add(normalize(record["instruction"]))
                records.append(record)
        round_rejects = record_rejects + round_rejects
        accepted = records[len(records) - log.accepted :]
        log.human_rejected = sum(text_hash(r) in (human or {}) for r in accepted)
        for generator in generators:
            own = [r for r in round_rejects if r["generator"] == generator]
            reviewed = reviewed_mistakes([r for r in accepted if r["generator"] == generator], human or {},
                                         p.feedback_examples)  # fmt: skip
            mistakes[generator] = reviewed + mistakes_from(own, p.feedback_examples)
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
    record_reasons = Counter(reason for r in result.rejects if r["kind"] == "record" for reason in r["reasons"])
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
            for r in result.rejects if r["kind"] == "reply" and r["reason"] == "request_failed"
        ],
        "rounds": result.rounds,
    }


def pilot_line(pilot: dict, rejects: list[dict], top: int = 3) -> str:
    """One line on the pilot round (round 1): asked, generated, accepted, rejected, and the top reasons."""
    reasons = Counter(r["reason"] for r in rejects if r["round"] == pilot["round"])
    listed = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(top)) or "none"
    return (f"augment: pilot round: asked {pilot['asked']}, generated {pilot['generated']}, accepted {pilot['accepted']}, "
            f"rejected {pilot['rejected']} records and {pilot['failed_replies']} replies; top reasons: {listed} "
            "(all in rejects.jsonl; `tuneline review` shows the round)")
