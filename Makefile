# The two commands of the README. Both set up what is missing first (idempotent).
.PHONY: setup run test test-chaos bench lint

export PATH := /usr/sbin:$(PATH)

setup:
	@bash deploy/dev/setup.sh

# Local broker + database + 20-machine simulated fleet + gateway, with a live summary. Ctrl-C stops all.
run: setup
	@.venv/bin/python deploy/dev/run_local.py $(ARGS)

lint:
	.venv/bin/ruff check gateway devices tests bench deploy
	.venv/bin/mypy

# The whole suite against real servers started by the fixtures, the docstring examples (pyproject.toml's
# --doctest-modules) and ruff and mypy.
test: setup lint
	.venv/bin/python -m pytest -q -m "not chaos" -p no:cacheprovider

test-chaos: setup
	.venv/bin/python -m pytest -q -m chaos -p no:cacheprovider

# The benches; the bench extra adds River (bench/detectors.py's HalfSpaceTrees baseline).
bench: setup
	@.venv/bin/python -m pip install -q -e ".[bench]" >>.venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }
	.venv/bin/python bench/run.py
