# The two commands of the README. Each one sets up what it needs first (idempotent).
.PHONY: run run-library test lint bench setup setup-test

setup:
	@bash scripts/bootstrap.sh

setup-test:
	@bash scripts/bootstrap.sh --test

run: setup
	.venv/bin/python -m gateway

# Library mode beside the gateway (its own port; embedded PostgreSQL in LIBRARY_DATA_DIR unless
# LIBRARY_DATABASE_URL is set): make run-library LIBRARY_PORT=3005
LIBRARY_PORT ?= 3005
run-library: setup
	.venv/bin/python -m library serve --host 127.0.0.1 --port $(LIBRARY_PORT)

test: setup-test
	.venv/bin/python -m ruff check .
	.venv/bin/python -m pytest -q -rs

bench: setup-test
	.venv/bin/python bench/run_all.py
