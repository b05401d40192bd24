"""Opening a bundle on the device: the typed manifest, sha256 of every file, schema and backend checks (no torch).

A :class:`Bundle` is a bundle directory with its :class:`geosurge.manifest.Manifest`. It stands for its directory
wherever a path is expected (``os.fspath(bundle)``, ``bundle / "model.onnx"``, ``Localizer(bundle)``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from geosurge.errors import GeosurgeError
from geosurge.formats import Backend, check_backend
from geosurge.manifest import MANIFEST_FILE, BundleError, Manifest, check_schema, manifest_digest, sha256_file

__all__ = ["Bundle", "BundleError", "open_bundle", "sha256_file"]


@dataclass
class Bundle:
    root: Path
    manifest: Manifest

    # ---- a bundle is its directory -------------------------------------------------------------------------------
    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __truediv__(self, name) -> Path:
        return self.root / name

    def __str__(self) -> str:
        return str(self.root)

    # ---- parts ---------------------------------------------------------------------------------------------------
    def path(self, role: str) -> Path:
        """Path of a bundle part by its manifest role (``model``, ``cells``, ``cell_table``, ``places``, ``golden``)."""
        try:
            return self.root / self.manifest.parts[role]
        except KeyError:
            raise BundleError(f"{self.root}: the manifest names no {role!r} file") from None

    def has(self, role: str) -> bool:
        return role in self.manifest.parts

    @property
    def preprocess(self):
        return self.manifest.preprocess

    def backend(self, name: str | None = None) -> Backend:
        """The backend to run this bundle with: ``name`` checked against the bundle's format, or by default the
        format's first backend (``geosurge.formats.FORMAT_BACKENDS``) unless another was measured faster at parity on
        this machine and is installed (``geosurge.runtime.backends.choice``). Raises BundleError for a backend that
        cannot read it."""
        from .backends.choice import default_backend_for

        fmt = self.manifest.model.format
        try:
            return check_backend(fmt, name) if name is not None else default_backend_for(self)
        except GeosurgeError as e:
            raise BundleError(f"{self.root}: {e}") from None

    def verify_checksums(self) -> list[dict]:
        """Size and sha256 of every file listed; raises BundleError on the first missing or mismatching file."""
        rows = []
        for name, rec in sorted(self.manifest.files.items()):
            p = self.root / name
            if not p.is_file():
                raise BundleError(f"{p}: missing bundle file")
            size = p.stat().st_size
            if rec.bytes is not None and size != rec.bytes:
                raise BundleError(f"{p}: size mismatch (the manifest records {rec.bytes:,} bytes, the file has "
                                  f"{size:,}); re-export the bundle")
            got = sha256_file(p)
            if got != rec.sha256:
                raise BundleError(f"{p}: sha256 mismatch (file changed since export: expected "
                                  f"{rec.sha256[:12]}..., found {got[:12]}...); re-export the bundle")
            rows.append({"file": name, "bytes": p.stat().st_size, "sha256": got[:16], "ok": "ok"})
        return rows


def read_manifest(root) -> Manifest:
    """The bundle's manifest, typed: refuses a missing or unreadable file, another schema or version (naming it),
    a checksum mismatch of the manifest itself, or a manifest that breaks the schema (naming the key)."""
    root = Path(root)
    mpath = root / MANIFEST_FILE
    if root.is_file():
        hint = " (give the folder that holds it)" if root.name == MANIFEST_FILE else ""
        raise BundleError(f"{root}: a file, not a bundle directory{hint}")
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing (not a geosurge bundle)")
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    check_schema(raw, str(mpath))
    if raw.get("manifest_sha256") != manifest_digest(raw):
        raise BundleError(f"{mpath}: manifest checksum mismatch (edited or corrupted since export); re-export")
    return Manifest.from_dict(raw, str(mpath))


def open_bundle(root, verify: bool = True, backend: str | None = None) -> Bundle:
    """Open a bundle: the typed manifest (:func:`read_manifest`), a check that ``backend`` (when given) reads the
    bundle's format, and with ``verify`` the sha256 of every file. Raises BundleError naming the file."""
    root = Path(root)
    bundle = Bundle(root, read_manifest(root))
    if backend is not None:
        bundle.backend(backend)
    if verify:
        bundle.verify_checksums()
    return bundle
