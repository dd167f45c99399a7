"""The one atomic writer: every file featurecache writes appears complete or not at all.

A file is written under a process-unique temporary name in its own folder
(`.<name>.tmp-<pid>-<random>`, recognised by `is_temporary`, so `verify` reports and
cleans the leftovers of a killed writer), flushed and fsynced, renamed over the final
name with `os.replace`, and the folder is fsynced so the rename itself survives a power
cut. Readers see the old file or the new one. Manifests, shards (whose writer streams
into its own temporary file and finishes through `publish`), weights, heads, finetune
outputs, exports and reports all go through here; no other module renames or fsyncs
(tests/test_atomic.py checks the source).

A folder written as a whole (`export-features -o DIR`) is filled under a temporary name
beside it (`atomic_folder`), every file and folder in it fsynced, then renamed into
place: a killed writer leaves only its hidden temporary folder, which the next write of
the same folder removes.

A failed write (full disk, read-only file system, permission) becomes one
`StorageError` naming the file, and leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import StorageError
from ..faults import fault_point

#: Temporary files older than this are removed even when their pid is alive (a reused pid).
STALE_SECONDS = 24 * 3600


def _reason(error: OSError) -> tuple[str, str]:
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return "the disk is full", "free some space and run the command again"
    if code == errno.EROFS:
        return "the file system is read-only", "write somewhere writable (e.g. --root, -o)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied", "fix the permissions or use another folder (e.g. --root, -o)"
    return error.strerror or str(error), "check the path and the disk, then run the command again"


def storage_error(error: OSError, path: Path | str, what: str = "") -> StorageError:
    """One clear StorageError for a failed write of `path`."""
    reason, advice = _reason(error)
    where = f"{what} {path}".strip()
    return StorageError(f"cannot write {where}: {reason}; nothing was written under that name. {advice}")


def os_error_text(error: OSError) -> str:
    """An OSError nobody expected, in one line: what, where, what to do."""
    reason, advice = _reason(error)
    where = f" ({error.filename})" if error.filename else ""
    return f"{reason}{where}; {advice}"


def temporary_path(path: Path) -> Path:
    """A process-unique temporary name next to `path` (hidden, `.tmp-<pid>-<random>`)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abandoned(temporary: Path) -> bool:
    """Whether a temporary file or folder was left by a writer that died (by the pid in its
    name), or is older than a day (the pid was reused); False while its writer runs, or once
    it is gone."""
    try:
        old = time.time() - temporary.stat().st_mtime > STALE_SECONDS
    except OSError:
        return False
    return old or not _owner_alive(temporary.name)


def _dead_leftovers(directory: Path, wanted: Callable[[Path], bool]) -> list[Path]:
    """The temporaries in `directory` (those `wanted`) that were `abandoned`."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    return [entry for entry in entries if is_temporary(entry.name) and wanted(entry) and abandoned(entry)]


def remove_stale_temporaries(directory: Path, names: tuple[str, ...] | None = None) -> list[str]:
    """Delete temporary files in `directory` left by writers that died; returns their names.

    `names`: only the temporaries of these final file names (in a folder that is not
    featurecache's own, such as the folder of `export -o`). A file whose writer (by the
    pid in its name) is still running is left alone, unless it is older than a day (the
    pid was reused)."""
    dead = _dead_leftovers(directory, lambda file: file.is_file() and (
        names is None or any(file.name.startswith(f".{name}.tmp-") for name in names)))
    for file in dead:
        file.unlink(missing_ok=True)
    return [file.name for file in dead]


def remove_stale_folders(directory: Path, name: str) -> list[str]:
    """Delete the temporary folders of the folder `name` in `directory` that writers which died
    left (`atomic_folder`); returns their names. As for files: a live writer's is left alone."""
    dead = _dead_leftovers(directory, lambda folder: folder.name.startswith(f".{name}.tmp-")
                           and not folder.is_symlink() and folder.is_dir())
    for folder in dead:
        shutil.rmtree(folder, ignore_errors=True)
    return [folder.name for folder in dead]


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a closed file's data to the disk."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def publish(tmp: Path, path: Path, fault: str | None = None) -> None:
    """Rename the fsynced temporary file `tmp` over `path`, then fsync the folder.

    `fault`: the name of the fault point just before the rename (tests/test_crash.py)."""
    if fault:
        fault_point(fault)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def publish_folder(tmp: Path, path: Path, fault: str | None = None) -> None:
    """fsync every file and folder under the temporary folder `tmp`, rename it over `path` (absent,
    or an empty folder), then fsync the parent folder."""
    for folder, _, files in os.walk(tmp, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_directory(Path(folder))
    publish(tmp, path, fault)


@contextlib.contextmanager
def atomic_folder(path: Path, what: str, fault: str | None = None) -> Iterator[Path]:
    """Write the folder `path` complete or not at all: yields a new temporary folder beside it
    to fill, which is published over `path` (absent, or an empty folder) when the block ends
    well, and removed when it fails. The temporary folders of writers that died are removed
    first. A failed write (OSError, in the block too) becomes one StorageError naming `path`."""
    remove_stale_folders(path.parent, path.name)
    tmp = temporary_path(path)
    try:
        os.mkdir(tmp)
        yield tmp
        publish_folder(tmp, path, fault)
    except OSError as error:
        raise storage_error(error, path, what) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing there once published


@functools.cache
def _file_mode() -> int:
    """The mode a new file gets here (0o666 less the umask), read once: from Linux's
    /proc/self/status, else by setting the umask and setting it back at once (os.umask
    can only be read so, which races with threads creating files)."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, write: Callable[[Path], None], what: str = "", fault: str | None = None) -> None:
    """Call `write(tmp)`, fsync, rename to `path`; StorageError on a failed write, no temp file left.

    The file gets the mode a plain new file would (writers such as safetensors' create
    theirs 0600, which other users of a shared cache root could not read)."""
    tmp = temporary_path(path)
    try:
        write(tmp)
        if tmp.stat().st_mode & 0o777 != _file_mode():
            os.chmod(tmp, _file_mode())
        fsync_file(tmp)
        publish(tmp, path, fault)
    except OSError as error:
        raise storage_error(error, path, what) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes, what: str = "") -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data), what)


def json_text(data: object) -> str:
    """How featurecache writes a JSON record: one key per line, in insertion order."""
    return json.dumps(data, indent=1, sort_keys=False) + "\n"


def write_json_atomic(path: Path, data: object, what: str = "", fault: str | None = None) -> None:
    """Write JSON atomically: readers see the old or the new file."""
    write_atomic(path, lambda tmp: tmp.write_text(json_text(data), encoding="utf-8"), what, fault)
