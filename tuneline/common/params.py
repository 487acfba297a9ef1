"""params.yaml mapped onto frozen dataclasses, one per section.

params.yaml is where defaults live: every key a section declares must be there, except the few
optional keys whose dataclass field has a default (the shipped params.yaml still writes them out,
with the same value, so an older params.yaml keeps loading); an unknown key is refused (a typo in
`dvc exp run -S train.lora_rr=16` would otherwise add a new key silently), and each value is
checked against its type before a stage starts.
Each dataclass with rules a type cannot express checks itself (`check(key)`, which the loader calls
as it builds it); rules that couple two sections (ptuning and tokenize.packing) are
`coupling_problems`. Every stage checks the whole file first (`load` calls `check`; `tuneline
check` does the same), so a mistake in a section the stage does not read still stops it before its
work, with every unknown key listed at once and the key it probably meant. What the machine must
have (a package, a prompt file) is `check_environment`'s, which the stages that need it call.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from tuneline.common.records import ALPACA_FIELDS

PARAMS_FILE = "params.yaml"
# Fields a crawl dataset's `columns:` may map; instruction and output are required.
DATASET_FIELDS = (*ALPACA_FIELDS, "category")
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ParamsError(ValueError):
    """A params.yaml value that a stage cannot run with; the message names the key and the fix."""


# Which params keys a stage reads, recorded when TUNELINE_PARAMS_AUDIT names a file: the test
# that checks dvc.yaml's `params:` lists against what each stage's code really reads uses it.
AUDIT_ENV = "TUNELINE_PARAMS_AUDIT"
_reads: set[str] | None = None


class _Section:
    """Base of the params dataclasses: records each leaf value read while auditing is on."""

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if _reads is None or (name.startswith("_") and name != "__dict__"):
            return value
        key = object.__getattribute__(self, "__dict__").get("_key")
        if key is None:  # a copy made in code (dataclasses.replace): its section was read to make it
            return value
        fields = object.__getattribute__(self, "__dataclass_fields__")
        for n in fields if name == "__dict__" else [name]:
            if n in fields and not _holds_sections(fields[n].type):
                _reads.add(f"{key}.{n}")
        return value


def _holds_sections(annotation: str) -> bool:
    """True for fields that hold nested sections (reading them is not reading a value)."""
    return any(
        name in str(annotation) for name in ("TinyModel", "CrawlSource", "CrawlDataset", "Candidate", "Judge")
    )


def _start_audit(path: str) -> None:
    import atexit
    import json
    import sys

    global _reads
    if _reads is not None:
        return
    _reads = set()
    argv = [Path(sys.argv[0]).stem, *sys.argv[1:2]]
    stage = argv[0] + (f"@{argv[1]}" if len(argv) > 1 else "")

    def dump() -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": stage, "reads": sorted(_reads or ())}) + "\n")

    atexit.register(dump)


@dataclass(frozen=True)
class Base(_Section):
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
    tuning_base: str
    pretrained_dir: str
    adapter_dir: str
    export_dir: str
    metrics_dir: str
    cache_dir: str
    decisions: str
    feedback: str
    shard_records: int

    def check(self, key: str) -> None:
        if self.shard_records < 1:
            raise ParamsError(
                f"{key}.shard_records must be at least 1 (records per shard on average), got "
                f"{self.shard_records}"
            )


@dataclass(frozen=True)
class TinyModel(_Section):
    arch: Literal["llama", "qwen2"]
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    chat_template: Literal["chatml", "llama3", "alpaca"]
    pretrain_steps: int

    def check(self, key: str) -> None:
        if self.pretrain_steps < 0:
            raise ParamsError(
                f"{key}.pretrain_steps must be >= 0 (0: random weights), got {self.pretrain_steps}"
            )


@dataclass(frozen=True)
class Models(_Section):
    vocab_size: int
    corpus_dir: str
    block_size: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    heldout_fraction: float
    logging_steps: int
    tiny: dict[str, TinyModel]

    def check(self, key: str) -> None:
        if not 0 <= self.heldout_fraction < 1:
            raise ParamsError(f"models.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class Pretrain(_Section):
    enabled: bool
    min_doc_chars: int
    block_size: int
    batch_size: int
    learning_rate: float
    epochs: float
    warmup_ratio: float
    weight_decay: float
    logging_steps: int
    save_steps: int
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"]
    grad_accum: int
    decontamination_ngram: int

    def check(self, key: str) -> None:
        if self.decontamination_ngram < 1:
            raise ParamsError(
                f"pretrain.decontamination_ngram must be at least 1, got {self.decontamination_ngram}"
            )


@dataclass(frozen=True)
class CrawlSource(_Section):
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
    # Q&A from question/answer selectors (pairs) or from headings, each answer the blocks up to the
    # next heading (headings: documentation sites; see tuneline.data.crawl.heading_pairs).
    qa_mode: Literal["pairs", "headings"] = "pairs"
    heading_levels: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4])
    questions_end_with: list[str] = dataclasses.field(
        default_factory=list
    )  # e.g. ["?", "？"]; empty: every heading
    exclude_css: list[str] = dataclasses.field(default_factory=list)  # sub-blocks taken out before extraction
    builtin_excludes: bool = True  # also take out Sphinx, MkDocs, Docusaurus, DocBook, GitHub furniture
    allow_empty: bool = False  # true: a source that gives no record is not an error (a site that may be down)

    def check_in(self, where: str, serve_site: bool) -> None:
        """The source's own rules; `where` names it (crawl.sources[i] (name)), and a relative start URL
        needs crawl.serve_site."""
        if not SOURCE_NAME.match(self.name):
            raise ParamsError(
                f"{where}.name {self.name!r}: use letters, digits, '-' and '_' only (it names the source's "
                f"cache file)"
            )
        if not self.start_urls:
            raise ParamsError(f"{where}.start_urls is empty; give at least one URL")
        for url in self.start_urls:
            scheme = urlsplit(url).scheme
            if scheme not in ("", "http", "https"):
                raise ParamsError(f"{where}.start_urls: {url!r} is not an http(s) URL")
            if not scheme and not serve_site:
                raise ParamsError(
                    f"{where}.start_urls: {url!r} is relative, which needs crawl.serve_site: true "
                    "(it is resolved against the bundled site server); give an absolute URL otherwise"
                )
        if not self.allowed_domains:
            raise ParamsError(f"{where}.allowed_domains is empty; list the domains the crawl may visit")
        for key in ("allow", "deny"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ParamsError(
                        f"{where}.{key}: {pattern!r} is not a valid regular expression ({err})"
                    ) from None
        if self.depth_limit < 0:
            raise ParamsError(
                f"{where}.depth_limit is {self.depth_limit}; use 0 for no limit or a positive depth"
            )
        if self.max_pages < 1:
            raise ParamsError(f"{where}.max_pages is {self.max_pages}; it must be at least 1")
        pairs = ("question_css", "answer_css") if self.qa_mode == "pairs" else ()
        needed = {"qa": pairs, "doc": ("title_css",), "auto": pairs}
        for key in needed[self.kind]:
            if not getattr(self, key).strip():
                raise ParamsError(
                    f"{where}.{key} is empty but kind is {self.kind!r}; give a CSS selector (or xpath:...)"
                )
        for key in ("question_css", "answer_css", "title_css", "text_css"):
            css = getattr(self, key)
            if css.strip():
                _check_css(css, f"{where}.{key}")
        for i, css in enumerate(self.exclude_css):
            _check_css(css, f"{where}.exclude_css[{i}]")
        if self.qa_mode == "headings" and (
            not self.heading_levels or not set(self.heading_levels) <= set(range(1, 7))
        ):
            raise ParamsError(
                f"{where}.heading_levels is {self.heading_levels}; list heading levels from 1 to 6 (h1..h6)"
            )


@dataclass(frozen=True)
class CrawlDataset(_Section):
    name: str
    path: str
    format: Literal["json", "jsonl", "csv", "parquet", "hub"]
    split: str
    columns: dict[str, str | None]
    # Hub datasets only, optional: the dataset's configuration (subset) and a pinned revision
    # (a commit sha, tag or branch), as models are pinned with `revision:`.
    config: str | None = None
    revision: str | None = None

    def check_in(self, where: str) -> None:
        """The dataset's own rules; `where` names it (crawl.datasets[i] (name))."""
        if self.format != "hub":
            for key in ("config", "revision"):
                if getattr(self, key) is not None:
                    raise ParamsError(
                        f"{where}.{key} is for format: hub only; remove it for a {self.format} file"
                    )
        if self.format in ("json", "jsonl", "csv") and self.split != "train":
            raise ParamsError(f"{where}.split is {self.split!r}: a {self.format} file has one split, 'train'")
        unknown = sorted(set(self.columns) - set(DATASET_FIELDS))
        if unknown:
            raise ParamsError(
                f"{where}.columns.{unknown[0]} is not a record field; map onto {', '.join(DATASET_FIELDS)}"
            )
        for key in ("instruction", "output"):
            if not self.columns.get(key):
                raise ParamsError(f"{where}.columns.{key} is not mapped; name the column that holds it")


@dataclass(frozen=True)
class Crawl(_Section):
    user_agent: str
    serve_site: bool
    sources: list[CrawlSource]
    datasets: list[CrawlDataset]
    retry_times: int
    download_timeout: float
    max_page_bytes: int
    min_doc_chars: int
    concurrent_requests: int
    autothrottle: bool
    autothrottle_start_delay_s: float
    http_cache_expiration_s: int
    # Pages whose parsing raised are rejects (parse_error); more than this share fails the stage.
    max_parse_error_fraction: float = 0.1

    def check(self, key: str) -> None:
        names = [s.name for s in self.sources]
        for i, s in enumerate(self.sources):
            s.check_in(f"crawl.sources[{i}] ({s.name})", self.serve_site)
            if names.count(s.name) > 1:
                raise ParamsError(
                    f"crawl.sources[{i}].name {s.name!r} is used twice; give each source its own name"
                )
        ds_names = [d.name for d in self.datasets]
        for i, d in enumerate(self.datasets):
            d.check_in(f"crawl.datasets[{i}] ({d.name})")
            if ds_names.count(d.name) > 1:
                raise ParamsError(
                    f"crawl.datasets[{i}].name {d.name!r} is used twice; give each dataset its own name"
                )
        if not 0 <= self.max_parse_error_fraction <= 1:
            raise ParamsError(
                f"crawl.max_parse_error_fraction is {self.max_parse_error_fraction}; give a share from 0 to 1"
            )
        minimum = {
            "retry_times": 0,
            "http_cache_expiration_s": 0,
            "autothrottle_start_delay_s": 0,
            "max_page_bytes": 1,
            "concurrent_requests": 1,
            "min_doc_chars": 0,
            "download_timeout": 1e-3,
        }
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ParamsError(f"crawl.{name} is {getattr(self, name)}; it must be at least {low}")


@dataclass(frozen=True)
class Augment(_Section):
    base_url: str
    model: str
    api_key_env: str
    temperature: float | None
    max_tokens: int | None
    max_failed_fraction: float
    rounds: int
    pilot_size: int
    per_round: int
    per_call: int
    few_shot_k: int
    chunk_chars: int
    chunk_budget: int
    prompts_dir: str
    structured: Literal["json_schema", "json_object", "none"]
    max_question_chars: int
    max_answer_chars: int
    reply_retries: int
    feedback_examples: int
    review_clean_rules: bool
    min_grounding: float
    concurrency: int
    requests_per_minute: int
    tokens_per_minute: int | None
    max_retries: int
    timeout_s: float
    batch: bool
    batch_poll_s: float
    price_prompt_per_mtok: float
    price_completion_per_mtok: float
    batch_price_factor: float

    def check(self, key: str) -> None:
        for name in (
            "rounds",
            "pilot_size",
            "per_round",
            "per_call",
            "few_shot_k",
            "chunk_chars",
            "chunk_budget",
            "concurrency",
            "requests_per_minute",
        ):
            if getattr(self, name) < 1:
                raise ParamsError(f"augment.{name} must be at least 1, got {getattr(self, name)}")
        if self.reply_retries < 0 or self.max_retries < 0 or self.feedback_examples < 0:
            raise ParamsError(
                "augment.reply_retries, augment.max_retries and augment.feedback_examples must be >= 0"
            )
        if not 0 <= self.max_failed_fraction <= 1:
            raise ParamsError(
                f"augment.max_failed_fraction must be between 0 and 1, got {self.max_failed_fraction}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ParamsError(
                f"augment.max_tokens must be at least 1 (or null: not sent), got {self.max_tokens}"
            )
        if not 0 <= self.min_grounding <= 1:
            raise ParamsError(f"augment.min_grounding must be between 0 and 1, got {self.min_grounding}")
        if self.batch and self.base_url == "local":
            raise ParamsError(
                "augment.batch: true needs an endpoint with the OpenAI Batch API (files and batches); "
                "augment.base_url local is `transformers serve`, which has none: set augment.batch: false"
            )


@dataclass(frozen=True)
class Clean(_Section):
    min_chars: int
    max_chars: int
    min_tokens: int
    max_tokens: int
    languages: list[str]
    language_min_chars: int
    language_confidence: float
    pii: Literal["redact", "reject"]
    phone_regions: list[str]
    embedding_model: str
    embedding_text: Literal["separate", "joined"]
    embedding_max_seq_length: int
    batch_size: int
    datalab_min_records: int
    knn_k: int
    approximate_knn_min_records: int
    near_duplicate_threshold: float
    outlier_threshold: float
    label_cv_folds: int
    reject_issues: list[Literal["near_duplicate", "outlier", "label"]]
    trusted_sources: list[str]
    report_examples: int
    engine: Literal["inprocess", "ray"]

    def check(self, key: str) -> None:
        import phonenumbers

        if self.knn_k < 1 or self.datalab_min_records <= self.knn_k:
            raise ParamsError(
                f"clean.datalab_min_records ({self.datalab_min_records}) must be larger than clean.knn_k "
                f"({self.knn_k}), "
                "which must be at least 1: the kNN graph needs k neighbours for every record"
            )
        if self.approximate_knn_min_records <= self.knn_k:
            raise ParamsError(
                f"clean.approximate_knn_min_records ({self.approximate_knn_min_records}) must be larger than "
                f"clean.knn_k "
                f"({self.knn_k}); it is the group size from which the kNN graph is approximate (20000 is the "
                f"default)"
            )
        if not 0 <= self.outlier_threshold <= 1:
            raise ParamsError(
                f"clean.outlier_threshold {self.outlier_threshold} must be in [0, 1] (higher flags more)"
            )
        if self.label_cv_folds < 2:
            raise ParamsError(f"clean.label_cv_folds {self.label_cv_folds} must be at least 2")
        unknown = sorted(set(self.phone_regions) - phonenumbers.SUPPORTED_REGIONS)
        if unknown:
            raise ParamsError(
                f"clean.phone_regions: {unknown[0]!r} is not a region libphonenumber knows (ISO 3166 codes "
                f"such as US, GB, DE)"
            )
        if self.embedding_max_seq_length < 1:
            raise ParamsError(
                f"clean.embedding_max_seq_length {self.embedding_max_seq_length} must be at least 1 (word "
                f"pieces)"
            )
        if (
            self.batch_size < 1
            or self.min_chars < 0
            or self.max_chars < self.min_chars
            or self.max_tokens < self.min_tokens
        ):
            raise ParamsError("clean.batch_size must be positive and clean.min_* must not exceed clean.max_*")


@dataclass(frozen=True)
class Build(_Section):
    val_fraction: float
    test_fraction: float
    generated_in_test: bool
    max_tokens: int
    dataset_name: str

    def check(self, key: str) -> None:
        v, t = self.val_fraction, self.test_fraction
        if not 0 <= v < 1 or not 0 <= t < 1 or v + t >= 1:
            raise ParamsError(
                f"build.val_fraction ({v}) + build.test_fraction ({t}) must each be in [0, 1) and leave "
                f"records for training"
            )


@dataclass(frozen=True)
class Candidate(_Section):
    kind: Literal["local", "api"]
    model: str
    trust_remote_code: bool = False
    revision: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    # API candidates only: optional, and their defaults live here, not in params.yaml.
    few_shot_k: int = 0
    concurrency: int = 4
    requests_per_minute: int = 600
    max_retries: int = 3
    timeout_s: float = 60.0
    price_prompt_per_mtok: float = 0.0
    price_completion_per_mtok: float = 0.0

    def check(self, key: str) -> None:
        if self.kind == "api" and not self.base_url:
            raise ParamsError(f"{key}.base_url is required for kind: api")
        if self.kind == "local" and (self.base_url or self.api_key_env):
            raise ParamsError(
                f"{key}: base_url and api_key_env are for kind: api; a local candidate names a hub id or a "
                f"directory in `model`"
            )


METRICS = ("loss", "perplexity", "rouge_l", "bleu", "exact_match", "judge")


@dataclass(frozen=True)
class Judge(_Section):
    enabled: bool
    base_url: str  # "local": `transformers serve` of `model` on 127.0.0.1 for the stage
    model: str
    api_key_env: str
    verdict: Literal[
        "json", "label"
    ]  # json: {"winner": ...}; label: one token, A, B or C, forced by logit_bias
    structured: Literal["json_schema", "json_object", "none"]  # json verdicts' response_format
    prompt: str
    retry_prompt: str
    max_tokens: int | None
    reply_retries: int
    max_failed_fraction: float
    concurrency: int
    requests_per_minute: int
    max_retries: int
    timeout_s: float

    def check(self, key: str) -> None:
        """A judge (evaluate.judge, select.judge) that is on must say where the judge is."""
        if (
            self.reply_retries < 0
            or self.max_retries < 0
            or self.concurrency < 1
            or self.requests_per_minute < 1
        ):
            raise ParamsError(
                f"{key}.reply_retries and max_retries must be >= 0, concurrency and requests_per_minute >= 1"
            )
        if self.enabled:
            for field in ("base_url", "model", "prompt", "retry_prompt"):
                if not getattr(self, field).strip():
                    raise ParamsError(
                        f"{key}.{field} is empty; the judge is on ({key}.enabled), so set it (see "
                        f"params.yaml)"
                    )


@dataclass(frozen=True)
class Select(_Section):
    metric: Literal["loss", "perplexity", "rouge_l", "bleu", "exact_match", "judge"]
    tie_break: Literal["smaller_model", "lower_cost", "listed_order"]
    generation_samples: int
    max_new_tokens: int
    batch_size: int
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    candidates: dict[str, Candidate]
    judge: Judge

    def check(self, key: str) -> None:
        if not self.candidates:
            raise ParamsError("select.candidates is empty; name at least one base model")
        if self.metric == "judge" and not self.judge.enabled:
            raise ParamsError(
                "select.metric 'judge' needs the judge: set select.judge.enabled to true and name it in "
                "select.judge.base_url and select.judge.model (an OpenAI-compatible URL and model, or "
                "base_url "
                "local and a model directory), or choose by rouge_l, bleu or exact_match"
            )
        if self.judge.enabled and self.generation_samples < 1:
            raise ParamsError(
                "select.judge judges generated answers: select.generation_samples must be at least 1 "
                "while select.judge.enabled is true"
            )
        for name, cand in self.candidates.items():
            if cand.kind == "api" and self.metric in ("loss", "perplexity"):
                raise ParamsError(
                    f"select.metric '{self.metric}' is not available for API candidate "
                    f"select.candidates.{name}: API models report no loss. "
                    "Choose by rouge_l, bleu, exact_match or judge, or remove the API candidate"
                )


@dataclass(frozen=True)
class Tokenize(_Section):
    template: Literal["auto", "chatml", "llama3", "alpaca"]
    template_date: str
    max_length: int
    overlong: Literal["truncate", "drop"]
    packing: bool
    train_on_prompt: bool
    num_proc: int


@dataclass(frozen=True)
class HubProfile(_Section):
    """What `train.profile: hub` trains with in place of the train keys of the same name, which suit
    the tiny stand-ins (a 0.66M model memorising 71 answers) and would wreck a 0.5B-8B base."""

    lora_r: int
    lora_alpha: int
    learning_rate: float  # lora, qlora, ptuning
    full_learning_rate: float  # full fine-tuning
    epochs: float
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"]
    warmup_ratio: float
    neftune_noise_alpha: float
    wise_ft: float


@dataclass(frozen=True)
class Train(_Section):
    method: Literal["lora", "qlora", "ptuning", "full"]
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: str | list[str]
    use_dora: bool
    use_rslora: bool
    ptuning_virtual_tokens: int
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"]
    gradient_checkpointing: bool
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "kernels-community/flash-attn"]
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]
    use_liger_kernel: bool
    learning_rate: float
    epochs: float
    max_steps: int
    batch_size: int
    eval_batch_size: int
    grad_accum: int
    warmup_ratio: float
    weight_decay: float
    neftune_noise_alpha: float
    wise_ft: float
    save_steps: int
    save_total_limit: int
    logging_steps: int
    launcher: Literal["python", "accelerate"]
    accelerate_config: str
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"]
    profile: Literal[
        "auto", "tiny", "hub"
    ]  # auto: tiny for a stand-in (tuneline.model.profiles), hub for any other base
    hub: HubProfile | None  # the settings `hub` uses; None only where code builds a Train itself

    def check(self, key: str) -> None:
        """The train keys' own rules, and those that couple them with the accelerate config they name."""
        if self.lora_r <= 0 or self.learning_rate <= 0 or self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ParamsError(
                "train.lora_r, train.learning_rate, train.batch_size and train.eval_batch_size must be "
                "positive"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ParamsError(
                f"train.max_steps must be -1 (train for train.epochs) or a positive number of steps, got "
                f"{self.max_steps}"
            )
        if self.neftune_noise_alpha < 0:
            raise ParamsError(
                f"train.neftune_noise_alpha must be 0 (off) or a positive noise scale such as 5, "
                f"got {self.neftune_noise_alpha}"
            )
        if not 0 < self.wise_ft <= 1:
            raise ParamsError(
                f"train.wise_ft must be in (0, 1]: the share of what training learned that the saved model "
                f"keeps (1.0: the model as trained), got {self.wise_ft}"
            )
        if self.method == "ptuning" and self.wise_ft != 1:
            raise ParamsError(
                f"train.wise_ft is {self.wise_ft}, but a P-tuning prompt has no base value to interpolate "
                "toward: set train.wise_ft to 1.0 with train.method ptuning"
            )
        if (
            self.method == "ptuning"
            and self.profile != "tiny"
            and self.hub is not None
            and self.hub.wise_ft != 1
        ):
            raise ParamsError(
                f"train.hub.wise_ft is {self.hub.wise_ft}, but a P-tuning prompt has no base value to "
                "interpolate toward: set train.hub.wise_ft to 1.0 with train.method ptuning"
            )
        if self.save_total_limit < 1:
            raise ParamsError(
                f"train.save_total_limit must be at least 1 (a killed run resumes from the newest), got "
                f"{self.save_total_limit}"
            )
        launched = self.launcher == "accelerate"
        if (
            self.method == "full"
            and self.wise_ft != 1
            and launched
            and zero_stage(self.accelerate_config) == 3
        ):
            raise ParamsError(
                f"train.accelerate_config {self.accelerate_config} runs DeepSpeed ZeRO-3: {WISE_FT_ZERO3}"
            )
        sharding = distributed_type(self.accelerate_config) if launched else None
        if self.method == "qlora" and sharding in ("FSDP", "DEEPSPEED"):
            raise ParamsError(
                f"train.accelerate_config {self.accelerate_config} runs {sharding}: {QLORA_SHARDED}"
            )


@dataclass(frozen=True)
class Evaluate(_Section):
    max_new_tokens: int
    batch_size: int
    generation_samples: int
    seen_samples: int
    merge: bool
    samples_in_report: int
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    judge: Judge
    lm_eval_tasks: list[str]
    lm_eval_include_path: str
    lm_eval_num_fewshot: int | None
    lm_eval_limit: int | None
    lm_eval_chat_template: bool


@dataclass(frozen=True)
class Export(_Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"]


SECTIONS: dict[str, type] = {
    "base": Base,
    "models": Models,
    "crawl": Crawl,
    "augment": Augment,
    "clean": Clean,
    "build": Build,
    "select": Select,
    "pretrain": Pretrain,
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
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ParamsError("; ".join(unknown_key_message(key, k, list(fields)) for k in unknown))
    values = {}
    for name, spec in fields.items():
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ParamsError(
                    f"{key}.{name} is missing; add it to {PARAMS_FILE} ({_type_name(hints[name])})"
                )
            continue
        values[name] = _convert(data[name], hints[name], f"{key}.{name}")
    obj = cls(**values)
    object.__setattr__(obj, "_key", key.split("[")[0])
    if hasattr(obj, "check"):
        _unaudited(obj.check, key)
    return obj


def _unaudited(check, *args) -> None:
    """Run a section's `check`: the keys it reads are not keys the stage reads."""
    global _reads
    reads, _reads = _reads, None
    try:
        check(*args)
    finally:
        _reads = reads


def unknown_key_message(parent: str, name: str, known: list[str]) -> str:
    """`parent.name is not a known key`, with the known key it most likely meant, or the known keys."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"{parent}.{name} is not a known key (did you mean {parent}.{close[0]}?)"
    return f"{parent}.{name} is not a known key; known keys of {parent} are: {', '.join(known)}"


def unknown_keys(tp: Any, value: Any, key: str) -> list[str]:
    """A message for every key in `value` that the type `tp` does not declare, at any depth.

    Generic over the dataclasses, so a field added to one is known here without another edit."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        found = [unknown_key_message(key, str(k), names) for k in value if k not in names]
        for name in names:
            if name in value:
                found += unknown_keys(hints[name], value[name], f"{key}.{name}")
        return found
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            if _holds_keys(option, value):
                return unknown_keys(option, value, key)
        return []
    if origin is list and isinstance(value, list):
        (item_tp,) = typing.get_args(tp)
        return [m for i, v in enumerate(value) for m in unknown_keys(item_tp, v, f"{key}[{i}]")]
    if origin is dict and isinstance(value, dict):
        value_tp = typing.get_args(tp)[1]
        return [m for k, v in value.items() for m in unknown_keys(value_tp, v, f"{key}.{k}")]
    return []


def _holds_keys(tp: Any, value: Any) -> bool:
    """True when `value` has the shape of `tp` and `tp` can hold keys (a dataclass, a mapping, a list)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, dict)
    return origin is list and isinstance(value, list)


def problems(data: dict, complete: bool = False) -> list[str]:
    """Every problem of a whole params mapping: each unknown section and key (all of them, at any
    depth), the first wrong value of each section that has no unknown key (its dataclass's `check`),
    each broken rule that couples two sections (`coupling_problems`) and, with `complete`, each
    missing section (a stage reports a missing section it reads when it loads it).

    Checks only the file: whether a named prompt file exists or an optional package is installed is
    `check_environment`'s, which the stages that need it call."""
    found = [
        f"section {name!r} is not known" + _did_you_mean(name, list(SECTIONS))
        for name in data
        if name not in SECTIONS
    ]
    built = {}
    for name, cls in SECTIONS.items():
        if name not in data:
            if complete:
                found.append(f"the `{name}:` section is missing; add it (docs/params.md lists its keys)")
            continue
        unknown = unknown_keys(cls, data[name], name)
        found += unknown
        if not unknown:
            try:
                built[name] = build_dataclass(cls, data[name], name)
            except ParamsError as err:
                found.append(str(err))
    return found + coupling_problems(built)


def coupling_problems(sections: dict[str, Any]) -> list[str]:
    """The rules that couple keys of two sections, each naming both keys and the fix; a rule whose
    sections did not load (or are absent) is not checked."""
    train, tokenize, evaluate = sections.get("train"), sections.get("tokenize"), sections.get("evaluate")
    found = []
    if train and tokenize and train.method == "ptuning" and tokenize.packing:
        found.append(PTUNING_PACKED)
    if train and evaluate and train.method == "ptuning" and evaluate.merge:
        found.append(
            "evaluate.merge is true, but a P-tuning adapter has no weights to merge; set evaluate.merge to "
            "false with train.method ptuning"
        )
    return found


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f"; sections are {', '.join(known)}"


def check(path: str | Path = PARAMS_FILE, data: dict | None = None, complete: bool = False) -> None:
    """Raise one ParamsError listing every problem of the whole params file (see `problems`)."""
    global _reads
    reads, _reads = _reads, None  # checking the whole file is not reading the keys a stage uses
    try:
        found = problems(_read_mapping(path) if data is None else data, complete)
    finally:
        _reads = reads
    if found:
        count = f"{len(found)} problem{'s' if len(found) > 1 else ''}"
        raise ParamsError(f"{path}: {count}, nothing was run:\n  " + "\n  ".join(found))


def _read_mapping(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path} should hold a mapping of sections, got {type(data).__name__}")
    return data


def read_params_file(path: str | Path = PARAMS_FILE) -> dict:
    """The raw params.yaml mapping."""
    data = _read_mapping(path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: section {unknown[0]!r} is not known; sections are {', '.join(SECTIONS)}")
    return data


def section(name: str, data: dict | None = None, path: str | Path = PARAMS_FILE) -> Any:
    """The section `name` of params.yaml (or of `data`) as its frozen dataclass."""
    if data is None:
        data = read_params_file(path)
    if name not in data:
        raise ParamsError(f"{path} has no `{name}:` section; add it (docs/params.md lists its keys)")
    return build_dataclass(SECTIONS[name], data[name], name)


def load(*names: str, path: str | Path = PARAMS_FILE) -> tuple:
    """Load several sections at once: `base, p = load("base", "train")`, after checking the whole
    file, so a mistake in any section stops the first stage that runs, before its work."""
    import os

    check(path)
    data = read_params_file(path)
    sections = tuple(section(n, data, path) for n in names)
    if os.environ.get(AUDIT_ENV):
        _start_audit(os.environ[AUDIT_ENV])
    return sections


WISE_FT_ZERO3 = (
    "train.wise_ft below 1 with train.method full is not run under DeepSpeed ZeRO-3 (it has not "
    "been checked there): set train.wise_ft to 1.0, or train with configs/accelerate/fsdp.yaml or ddp.yaml"
)
QLORA_SHARDED = (
    "train.method 'qlora' runs one whole 4-bit copy per GPU (DDP): set train.accelerate_config "
    "to configs/accelerate/ddp.yaml, or train.method to lora for FSDP/DeepSpeed"
)
PTUNING_PACKED = "train.method 'ptuning' cannot train on packed data: set tokenize.packing to false"


def _accelerate_config(accelerate_config: str) -> dict:
    """The mapping in an `accelerate launch` config file; {} when there is no such file."""
    path = Path(accelerate_config)
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def distributed_type(accelerate_config: str) -> str | None:
    """What an `accelerate launch` config file runs: MULTI_GPU (DDP), FSDP, DEEPSPEED, ... (None: no such
    file)."""
    return _accelerate_config(accelerate_config).get("distributed_type")


def zero_stage(accelerate_config: str) -> int | None:
    """The DeepSpeed ZeRO stage an `accelerate launch` config file runs (None: not DeepSpeed, or no such
    file),
    from its `deepspeed_config.zero_stage` or the DeepSpeed JSON its `deepspeed_config_file` names."""
    import json

    config = _accelerate_config(accelerate_config)
    deepspeed = config.get("deepspeed_config") or {}
    if config.get("distributed_type") != "DEEPSPEED":
        return None
    if deepspeed.get("deepspeed_config_file"):
        file = Path(deepspeed["deepspeed_config_file"])
        return (
            json.loads(file.read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage")
            if file.is_file()
            else None
        )
    return deepspeed.get("zero_stage")


# Switches that need a package tuneline does not install: (key, value, import name, the fix).
OPTIONAL_PACKAGES = (
    (
        "attn_implementation",
        "flash_attention_2",
        "flash_attn",
        "pip install flash-attn --no-build-isolation (CUDA only), or set train.attn_implementation to sdpa",
    ),
    (
        "attn_implementation",
        "kernels-community/flash-attn",
        "kernels",
        "pip install kernels (the kernel itself comes from the hub), or set train.attn_implementation to "
        "sdpa",
    ),
    (
        "use_liger_kernel",
        True,
        "liger_kernel",
        "pip install liger-kernel (CUDA only), or set train.use_liger_kernel to false",
    ),
)


def check_environment(name: str, p: Any) -> None:
    """Probes of this machine for the section `name` (p, as loaded): the packages a switch needs and
    the files a key names. Run by the stages that need them (select, evaluate, train, clean) before their
    work; `check` and `tuneline check` read the params file only, so they pass on a machine that
    has not run the pipeline yet."""
    import importlib.util

    if name in ("select", "evaluate") and p.judge.enabled:
        for field in ("prompt", "retry_prompt"):
            if not Path(getattr(p.judge, field)).is_file():
                raise ParamsError(
                    f"{name}.judge.{field}: {getattr(p.judge, field)} is not a file; "
                    "name a Jinja2 prompt (see prompts/)"
                )
    if name == "evaluate" and p.lm_eval_tasks:
        if importlib.util.find_spec("lm_eval") is None:
            raise ParamsError(
                f"evaluate.lm_eval_tasks {p.lm_eval_tasks} needs lm-evaluation-harness, which is not "
                f"installed: "
                "pip install -e '.[lmeval]' (tuneline's lmeval extra), or set evaluate.lm_eval_tasks to []"
            )
        if not Path(p.lm_eval_include_path).is_dir():
            raise ParamsError(
                f"evaluate.lm_eval_include_path: {p.lm_eval_include_path} is not a directory of "
                "lm_eval task YAMLs (the default is configs/lm_eval)"
            )
    if name == "clean" and p.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise ParamsError(
            "clean.engine 'ray' needs Ray Data, which is not installed: pip install -e '.[ray]' "
            "(tuneline's ray extra), or set clean.engine to inprocess"
        )
    if name == "train":
        for key, value, module, fix in OPTIONAL_PACKAGES:
            if getattr(p, key) == value and importlib.util.find_spec(module) is None:
                raise ParamsError(
                    f"train.{key} {value!r} needs the {module} package, which is not installed: {fix}"
                )
        if p.launcher == "accelerate" and not Path(p.accelerate_config).is_file():
            raise ParamsError(
                f"train.accelerate_config {p.accelerate_config!r} is not a file; name one of "
                "configs/accelerate/{ddp,fsdp,zero2,zero3}.yaml or your own `accelerate config` output"
            )


# An XPath whose last step is text(), an attribute or a function picks strings, not elements.
_XPATH_NOT_ELEMENTS = re.compile(r"(?:text\(\)|@[\w:*-]+|\w\([^/]*\))\s*$")


def _check_css(css: str, key: str) -> None:
    """A crawl selector (CSS, or XPath after `xpath:`) that parsel can run and that selects elements."""
    from parsel import Selector

    kind = "an XPath expression" if css.startswith("xpath:") else "a CSS selector"
    if css.startswith("xpath:") and _XPATH_NOT_ELEMENTS.search(css):
        raise ParamsError(
            f"{key} {css!r} selects text or attributes, not elements; end the XPath at the element "
            "(//dt, not //dt/text())"
        )
    empty = Selector(text="<html><body></body></html>")
    try:
        empty.xpath(css.removeprefix("xpath:")) if css.startswith("xpath:") else empty.css(css)
    except Exception as err:  # cssselect and lxml raise several types (SelectorSyntaxError, XPathError)
        raise ParamsError(f"{key} {css!r} is not {kind} ({err}); fix the selector") from None
