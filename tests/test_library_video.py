"""Videos in the library: keyframes with times, found again from a screenshot (status bar, JPEG), a
2-second clip at another resolution and container, and a GIF; through the library, the native API and
/imgsmlr/search; hostile videos fail only themselves with a reason.

The videos are made here from real photos (scikit-image's samples) with PyAV: pans, zooms and cuts at
known times, so every query has a true time."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from library import items
from library.service import Library
from tests.library_support import ImageServer, distinct_images, library_env, library_server, settings_from
from tests.servers import free_port
from tests.video_support import Shot, encode_gif, encode_video, photos, render, screenshot

FPS = 15
SIZE = (480, 320)
# Video A: four shots, cuts at 6, 11 and 15 s. Video B: other photos, so a query must pick the right one.
SHOTS_A = [("astronaut", 6, "pan"), ("rocket", 5, "zoom"), ("coffee", 4, "still"), ("chelsea", 6, "pan")]
SHOTS_B = [("immunohistochemistry", 5, "pan"), ("hubble_deep_field", 5, "zoom")]


def _frames(shots: list[tuple[str, float, str]]) -> list[np.ndarray]:
    import skimage.data

    found = photos()
    pictures = {name: found.get(name) for name, _, _ in shots}
    for name, value in pictures.items():
        if value is None:
            pictures[name] = np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
    return render([Shot(pictures[n], s, m) for n, s, m in shots], FPS, SIZE)


@pytest.fixture(scope="module")
def footage() -> dict[str, object]:
    frames_a, frames_b = _frames(SHOTS_A), _frames(SHOTS_B)
    return {
        "frames_a": frames_a,
        "a.mp4": encode_video(frames_a, FPS),
        "b.mkv": encode_video(frames_b, FPS, container="matroska"),
    }


@pytest.fixture
def env(postgres_uri: str, tmp_path: Path) -> dict[str, str]:
    return library_env(postgres_uri, tmp_path / "data")


@pytest.fixture
def library(env: dict[str, str]) -> Iterator[Library]:
    lib = Library(settings_from(env))
    try:
        yield lib
    finally:
        lib.close()


def steps_of(library: Library, item_id: int) -> dict[str, dict[str, object]]:
    with library.db.conn() as conn:
        return {s["name"]: s for s in items.step_states(conn, item_id)}


def clip_of(frames: list[np.ndarray], start: float, seconds: float, size: tuple[int, int]) -> list[np.ndarray]:
    from PIL import Image

    chosen = frames[round(start * FPS) : round((start + seconds) * FPS)]
    return [np.asarray(Image.fromarray(f).resize(size)) for f in chosen]


@pytest.fixture
def indexed(library: Library, footage: dict[str, object], tmp_path: Path) -> dict[str, int]:
    """Video A added by path (MP4), video B by upload (Matroska), and an unrelated image; pipeline run."""
    path = tmp_path / "a.mp4"
    path.write_bytes(footage["a.mp4"])  # type: ignore[arg-type]
    ids = {
        "a": library.ingestor.add_path(path).item_id,
        "b": library.ingestor.add_bytes(footage["b.mkv"], source="upload", location="upload").item_id,  # type: ignore[arg-type]
        "image": library.ingestor.add_bytes(distinct_images(1)[0], source="upload", location="upload").item_id,
    }
    library.pipeline.run_until_idle()
    for name in ("a", "b"):
        assert steps_of(library, ids[name]) == {"video": steps_of(library, ids[name])["video"]}
        assert steps_of(library, ids[name])["video"]["state"] == "done"
    return ids


def test_video_items_get_keyframes_with_times(library: Library, indexed: dict[str, int]) -> None:
    with library.db.conn() as conn:
        a = items.get_item(conn, indexed["a"])
        times = [
            r[0]
            for r in conn.execute("SELECT DISTINCT t FROM video_frame WHERE item_id = %s ORDER BY t", [indexed["a"]])
        ]
    assert a is not None and a.media == "video" and a.format == "mp4" and (a.width, a.height) == SIZE
    assert a.duration_s == pytest.approx(21, abs=0.2)
    assert times[0] == 0.0 and times[-1] > 19
    gaps = np.diff(times)
    # At least one every N seconds (give or take one sampling step).
    assert gaps.max() <= library.settings.video_keyframe_interval_s + 1 / library.settings.video_sample_fps + 0.05
    for cut in (6.0, 11.0, 15.0):  # a keyframe right after every cut
        assert any(cut <= t < cut + 0.3 for t in times), (cut, times)


@pytest.mark.parametrize("t", [1.2, 4.4, 7.3, 12.5, 17.8])
def test_a_screenshot_finds_the_video_and_the_time(
    library: Library, indexed: dict[str, int], footage: dict[str, object], t: float
) -> None:
    shot = screenshot(footage["frames_a"][round(t * FPS)])  # type: ignore[index]
    _, hits = library.search_image(shot, "pdq", None, 5)
    assert hits and hits[0].item.id == indexed["a"], [(h.item.id, h.distance) for h in hits]
    assert hits[0].t is not None and abs(hits[0].t - t) <= 2, hits[0]
    assert indexed["b"] not in [h.item.id for h in hits]


def test_a_clip_at_another_resolution_votes_for_its_span(
    library: Library, indexed: dict[str, int], footage: dict[str, object]
) -> None:
    frames = clip_of(footage["frames_a"], 16.0, 2.0, (320, 214))  # type: ignore[arg-type]
    query = encode_video(frames, FPS, container="webm", codec="libvpx-vp9")
    _, hits = library.search_image(query, "pdq", None, 5)
    assert [h.item.id for h in hits] == [indexed["a"]]
    assert hits[0].t_start is not None and hits[0].t_end is not None
    assert abs(hits[0].t_start - 16.0) <= 2 and abs(hits[0].t_end - 18.0) <= 2, hits[0]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_a_gif_votes_for_its_span(
    library: Library, indexed: dict[str, int], footage: dict[str, object], fmt: str
) -> None:
    frames = clip_of(footage["frames_a"], 2.0, 3.0, (240, 160))  # type: ignore[arg-type]
    _, hits = library.search_image(encode_gif(frames[::3], FPS // 3, fmt), "pdq", None, 5)
    assert hits and hits[0].item.id == indexed["a"]
    assert abs(hits[0].t_start - 2.0) <= 2 and abs(hits[0].t_end - 5.0) <= 2, hits[0]  # type: ignore[operator]


def test_an_animated_gif_is_a_video_item(library: Library, footage: dict[str, object]) -> None:
    frames = clip_of(footage["frames_a"], 14.0, 4.0, (240, 160))  # type: ignore[arg-type]
    gif = encode_gif(frames[::3], FPS // 3)
    added = library.ingestor.add_bytes(gif, source="upload", location="upload")
    library.pipeline.run_until_idle()
    assert steps_of(library, added.item_id)["video"]["state"] == "done"
    shot = screenshot(footage["frames_a"][round(16.5 * FPS)])  # type: ignore[index]  (2.5 s into the GIF)
    _, hits = library.search_image(shot, "pdq", None, 5)
    assert hits[0].item.id == added.item_id and hits[0].item.format == "GIF"
    assert abs(hits[0].t - 2.5) <= 2  # type: ignore[operator]
    # Its frame at a time (what the page shows): 2.5 s into the GIF is the video's 16.5 s.
    from library import pdq, video

    shown = pdq.hash_rgb(video.frame_at(gif, library.settings, 2.5)).hash_hex
    truth = pdq.hash_rgb(np.ascontiguousarray(frames[round(2.5 * FPS)])).hash_hex
    assert pdq.hamming(shown, truth) <= 31


# ---- hostile videos ---------------------------------------------------------------------------------------


def _patch_box(data: bytes, box: bytes, offset: int, fmt: str, value: int) -> bytes:
    at = data.index(box) + 4 + offset
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt) :]


def test_hostile_videos_fail_only_themselves(library: Library, footage: dict[str, object], tmp_path: Path) -> None:
    from ai_service.imaging import ImageError
    from library.ingest import IngestTooLargeError

    good: bytes = footage["a.mp4"]  # type: ignore[assignment]
    # A truncated file (the index box 'moov' that MP4 writes last is cut off): refused with a reason.
    with pytest.raises(ImageError, match="video"):
        library.ingestor.add_bytes(good[: len(good) // 2], source="upload", location="upload")
    # A Matroska file declaring a duration of 31 years (its Segment Info Duration, 1e12 ms): refused before
    # anything is decoded. (FFmpeg recomputes MP4 durations from the sample tables, so MP4 cannot lie so.)
    mkv: bytes = footage["b.mkv"]  # type: ignore[assignment]
    at = mkv.index(b"\x44\x89\x88") + 3  # EBML element Duration, an 8-byte float
    lying = mkv[:at] + struct.pack(">d", 1e12) + mkv[at + 8 :]
    with pytest.raises(ImageError, match="LIBRARY_VIDEO_MAX_DURATION_S"):
        library.ingestor.add_bytes(lying, source="upload", location="upload")
    # An animated GIF declaring a 65535 x 65535 screen: refused from its header (as too large).
    gif = bytearray(encode_gif(_frames([("coffee", 1, "still")])[:2], 2))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    with pytest.raises((ImageError, IngestTooLargeError), match="pixels"):
        library.ingestor.add_bytes(bytes(gif), source="upload", location="upload")
    # Not a video at all behind a video's magic bytes.
    with pytest.raises(ImageError):
        library.ingestor.add_bytes(b"\x00\x00\x00\x20ftypisom" + b"\x00" * 200, source="upload", location="upload")


def test_decode_limits_fail_the_step_with_the_reason(
    postgres_uri: str, footage: dict[str, object], tmp_path: Path
) -> None:
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_VIDEO_MAX_FRAMES="40", LIBRARY_VIDEO_MAX_PIXELS="200000")
    lib = Library(settings_from(env))
    try:
        from ai_service.imaging import ImageError

        big = encode_video([np.zeros((400, 640, 3), np.uint8)] * 3, FPS)  # 256 000 pixels a frame
        with pytest.raises(ImageError, match="LIBRARY_VIDEO_MAX_PIXELS"):
            lib.ingestor.add_bytes(big, source="upload", location="upload")
        long_one = lib.ingestor.add_bytes(footage["a.mp4"], source="upload", location="upload")  # type: ignore[arg-type]
        fine = lib.ingestor.add_bytes(distinct_images(1)[0], source="upload", location="upload")
        lib.pipeline.run_until_idle()
        step = steps_of(lib, long_one.item_id)["video"]
        assert step["state"] == "failed" and "LIBRARY_VIDEO_MAX_FRAMES" in str(step["reason"])
        assert step["attempts"] == 1  # permanent: not retried
        assert steps_of(lib, fine.item_id)["pdq"]["state"] == "done"
        with lib.db.conn() as conn:
            assert conn.execute(
                "SELECT count(*) FROM video_frame WHERE item_id = %s", [long_one.item_id]
            ).fetchone() == (0,)
    finally:
        lib.close()


def test_a_stream_without_a_declared_end_stops_at_the_duration_limit(
    postgres_uri: str, footage: dict[str, object], tmp_path: Path
) -> None:
    """Matroska without its Duration element (overwritten by an EBML Void of the same size), as a live or
    endless stream would be: accepted, then its step fails at LIBRARY_VIDEO_MAX_DURATION_S."""
    mkv: bytes = footage["b.mkv"]  # type: ignore[assignment]
    at = mkv.index(b"\x44\x89\x88")
    endless = mkv[:at] + b"\xec\x89" + b"\x00" * 9 + mkv[at + 11 :]
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_VIDEO_MAX_DURATION_S="4")
    lib = Library(settings_from(env))
    try:
        added = lib.ingestor.add_bytes(endless, source="upload", location="upload")
        with lib.db.conn() as conn:
            item = items.get_item(conn, added.item_id)
        assert item is not None and item.duration_s is None
        lib.pipeline.run_until_idle()
        step = steps_of(lib, added.item_id)["video"]
        assert step["state"] == "failed" and "goes on past 4 s" in str(step["reason"]), step
    finally:
        lib.close()


# ---- over HTTP ----------------------------------------------------------------------------------------------


def test_native_api_and_imgsmlr_return_video_times(
    postgres_uri: str, tmp_path: Path, footage: dict[str, object]
) -> None:
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_MAX_IMAGE_BYTES="20000000")
    frames_a = footage["frames_a"]
    clip = encode_video(clip_of(frames_a, 8.0, 2.0, (320, 214)), FPS)  # type: ignore[arg-type]
    port = free_port()
    with (
        ImageServer() as srv,
        library_server(env, tmp_path / "server.log", port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as api,
    ):
        srv.files["/a.mp4"] = footage["a.mp4"]  # type: ignore[assignment]
        srv.files["/shot.jpg"] = screenshot(frames_a[round(19.0 * FPS)])  # type: ignore[index]
        srv.files["/clip.mp4"] = clip
        added = api.post("/imgsmlr/mgr/add", json={"url": srv.url("/a.mp4"), "dataId": "a"}).json()
        assert added["code"] == 200, added
        video_id = added["data"]["id"]
        for _ in range(240):  # the server's workers index it
            steps = api.get(f"/api/items/{video_id}").json()["steps"]
            if steps[0]["state"] != "pending" and steps[0]["state"] != "running":
                break
            import time

            time.sleep(0.5)
        assert steps == [{**steps[0], "name": "video", "state": "done"}]
        found = api.post("/imgsmlr/search", json={"url": srv.url("/shot.jpg"), "matchType": "pdq"}).json()
        assert found["code"] == 200, found
        image = found["data"]["images"][0]
        assert image["id"] == video_id and image["dataId"] == "a" and abs(image["t"] - 19.0) <= 2
        assert "tStart" not in image
        spans = api.post("/imgsmlr/search", json={"url": srv.url("/clip.mp4")}).json()
        hit = spans["data"]["images"][0]
        assert hit["id"] == video_id and abs(hit["tStart"] - 8.0) <= 2 and abs(hit["tEnd"] - 10.0) <= 2
        assert "t" not in hit
        native = api.post("/api/search/image", files={"file": ("clip.mp4", clip)}, data={"match_type": "pdq"})
        assert native.status_code == 200, native.text
        first = native.json()["results"][0]
        assert first["id"] == video_id and first["media"] == "video" and abs(first["t_start"] - 8.0) <= 2
        # The video is shown as the JPEG of the frame at t (the page's thumbnails).
        frame = api.get(f"/api/items/{video_id}/image", params={"t": 19.0})
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
        from library import pdq

        seen = pdq.hash_image(frame.content, max_pixels=10**8).plain.hash_hex
        truth = pdq.hash_rgb(np.ascontiguousarray(frames_a[round(19.0 * FPS)])).hash_hex  # type: ignore[index]
        assert pdq.hamming(seen, truth) <= 31
        truncated = api.post("/api/items", files={"file": ("x.mp4", footage["a.mp4"][:5000])})  # type: ignore[index]
        assert truncated.status_code == 415, truncated.text
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def test_a_video_showing_a_blocklisted_image_is_flagged(library: Library, footage: dict[str, object]) -> None:
    from PIL import Image

    from tests.library_support import encode

    still = Image.fromarray(footage["frames_a"][round(13.0 * FPS)])  # type: ignore[index]
    library.import_blocklist_images([("known", encode(still))])
    added = library.ingestor.add_bytes(footage["a.mp4"], source="upload", location="upload")  # type: ignore[arg-type]
    library.pipeline.run_until_idle()
    with library.db.conn() as conn:
        assert conn.execute("SELECT item_id FROM block_hit").fetchall() == [(added.item_id,)]
    _, hits = library.search_image(screenshot(footage["frames_a"][round(4.0 * FPS)]), "pdq", None, 5)  # type: ignore[index]
    assert hits == []  # a blocked video is never a result
    # A video already in the library is flagged when a matching entry is imported later.
    other = library.ingestor.add_bytes(footage["b.mkv"], source="upload", location="upload")  # type: ignore[arg-type]
    library.pipeline.run_until_idle()
    later = Image.fromarray(_frames(SHOTS_B)[round(2.0 * FPS)])
    assert library.import_blocklist_images([("later", encode(later))]).items_flagged == 1
    with library.db.conn() as conn:
        assert {r[0] for r in conn.execute("SELECT item_id FROM block_hit")} == {added.item_id, other.item_id}


def test_video_clip_plumbing_with_a_tiny_random_model(
    postgres_uri: str,
    tmp_path: Path,
    clip_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    footage: dict[str, object],
) -> None:
    """Random weights: this checks the wiring (a CLIP vector per keyframe, CLIP search of videos with the
    time of the frame), never search quality."""
    monkeypatch.setenv("AI_SERVICE_MODEL_DIR", str(clip_model_dir))
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_CLIP_MODEL="test-cn-clip-tiny")
    lib = Library(settings_from(env))
    try:
        added = lib.ingestor.add_bytes(footage["b.mkv"], source="upload", location="upload")  # type: ignore[arg-type]
        lib.pipeline.run_until_idle()
        assert steps_of(lib, added.item_id)["video"]["state"] == "done"
        with lib.db.conn() as conn:
            frames = conn.execute(
                "SELECT count(DISTINCT n) FROM video_frame WHERE item_id = %s", [added.item_id]
            ).fetchone()
            vectors = conn.execute(
                "SELECT count(*), min(model) FROM video_frame_clip WHERE item_id = %s", [added.item_id]
            ).fetchone()
        assert frames and vectors and frames[0] > 3 and vectors == (frames[0], "test-cn-clip-tiny")
        _, hits = lib.search_image(screenshot(footage["frames_a"][0]), "clip", 2.0, 5)  # type: ignore[index]
        assert [h.item.id for h in hits] == [added.item_id] and hits[0].t is not None
    finally:
        lib.close()
