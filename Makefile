# tuneline: the two commands are `make run` and `make test`. Both set themselves up.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
# torch is installed first, by pip, and pinned so nothing swaps in another build; on a machine
# with a GPU, `make TORCH=torch` takes the normal (CUDA) build from PyPI. Everything else comes from
# requirements.lock (exact versions and hashes; tools/lock.py says how it treats torch), synced by uv:
# a stale .venv is corrected, packages the lock does not hold are removed. --compile-bytecode as pip
# does: where PYTHONDONTWRITEBYTECODE is set, a venv without .pyc files compiles torch and transformers
# again in every stage. `make lock` re-resolves to the newest allowed versions: an upgrade is a commit
# of its own, with `make test` run on it.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)-$(subst =,_,$(TORCH))
BOOTSTRAP := "uv>=0.5,<1" "packaging>=23"

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lock run test repro check exps serve review report push pull dag clean-venv

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.lock pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH)" $(BOOTSTRAP)
	$(VENV)/bin/python tools/lock.py keep $(VENV)/keep.txt
	$(VENV)/bin/python -m uv pip sync -q --compile-bytecode --python $(VENV)/bin/python requirements.lock $(VENV)/keep.txt
	rm -f $(VENV)/.installed-* && touch $@

# Re-resolve pyproject.toml to the newest versions it allows and rewrite requirements.lock.
lock: | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(BOOTSTRAP)
	$(VENV)/bin/python tools/lock.py compile --upgrade

# Run the whole pipeline on the embedded default. Initialises git and DVC where needed.
run: $(STAMP)
	test -d .git || (git init -q && git add -A && git -c user.name=tuneline -c user.email=tuneline@localhost commit -qm "tuneline: initial")
	test -d .dvc || dvc init -q
	dvc repro
	@echo; $(VENV)/bin/tuneline verdict

repro: run

# Tests run on every core (pytest-xdist). The default pipeline's full `dvc repro` runs once per test
# run, in the background while other tests run, and each worker copies it (tests/conftest.py); the
# two-fresh-runs test runs a second one. `make test TEST_WORKERS=0` runs them in this process. The
# slowest are listed. Before pytest: the lock check and ruff (lint and format, pyproject.toml's rules).
TEST_WORKERS ?= auto
test: $(STAMP)
	$(VENV)/bin/python tools/lock.py check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --durations=20 $(PYTEST_ARGS)

# Serve the exported model on an OpenAI-compatible endpoint (127.0.0.1:8000).
serve: $(STAMP)
	$(VENV)/bin/tuneline serve

# Review generated records, rejects and eval samples in the browser (127.0.0.1:7860);
# decisions go to data/review/decisions.jsonl, and the next `make run` applies them.
review: $(STAMP)
	$(VENV)/bin/tuneline review

report: $(STAMP)
	$(VENV)/bin/tuneline report --rev $(or $(REV),main)

# All of params.yaml, as every stage checks it at start; the experiments in one compact table.
check: $(STAMP)
	$(VENV)/bin/tuneline check

exps: $(STAMP)
	$(VENV)/bin/tuneline exps

push: $(STAMP)
	dvc push

pull: $(STAMP)
	dvc pull

dag: $(STAMP)
	dvc dag

clean-venv:
	rm -rf $(VENV)
