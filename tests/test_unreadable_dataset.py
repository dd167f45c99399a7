"""A dataset none of whose images can be read caches nothing: one `error:` line naming them,
exit 2, and the cache as it was (it left a complete 0-row entry, which every rerun then
reported as a cache hit with exit 0)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featurecache.cache.store import list_entries
from featurecache.cli import app
from helpers import stderr_lines, write_photo_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = ["--model", "resnet18", "--weights", "random", "--image-size", "32", "--precision", "fp32",
            "--workers", "0", "--batch-size", "4", "--shard-size", "4", "-q"]


def cli(*arguments):
    return CliRunner().invoke(app, [str(a) for a in arguments])


def root() -> Path:
    return Path(os.environ["FEATURECACHE_ROOT"])


def test_no_readable_image_leaves_no_entry(tmp_path):
    junk = tmp_path / "junk"
    for name in ("train/a/1.png", "train/b/2.png", "val/a/3.png", "val/b/4.png"):
        (junk / name).parent.mkdir(parents=True, exist_ok=True)
        (junk / name).write_bytes(b"not an image")
    listing = cli("ls").output
    for _ in range(2):  # the rerun is no cache hit of an empty entry
        result = cli("extract", junk, *SETTINGS)
        assert result.exit_code == 2, result.output
        assert stderr_lines(result) == [
            f"error: no image of {junk} could be read (4 tried: train/a/1.png: not an image (cannot identify "
            "format); train/b/2.png: not an image (cannot identify format); val/a/3.png: not an image (cannot "
            "identify format); and 1 more), so nothing was cached; check that it is the dataset you meant, and "
            "replace or remove the unreadable files"]
        assert cli("ls").output == listing and list_entries(root()) == []
        assert [p.name for p in root().iterdir()] == ["_weights"]  # the shared backbone checkpoint alone


def test_an_entry_whose_images_all_became_unreadable_is_left_as_it_was(tmp_path):
    photos = write_photo_folder(tmp_path / "photos")
    assert cli("extract", photos, *SETTINGS).exit_code == 0
    [entry] = list_entries(root())
    before = {p.relative_to(entry): p.read_bytes() for p in entry.rglob("*") if p.is_file()}
    listing = cli("ls").output
    for image in photos.rglob("*.png"):
        image.write_bytes(b"broken")
    result = cli("extract", photos, *SETTINGS)
    assert result.exit_code == 2 and len(stderr_lines(result)) == 1, result.output
    assert stderr_lines(result)[0].startswith(f"error: no image of {photos} could be read (16 tried: ")
    assert {p.relative_to(entry): p.read_bytes() for p in entry.rglob("*") if p.is_file()} == before
    assert cli("ls").output == listing


def test_an_empty_entry_an_older_version_left_is_no_cache_hit(tmp_path, monkeypatch):
    from featurecache.extract import stage

    junk = tmp_path / "junk" / "train"
    for name in ("a/1.png", "b/2.png"):
        (junk / name).parent.mkdir(parents=True, exist_ok=True)
        (junk / name).write_bytes(b"not an image")
    with monkeypatch.context() as patch:  # as before the fix: a complete entry of 0 rows
        patch.setattr(stage, "_holds_rows", lambda manifest: True)
        assert cli("extract", junk.parent, *SETTINGS).exit_code == 0
    assert len(list_entries(root())) == 1
    result = cli("extract", junk.parent, *SETTINGS)
    assert result.exit_code == 2 and stderr_lines(result)[0].startswith(f"error: no image of {junk.parent} could "
                                                                        "be read (2 tried: train/a/1.png"), result.output
    assert list_entries(root()) == [] and [p.name for p in root().iterdir()] == ["_weights"]


def test_a_failed_run_keeps_the_shard_a_killed_run_left_unlisted(tmp_path, monkeypatch):
    """Killed after its first shard was renamed into place, before the manifest listed it: the
    manifest lists no row, but the shard file holds computed rows. A run failing before it adopts
    the shard (here: the disk full as it stores the checkpoint) must not remove the entry."""
    import errno
    import signal

    from featurecache.extract import stage
    from processes import run_cli, tiny_backbone

    photos = write_photo_folder(tmp_path / "photos")
    arguments = ["extract", photos, "--model", "tiny", *SETTINGS[2:], "--root", tmp_path / "c"]
    assert run_cli([str(a) for a in arguments], tmp_path / "killed.log", fault="after_rename:1") == -signal.SIGKILL
    [entry] = [p for p in (tmp_path / "c").iterdir() if p.name != "_weights"]
    assert [p.name for p in (entry / "shards").glob("*.h5")] == ["train-00000.h5"]

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stage, "store_weights", full_disk)
    with tiny_backbone():
        result = cli(*arguments)
    assert result.exit_code == 1 and stderr_lines(result) == ["error: the disk is full; free some space and run "
                                                             "the command again"], result.output
    assert [p.name for p in (entry / "shards").glob("*.h5")] == ["train-00000.h5"]
