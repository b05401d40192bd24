"""Frame sources for ``geosurge-run locate --source``: camera index, video file, RTSP / HTTP URL, GStreamer pipeline.

A *file* ends: reading past its last frame is a normal end. A *live* source (a camera index, a network URL, a
GStreamer pipeline) has no normal end: a read that fails or stalls means the source was lost. It is then reopened with
exponential backoff, up to ``SourceOptions.reconnects`` attempts in a row; when none brings a frame back,
:class:`StreamLost` is raised ("stream lost after N frames"), which the command line turns into a non-zero exit.

Stalls are detected by OpenCV's own capture timeouts (``CAP_PROP_OPEN_TIMEOUT_MSEC`` / ``CAP_PROP_READ_TIMEOUT_MSEC``,
passed when the capture is opened; honoured by the FFmpeg backend — files, HTTP, RTSP — and the GStreamer backend):
without them a network camera that stops sending blocks for FFmpeg's default 30 s and then looks like a normal end.
Numpy + OpenCV only (torch-free).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from geosurge.errors import GeosurgeError


class SourceKind(str, Enum):
    CAMERA = "camera"  # a device index: /dev/videoN, a USB / CSI camera through V4L2
    FILE = "file"  # a local video file: it ends
    NETWORK = "network"  # rtsp://, rtsps://, http(s)://, rtmp://, udp://, tcp://, srt://
    GSTREAMER = "gstreamer"  # an OpenCV GStreamer pipeline ending in appsink (anything with '!')

    @property
    def live(self) -> bool:
        return self is not SourceKind.FILE


NETWORK_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://", "srt://")


class SourceError(GeosurgeError):
    """A source that cannot be opened at all (exit 2: a bad argument, not a lost stream)."""


class StreamLost(GeosurgeError):
    """A live source stopped delivering frames and could not be reopened."""

    def __init__(self, source: str, frames: int, attempts: int, reason: str):
        self.frames, self.attempts = frames, attempts
        super().__init__(f"{source}: stream lost after {frames} frame(s) ({reason}; gave up after {attempts} "
                         "reconnect attempt(s))")


@dataclass(frozen=True)
class SourceOptions:
    """How a source is opened and watched.

    ``open_timeout_s``: how long opening (connecting, the RTSP handshake) may take. ``read_timeout_s``: how long one
    frame may take before the source counts as stalled (a camera at 1 fps needs more than 1 s). ``reconnects``: reopen
    attempts per outage (0: give up at once); attempt k waits ``backoff_s * 2**k`` seconds, capped at
    ``max_backoff_s``. An outage ends once the source has delivered frames for ``stable_s`` seconds since the last
    reconnect; a source that drops again sooner (a flapping camera, a link that stalls after every reconnect) keeps
    spending the same outage's attempts, so it is given up instead of being retried forever."""

    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    reconnects: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    stable_s: float = 30.0

    def __post_init__(self):
        if self.open_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise GeosurgeError("source timeouts must be > 0 seconds")
        if self.reconnects < 0 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.stable_s < 0:
            raise GeosurgeError("reconnect attempts, backoff and stable time must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (0-based)."""
        return min(self.max_backoff_s, self.backoff_s * (2 ** attempt))


def source_kind(source: str) -> SourceKind:
    s = str(source).strip()
    if s.isdigit():
        return SourceKind.CAMERA
    if "!" in s:
        return SourceKind.GSTREAMER
    if s.lower().startswith(NETWORK_SCHEMES):
        return SourceKind.NETWORK
    return SourceKind.FILE


def open_capture(source: str, options: SourceOptions = SourceOptions()):
    """A ``cv2.VideoCapture`` for ``source`` with the open / read timeouts set, or None when it does not open."""
    import cv2

    kind = source_kind(source)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(options.open_timeout_s * 1000),
              cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(options.read_timeout_s * 1000)]
    if kind is SourceKind.CAMERA:
        cap = cv2.VideoCapture(int(source), cv2.CAP_ANY, params)
    elif kind is SourceKind.GSTREAMER:
        cap = cv2.VideoCapture(source, cv2.CAP_GSTREAMER, params)
    else:
        cap = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG, params)
        if not cap.isOpened() and kind is SourceKind.FILE:  # a format only another backend reads (image sequence)
            cap.release()
            cap = cv2.VideoCapture(str(source), cv2.CAP_ANY, params)
    if not cap.isOpened():
        cap.release()
        return None
    return cap


class FrameSource:
    """Iterate over ``(index, frame)`` of a source: ``frame`` is HxWx3 uint8 **BGR** (OpenCV's order), ``index``
    counts frames delivered since the start (reconnects do not reset it).

    Raises :class:`SourceError` when the source cannot be opened at the start, and :class:`StreamLost` when a live
    source is lost and ``options.reconnects`` reopen attempts bring no frame back. The end of a video file ends the
    iteration normally. ``close()`` (or the context manager) releases the capture; iteration releases it at the end.
    ``log`` receives one line per loss and reconnect attempt. ``sleep`` is injectable for tests."""

    def __init__(self, source, options: SourceOptions = SourceOptions(), log: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.source = str(source)
        self.kind = source_kind(self.source)
        self.options = options
        self.log = log or (lambda m: None)
        self.sleep = sleep
        self.frames = 0
        self.reconnects = 0  # successful reopenings
        self._attempts = 0  # attempts spent on the current outage
        self._reconnected_at = -float("inf")
        if self.kind is SourceKind.FILE and not Path(self.source).exists():
            raise SourceError(f"{self.source}: cannot open the video source (no such file)")
        self._cap = open_capture(self.source, options)
        if self._cap is None:
            hint = " (is this OpenCV built with GStreamer? cv2.getBuildInformation())" \
                if self.kind is SourceKind.GSTREAMER else ""
            raise SourceError(f"{self.source}: cannot open the video source{hint}")

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _read(self) -> np.ndarray | None:
        if self._cap is None:
            return None
        ok, frame = self._cap.read()
        return frame if ok and frame is not None and frame.size else None

    def _recover(self, reason: str) -> np.ndarray:
        """Reopen a lost live source with backoff until a frame comes back; raises StreamLost."""
        self.close()
        if time.monotonic() - self._reconnected_at >= self.options.stable_s:
            self._attempts = 0  # it ran steadily since the last outage: a new outage
        if self._attempts < self.options.reconnects:  # else StreamLost below says it all: no "reconnecting" first
            self.log(f"{self.source}: {reason} after {self.frames} frame(s); reconnecting")
        while self._attempts < self.options.reconnects:
            wait = self.options.backoff(self._attempts)
            self._attempts += 1
            self.log(f"{self.source}: reconnect {self._attempts}/{self.options.reconnects} in {wait:.1f}s")
            self.sleep(wait)
            self._cap = open_capture(self.source, self.options)
            frame = self._read()
            if frame is not None:
                self.reconnects += 1
                self._reconnected_at = time.monotonic()
                self.log(f"{self.source}: reconnected")
                return frame
            self.close()
        raise StreamLost(self.source, self.frames, self.options.reconnects, reason)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        # FFmpeg's read timeout often surfaces one read late: the read that hit it still returns the partly received
        # frame, and the next one fails at once; so a failure right after a read that took the whole timeout is a stall
        previous = 0.0
        slow = 0.9 * self.options.read_timeout_s
        try:
            while True:
                t0 = time.monotonic()
                frame = self._read()
                took = time.monotonic() - t0
                if frame is None:
                    if not self.kind.live:
                        return  # the end of a video file: a normal end
                    stalled = max(took, previous) >= slow
                    frame = self._recover(f"no frame for {self.options.read_timeout_s:g}s" if stalled
                                          else "the source ended or dropped")
                    took = 0.0
                previous = took
                yield self.frames, frame
                self.frames += 1
        finally:
            self.close()
