# Every target sets up .venv itself (Python 3.11+, PyTorch pinned below, every other package at the version
# requirements-lock.txt gives), then does its job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= quick
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
LOCK := requirements-lock.txt
# Offline data: the CIFAR-10 JPEG archive where this project's machines keep it, beside the checkout
# (../shared/data), unless VKD_CIFAR10_ARCHIVE is set already; otherwise vkd looks in data/.
SHARED_ARCHIVE := $(wildcard $(CURDIR)/../shared/data/cifar10-jpeg.tar.gz)
ifneq ($(SHARED_ARCHIVE),)
export VKD_CIFAR10_ARCHIVE ?= $(abspath $(SHARED_ARCHIVE))
endif

.PHONY: setup test reproduce lab bench lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and f"vkd needs Python 3.11 or newer; $(PYTHON) is {sys.version.split()[0]} (choose another: make PYTHON=python3.11 ...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) $(TORCH_PIN)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup  ## unit tests + every notebook in the smoke profile
	$(PY) -m pytest

reproduce: setup  ## every notebook with PROFILE (quick: figures/ on a laptop CPU)
	$(PY) -m vkd reproduce --profile $(PROFILE)

LAB_ARGS ?=
lab: setup  ## JupyterLab on notebooks/ (open the .py files as notebooks); LAB_ARGS: more jupyter lab options
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

bench: setup  ## projector cost vs nn.Linear
	$(PY) -m vkd bench projectors

lock:  ## re-resolve the newest versions pyproject.toml allows (scratch venv, no constraints) into requirements-lock.txt
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(TORCH_PIN) && .venv-lock/bin/python -m pip install -q -e ".[dev]"
	{ grep '^#' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock
