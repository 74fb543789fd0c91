# Two commands do everything on a fresh machine; each sets up what it needs on first use.
#   make demo   the main job on the embedded default (tiny model, synthetic world, offline user
#               and rule judge; no network, no accelerator, no external data)
#   make test   the test suite
WORKDIR ?= runs/tiny

.PHONY: setup demo test bench
setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python -m tarl_jax.main --config=configs/tiny.py:demo --workdir=$(WORKDIR)

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
