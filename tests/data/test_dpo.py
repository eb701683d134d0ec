"""Preference annotations (data/dpo.py): parsing, loading, skipping bad pairs."""

import json

import pytest

from ppllava_jax.data import dpo
from ppllava_jax.data.errors import AnnotationError
from ppllava_jax.data.skips import LoadCounter


def test_chosen_spellings_and_earlier_turns():
    raw = {
        "video": "v.mp4",
        "QA": [{"q": "a?", "a": "yes"}, {"q": "b?", "chosen": "no", "rejected": "so"}],
    }
    s = dpo.parse_dpo_sample(raw, "f.json", 3, data_root="/r")
    assert [t.a for t in s.turns] == ["yes", "no"] and s.extra["rejected"] == "so"
    assert s.media == ("/r/v.mp4",) and s.index == 3
    same = {"video": "v", "QA": [{"q": "q", "a": "y", "chosen": "y", "rejected": "n"}]}
    assert dpo.parse_dpo_sample(same, "f", 0).turns[-1].a == "y"  # a == chosen is allowed


@pytest.mark.parametrize(
    "qa, msg",
    [
        ([{"q": "q", "a": "y"}], "no 'rejected'"),
        ([{"q": "q", "a": "y", "rejected": "  "}], "no 'rejected'"),
        ([{"q": "q", "a": "y", "rejected": " y "}], "equal"),
        ([{"q": "q", "a": "y", "chosen": "z", "rejected": "n"}], "both 'a' and 'chosen'"),
        ([{"q": "q", "rejected": "n"}], "must be a non-empty string"),
    ],
)
def test_bad_pairs_name_the_sample(qa, msg):
    with pytest.raises(AnnotationError, match=rf"f\.json \[sample 5\].*{msg}"):
        dpo.parse_dpo_sample({"video": "v", "QA": qa}, "f.json", 5)


def test_load_skips_and_counts_bad_pairs(tmp_path):
    good = {"video": "v.mp4", "QA": [{"q": "q", "a": "y", "rejected": "n"}]}
    bad = {"video": "v.mp4", "QA": [{"q": "q", "a": "y"}]}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([good, bad, good]))
    counter = LoadCounter()
    pairs = dpo.load_dpo_annotation_file(str(path), skipped=counter)
    assert [p.index for p in pairs] == [0, 2] and all(p.extra["rejected"] == "n" for p in pairs)
    assert counter.total == 1 and counter.by_reason == {"bad_annotation": 1}
    with pytest.raises(AnnotationError, match=r"\[sample 1\]"):
        dpo.load_dpo_annotation_file(str(path), on_error="raise")


# -- pairs encoded as the original's train_dpo.py encodes them ---------------------------------
#
# The reference: transformers' Llama tokenizer of the Vicuna protocol fixture (the Llama 2
# vocabulary, <image> added as the original's llava-v1.6-vicuna-7b-hf has it) on the text the
# original's train_dpo.py builds (farewellthree/PPLLaVA ppllava/train/train_dpo.py at its HEAD):
# - l.44 + l.790-792: the conversation is conv_templates["vicuna_v1"] / ["v1"] (the DPO yaml's
#   `version: 'v1'`): LLaVA's conv_vicuna_v1, separator style TWO, sep " ", sep2 "</s>", roles
#   USER / ASSISTANT; its get_prompt writes system + sep, then per message role + ": " + message
#   + (sep, sep2)[i % 2];
# - l.557-560 (DPODataset.__getitem__, video): prompt.replace("<video>", "").strip(), then
#   "<image>\n" + prompt; l.669-670 (tokenize_batch_element): make_conv(prompt, chosen) and
#   make_conv(prompt, rejected), each through preprocess -> preprocess_v1;
# - l.354 (preprocess_v1 via tokenizer_X_token, no <video> to split at): tokenizer(prompt)
#   .input_ids of the whole text, BOS added by the tokenizer;
# - l.367-395: labels: BOS ignored, each round (split at sep2) ignored up to
#   len(tokenizer(parts[0] + " ASSISTANT: ")) - 2 tokens, the rest of the round supervised,
#   everything after the last round ignored;
# - l.690-691: the CLIP prompt is prompt.split("<image>\n")[1], the stripped question.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

PAIRS = [
    ("<video>\n What is the man doing in the video?  ", "He is slicing bread.", "He sleeps."),
    ("Describe the video in detail.", " A red car drives past.\nThen it stops.", "Nothing."),
    ("How many dogs appear? Answer with a number.", "2 dogs", "Five cats, 3 birds"),
]


def _reference_tokenizer():
    from transformers import AddedToken, LlamaTokenizerFast

    from tests.evaluate.protocol.fixture import tokenizer_dir

    tok = LlamaTokenizerFast.from_pretrained(tokenizer_dir())
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    return tok


def _original_twin(tok, prompt: str, answer: str) -> tuple[list[int], list[int], str]:
    """ids, labels and CLIP text of one twin, by the rules cited above."""
    prompt = "<image>\n" + prompt.replace("<video>", "").strip()
    text = f"{VICUNA_V1_SYSTEM} USER: {prompt} ASSISTANT: {answer}</s>"
    ids = tok(text).input_ids
    labels = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [-100] * cur
    for rou in text.split("</s>"):
        if rou == "" or len(rou.split(sep)) != 2:
            break
        instruction = len(tok(rou.split(sep)[0] + sep).input_ids) - 2
        labels[cur : cur + instruction] = [-100] * instruction
        cur += len(tok(rou).input_ids)
    labels[cur:] = [-100] * (len(labels) - cur)
    assert cur == len(ids)
    return ids, labels, prompt.split("<image>\n")[1]


@pytest.fixture(scope="module")
def dpo_clip_dir(tmp_path_factory):
    from ppllava_jax.data.tokenizers import train_clip_tokenizer

    d = tmp_path_factory.mktemp("clip")
    train_clip_tokenizer([p for p, _, _ in PAIRS] * 3, d, num_merges=32)
    return str(d)


def test_recipe_encodes_pairs_as_the_original(tmp_path, dpo_clip_dir):
    """configs/ppllava_vicuna7b_dpo.py's data section, through the project's pipeline
    (``Preprocess.decode`` of each pair, its video a frame folder): chosen and rejected ids and
    labels equal the reference tokenizer's on the original's text, the CLIP prompt is the
    stripped question (tokenized as every CLIP prompt), both twins share it."""
    from PIL import Image

    from configs import ppllava_vicuna7b_dpo
    from ppllava_jax.data import pipeline as pl
    from tests.data.helpers import tiny_model
    from tests.evaluate.protocol.fixture import tokenizer_dir

    frames = tmp_path / "clip"
    frames.mkdir()
    for k in range(4):
        Image.new("RGB", (12, 10), (40 * k, 0, 0)).save(frames / f"{k:05d}.jpg")
    path = tmp_path / "pairs.json"
    anns = [{"video": "clip", "QA": [{"q": p, "a": c, "rejected": r}]} for p, c, r in PAIRS]
    path.write_text(json.dumps(anns))
    cfg = ppllava_vicuna7b_dpo.get_config().data.to_dict()
    assert (cfg["dpo"], cfg["template"], cfg["text_encoding"]) == (True, "vicuna_v1", "original")
    cfg.update(
        sources=[dict(path=str(path), data_root=str(tmp_path))],
        tokenizer=tokenizer_dir(),
        clip_tokenizer=dpo_clip_dir,
        num_frames=2,
        max_length=4096,
        buckets=[4096],
        batch_size=1,
        num_workers=0,
        prefetch_batches=0,
        on_error="raise",
    )
    tok = _reference_tokenizer()
    pipe = pl.Pipeline(cfg, tiny_model(tok.convert_tokens_to_ids("<image>"), pad_token_id=0))
    pre = pipe.preprocess
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        rec = pre.decode(pipe.samples[0][i], 0, i)
        ids, labels, clip = _original_twin(tok, prompt, chosen)
        assert rec["input_ids"].tolist() == ids
        assert rec["labels"].tolist() == labels
        ids, labels, _ = _original_twin(tok, prompt, rejected)
        assert rec["rejected_input_ids"].tolist() == ids
        assert rec["rejected_labels"].tolist() == labels
        want = pre.clip_tokenizer(clip, padding="max_length", truncation=True, max_length=248)
        assert rec["clip_ids"].tolist() == want.input_ids
        supervised = [t for t in rec["labels"].tolist() if t != -100]
        assert tok.decode(supervised).strip() == chosen.strip() + "</s>"  # answer and </s>
