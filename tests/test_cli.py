"""`tuneline serve`: the exported model behind a real `transformers serve` on a free loopback port."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from openai import OpenAI

from tests.tuned_project import ROOT
from tuneline.common.records import EndpointError, InputError, write_json
from tuneline.interface.cli import exported_model, main, parser, serve, stop, wait_ready
from tuneline.llm.server import free_port

QUESTION = [{"role": "user", "content": "How long should a French press steep?"}]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def ask(url: str, model: str) -> str:
    client = OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [model]
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    return reply.choices[0].message.content


@pytest.fixture
def project_without_export(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_serve_says_how_to_make_the_missing_export(project_without_export, capsys):
    assert main(["serve", "--port", str(free_port())]) == 2
    assert re.match(
        r"tuneline serve: no exported model in models/export .* run `dvc repro export` first\n$",
        capsys.readouterr().err,
    )


def test_serve_says_when_an_api_model_was_chosen(project_without_export):
    write_json(
        project_without_export / "models" / "export" / "SKIPPED.json", {"reason": "gpt-x is an API model"}
    )
    with pytest.raises(InputError, match="nothing was exported .* gpt-x is an API model"):
        exported_model(project_without_export / "models" / "export")


def test_wait_ready_fails_fast_when_the_server_dies_or_never_answers():
    url = f"http://127.0.0.1:{free_port()}/v1"
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_ready(url, timeout=60, process=dead)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError, match="not ready after"):
            wait_ready(url, timeout=0.5, process=silent)
    finally:
        assert stop(silent) == -signal.SIGTERM


def test_tuneline_serve_runs_until_terminated_and_takes_the_server_down(tuned_project, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with open(tmp_path / "cli.log", "w+b") as log:
        # Run from the project directory, as `make serve` does; the package comes from this checkout.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        cli = subprocess.Popen(
            [sys.executable, "-m", "tuneline.interface.cli", "serve", "--port", str(port), "--device", "cpu"],
            cwd=tuned_project,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            try:
                wait_ready(url, timeout=180, process=cli)
            except RuntimeError as err:
                log.seek(0)
                pytest.fail(f"{err}:\n{log.read().decode(errors='replace')[-3000:]}")
            assert ask(url, "models/export").strip()  # the request names the model as params.yaml does
            cli.terminate()
            assert cli.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            stop(cli)
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert f"tuneline serve: models/export at {url}" in output
    assert not listening(port)  # the `transformers serve` child went down with it


def test_version_help_defaults_and_the_epilog_name_the_pipeline_commands(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("tuneline 0.")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 8000)" in shown and "(default: auto)" in shown
    assert "`make run`" in shown and "`dvc repro`" in shown


def test_check_lists_every_problem_of_the_params_file(project_without_export, capsys):
    main(["check"])
    assert "params.yaml is fine" in capsys.readouterr().out
    text = (project_without_export / "params.yaml").read_text(encoding="utf-8")
    text = text.replace("  lora_r: 128", "  lora_rr: 128").replace("  max_new_tokens:", "  max_new_tokenz:")
    (project_without_export / "params.yaml").write_text(text, encoding="utf-8")
    assert main(["check"]) == 2
    message = capsys.readouterr().err
    assert re.match(r"tuneline check: params.yaml: \d problems, nothing was run:", message), message
    assert "train.lora_rr is not a known key (did you mean train.lora_r?)" in message
    assert "max_new_tokenz is not a known key (did you mean" in message


def test_serve_on_a_busy_port_says_so_before_loading_the_model(project_without_export):
    export = project_without_export / "models" / "export"
    export.mkdir(parents=True)
    write_json(export / "config.json", {"model_type": "llama"})  # found, but it would never load
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            EndpointError, match=rf"^port {port} on 127.0.0.1 is in use; pick another with --port$"
        ):
            serve(parser().parse_args(["serve", "--port", str(port), "--startup-timeout", "5"]))
        assert main(["serve", "--port", str(port), "--startup-timeout", "5"]) == 3


def test_verdict_prints_the_eval_table(project_without_export, capsys):
    metrics = project_without_export / "metrics"
    metrics.mkdir()
    write_json(
        metrics / "eval.json",
        {
            "unseen": {
                "base": {"rouge_l": 0.1},
                "tuned": {"rouge_l": 0.3},
                "delta": {"rouge_l": 0.2},
                "delta_ci95": {"rouge_l": {"low": 0.15, "high": 0.25}},
                "verdict": {"rouge_l": "better"},
                "records": 13,
            }
        },
    )
    main(["verdict"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "set",
        "metric",
        "base",
        "tuned",
        "tuned",
        "-",
        "base",
        "[95%",
        "interval]",
        "verdict",
    ]
    assert lines[1].split() == [
        "unseen",
        "rouge_l",
        "0.1000",
        "0.3000",
        "+0.2000",
        "[+0.1500,",
        "+0.2500]",
        "better",
    ]
