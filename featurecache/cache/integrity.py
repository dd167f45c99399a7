"""Checked artifacts: safetensors files that carry their own checksum, and safe writes.

Every safetensors file featurecache writes (heads, ensembles, finetune outputs and
checkpoints, the backbone checkpoint under `_weights/`) is *sealed*: its metadata holds
`featurecache.tensors`, an XXH3-128 digest of every tensor's name, dtype, shape and
bytes, and `featurecache.checksum`, a SHA-256 of all the metadata (the digest included).
Reading the metadata alone (a leaderboard) checks the checksum; loading the tensors
also checks the digest and refuses NaN or infinite values. The checksums guard against
damage (flipped bytes, truncation, a hand edit); they are not a signature.

Writes go through the one atomic writer (`cache/atomic.py`: temporary file, fsync,
rename, folder fsync), so a reader sees the old file or the new one; a full disk, a
read-only file system or a permission error becomes one `StorageError` naming the file,
and leaves nothing under the final name. Temporary files of a killed writer are removed by the next write into
the same folder and reported by `featurecache verify`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import xxhash

from ..errors import CorruptCacheError, UsageError
from .atomic import storage_error, write_atomic
from .layout import LOCK, MANIFEST, SHARDS_DIR, WEIGHTS_DIR

TENSORS_KEY = "featurecache.tensors"
CHECKSUM_KEY = "featurecache.checksum"
CHECKPOINT_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")  # _weights/<sha256>.safetensors


def _weights_folder(folder: Path) -> bool:
    """A cache root's `_weights/`: the backbone checkpoints every entry of the root loads."""
    try:
        return folder.name == WEIGHTS_DIR and any(CHECKPOINT_NAME.fullmatch(f.name) for f in folder.iterdir())
    except OSError:
        return False


def _entry_folder(folder: Path) -> bool:
    """A folder holding a featurecache manifest, or an entry's shards beside a manifest or lock
    (a manifest damaged or not written yet)."""
    manifest = folder / MANIFEST
    try:
        if (folder / SHARDS_DIR).is_dir() and (manifest.exists() or (folder / LOCK).exists()):
            return True
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # no manifest, or not JSON: another tool's file
        return False
    return isinstance(data, dict) and "format_version" in data and "entry_id" in data


def refuse_inside_cache(output: Path) -> None:
    """UsageError when `output` lies in a cache entry or a root's `_weights/`: featurecache's own
    files, which a write there could replace (`export -o ENTRY/manifest.json --overwrite`)."""
    try:
        # a link to a file given as -o is replaced, not followed; one to a folder is written into
        where = output.resolve() if output.is_dir() else output.parent.resolve() / output.name
    except (OSError, RuntimeError):
        where = Path(os.path.abspath(output))
    for folder in (where, *where.parents):
        if _entry_folder(folder):
            raise UsageError(f"{output} lies inside the cache entry {folder}, whose files featurecache manages; "
                             "choose a path outside it")
        if _weights_folder(folder):
            raise UsageError(f"{output} lies inside the cache's weights folder {folder}, which every entry of the "
                             "cache loads; choose a path outside it")


def _check_path(output: Path, example: str, entry_file: bool = False) -> None:
    """What every -o refuses: `-` (no command writes its files to standard output), a path in
    featurecache's own files (unless `entry_file`: an entry's default report), and a path under a file."""
    if str(output) == "-":
        raise UsageError(f"-o - would write a file named '-': this command does not write to standard output; "
                         f"give a name such as {example}")
    if not entry_file:
        refuse_inside_cache(output)
    blocking = next((parent for parent in output.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"-o {output}: {blocking} is a file, not a folder; choose another path")


def prepare_output_file(output: Path, what: str, example: str, *, overwrite: bool = False,
                        entry_file: bool = False) -> None:
    """Check `-o` before any work: `_check_path`, then refuse a folder where a file is wanted, an
    existing file unless `overwrite` (one typo could replace an image), and a folder that cannot
    be written. Missing folders are made only with the result (`output_parents`): a command that
    fails leaves none behind."""
    _check_path(output, example, entry_file)
    if output.is_dir():
        raise UsageError(f"-o {output} is a folder; give a file name such as {example}")
    if output.exists() and not overwrite:
        raise UsageError(f"-o {output} exists; pass --overwrite to replace it, or choose another name")
    _check_writable(output, what)


def _check_writable(output: Path, what: str) -> None:
    """Refuse `output` when its folder, or the nearest existing one above it (where the missing
    ones would be made), cannot be written. Nothing is made here: `output_parents` makes them."""
    existing = next((folder for folder in (output.parent, *output.parent.parents) if folder.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise storage_error(OSError(errno.EACCES, "permission denied"), output.parent, what)


def prepare_output_folder(output: Path, example: str, what: str) -> None:
    """Check a folder `-o` before any work: `_check_path`, then refuse a file, a folder that is not
    empty, the current folder (the folder is written whole, then renamed into place) and a
    place that cannot be written."""
    _check_path(output, example)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output} exists and is not an empty folder; choose a new one")
    if output.exists() and output.resolve() == Path.cwd().resolve():
        raise UsageError(f"-o {output} is the folder you are in, which the output replaces once complete; "
                         f"give a new folder such as {example}")
    _check_writable(output, what)


@contextlib.contextmanager
def output_parents(output: Path, what: str) -> Iterator[None]:
    """Make the missing folders above `output` for the write in the block; remove them again
    when it fails, so that a failed command leaves no empty folder behind."""
    missing = []
    folder = output.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        try:
            for folder in reversed(missing):
                folder.mkdir(exist_ok=True)
        except OSError as error:
            raise storage_error(error, output.parent, what) from None
        yield
    except BaseException:
        for folder in missing:  # the deepest first; one no longer empty stops it
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def tensors_digest(tensors: dict) -> str:
    """XXH3-128 of every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = xxhash.xxh3_128()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return "xxh3_128:" + digest.hexdigest()


def metadata_checksum(metadata: dict[str, str]) -> str:
    body = json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def seal(metadata: dict[str, str], tensors: dict) -> dict[str, str]:
    """`metadata` plus the tensors' digest and the checksum of both."""
    sealed = {**metadata, TENSORS_KEY: tensors_digest(tensors)}
    sealed[CHECKSUM_KEY] = metadata_checksum(sealed)
    return sealed


def non_finite(tensors: dict) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity."""
    import torch

    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())]


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str], what: str = "") -> dict[str, str]:
    """Write a sealed safetensors file atomically; returns the metadata written."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    sealed = seal(metadata, tensors)

    def save(tmp: Path) -> None:
        from safetensors import SafetensorError

        try:
            save_file(tensors, str(tmp), metadata=sealed)
        except SafetensorError as error:  # its Rust writer reports a full disk as its own error type
            text = str(error)
            code = next((c for c in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
                         if f"os error {c})" in text), errno.EIO)
            raise OSError(code, os.strerror(code), str(tmp)) from None

    write_atomic(path, save, what)
    return sealed


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header alone.

    The format: an 8-byte little-endian header length N, N bytes of JSON (tensor names to
    dtype, shape and data_offsets, plus `__metadata__`), then the data. Read directly,
    since safetensors' own reader (framework "pt") imports torch, and `heads` must answer
    at once; the same checks as its reader: the header parses and the data ends exactly
    at the end of the file (not truncated)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8 or length > 100 << 20:
            raise ValueError(f"header length {length} does not fit a {size}-byte file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"data ends at byte {8 + length + end}, the file has {size} (truncated or padded)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its metadata is not a map of strings")
    return dict(metadata)


def read_metadata(path: Path, what: str, advice: str, *, required: bool = True) -> dict[str, str]:
    """A safetensors file's metadata, its checksum checked (`required`: a file without one is refused)."""
    try:
        metadata = safetensors_metadata(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError) as error:
        raise CorruptCacheError(f"{what} {path} is unreadable ({str(error)[:160]}); {advice}") from None
    if CHECKSUM_KEY not in metadata:
        if required:
            raise CorruptCacheError(f"{what} {path} carries no checksum (written by an older featurecache, or "
                                    f"edited); {advice}")
        return metadata
    if metadata_checksum(metadata) != metadata[CHECKSUM_KEY]:
        raise CorruptCacheError(f"{what} {path} is damaged (its metadata fails the checksum); {advice}")
    return metadata


def read_tensors(path: Path, metadata: dict[str, str], what: str, advice: str) -> dict:
    """Load the tensors of a file whose metadata was read with `read_metadata`, checked against its digest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CorruptCacheError(f"{what} {path} is unreadable ({str(error)[:160]}); {advice}") from None
    expected = metadata.get(TENSORS_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise CorruptCacheError(f"{what} {path} is damaged (its tensors fail their checksum); {advice}")
    bad = non_finite(tensors)
    if bad:
        raise CorruptCacheError(f"{what} {path} holds NaN or infinite values (in {bad[0]}); {advice}")
    return tensors


def read_safetensors(path: Path, what: str, advice: str, *, required: bool = True) -> tuple[dict, dict[str, str]]:
    """Tensors and metadata of a sealed file, every checksum checked."""
    metadata = read_metadata(path, what, advice, required=required)
    return read_tensors(path, metadata, what, advice), metadata


JSON_CHECKSUM = "checksum"


def json_checksum(data: dict) -> str:
    body = json.dumps({k: v for k, v in data.items() if k != JSON_CHECKSUM}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def seal_json(data: dict) -> dict:
    """`data` plus a `checksum` of everything else in it."""
    return {**data, JSON_CHECKSUM: json_checksum(data)}


def read_sealed_json(path: Path, what: str, advice: str) -> dict:
    """A JSON record written with `seal_json`, its checksum checked."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CorruptCacheError(f"{what} {path} is unreadable ({type(error).__name__}); {advice}") from None
    if not isinstance(data, dict) or JSON_CHECKSUM not in data:
        raise CorruptCacheError(f"{what} {path} carries no checksum (written by an older featurecache, or "
                                f"edited); {advice}")
    if json_checksum(data) != data[JSON_CHECKSUM]:
        raise CorruptCacheError(f"{what} {path} is damaged or edited (it fails its checksum); {advice}")
    return data
