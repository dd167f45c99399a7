"""Refuse a folder tree that looks wrong before any work, saying why and what to use.

An image folder is read as `root/<class>/*` (or `root/<split>/<class>/*`): every folder
at that level becomes a class. Pointed at a dataset with another layout, that silently
mislabels it (Tiny-ImageNet's `val/images/` becomes a class called "images", Food-101
becomes two classes, `images` and `meta`). So before anything is listed or computed:

- a folder matching a known dataset's layout is refused with the named source to use
  (`tinyimagenet:`, `food101:`, `sun397:`, `cifar10:`, `cifar100:`);
- a class folder named `images`, a class folder holding no image, classes that appear
  only in val/test, a single class, classes spelt two ways (`Dog`/`dog`, `1`/`1.0`),
  images lying outside any class folder, folders or images beside the split folders,
  class folders holding only subfolders, a split folder holding no image, and one file
  reached twice through a link are refused with the reason.

Named datasets (`caltech101:`, `dtd:`, `tinyimagenet:`, ...) get the checks that apply
to any labelled listing (`check_classes`): a damaged or partial copy shows as one class,
or a class only in val/test. `--allow-layout` (`ExtractSpec.allow_layout`) skips these
checks for the rare dataset that really is laid out that way (an empty split folder is
then a warning).
"""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

from ..errors import SourceError

OVERRIDE = "pass --allow-layout if this really is the layout you mean"
log = logging.getLogger("featurecache")


def _first(names: list[str], count: int = 3) -> str:
    shown = ", ".join(names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def _spelling_key(name: str) -> str:
    # NFC: macOS writes "café" decomposed; strip: "cat " beside "cat"
    text = unicodedata.normalize("NFC", name).strip()
    try:
        value = float(text)
    except ValueError:
        return text.casefold()
    return repr(value) if value == value else text.casefold()  # "1", "01", "1.0" -> 1.0


def refuse_spelling_twins(where: str, names, *, what: str = "class") -> None:
    """Names that differ only in case, number format, surrounding spaces or Unicode form (`Dog`/`dog`,
    `1`/`1.0`, `2`/`02`, `cat `/`cat`) would be separate classes, each with part of the images:
    almost always one class typed two ways."""
    seen: dict[str, str] = {}
    for name in sorted(names):
        twin = seen.setdefault(_spelling_key(name), name)
        if twin != name:
            raise SourceError(f"{where}: {what}s {twin!r} and {name!r} differ only in case, number format, spaces "
                              f"or Unicode form and would be two classes; write them the same way, or {OVERRIDE}")


def known_layout(root: Path) -> tuple[str, str] | None:
    """(named source to use, what was recognised) when `root` is a known dataset's folder."""
    candidates = [(root, root)] + [(root / name, root) for name in
                                   ("tiny-imagenet-200", "food-101", "cifar-10-batches-py", "cifar-100-python", "SUN397")]
    for base, given in candidates:
        if not base.is_dir():
            continue
        if (base / "wnids.txt").is_file() and ((base / "val" / "val_annotations.txt").is_file()
                                               or (base / "train").is_dir()):
            return f"tinyimagenet:{given}", "the Tiny-ImageNet layout (wnids.txt, train/<wnid>/images/, val/val_annotations.txt)"
        if (base / "meta" / "classes.txt").is_file() and (base / "images").is_dir():
            return f"food101:{given}", "the Food-101 layout (images/<class>/, meta/classes.txt, meta/train.txt, meta/test.txt)"
        if (base / "ClassName.txt").is_file():
            return f"sun397:{root if base == root / 'SUN397' else root.parent}", \
                "SUN397's layout (ClassName.txt, <letter>/<class>/*.jpg)"
        if (base / "batches.meta").is_file() or (base / "data_batch_1").is_file():
            return f"cifar10:{given}", "CIFAR-10's python batches (data_batch_1..5, test_batch, batches.meta)"
        if (base / "meta").is_file() and ((base / "train").is_file() or (base / "test").is_file()):
            return f"cifar100:{given}", "CIFAR-100's python batches (train, test, meta)"
    return None


def check_beside_splits(root: Path, split_dirs: dict[str, Path], others: dict[str, int], loose: int) -> None:
    """With split folders, nothing else at the top is read: folders of images beside them (a
    `holdout/`, or the other classes of a flat layout that has a class named `train`) and
    images lying there vanished without a word."""
    splits = ", ".join(f"{d.name}/" for d in split_dirs.values())
    unread = sorted(name for name, count in others.items() if count)
    if unread:
        count = sum(others[name] for name in unread)
        raise SourceError(f"{root}: folder(s) {_first(unread)} sit beside the split folder(s) {splits} but are not "
                          f"train, val or test, so their {count} image(s) would not be read. If they are classes of "
                          f"a flat layout, a class named like a split ({splits}) made it look split: rename that "
                          f"class folder; otherwise move them away, or {OVERRIDE}")
    if loose:
        raise SourceError(f"{root}: {loose} image(s) lie beside the split folder(s) {splits}, in no split, and would "
                          f"not be read; move them into a split's class folders, or {OVERRIDE}")


def refuse_labelled_as_unlabeled(root: Path, folder: Path, split: str, subfolders: set[str]) -> None:
    """`--unlabeled SPLIT` on a split whose images sit in several folders (`subfolders`: those of
    `folder` holding images): they look like class folders, and their labels would be dropped
    without a word (one folder, as Tiny-ImageNet's `test/images/`, is a container)."""
    holding = sorted(subfolders)
    if len(holding) > 1:
        raise SourceError(f"{root}: {folder.name}/ holds {len(holding)} folders of images ({_first(holding)}), which "
                          f"look like class folders; --unlabeled {split} would drop their labels. Leave out "
                          f"--unlabeled {split}, or {OVERRIDE}")


def refuse_empty_splits(root: Path, split_dirs: dict[str, Path], images: dict[str, int], *,
                        allow_layout: bool) -> None:
    """`images[split]`: the images found in that split folder. One holding none (a copy or unzip that
    stopped short) was dropped without a word: the cache had no such split, and heads were scored on
    another (val for test) as if nothing were missing. With `allow_layout`, a warning."""
    empty = [f"{split_dirs[split].name}/" for split, found in images.items() if not found]
    if not empty or not any(images.values()):
        return  # no image at all: the caller says so
    if allow_layout:
        log.warning("%s: no image found in %s; the cache has no such split", root, _first(empty))
        return
    raise SourceError(f"{root}: the split folder(s) {_first(empty)} hold no image, so the cache would have no such "
                      f"split and heads would be scored without it; put its images there (a copy that stopped "
                      f"short?), remove the empty folder, or {OVERRIDE}")


def check_class_depth(root: Path, depths: dict[str, bool]) -> None:
    """`depths[class folder]`: whether it holds an image directly. When none does, the images
    sit a level deeper everywhere (`a/abbey/*.jpg`) and the classes read are that level's
    grouping (the letters a, b, ...), not the classes."""
    if depths and not any(depths.values()):
        names = sorted(depths)
        raise SourceError(f"{root}: no class folder holds an image directly ({_first(names)} hold only subfolders), "
                          "so every image would be labelled with the folder above its own; point at the folder whose "
                          f"subfolders are the classes, use a named source (featurecache sources lists them), or "
                          f"{OVERRIDE}")


def refuse_same_files(where: str, root: Path, relpaths: list[str]) -> None:
    """One file reached twice (a symlinked class folder `cat2 -> cat`, a test image linked to a
    train one, a hard link): it trains on itself, or leaks into the scores. Found by inode; an
    unreadable file is left to extraction, which skips it with its reason."""
    seen: dict[tuple[int, int], str] = {}
    for relpath in relpaths:
        try:
            status = (root / relpath).stat()
        except OSError:
            continue
        first = seen.setdefault((status.st_dev, status.st_ino), relpath)
        if first != relpath:
            raise SourceError(f"{where}: {first} and {relpath} are the same file (a link), so one image would be "
                              f"listed twice, across splits or classes; remove the link, or {OVERRIDE}")


def check_known_layout(root: Path) -> None:
    """Refuse to read a known dataset's folder as an image folder."""
    found = known_layout(root)
    if found:
        use, what = found
        raise SourceError(f"{root} has {what}; read as an image folder its labels would be wrong. "
                          f"Use {use} instead (or {OVERRIDE})")


def check_image_folder(root: Path, counts: dict[str, dict[str, int]], loose: dict[str, int], *,
                       has_splits: bool) -> None:
    """`counts[split][class folder]` = images in it; `loose[split]` = images outside class folders."""
    def where(split: str, name: str = "") -> str:
        return "/".join(part for part in ((split if has_splits else ""), name) if part)

    for split, classes in counts.items():
        for name in classes:
            if name.lower() == "images":
                raise SourceError(
                    f"{root}: a class folder is named {where(split, name)!r}: images look one level deeper than "
                    f"<class>/<image> (as in Tiny-ImageNet's val/images/ or Food-101's images/<class>/), so every "
                    f"image there would get the class 'images'. Point at the folder whose subfolders are the "
                    f"classes, use a named source (featurecache sources lists them), or {OVERRIDE}")
    if not loose and not any(n for classes in counts.values() for n in classes.values()):
        return  # no image at all: the caller says so
    held = {name: [f"{split}/" for split, classes in counts.items() if classes.get(name)]
            for classes in counts.values() for name in classes}
    empty = [(split, name) for split, classes in counts.items() for name, n in classes.items() if n == 0]
    unused = [where(split, name) for split, name in empty if not held[name]]
    if unused:
        raise SourceError(f"{root}: {len(unused)} class folder(s) hold no image ({_first(unused)}); each would count "
                          f"as a class nothing is labelled with. Remove them or {OVERRIDE}")
    if empty:  # a test/bees/ left empty while train/bees/ has images: test would score no bees
        split, name = empty[0]
        more = f" (and {len(empty) - 1} more empty class folder(s))" if len(empty) > 1 else ""
        raise SourceError(f"{root}: the class folder {where(split, name)}/ holds no image{more}, though {name} has "
                          f"images in {', '.join(held[name])}, so {split} would score no {name}; put its {split} "
                          f"images there (a copy that stopped short?), remove the empty folder, or {OVERRIDE}")
    for split, count in loose.items():
        folder = where(split) or "the top folder"
        hint = (f"pass --unlabeled {split} to cache them as an unlabelled split to predict on" if has_splits
                else "move them into class folders")
        raise SourceError(f"{root}: {count} image(s) lie in {folder} outside any class folder and would be "
                          f"ignored; {hint}, or {OVERRIDE}")
    train = set(counts.get("train", {}))
    for split in ("val", "test"):
        extra = sorted(set(counts.get(split, {})) - train)
        if extra and "train" in counts:
            raise SourceError(f"{root}: class(es) {_first(extra)} appear in {split}/ but not in train/, so no head "
                              f"can learn them (check the folder names), or {OVERRIDE}")
    classes = sorted({name for split_classes in counts.values() for name in split_classes})
    refuse_spelling_twins(str(root), classes, what="class folder")
    if len(classes) == 1:
        raise SourceError(f"{root}: only one class folder ({classes[0]!r}); a classifier needs two or more, so "
                          f"point at the folder that holds the class folders, or {OVERRIDE}")


def check_classes(where: str, classes: list[str], samples: list, *, what: str = "class") -> None:
    """The checks that apply to any labelled listing (a CSV): one class, classes only in val/test,
    classes spelt two ways."""
    refuse_spelling_twins(where, classes, what=what)
    if len(classes) == 1:
        raise SourceError(f"{where}: every row has the same {what} ({classes[0]!r}); a classifier needs two or "
                          f"more classes, or {OVERRIDE}")
    in_train = {s.label for s in samples if s.split == "train"}
    if in_train:
        for split in ("val", "test"):
            extra = sorted({classes[s.label] for s in samples if s.split == split and s.label >= 0
                            and s.label not in in_train})
            if extra:
                raise SourceError(f"{where}: {what}(s) {_first(extra)} appear in {split} but not in train, so no "
                                  f"head can learn them, or {OVERRIDE}")
