"""Names on disk: the one place that says where each part of a cache lives.

    <root>/
      _weights/<sha256>.safetensors      backbone checkpoints, stored once
      <source>-<arch>-<id12>/            an entry
        manifest.json                    the commit marker (cache/manifest.py)
        .lock                            the entry's writer lock
        shards/<split>-NNNNN.h5          features
        heads/<name>/head.safetensors    a fitted head (+ head.json, a copy to read)
        finetune/<run>/finetune.json     a finetune run (+ checkpoint, backbone and head .safetensors)
        report/report.html               the default report

No imports: every stage may use it.
"""

from __future__ import annotations

MANIFEST = "manifest.json"
LOCK = ".lock"
WEIGHTS_DIR = "_weights"
SHARDS_DIR = "shards"
VIEWS_DIR = "views"  # augmented view sets: views/<key>/manifest.json and views/<key>/shards/
HEADS_DIR = "heads"
HEAD_FILE = "head.safetensors"
HEAD_JSON = "head.json"
FINETUNE_DIR = "finetune"
FINETUNE_RECORD = "finetune.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
BACKBONE_FILE = "backbone.safetensors"  # a finetune run's backbone
REPORT_DIR = "report"
REPORT_FILE = "report.html"
#: Folders of an entry where writers leave temporary files (`verify` reports them).
FOLDERS_WITH_TEMPORARIES = (".", SHARDS_DIR, HEADS_DIR, FINETUNE_DIR, REPORT_DIR)


def shard_file(name: str) -> str:
    """A shard's path as the manifest lists it, relative to the entry."""
    return f"{SHARDS_DIR}/{name}"


def weights_file(sha256: str) -> str:
    """The backbone checkpoint's file name under `_weights/`."""
    return f"{sha256}.safetensors"


def finetune_run_name(head: str, unfreeze: str, from_cache: bool) -> str:
    """The folder of a finetune run given no name: `<head>-<unfreeze>[-cache]`."""
    return f"{head}-{unfreeze.replace('+', 'plus').replace(':', '')}" + ("-cache" if from_cache else "")
