"""Frames from a camera, a video file, an RTSP / HTTP URL or a GStreamer pipeline, located one by one, with
optional evidence fusion over the last K located frames (numpy + OpenCV; no torch). Opening, stall detection and
reconnection are :mod:`geosurge.runtime.sources`'."""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np

from geosurge.preprocess import preprocess

from .sources import FrameSource, SourceOptions


def locate_frames(loc, source: str, every: int = 1, max_frames: int | None = None, fuse: int = 1,
                  top_k: int = 5, options: SourceOptions = SourceOptions(),
                  log: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Yield one record per located frame: ``frame`` (index in the source, counting across reconnects),
    ``fused_frames``, the prediction (``Localizer.predict_embedding``) and ``ms`` (preprocess + inference + cell
    search). Every ``every``-th frame is located, up to ``max_frames``; with ``fuse`` K the prediction uses the mean
    of the last K located frames' L2-normalised embeddings.

    Raises ``SourceError`` when the source cannot be opened and ``StreamLost`` when a live source stalls or drops and
    cannot be reopened within ``options`` (read timeout, reconnect attempts with backoff); the end of a video file
    ends the iteration normally. The source is released when the iteration ends or is abandoned."""
    import cv2

    window: list[np.ndarray] = []
    located = 0
    with FrameSource(source, options, log=log) as frames:
        for index, frame in frames:
            if max_frames is not None and located >= max_frames:
                return
            if index % max(1, every):
                continue
            t0 = time.perf_counter()
            x = preprocess(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), loc.spec)[None]
            emb = loc.embed(x)[0]
            window = (window + [emb / np.linalg.norm(emb)])[-max(1, fuse):]
            pred = loc.predict_embedding(np.mean(window, axis=0), top_k)
            located += 1
            yield {"frame": index, "fused_frames": len(window), **pred,
                   "ms": round((time.perf_counter() - t0) * 1e3, 2)}
