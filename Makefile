# Two commands on a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
# TORCH_SPEC pins torch before anything else resolves it (the default takes a CPU wheel on CPU machines);
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test bench lint demo train-default clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,lint]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark

lint: $(STAMP)
	$(PY) -m ruff check mfsr_fast kernels training tests benchmarks

demo: $(STAMP)
	$(PY) -m mfsr_fast.demo

# Regenerates the embedded default (mfsr_fast/weights/default) from ../shared/data/train: teacher, then student.
TRAIN_DATA ?= ../shared/data/train
train-default: $(STAMP)
	$(PY) -m training.teacher --preset tiny --data $(TRAIN_DATA) --output-dir runs/default-teacher
	$(PY) -m training.distill --preset tiny --data $(TRAIN_DATA) --teacher runs/default-teacher \
		--output-dir runs/default-student
	$(PY) -m training.export runs/default-student mfsr_fast/weights/default

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
