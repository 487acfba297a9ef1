"""params.yaml mapped onto frozen dataclasses, one per section.

params.yaml is the one place where defaults live: every key a section declares must be
there, an unknown key is refused (a typo in `dvc exp run -S train.lora_rr=16` would otherwise
add a new key silently), and each value is checked against its type before a stage starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params.yaml value that a stage cannot run with; the message names the key and the fix."""


@dataclass(frozen=True)
class Base:
    seed: int
    seeds: str
    site_dir: str
    raw_dir: str
    augmented_dir: str
    clean_dir: str
    alpaca_dir: str
    tokenized_dir: str
    base_models_dir: str
    selected: str
    adapter_dir: str
    export_dir: str
    metrics_dir: str
    cache_dir: str


@dataclass(frozen=True)
class TinyModel:
    arch: Literal["llama", "qwen2"]
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    chat_template: Literal["chatml", "llama3", "alpaca"]


@dataclass(frozen=True)
class Models:
    vocab_size: int
    tiny: dict[str, TinyModel]


@dataclass(frozen=True)
class CrawlSource:
    name: str
    start_urls: list[str]
    allowed_domains: list[str]
    allow: list[str]
    deny: list[str]
    depth_limit: int
    max_pages: int
    kind: Literal["auto", "qa", "doc"]
    question_css: str
    answer_css: str
    title_css: str
    text_css: str


@dataclass(frozen=True)
class CrawlDataset:
    name: str
    path: str
    format: Literal["json", "jsonl", "csv", "parquet", "hub"]
    split: str
    columns: dict[str, str | None]


@dataclass(frozen=True)
class Crawl:
    user_agent: str
    serve_site: bool
    sources: list[CrawlSource]
    datasets: list[CrawlDataset]
    retry_times: int
    download_timeout: float
    max_page_bytes: int
    concurrent_requests: int
    autothrottle: bool
    autothrottle_start_delay_s: float
    http_cache_expiration_s: int


@dataclass(frozen=True)
class Augment:
    base_url: str
    model: str
    api_key_env: str
    temperature: float
    max_tokens: int
    rounds: int
    per_round: int
    few_shot_k: int
    chunk_chars: int
    concurrency: int
    requests_per_minute: int
    max_retries: int
    timeout_s: float


@dataclass(frozen=True)
class Clean:
    min_chars: int
    max_chars: int
    languages: list[str]
    pii: Literal["redact", "reject"]
    embedding_model: str
    near_duplicate_threshold: float
    outlier_threshold: float
    batch_size: int


@dataclass(frozen=True)
class Build:
    val_fraction: float
    test_fraction: float
    max_tokens: int
    dataset_name: str


@dataclass(frozen=True)
class Candidate:
    kind: Literal["local", "api"]
    model: str
    trust_remote_code: bool = False
    revision: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None


METRICS = ("loss", "perplexity", "rouge_l", "bleu", "exact_match")


@dataclass(frozen=True)
class Select:
    metric: Literal["loss", "perplexity", "rouge_l", "bleu", "exact_match"]
    generation_samples: int
    max_new_tokens: int
    batch_size: int
    candidates: dict[str, Candidate]


@dataclass(frozen=True)
class Tokenize:
    template: Literal["auto", "chatml", "llama3", "alpaca"]
    max_length: int
    overlong: Literal["truncate", "drop"]
    packing: bool
    train_on_prompt: bool
    num_proc: int


@dataclass(frozen=True)
class Train:
    method: Literal["lora", "qlora", "ptuning", "full"]
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: str | list[str]
    use_dora: bool
    use_rslora: bool
    ptuning_virtual_tokens: int
    compute_dtype: Literal["float32", "bfloat16", "float16"]
    learning_rate: float
    epochs: float
    batch_size: int
    grad_accum: int
    warmup_ratio: float
    weight_decay: float
    save_steps: int
    logging_steps: int


@dataclass(frozen=True)
class Evaluate:
    max_new_tokens: int
    batch_size: int
    generation_samples: int
    merge: bool
    samples_in_report: int


@dataclass(frozen=True)
class Export:
    dtype: Literal["float32", "bfloat16", "float16"]


SECTIONS: dict[str, type] = {
    "base": Base,
    "models": Models,
    "crawl": Crawl,
    "augment": Augment,
    "clean": Clean,
    "build": Build,
    "select": Select,
    "tokenize": Tokenize,
    "train": Train,
    "evaluate": Evaluate,
    "export": Export,
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked against the type `tp`; raise ParamsError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"{key} {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ParamsError as err:
                errors.append(err)
        raise ParamsError(f"{key} {value!r} should be {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key} should be {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key} should be {_type_name(tp)}, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {str(k): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is type(None):
        if value is not None:
            raise ParamsError(f"{key} should be null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} should be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} should be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} should be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} should be a string, got {value!r} (quote it in params.yaml)")
        return value
    raise TypeError(f"unsupported params type {tp} for {key}")


def build_dataclass(cls: type, data: Any, key: str) -> Any:
    """Return `cls(**data)` after checking every key; errors name `key.field` and the fix."""
    if not isinstance(data, dict):
        raise ParamsError(f"{key} should be {_type_name(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{key}.{unknown[0]} is not a known key; known keys of {key} are: {', '.join(fields)}"
        )
    values = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING:
                raise ParamsError(f"{key}.{name} is missing; add it to {PARAMS_FILE} ({_type_name(hints[name])})")
            continue
        values[name] = _convert(data[name], hints[name], f"{key}.{name}")
    return cls(**values)


def read_params_file(path: str | Path = PARAMS_FILE) -> dict:
    """The raw params.yaml mapping."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path} should hold a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: section {unknown[0]!r} is not known; sections are {', '.join(SECTIONS)}")
    return data


def section(name: str, data: dict | None = None, path: str | Path = PARAMS_FILE) -> Any:
    """The section `name` of params.yaml (or of `data`) as its frozen dataclass."""
    if data is None:
        data = read_params_file(path)
    if name not in data:
        raise ParamsError(f"{path} has no `{name}:` section; add it (see README, Parameters)")
    params = build_dataclass(SECTIONS[name], data[name], name)
    return _check_section(name, params)


def load(*names: str, path: str | Path = PARAMS_FILE) -> tuple:
    """Load several sections at once: `base, p = load("base", "train")`."""
    data = read_params_file(path)
    return tuple(section(n, data, path) for n in names)


def _check_section(name: str, p: Any) -> Any:
    """Cross-field checks that a type alone cannot express."""
    if name == "build":
        if not 0 <= p.val_fraction < 1 or not 0 <= p.test_fraction < 1 or p.val_fraction + p.test_fraction >= 1:
            raise ParamsError(
                f"build.val_fraction ({p.val_fraction}) + build.test_fraction ({p.test_fraction}) "
                "must each be in [0, 1) and leave records for training"
            )
    if name == "select":
        if not p.candidates:
            raise ParamsError("select.candidates is empty; name at least one base model")
        for cname, cand in p.candidates.items():
            if cand.kind == "api" and not cand.base_url:
                raise ParamsError(f"select.candidates.{cname}.base_url is required for kind: api")
            if cand.kind == "api" and p.metric in ("loss", "perplexity"):
                raise ParamsError(
                    f"select.metric '{p.metric}' is not available for API candidate "
                    f"select.candidates.{cname}: API models report no loss. "
                    "Choose by rouge_l, bleu or exact_match, or remove the API candidate"
                )
    if name == "train":
        if p.lora_r <= 0 or p.learning_rate <= 0 or p.batch_size <= 0:
            raise ParamsError("train.lora_r, train.learning_rate and train.batch_size must be positive")
    return p
