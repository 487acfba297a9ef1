"""The one way tuneline talks to an LLM: the official `openai` client against any
OpenAI-compatible endpoint, with a per-call reply cache.

- Retries with exponential backoff and jitter on 408/409/429/5xx, connection errors and
  timeouts, honouring `Retry-After`, are the openai client's own (`max_retries`).
- Concurrency is bounded by a semaphore; a requests-per-minute limit spaces every HTTP
  attempt (retries included) through an httpx event hook, and a tokens-per-minute budget
  (prompt estimate + max_tokens, corrected by the reply's usage) holds calls back until the
  last minute's tokens leave room. A 429 pauses every call of the run for its Retry-After
  (one shared cool-down), not only the one that got it.
- `response_format` is sent per request: json_schema (with the reply's schema; OpenAI strict
  mode, vLLM and SGLang guided decoding, `tuneline.llm.structserve` locally), json_object, or none.
- `complete_batch` sends the uncached requests through the OpenAI Batch API instead (see there).
- Every answered call is written to `cache_dir` as soon as its reply arrives, one small file
  per key, by atomic rename: a rerun, or a run after a crash or Ctrl-C, repeats no answered
  call. A failed or empty reply is never cached, so the next run asks again.
- The API key is read from the environment variable the endpoint names and goes only into
  the request header: it is never written to the cache, to errors or to logs.

`select` (API candidates) and `evaluate` (the LLM judge, tuneline/eval/judge.py) use this module as augment
does.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import openai

from tuneline.common.records import EndpointError, content_hash

log = logging.getLogger(__name__)

# Loopback servers (`transformers serve`, a local vLLM) usually need no key; the openai
# client still wants one, so they get this placeholder when the variable is unset.
NO_KEY = "no-key-needed"
# Reply.error of a call that was answered with no content: a model failure, not a transport one.
EMPTY_REPLY = "empty reply"
# Reply.error of a reply cut off at max_tokens (finish_reason "length"): never cached, since a
# half-written answer is not the answer, and a rerun with a larger max_tokens must ask again.
TRUNCATED = "truncated: the reply reached max_tokens (finish_reason length)"


@dataclass(frozen=True)
class Endpoint:
    """Where and how to call a model. `base_url` is a resolved URL (…/v1), never "local"."""

    base_url: str
    model: str
    api_key_env: str
    temperature: float | None  # None: not sent (reasoning models reject it)
    max_tokens: int | None  # None: not sent
    concurrency: int
    requests_per_minute: int
    max_retries: int
    timeout_s: float
    # OpenAI's logit_bias ({token id: -100..100}), sent when set; transformers serve honours it too.
    # The LLM judge's label verdicts use it to let only the label tokens win.
    logit_bias: dict[str, float] | None = None
    tokens_per_minute: int | None = None  # None: no token budget
    # The base_url the cache key names when requests go elsewhere: "local" for the server a stage
    # starts on a new port each run (its replies are told apart by the model's fingerprint).
    key_url: str = ""


@dataclass(frozen=True)
class Reply:
    """One call's outcome: `text` is None exactly when `error` says why."""

    text: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cached: bool
    error: str | None
    batch: bool = False  # answered through the Batch API (priced at the batch rate)


def request_seed(seed: int, messages: list[dict], occurrence: int = 0) -> int:
    """The deterministic `seed` sent with one request.

    It depends on the run seed and the messages, so a reordered batch keeps its seeds; the
    n-th copy of identical messages in one batch gets its own seed (and its own cache key).
    """
    return int(content_hash(seed, messages, occurrence), 16) % 2**31


def normalise_base_url(base_url: str) -> str:
    """The endpoint as it enters cache keys: scheme, lower-case host, port only when not the
    default, path without a trailing slash. Loopback servers are named by their port like any
    other (two servers on two ports may serve different weights under one name); "local", the
    server a stage starts on a new port each run, is "local", told apart by the model's fingerprint."""
    if base_url == "local":
        return "local"
    parts = urlparse(base_url.strip())
    scheme = (parts.scheme or "https").lower()
    port = parts.port
    netloc = (parts.hostname or "").lower() + (
        f":{port}" if port and port != {"http": 80, "https": 443}.get(scheme) else ""
    )
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def cache_key(
    endpoint: Endpoint, messages: list[dict], seed: int, response_format: dict | None, salt: str = ""
) -> str:
    """The cache key of one call: everything that changes the reply, and nothing else.

    The endpoint (normalised base_url: two servers serving different weights under one model
    name do not share replies), the model name, the full messages (so an edited prompt template
    is a new key), the sampling params and logit bias, the request seed, the response format (its schema
    too), and `salt` (a fingerprint of
    local model weights, so rebuilt weights under the same path do not reuse stale replies). The
    key is left out: the same endpoint answers the same whoever pays.
    """
    blob = json.dumps(
        {
            "endpoint": normalise_base_url(endpoint.key_url or endpoint.base_url),
            "model": endpoint.model,
            "messages": messages,
            "temperature": endpoint.temperature,
            "max_tokens": endpoint.max_tokens,
            "seed": seed,
            "response_format": response_format,
            "salt": salt,
            # only when set: keys of requests without it stay what they were, so their cache holds
            **({"logit_bias": endpoint.logit_bias} if endpoint.logit_bias else {}),
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """A hash of every file in a local model directory (weights, config, tokenizer, template).

    Used as the cache salt for local models: the request only names the path, and the same
    path can hold rebuilt weights.
    """
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def cache_path(cache_dir: str | Path, key: str) -> Path:
    """Where the entry of `key` is written: `ab/cd/abcd....json`.

    Two levels of 256 directories: at 1M calls a leaf holds about 15 entries and no directory
    more than 256 names (one level held ~4,000 files a directory at 1M, and file systems and
    DVC slow down on large directories).
    """
    return Path(cache_dir) / key[:2] / key[2:4] / f"{key}.json"


def legacy_cache_path(cache_dir: str | Path, key: str) -> Path:
    """Where entries were written before the two-level layout (`ab/abcd....json`): still read, never
    written."""
    return Path(cache_dir) / key[:2] / f"{key}.json"


def _read_entry(cache_dir: str | Path, key: str) -> dict | None:
    for path in (cache_path(cache_dir, key), legacy_cache_path(cache_dir, key)):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
    return None


def read_cached(cache_dir: str | Path, key: str) -> Reply | None:
    """The cached reply for `key`, or None (a missing or unreadable entry is a miss).

    An entry in the one-level layout of earlier versions is found too, so an existing cache
    keeps its hits; new entries go to `cache_path`.
    """
    entry = _read_entry(cache_dir, key)
    if entry is None:
        return None
    if not entry.get("text"):
        return None
    return Reply(
        text=entry["text"],
        prompt_tokens=int(entry.get("prompt_tokens", 0)),
        completion_tokens=int(entry.get("completion_tokens", 0)),
        latency_s=0.0,  # a cached reply costs no time; entries keep no clock reading (see write_cached)
        cached=True,
        error=None,
        batch=bool(entry.get("batch", False)),
    )


def write_cached(
    cache_dir: str | Path, key: str, reply: Reply, messages: list[dict], model: str, seed: int
) -> None:
    """Store one answered call atomically (temp file + rename): a crash leaves no torn entry.

    The entry keeps no latency: the cache is a DVC output, so the same calls must write the same bytes."""
    if reply.error is not None or not reply.text:
        raise ValueError("refusing to cache a failed or empty reply")
    path = cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {**asdict(reply), "cached": False, "model": model, "seed": seed, "messages": messages}
    del entry["latency_s"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(entry, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def is_loopback(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(endpoint: Endpoint) -> str:
    """The key from the environment variable `endpoint.api_key_env`.

    A loopback server gets a placeholder when the variable is unset; a remote one fails,
    naming the variable and the fix.
    """
    value = os.environ.get(endpoint.api_key_env, "")
    if value:
        return value
    if is_loopback(endpoint.base_url):
        return NO_KEY
    raise EndpointError(
        f"the environment variable {endpoint.api_key_env} is not set, and {endpoint.base_url} needs an API "
        f"key: `export {endpoint.api_key_env}=...` (the name comes from the api_key_env param; the key "
        f"itself "
        "is never stored in params)"
    )


def retry_after_s(headers) -> float:
    """The wait a 429 asks for: retry-after-ms, retry-after (seconds or an HTTP date), else 1 s; at most 300
    s."""
    try:
        if headers.get("retry-after-ms"):
            return min(float(headers["retry-after-ms"]) / 1000, 300.0)
        value = headers.get("retry-after")
        if value:
            try:
                return min(max(float(value), 0.0), 300.0)
            except ValueError:
                when = email.utils.parsedate_to_datetime(value)
                return min(max(when.timestamp() - time.time(), 0.0), 300.0)
    except (TypeError, ValueError):
        pass
    return 1.0


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart (every HTTP attempt counts), and holds
    every request back while a 429's cool-down lasts: one 429 pauses the whole run for its
    Retry-After, not only the request that got it (which the openai client retries)."""

    def __init__(self, requests_per_minute: int):
        if requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, got {requests_per_minute}")
        self.interval = 60.0 / requests_per_minute
        self.next_start = 0.0
        self.paused_until = 0.0
        self.cool_downs = 0
        self.lock = asyncio.Lock()

    async def wait(self, _request: object = None) -> None:
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start, self.paused_until)
            self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)

    async def on_response(self, response) -> None:
        if response.status_code == 429:
            self.cool_downs += 1
            self.paused_until = max(self.paused_until, time.monotonic() + retry_after_s(response.headers))


class TokenBudget:
    """At most `tokens_per_minute` tokens a minute: a bucket that holds a minute's tokens and refills
    at tpm/60 a second. A call takes its estimate (prompt characters / 4 + max_tokens) before it
    starts, waiting while the bucket is short, and settles the difference with its reply's usage."""

    def __init__(self, tokens_per_minute: int):
        if tokens_per_minute <= 0:
            raise ValueError(f"tokens_per_minute must be positive, got {tokens_per_minute}")
        self.capacity = float(tokens_per_minute)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    async def take(self, estimate: int) -> None:
        # Reserve first, then sleep: later callers see the debt and queue behind this one.
        self._refill()
        self.tokens -= min(estimate, self.capacity)
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens * 60.0 / self.capacity)

    def settle(self, estimate: int, used: int) -> None:
        self._refill()
        self.tokens -= used - min(estimate, self.capacity)


def estimate_tokens(messages: list[dict], max_tokens: int | None) -> int:
    """A call's token estimate before it is sent: about 4 characters a prompt token, plus max_tokens."""
    return sum(len(str(m.get("content") or "")) for m in messages) // 4 + (max_tokens or 0)


def make_client(endpoint: Endpoint, limiter: RateLimiter) -> openai.AsyncOpenAI:
    """An AsyncOpenAI client whose retries, timeouts and connection pool follow `endpoint`."""
    hooks = {"request": [limiter.wait], "response": [limiter.on_response]}
    return openai.AsyncOpenAI(
        base_url=endpoint.base_url,
        api_key=api_key(endpoint),
        max_retries=endpoint.max_retries,
        timeout=endpoint.timeout_s,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
    )


def preflight(endpoint: Endpoint, key: str, timeout_s: float = 5.0) -> list[str]:
    """GET {base_url}/models once, before a stage's calls: a dead host, a wrong URL or a refused key
    fails within seconds, naming the params key `key` (e.g. evaluate.judge.base_url), rather than
    after every call's retries. Returns the model ids listed (a model not among them is logged)."""
    client = openai.OpenAI(
        base_url=endpoint.base_url, api_key=api_key(endpoint), max_retries=0, timeout=timeout_s
    )
    try:
        with client:
            models = [m.id for m in client.models.list()]
    except (openai.APIError, ValueError) as err:
        raise EndpointError(
            f"{key} {endpoint.base_url!r} did not answer GET /models "
            f"({_describe_error(err, client.api_key)}): "
            f"check {key}, that the server is up, and the key in ${endpoint.api_key_env}"
        ) from None
    if models and endpoint.model not in models:
        log.warning(
            "%s lists no model %r (it lists %s); the calls may fail",
            endpoint.base_url,
            endpoint.model,
            ", ".join(models[:5]),
        )
    return models


def _describe_error(err: Exception, secret: str) -> str:
    if isinstance(err, openai.APIStatusError):
        text = f"{type(err).__name__}: HTTP {err.status_code}: {err.message}"
    else:
        text = f"{type(err).__name__}: {err}"
    # A server may echo the key back in an auth error; it must not reach logs or rejects.
    return text.replace(secret, "***") if secret and secret != NO_KEY else text


def request_body(endpoint: Endpoint, messages: list[dict], seed: int, response_format: dict | None) -> dict:
    """The chat completion request of one call (the same for a live call and a Batch API line).
    A null param is not sent at all: reasoning models reject temperature and max_tokens."""
    body: dict = {"model": endpoint.model, "messages": messages, "seed": seed}
    if response_format is not None:
        body["response_format"] = response_format
    if endpoint.temperature is not None:
        body["temperature"] = endpoint.temperature
    if endpoint.max_tokens is not None:
        body["max_tokens"] = endpoint.max_tokens
    if endpoint.logit_bias:
        body["logit_bias"] = endpoint.logit_bias
    return body


def _reply_from(response, latency: float, truncated_is_error: bool, batch: bool = False) -> Reply:
    usage = response.usage
    prompt_tokens = usage.prompt_tokens if usage else 0
    completion_tokens = usage.completion_tokens if usage else 0
    text = response.choices[0].message.content if response.choices else None
    if truncated_is_error and response.choices and response.choices[0].finish_reason == "length":
        return Reply(None, prompt_tokens, completion_tokens, latency, False, TRUNCATED, batch)
    if not text:
        return Reply(None, prompt_tokens, completion_tokens, latency, False, EMPTY_REPLY, batch)
    return Reply(text, prompt_tokens, completion_tokens, latency, False, None, batch)


async def _call(
    client: openai.AsyncOpenAI,
    endpoint: Endpoint,
    messages: list[dict],
    seed: int,
    response_format: dict | None,
    truncated_is_error: bool,
    budget: TokenBudget | None = None,
) -> Reply:
    estimate = estimate_tokens(messages, endpoint.max_tokens)
    if budget is not None:
        await budget.take(estimate)
    started = time.perf_counter()
    try:
        response = await client.chat.completions.create(
            **request_body(endpoint, messages, seed, response_format)
        )
    except (openai.APIError, ValueError) as err:
        # ValueError: a 200 whose body is not the JSON the client expects (a misbehaving proxy).
        return Reply(None, 0, 0, time.perf_counter() - started, False, _describe_error(err, client.api_key))
    reply = _reply_from(response, time.perf_counter() - started, truncated_is_error)
    if budget is not None:
        budget.settle(estimate, reply.prompt_tokens + reply.completion_tokens)
    return reply


Formats = dict | list[dict | None] | None


def _formats(response_format: Formats, n: int) -> list[dict | None]:
    """One response_format per request: a list is taken as it is, one value (or None) applies to all."""
    if isinstance(response_format, list):
        if len(response_format) != n:
            raise ValueError(f"{len(response_format)} response formats for {n} requests")
        return response_format
    return [response_format] * n


def _seeds_and_keys(
    endpoint: Endpoint, requests: list[list[dict]], seed: int, formats: list[dict | None], cache_salt: str
) -> tuple[list[int], list[str]]:
    seen: Counter = Counter()
    seeds, keys = [], []
    for messages, response_format in zip(requests, formats, strict=True):
        fingerprint = content_hash(messages)
        s = request_seed(seed, messages, seen[fingerprint])
        seen[fingerprint] += 1
        seeds.append(s)
        keys.append(cache_key(endpoint, messages, s, response_format, cache_salt))
    return seeds, keys


def uncached(
    endpoint: Endpoint,
    requests: list[list[dict]],
    cache_dir: str | Path,
    seed: int,
    response_format: Formats = None,
    *,
    cache_salt: str = "",
) -> list[int]:
    """Indexes of the requests that `complete_many` would send (no cached reply yet).

    The cache key names "local" by that name, not by the port its server gets, so a caller can ask
    this before it has started its local server, and start one only when something is missing.
    """
    _, keys = _seeds_and_keys(endpoint, requests, seed, _formats(response_format, len(requests)), cache_salt)
    return [i for i, k in enumerate(keys) if read_cached(cache_dir, k) is None]


async def complete_many(
    endpoint: Endpoint,
    requests: list[list[dict]],
    cache_dir: str | Path,
    seed: int,
    response_format: Formats = None,
    *,
    cache_salt: str = "",
    truncated_is_error: bool = False,
) -> list[Reply]:
    """One reply per message list, in order; cached replies are returned without a call.

    `response_format` is sent with every request (one dict), or per request (a list). With
    `truncated_is_error`, a reply cut off at max_tokens is the error TRUNCATED (not cached):
    for JSON answers, where half a reply is no answer. Without it (generation metrics, which
    cap the length on purpose) the cut-off text is the reply.

    Calls run at most `endpoint.concurrency` at a time, within the requests- and tokens-per-minute
    budgets; each answered call is cached the moment it arrives. `cache_salt` joins the cache key
    (see `cache_key`).
    """
    formats = _formats(response_format, len(requests))
    seeds, keys = _seeds_and_keys(endpoint, requests, seed, formats, cache_salt)
    replies: list[Reply | None] = [read_cached(cache_dir, k) for k in keys]
    missing = [i for i, r in enumerate(replies) if r is None]
    if missing:
        semaphore = asyncio.Semaphore(endpoint.concurrency)
        limiter = RateLimiter(endpoint.requests_per_minute)
        budget = TokenBudget(endpoint.tokens_per_minute) if endpoint.tokens_per_minute else None
        client = make_client(endpoint, limiter)

        async def run_one(i: int) -> None:
            async with semaphore:
                reply = await _call(
                    client, endpoint, requests[i], seeds[i], formats[i], truncated_is_error, budget
                )
            if reply.error is None:
                write_cached(cache_dir, keys[i], reply, requests[i], endpoint.model, seeds[i])
            else:
                log.warning("call %s failed: %s", keys[i][:12], reply.error)
            replies[i] = reply

        async with client:
            await asyncio.gather(*(run_one(i) for i in missing))
        if limiter.cool_downs:
            log.warning(
                "%d responses were 429 (rate limited): every call paused for their Retry-After",
                limiter.cool_downs,
            )
    return replies  # type: ignore[return-value]  # every slot is filled above


def complete_many_sync(
    endpoint: Endpoint,
    requests: list[list[dict]],
    cache_dir: str | Path,
    seed: int,
    response_format: Formats = None,
    *,
    cache_salt: str = "",
    truncated_is_error: bool = False,
) -> list[Reply]:
    """`complete_many` for synchronous callers (stage scripts)."""
    return asyncio.run(
        complete_many(
            endpoint,
            requests,
            cache_dir,
            seed,
            response_format,
            cache_salt=cache_salt,
            truncated_is_error=truncated_is_error,
        )
    )


@contextmanager
def lazy_caller(
    endpoint: Endpoint,
    cache_dir: str | Path,
    *,
    cache_salt: str = "",
    truncated_is_error: bool = False,
    preflight_key: str = "",
) -> Iterator[Callable[..., list[Reply]]]:
    """`call(requests, seed, response_format=None) -> replies` for a `with` block. With
    `endpoint.base_url` "local", the server of the model directory `endpoint.model` (tuneline.llm.server)
    starts at the first call with a request missing from the cache, and stops at the end of the
    block: a fully cached rerun starts no server. Any other endpoint gets `preflight` (GET /models,
    naming `preflight_key`) before its first call that sends something."""
    from tuneline.llm.server import endpoint_url

    with ExitStack() as server:
        resolved: Endpoint | None = None

        def call(requests: list[list[dict]], seed: int, response_format: Formats = None) -> list[Reply]:
            nonlocal resolved
            if resolved is None and uncached(
                endpoint, requests, cache_dir, seed, response_format, cache_salt=cache_salt
            ):
                if endpoint.base_url == "local":
                    url = server.enter_context(endpoint_url(endpoint.base_url, endpoint.model))
                    resolved = replace(endpoint, base_url=url, key_url="local")
                else:
                    preflight(endpoint, preflight_key or "base_url")
                    resolved = endpoint
            return complete_many_sync(
                resolved or endpoint,
                requests,
                cache_dir,
                seed,
                response_format,
                cache_salt=cache_salt,
                truncated_is_error=truncated_is_error,
            )

        yield call


# --- the Batch API ------------------------------------------------------------------------

BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_RUNNING = ("validating", "in_progress", "finalizing", "cancelling")


def batch_state_path(cache_dir: str | Path, keys: list[str]) -> Path:
    """Where the batch of these missing keys is recorded: a killed run finds it and polls that batch."""
    return Path(cache_dir) / "batches" / f"{content_hash(sorted(keys))[:16]}.json"


def _batch_lines(
    endpoint: Endpoint,
    requests: list[list[dict]],
    seeds: list[int],
    formats: list[dict | None],
    keys: list[str],
    missing: list[int],
) -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": keys[i],
                "method": "POST",
                "url": BATCH_ENDPOINT,
                "body": request_body(endpoint, requests[i], seeds[i], formats[i]),
            },
            ensure_ascii=False,
        )
        for i in missing
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _submit_batch(client: openai.OpenAI, payload: bytes, state: Path, count: int) -> str:
    """Upload the request file, create the batch, record its id (atomically) before anything else."""
    uploaded = client.files.create(file=("tuneline-batch.jsonl", payload), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=BATCH_ENDPOINT,
        completion_window="24h",
        metadata={"tuneline": state.stem},
    )
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f".{state.name}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps({"batch_id": batch.id, "input_file_id": uploaded.id, "requests": count}), encoding="utf-8"
    )
    os.replace(tmp, state)
    log.info("submitted batch %s (%d requests), recorded in %s", batch.id, count, state)
    return batch.id


def _poll_batch(client: openai.OpenAI, batch_id: str, poll_s: float):
    batch = client.batches.retrieve(batch_id)
    while batch.status in BATCH_RUNNING:
        counts = batch.request_counts
        log.info(
            "batch %s %s (%s of %s done)",
            batch_id,
            batch.status,
            counts.completed if counts else "?",
            counts.total if counts else "?",
        )
        time.sleep(poll_s)
        batch = client.batches.retrieve(batch_id)
    return batch


def _result_lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if not file_id:
        return {}
    text = client.files.content(file_id).text
    return {line["custom_id"]: line for line in map(json.loads, filter(str.strip, text.splitlines()))}


def _line_reply(line: dict | None, truncated_is_error: bool) -> Reply:
    """The Reply of one Batch API result line (an error line, or a missing one, is an error reply)."""
    from openai.types.chat import ChatCompletion

    response = (line or {}).get("response") or {}
    if line is None:
        return Reply(None, 0, 0, 0.0, False, "the batch returned no result for this request", True)
    if response.get("status_code") != 200 or line.get("error"):
        problem = line.get("error") or (response.get("body") or {}).get("error") or {}
        detail = problem.get("message") if isinstance(problem, dict) else str(problem)
        return Reply(
            None,
            0,
            0,
            0.0,
            False,
            f"batch request failed: HTTP {response.get('status_code')}: {detail}",
            True,
        )
    return _reply_from(ChatCompletion.model_validate(response["body"]), 0.0, truncated_is_error, batch=True)


def complete_batch(
    endpoint: Endpoint,
    requests: list[list[dict]],
    cache_dir: str | Path,
    seed: int,
    response_format: Formats = None,
    *,
    cache_salt: str = "",
    truncated_is_error: bool = False,
    poll_s: float = 10.0,
    rerun: str = "rerun the stage",
) -> list[Reply]:
    """`complete_many`'s replies, with the uncached requests sent through the OpenAI Batch API: one
    JSONL file uploaded (purpose batch), one batch created, polled every `poll_s` seconds, its output
    (and error) file downloaded. Same request bodies, seeds and cache keys as live calls, so each
    answered request lands in the per-call cache and a rerun sends nothing.

    The batch id is recorded under cache_dir/batches/ the moment the batch exists: a killed run, run
    again, polls that batch instead of submitting another. A batch that expired, failed or was
    cancelled, or that answered some requests with errors, raises EndpointError after caching what it
    did answer, saying how many requests a rerun (`rerun`) submits again."""
    formats = _formats(response_format, len(requests))
    seeds, keys = _seeds_and_keys(endpoint, requests, seed, formats, cache_salt)
    replies: list[Reply | None] = [read_cached(cache_dir, k) for k in keys]
    missing = [i for i, r in enumerate(replies) if r is None]
    if not missing:
        return replies  # type: ignore[return-value]
    state = batch_state_path(cache_dir, [keys[i] for i in missing])
    client = openai.OpenAI(
        base_url=endpoint.base_url,
        api_key=api_key(endpoint),
        max_retries=endpoint.max_retries,
        timeout=endpoint.timeout_s,
    )
    with client:
        if state.is_file():
            batch_id = json.loads(state.read_text(encoding="utf-8"))["batch_id"]
            log.info("resuming batch %s recorded in %s", batch_id, state)
        else:
            batch_id = _submit_batch(
                client, _batch_lines(endpoint, requests, seeds, formats, keys, missing), state, len(missing)
            )
        batch = _poll_batch(client, batch_id, poll_s)
        results = {
            **_result_lines(client, batch.error_file_id),
            **_result_lines(client, batch.output_file_id),
        }
    failed = []
    for i in missing:
        reply = _line_reply(results.get(keys[i]), truncated_is_error)
        if reply.error is None:
            write_cached(cache_dir, keys[i], reply, requests[i], endpoint.model, seeds[i])
        elif reply.error not in (EMPTY_REPLY, TRUNCATED):
            failed.append(reply.error)
        replies[i] = reply
    state.unlink()  # settled: what it answered is cached, a rerun submits only the rest
    if batch.status != "completed" or failed:
        why = "; ".join(f"{e.code}: {e.message}" for e in (batch.errors.data or [])) if batch.errors else ""
        raise EndpointError(
            f"batch {batch_id} {batch.status}{f' ({why})' if why else ''}: {len(missing) - len(failed)} of "
            f"{len(missing)} requests answered and cached, {len(failed)} not"
            f"{f' (first: {failed[0]})' if failed else ''}; {rerun} to submit only those {len(failed)} again"
        )
    return replies  # type: ignore[return-value]


def ledger(
    replies: list[Reply],
    price_prompt_per_mtok: float = 0.0,
    price_completion_per_mtok: float = 0.0,
    batch_price_factor: float = 0.5,
) -> dict:
    """Calls and tokens of a set of replies: all of them, and the part this run paid for. Replies
    answered through the Batch API cost `batch_price_factor` of the prices (OpenAI's batch rate: half)."""

    def totals(rs: list[Reply]) -> dict:
        prompt = sum(r.prompt_tokens for r in rs)
        completion = sum(r.completion_tokens for r in rs)
        cost = (
            sum(
                (r.prompt_tokens * price_prompt_per_mtok + r.completion_tokens * price_completion_per_mtok)
                * (batch_price_factor if r.batch else 1.0)
                for r in rs
            )
            / 1e6
        )
        return {
            "calls": len(rs),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cost": round(cost, 6),
        }

    fresh = [r for r in replies if not r.cached]
    live = [r for r in fresh if not r.batch]
    return {
        **totals(replies),
        "batch_calls": sum(r.batch for r in replies),
        "cached_calls": len(replies) - len(fresh),
        "failed_calls": sum(r.error is not None for r in replies),
        "this_run": totals(fresh),
        # batch replies have no per-call latency
        "mean_latency_s": round(sum(r.latency_s for r in live) / len(live), 4) if live else 0.0,
    }


# --- parsing replies ----------------------------------------------------------------------


class ReplyError(ValueError):
    """A reply that is not the JSON asked for: `reason` is the metric key, `detail` the why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_json_object(text: str) -> dict:
    """The JSON object in a reply; tolerates code fences and chatter around it (servers that
    ignore response_format)."""
    text = text.strip()
    candidates = [text]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        candidates.append(fenced.group(1))
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise ReplyError("invalid_json", "the reply is not a JSON object")
