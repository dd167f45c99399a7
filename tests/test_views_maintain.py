"""View sets under `verify`, `verify --repair` and `info`: temporaries of a killed view write,
a tampered view manifest, stray files, and view sets left stale by a re-extraction (issue 18)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from featurecache import extract, open_cache
from featurecache.cache.atomic import temporary_path
from featurecache.cache.shards import file_sha256
from featurecache.cache.summary import describe_entry
from featurecache.cache.views import choose_view_set, load_views
from featurecache.maintain.verify import repair_entry, verify_entry

from helpers import write_image
from processes import run_cli, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli(folder: Path, root: Path, *extra: str) -> list[str]:
    return ["extract", str(folder), "--model", "tiny", "--weights", "random", "--image-size", "32", "--precision",
            "fp32", "--dtype", "float32", "--workers", "0", "--shard-size", "4", "--batch-size", "3", "--root",
            str(root), *extra]


def _entry(root: Path) -> Path:
    (entry,) = [p for p in root.iterdir() if p.name != "_weights"]
    return entry


def _set_bytes(entry: Path) -> dict[str, str]:
    return {f.relative_to(entry).as_posix(): file_sha256(f) for f in sorted((entry / "views").rglob("*.h5"))}


def _views(entry: Path, count: int) -> np.ndarray:
    cache = open_cache(entry)
    directory, manifest = choose_view_set(entry, cache.key, None)
    return load_views(cache, directory, manifest, "pool", count)


@pytest.fixture
def tiny():
    with tiny_backbone():
        yield


def test_verify_finds_and_repair_removes_what_a_killed_view_write_left(tmp_path):
    folder = tmp_path / "photos"
    for i in range(8):
        write_image(folder / "train" / ("ants" if i % 2 else "bees") / f"{i}.png", 300 + i)
    write_image(folder / "val" / "ants" / "v.png", 400)
    root = tmp_path / "cache"
    assert run_cli(_cli(folder, root), tmp_path / "plain.log") == 0
    killed = run_cli(_cli(folder, root, "--views", "2"), tmp_path / "killed.log", fault="after_append:3")
    assert killed == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    entry = _entry(root)
    (directory,) = (entry / "views").iterdir()
    listed = _set_bytes(entry)
    left = [f for f in directory.rglob("*") if ".tmp-" in f.name]
    assert len(left) == 1 and left[0].parent.name == "shards"  # the shard being written when it died
    # and what a kill inside the other two writes would leave: the view manifest's temporary, a file in views/
    extra = [temporary_path(directory / "manifest.json"), entry / "views" / ".stray.tmp-1-00000000"]
    for file in extra:
        file.write_bytes(b"partial")
    (directory / "notes.txt").write_text("not featurecache's")
    expected = {f.relative_to(entry).as_posix() for f in left + extra + [directory / "notes.txt"]}

    report = verify_entry(entry)
    assert {p.file for p in report.problems} == expected, report.problems
    assert set(report.stray_files) == expected and not report.bad_view_shards and not report.bad_view_sets
    before, after = repair_entry(entry)
    assert not before.ok and after.ok, after.problems
    assert not [f for f in (entry / "views").rglob("*") if ".tmp-" in f.name or f.name == "notes.txt"]
    assert _set_bytes(entry) == listed  # the listed shards are kept, byte for byte


def _with_views(tiny_spec, folder, **overrides):
    return extract(tiny_spec(folder, model="tiny", views=2, **overrides))


def test_a_tampered_view_manifest_is_found_and_the_set_made_again(image_folder, tiny_spec, tiny):
    result = _with_views(tiny_spec, image_folder)
    good, good_bytes = _views(result.path, 2), _set_bytes(result.path)
    manifest = result.views.path / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"seed": 0', '"seed": 7'))  # an edit; the seal no longer matches
    report = verify_entry(result.path)
    relative = f"views/{result.views.path.name}"
    assert [p.file for p in report.problems] == [f"{relative}/manifest.json"], report.problems
    assert "checksum" in report.problems[0].what and report.bad_view_sets == [relative]
    before, after = repair_entry(result.path)
    assert after.ok and not result.views.path.exists()  # an unreadable set is removed, never trusted
    again = _with_views(tiny_spec, image_folder)
    assert again.views.computed == 2 * 10 and _set_bytes(result.path) == good_bytes
    assert _views(result.path, 2).tobytes() == good.tobytes()


def test_a_view_set_left_stale_by_new_files_is_shown_by_info(image_folder, tiny_spec, tiny):
    old = _with_views(tiny_spec, image_folder)
    assert [label for label, _ in describe_entry(str(old.path))].count("view set") == 1
    write_image(image_folder / "train" / "ants" / "new.png", 999)
    new = _with_views(tiny_spec, image_folder)
    assert new.path == old.path and new.views.key != old.views.key  # same entry, new files: a new set
    lines = [value for label, value in describe_entry(str(new.path)) if label == "view set"]
    assert len(lines) == 2, lines
    stale = [line for line in lines if "stale" in line]
    assert len(stale) == 1 and stale[0].startswith(old.views.path.name) and str(old.views.path) in stale[0]
    assert "2 views of 10 train rows" in stale[0]
    current = next(line for line in lines if line.startswith(new.views.path.name))
    assert "stale" not in current and "2 views of 11 train rows" in current
    assert verify_entry(new.path).ok  # stale is not damage: its shards are intact
    shutil.rmtree(old.views.path)  # what info says frees it; the current set is untouched
    assert _views(new.path, 2).shape[:2] == (11, 2)
