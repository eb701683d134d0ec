"""DPO end to end: preference annotations -> 2B-row batches whose twins share their media ->
a tiny PPLLaVA trained with the sigmoid DPO loss against a fixed reference."""

import json
import math
import os

import jax
import numpy as np
import pytest

from configs import demo
from ppllava_jax import sharding
from ppllava_jax.data import collate as col
from ppllava_jax.data import dpo, synthetic
from ppllava_jax.data import pipeline as pl
from ppllava_jax.data import templates as tpl
from ppllava_jax.data.errors import AnnotationError
from ppllava_jax.data.skips import skip_reason
from ppllava_jax.layout import IGNORE_INDEX
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train import run, trainer
from tests.data.helpers import tiny_model

B = 3  # pairs per batch in the data tests


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic set, and a DPO file made from it: rejected = a wrong option; both
    spellings of the chosen answer; one sample without a rejected answer (skipped at load) and
    one with a missing video (skipped when read)."""
    out = str(tmp_path_factory.mktemp("syn"))
    info = synthetic.generate(out, num_train=8, num_eval=2, frames=8, size=32)
    anns = json.load(open(os.path.join(out, "train.json")))
    dpo = []
    for i, a in enumerate(anns):
        k = (a["answer_index"] + 1 + i % 3) % 4
        wrong = f"{a['candidates'][k]} ({'ABCD'[k]})"
        q, chosen = a["QA"][0]["q"], a["QA"][0]["a"]
        turn = {"q": q, "a": chosen} if i % 2 else {"q": q, "chosen": chosen}
        dpo.append(dict(a, QA=[dict(turn, rejected=wrong)], rejected_answer=wrong))
    dpo.append(dict(anns[0], QA=[{"q": anns[0]["QA"][0]["q"], "a": "x"}]))  # no rejected
    dpo.insert(3, dict(dpo[3], video="videos/missing.mp4"))
    path = os.path.join(out, "dpo.json")
    json.dump(dpo, open(path, "w"))
    return out, info, path


def _model(info):
    return tiny_model(info["image_token_id"], pinpoints=((32, 64), (64, 32)))


def _data_cfg(out, path, **kw):
    c = dict(
        sources=[dict(path=path, data_root=out)],
        tokenizer=os.path.join(out, "tokenizer"),
        clip_tokenizer=os.path.join(out, "clip_tokenizer"),
        num_frames=4,
        clip_max_length=48,
        max_length=128,
        buckets=[96, 128],
        batch_size=B,
        prefetch_batches=0,
        num_epochs=1,
        dpo=True,
    )
    c.update(kw)
    return c


def test_parse_both_spellings_and_errors():
    raw = {"video": "v.mp4", "QA": [{"q": "a?", "a": "yes"}, {"q": "b?", "chosen": "no"}]}
    s = dpo.parse_dpo_sample(
        dict(raw, QA=[raw["QA"][0], dict(raw["QA"][1], rejected="so")]), "f", 0
    )
    assert [t.a for t in s.turns] == ["yes", "no"] and s.extra["rejected"] == "so"
    s = dpo.parse_dpo_sample({"video": "v", "QA": [{"q": "q", "a": "y", "rejected": "n"}]}, "f", 0)
    assert s.turns[-1].a == "y" and s.extra["rejected"] == "n"
    for bad, msg in [
        (raw, "no 'rejected'"),
        ({"video": "v", "QA": [{"q": "q", "a": "y", "rejected": " y "}]}, "equal"),
        ({"video": "v", "QA": [{"q": "q", "a": "y", "chosen": "z", "rejected": "n"}]}, "both"),
    ]:
        with pytest.raises(AnnotationError, match=msg):
            dpo.parse_dpo_sample(bad, "f", 0)
        assert skip_reason(AnnotationError("f", 0, msg)) == "bad_annotation"


def test_collate_media_from_shares_items():
    cfg = _model({"image_token_id": 7})
    vid = col.Media("video", np.ones((4, 32, 32, 3), np.float32))
    vid2 = col.Media("video", 2 * np.ones((4, 32, 32, 3), np.float32))
    ids = np.array([1, 7, 5, 6], np.int32)
    samples = [
        col.Sample(ids, clip_ids=np.array([1, 2]), media=vid),
        col.Sample(ids, clip_ids=np.array([3, 4]), media=vid2),
        col.Sample(np.array([1, 7, 9, 9, 9]), media_from=1),  # reuses sample 1's video
        col.Sample(np.array([1, 7, 8]), media_from=0, media=vid2),  # its own media is ignored
    ]
    b = col.collate(samples, cfg)
    assert b["video_pixels"].shape[0] == 2  # two items, not four
    np.testing.assert_array_equal(b["video_pixels"][1], vid2.pixels)
    np.testing.assert_array_equal(b["video_clip_ids"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(b["visual_index"][2, :9], b["visual_index"][1, :9])
    np.testing.assert_array_equal(b["visual_index"][3, :9], b["visual_index"][0, :9])
    assert (b["visual_index"][0] >= 0).sum() == 8 and b["visual_index"][1, 1] == 8
    with pytest.raises(ValueError, match="media_from"):
        col.collate([samples[0], col.Sample(ids, media_from=2), samples[2]], cfg)
    with pytest.raises(ValueError, match="media_from"):
        col.collate([col.Sample(ids, media_from=0)], cfg)


def test_dpo_batches_twins_share_media_and_differ_on_answers(data):
    from transformers import AutoTokenizer

    out, info, path = data
    anns = json.load(open(path))
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    ctok = AutoTokenizer.from_pretrained(os.path.join(out, "clip_tokenizer"))
    p = pl.Pipeline(_data_cfg(out, path), _model(info))
    batches = list(p.iterator())
    assert len(batches) == 2  # 9 loadable samples, 1 missing video: 8 pairs, 2 full batches
    assert batches[-1]["meta"]["skipped"] == {"bad_annotation": 1, "missing_media": 1}
    seen = []
    for b in batches:
        n = b["input_ids"].shape[0]
        assert n == 2 * B and b["input_ids"].shape[1] in (96, 128) and b["valid"].all()
        assert b["video_pixels"].shape == (B, 4, 32, 32, 3)  # one item per pair
        assert b["meta"]["dpo_role"] == ["chosen"] * B + ["rejected"] * B
        assert b["meta"]["ids"][:B] == b["meta"]["ids"][B:]
        seen += b["meta"]["ids"][:B]
        for i in range(B):
            j = i + B
            vi = b["visual_index"]
            np.testing.assert_array_equal(vi[i], vi[j])
            assert set(np.unique(vi[i][vi[i] >= 0]) // 8) == {i}  # item i: 8 tokens
            a = anns[int(b["meta"]["index"][i])]
            for r, want in (
                (i, a["QA"][0].get("a", a["QA"][0].get("chosen"))),
                (j, a["rejected_answer"]),
            ):
                sup = b["labels"][r] != IGNORE_INDEX
                assert tok.decode(b["input_ids"][r][sup]).strip() == want + tok.eos_token
            # same prompt up to the answers; labels only on the answers
            first = np.flatnonzero(b["labels"][i] != IGNORE_INDEX)[0]
            assert first == np.flatnonzero(b["labels"][j] != IGNORE_INDEX)[0]
            np.testing.assert_array_equal(b["input_ids"][i, :first], b["input_ids"][j, :first])
            np.testing.assert_array_equal(b["labels"][i, :first], b["labels"][j, :first])
            # the pair's CLIP prompt is the question alone (no answer)
            want_clip, _ = tpl.encode_clip_prompt(
                ctok, tpl.clip_text_of([tpl.Turn(a["QA"][0]["q"])], True), 48
            )
            np.testing.assert_array_equal(b["video_clip_ids"][i], want_clip)
    assert len(set(seen)) == 6 and "dpo.json:3" not in seen  # the missing video is skipped
    p.close()


def test_bad_dpo_config(data):
    out, info, path = data
    with pytest.raises(ValueError, match="data.dpo"):
        pl.Pipeline(_data_cfg(out, path, array_record="/nowhere"), _model(info))


def _tiny_dpo_config(out, path, steps):
    from transformers import AutoTokenizer

    c = demo.get_config()
    c.model.vision = dict(c.model.vision, image_size=32, hidden_size=32, num_hidden_layers=2)
    c.model.frame_shape = (4, 4)
    c.model.pooling_kernel = c.model.pooling_stride = (1, 4, 4)
    c.model.btadapter_depth = 1
    c.model.image_grid_pinpoints = ((32, 64), (64, 32))
    c.model.llm = dict(c.model.llm, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    ctok = AutoTokenizer.from_pretrained(os.path.join(out, "clip_tokenizer"))
    c.model.clip_text = dict(
        c.model.clip_text,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=len(ctok),  # the tokenizer trained on this small set's text
        bos_token_id=ctok.bos_token_id,
        pad_token_id=ctok.pad_token_id,
    )
    c.data.update(_data_cfg(out, path, batch_size=4, num_epochs=0, clip_max_length=32))
    c.train.mode = "dpo"
    c.train.total_steps = steps
    c.train.log_every = 1
    c.optimizer.trainable = "llm_only"
    c.optimizer.lr = 1e-3
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.warmup_steps = -1
    c.checkpoint.save_every = 100
    c.checkpoint.async_save = False
    return c


def test_tiny_ppllava_trains_dpo_reference_fixed(data, tmp_path):
    out, _, path = data
    cfg = _tiny_dpo_config(out, path, steps=3)
    mcfg = run.model_config(cfg)
    run.check_tokenizers(cfg, mcfg)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    pipe = pl.Pipeline(cfg.data, mcfg)
    model = PPLLaVA(mcfg)
    with sharding.mesh_context(mesh):
        params, shardings = run.build_params(cfg, mcfg, mesh)
        init = jax.device_get(params)  # the buffers are donated to the state
        result = trainer.train(
            cfg,
            str(tmp_path),
            model_apply=run.make_apply(model),
            init_params=params,
            data_iterator=run.TrainBatches(pipe.iterator()),
            param_shardings=shardings,
            place_batch=lambda b: sharding.shard_batch(b, mesh),
        )
    pipe.close()
    assert result.step == 3 and not result.preempted
    st = jax.device_get(result.state)
    # the reference is the initial LLM, bit for bit; the policy moved; the rest is frozen
    ref_eq = jax.tree.map(np.array_equal, st.ref_params, {"language_model": init["language_model"]})
    assert all(jax.tree.leaves(ref_eq))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), st.params, st.ref_params)
    assert any(jax.tree.leaves(moved))
    frozen_eq = jax.tree.map(np.array_equal, st.frozen, {k: init[k] for k in st.frozen})
    assert all(jax.tree.leaves(frozen_eq)) and set(st.frozen) | {"language_model"} == set(init)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    # policy == reference at the first step: margin 0, loss log 2
    assert abs(recs[0]["loss"] - math.log(2)) < 1e-5
    assert abs(recs[0]["rewards/margins"]) < 1e-5
    assert recs[0]["num_samples"] == 4  # pairs
    assert all(np.isfinite(r["loss"]) for r in recs) and recs[-1]["loss"] != recs[0]["loss"]
