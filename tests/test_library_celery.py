"""Celery mode: a real Redis (Debian's redis-server) and real ``celery -A library.worker worker`` processes
sharing the test PostgreSQL; bulk ingest through the CLI, a worker killed mid-run, nothing lost or redone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.assets import reference_nsfw
from tests.library_support import REPO, distinct_images, encode, library_env, photo
from tests.servers import free_port

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server not installed (apt redis-server)")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(REDIS),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_worker(env: dict[str, str], name: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "library.worker",
            "worker",
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--hostname",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the test kills the worker with its pool children
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """SIGTERM to the main process: Celery's warm shutdown lets the running task finish. SIGKILL to the
    whole group: the worker and its pool child die at once, mid-task."""
    if proc.poll() is None:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("the worker did not stop within 30 s of SIGTERM") from None


def counts(dsn: str, schema: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass(%s)", [f"{schema}.step"]).fetchone() == (None,):
            return {}
        return dict(conn.execute(f"SELECT state, count(*) FROM {schema}.step GROUP BY state").fetchall())


def cli_add(env: dict[str, str], root: Path) -> subprocess.CompletedProcess[str]:
    """``python -m library add --quiet ROOT`` as a user runs it; it must succeed."""
    added = subprocess.run(
        [sys.executable, "-m", "library", "add", "--quiet", str(root)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert added.returncode == 0, added.stderr
    return added


def test_bulk_ingest_on_two_celery_workers_survives_a_killed_worker(
    postgres_uri: str, redis_url: str, tmp_path: Path
) -> None:
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_BROKER_URL=redis_url, LIBRARY_CELERY_DRAIN_BATCH="3")
    schema = env["LIBRARY_SCHEMA_NAME"]
    root = tmp_path / "photos"
    root.mkdir()
    for n, data in enumerate(distinct_images(60, size=800)):
        (root / f"{n:03d}.png").write_bytes(data)
    # The schema must exist before the workers start polling it: the CLI creates it.
    added = cli_add(env, root)
    assert "queued for the Celery workers" in added.stdout
    assert counts(postgres_uri, schema) == {"pending": 60}  # nothing ran in the CLI process
    workers = [start_worker(env, f"w{n}", tmp_path / f"worker{n}.log") for n in range(2)]
    try:
        deadline = time.monotonic() + 180
        while counts(postgres_uri, schema).get("done", 0) < 10:
            assert time.monotonic() < deadline, (tmp_path / "worker0.log").read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        stop(workers[0], signal.SIGKILL)  # the whole worker, pool child included, mid-run
        workers[0] = start_worker(env, "w2", tmp_path / "worker2.log")
        while counts(postgres_uri, schema).get("done", 0) < 60:
            assert time.monotonic() < deadline, counts(postgres_uri, schema)
            time.sleep(0.2)
    finally:
        for worker in workers:
            stop(worker)
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        assert conn.execute(
            f"SELECT count(*), count(DISTINCT item_id) FROM {schema}.pdq WHERE kind = 'plain'"
        ).fetchone() == (60, 60)
        assert conn.execute(f"SELECT max(attempts) FROM {schema}.step").fetchone()[0] <= 2
    logs = [(tmp_path / f"worker{n}.log").read_text(errors="replace") for n in range(3)]
    # Both original workers took tasks.
    assert all("library.drain" in log for log in logs[:2]), logs[1][-2000:]
    assert "Traceback" not in logs[1] + logs[2]


def test_inference_runs_in_a_forked_celery_worker(postgres_uri: str, redis_url: str, tmp_path: Path) -> None:
    """The 'nsfw' step through the library's inference door inside a prefork pool child (the door's event
    loop thread and the model are made after the fork), with the scores the package computes."""
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_BROKER_URL=redis_url, LIBRARY_NSFW_MODEL="opennsfw")
    schema = env["LIBRARY_SCHEMA_NAME"]
    root = tmp_path / "photos"
    root.mkdir()
    names = ["retina", "astronaut", "coffee"]
    for name in names:
        (root / f"{name}.png").write_bytes(encode(photo(name)))
    cli_add(env, root)
    worker = start_worker(env, "w0", tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 180
        while counts(postgres_uri, schema).get("done", 0) < 2 * len(names):  # pdq and nsfw per image
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
            time.sleep(0.2)
    finally:
        stop(worker)  # warm shutdown: the door's loop thread must not hold the worker up
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        scores = dict(
            conn.execute(
                f"SELECT i.location, n.score FROM {schema}.nsfw AS n JOIN {schema}.item AS i ON i.id = n.item_id"
            ).fetchall()
        )
    assert len(scores) == len(names)
    for location, score in scores.items():
        assert score == pytest.approx(reference_nsfw((Path(location)).read_bytes()), abs=1e-5), location
    assert "Traceback" not in (tmp_path / "worker.log").read_text(errors="replace")
