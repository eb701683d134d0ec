"""``eval.py --dtype float16``: the model answers in float16 (compute and parameters), as the
original evaluates its checkpoints (``torch.float16``), and its greedy answers are the float32
ones: the tiny random checkpoint of ``tests/evaluate/tiny.py`` on the synthetic benchmark,
answered through ``cli.main`` (what ``eval.py`` runs) in both dtypes."""

import jax
import numpy as np
import pytest

from ppllava_jax.data import pipeline as pl
from ppllava_jax.evaluate import answers, cli, runner
from ppllava_jax.evaluate.model_setup import load_setup, place_batch
from ppllava_jax.evaluate.synthetic import Synthetic
from tests.evaluate.tiny import make_tiny_checkpoint

MESH = "data=1,fsdp=1,tensor=1"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval16")
    ckpt = make_tiny_checkpoint(str(root / "ckpt"), str(root / "data"))
    return root, ckpt


def _answer(root, ckpt, dtype: str, monkeypatch) -> tuple[dict, dict]:
    """{question id: generated ids} and the results of ``cli.main`` in ``dtype``."""
    ids, record = {}, runner.Answerer.record

    def keep(self, q, text, generated):
        ids[q.qid] = list(generated)
        return record(self, q, text, generated)

    monkeypatch.setattr(runner.Answerer, "record", keep)
    out = str(root / dtype / "results.json")
    res = cli.main(
        checkpoint=ckpt, benchmark="synthetic", data=str(root / "data"), out=out, mesh=MESH,
        dtype=dtype, batch_size=4, max_new_tokens=8, no_progress=True,
    )  # fmt: skip
    proto, _ = answers.read_protocol(out)
    assert proto["dtype"] == dtype  # a resume in the other dtype is refused
    return ids, res


def test_float16_greedy_answers_equal_float32(env, monkeypatch):
    root, ckpt = env
    setup = load_setup(ckpt, mesh=MESH, dtype="float16")
    assert setup.cfg.dtype == setup.cfg.param_dtype == "float16"
    assert setup.cfg.llm.dtype == setup.cfg.vision.dtype == "float16"
    # every weight (the projector's scalar logit scale is kept in float32 by the model)
    assert {str(x.dtype) for x in jax.tree.leaves(setup.params) if x.ndim} == {"float16"}
    ids32, res32 = _answer(root, ckpt, "float32", monkeypatch)
    ids16, res16 = _answer(root, ckpt, "float16", monkeypatch)
    assert len(ids32) == len(Synthetic(str(root / "data"), 8).questions()) > 0
    assert any(len(v) > 1 for v in ids32.values())  # more than an end token
    assert ids16 == ids32
    assert [r["prediction"] for r in res16["records"]] == [
        r["prediction"] for r in res32["records"]
    ]


def test_float16_logits_within_float16_tolerance(env):
    """The logits of the benchmark's first prompt batch (the runner's own pipeline), float16
    against float32: within float16's precision of their scale."""
    root, ckpt = env
    bench = Synthetic(str(root / "data"), num_frames=8)
    qs = bench.questions()[:4]
    logits = []
    for dtype in ("float32", "float16"):
        setup = load_setup(ckpt, mesh=MESH, dtype=dtype)
        data = runner.pipeline_config(
            setup, "s", bench.name, num_frames=8, answer_prefix=qs[0].answer_prefix,
            batch_size=4, max_new_tokens=8,
        )  # fmt: skip
        pipe = pl.Pipeline(
            data, setup.cfg, samples=[[runner.pipeline_sample(q, "s", i) for i, q in enumerate(qs)]]
        )
        host = next(iter(pipe.iterator()))
        pipe.close()
        batch, _ = pl.split_meta(host)
        batch.pop("valid"), batch.pop("labels", None)
        out = jax.jit(setup.model.apply)({"params": setup.params}, place_batch(batch, setup.mesh))
        mask = np.asarray(out["attention_mask"], bool)
        logits.append(np.asarray(out["logits"], np.float32)[mask])
    scale = float(np.abs(logits[0]).max())
    assert scale > 0
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-2 * scale)
