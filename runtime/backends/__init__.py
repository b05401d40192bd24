"""Inference backends behind one runner interface (in the manner of polygraphy's runners).

A :class:`Runner` is opened from a bundle, runs named inputs to named outputs and is closed::

    from geosurge.runtime import open_bundle
    from geosurge.runtime.backends import open_runner

    bundle = open_bundle("bundles/edge-fp32")
    with open_runner(bundle, "onnxruntime", threads=2) as runner:
        out = runner.infer({"image": x})          # x: (N, 3, S, S) float32 -> {"embedding": (N, D) float32}

Backends are looked up by name in :data:`RUNNERS` (names from ``geosurge.formats.Backend``) and import their
library only when chosen, so a device needs just one of them. Which backend reads which bundle format is
``geosurge.formats.FORMAT_BACKENDS``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from geosurge.errors import GeosurgeError
from geosurge.formats import Backend
from geosurge.registry import Registry


class BackendUnavailable(GeosurgeError):
    """The backend's library or hardware is not here (TensorRT without a GPU, Core ML off macOS)."""


class Runner(ABC):
    """One backend running one bundle's model part.

    Subclasses set :attr:`name`, :attr:`input_names` / :attr:`output_names`, implement :meth:`open`,
    :meth:`infer` and :meth:`_release`, and say with :attr:`thread_option` whether ``threads`` means anything to
    them (a runner that cannot honour it refuses it: :meth:`check_threads`). Backend-specific options (OpenVINO's
    ``device`` and ``precision_hint``) are named in :attr:`option_names`; any other is refused
    (:meth:`check_options`). :attr:`options` says what the runner actually runs with where that changes numerics
    (the parity record keeps it beside the result).
    """

    name: ClassVar[Backend]
    #: what ``threads`` sets for this backend, or None when it cannot honour a thread count ...
    thread_option: ClassVar[str | None] = None
    #: ... and then why (the refusal names it)
    no_threads_reason: ClassVar[str] = ""
    #: the keyword options :meth:`open` takes besides ``threads``
    option_names: ClassVar[tuple[str, ...]] = ()
    input_names: list[str]
    output_names: list[str]
    #: run-time settings in force (precision hint, device, providers, ...): recorded with parity results
    options: dict = {}
    _closed: bool = False

    @classmethod
    @abstractmethod
    def open(cls, bundle, threads: int | None = None, **options) -> "Runner":
        """A runner for ``bundle``'s model part (a :class:`geosurge.runtime.Bundle`). Raises BackendUnavailable
        when the backend cannot run here, GeosurgeError for an option it cannot honour."""

    @abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{input name: array}`` -> ``{output name: float32 array}``; the bundle's image input is (N, 3, S, S)
        float32 preprocessed per the manifest, the ``embedding`` output (N, D)."""

    def _release(self) -> None:
        """Free what the backend holds (sessions, device memory); called once by :meth:`close`."""

    def close(self) -> None:
        """Release the backend's resources; idempotent. ``infer`` after ``close`` raises."""
        if not self._closed:
            self._closed = True
            self._release()

    def _check_open(self) -> None:
        if self._closed:
            raise GeosurgeError(f"the {self.name} runner is closed")

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def check_threads(cls, threads: int | None) -> int | None:
        """``threads`` if this backend honours it (a positive count); GeosurgeError otherwise."""
        if threads is None:
            return None
        if cls.thread_option is None:
            raise GeosurgeError(f"the {cls.name} backend does not take a thread count (--threads {threads}): "
                                f"{cls.no_threads_reason}")
        if int(threads) < 1:
            raise GeosurgeError(f"--threads must be >= 1, not {threads}")
        return int(threads)

    @classmethod
    def check_options(cls, options: dict) -> dict:
        """``options`` without the unset (None) ones, if this backend takes every one; GeosurgeError otherwise."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        bad = sorted(set(options) - set(cls.option_names))
        if bad:
            def flag(name):
                return f"{name} (--{name.replace('_', '-')})"

            takes = (f"it takes {', '.join(map(flag, cls.option_names))}" if cls.option_names else "it takes none")
            raise GeosurgeError(f"the {cls.name} backend has no option {', '.join(map(flag, bad))} ({takes})")
        return options


#: backend name -> runner class ("module:Class", imported when asked for)
RUNNERS = Registry("backend", {
    Backend.ONNXRUNTIME.value: "geosurge.runtime.backends.onnxruntime:OnnxRuntimeRunner",
    Backend.OPENVINO.value: "geosurge.runtime.backends.openvino:OpenVINORunner",
    Backend.TENSORRT.value: "geosurge.runtime.backends.tensorrt:TensorRTRunner",
    Backend.COREML.value: "geosurge.runtime.backends.coreml:CoreMLRunner",
})


def get_runner(name: str) -> type[Runner]:
    return RUNNERS.get(str(name))


def embed_batches(runner: Runner, x: np.ndarray, input_name: str, output_name: str,
                  static_batch: int | None) -> np.ndarray:
    """(N, 3, S, S) -> the ``output_name`` output (N, ...); a static-batch model (``static_batch`` 1) runs one image
    at a time."""
    x = np.asarray(x, np.float32)
    if static_batch is not None and len(x) != static_batch:
        return np.concatenate([runner.infer({input_name: x[i:i + 1]})[output_name] for i in range(len(x))])
    return runner.infer({input_name: x})[output_name]


def open_runner(bundle, backend: str | None = None, threads: int | None = None, **options) -> Runner:
    """Open ``bundle`` with ``backend`` (default: :meth:`geosurge.runtime.Bundle.backend`'s choice — the format's
    default, or a backend measured faster at parity on this machine; BundleError if the backend cannot read the
    format). ``options``: the backend's own (:attr:`Runner.option_names`)."""
    return get_runner(bundle.backend(backend)).open(bundle, threads=threads, **options)
