"""`transformers serve` for a P-tuning adapter: the same server, loading base + adapter with peft.

A P-tuning run's virtual tokens live in a prompt encoder in front of the base model, not in its
weights, so nothing can be merged into a plain checkpoint and `transformers serve` alone cannot
load the export (transformers' own adapter loading covers LoRA-style adapters only). This runs
`transformers serve` in this process with one change: a model directory that holds a
prompt-learning adapter (`adapter_config.json`, no `config.json`) is loaded as its base model
(`base_model_name_or_path` in the adapter config) wrapped in `PeftModel.from_pretrained`, whose
`generate` prepends the virtual tokens. Requests, replies and streaming are `transformers serve`'s.

    python -m tuneline.peftserve serve --host 127.0.0.1 --port 8000 models/export
"""

from __future__ import annotations

import sys
from pathlib import Path


def is_prompt_adapter(path: str | Path) -> bool:
    """Whether `path` is a directory holding a peft adapter and no model weights of its own."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def with_adapter_loading(load_model):
    """ModelManager._load_model, except that an adapter directory loads as base + adapter."""

    def load_model_with_adapter(self, model_id_and_revision: str, *args, **kwargs):
        from peft import PeftConfig, PeftModel
        from transformers.cli.serving.model_manager import split_revision

        adapter_dir, _ = split_revision(model_id_and_revision)
        if not is_prompt_adapter(adapter_dir):
            return load_model(self, model_id_and_revision, *args, **kwargs)
        base = load_model(self, PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path, *args, **kwargs)
        return PeftModel.from_pretrained(base, adapter_dir).eval()

    return load_model_with_adapter


def main(argv: list[str] | None = None) -> None:
    from transformers.cli.serving.model_manager import ModelManager

    ModelManager._load_model = with_adapter_loading(ModelManager._load_model)
    from transformers.cli.transformers import main as transformers_cli

    sys.argv = ["transformers", *(sys.argv[1:] if argv is None else argv)]
    transformers_cli()


if __name__ == "__main__":
    main()
