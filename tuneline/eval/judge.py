"""The LLM judge: does the tuned model answer better than the base model? (evaluate.judge), and
does a candidate base model answer as well as the reference answers? (select.judge).

For each record the judge sees the request and two answers (evaluate's prompt also shows the
reference answer), and names the better one. Judges prefer the answer shown first (the MT-Bench
paper), so every pair is asked twice, the tuned answer first and then second; a verdict counts only when both
orders agree, and a pair whose orders disagree is a tie. A reply that is not the JSON asked for is
answered with the retry prompt and asked again in the same conversation, up to `reply_retries`
times; one still unusable counts as `unparsed`. Calls go through tuneline.llm.client (the openai client,
its retries and the per-call reply cache), so a rerun sends no request.

Two verdict forms (`verdict` in the judge's params): `json`, a reply {"winner": "A" | "B" | "tie"},
which a model that follows instructions gives; and `label`, one token, A, B or C (a tie), asked
for with max_tokens 1 and an OpenAI logit_bias of +100 on exactly those three tokens, so the reply
is always one of them and the verdict is whichever of the three the judge rates likeliest. That is
how a small local model can judge at all (free-form, the tiny default judge never wrote the JSON);
the label tokens' ids come from the judge's tokenizer, so `label` needs a local model directory.

The code names the first model "tuned" and the second "base"; select passes a candidate's answers
as the first and the validation split's reference answers as the second.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import jinja2
import numpy as np

from tuneline.common.params import ParamsError
from tuneline.common.records import EndpointError
from tuneline.eval.intervals import percentile_interval, resample_indexes
from tuneline.llm import client as llm
from tuneline.llm.client import Reply, ReplyError, parse_json_object

Call = Callable[[list[list[dict]], int], list[Reply]]
OUTCOMES = ("win", "tie", "loss", "unparsed")
# A record's points in the win rate: a tie (a "tie" verdict, or orders that disagree) is half a win,
# and so is an unparsed pair: the judge said nothing either way (the `unparsed` rate shows how often).
POINTS = {"win": 1.0, "tie": 0.5, "unparsed": 0.5, "loss": 0.0}


def load_prompt(path: str | Path, key: str) -> jinja2.Template:
    """The Jinja2 template in `path`; a missing file fails naming it and the params key."""
    if not Path(path).is_file():
        raise ParamsError(f"{path}: the prompt file named by {key} is missing")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(Path(path).read_text(encoding="utf-8"))


def pair_messages(template: jinja2.Template, record: dict, answer_a: str, answer_b: str) -> list[dict]:
    """The chat messages that ask the judge to compare answer A and answer B to `record`."""
    text = template.render(
        instruction=record["instruction"],
        input=record.get("input") or "",
        reference=record["output"],
        answer_a=answer_a,
        answer_b=answer_b,
    )
    return [{"role": "user", "content": text.strip()}]


# The json verdict's schema, sent as response_format json_schema (the judge's `structured`).
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["winner"],
    "additionalProperties": False,
}


def verdict_format(structured: str) -> dict | None:
    """The response_format of a json verdict call: json_schema with VERDICT_SCHEMA, json_object, or None."""
    if structured == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True},
        }
    return {"type": "json_object"} if structured == "json_object" else None


def failed_calls_check(replies: list[Reply], max_failed_fraction: float, key: str, base_url: str) -> None:
    """EndpointError when more than `max_failed_fraction` of the judge's calls failed after retries: a dead
    or wrong endpoint must not pass as a run of "unparsed" verdicts. Names `key`.base_url, the fix."""
    failed = [r for r in replies if r.error is not None]
    if replies and len(failed) > max_failed_fraction * len(replies):
        raise EndpointError(
            f"{key}: {len(failed)} of {len(replies)} judge calls failed after retries, more than "
            f"{key}.max_failed_fraction {max_failed_fraction}; first error: {failed[0].error}. Check "
            f"{key}.base_url ({base_url!r}), {key}.model and the key in {key}.api_key_env; "
            "a rerun asks only the failed calls again"
        )


# The label verdict's tokens: C is a tie.
LABELS = {"A": "A", "B": "B", "C": "tie"}


def parse_verdict(text: str) -> str:
    """'A', 'B' or 'tie' from a judge reply; ReplyError when it is not {"winner": ...}."""
    winner = parse_json_object(text).get("winner")
    verdict = {"a": "A", "b": "B", "tie": "tie"}.get(str(winner).strip().lower())
    if verdict is None:
        raise ReplyError("invalid_schema", 'expected {"winner": "A"}, {"winner": "B"} or {"winner": "tie"}')
    return verdict


def parse_label(text: str) -> str:
    """'A', 'B' or 'tie' from a one-letter label reply (C is a tie); ReplyError for anything else."""
    verdict = LABELS.get(text.strip())
    if verdict is None:
        raise ReplyError("invalid_label", "expected one letter: A, B or C")
    return verdict


def label_bias(model_dir: str, key: str) -> dict[str, float]:
    """The logit_bias that lets only the label tokens win: +100 (the most OpenAI allows) on the id
    of each of A, B and C in the judge's tokenizer; each must be a single token there. Sent as a
    float: `transformers serve` passes the values on as generate's sequence_bias, which rejects ints."""
    from tuneline.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    bias = {}
    for label in LABELS:
        ids = tokenizer.encode(label, add_special_tokens=False)
        if len(ids) != 1:
            raise ParamsError(
                f"{key}.verdict: label needs {label!r} to be one token of {model_dir}'s tokenizer; "
                f"it is {len(ids)}. Use verdict: json with this judge"
            )
        bias[str(ids[0])] = 100.0
    return bias


def for_tuned(tuned_first: str, tuned_second: str) -> tuple[str, str]:
    """The verdicts of both orders (the tuned answer as A, then as B) as the tuned model's win/tie/loss."""
    return {"A": "win", "B": "loss", "tie": "tie"}[tuned_first], {"B": "win", "A": "loss", "tie": "tie"}[
        tuned_second
    ]


def outcome(tuned_first: str | None, tuned_second: str | None) -> str:
    """The tuned model's outcome on one record from the verdicts of both orders (None: unparsed).
    Orders that disagree make a tie."""
    if tuned_first is None or tuned_second is None:
        return "unparsed"
    first, second = for_tuned(tuned_first, tuned_second)
    return first if first == second else "tie"


def ask(
    call: Call,
    conversations: list[list[dict]],
    retry: jinja2.Template,
    retries: int,
    seed: int,
    parse: Callable[[str], str] = parse_verdict,
) -> tuple[list[str | None], list[Reply]]:
    """The verdict of each conversation (None where no reply parsed by `parse`), and every reply received."""
    verdicts: list[str | None] = [None] * len(conversations)
    replies: list[Reply] = []
    pending = list(range(len(conversations)))
    for attempt in range(retries + 1):
        got = call([conversations[i] for i in pending], seed)
        replies += got
        again = []
        for i, reply in zip(pending, got):
            if reply.error is not None:  # not cached: the next run asks again
                continue
            try:
                verdicts[i] = parse(reply.text or "")
            except ReplyError as err:
                fix = retry.render(reason=err.detail).strip()
                conversations[i] = conversations[i] + [
                    {"role": "assistant", "content": reply.text},
                    {"role": "user", "content": fix},
                ]
                again.append(i)
        pending = again
        if not pending:
            break
    return verdicts, replies


def judge(
    call: Call,
    template: jinja2.Template,
    retry: jinja2.Template,
    records: list[dict],
    tuned: list[str],
    base: list[str],
    retries: int,
    seed: int,
    parse: Callable[[str], str] = parse_verdict,
) -> tuple[dict, list[dict], list[Reply]]:
    """Win/tie/loss/unparsed rates of tuned over base, the position-consistency rate (share of the
    parsed pairs whose two orders agreed), a 95% bootstrap interval of win minus loss rate; the
    per-record verdicts; every reply."""
    conversations = []
    for record, t, b in zip(records, tuned, base, strict=True):
        conversations += [pair_messages(template, record, t, b), pair_messages(template, record, b, t)]
    verdicts, replies = ask(call, conversations, retry, retries, seed, parse)
    rows = []
    for i, record in enumerate(records):
        first, second = verdicts[2 * i], verdicts[2 * i + 1]
        rows.append(
            {
                "id": record.get("id"),
                "tuned_first": first,
                "tuned_second": second,
                "outcome": outcome(first, second),
            }
        )
    counts = Counter(r["outcome"] for r in rows)
    parsed = [r for r in rows if r["outcome"] != "unparsed"]
    agreed = sum(len(set(for_tuned(r["tuned_first"], r["tuned_second"]))) == 1 for r in parsed)
    n = max(len(rows), 1)
    summary = {
        **{k: round(counts[k] / n, 6) for k in OUTCOMES},
        "pairs": len(rows),
        "position_consistency": round(agreed / len(parsed), 6) if parsed else None,
    }
    if rows:
        net = np.array([{"win": 1, "loss": -1}.get(r["outcome"], 0) for r in rows])
        summary["net_win_ci95"] = percentile_interval(net[resample_indexes(len(rows), seed)].mean(1))
    return summary, rows, replies


def win_rate(rows: list[dict], seed: int) -> tuple[float, dict[str, float]]:
    """The first model's win rate over `rows` (judge()'s per-record verdicts; POINTS: win 1, tie and
    unparsed 1/2, loss 0) and its 95% bootstrap interval over the records."""
    points = np.array([POINTS[r["outcome"]] for r in rows])
    return round(float(points.mean()), 6), percentile_interval(
        points[resample_indexes(len(rows), seed)].mean(1)
    )


def preflight(j, key: str) -> None:
    """GET /models of the judge `j` (the params section `key`) at stage start, before minutes of answer
    generation: a dead or wrong endpoint fails the stage within seconds, naming `key`.base_url. The
    "local" judge is checked as its server starts."""
    if j.base_url == "local":
        return
    endpoint = llm.Endpoint(
        base_url=j.base_url,
        model=j.model,
        api_key_env=j.api_key_env,
        temperature=None,
        max_tokens=None,
        concurrency=1,
        requests_per_minute=60,
        max_retries=0,
        timeout_s=j.timeout_s,
    )
    try:
        llm.preflight(endpoint, f"{key}.base_url")
    except EndpointError as err:
        raise EndpointError(f"{key}: {err}") from None


def run(
    j, key: str, records: list[dict], first: list[str], second: list[str], cache_dir: str | Path, seed: int
) -> tuple[dict, list[dict], list[Reply]]:
    """judge() of `first` against `second` with the judge settings `j` (the params section named
    `key`: evaluate.judge or select.judge); replies are cached in `cache_dir`."""
    local = Path(j.model).is_dir()
    if j.verdict == "label" and not local:
        raise ParamsError(
            f"{key}.verdict: label reads the ids of A, B and C from the judge's tokenizer, so {key}.model "
            f"must be a local model directory; {j.model!r} is not one. Use verdict: json with an API judge"
        )
    label = j.verdict == "label"
    endpoint = llm.Endpoint(
        base_url=j.base_url,
        model=j.model,
        api_key_env=j.api_key_env,
        temperature=0.0,
        max_tokens=1 if label else j.max_tokens,
        concurrency=j.concurrency,
        requests_per_minute=j.requests_per_minute,
        max_retries=j.max_retries,
        timeout_s=j.timeout_s,
        logit_bias=label_bias(j.model, key) if label else None,
    )
    # The request names a local model only by its path: its files join the cache key.
    salt = llm.model_fingerprint(j.model) if local else ""
    template = load_prompt(j.prompt, f"{key}.prompt")
    retry = load_prompt(j.retry_prompt, f"{key}.retry_prompt")
    fmt = None if label else verdict_format(j.structured)
    try:
        with llm.lazy_caller(endpoint, cache_dir, cache_salt=salt, preflight_key=f"{key}.base_url") as call:
            summary, rows, replies = judge(
                lambda requests, s: call(requests, s, fmt),
                template,
                retry,
                records,
                first,
                second,
                j.reply_retries,
                seed,
                parse_label if label else parse_verdict,
            )
    except EndpointError as err:  # the preflight's GET /models, or a local server that would not start
        raise EndpointError(f"{key}: {err}") from None
    failed_calls_check(replies, j.max_failed_fraction, key, j.base_url)
    usage = llm.ledger(replies)
    print(
        f"{key.split('.')[0]}: judge {j.model}: {usage['calls']} calls ({usage['cached_calls']} cached, "
        f"{usage['failed_calls']} failed)"
    )
    return summary, rows, replies
