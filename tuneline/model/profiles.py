"""Which training settings a base gets: the tiny stand-ins' or ones fit for a real 0.5B-8B model.

`train.profile: auto` picks `tiny` for a local model directory of under TINY_MAX_PARAMETERS
parameters (counted from its safetensors headers, nothing loaded) and `hub` for any other base;
`hub` trains with `train.hub`'s settings in place of the top-level keys of the same name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tuneline.common.params import Train

TINY_MAX_PARAMETERS = 10_000_000
HUB_KEYS = (
    "lora_r",
    "lora_alpha",
    "learning_rate",
    "epochs",
    "lr_scheduler",
    "warmup_ratio",
    "neftune_noise_alpha",
    "wise_ft",
)


def local_parameters(model: str) -> int | None:
    """The parameter count of the saved model in directory `model`, from its safetensors headers; None
    when `model` is no such directory (a hub id)."""
    from safetensors import safe_open

    files = sorted(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                n = 1
                for size in f.get_slice(name).get_shape():
                    n *= size
                total += n
    return total


def profile_of(p: Train, model: str) -> str:
    """`tiny` or `hub`: train.profile, with `auto` decided by the size of the model at `model`."""
    if p.profile != "auto":
        return p.profile
    count = local_parameters(model)
    return "tiny" if count is not None and count < TINY_MAX_PARAMETERS else "hub"


def with_profile(p: Train, model: str) -> tuple[Train, str, dict]:
    """(`p` with its profile's settings, the profile, those settings) for training the base at `model`."""
    profile = profile_of(p, model)
    if profile == "hub":
        if p.hub is None:
            raise ValueError("train.profile is hub but train.hub is null; give train.hub its settings")
        values = {k: getattr(p.hub, k) for k in HUB_KEYS}
        if p.method == "full":
            values["learning_rate"] = p.hub.full_learning_rate
        p = dataclasses.replace(p, **values)
    return p, profile, {k: getattr(p, k) for k in HUB_KEYS}
