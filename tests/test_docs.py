"""The README and docs/ as a user follows them: short, every link there, the params example valid, the
key reference up to date, and `dvc exp run -S` with a misspelt key stopped before any work."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import yaml

from tests.pipeline_repo import ROOT, make_repo, run
from tuneline.common import params

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_a_short_guide_whose_links_all_exist():
    assert len(README.splitlines()) <= 150
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert {"docs/stages.md", "docs/params.md", "docs/workflows.md", "docs/reproducibility.md"} <= set(links)
    for link in links:
        assert (ROOT / link).is_file(), link
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([\w.-]+\.md)", page.read_text(encoding="utf-8")):
            assert (ROOT / "docs" / link).is_file(), f"{page.name} -> {link}"


def deep_merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def test_the_your_own_data_example_is_a_valid_params_change():
    section = README.split("## Your own data and model", 1)[1]
    example = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    assert (
        10
        <= sum(1 for line in section.split("```yaml", 1)[1].split("```", 1)[0].splitlines() if line.strip())
        <= 15
    )
    merged = deep_merge(params.read_params_file(ROOT / "params.yaml"), example)
    assert params.problems(merged, complete=True) == []
    assert params.section("select", merged).candidates["qwen05"].model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert params.section("crawl", merged).datasets[0].format == "jsonl"


def test_the_real_models_example_is_a_valid_params_change_that_trains_with_the_hub_settings():
    from tuneline.model.profiles import with_profile

    section = README.split("## Pointing it at real models", 1)[1]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    assert sum(1 for line in block.splitlines() if line.strip()) <= 11
    merged = deep_merge(params.read_params_file(ROOT / "params.yaml"), yaml.safe_load(block))
    assert params.problems(merged, complete=True) == []
    train = params.section("train", merged)
    trained, profile, settings = with_profile(train, "Qwen/Qwen2.5-0.5B")  # a hub id: not a tiny stand-in
    assert (
        profile == "hub"
        and settings["epochs"] == 3
        and trained.lora_r == 16
        and trained.learning_rate == 2e-4
    )
    assert params.section("select", merged).candidates["qwen05"].model == "Qwen/Qwen2.5-0.5B"


def test_the_documentation_site_example_is_a_valid_heading_qa_source():
    section = README.split("## Pointing it at real models", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml", 2)[2].split("```", 1)[0]
    merged = deep_merge(params.read_params_file(ROOT / "params.yaml"), yaml.safe_load(block))
    assert params.problems(merged, complete=True) == []
    (source,) = params.section("crawl", merged).sources
    assert source.qa_mode == "headings" and source.heading_levels == [2, 3] and source.text_css == "div.body"


def test_the_params_reference_is_what_tools_params_doc_writes():
    sys.path.insert(0, str(ROOT / "tools"))
    import params_doc

    written = params_doc.page((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert (ROOT / "docs" / "params.md").read_text(encoding="utf-8") == written, (
        "docs/params.md is out of date: run `python tools/params_doc.py`"
    )
    for line in (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines():
        key = line.split(":", 1)[0].strip().removeprefix("- ")
        if re.fullmatch(r"[a-z_]+", key):
            assert f".{key}`" in written or f"`{key}`" in written, key


@pytest.mark.slow
def test_a_misspelt_key_in_dvc_exp_run_stops_before_any_work_and_leaves_the_workspace(tmp_path):
    repo = make_repo(tmp_path / "repo")
    before = (repo / "params.yaml").read_text(encoding="utf-8")
    # -S sets a key the file has; DVC itself refuses one it does not have
    refused = run(repo, "dvc", "exp", "run", "-S", "train.lora_rr=16", check=False)
    assert refused.returncode != 0 and "+train.lora_rr" in refused.stdout + refused.stderr
    # adding it (+) reaches tuneline's check of the whole file, in the first stage, before its work
    added = run(repo, "dvc", "exp", "run", "--temp", "-S", "+train.lora_rr=16", check=False)
    text = added.stdout + added.stderr
    assert added.returncode != 0
    assert "train.lora_rr is not a known key (did you mean train.lora_r?)" in text
    assert "Running stage 'models'" in text and "Running stage 'crawl'" not in text
    # --temp ran it in a copy: the workspace is as it was
    assert (repo / "params.yaml").read_text(encoding="utf-8") == before
    assert (
        subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
        == ""
    )
