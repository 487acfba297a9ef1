"""The one way tuneline talks to an LLM: the official `openai` client against any
OpenAI-compatible endpoint, with a per-call reply cache.

- Retries with exponential backoff and jitter on 408/409/429/5xx, connection errors and
  timeouts, honouring `Retry-After`, are the openai client's own (`max_retries`).
- Concurrency is bounded by a semaphore; a requests-per-minute limit spaces every HTTP
  attempt (retries included) through an httpx event hook.
- Every answered call is written to `cache_dir` as soon as its reply arrives, one small file
  per key, by atomic rename: a rerun, or a run after a crash or Ctrl-C, repeats no answered
  call. A failed or empty reply is never cached, so the next run asks again.
- The API key is read from the environment variable the endpoint names and goes only into
  the request header: it is never written to the cache, to errors or to logs.

`select` (API candidates) and `evaluate` (the LLM judge, tuneline/judge.py) use this module as augment does.
"""

from __future__ import annotations

import asyncio
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

from tuneline.records import content_hash

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


@dataclass(frozen=True)
class Reply:
    """One call's outcome: `text` is None exactly when `error` says why."""

    text: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cached: bool
    error: str | None


def request_seed(seed: int, messages: list[dict], occurrence: int = 0) -> int:
    """The deterministic `seed` sent with one request.

    It depends on the run seed and the messages, so a reordered batch keeps its seeds; the
    n-th copy of identical messages in one batch gets its own seed (and its own cache key).
    """
    return int(content_hash(seed, messages, occurrence), 16) % 2**31


def normalise_base_url(base_url: str) -> str:
    """The endpoint as it enters cache keys: scheme, lower-case host, port only when not the
    default, path without a trailing slash. Every loopback server (and "local", the server the
    stage starts, on a new port each run) is "loopback": what it serves is told apart by the
    model name and, for a local model directory, the fingerprint of its files."""
    if base_url == "local" or is_loopback(base_url):
        return "loopback"
    parts = urlparse(base_url.strip())
    scheme = (parts.scheme or "https").lower()
    port = parts.port
    netloc = (parts.hostname or "").lower() + (f":{port}" if port and port != {"http": 80, "https": 443}.get(scheme) else "")
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def cache_key(endpoint: Endpoint, messages: list[dict], seed: int, json_mode: bool, salt: str = "") -> str:
    """The cache key of one call: everything that changes the reply, and nothing else.

    The endpoint (normalised base_url: two servers serving different weights under one model
    name do not share replies), the model name, the full messages (so an edited prompt template
    is a new key), the sampling params and logit bias, the request seed, JSON mode, and `salt` (a fingerprint of
    local model weights, so rebuilt weights under the same path do not reuse stale replies). The
    key is left out: the same endpoint answers the same whoever pays.
    """
    blob = json.dumps(
        {
            "endpoint": normalise_base_url(endpoint.base_url),
            "model": endpoint.model,
            "messages": messages,
            "temperature": endpoint.temperature,
            "max_tokens": endpoint.max_tokens,
            "seed": seed,
            "json_mode": json_mode,
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
    """Where entries were written before the two-level layout (`ab/abcd....json`): still read, never written."""
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
    )


def write_cached(cache_dir: str | Path, key: str, reply: Reply, messages: list[dict], model: str, seed: int) -> None:
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
    raise RuntimeError(
        f"the environment variable {endpoint.api_key_env} is not set, and {endpoint.base_url} needs an API "
        f"key: `export {endpoint.api_key_env}=...` (the name comes from the api_key_env param; the key itself "
        "is never stored in params)"
    )


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart (every HTTP attempt counts)."""

    def __init__(self, requests_per_minute: int):
        if requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, got {requests_per_minute}")
        self.interval = 60.0 / requests_per_minute
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait(self, _request: object = None) -> None:
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


def make_client(endpoint: Endpoint, limiter: RateLimiter) -> openai.AsyncOpenAI:
    """An AsyncOpenAI client whose retries, timeouts and connection pool follow `endpoint`."""
    http_client = openai.DefaultAsyncHttpxClient(event_hooks={"request": [limiter.wait]})
    return openai.AsyncOpenAI(
        base_url=endpoint.base_url,
        api_key=api_key(endpoint),
        max_retries=endpoint.max_retries,
        timeout=endpoint.timeout_s,
        http_client=http_client,
    )


def _describe_error(err: Exception, secret: str) -> str:
    if isinstance(err, openai.APIStatusError):
        text = f"{type(err).__name__}: HTTP {err.status_code}: {err.message}"
    else:
        text = f"{type(err).__name__}: {err}"
    # A server may echo the key back in an auth error; it must not reach logs or rejects.
    return text.replace(secret, "***") if secret and secret != NO_KEY else text


async def _call(
    client: openai.AsyncOpenAI, endpoint: Endpoint, messages: list[dict], seed: int, json_mode: bool,
    truncated_is_error: bool,
) -> Reply:
    extra: dict = {"response_format": {"type": "json_object"}} if json_mode else {}
    # A null param is not sent at all: reasoning models reject temperature and max_tokens.
    if endpoint.temperature is not None:
        extra["temperature"] = endpoint.temperature
    if endpoint.max_tokens is not None:
        extra["max_tokens"] = endpoint.max_tokens
    if endpoint.logit_bias:
        extra["logit_bias"] = endpoint.logit_bias
    started = time.perf_counter()
    try:
        response = await client.chat.completions.create(model=endpoint.model, messages=messages, seed=seed, **extra)
    except (openai.APIError, ValueError) as err:
        # ValueError: a 200 whose body is not the JSON the client expects (a misbehaving proxy).
        return Reply(None, 0, 0, time.perf_counter() - started, False, _describe_error(err, client.api_key))
    latency = time.perf_counter() - started
    usage = response.usage
    prompt_tokens = usage.prompt_tokens if usage else 0
    completion_tokens = usage.completion_tokens if usage else 0
    text = response.choices[0].message.content if response.choices else None
    if truncated_is_error and response.choices and response.choices[0].finish_reason == "length":
        return Reply(None, prompt_tokens, completion_tokens, latency, False, TRUNCATED)
    if not text:
        return Reply(None, prompt_tokens, completion_tokens, latency, False, EMPTY_REPLY)
    return Reply(text, prompt_tokens, completion_tokens, latency, False, None)


def _seeds_and_keys(
    endpoint: Endpoint, requests: list[list[dict]], seed: int, json_mode: bool, cache_salt: str
) -> tuple[list[int], list[str]]:
    seen: Counter = Counter()
    seeds, keys = [], []
    for messages in requests:
        fingerprint = content_hash(messages)
        s = request_seed(seed, messages, seen[fingerprint])
        seen[fingerprint] += 1
        seeds.append(s)
        keys.append(cache_key(endpoint, messages, s, json_mode, cache_salt))
    return seeds, keys


def uncached(
    endpoint: Endpoint,
    requests: list[list[dict]],
    cache_dir: str | Path,
    seed: int,
    json_mode: bool = False,
    *,
    cache_salt: str = "",
) -> list[int]:
    """Indexes of the requests that `complete_many` would send (no cached reply yet).

    The cache key names every loopback server (and "local") alike, so a caller can ask this
    before it has started its local server, and start one only when something is missing.
    """
    _, keys = _seeds_and_keys(endpoint, requests, seed, json_mode, cache_salt)
    return [i for i, k in enumerate(keys) if read_cached(cache_dir, k) is None]


async def complete_many(
    endpoint: Endpoint,
    requests: list[list[dict]],
    cache_dir: str | Path,
    seed: int,
    json_mode: bool = False,
    *,
    cache_salt: str = "",
    truncated_is_error: bool = False,
) -> list[Reply]:
    """One reply per message list, in order; cached replies are returned without a call.

    With `truncated_is_error`, a reply cut off at max_tokens is the error TRUNCATED (not cached):
    for JSON answers, where half a reply is no answer. Without it (generation metrics, which
    cap the length on purpose) the cut-off text is the reply.

    Calls run at most `endpoint.concurrency` at a time; each answered call is cached the
    moment it arrives. `cache_salt` joins the cache key (see `cache_key`).
    """
    seeds, keys = _seeds_and_keys(endpoint, requests, seed, json_mode, cache_salt)
    replies: list[Reply | None] = [read_cached(cache_dir, k) for k in keys]
    missing = [i for i, r in enumerate(replies) if r is None]
    if missing:
        semaphore = asyncio.Semaphore(endpoint.concurrency)
        client = make_client(endpoint, RateLimiter(endpoint.requests_per_minute))

        async def run_one(i: int) -> None:
            async with semaphore:
                reply = await _call(client, endpoint, requests[i], seeds[i], json_mode, truncated_is_error)
            if reply.error is None:
                write_cached(cache_dir, keys[i], reply, requests[i], endpoint.model, seeds[i])
            else:
                log.warning("call %s failed: %s", keys[i][:12], reply.error)
            replies[i] = reply

        async with client:
            await asyncio.gather(*(run_one(i) for i in missing))
    return replies  # type: ignore[return-value]  # every slot is filled above


def complete_many_sync(
    endpoint: Endpoint,
    requests: list[list[dict]],
    cache_dir: str | Path,
    seed: int,
    json_mode: bool = False,
    *,
    cache_salt: str = "",
    truncated_is_error: bool = False,
) -> list[Reply]:
    """`complete_many` for synchronous callers (stage scripts)."""
    return asyncio.run(complete_many(endpoint, requests, cache_dir, seed, json_mode, cache_salt=cache_salt,
                                     truncated_is_error=truncated_is_error))


@contextmanager
def lazy_caller(endpoint: Endpoint, cache_dir: str | Path, json_mode: bool = False, *,
                cache_salt: str = "", truncated_is_error: bool = False) -> Iterator[Callable[[list[list[dict]], int], list[Reply]]]:
    """`call(requests, seed) -> replies` for a `with` block. With `endpoint.base_url` "local", the
    `transformers serve` of the model directory `endpoint.model` starts at the first call with a request missing from the
    cache, and stops at the end of the block: a fully cached rerun starts no server."""
    from tuneline.llmserver import endpoint_url

    with ExitStack() as server:
        resolved = endpoint if endpoint.base_url != "local" else None

        def call(requests: list[list[dict]], seed: int) -> list[Reply]:
            nonlocal resolved
            if resolved is None and uncached(endpoint, requests, cache_dir, seed, json_mode, cache_salt=cache_salt):
                resolved = replace(endpoint, base_url=server.enter_context(endpoint_url(endpoint.base_url, endpoint.model)))
            return complete_many_sync(resolved or endpoint, requests, cache_dir, seed, json_mode, cache_salt=cache_salt,
                                      truncated_is_error=truncated_is_error)

        yield call


def ledger(replies: list[Reply], price_prompt_per_mtok: float = 0.0, price_completion_per_mtok: float = 0.0) -> dict:
    """Calls and tokens of a set of replies: all of them, and the part this run paid for."""

    def totals(rs: list[Reply]) -> dict:
        prompt = sum(r.prompt_tokens for r in rs)
        completion = sum(r.completion_tokens for r in rs)
        cost = (prompt * price_prompt_per_mtok + completion * price_completion_per_mtok) / 1e6
        return {"calls": len(rs), "prompt_tokens": prompt, "completion_tokens": completion, "cost": round(cost, 6)}

    fresh = [r for r in replies if not r.cached]
    return {
        **totals(replies),
        "cached_calls": len(replies) - len(fresh),
        "failed_calls": sum(r.error is not None for r in replies),
        "this_run": totals(fresh),
        "mean_latency_s": round(sum(r.latency_s for r in fresh) / len(fresh), 4) if fresh else 0.0,
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
