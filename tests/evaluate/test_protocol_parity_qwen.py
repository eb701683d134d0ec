"""Protocol parity of the Qwen2 + SigLIP family with the original's drivers, video processor,
scoring and training dataset, run with its Qwen switch on.

Every case of ``protocols.json`` and ``pixel_values.npz`` in ``PPLLAVA_QWEN_PROTOCOLS_DIR``
(default ``tests/fixtures/reference_protocols_qwen``) runs through the project's own code
paths; texts and ids exactly, frame indices exactly, pixel values to 1e-6, verdicts exactly.
The cases live in ``tests/evaluate/protocol_qwen/`` by subject; this module collects them all:

- ``eval_cases``: MVBench, Video-MME (with and without subtitles), open-ended QA and VCGBench
  (with and without ``--system_vcg``) read with the Qwen family's protocol: prompts, ids, CLIP
  texts, frames (``get_index``, negative counts included), decoded texts, predictions, judge
  records, saved files, results and verdicts; the scoring tables; the evaluation pipeline's
  exact decode.
- ``video_processor_cases``: the Qwen video processor's pixels (aspect ratio kept, padded).
- ``training_cases``: the Qwen training samples' text, ids, labels, SigLIP text and readers.
"""

from tests.evaluate.protocol_qwen.eval_cases import *  # noqa: F403
from tests.evaluate.protocol_qwen.training_cases import *  # noqa: F403
from tests.evaluate.protocol_qwen.video_processor_cases import *  # noqa: F403
