"""Protocol parity with the original's drivers, processor, scoring and training dataset.

Every case of ``protocols.json`` in ``PPLLAVA_PROTOCOLS_DIR`` (default
``tests/fixtures/reference_protocols``) runs through the project's own code paths: the
benchmark readers and prompt builders, the frame rules, the scoring, the data pipeline's
sample encoder. Texts and ids are compared exactly, frame indices exactly, verdicts exactly.
The cases live in ``tests/evaluate/protocol/`` by benchmark; this module collects them all:

- ``mvbench_cases``: MVBench prompts, ids, CLIP texts, frames (videos and frame folders),
  ``get_index`` grid, verdicts, the results dict; the MVBench and Video-MME scoring tables;
  an MVBench directory read end to end through the pipeline.
- ``videomme_qa_cases``: Video-MME (parquet, options, subtitles, 32/64 frames, extraction),
  open-ended QA (MSVD, MSRVTT, ActivityNet frame folders, judge records) and VCGBench
  (prompts, judge records, saved files), each through its reader and the pipeline.
- ``training_cases``: training samples' ids, labels and CLIP text (legacy and non-legacy)
  through the pipeline's encoder; the training frame-sampling rules.
"""

from tests.evaluate.protocol.mvbench_cases import *  # noqa: F403
from tests.evaluate.protocol.training_cases import *  # noqa: F403
from tests.evaluate.protocol.videomme_qa_cases import *  # noqa: F403
