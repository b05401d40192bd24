"""On-device parity: every sha256, then the golden probes replayed through the backend and compared with the FP32
torch embeddings stored in the bundle, under the manifest's gates (numpy + one backend; no torch)."""
from __future__ import annotations

from geosurge.parity import compare

from .bundle import open_bundle
from .golden import Golden
from .localizer import Localizer


def verify_bundle(bundle_dir, backend: str | None = None, threads: int | None = None) -> dict:
    """Checksums + golden replay. Returns ``{"bundle", "backend", "files", "metrics", "gates", "passed"}``; raises
    BundleError for a missing, tampered-with or unreadable bundle (the message names the file)."""
    bundle = open_bundle(bundle_dir, verify=False)
    backend = bundle.backend(backend)
    files = bundle.verify_checksums()
    with Localizer(bundle, backend=backend, threads=threads, verify=False) as loc:
        rep = replay_golden(loc)
    return {"bundle": str(bundle_dir), "backend": backend.value, "files": files, **rep}


def replay_golden(loc: Localizer) -> dict:
    """The bundle's golden inputs through ``loc``'s backend vs the FP32 torch embeddings stored beside them, under
    the manifest's gates: ``geosurge.parity.compare``'s ``{"metrics", "gates", "passed"}``."""
    golden = Golden.load(loc.bundle.path("golden"))
    return compare(golden.embedding, loc.embed(golden.inputs), loc.scorer, loc.bundle.manifest.gates() or None)
