# The two commands of the README. Each one sets up what it needs first (idempotent).
.PHONY: run test lint bench setup setup-test

setup:
	@bash scripts/bootstrap.sh

setup-test:
	@bash scripts/bootstrap.sh --test

run: setup
	.venv/bin/python -m gateway

test: setup-test
	.venv/bin/python -m ruff check .
	.venv/bin/python -m pytest -q -rs

bench: setup-test
	.venv/bin/python bench/run_all.py
