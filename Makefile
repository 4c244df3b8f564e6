# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs the package, runs the demo pipeline on synthetic data
#   make test   -> creates .venv, installs the package, runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo serve test test-fast lint bench bench-gpu clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev,eval,demo,web]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aac-lightning demo $(DEMO_ARGS)

DEMO_WORKDIR ?= demo_workdir
serve: $(STAMP)
	$(VENV)/bin/aac-lightning serve $(DEMO_WORKDIR)/scst/averaged.ckpt $(DEMO_WORKDIR)/contrastive_finetune/best.ckpt \
		--audio-dir $(DEMO_WORKDIR)/data/CLOTHO_v2.1/clotho_audio_files/evaluation $(SERVE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check aac_lightning tests bench
	$(VENV)/bin/lint-imports

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ddp" $(PYTEST_ARGS)

bench: $(STAMP)
	for b in bench/bench_*.py; do [ "$$b" = bench/bench_gpu.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

bench-gpu: $(STAMP)
	$(PY) bench/bench_gpu.py $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
