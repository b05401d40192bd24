"""Reading a bundle on the device: the manifest, sha256 of every file, schema and backend checks (no torch)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from geosurge.errors import GeosurgeError

MANIFEST = "manifest.json"
SCHEMA = "geosurge.bundle"
SCHEMA_VERSION = 1


class BundleError(GeosurgeError):
    """A bundle that is missing, tampered with, or of another schema/backend; the message says which file."""


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` field: a changed byte anywhere in
    manifest.json is caught, as for every other file."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict

    def path(self, key: str) -> Path:
        """Path of a bundle part by its manifest role (``model``, ``cells``, ``cell_table``, ``places``, ``golden``)."""
        try:
            return self.root / self.manifest["parts"][key]
        except KeyError:
            raise BundleError(f"{self.root}: the manifest names no {key!r} file") from None

    def has(self, key: str) -> bool:
        return key in self.manifest.get("parts", {})

    @property
    def preprocess(self):
        from geosurge.preprocess import PreprocessSpec

        return PreprocessSpec.from_dict(self.manifest["preprocess"])

    def verify_checksums(self) -> list[dict]:
        """sha256 of every file listed; raises BundleError on the first missing or mismatching file."""
        rows = []
        for name, rec in sorted(self.manifest["files"].items()):
            p = self.root / name
            if not p.is_file():
                raise BundleError(f"{p}: missing bundle file")
            got = sha256_file(p)
            if got != rec["sha256"]:
                raise BundleError(f"{p}: sha256 mismatch (file changed since export: expected "
                                  f"{rec['sha256'][:12]}..., found {got[:12]}...); re-export the bundle")
            rows.append({"file": name, "bytes": p.stat().st_size, "sha256": got[:16], "ok": "ok"})
        return rows


def open_bundle(root, verify: bool = True, backend: str | None = None) -> Bundle:
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing (not a geosurge bundle)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: not a geosurge bundle manifest")
    if manifest.get("schema") != SCHEMA:
        raise BundleError(f"{mpath}: not a geosurge bundle manifest (schema {manifest.get('schema')!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{mpath}: bundle schema version {manifest.get('schema_version')} is not supported by "
                          f"this runtime (reads version {SCHEMA_VERSION}); re-export or upgrade geosurge")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BundleError(f"{mpath}: manifest checksum mismatch (edited or corrupted since export); re-export")
    bundle = Bundle(root, manifest)
    if backend is not None:
        formats = {"onnxruntime": "onnx", "tensorrt": "onnx", "coreml": "coreml"}
        want = formats.get(backend)
        if want is None:
            raise BundleError(f"unknown backend {backend!r}")
        if manifest["model"]["format"] != want:
            raise BundleError(f"{root}: the bundle holds a {manifest['model']['format']} model; backend {backend!r} "
                              f"needs {want}")
    if verify:
        bundle.verify_checksums()
    return bundle
