"""The one bundle writer, used by export and prune alike: stage in a hidden folder beside the target, add parts,
finalise checksums, swap into place.

    with BundleWriter("bundles/edge-int8") as w:
        h.save(w.add("cells"))                      # parts are written into the staging folder
        ...
        bundle = w.commit(manifest)                 # checksums, manifest.json, atomic replace -> Bundle

* The staging folder is ``.<name>.staging-<pid>-<hex>`` with an owner marker beside it; a writer that dies
  (``kill -9``, power loss) leaves it, and the next writer into the same folder removes it
  (``geosurge.fsutil.sweep_stale_staging``: only marked folders whose owner process is gone).
* Folders and files get the user's umask, like any other file (``os.mkdir`` / ``open``; not ``mkdtemp``'s 0700).
* ``commit`` swaps the finished folder with an existing bundle in one ``renameat2(RENAME_EXCHANGE)`` (macOS:
  ``renamex_np(RENAME_SWAP)``): a reader sees the old bundle or the new one, never none
  (``geosurge.fsutil.replace_dir``).
* The target must be new, an empty folder or a geosurge bundle holding only its own files
  (``geosurge.fsutil.check_replaceable``, checked when the writer starts and again before the swap): a file, a
  symbolic link, a folder of anything else or a bundle with other files beside it is refused, never replaced.
* Leaving the ``with`` block by an exception (an error, Ctrl-C) removes the staging folder: nothing is left behind.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from geosurge.fsutil import check_replaceable, make_staging_dir, release_staging, replace_dir, sweep_stale_staging
from geosurge.manifest import MANIFEST_FILE, FileRecord, Manifest, bundle_entries, sha256_file
from geosurge.runtime.bundle import Bundle

WORK_DIR = ".work"


class BundleWriter:
    def __init__(self, out_dir, log=print):
        self.out = Path(out_dir).absolute()
        check_replaceable(self.out, "geosurge bundle", bundle_entries)  # never a user's folder or file
        self.out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_staging(self.out.parent, log)
        self.stage = make_staging_dir(self.out)
        #: scratch for the quantizers (removed before commit)
        self.work = self.stage / WORK_DIR
        self.work.mkdir()
        self.parts: dict[str, str] = {}
        self.how: str | None = None

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, role: str, name: str | None = None) -> Path:
        """Register the part ``role`` under file ``name`` (default: ``geosurge.manifest.PART_FILES[role]``) and
        return the path to write it at."""
        from geosurge.manifest import PART_FILES

        self.parts[role] = name or PART_FILES[role]
        return self.stage / self.parts[role]

    def copy(self, role: str, src: Path, name: str | None = None) -> Path:
        """A part copied from another bundle (a file, or a folder such as an ``.mlpackage``)."""
        dst = self.add(role, name or Path(src).name)
        (shutil.copytree if Path(src).is_dir() else shutil.copyfile)(src, dst)
        return dst

    def staged(self, manifest: Manifest) -> Bundle:
        """The bundle as staged so far (parts written, manifest not sealed): what a runner opens to check the
        model part before commit."""
        manifest.parts = dict(self.parts)
        return Bundle(self.stage, manifest)

    def commit(self, manifest: Manifest) -> Bundle:
        """Finalise: the parts table, sha256 + size of every part file (each file inside a folder part),
        ``manifest_sha256``, ``manifest.json``; then swap into place. Returns the bundle at its final path."""
        shutil.rmtree(self.work, ignore_errors=True)
        manifest.parts = dict(self.parts)
        manifest.files = checksums(self.stage, self.parts.values())
        manifest.validate()
        manifest.seal()
        (self.stage / MANIFEST_FILE).write_text(manifest.to_json())
        check_replaceable(self.out, "geosurge bundle", bundle_entries)  # what appeared there meanwhile, too
        self.how = replace_dir(self.stage, self.out)
        release_staging(self.stage)
        return Bundle(self.out, manifest)

    def abort(self) -> None:
        release_staging(self.stage)


def checksums(root: Path, names) -> dict[str, FileRecord]:
    """sha256 + bytes of each named part under ``root``; a folder part: of every file inside it (sorted)."""
    files = {}
    for name in sorted(names):
        p = root / name
        for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]):
            files[f.relative_to(root).as_posix()] = FileRecord(sha256=sha256_file(f), bytes=f.stat().st_size)
    return files
