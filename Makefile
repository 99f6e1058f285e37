# The two commands: `make demo` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
# pip prints a warning per package for the machine's file:// index entries; keep the log readable.
QUIET := 2>&1 | { grep -v "is ignored: it is neither" || true; }

.PHONY: install sysdeps demo test test-slow test-cluster test-gpu test-all bench bench-scale clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing torch + torchvision (pinned first, so nothing pulls another torch)"
	@$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 $(QUIET)
	@echo "installing mmpipe and its pinned dependencies"
	@$(PIP) install -q -c constraints.txt -e '.[test]' $(QUIET)
	@$(MAKE) --no-print-directory sysdeps
	@touch $(STAMP)

# System packages, where apt-get and root are at hand: WordNet for the text augmentation's synonym
# op (the other ops run without it); FFmpeg's shared libraries for torchcodec, which Hugging Face
# datasets decodes audio with (the interop tests open the store's shards and exports with it).
sysdeps:
	@if [ ! -d /usr/share/wordnet ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian wordnet-base (WordNet for synonym augmentation)"; \
	  (apt-get install -y -q wordnet-base >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null 2>&1)) \
	  || echo "warning: wordnet-base not installed; synonym augmentation will report itself skipped"; \
	fi
	@if ! ldconfig -p 2>/dev/null | grep -q libavcodec && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian FFmpeg libraries (torchcodec, for Hugging Face datasets' Audio)"; \
	  (apt-get install -y -q --no-install-recommends ffmpeg >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends ffmpeg >/dev/null 2>&1)) \
	  || echo "warning: FFmpeg not installed; Hugging Face datasets cannot decode the store's audio"; \
	fi

demo: install
	$(VENV)/bin/mmpipe demo

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=25

test-slow: install
	$(VENV)/bin/pytest -q -m slow

test-cluster: install
	$(VENV)/bin/pytest -q -m cluster tests/cluster tests/pipeline/test_serve.py

test-gpu: install
	$(VENV)/bin/pytest -q -m gpu

test-all: install
	$(VENV)/bin/pytest -q -m ""

bench: install
	@$(PIP) install -q -c constraints.txt -e '.[test,bench]' $(QUIET)
	$(PY) benchmarks/run_all.py

# Issue #27: 100k and 1M rows as fresh mmpipe processes (long; not part of test or bench).
# Other sizes: make bench-scale SCALE_ARGS="--sizes 2000,5000 --out scale.json"
bench-scale: install
	$(PY) benchmarks/bench_scale.py $(SCALE_ARGS)

clean:
	rm -rf store data benchmarks/_work .pytest_cache
