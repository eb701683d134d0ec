"""Train PPLLaVA: SFT or DPO, on one CPU or a TPU/GPU mesh, resuming automatically.

    python train.py --config configs/demo.py --workdir runs/demo
    python train.py --config configs/ppllava_vicuna7b_videoonly.py --workdir gs://.../run1 \\
        --config.init_from=ckpt/ppllava_start --config.optimizer.lr=1e-5

Logic lives in ``ppllava_jax.train.run``; this file only parses flags. List-valued fields take
JSON or Python lists (``--config.data.buckets='[256, 512]'``,
``--config.data.sources='[{"path": "train.json", "data_root": "media/"}]'``). A mistake (an
unknown config field, a missing file, a bad setting or unusable data) is printed as one
``error: ...`` line without a traceback (``PPLLAVA_TRACEBACK=1`` shows it).

SIGTERM (preemption) or Ctrl-C saves a checkpoint and stops with exit status 75 (EX_TEMPFAIL:
requeue the job; the same command resumes); a second Ctrl-C aborts at once, without saving.
``ppllava_jax/train/preemption.py`` says how to make SLURM and Kubernetes requeue on 75.

One run per work directory: a second one on a directory in use stops, naming the other process
(``<workdir>/train.lock``). A loss or gradient norm that became NaN/infinite, a checkpoint that
could not be written (a full disk) or a resume over another model or other data stops the run
with one ``error:`` line (exit status 1) and nothing non-finite saved or exported; a damaged
checkpoint is set aside and the run resumes from the one before it
(``--config.train.allow_data_change=True`` resumes over changed ``data.sources``, restarting the
data order).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ppllava_jax import command_line

command_line.allow_list_overrides()

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and data go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from ppllava_jax.train import run
    from ppllava_jax.train.preemption import REQUEUE_EXIT_CODE

    summary = command_line.report_user_errors(run.main, _CONFIG.value, _WORKDIR.value)
    if summary.get("preempted"):
        sys.exit(REQUEUE_EXIT_CODE)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
