"""Fine-tuning with transformers' Trainer and peft: QLoRA, LoRA (DoRA, rsLoRA), P-tuning, full.

Checkpoints go to a directory keyed by everything that changes the run (params, base model,
tokenized data), so a rerun after a crash resumes its own run and never someone else's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import types
from functools import partial, wraps
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.trainer_callback import ProgressCallback

from tuneline.common.params import PTUNING_PACKED, QLORA_SHARDED, WISE_FT_ZERO3, ParamsError, Train
from tuneline.common.records import ChosenModel
from tuneline.common.timings import is_timing
from tuneline.model.modeling import DTYPES, load_model, load_tokenizer, resolve_dtype, sharded_launch
from tuneline.model.tokenization import IGNORE, collate


def peft_config(p: Train):
    """The peft config of `p.method` (None for full fine-tuning)."""
    from peft import LoraConfig, PromptEncoderConfig, TaskType

    if p.method in ("lora", "qlora"):
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=p.lora_r,
            lora_alpha=p.lora_alpha,
            lora_dropout=p.lora_dropout,
            target_modules=p.target_modules,
            use_dora=p.use_dora,
            use_rslora=p.use_rslora,
        )
    if p.method == "ptuning":
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p.ptuning_virtual_tokens)
    return None


def keep_4bit_training_layout(model) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout training uses, on CPU too.

    On a CPU with AVX512-BF16, a `Linear4bit` repacks its weight in place for an inference
    kernel the first time it runs in eval mode without grad (the Trainer's evaluation pass), and
    the training steps after that fail on the repacked weight ("a view of a leaf Variable that
    requires grad is being used in an in-place operation"). A run evaluates every epoch, so
    the repacking is switched off for the whole run.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


# Config keys of models whose logits are more than the head's output (Gemma's soft-capping, Cohere's
# and Granite's scaling, Falcon-H1's multiplier) or whose loss adds a router term (MoE): those keep
# their own forward, which knows how.
OWN_LOGITS_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
    "output_router_logits",
)

# Answer positions whose logits the training loss makes at once: LOSS_CHUNK x vocabulary in fp32
# (0.6 GB at 152k words), and as much again for their gradient in the backward pass.
LOSS_CHUNK = 1024


def _summed_cross_entropy(head, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(rows).float(), targets, reduction="sum")


def chunked_cross_entropy(head, rows: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """The summed cross-entropy of `head(rows)` against `targets`, `chunk` rows at a time.

    Each chunk runs under activation checkpointing: its logits are dropped once its loss is
    summed and made again, one chunk at a time, in the backward pass, so no more than `chunk`
    rows of logits (and of their gradient) are ever held, whatever the number of answer tokens.
    The price is the head's forward run twice. The head is called as a module, so what wraps it
    (a LoRA layer on it, DeepSpeed's parameter gathering) runs as in the model's own forward.
    No rows still make one (empty) call: a zero connected to the graph.
    """
    from torch.utils.checkpoint import checkpoint

    losses = [
        checkpoint(
            _summed_cross_entropy, head, rows[i : i + chunk], targets[i : i + chunk], use_reentrant=False
        )
        for i in range(0, max(len(targets), 1), chunk)
    ]
    return torch.stack(losses).sum()


def answer_only_head(model) -> bool:
    """Make the model's training forward run the language-model head on labelled positions only, in chunks.

    A causal LM's own forward with labels computes the logits of every position (batch x length x
    vocabulary, made fp32 for the loss: 10 GB for 8 x 2048 tokens at a 152k vocabulary) and the
    loss then reads only the positions whose next token is labelled: the answers, never the prompt
    or the padding (label -100). With labels, the patched forward runs the decoder, takes the
    hidden states of those positions alone through the head and the cross-entropy, LOSS_CHUNK
    positions at a time (`chunked_cross_entropy`), summed over `num_items_in_batch` as
    transformers' loss does, else their count: the same loss and gradients, with the head's
    compute cut to the answer tokens and its memory to one chunk's logits. Without labels
    (generation, scoring) it is the model's own forward.

    The instance's forward is replaced (TRL's fused LM head does the same), so peft, DDP, FSDP and
    DeepSpeed, which call it, train through it. Models in OWN_LOGITS_KEYS keep their forward, and
    so does any other whose own loss the patched forward does not reproduce on a probe
    (`reproduces_own_loss`: a transform of the logits no key names); returns whether the model
    was patched.
    """
    config = model.config.get_text_config()
    if (
        any(getattr(config, key, None) for key in OWN_LOGITS_KEYS)
        or model.get_output_embeddings() is None
        or model.base_model is model
    ):  # no decoder apart from the head to run first
        return False
    own_forward = model.forward

    @wraps(type(model).forward)  # the signature the Trainer and generate() inspect
    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or "shift_labels" in kwargs:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return own_forward(*args, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        targets = labels[:, 1:].to(hidden.device)  # position t predicts token t + 1
        answer = targets != IGNORE
        loss = chunked_cross_entropy(
            self.get_output_embeddings(), hidden[:, :-1][answer], targets[answer], LOSS_CHUNK
        )
        # a batch with no labelled token gives a zero that stays connected to the graph
        count = answer.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return CausalLMOutputWithPast(loss=loss / count)

    patched = types.MethodType(forward, model)
    if not sharded_launch() and not reproduces_own_loss(model, patched, own_forward):
        logging.getLogger("tuneline.model.training").warning(
            "train: %s's own loss differs from the answer-only head's on a probe; it trains with its own "
            "forward "
            "(full logits)",
            type(model).__name__,
        )
        return False
    model.forward = patched
    return True


@torch.no_grad()
def reproduces_own_loss(model, patched, own_forward, tokens: int = 16) -> bool:
    """Whether the patched forward gives the model's own loss on a probe of `tokens` token ids.

    A model whose forward changes the logits in a way OWN_LOGITS_KEYS does not name (one family's
    logits_scaling divides, another's multiplies) would otherwise train on a wrong loss without a
    word. Under FSDP or DeepSpeed the model is not whole before the Trainer wraps it, so no probe runs.
    """
    training = model.training
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    ids = (
        (torch.arange(1, tokens + 1) * 7919 % vocab)
        .unsqueeze(0)
        .to(model.get_input_embeddings().weight.device)
    )
    ours, theirs = patched(input_ids=ids, labels=ids).loss, own_forward(input_ids=ids, labels=ids).loss
    model.train(training)
    return bool(torch.allclose(ours.float(), theirs.float(), rtol=1e-3, atol=1e-4))


def prepare_model(chosen: ChosenModel, p: Train, seed: int):
    """The base model ready to train: quantised and wrapped for QLoRA, wrapped for LoRA/P-tuning.

    Frozen weights load at the compute dtype (bf16 on a recent GPU); full fine-tuning loads fp32
    master weights and the Trainer's autocast computes in the compute dtype (mixed precision).
    QLoRA keeps its non-quantised frozen weights (embeddings, norms) at the compute dtype too:
    peft's prepare_model_for_kbit_training would upcast them to fp32, 4 GB more on an 8B model.
    """
    from peft import get_peft_model

    if p.method == "qlora" and sharded_launch():
        raise ParamsError(QLORA_SHARDED)  # launched by hand: params load sees only train.accelerate_config
    set_seed(seed)
    model = load_model(
        chosen.name_or_path,
        chosen.revision,
        chosen.trust_remote_code,
        quantize_4bit=p.method == "qlora",
        dtype="float32" if p.method == "full" else p.compute_dtype,
        attn_implementation=p.attn_implementation,
    )
    model.config.use_cache = (
        False  # training never reads a KV cache, and one would hide packed sequences' boundaries
    )
    if p.method == "qlora":
        keep_4bit_training_layout(model)
    if p.use_liger_kernel:
        # Liger's fused linear cross-entropy never makes the full logits either; the two would both replace
        # the loss.
        logging.getLogger("tuneline.model.training").warning(
            "train.use_liger_kernel: Liger's fused linear cross-entropy computes the loss; the answer-only "
            "head is off"
        )
    else:
        answer_only_head(model)
    config = peft_config(p)
    if config is not None:
        set_seed(seed)  # adapter initialisation draws from the RNG: same seed, same adapter
        model = get_peft_model(model, config)  # trainable adapter weights are fp32 whatever the base's dtype
    return model


def run_key(p: Train, chosen: ChosenModel, data_fingerprint: str, seed: int, world_size: int = 1) -> str:
    """A hash of everything that makes a training run what it is.

    The number of processes is part of it: it changes the global batch and the data order, so a
    checkpoint of a 2-process run cannot be resumed by a single process.
    """
    run = {
        "params": p.__dict__,
        "model": chosen.record,
        "data": data_fingerprint,
        "seed": seed,
        "world_size": world_size,
    }
    blob = json.dumps(run, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dir_fingerprint(path: str | Path) -> str:
    """A content hash of the data files under `path`."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and f.suffix == ".arrow":
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint in `run_dir`; one cut off mid-save is skipped.

    The Trainer writes trainer_state.json last, so a checkpoint is complete when that file is
    there and whole (a kill during its write leaves it cut short).
    """
    done = [d for d in run_dir.glob("checkpoint-*") if _readable_json(d / "trainer_state.json")]
    if not done:
        return None
    return str(max(done, key=lambda d: int(d.name.split("-")[1])))


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoint_dir(root: str | Path, key: str) -> Path:
    """The checkpoint directory of the run `key`; other runs' checkpoints are removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for other in root.iterdir():
        if other.name != key:
            shutil.rmtree(other, ignore_errors=True)
    return root / key


class TokensPerSecond(TrainerCallback):
    """Adds training throughput (non-padding tokens/s, from the Trainer's token count) to each log."""

    def __init__(self) -> None:
        self.last = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        if self.last is not None and now > self.last[0]:
            logs["tokens_per_s"] = (seen - self.last[1]) / (now - self.last[0])
        self.last = (now, seen)


class SplitTimings(TrainerCallback):
    """Takes the timing and throughput values (runtime, samples/s, tokens/s) out of each log
    before the callbacks after it (DVCLive) write it, keeping the latest of each in `latest`:
    they go to the stage's timings file (tuneline.common.timings), so the metrics and plots DVC hashes
    are the same on every run."""

    def __init__(self) -> None:
        self.latest: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in [k for k in logs or {} if is_timing(k)]:
            self.latest[key] = logs.pop(key)


class QuietProgress(ProgressCallback):
    """The Trainer's progress bars, with the per-step log dicts sent to the stage's log file.

    transformers' ProgressCallback prints each log dict between the bars; the same numbers are
    in the metrics and plots files (DVCLive), so the terminal keeps only the bar.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logging.getLogger("tuneline.model.training").info(
                "step %d: %s", state.global_step, {k: v for k, v in logs.items() if k != "total_flos"}
            )


def precision_flags(dtype: str, cuda: bool) -> dict:
    """The Trainer's mixed precision: autocast to the compute dtype over fp32 trainable weights
    (peft keeps LoRA adapters fp32; full fine-tuning loads fp32). On CPU everything stays fp32."""
    return {"bf16": cuda and dtype == "bfloat16", "fp16": cuda and dtype == "float16"}


def checkpointing_flags(enabled: bool) -> dict:
    """Activation (gradient) checkpointing, under the name this transformers version takes.

    Newer versions renamed `gradient_checkpointing*` to `activation_checkpointing*` and warn
    about the old names. Non-reentrant checkpointing needs no inputs that require grad (frozen
    embeddings under LoRA) and works with DDP and FSDP; the reentrant one does not.
    """
    renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if renamed else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(p: Train, out_dir: Path, seed: int, has_eval: bool) -> TrainingArguments:
    """The Trainer's arguments for a run of `p`, checkpointing into `out_dir`."""
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.eval_batch_size,
        gradient_accumulation_steps=p.grad_accum,
        learning_rate=p.learning_rate,
        num_train_epochs=p.epochs,
        max_steps=p.max_steps,  # -1: num_train_epochs decides
        warmup_steps=p.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=p.lr_scheduler,
        weight_decay=p.weight_decay,
        # NEFTune: uniform noise of scale alpha / sqrt(seq_len * hidden) on the input embeddings while
        # training (the Trainer removes its hook afterwards, so evaluation and export see none).
        neftune_noise_alpha=p.neftune_noise_alpha or None,
        optim=p.optim,
        logging_steps=p.logging_steps,
        save_steps=p.save_steps,
        save_strategy="steps",
        save_total_limit=p.save_total_limit,
        eval_strategy="epoch" if has_eval else "no",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        **precision_flags(resolve_dtype(p.compute_dtype), torch.cuda.is_available()),
        **checkpointing_flags(p.gradient_checkpointing),
        use_liger_kernel=p.use_liger_kernel,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # Every trainable parameter takes part in each forward pass (LoRA, P-tuning and full alike),
        # so DDP need not search the graph for unused ones on every step.
        ddp_find_unused_parameters=False,
        # Count real tokens, not padding, so tokens/s compares packed and unpacked runs fairly.
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=False,
    )


def fit(
    model,
    tokenizer,
    args: TrainingArguments,
    train_ds,
    eval_ds,
    collator,
    checkpoints: Path,
    callbacks: list,
    save_to: Path | None = None,
) -> tuple:
    """Train `model` with the Trainer, resuming from the newest complete checkpoint in `checkpoints`;
    return (model, metrics). Fine-tuning and pretraining on raw text both run through here. The
    callbacks (DVCLive) see no timings; the metrics returned hold them (`tuneline.common.timings.split`).

    With `save_to`, the trained weights (adapter, or full model) are saved there through
    `Trainer.save_model`, which every process must call: under FSDP or ZeRO-3 it gathers the
    sharded parameters, and only the main process writes.
    """
    timings = SplitTimings()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[TokensPerSecond(), timings, *callbacks],
    )
    trainer.remove_callback(ProgressCallback)  # disable_tqdm=False added it; keep its bars, not its prints
    trainer.add_callback(QuietProgress())
    resume = last_checkpoint(checkpoints)
    if resume:
        print(f"train: resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    if save_to is not None:
        if trainer.is_world_process_zero():
            shutil.rmtree(save_to, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(save_to))
        if trainer.is_world_process_zero():
            # a pickle of the arguments, with this machine's paths: not part of the model
            (Path(save_to) / "training_args.bin").unlink(missing_ok=True)
    return trainer.model, {**timings.latest, **result.metrics}


def train(
    chosen: ChosenModel,
    p: Train,
    train_ds,
    eval_ds,
    checkpoints: Path,
    seed: int,
    callbacks: list,
    save_to: Path | None = None,
) -> tuple:
    """Fine-tune the chosen model, resuming from the newest complete checkpoint of this run;
    return (model, tokenizer, metrics), the metrics with the parameter counts, taken before the
    Trainer shards the model. `save_to`: see `fit`; full fine-tuning's weights are saved there at
    the compute dtype (`save_at_dtype`).
    """
    if p.method == "ptuning" and "position_ids" in train_ds.column_names:
        raise ParamsError(PTUNING_PACKED)  # data tokenized under other params than these
    if p.method == "full" and p.wise_ft != 1 and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ParamsError(WISE_FT_ZERO3)
    tokenizer = load_tokenizer(chosen.name_or_path, chosen.revision, chosen.trust_remote_code)
    # The arguments come first: under DeepSpeed ZeRO-3 they set up the sharded loading of the model.
    args = training_arguments(p, checkpoints, seed, has_eval=eval_ds is not None and len(eval_ds) > 0)
    model = prepare_model(chosen, p, seed)
    trainable, total = trainable_parameters(model)
    model, metrics = fit(
        model,
        tokenizer,
        args,
        train_ds,
        eval_ds,
        partial(collate, pad_token_id=tokenizer.pad_token_id),
        checkpoints,
        callbacks,
        save_to,
    )
    if save_to is not None and p.method == "full" and is_main_process():
        save_at_dtype(Path(save_to), resolve_dtype(p.compute_dtype))
    return model, tokenizer, {**metrics, "trainable_parameters": trainable, "total_parameters": total}


def save_at_dtype(saved: Path, dtype: str) -> int:
    """Rewrite the full model saved in `saved` with its floating-point weights at `dtype`, the
    compute dtype; return the bytes its weights now take.

    Full fine-tuning trains fp32 master weights and the Trainer saves them as they are: twice the
    size of the bf16 or fp16 model that evaluate, export and serve load it as. The files are
    rewritten one at a time on CPU after the save (under FSDP or ZeRO-3 the save has gathered the
    shards), with the sharded index's total size and the config's dtype to match.
    """
    from safetensors.torch import load_file, save_file

    target = DTYPES[dtype]
    size = 0
    for path in sorted(saved.glob("model*.safetensors")):
        tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in load_file(path).items()}
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, path, metadata={"format": "pt"})
    for name, key, value in (
        ("model.safetensors.index.json", "metadata", {"total_size": size}),
        ("config.json", "dtype", dtype),
    ):
        path = saved / name
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return size


def base_weight_files(chosen: ChosenModel) -> list[Path]:
    """The chosen base's weight files as transformers loads them (model.safetensors, or the
    model-0000i-of-0000n shards), a local directory's or the hub cache's (select and train have
    downloaded them already). Other .safetensors a hub repository ships (Mistral's
    consolidated.safetensors, in another naming) are neither read nor downloaded."""
    model = chosen.name_or_path
    root = Path(model)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(model, revision=chosen.revision, allow_patterns=["model*.safetensors"]))
    files = sorted(root.glob("model*.safetensors"))
    if not files:
        raise ParamsError(
            f"train.wise_ft: the base {model} has no .safetensors files to interpolate toward; "
            "set train.wise_ft to 1.0 for this model"
        )
    return files


def wise_ft(saved: Path, chosen: ChosenModel, alpha: float) -> int:
    """WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): rewrite the model
    saved in `saved` as base + alpha x (trained - base); return the number of tensors changed.

    A LoRA adapter's update is B @ A x scaling, so scaling each B by alpha is the interpolation
    exactly (what peft.helpers.rescale_adapter_scale does at run time; with DoRA the direction update
    is scaled and the magnitude kept). Full fine-tuning's weights are interpolated with the base's,
    read tensor by tensor on CPU from the base's own safetensors files: no second model is built,
    and nothing goes to the GPU. 1.0 leaves the files as the Trainer wrote them. Every reader of the
    saved model (evaluate, export, serve) then sees the same interpolated model.
    """
    from contextlib import ExitStack

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if alpha == 1:
        return 0
    adapter = (saved / "adapter_config.json").exists()
    files = [saved / "adapter_model.safetensors"] if adapter else sorted(saved.glob("model*.safetensors"))
    changed = 0
    with ExitStack() as stack:
        base_files = (
            []
            if adapter
            else [stack.enter_context(safe_open(f, "pt", device="cpu")) for f in base_weight_files(chosen)]
        )
        base_of = {key: f for f in base_files for key in f.keys()}
        for path in files:
            tensors = load_file(path)
            for key, t in tensors.items():
                if adapter:
                    if not {"lora_B", "lora_embedding_B"} & set(
                        key.split(".")
                    ):  # an embedding's B has no .weight
                        continue
                    new = t.float() * alpha
                else:
                    if key not in base_of:
                        raise ParamsError(
                            f"train.wise_ft: {path} holds {key}, which the base {chosen.name_or_path}'s "
                            "files do not have; set train.wise_ft to 1.0 for this model"
                        )
                    if not t.is_floating_point():
                        continue
                    base_t = base_of[key].get_tensor(key).float()
                    new = base_t + alpha * (t.float() - base_t)
                tensors[key] = new.to(t.dtype).contiguous()
                changed += 1
            save_file(tensors, path, metadata={"format": "pt"})
    if not changed:
        raise ParamsError(
            f"train.wise_ft is {alpha}, but {saved} holds no LoRA B matrix or base weight to interpolate; "
            "set train.wise_ft to 1.0"
        )
    return changed


def is_main_process() -> bool:
    """Whether this is the process that logs and saves: rank 0 under `accelerate launch`/torchrun
    (which set RANK), and the only process otherwise."""
    return int(os.environ.get("RANK", "0")) == 0


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
