"""Every failure a user can cause or fix raises a `FeatureCacheError` subclass.

The message says what to do. `exit_code` tells the CLI how to exit: 2 for bad input
(the user can fix the command), 1 for a failure at run time.
"""

from __future__ import annotations


class FeatureCacheError(Exception):
    """Base class of all expected featurecache failures."""

    exit_code = 1


class UsageError(FeatureCacheError):
    """Bad input: a wrong option, a missing path, an unknown name."""

    exit_code = 2


class SourceError(UsageError):
    """The dataset cannot be read or is empty."""


class BackboneError(UsageError):
    """Unknown architecture, weights or tap."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights are not on this machine and cannot be downloaded."""


class UnsafeCheckpointError(BackboneError):
    """A checkpoint holds something other than tensors and was refused."""


class CacheNotFoundError(UsageError):
    """No cache entry at the given path."""


class CacheIncompleteError(FeatureCacheError):
    """The entry's extraction has not finished; rerunning extract resumes it."""


class CorruptCacheError(FeatureCacheError):
    """A shard or the manifest is damaged; `featurecache verify` reports and repairs."""


class InvalidRecordError(CorruptCacheError):
    """A manifest or head record has a field of the wrong type or value (hand-edited or
    damaged): the message names the file and the field. Bad input, so exit code 2."""

    exit_code = 2


class CacheLockedError(FeatureCacheError):
    """Another process is writing the same cache entry."""


class MismatchError(UsageError):
    """A head or checkpoint does not belong to the cache it is used with."""


class ExtractionError(FeatureCacheError):
    """Extraction failed at run time (unreadable images under --on-error fail, bad values)."""


class HeadError(UsageError):
    """Unknown head, bad head parameters, or a head that is missing."""


class NameTakenError(UsageError):
    """A head, ensemble or finetune run would replace an existing one without --overwrite."""


class StaleError(MismatchError):
    """An artifact was made from inputs that have changed since (a refitted ensemble member)."""


class StorageError(FeatureCacheError):
    """Writing failed: disk full, read-only file system, permission denied; nothing partial was kept."""


class UnreadableImageError(SourceError):
    """An image could not be decoded and --on-error fail was asked for."""
