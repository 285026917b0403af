# The two quick-start commands: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# 2 CPU ranks here; every GPU of the node when CUDA is there. The demo's run dir is recreated each time.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	@NGPU=$$($(PY) -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0); \
	if [ "$$NGPU" -gt 0 ]; then RANKS=""; else RANKS="--num_gpus 2"; fi; \
	set -x; $(VENV)/bin/deepspeed $$RANKS --module prelora_ds.train --recipe recipes/demo.yaml --output_dir $(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
