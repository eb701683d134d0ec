"""Exceptions of the data layer.

Everything a bad input can raise derives from :class:`DataError`, so a pipeline can skip the
sample, count it and log the message (which always names the file, and the sample index where
there is one), or re-raise it when the config says ``on_error="raise"``.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class: a sample that cannot be used. ``path`` names the offending file if known."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class MediaError(DataError):
    """A video, image, GIF or frame folder that is missing, unreadable, truncated or empty."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}", path=str(path))
        self.reason = reason


class AnnotationError(DataError):
    """A malformed annotation file or sample (names the file and the sample index)."""

    def __init__(self, path: str, index: int | None, reason: str):
        where = f"{path}" if index is None else f"{path} [sample {index}]"
        super().__init__(f"{where}: {reason}", path=str(path))
        self.index = index
        self.reason = reason


class SampleTooLongError(DataError):
    """A tokenized conversation longer than the maximum sequence length."""

    def __init__(self, length: int, max_length: int, path: str | None = None):
        super().__init__(
            f"{path or 'sample'}: {length} tokens exceed max_length={max_length}", path=path
        )
        self.length = length
        self.max_length = max_length
