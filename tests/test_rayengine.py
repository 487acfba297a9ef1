"""clean.engine: ray — the clean stage on a local Ray (2 CPUs, loopback, no dashboard) writes the
same bytes as in this process, whatever order the blocks arrive in; without Ray the key says what to install.

Ray's own servers (GCS, raylet, workers) listen on every interface even with the node address
127.0.0.1, and Ray has no public setting to change that. Servers the tests start must be on
127.0.0.1 only, so the tests that start Ray run in a network namespace of their own that holds only
the loopback device (`unshare -rn`): test_the_ray_tests_pass_on_a_loopback_only_network runs this
file again there, and the local Ray checks that nothing listens beyond loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml

from tests.test_clean import ROOT, P, planted
from tuneline.common import params
from tuneline.common.params import ParamsError
from tuneline.common.records import shard_files, write_jsonl_shards
from tuneline.data import rayengine
from tuneline.data.clean import (
    clean_records,
    map_in_process,
    render_report,
    rule_limits,
    rule_outcome,
)

LOOPBACK_ONLY = "TUNELINE_TEST_LOOPBACK_ONLY"  # set inside the namespace


def listening_addresses() -> set[str]:
    """The local addresses of every listening TCP socket, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                found.add(local.rsplit(":", 1)[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for this module: 2 CPUs, on 127.0.0.1, without the dashboard; shut down after.
    Only inside the loopback-only namespace; there it also checks that nothing listens elsewhere."""
    if os.environ.get(LOOPBACK_ONLY) != "1":
        pytest.skip(
            "starts Ray, whose servers listen on every interface: "
            "test_the_ray_tests_pass_on_a_loopback_only_network runs it in a namespace"
        )
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    assert listening_addresses() <= LOOPBACK
    yield
    ray.shutdown()


def test_the_ray_tests_pass_on_a_loopback_only_network():
    if os.environ.get(LOOPBACK_ONLY) == "1":
        pytest.skip("this is the run inside the namespace")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2) for a loopback-only network namespace")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine refuses a network namespace (unshare -rn: {probe.stderr.strip()})")
    inner = subprocess.run(
        [
            "unshare",
            "-rn",
            "sh",
            "-c",
            'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider -n 0 "$1"',
            sys.executable,
            __file__,
        ],
        cwd=ROOT,
        env={**os.environ, LOOPBACK_ONLY: "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert inner.returncode == 0, inner.stdout[-4000:] + inner.stderr[-2000:]
    assert re.search(r"\b4 passed\b", inner.stdout), inner.stdout[-2000:]


def faulty_records() -> list[dict]:
    """test_clean's planted records (duplicates, an outlier, label errors) and records every rule
    step acts on: empty output, PII (redacted), a refusal, an exact duplicate; no ids, so clean sets them."""
    records, _ = planted()
    records = [{k: v for k, v in r.items() if k not in ("id", "content_hash")} for r in records]
    records += [
        {"instruction": "What is a flat white?", "input": "", "output": "", "source": "generated"},
        {
            "instruction": "Who roasts the beans for the shop?",
            "input": "",
            "source": "crawl",
            "category": "beans",
            "output": "Write to roaster@example.com or call +44 20 7946 0958 for the roasting schedule.",
        },
        {
            "instruction": "Can you recommend a grinder?",
            "input": "",
            "source": "generated",
            "output": "I'm sorry, but I cannot help with product recommendations.",
        },
        {**records[5], "instruction": records[5]["instruction"].upper(), "source": "generated"},
    ]
    return records


def outputs(result) -> dict[str, bytes]:
    """What the clean stage writes, as bytes: records.jsonl, rejects.jsonl, clean.json, clean_report.md."""

    def jsonl(rows: list[dict]) -> bytes:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()

    return {
        "records.jsonl": jsonl(result.kept),
        "rejects.jsonl": jsonl(result.rejects),
        "clean.json": json.dumps(result.metrics, indent=2, ensure_ascii=False).encode(),
        "clean_report.md": render_report(result, P.report_examples).encode(),
    }


def shuffled_blocks(block_records: int, seed: int):
    """A clean.RecordMap on the local Ray whose blocks (`block_records` records each) arrive in shuffled
    order."""

    def map_records(fn, records):
        return rayengine.gathered(
            rayengine.records_dataset(records, block_records).randomize_block_order(seed=seed), fn
        )

    return map_records


def fake_embed(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors from a hash of each text (no model), for tests of the rules pass alone."""
    rows = [
        np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8).astype(np.float32) - 127.5
        for t in texts
    ]
    vectors = np.stack(rows) if rows else np.zeros((0, 32), np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_blocks_really_arrive_out_of_order(local_ray):
    records = faulty_records()
    assert rayengine.records_dataset(records, 8).materialize().num_blocks() == -(-len(records) // 8) >= 5
    dataset = rayengine.records_dataset(records, 8).randomize_block_order(seed=3)
    arrived = [int(row["i"]) for row in dataset.take_all()]
    assert sorted(arrived) == list(range(len(records))) and arrived != sorted(arrived)


def test_ids_and_outcomes_do_not_depend_on_block_size_or_arrival_order(local_ray):
    records = faulty_records()
    here = outputs(clean_records(records, P, fake_embed))
    for block_records, seed in ((5, 0), (13, 7), (1000, 1)):
        assert (
            outputs(clean_records(records, P, fake_embed, map_records=shuffled_blocks(block_records, seed)))
            == here
        )
    kept = json.loads("[" + here["records.jsonl"].decode().strip().replace("\n", ",") + "]")
    assert len({r["id"] for r in kept}) == len(kept) > 30
    limits = rule_limits(P)
    one = lambda r: rule_outcome(r, limits, P.pii, tuple(P.phone_regions))  # noqa: E731
    assert rayengine.map_records(one, records) == map_in_process(one, records)
    assert rayengine.map_records(one, []) == []


def test_stage_with_engine_ray_writes_the_same_bytes_as_inprocess(local_ray, tmp_path, monkeypatch, capsys):
    from stages import clean as stage

    # Blocks of 8 records: the rules pass runs as 6 map_batches tasks on the 2 CPUs.
    monkeypatch.setattr(rayengine, "BLOCK_RECORDS", 8)
    records = faulty_records()
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = data["base"]
    names = [
        Path(base["clean_dir"]) / "records",
        Path(base["clean_dir"]) / "rejects",
        Path(base["metrics_dir"]) / "clean.json",
        Path(base["metrics_dir"]) / "clean_report.md",
    ]

    def contents(path: Path) -> bytes | dict[str, bytes]:
        return {f.name: f.read_bytes() for f in shard_files(path)} if path.is_dir() else path.read_bytes()

    written, said = {}, {}
    for engine in ("inprocess", "ray"):
        project = tmp_path / engine
        project.mkdir()
        data["clean"]["engine"] = engine
        (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        write_jsonl_shards(project / base["augmented_dir"] / "records", records, base["shard_records"])
        monkeypatch.chdir(project)
        stage.main()
        said[engine] = capsys.readouterr().out
        written[engine] = {str(n): contents(project / n) for n in names}
    # Each run embedded every text itself (the Ray one in Ray actors): no vector came from a cache.
    assert re.search(r"embeddings for (\d+) texts, \1 newly encoded", said["ray"])
    assert said["ray"].split("; embeddings")[0] == said["inprocess"].split("; embeddings")[0]
    assert written["ray"] == written["inprocess"]
    metrics = json.loads(written["ray"][str(names[2])])
    assert {"empty_output", "refusal", "exact_duplicate", "near_duplicate", "outlier"} <= set(
        metrics["rejects_by_reason"]
    )
    assert metrics["pii"]["records_redacted"] == 1


def test_engine_ray_without_ray_installed_names_the_key_and_the_extra(monkeypatch):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["clean"]["engine"] = "ray"
    assert params.section("clean", data).engine == "ray"
    monkeypatch.setitem(sys.modules, "ray", None)  # what importlib sees where ray is not installed
    with pytest.raises(
        ParamsError,
        match=r"clean.engine 'ray' needs Ray Data, which is not installed: "
        r"pip install -e '\.\[ray\]'.*or set clean.engine to inprocess",
    ):
        params.check_environment("clean", params.section("clean", data))
    data["clean"]["engine"] = "spark"
    with pytest.raises(ParamsError, match=r"clean.engine 'spark' is not one of inprocess, ray"):
        params.section("clean", data)
    assert P.engine == "inprocess"  # the default
