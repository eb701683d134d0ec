"""Checkpointing with orbax: the train state, the data iterator's state and the config.

Layout: ``workdir/checkpoints/<step>/{state,data,config}``. ``state`` is the ``TrainState`` as a
dict (``step, params, opt_state`` and, as configured, ``frozen`` and ``ref_params``); ``data``
holds one JSON file per process with the iterator's ``get_state()`` (any object with
``get_state()/set_state()``: a grain ``DataLoader`` iterator returns bytes, a grain
``DatasetIterator`` a dict; both round-trip); ``config`` is the run's config as JSON.

Saves are asynchronous (the arrays are copied to host before ``save`` returns, so the state
may be donated to the next step right away). Restoring takes an abstract target whose
``jax.ShapeDtypeStruct`` leaves carry the *new* shardings, so a checkpoint written on one
mesh restores onto another.

Several processes: orbax writes each checkpoint once, together (each process its own array
shards, process 0 the metadata and the commit marker); a step directory without its commit
(a process killed mid-save) is ignored by ``latest_step``. The data state is one file per
process; a restart with another process count hands every saved file to the iterator's
``reshard_state`` (if it has one) to place the new hosts' shards where the old ones stopped.
Grain's own orbax handler (``grain.python.PyGrainCheckpointHandler``) writes the same
``process_<i>-of-<n>.json`` files but restores only the file of the current process index and
count, so it cannot resume on another process count; hence this handler.

Failures: an asynchronous save that failed (a full disk) is seen at the next step (``check``),
its temporary step directory removed, and raised as one ``CheckpointSaveError`` line; orbax's
own log lines of that failure (tracebacks) are dropped. A step that cannot be restored is
``set_aside`` as ``<step>.damaged`` (orbax lists numeric step names only).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from ppllava_jax.train.checkpoint_failures import SAVE_FAILURE_LOGS, CheckpointSaveError, one_line
from ppllava_jax.train.state import TrainState

PyTree = Any


# ----------------------------------------------------------------------------- data state


def encode_iterator_state(state: Any) -> str:
    """``get_state()`` result (bytes or a JSON-able object) -> a JSON string."""
    if isinstance(state, (bytes, bytearray)):
        try:
            return json.dumps({"format": "utf8", "value": bytes(state).decode("utf-8")})
        except UnicodeDecodeError:
            return json.dumps({"format": "base64", "value": base64.b64encode(state).decode()})
    return json.dumps({"format": "json", "value": state})


def decode_iterator_state(text: str) -> Any:
    d = json.loads(text)
    if d["format"] == "utf8":
        return d["value"].encode("utf-8")
    if d["format"] == "base64":
        return base64.b64decode(d["value"])
    return d["value"]


class DataStateHandler(ocp.CheckpointHandler):
    """One ``process_<i>-of-<n>.json`` per process (each host has its own data shard)."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return epath.Path(directory) / (
            f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        )

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        epath.Path(directory).mkdir(parents=True, exist_ok=True)
        self._file(directory).write_text(args.state)

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> str:
        """This process's saved state; when the checkpoint was written by another number of
        processes, every process's state (``{"format": "processes", "count": M,
        "states": [...]}``, see ``Checkpointer.restore``)."""
        f = self._file(directory)
        if f.exists():
            return f.read_text()
        found = {}
        for g in epath.Path(directory).glob("process_*-of-*.json"):
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", g.name)
            if m:
                found[(int(m.group(2)), int(m.group(1)))] = g
        counts = sorted({c for c, _ in found})
        if len(counts) != 1 or len(found) != counts[0]:
            raise FileNotFoundError(
                f"{f} is missing and {directory} holds no complete set of per-process data "
                f"states ({sorted(g.name for g in found.values())}); the data iterator cannot "
                "be resumed"
            )
        m = counts[0]
        states = [found[(m, i)].read_text() for i in range(m)]
        return json.dumps({"format": "processes", "count": m, "states": states})

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: str


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------- state <-> dict


def state_to_tree(state: TrainState, *, save_frozen: bool = True, save_reference: bool = True):
    """The saved part of a ``TrainState`` as a dict (None fields and excluded parts left out)."""
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if save_frozen and state.frozen:
        tree["frozen"] = state.frozen
    if save_reference and state.ref_params is not None:
        tree["ref_params"] = state.ref_params
    return tree


def config_to_dict(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


# ----------------------------------------------------------------------------- manager


class Checkpointer:
    """A thin wrapper over ``orbax.checkpoint.CheckpointManager``.

    Args:
      directory: where the step folders go (e.g. ``workdir/checkpoints``).
      save_every: ``should_save(step)`` is true every this many steps.
      keep: keep the last ``keep`` checkpoints (None: all).
      async_save: write in a background thread.
      save_frozen: also save the frozen parameters (a self-contained checkpoint); else they
        come from the initial parameters on restore.
      save_reference: also save the DPO reference; else it is rebuilt from the initial
        parameters on restore (it is a copy of them).
    """

    def __init__(
        self,
        directory: str | epath.Path,
        *,
        save_every: int = 1000,
        keep: int | None = 3,
        async_save: bool = True,
        save_frozen: bool = True,
        save_reference: bool = False,
    ):
        self.directory = epath.Path(directory)
        self.save_frozen, self.save_reference = save_frozen, save_reference
        self._last_saved: int | None = None
        self._writing: int | None = None  # the step an asynchronous save is writing
        # saved in each checkpoint's meta item (what its data position refers to, see
        # resume_check.data_identity); None: not recorded
        self.data_identity: dict | None = None
        absl_logger = logging.getLogger("absl")
        if SAVE_FAILURE_LOGS not in absl_logger.filters:
            absl_logger.addFilter(SAVE_FAILURE_LOGS)
        self.save_every = max(int(save_every), 1)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(save_every), 1),
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        if jax.process_count() > 1:
            # orbax syncs the processes while creating a missing root directory, but only those
            # that still find it missing: create it first so that no process enters that sync
            # alone (it would pair with another collective of the others)
            if jax.process_index() == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
            from ppllava_jax.sharding import process_barrier

            # every process opens the same Checkpointers (train/resume_check.py)
            process_barrier(f"checkpoint_dir:{self.directory}")
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Every ``save_every`` steps (orbax's own rule would also save the first step)."""
        return step > 0 and step % self.save_every == 0

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_iterator: Any = None,
        config: Any = None,
        force: bool = False,
    ) -> bool:
        """Save (asynchronously) if ``should_save(step)`` or ``force``; True if a save started.

        The iterator's state is read now, synchronously, so the loop may advance it at once.
        """
        if not force and not self.should_save(step):
            return False
        if step == self._last_saved or step in self.all_steps():
            return False
        items = {
            "state": ocp.args.StandardSave(
                state_to_tree(
                    state, save_frozen=self.save_frozen, save_reference=self.save_reference
                )
            )
        }
        meta: dict[str, Any] = {"state_keys": sorted(items["state"].item)}
        if self.data_identity is not None:
            meta["data"] = self.data_identity
        items["meta"] = ocp.args.JsonSave(meta)
        if data_iterator is not None:
            items["data"] = DataStateSave(encode_iterator_state(data_iterator.get_state()))
        if config is not None:
            items["config"] = ocp.args.JsonSave(config_to_dict(config))
        try:
            saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - this save or the previous background one
            raise self._save_failed(self._writing or step, e) from e
        if saved:
            self._last_saved = int(step)
            self._writing = int(step) if self.manager.is_saving_in_progress() else None
        return saved

    def check(self) -> None:
        """Raise ``CheckpointSaveError`` if the background save has failed (once it ended;
        cheap while it runs: no wait)."""
        if self._writing is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def _save_failed(self, step: int, error: BaseException) -> CheckpointSaveError:
        """The error to raise for the failed save of ``step``, its temporary directory
        removed."""
        self._writing = None
        if jax.process_index() == 0:
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        self.manager.reload()
        latest = self.latest_step()
        kept = f"the newest complete one is step {latest}" if latest is not None else "none"
        return CheckpointSaveError(
            f"writing checkpoint step {step} to {self.directory} failed ({one_line(error)}); "
            f"nothing of it was kept ({kept}). Make room there (or lower checkpoint.keep) and "
            "run the same command again: it resumes from the newest complete checkpoint"
        )

    def set_aside(self, step: int) -> str:
        """Rename step ``step``'s directory to ``<step>.damaged`` (a new name if taken) so that
        the run goes on from an earlier step and may save ``step`` again; returns the path."""
        src = self.directory / str(step)
        dst, n = self.directory / f"{step}.damaged", 1
        if jax.process_index() == 0:
            while dst.exists():
                dst, n = self.directory / f"{step}.damaged.{n}", n + 1
            src.rename(dst)
        if jax.process_count() > 1:
            from ppllava_jax.sharding import process_barrier

            process_barrier(f"checkpoint_set_aside:{self.directory}")
        self.manager.reload()
        return str(dst)

    def meta(self, step: int) -> dict:
        """Step ``step``'s meta item: ``state_keys`` and, if recorded, ``data``."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return dict(self.manager.restore(int(step), args=args)["meta"])

    def restore(
        self,
        target: TrainState,
        *,
        step: int | None = None,
        data_iterator: Any = None,
        initial: TrainState | None = None,
    ) -> TrainState:
        """Restore the state at ``step`` (default: latest) onto ``target``'s shapes/shardings.

        Args:
          target: an abstract ``TrainState`` (``jax.ShapeDtypeStruct`` leaves with the
            shardings wanted now) or a concrete one.
          data_iterator: if given, its ``set_state`` receives the saved iterator state.
          initial: supplies ``frozen`` / ``ref_params`` when they were not saved.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        step_dir = self.directory / str(step)
        saved = {p.name for p in step_dir.iterdir()} if step_dir.exists() else set()
        keys = self._state_keys(step)
        have_frozen, have_ref = "frozen" in keys, "ref_params" in keys
        tree_target = state_to_tree(target, save_frozen=have_frozen, save_reference=have_ref)
        tree_target = jax.tree.map(_as_abstract, tree_target)
        items = {"state": ocp.args.StandardRestore(tree_target)}
        if data_iterator is not None:
            if "data" not in saved:
                raise FileNotFoundError(f"checkpoint {step_dir} has no data-iterator state")
            items["data"] = DataStateRestore()
        out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        tree = out["state"]
        if data_iterator is not None:
            data_iterator.set_state(self._data_state(out["data"], data_iterator, step_dir))

        def from_initial(name):
            if initial is None or getattr(initial, name) is None:
                raise ValueError(
                    f"checkpoint {step_dir} has no {name}: pass initial= to restore them"
                )
            return getattr(initial, name)

        frozen = tree["frozen"] if "frozen" in tree else (target.frozen and from_initial("frozen"))
        ref = None
        if target.ref_params is not None:
            ref = tree["ref_params"] if "ref_params" in tree else from_initial("ref_params")
        return TrainState(
            step=tree["step"],
            params=tree["params"],
            frozen=frozen if frozen else {},
            opt_state=tree["opt_state"],
            ref_params=ref,
        )

    @staticmethod
    def _data_state(text: str, data_iterator: Any, step_dir: Any) -> Any:
        """The iterator state to resume from: this process's own, or, after a change of the
        process count, ``data_iterator.reshard_state(old_states, process_index,
        process_count)`` computed from every old process's state."""
        d = json.loads(text)
        if d.get("format") != "processes":
            return decode_iterator_state(text)
        old = [decode_iterator_state(t) for t in d["states"]]
        reshard = getattr(data_iterator, "reshard_state", None)
        if reshard is None:
            raise ValueError(
                f"{step_dir} was written by {d['count']} processes, this run has "
                f"{jax.process_count()}, and the data iterator has no reshard_state(): rerun "
                f"with {d['count']} processes"
            )
        return reshard(old, jax.process_index(), jax.process_count())

    def _state_keys(self, step: int) -> list[str]:
        return list(self.meta(step)["state_keys"])

    def restore_config(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / "config").exists():
            return None
        return self.manager.restore(
            int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )["config"]

    def wait(self) -> None:
        """Wait for the background save; ``CheckpointSaveError`` if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the background error
            raise self._save_failed(self._writing or self._last_saved or 0, e) from e
        self._writing = None

    def close(self) -> None:
        """Wait for the background save (``CheckpointSaveError`` if it failed) and close."""
        try:
            self.wait()
        finally:
            self.manager.close()


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None:
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
