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

# Two pytest workers, whole files each (a module's fixtures run once): much of a test is
# single-threaded XLA compilation and Python, which the other worker's compute overlaps. Serially
# the suite took 36.7 min on CI's 2 cores. The slowest tests are listed at the end.
TEST_JOBS ?= 2
test: setup
	.venv/bin/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=15 $(PYTEST_ARGS)
