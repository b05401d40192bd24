"""Frame sources: a file ends normally; a live source that stalls is detected by the read timeout, reopened with
backoff, and reported as lost when it cannot recover; a flapping source is not retried forever."""
import http.server
import json
import itertools
import threading

import numpy as np
import pytest

from geosurge.runtime.sources import (FrameSource, SourceError, SourceKind, SourceOptions, StreamLost,
                                      source_kind)

N_FRAMES = 30


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import cv2

    path = tmp_path_factory.mktemp("clip") / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    if not vw.isOpened():  # OpenCV's built-in MJPEG/AVI writer; a build without videoio cannot write it
        pytest.skip("this OpenCV build cannot write an MJPG AVI")
    rng = np.random.default_rng(0)
    for _ in range(N_FRAMES):
        vw.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    vw.release()
    return path


def serve(data: bytes, share: float, stall: bool):
    """An HTTP 'camera' on a free port: each GET sends the first ``share`` of ``data`` and then stalls with the
    connection open (``stall``) or closes it."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "video/x-msvideo")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: int(len(data) * share)])
            self.wfile.flush()
            if stall:
                stop.wait(60)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, stop, f"http://127.0.0.1:{srv.server_address[1]}/cam.avi"


def test_kinds():
    assert source_kind("0") is SourceKind.CAMERA
    assert source_kind("rtsp://cam/stream") is SourceKind.NETWORK and source_kind("HTTP://x/y.mjpg").live
    assert source_kind("v4l2src ! videoconvert ! appsink") is SourceKind.GSTREAMER
    assert source_kind("clip.mp4") is SourceKind.FILE and not SourceKind.FILE.live


def test_file_ends_normally(clip):
    with FrameSource(clip) as src:
        frames = list(src)
    assert len(frames) == N_FRAMES and [i for i, _ in frames] == list(range(N_FRAMES))
    assert frames[0][1].shape == (48, 64, 3) and frames[0][1].dtype == np.uint8


def test_missing_or_refused_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="cannot open the video source"):
        FrameSource(tmp_path / "missing.mp4")
    with pytest.raises(SourceError, match="cannot open"):
        FrameSource("http://127.0.0.1:9/none.avi", SourceOptions(open_timeout_s=1, reconnects=0))


def test_stalled_stream_is_reopened_then_reported_lost(clip):
    srv, stop, url = serve(clip.read_bytes(), 0.4, stall=True)
    log, waits = [], []
    try:
        src = FrameSource(url, SourceOptions(read_timeout_s=1.0, reconnects=2, backoff_s=0.05), log=log.append,
                          sleep=lambda s: waits.append(s))
        got = []
        with pytest.raises(StreamLost, match=r"stream lost after \d+ frame\(s\)") as e:
            for i, _ in src:
                got.append(i)
    finally:
        stop.set()
        srv.shutdown()
    # each connection delivers the frames in the first 40% of the file, then stalls: the first one and both reconnects
    per_connection = len(got) // 3
    assert per_connection > 0 and len(got) == 3 * per_connection and e.value.frames == len(got)
    assert got == list(range(len(got)))  # frame indices continue across reconnects
    assert waits == [0.05, 0.1]  # exponential backoff, one wait per attempt
    assert src.reconnects == 2 and sum("reconnect 1/2" in m for m in log) == 1
    # "reconnecting" only for the outages that were retried: the last one, with no attempt left, is StreamLost's
    assert sum(m.endswith("; reconnecting") for m in log) == 2
    assert src._cap is None  # released


def test_a_source_that_recovers_steadily_gets_a_fresh_budget(clip):
    # every connection delivers the whole clip and closes: with stable_s=0 each drop is a new outage, so the stream
    # keeps going (a camera that reboots now and then); frames keep their running index
    srv, stop, url = serve(clip.read_bytes(), 1.0, stall=False)
    try:
        with FrameSource(url, SourceOptions(read_timeout_s=2.0, reconnects=1, backoff_s=0.0, stable_s=0.0),
                         sleep=lambda s: None) as src:
            got = [i for i, _ in itertools.islice(src, 3 * N_FRAMES + 5)]
            assert src.reconnects >= 3
    finally:
        stop.set()
        srv.shutdown()
    assert got == list(range(3 * N_FRAMES + 5))


def test_options_are_validated():
    from geosurge.errors import GeosurgeError

    with pytest.raises(GeosurgeError):
        SourceOptions(read_timeout_s=0)
    assert SourceOptions(backoff_s=0.5, max_backoff_s=3).backoff(5) == 3


def test_locate_reports_a_lost_stream_and_exits_1(tmp_path, clip, default_hierarchy):
    from geosurge.export.bundle import write_bundle
    from geosurge.export.source import load_model
    from geosurge.samples import sample_photo_paths

    from .conftest import run_cli

    model, source = load_model("tiny", seed=0, hierarchy=default_hierarchy)
    b = write_bundle(tmp_path / "b", model, source, sample_photo_paths()[:2], log=lambda m: None)
    srv, stop, url = serve(clip.read_bytes(), 0.4, stall=True)
    try:
        r = run_cli("geosurge-run", "locate", b, "--source", url, "--read-timeout", "1", "--reconnects", "1",
                    "--backoff", "0.05", "--json", timeout=120)
    finally:
        stop.set()
        srv.shutdown()
    assert r.returncode == 1, r.stderr
    frames = [json.loads(line)["frame"] for line in r.stdout.splitlines()]
    assert frames and frames == list(range(len(frames))) and len(frames) % 2 == 0  # first connection + 1 reconnect
    assert f"stream lost after {len(frames)} frame(s)" in r.stderr and "reconnect 1/1" in r.stderr
    assert f"({len(frames)} located)" not in r.stderr  # every frame read was located: the count is said once
    assert "no frame for 1s" in r.stderr  # reported as a stall, within the user's read timeout
    # the end of a video file stays a normal end
    r = run_cli("geosurge-run", "locate", b, "--source", clip, "--json", timeout=120)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == N_FRAMES
