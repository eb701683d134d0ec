"""How ``Checkpointer`` reports a failure: one line (``one_line``) in a ``CheckpointSaveError``
for a save, orbax's own log records of it (tracebacks, hundreds of lines for TensorStore)
dropped by the ``SAVE_FAILURE_LOGS`` filter on the ``absl`` logger."""

from __future__ import annotations

import logging
import sys


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (said in one line)."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of the message of the error that caused ``error`` (TensorStore's run to
    pages, the cause says what was wrong), at most ``limit`` characters, after its type when
    the message does not say it."""
    for _ in range(8):
        cause = error.__cause__ or error.__context__
        if cause is None:
            break
        error = cause
    text = next((x.strip() for x in str(error).splitlines() if x.strip()), "")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text if isinstance(error, OSError) and text else f"{type(error).__name__}: {text}"


class _SaveFailureLogs(logging.Filter):
    """Drops orbax's log records of a failed background save: ``Checkpointer.check`` reports
    the failure itself, in one line."""

    PATTERNS = ("in background save thread", "Save Finalize thread", "Checkpointer failed")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        return not any(p in str(record.msg) for p in self.PATTERNS)


SAVE_FAILURE_LOGS = _SaveFailureLogs()


# orbax's per-array read coroutine: abandoned when another array's read failed, it raises
# its own read error when closed
_ORBAX_READS = ("_read_array_index_and_device_put",)


def _is_late_read_callback(unraisable: object) -> bool:
    error = getattr(unraisable, "exc_value", None)
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(getattr(unraisable, "object", None), "cr_code", None)
    return code is not None and code.co_name in _ORBAX_READS


class _UnretrievedReads(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of those abandoned reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "exception was never retrieved" not in text:
            return True
        return not any(r in text for r in ("Error reading", "reading array index"))


def quiet_late_read_callbacks() -> None:
    """Stops the tracebacks TensorStore and orbax print after a failed restore (idempotent).

    When one array of a damaged checkpoint fails to read, orbax's restore returns at once and
    closes its event loop; the other reads still in flight then finish and their completion
    callbacks (``loop.call_soon_threadsafe``) raise ``RuntimeError('Event loop is closed')``,
    and the abandoned read coroutines raise their own read errors when closed (both reach
    ``sys.unraisablehook``) or leave them in futures nobody reads (asyncio logs "exception was
    never retrieved"): tracebacks on stderr, from other threads, around the one-line report.
    Only those are dropped; everything else is printed as before."""
    if getattr(sys.unraisablehook, "_ppllava_quiet", False):
        return
    logging.getLogger("asyncio").addFilter(_UnretrievedReads())
    previous = sys.unraisablehook

    def hook(unraisable: object) -> None:
        if not _is_late_read_callback(unraisable):
            previous(unraisable)

    hook._ppllava_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
