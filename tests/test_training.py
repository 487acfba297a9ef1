"""tuneline.model.training and the train stage: QLoRA on CPU, every method, resume, determinism, DDP."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from stage_project import ROOT, make_project, run_stage, seed_records, set_params, stage_command, stage_env
from transformers import TrainerCallback

from tuneline.common import params
from tuneline.common.records import ChosenModel, chosen_model
from tuneline.model.modeling import load_tokenizer, load_tuned
from tuneline.model.tokenization import collate, encode
from tuneline.model.training import checkpoint_dir, last_checkpoint, prepare_model, run_key, train

SEED = 42
TRAIN_RECORDS, VAL_RECORDS = 16, 4
# Small and quick: 4 steps per epoch, 12 in all; a checkpoint every 2 steps so a kill finds one.
TRAIN = {"epochs": 3, "batch_size": 4, "save_steps": 2, "logging_steps": 2, "learning_rate": 0.01}
NO_CHECKPOINTS = {"save_steps": 1000}
TOKENIZE = {"max_length": 128}


def selected_of(model_dir: Path) -> ChosenModel:
    return chosen_model(
        {
            "name": "tiny",
            "kind": "local",
            "model": str(model_dir),
            "revision": None,
            "trust_remote_code": False,
        }
    )


def train_params(**changes) -> params.Train:
    """The train section of the repository's params.yaml with the test settings and `changes`."""
    return dataclasses.replace(params.section("train", path=ROOT / "params.yaml"), **{**TRAIN, **changes})


def tokenized(model_dir: Path, records: list[dict], max_length: int = 128) -> Dataset:
    """The records encoded and cut at `max_length` tokens: short rows keep these tests of training
    fast. A cut answer loses its end of turn, which they do not mind; the tokenize stage never cuts."""
    tokenizer = load_tokenizer(str(model_dir))
    rows = [encode(tokenizer, r, "auto", False) for r in records]
    return Dataset.from_list(
        [{"input_ids": ids[:max_length], "labels": labels[:max_length]} for ids, labels in rows]
    )


def answer_loss(model, ds: Dataset, pad_token_id: int) -> float:
    """Mean answer-token loss over `ds` in one batch."""
    batch = collate(list(ds), pad_token_id)
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


class LossLog(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_qlora_step_on_cpu_trains_only_the_adapter_over_4bit_layers(tmp_path, tiny_model_dir):
    import bitsandbytes as bnb

    selected = selected_of(tiny_model_dir)
    records = seed_records()
    train_ds, eval_ds = (
        tokenized(tiny_model_dir, records[:8], 64),
        tokenized(tiny_model_dir, records[8:12], 64),
    )
    # full batches, and an evaluation after every epoch between training steps
    p = train_params(method="qlora", epochs=4, batch_size=8, logging_steps=1, **NO_CHECKPOINTS)

    before = prepare_model(selected, p, SEED)
    lora_wrapped = [m for m in before.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert len(lora_wrapped) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_wrapped)
    assert all(m.base_layer.weight.quant_state.quant_type == "nf4" for m in lora_wrapped)
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    loss_before = answer_loss(before, train_ds, pad)
    initial = {k: v.detach().clone() for k, v in before.state_dict().items()}

    log = LossLog()
    model, _, metrics = train(selected, p, train_ds, eval_ds, tmp_path / "checkpoints", SEED, [log])
    after = {k: v.detach() for k, v in model.state_dict().items()}

    assert initial.keys() == after.keys()
    changed = {k for k in initial if not torch.equal(initial[k], after[k])}
    lora_keys = {k for k in initial if "lora_" in k}
    assert lora_keys and changed == lora_keys  # every adapter weight moved; nothing else did
    assert any(
        k.endswith(".weight") and initial[k].dtype == torch.uint8 for k in initial
    )  # 4-bit base stayed
    assert len(log.losses) == 4 and log.losses[-1] < log.losses[0]
    assert answer_loss(model, train_ds, pad) < loss_before


@pytest.mark.parametrize("method", ["lora", "qlora", "ptuning", "full"])
def test_training_forward_runs_the_head_on_answer_positions_only_in_chunks_with_the_model_s_own_loss(
    monkeypatch, tiny_model_dir, method
):
    from tuneline.model import training

    chunk = 16
    monkeypatch.setattr(training, "LOSS_CHUNK", chunk)
    selected, p = selected_of(tiny_model_dir), train_params(method=method)
    batch = collate(
        list(tokenized(tiny_model_dir, seed_records()[:4])), load_tokenizer(str(tiny_model_dir)).pad_token_id
    )
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert labelled < 0.6 * batch["input_ids"].numel()  # prompts and padding: over 40% of the positions
    assert labelled > 3 * chunk  # several chunks, the last one short
    patched = prepare_model(selected, p, SEED)
    with monkeypatch.context() as m:
        m.setattr(training, "answer_only_head", lambda model: False)
        plain = prepare_model(selected, p, SEED)  # the model's own forward: logits of every position
    head_rows = []
    head = (
        patched.get_output_embeddings()
        if method == "full"
        else patched.get_base_model().get_output_embeddings()
    )
    head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[0]))

    for kwargs in ({}, {"num_items_in_batch": torch.tensor(labelled + 7)}):  # as the Trainer passes it
        ours, theirs = patched(**batch, **kwargs), plain(**batch, **kwargs)
        assert ours.logits is None and theirs.logits is not None
        torch.testing.assert_close(ours.loss, theirs.loss)
    assert sum(head_rows) == 2 * labelled and max(head_rows) == chunk

    # What autograd keeps for the backward pass: never more than a chunk of positions' logits.
    vocab = head.weight.shape[0]
    kept_rows = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[-1] == vocab:
            kept_rows.append(t.numel() // vocab)
        return t

    patched.zero_grad(), plain.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = patched(**batch).loss
    assert kept_rows == [] or max(kept_rows) <= chunk
    loss.backward(), plain(**batch).loss.backward()
    trainable = [(a, b) for a, b in zip(patched.parameters(), plain.parameters()) if a.requires_grad]
    assert (
        trainable
        and all(a.grad is not None for a, _ in trainable)
        and any(a.grad.abs().sum() > 0 for a, _ in trainable)
    )
    for a, b in trainable:
        torch.testing.assert_close(a.grad, b.grad)
    # without labels (generation, scoring) it is the model's own forward
    torch.testing.assert_close(
        patched(input_ids=batch["input_ids"]).logits, plain(input_ids=batch["input_ids"]).logits
    )


def test_liger_takes_the_loss_instead_of_the_answer_only_head_and_says_so(tiny_model_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="tuneline.model.training"):
        liger = prepare_model(
            selected_of(tiny_model_dir), train_params(method="lora", use_liger_kernel=True), SEED
        )
    assert (
        "train.use_liger_kernel: Liger's fused linear cross-entropy computes the loss; the answer-only head "
        "is off" in caplog.text
    )
    assert "forward" not in vars(liger.get_base_model())  # the model's own forward, which Liger replaces
    head = prepare_model(selected_of(tiny_model_dir), train_params(method="lora"), SEED)
    assert "forward" in vars(head.get_base_model())


def test_a_batch_without_answer_tokens_gives_a_zero_loss_that_backpropagates(tiny_model_dir):
    model = prepare_model(selected_of(tiny_model_dir), train_params(method="lora"), SEED)
    batch = collate(
        list(tokenized(tiny_model_dir, seed_records()[:2])), load_tokenizer(str(tiny_model_dir)).pad_token_id
    )
    loss = model(**{**batch, "labels": torch.full_like(batch["labels"], -100)}).loss
    assert float(loss) == 0
    loss.backward()


def tiny_of(config_class, **transform):
    """A tiny random causal LM of `config_class`, with the logit transform `transform` sets."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = config_class(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        use_cache=False,
        **transform,
    )
    return AutoModelForCausalLM.from_config(config).eval()


TRANSFORMS = {  # soft-capping at 0.5 and scaling by 8: far from the raw head's logits even at random weights
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 0.5}),
    "cohere": ("CohereConfig", {"logit_scale": 8.0}),
    "granite": ("GraniteConfig", {"logits_scaling": 0.125}),
}


@pytest.mark.parametrize("family", list(TRANSFORMS))
def test_models_whose_logits_are_more_than_the_head_keep_their_own_forward(monkeypatch, family):
    import transformers

    from tuneline.model import training

    name, transform = TRANSFORMS[family]
    config_class = getattr(transformers, name)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    model = tiny_of(config_class, **transform)
    own = model(input_ids=ids, labels=ids).loss
    assert not training.answer_only_head(model)  # named by its config key
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, own)
    # A transform no key names is caught by the probe: the patched loss would differ from the model's own.
    monkeypatch.setattr(training, "OWN_LOGITS_KEYS", ())
    assert not training.answer_only_head(model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, own)
    # The control: without the transform the probe agrees and the model is patched.
    plain = tiny_of(config_class, **{key: None if family == "gemma2" else 1.0 for key in transform})
    assert training.answer_only_head(plain)
    assert plain(input_ids=ids, labels=ids).logits is None


METHODS = {
    "lora": {"method": "lora"},
    "dora": {"method": "lora", "use_dora": True},
    "rslora": {"method": "lora", "use_rslora": True},
    "qlora": {"method": "qlora"},
    "ptuning": {"method": "ptuning", "learning_rate": 0.03, "wise_ft": 1.0},
    "full": {"method": "full", "learning_rate": 0.001},
}


@pytest.fixture(scope="module")
def tokenized_project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project whose tokenize stage has run: copy it, set train params, run the train stage."""
    from stages import tokenize as stage

    records = seed_records()
    project = make_project(
        tmp_path_factory.mktemp("tokenized"),
        tiny_model_dir,
        records[:TRAIN_RECORDS],
        records[TRAIN_RECORDS : TRAIN_RECORDS + VAL_RECORDS],
        tokenize=TOKENIZE,
        train=TRAIN,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        stage.main()
    return project


def copy_project(src: Path, dest: Path, **train_changes) -> Path:
    shutil.copytree(src, dest)
    if train_changes:
        set_params(dest, "train", **train_changes)
    return dest


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_loads_back_for_generation(
    tmp_path, monkeypatch, tokenized_project, tiny_model_dir, method
):
    from transformers import AutoModelForCausalLM

    from stages import train as stage

    project = copy_project(tokenized_project, tmp_path / "p", epochs=1, **NO_CHECKPOINTS, **METHODS[method])
    monkeypatch.chdir(project)
    stage.main()

    adapter = project / "models" / "adapter"
    info = json.loads((adapter / "training_args.json").read_text())
    assert info["method"] == METHODS[method]["method"] and info["seed"] == SEED
    if method == "full":
        assert info["trainable_parameters"] == info["total_parameters"]
        assert not (adapter / "adapter_config.json").exists()
    else:
        assert 0 < info["trainable_parameters"] < info["total_parameters"]
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == ("P_TUNING" if method == "ptuning" else "LORA")
        assert config.get("use_dora", False) == (method == "dora")
        assert config.get("use_rslora", False) == (method == "rslora")
    assert json.loads((project / "metrics" / "train" / "metrics.json").read_text())["train"]["loss"] > 0

    selected = selected_of(tiny_model_dir)
    tuned = load_tuned(selected, adapter).eval()
    tokenizer = load_tokenizer(str(adapter))
    if method != "full":
        # what was loaded is exactly what was saved (peft only warns about keys it cannot place)
        from peft import get_peft_model_state_dict

        saved = load_file(adapter / "adapter_model.safetensors")
        loaded = get_peft_model_state_dict(tuned)
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[k], loaded[k].cpu()) for k in saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How long should a French press steep?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        assert not torch.allclose(tuned(**prompt).logits[:, -1], base(**prompt).logits[:, -1])
        out = tuned.generate(
            **prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4


WISE_FT_RUNS = {
    "qlora": METHODS["qlora"],
    "full": METHODS["full"],
    # an embedding's LoRA B is saved without a .weight suffix
    "lora_on_embeddings": {"method": "lora", "target_modules": ["embed_tokens", "q_proj"]},
}


@pytest.mark.parametrize("method", list(WISE_FT_RUNS))
def test_wise_ft_saves_the_base_plus_that_share_of_the_trained_update_from_the_same_run(
    tmp_path, tokenized_project, tiny_model_dir, method
):
    from peft.helpers import rescale_adapter_scale
    from transformers import AutoModelForCausalLM

    settings = {"epochs": 1, **NO_CHECKPOINTS, **WISE_FT_RUNS[method]}
    as_trained = copy_project(tokenized_project, tmp_path / "a", wise_ft=1.0, **settings)
    half = copy_project(tokenized_project, tmp_path / "b", wise_ft=0.5, **settings)
    run_stage_here(as_trained)
    printed = run_stage_here(half)
    assert "as base + 0.5 x the trained update (train.wise_ft" in printed

    if method == "full":
        a, b = (load_file(p / "models/adapter/model.safetensors") for p in (as_trained, half))
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
        assert a.keys() == b.keys()
        moved = [k for k in a if not torch.equal(a[k], base[k])]
        assert moved  # training changed weights, so the interpolation has something to halve
        for key in a:
            assert torch.allclose(b[key], base[key] + 0.5 * (a[key] - base[key]), atol=1e-6), key
        return

    a, b = adapter_weights(as_trained), adapter_weights(half)
    scaled = {k for k in a if {"lora_B", "lora_embedding_B"} & set(k.split("."))}
    assert scaled and a.keys() == b.keys()
    if method == "lora_on_embeddings":
        assert any(k.endswith("embed_tokens.lora_embedding_B") for k in scaled), sorted(a)
    for key in a:
        expected = a[key] * 0.5 if key in scaled else a[key]
        assert torch.allclose(b[key], expected, atol=1e-7), key
        assert torch.equal(b[key], a[key]) == (key not in scaled or not a[key].any()), key
    # The saved interpolation is what peft's own run-time rescaling of the adapter computes.
    selected = selected_of(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    trained = load_tuned(selected, as_trained / "models/adapter").eval()
    saved = load_tuned(selected, half / "models/adapter").eval()
    with torch.no_grad():
        with rescale_adapter_scale(trained, 0.5):
            rescaled = trained(input_ids=ids).logits
        assert torch.allclose(saved(input_ids=ids).logits, rescaled, atol=1e-5)
        assert not torch.allclose(trained(input_ids=ids).logits, rescaled, atol=1e-3)


def run_key_parts(tiny_model_dir):
    return train_params(), selected_of(tiny_model_dir), "data0123", SEED


def test_run_key_covers_everything_that_changes_the_run(tiny_model_dir):
    p, selected, data, seed = run_key_parts(tiny_model_dir)
    key = run_key(p, selected, data, seed)
    assert key == run_key(train_params(), chosen_model(dict(selected.record)), data, seed)
    others = [
        run_key(dataclasses.replace(p, learning_rate=p.learning_rate * 2), selected, data, seed),
        run_key(
            dataclasses.replace(p, method="lora" if p.method != "lora" else "qlora"), selected, data, seed
        ),
        run_key(dataclasses.replace(p, use_dora=True), selected, data, seed),
        run_key(dataclasses.replace(p, wise_ft=0.5), selected, data, seed),
        run_key(p, chosen_model({**selected.record, "model": "other/model"}), data, seed),
        run_key(p, selected, "data4567", seed),
        run_key(p, selected, data, seed + 1),
        run_key(p, selected, data, seed, world_size=2),
    ]
    assert len({key, *others}) == len(others) + 1


def test_only_this_run_s_complete_checkpoints_are_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    old = checkpoint_dir(root, "run-a")
    for step in (2, 4):
        (old / f"checkpoint-{step}").mkdir(parents=True)
        (old / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(old) == str(old / "checkpoint-4")
    (old / "checkpoint-6").mkdir()  # killed before its trainer state was written
    (old / "checkpoint-8").mkdir()
    (old / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    assert last_checkpoint(old) == str(old / "checkpoint-4")

    new = checkpoint_dir(root, "run-b")  # another run: the old run's checkpoints go
    assert not old.exists()
    assert last_checkpoint(new) is None


def adapter_weights(project: Path) -> dict[str, torch.Tensor]:
    return load_file(project / "models" / "adapter" / "adapter_model.safetensors")


def run_stage_here(project: Path) -> str:
    """Run the train stage's main() in this process with `project` as the working directory."""
    from stages import train as stage

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.chdir(project)
        stage.main()
    return out.getvalue()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenized_project) -> Path:
    """A project where the train stage ran once, start to end."""
    project = copy_project(tokenized_project, tmp_path_factory.mktemp("uninterrupted") / "a")
    run_stage_here(project)
    return project


# The promise is for CPU (issue 7); CUDA kernels may add in a different order from run to run.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="bitwise-equal runs are promised on CPU")


@cpu_only
def test_same_seed_gives_identical_adapter_bytes(tmp_path, tokenized_project, uninterrupted):
    other = copy_project(tokenized_project, tmp_path / "b")
    done = run_stage(other, "train")  # a separate process, as DVC runs it
    # The terminal: progress bars and one summary line; the per-step log dicts are in the log file.
    assert "{'loss'" not in done.stdout and "'train_runtime'" not in done.stdout
    assert "FutureWarning" not in done.stderr and "gemm_4bit_forward" not in done.stderr
    assert (
        [line for line in done.stdout.splitlines() if line.strip()]
        == [line for line in done.stdout.splitlines() if line.startswith("train: ")]
        != []
    )
    assert "'loss':" in (other / "metrics/logs/train.log").read_text()
    assert (uninterrupted / "models/adapter/adapter_model.safetensors").read_bytes() == (
        other / "models/adapter/adapter_model.safetensors"
    ).read_bytes()
    assert (
        json.loads((uninterrupted / "models/adapter/training_args.json").read_text())["run_key"]
        == json.loads((other / "models/adapter/training_args.json").read_text())["run_key"]
    )


def complete_checkpoints(project: Path) -> list[Path]:
    return [
        state.parent
        for state in project.glob("cache/checkpoints/*/checkpoint-*/trainer_state.json")
        if _parses(state)
    ]


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


@cpu_only
def test_killed_run_resumes_to_the_same_adapter(tmp_path, tokenized_project, uninterrupted):
    project = copy_project(tokenized_project, tmp_path / "killed")
    proc = subprocess.Popen(
        stage_command("train"),
        cwd=project,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not complete_checkpoints(project) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more steps"
    assert not (project / "models" / "adapter").exists()
    total_steps = TRAIN["epochs"] * TRAIN_RECORDS // TRAIN["batch_size"]
    steps = sorted(int(c.name.split("-")[1]) for c in complete_checkpoints(project))
    assert steps and steps[-1] < total_steps

    stdout = run_stage_here(project)
    assert "train: resuming from cache/checkpoints/" in stdout
    resumed_from = int(stdout.split("train: resuming from ")[1].split()[0].rsplit("-", 1)[1])
    assert resumed_from >= steps[-1]
    expected, got = adapter_weights(uninterrupted), adapter_weights(project)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_train_stage_runs_under_accelerate_launch_with_2_cpu_processes(tmp_path, uninterrupted):
    # A copy of a finished single-process run: its checkpoints belong to another run (one
    # process, other params), so they must be set aside, not resumed.
    project = copy_project(uninterrupted, tmp_path / "ddp", epochs=2)
    shutil.rmtree(project / "models" / "adapter")
    single_key = json.loads((uninterrupted / "models/adapter/training_args.json").read_text())["run_key"]
    # `--cpu` alone starts a single process; --multi_gpu starts one per process via torchrun,
    # on CPU (gloo) where no GPU is visible.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "stages.train",
    ]
    result = subprocess.run(
        cmd, cwd=project, env=stage_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    assert "resuming" not in result.stdout
    assert (
        len(re.findall(r"^train: \w+ on tiny", result.stdout, re.M)) == 1
    )  # only the main process reports and saves

    info = json.loads((project / "models/adapter/training_args.json").read_text())
    assert info["run_key"] != single_key
    assert [d.name for d in (project / "cache" / "checkpoints").iterdir()] == [info["run_key"]]
    assert adapter_weights(project).keys() == adapter_weights(uninterrupted).keys()
    # each process took half of every batch of records: half the optimizer steps of one process
    state = json.loads(
        (
            Path(last_checkpoint(project / "cache" / "checkpoints" / info["run_key"])) / "trainer_state.json"
        ).read_text()
    )
    assert state["global_step"] == 2 * TRAIN_RECORDS // (TRAIN["batch_size"] * 2)


def test_compute_dtype_auto_is_bf16_where_supported_fp16_on_other_gpus_fp32_on_cpu(monkeypatch):
    from tuneline.model.modeling import resolve_dtype
    from tuneline.model.training import precision_flags

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto") == "float16"
    # the Trainer's mixed precision follows: autocast on a GPU, never on CPU
    assert precision_flags("bfloat16", cuda=True) == {"bf16": True, "fp16": False}
    assert precision_flags("float16", cuda=True) == {"bf16": False, "fp16": True}
    assert precision_flags("bfloat16", cuda=False) == {"bf16": False, "fp16": False}


def test_full_fine_tuning_keeps_fp32_master_weights_and_lora_freezes_the_base_at_the_compute_dtype(
    tiny_model_dir,
):
    selected = selected_of(tiny_model_dir)
    full = prepare_model(selected, train_params(method="full", compute_dtype="bfloat16"), SEED)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    lora = prepare_model(selected, train_params(method="lora", compute_dtype="bfloat16"), SEED)
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}  # the adapter
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}  # the frozen base
    assert lora.config.use_cache is False


@pytest.fixture(scope="module")
def full_bf16_run(tmp_path_factory, tiny_model_dir) -> tuple[dict, Path]:
    """A full fine-tuning run at compute dtype bfloat16, saved: (its trained weights, the save)."""
    saved = tmp_path_factory.mktemp("full_bf16") / "adapter"
    ds = tokenized(tiny_model_dir, seed_records()[:8])
    p = train_params(
        method="full", compute_dtype="bfloat16", max_steps=2, learning_rate=0.001, **NO_CHECKPOINTS
    )
    model, _, _ = train(
        selected_of(tiny_model_dir), p, ds, None, saved.parent / "ck", SEED, [], save_to=saved
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, saved


def test_full_fine_tuning_saves_its_fp32_master_weights_at_the_compute_dtype(full_bf16_run, tiny_model_dir):
    trained, saved = full_bf16_run
    assert {t.dtype for t in trained.values()} == {torch.float32}  # trained in fp32 master weights...
    weights = load_file(saved / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # ...saved at the compute dtype
    assert all(torch.equal(weights[k], trained[k].to(torch.bfloat16)) for k in weights)
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"
    tuned = load_tuned(selected_of(tiny_model_dir), saved, dtype="bfloat16")
    assert all(torch.equal(tuned.state_dict()[k], weights[k]) for k in weights)


def test_save_at_dtype_keeps_a_sharded_index_s_total_size_right(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneline.model.training import save_at_dtype

    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    size = save_at_dtype(tmp_path, "bfloat16")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert (
        index["metadata"]["total_size"]
        == size
        == sum(t.numel() * 2 for f in shards for t in load_file(f).values())
    )
    assert set(index["weight_map"].values()) == {f.name for f in shards}


def test_wise_ft_of_full_fine_tuning_reads_the_base_s_files_on_cpu_and_builds_no_model(
    tmp_path, monkeypatch, full_bf16_run, tiny_model_dir
):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from tuneline.model.training import wise_ft

    base_dir = tmp_path / "base"  # the base in several files, as a hub model of some size is
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_model.save_pretrained(base_dir, max_shard_size="200KB")
    assert len(list(base_dir.glob("*.safetensors"))) > 1
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    saved = tmp_path / "saved"
    shutil.copytree(full_bf16_run[1], saved)
    trained = load_file(saved / "model.safetensors")

    def no_model(*args, **kwargs):
        raise AssertionError("wise_ft built a model")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", no_model)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
    changed = wise_ft(saved, selected_of(base_dir), 0.25)

    mixed = load_file(saved / "model.safetensors")
    assert changed == len(mixed) and mixed.keys() == trained.keys()
    assert any(not torch.equal(trained[k], base[k].to(torch.bfloat16)) for k in trained)
    for k in mixed:
        assert mixed[k].dtype == torch.bfloat16
        expected = base[k] + 0.25 * (trained[k].float() - base[k])
        torch.testing.assert_close(mixed[k], expected.to(torch.bfloat16), rtol=0, atol=0)


def test_wise_ft_of_full_fine_tuning_refuses_deepspeed_zero3_naming_the_key(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    ds = tokenized(tiny_model_dir, seed_records()[:2])
    with pytest.raises(params.ParamsError, match=r"train\.wise_ft .* ZeRO-3.*set train\.wise_ft to 1\.0"):
        train(
            selected_of(tiny_model_dir),
            train_params(method="full", wise_ft=0.5),
            ds,
            None,
            tmp_path,
            SEED,
            [],
        )


def test_each_rank_loads_onto_its_own_gpu_and_sharded_launches_load_on_cpu(monkeypatch):
    from tuneline.model.modeling import device, device_map

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert device_map() == {"": 1} and device() == torch.device("cuda", 1)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP shards the CPU copy over the ranks itself
    assert device_map() is None
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert device_map() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert device_map() is None and device() == torch.device("cpu")


class SeenAtStart(TrainerCallback):
    """What the Trainer really trains with: its arguments, model and optimizer when training starts."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.args, self.model, self.optimizer = args, model, optimizer


def test_memory_and_speed_switches_reach_the_trainer_and_the_model(tmp_path, monkeypatch, tiny_model_dir):
    import bitsandbytes as bnb
    import transformers.trainer

    liger_applied = []
    monkeypatch.setattr(
        transformers.trainer, "apply_liger_kernel", lambda model, config: liger_applied.append(model)
    )
    selected = selected_of(tiny_model_dir)
    ds = tokenized(tiny_model_dir, seed_records()[:8], 64)
    p = train_params(
        gradient_checkpointing=True,
        attn_implementation="eager",
        optim="adamw_8bit",
        use_liger_kernel=True,
        max_steps=3,
        batch_size=2,
        eval_batch_size=3,
        save_steps=1,
        save_total_limit=1,
        **{"epochs": 5},
    )
    seen = SeenAtStart()
    model, _, metrics = train(selected, p, ds, ds.select(range(2)), tmp_path / "ck", SEED, [seen])

    assert seen.args.gradient_checkpointing and seen.args.gradient_checkpointing_kwargs == {
        "use_reentrant": False
    }
    assert model.base_model.model.model.gradient_checkpointing  # switched on in the model itself
    assert model.config._attn_implementation == "eager"
    optimizer = getattr(seen.optimizer, "optimizer", seen.optimizer)  # accelerate wraps it
    assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.args.optim_bits == 8
    assert liger_applied == [model]
    assert seen.args.per_device_eval_batch_size == 3
    assert (
        metrics["train_runtime"] > 0
        and json.loads((Path(last_checkpoint(tmp_path / "ck")) / "trainer_state.json").read_text())[
            "global_step"
        ]
        == 3
    )  # not 5 epochs
    assert [d.name for d in (tmp_path / "ck").iterdir()] == ["checkpoint-3"]  # save_total_limit: 1


class EmbeddingsWhileTraining(TrainerCallback):
    """The input embeddings of the same ids looked up twice, in training mode, at each step's start."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.lookups = ids, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        embed = model.get_input_embeddings()
        was = embed.training
        embed.train()
        with torch.no_grad():
            self.lookups.append((embed(self.ids), embed(self.ids)))
        embed.train(was)


@pytest.mark.parametrize("alpha", [0.0, 5.0])
def test_neftune_noises_the_input_embeddings_in_training_only(tmp_path, tiny_model_dir, alpha):
    selected = selected_of(tiny_model_dir)
    ds = tokenized(tiny_model_dir, seed_records()[:4], 64)
    ids = torch.tensor([ds[0]["input_ids"]])
    seen = EmbeddingsWhileTraining(ids)
    p = train_params(method="lora", neftune_noise_alpha=alpha, max_steps=2, batch_size=2, **NO_CHECKPOINTS)
    model, _, _ = train(selected, p, ds, None, tmp_path / "ck", SEED, [seen])

    assert len(seen.lookups) == 2
    noised = [not torch.equal(a, b) for a, b in seen.lookups]
    assert noised == [alpha > 0] * 2
    if alpha:
        # the noise's scale: uniform in +-alpha / sqrt(seq_len * hidden), as the NEFTune paper sets it
        a, b = seen.lookups[0]
        bound = alpha / (ids.shape[1] * a.shape[-1]) ** 0.5
        assert 0 < float((a - b).abs().max()) <= 2 * bound + 1e-6
    # after training the hook is gone: evaluation and export see the embeddings as they are
    embed = model.get_input_embeddings().train()
    with torch.no_grad():
        assert torch.equal(embed(ids), embed(ids))


def test_switches_that_need_a_missing_package_fail_naming_the_key_and_the_fix(monkeypatch):
    import copy
    import importlib.util

    raw = params.read_params_file(ROOT / "params.yaml")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            None if name in ("flash_attn", "liger_kernel", "kernels") else real_find_spec(name, *a)
        ),
    )
    for key, value, message in [
        (
            "use_liger_kernel",
            True,
            r"train\.use_liger_kernel True needs the liger_kernel package.*pip install liger-kernel",
        ),
        (
            "attn_implementation",
            "flash_attention_2",
            r"train\.attn_implementation 'flash_attention_2' needs the flash_attn",
        ),
        ("attn_implementation", "kernels-community/flash-attn", r"needs the kernels package"),
        ("attn_implementation", "flash", r"train\.attn_implementation 'flash' is not one of sdpa, eager"),
        ("optim", "adamw", r"train\.optim 'adamw' is not one of adamw_torch, adamw_8bit, paged_adamw_8bit"),
        ("max_steps", 0, r"train\.max_steps must be -1"),
        ("save_total_limit", 0, r"train\.save_total_limit must be at least 1"),
        ("launcher", "torchrun", r"train\.launcher 'torchrun' is not one of python, accelerate"),
    ]:
        data = copy.deepcopy(raw)
        data["train"][key] = value
        with pytest.raises(params.ParamsError, match=message):
            params.check_environment("train", params.section("train", data))
    for name in ("select", "evaluate", "export"):
        assert params.section(name, raw).dtype == "auto"


def launched_project(tokenized_project: Path, dest: Path, config: str, **train_changes) -> Path:
    """A copy of the tokenized project that trains under `accelerate launch` with configs/accelerate/`config`
    changed to `processes` CPU processes (gloo), as `dvc exp run -S train.launcher=accelerate` would."""
    import yaml

    project = copy_project(
        tokenized_project,
        dest,
        launcher="accelerate",
        accelerate_config=f"configs/accelerate/{config}",
        **train_changes,
    )
    shutil.copytree(ROOT / "configs", project / "configs")
    path = project / "configs" / "accelerate" / config
    accelerate_config = yaml.safe_load(path.read_text())
    accelerate_config.update(
        num_processes=2, use_cpu=True
    )  # CPU processes over gloo: what a CPU machine can run
    if "fsdp_config" in accelerate_config:
        # accelerate broadcasts rank 0's weights from a GPU (it refuses on CPU); each rank loads them itself
        # here
        accelerate_config["fsdp_config"].update(
            fsdp_sync_module_states=False, fsdp_cpu_ram_efficient_loading=False
        )
    path.write_text(yaml.safe_dump(accelerate_config))
    return project


def run_launched(project: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        stage_command("train"),
        cwd=project,
        env=stage_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.slow
def test_qlora_under_ddp_with_2_processes_trains_and_saves_an_adapter_that_loads_back(
    tmp_path, tokenized_project, tiny_model_dir
):
    project = launched_project(
        tokenized_project, tmp_path / "ddp", "ddp.yaml", method="qlora", max_steps=2, **NO_CHECKPOINTS
    )
    result = run_launched(project)
    assert "train: accelerate launch --config_file configs/accelerate/ddp.yaml" in result.stdout
    assert result.stdout.count("train: qlora on tiny") == 1  # only the main process reports

    adapter = project / "models" / "adapter"
    info = json.loads((adapter / "training_args.json").read_text())
    assert info["params"]["launcher"] == "accelerate"
    saved = adapter_weights(project)
    assert saved and all("lora_" in k for k in saved)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in saved.items() if "lora_B" in k)  # trained
    assert not (adapter / "training_args.bin").exists()
    from peft import get_peft_model_state_dict

    tuned = load_tuned(selected_of(tiny_model_dir), adapter)
    loaded = get_peft_model_state_dict(tuned)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k].cpu()) for k in saved)


@pytest.mark.slow
def test_full_fine_tuning_under_fsdp_with_2_processes_saves_gathered_weights_that_load_back(
    tmp_path, tokenized_project, tiny_model_dir
):
    from transformers import AutoModelForCausalLM

    project = launched_project(
        tokenized_project,
        tmp_path / "fsdp",
        "fsdp.yaml",
        method="full",
        learning_rate=0.001,
        max_steps=2,
        **NO_CHECKPOINTS,
    )
    result = run_launched(project)
    assert result.stdout.count("train: full on tiny") == 1

    adapter = project / "models" / "adapter"
    saved = load_file(adapter / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = base.state_dict()
    # every weight of the model, whole (not a rank's flat shard), and changed by training
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(expected[k].shape) for k in saved}
    assert set(expected) - set(saved) <= {"lm_head.weight"}  # tied to the embeddings
    assert sum(not torch.equal(saved[k], expected[k]) for k in saved) >= len(saved) // 2
    tuned = load_tuned(selected_of(tiny_model_dir), adapter)
    assert all(torch.equal(tuned.state_dict()[k], saved[k]) for k in saved)


def test_a_model_trained_on_packed_data_keeps_packed_examples_apart_whatever_its_cache_default(
    tmp_path, tiny_model_dir
):
    from tuneline.model.tokenization import pack

    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = [encode(tokenizer, r, "auto", train_on_prompt=False) for r in seed_records()[:12]]
    packs = list(pack(iter(examples), max_length=400))
    assert any(p["num_examples"] > 1 for p in packs)
    ds = Dataset.from_list([{k: p[k] for k in ("input_ids", "labels", "position_ids")} for p in packs])
    model, _, _ = train(
        selected_of(tiny_model_dir),
        train_params(max_steps=2, batch_size=2, **NO_CHECKPOINTS),
        ds,
        None,
        tmp_path / "ck",
        SEED,
        [],
    )

    # The worst case: a model whose config asks for a KV cache (a cache hides the packed boundaries
    # from the attention mask). The packed batch itself says use_cache=False, so that cannot leak.
    model.config.use_cache = True
    model.get_base_model().config.use_cache = True
    model.train()  # as in training (lora_dropout is 0, so the outputs are deterministic)
    row = next(p for p in packs if p["num_examples"] > 1)
    batch = collate([row], tokenizer.pad_token_id)
    assert batch["use_cache"] is False and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        starts = [i for i, pos in enumerate(row["position_ids"]) if pos == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            alone = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
            assert torch.allclose(packed[a:b], alone, atol=1e-5), f"the example at {a}:{b} saw another one"
        # The control: with the cache the config asks for, the later examples do see the earlier ones.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert not torch.allclose(leaky[starts[1] : starts[2]], packed[starts[1] : starts[2]], atol=1e-3)


def test_the_trainer_hands_packed_batches_boundaries_to_a_flash_attention_at_batch_size_2(
    tmp_path, tiny_model_dir
):
    import flash_like

    from tuneline.model.tokenization import pack

    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = [encode(tokenizer, r, "auto", train_on_prompt=False) for r in seed_records()[:12]]
    packs = list(pack(iter(examples), max_length=400))
    assert len(packs) >= 4 and all(p["num_examples"] > 1 for p in packs[:2])
    ds = Dataset.from_list([{k: p[k] for k in ("input_ids", "labels", "position_ids")} for p in packs])
    flash_like.register()
    flash_like.CALLS.clear()
    train(
        selected_of(tiny_model_dir),
        train_params(max_steps=2, batch_size=2, attn_implementation=flash_like.NAME, **NO_CHECKPOINTS),
        ds,
        None,
        tmp_path / "ck",
        SEED,
        [],
    )
    # every attention call of the 2 training steps (2 layers each) ran varlen; the plain causal ones
    # are the head's probe (2 forwards of one unpacked row) before training
    assert flash_like.CALLS == {"varlen": 2 * 2, "causal": 2 * 2}
