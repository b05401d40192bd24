"""Atomic file-system writes (standard library only): nothing half-written is ever left where a reader looks, nothing
is left behind by an interrupted writer once the next one runs, and what is written gets the user's umask like any
other file.

* :func:`atomic_write_bytes`: temp file in the same folder, fsync, rename over the target.
* :func:`make_staging_dir` / :func:`sweep_stale_staging`: a hidden sibling folder to build a directory in, marked as
  ours by an owner file with its pid; a later run removes the ones whose owner is gone (``kill -9``, power loss).
* :func:`replace_dir`: swap a finished folder into place with no moment where the target is missing
  (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS).
* :func:`check_replaceable`: before any of that, refuse a target that is not ours to replace (a file, or a folder
  of the user's): a writer only ever replaces what it wrote.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from .errors import GeosurgeError

#: staging folders are ``.<target>.staging-<pid>-<hex>``, marked by ``<that>.owner`` beside them (only folders with
#: such a marker are ever swept)
STAGING_TAG = ".staging-"
OWNER_SUFFIX = ".owner"


def umask() -> int:
    """The process umask (read without changing it where /proc allows; else set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename over ``path``. The file gets mode 0666 & ~umask like
    ``open(path, "w")`` would (mkstemp alone makes it 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- staging folders --------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """A token that changes when ``pid`` is reused: the start time in clock ticks since boot (/proc/PID/stat field
    22, proc(5)) plus the boot id. None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_file(staging: Path) -> Path:
    """The marker beside a staging folder: ``<staging>.owner`` (JSON: pid, host, process start token, time)."""
    staging = Path(staging)
    return staging.with_name(staging.name + OWNER_SUFFIX)


def make_staging_dir(target: Path) -> Path:
    """A new hidden folder beside ``target`` (``.<name>.staging-<pid>-<random>``, mode 0777 & ~umask) and, written
    first, its owner marker. The marker sits beside the folder, not in it, so it marks the folder through every
    step: while parts are written, and after :func:`replace_dir` has exchanged the old bundle into it."""
    target = Path(target)
    for _ in range(100):
        path = target.parent / f".{target.name}{STAGING_TAG}{os.getpid()}-{os.urandom(4).hex()}"
        mark = owner_file(path)
        try:
            with open(mark, "x") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                           "created": time.time(), "target": target.name}, f)
        except FileExistsError:
            continue
        try:
            os.mkdir(path)  # mode 0o777 & ~umask, unlike mkdtemp's 0700
        except BaseException:
            mark.unlink()
            raise
        return path
    raise FileExistsError(f"{target.parent}: cannot create a staging folder")  # pragma: no cover


def release_staging(staging: Path) -> None:
    """Remove a staging folder (whatever it holds now) and then its owner marker."""
    staging = Path(staging)
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging, ignore_errors=True)
    if not staging.exists():
        owner_file(staging).unlink(missing_ok=True)


def is_stale(mark: Path, grace_s: float = 24 * 3600) -> bool:
    """Whether the owner of a staging marker is gone. On this host: its pid is not running, or runs under another
    start token (the pid was reused). From another host (a shared disk): only after ``grace_s`` seconds, since its
    owner cannot be asked. An unreadable marker is not stale (left alone)."""
    try:
        rec = json.loads(Path(mark).read_text())
        pid, host, created = int(rec["pid"]), str(rec["host"]), float(rec["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return time.time() - created > grace_s
    if pid != os.getpid() and not _alive(pid):
        return True
    token, now = rec.get("start"), _process_start(pid)
    return token is not None and now is not None and now != token  # the pid runs another process now


def sweep_stale_staging(parent: Path, log=None) -> list[Path]:
    """Remove the staging folders in ``parent`` whose owner is gone (:func:`is_stale`), with their markers; returns
    the folders removed. Only names with our marker are looked at: nothing else in ``parent`` is touched, nor the
    folder of a writer that still runs."""
    removed = []
    try:
        marks = [p for p in Path(parent).iterdir() if p.name.startswith(".") and STAGING_TAG in p.name
                 and p.name.endswith(OWNER_SUFFIX) and p.is_file()]
    except OSError:
        return removed
    for mark in marks:
        if is_stale(mark):
            staging = mark.with_name(mark.name[:-len(OWNER_SUFFIX)])
            release_staging(staging)
            removed.append(staging)
            if log:
                log(f"removed {staging.name}: left by an interrupted run")
    return removed


# ---- swapping a folder into place ---------------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 0x2  # macOS sys/stdio.h, renamex_np


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (one system call: every reader sees the old or the new one). True when
    done; False where the platform or file system cannot (the caller falls back)."""
    libc = _libc()
    a_b, b_b = os.fsencode(str(a)), os.fsencode(str(b))
    if sys.platform.startswith("linux") and libc is not None and hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, a_b, _AT_FDCWD, b_b, _RENAME_EXCHANGE)
    elif sys.platform == "darwin" and libc is not None and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(a_b, b_b, _RENAME_SWAP)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # old kernel / glibc, or a file system without exchange (some network / FUSE ones)
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def check_replaceable(path, what: str, owned) -> None:
    """Raise GeosurgeError (one line naming ``path``) unless a folder written at ``path`` may replace what is there:
    nothing, an empty folder, or a ``what`` holding nothing but its own files. ``owned(folder)`` -> the names of the
    entries of ``folder`` a writer of ``what`` wrote (read from its marker file: a bundle's manifest, a checkpoint's
    config, a view set's manifest), or None when ``folder`` is not a ``what``. A file, a symbolic link, a folder of
    anything else, or a ``what`` with other files beside its own, is never replaced: the writers swap the whole folder
    in, and what was in it would be gone."""
    p = Path(path)
    if p.is_symlink():
        raise GeosurgeError(f"{p}: a symbolic link (to {os.readlink(p)}); give the folder itself for the {what}")
    if not p.exists():
        return
    if not p.is_dir():
        raise GeosurgeError(f"{p}: exists and is not a folder; give a new folder for the {what} (or an existing "
                            f"{what} to replace)")
    entries = {e.name for e in p.iterdir()}
    if not entries:
        return
    mine = owned(p)
    if mine is None:
        raise GeosurgeError(f"{p}: exists and is not a {what}: not replaced, its files would be lost; give a new "
                            f"folder (or an existing {what} to replace)")
    other = sorted(entries - set(mine))
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise GeosurgeError(f"{p}: a {what} with other files beside its own ({shown}): not replaced, they would be "
                            "lost; move them out or give a new folder")


def replace_dir(src: Path, dst: Path) -> str:
    """Move the finished folder ``src`` to ``dst`` (same file system). A new ``dst`` is one rename. An existing
    ``dst`` is exchanged with ``src`` in one system call, so ``dst`` always holds a whole folder, old or new, and
    the old one is then removed from where ``src`` was. Where no exchange exists, the old one is renamed away first
    (a reader may then find no ``dst`` for the moment between two renames). Returns how: "new", "exchange" or
    "rename"."""
    src, dst = Path(src), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        try:
            os.rename(src, dst)
            return "new"
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise  # else someone created dst meanwhile: replace it below
    if dst.is_dir() and not dst.is_symlink() and exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
        return "exchange"
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    return "rename"
