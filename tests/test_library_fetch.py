"""URL ingest against a real loopback HTTP server with hostile routes, and the network policy."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ai_service.imaging import ImageError
from library.fetch import FetchError, FetchTooLargeError, NetworkPolicy, fetch_image_bytes
from library.ingest import IngestTooLargeError
from library.service import Library
from library.settings import LibrarySettings
from tests.library_support import ImageServer, encode, library_env, photo, settings_from


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        srv.files["/cat.png"] = encode(photo("chelsea"))
        yield srv


SETTINGS = LibrarySettings(max_image_bytes=2 * 1024 * 1024, fetch_timeout_s=3, fetch_max_redirects=3)


def test_plain_fetch_and_one_redirect(server: ImageServer) -> None:
    assert fetch_image_bytes(server.url("/cat.png"), SETTINGS).data == server.files["/cat.png"]
    hop = fetch_image_bytes(server.url("/redirect?to=/cat.png"), SETTINGS)
    assert hop.data == server.files["/cat.png"] and hop.url.endswith("/cat.png")


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/404", FetchError, "HTTP 404"),
        ("/loop", FetchError, "more than 3 redirects"),
        ("/endless", FetchTooLargeError, "larger than"),
        ("/short", FetchError, "download failed"),
        ("/redirect?to=http://169.254.169.254/latest/meta-data/", FetchError, "denied network"),
        ("/redirect?to=ftp://127.0.0.1/x.jpg", FetchError, "only http and https"),
    ],
)
def test_hostile_urls_fail_with_a_reason(server: ImageServer, path: str, error: type[Exception], message: str) -> None:
    started = time.monotonic()
    with pytest.raises(error, match=message):
        fetch_image_bytes(server.url(path), SETTINGS)
    assert time.monotonic() - started < 10


def test_the_checked_address_is_connected_to_and_the_name_kept_in_host(server: ImageServer) -> None:
    """DNS is resolved once: the request goes to the address that was checked (127.0.0.1), while the
    Host header (and TLS SNI) carry the name, so virtual hosts still work."""
    port = server.base.rsplit(":", 1)[1]
    server.hosts.clear()
    fetched = fetch_image_bytes(f"http://localhost:{port}/cat.png", SETTINGS)
    assert fetched.data == server.files["/cat.png"] and fetched.url == f"http://localhost:{port}/cat.png"
    assert server.hosts == [f"localhost:{port}"]


def test_a_dripping_body_hits_the_deadline(server: ImageServer) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match="longer than 3s"):
        fetch_image_bytes(server.url("/drip"), SETTINGS)
    assert time.monotonic() - started < 6


def test_redirect_loop_is_bounded(server: ImageServer) -> None:
    before = server.hits.get("/loop", 0)
    with pytest.raises(FetchError):
        fetch_image_bytes(server.url("/loop"), SETTINGS)
    assert server.hits["/loop"] - before == 4  # the first request and three redirects


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://0.0.0.0:80/",
        "http://[fe80::1]/",
    ],
)
def test_metadata_and_link_local_addresses_are_refused_by_default(url: str) -> None:
    with pytest.raises(FetchError, match="denied network"):
        fetch_image_bytes(url, SETTINGS)


def test_policy_is_configurable_and_checks_resolved_names(server: ImageServer) -> None:
    port = server.base.rsplit(":", 1)[1]
    no_loopback = LibrarySettings(fetch_deny_networks="127.0.0.0/8,::1/128")
    with pytest.raises(FetchError, match="denied network"):
        fetch_image_bytes(f"http://localhost:{port}/cat.png", no_loopback)  # the name's address is checked
    only_lan = LibrarySettings(fetch_allow_networks="192.168.0.0/16")
    with pytest.raises(FetchError, match="not in LIBRARY_FETCH_ALLOW_NETWORKS"):
        fetch_image_bytes(server.url("/cat.png"), only_lan)
    allowed = LibrarySettings(fetch_allow_networks="127.0.0.0/8")
    assert fetch_image_bytes(f"http://localhost:{port}/cat.png", allowed).data == server.files["/cat.png"]
    assert NetworkPolicy(["10.0.0.0/8"], []).refusal(ipaddress.ip_address("10.1.2.3")) is None
    with pytest.raises(ValueError):
        LibrarySettings(fetch_deny_networks="not-a-network")


def test_unknown_host_and_bad_urls(server: ImageServer) -> None:
    with pytest.raises(FetchError, match="cannot resolve"):
        fetch_image_bytes("http://no-such-host.invalid/x.jpg", SETTINGS)
    for bad in ("not a url", "file:///etc/passwd", "http:///nohost"):
        with pytest.raises(FetchError):
            fetch_image_bytes(bad, SETTINGS)


def test_url_ingest_sniffs_content_and_limits(server: ImageServer, postgres_uri: str, tmp_path: Path) -> None:
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_MAX_IMAGE_BYTES="2000000")
    library = Library(settings_from(env))
    try:
        with pytest.raises(ImageError):
            library.ingestor.add_url(server.url("/page.jpg"))  # HTML named .jpg, served as image/jpeg
        with pytest.raises(ImageError):
            library.ingestor.add_url(server.url("/truncated.jpg"))
        with pytest.raises(IngestTooLargeError):
            library.ingestor.add_url(server.url("/bomb.png"))  # tiny file, 900 megapixels in its header
        with pytest.raises(FetchTooLargeError):
            library.ingestor.add_url(server.url("/endless"))
        added = library.ingestor.add_url(server.url("/cat.png"), remark="a cat", meta={"k": [1, 2]})
        assert added.created
        with library.db.conn() as conn:
            assert conn.execute("SELECT count(*) FROM item").fetchone() == (1,)
            row = conn.execute("SELECT source, location, remark, meta FROM item").fetchone()
        assert row == ("url", server.url("/cat.png"), "a cat", {"k": [1, 2]})
        # Stored as a blob under the data folder, named by content.
        assert (tmp_path / "data" / "blobs" / added.sha256[:2] / added.sha256).read_bytes() == server.files["/cat.png"]
    finally:
        library.close()
