# Every target creates .venv and installs revjax (with test + bench extras) when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m revjax demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scan.py --size cpu
	$(BIN)/python benchmarks/numerics_cpu.py
	$(BIN)/python benchmarks/count_gemms.py
	$(BIN)/python benchmarks/numerics_depth.py --size cpu
	$(BIN)/python benchmarks/bench_activations.py
	$(BIN)/python benchmarks/bench_revnet.py
	$(BIN)/python benchmarks/bench_moonwalk.py --size cpu
	$(BIN)/python benchmarks/train_lm.py
	$(BIN)/python benchmarks/bench_transformer.py --size cpu
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
