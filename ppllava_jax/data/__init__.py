"""Host-side input: annotations, media decoding, templates, tokenizers, the grain pipeline.

The data package loads its tokenizers with ``transformers``, which on import says "PyTorch was
not found. Models won't be available ..." where PyTorch is absent: true and irrelevant here
(no transformers model is used), so that one notice is filtered out of the ``transformers``
logger (a logging filter; nothing else is changed).
"""

import logging


class _NoTorchNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


def _quiet_transformers() -> None:
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _NoTorchNotice) for f in logger.filters):
        logger.addFilter(_NoTorchNotice())


_quiet_transformers()
