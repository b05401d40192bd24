"""Frames from a camera, a video file, an RTSP / HTTP URL or a GStreamer pipeline, located one by one, with
optional evidence fusion over the last K located frames (numpy + OpenCV; no torch)."""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.preprocess import preprocess


def open_source(source: str):
    """cv2.VideoCapture for a camera index, a file / URL, or a GStreamer pipeline (contains '!'). Raises
    GeosurgeError naming the source when it cannot be opened."""
    import cv2

    if source.isdigit():
        cap = cv2.VideoCapture(int(source))
    elif "!" in source:
        cap = cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    else:
        cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        hint = " (is this OpenCV built with GStreamer? cv2.getBuildInformation())" if "!" in source else ""
        raise GeosurgeError(f"{source}: cannot open the video source{hint}")
    return cap


def locate_frames(loc, source: str, every: int = 1, max_frames: int | None = None, fuse: int = 1,
                  top_k: int = 5) -> Iterator[dict]:
    """Yield one record per located frame: ``frame`` (index in the source), ``fused_frames``, the prediction
    (``Localizer.predict_embedding``) and ``ms`` (preprocess + inference + cell search). Every ``every``-th frame
    is located, up to ``max_frames``; with ``fuse`` K the prediction uses the mean of the last K located frames'
    L2-normalised embeddings. The source is released when the iteration ends or is abandoned."""
    import cv2

    cap = open_source(source)
    window, n_frames, located = [], 0, 0
    try:
        while max_frames is None or located < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            n_frames += 1
            if (n_frames - 1) % max(1, every):
                continue
            t0 = time.perf_counter()
            x = preprocess(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), loc.spec)[None]
            emb = loc.embed(x)[0]
            window = (window + [emb / np.linalg.norm(emb)])[-max(1, fuse):]
            pred = loc.predict_embedding(np.mean(window, axis=0), top_k)
            located += 1
            yield {"frame": n_frames - 1, "fused_frames": len(window), **pred,
                   "ms": round((time.perf_counter() - t0) * 1e3, 2)}
    finally:
        cap.release()
