"""Talk about a video in the terminal; the answer streams token by token.

    python -m ppllava_jax.chat --checkpoint DIR --video clip.mp4 [--num_frames 32]
    printf 'What colour is the square?\\nWhich colour appears first?\\n' | \\
        python -m ppllava_jax.chat --checkpoint runs/demo/final --video a.mp4 --num_frames 8

Each stdin line is one question; the answer is printed on stdout as ``ASSISTANT: ...``, token
by token as it is generated, then a newline. Unlike the original demo, the earlier turns stay
in the prompt (``USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:``), so follow-up
questions can refer to them; when the conversation outgrows the decoder's positions the
oldest turns are dropped. The CLIP prompt that guides the pooling is the *current* question,
so each turn pools the video for what is being asked now (the whole prompt is therefore
prefilled again each turn; the video is decoded once). Commands: ``/reset`` forgets the
conversation, ``/quit`` (or end of input) leaves. ``--show_prompt`` prints each full prompt
to stderr; ``--save-attention DIR`` writes the prompt-to-patch relevance of every frame per
turn to ``DIR/turn_NN/frame_TTT.png``.

The checkpoint directory is the one ``eval.py`` reads (``config.json``, ``params/``,
``tokenizer/``, ``clip_tokenizer/``). The video is read before the model is loaded, so a
missing or unreadable one is reported at once; such mistakes are printed as one ``error: ...``
line (exit status 1, ``PPLLAVA_TRACEBACK=1`` for a traceback). A question too long for the
model's context is answered with ``[error] ...`` advice and the chat goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from ppllava_jax.data import templates as tpl


class QuestionTooLongError(ValueError):
    """A question whose prompt does not fit the decoder's positions, even without history."""


class Chat:
    """A conversation about one video (``ask`` streams the answer's text pieces)."""

    def __init__(
        self,
        setup: Any,
        video: str,
        *,
        num_frames: int = 32,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        system: str | None = None,
        save_attention: str = "",
        keep_attention: bool = False,
        clip: Any = None,
    ):
        from transformers import AutoTokenizer

        from ppllava_jax.evaluate.model_setup import video_buckets
        from ppllava_jax.generate import StepDecoder

        self.setup, self.cfg = setup, setup.cfg
        cfg = self.cfg
        if num_frames > cfg.max_T:
            raise ValueError(f"--num_frames {num_frames} > the model's max_T={cfg.max_T}")
        self.tok = setup.tokenizer
        self.ctok = (
            AutoTokenizer.from_pretrained(setup.clip_tokenizer_dir)
            if setup.clip_tokenizer_dir
            else None
        )
        if clip is None or len(clip.frames) != num_frames:  # clip: load_clip(video, num_frames)
            clip = load_clip(video, num_frames)
        self.frames_uint8, self.pixels = video_pixels(cfg, clip.frames)
        self.num_frames = num_frames
        self.sc = setup.sampling(max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        self.decoder = StepDecoder(setup.model, self.sc, setup.mesh)
        self.buckets = video_buckets(cfg, num_frames, max_new_tokens)
        # every prompt that leaves room for the answer fits (the last bucket: all of that room)
        self.positions = int(cfg.llm.max_position_embeddings)
        self.max_new_tokens = int(max_new_tokens)
        room = self.positions - self.max_new_tokens
        if room > max(self.buckets):
            self.buckets = [*self.buckets, room]
        self.clip_len = int(cfg.clip_text.max_position_embeddings)
        self.history: list[tpl.Turn] = []
        self.system = system
        self.rng = jax.random.PRNGKey(seed)
        self.save_attention = save_attention
        self.turn = 0
        self.last_prompt = ""
        # keep_attention: after each answer, ``last_attention`` holds the prompt-to-patch
        # relevance of that question, float32[num_frames, h, w] (the web demo shows it)
        self.keep_attention = keep_attention
        self.last_attention: np.ndarray | None = None

    def reset(self) -> None:
        self.history = []

    def prompt_batch(self, question: str) -> dict[str, np.ndarray]:
        """The model input (``collate``'s batch of one, left-padded) asking ``question`` after
        the history, the oldest turns dropped until it fits; ``last_prompt`` is then its
        text. The prompt is ``templates.encode_conversation`` of the history and the open
        turn (as the synthetic set's conversations and their scorer render them), the CLIP
        prompt the question alone."""
        from ppllava_jax.data import collate as col

        cfg = self.cfg
        while True:
            turns = [*self.history, tpl.Turn(question, None)]
            enc = tpl.encode_conversation(
                self.tok,
                turns,
                self.setup.template,
                cfg.image_token_index,
                num_images=1,
                system=self.system,
                training=False,
            )
            sample = col.Sample(input_ids=enc.input_ids, media=col.Media("video", self.pixels))
            if self.ctok is not None:
                text = tpl.clip_text_of([tpl.Turn(question)], training=False)
                encode = tpl.encode_siglip_prompt if cfg.qwen else tpl.encode_clip_prompt
                sample.clip_ids, sample.clip_mask = encode(self.ctok, text, self.clip_len)
            try:
                batch = col.collate(
                    [sample],
                    cfg,
                    padding_side="left",
                    buckets=self.buckets,
                    clip_length=self.clip_len,
                )
                self.last_prompt = enc.text
                return batch
            except ValueError:
                if not self.history:
                    raise self._too_long(question, len(enc.input_ids)) from None
                self.history = self.history[1:]  # too long: forget the oldest turn

    def _too_long(self, question: str, prompt_ids: int) -> QuestionTooLongError:
        """What to do about a question that does not fit even alone."""
        from ppllava_jax.data import collate as col

        t, h, w = col.Planner(self.cfg).item_grid("video", self.num_frames)
        visual = int(t * h * w)
        q_ids = len(self.tok(question, add_special_tokens=False).input_ids)
        fit = self.positions - self.max_new_tokens - visual - (prompt_ids - 1 - q_ids)
        return QuestionTooLongError(
            f"the question is too long for this model: its prompt is {prompt_ids - 1} text tokens "
            f"(the question {q_ids}) + {visual} visual tokens ({self.num_frames} frames), and the "
            f"model reads {self.positions} positions, {self.max_new_tokens} of them kept for the "
            f"answer (--max_new_tokens). Ask a shorter question: about {max(fit, 0)} question "
            "tokens fit (a chat started with fewer --num_frames or a smaller --max_new_tokens "
            "leaves more room)."
        )

    def ask(self, question: str) -> Iterator[str]:
        """Yield the answer's text as it grows; the turn is then kept in the history."""
        from ppllava_jax.evaluate.model_setup import place_batch

        batch = self.prompt_batch(question)
        placed = place_batch(batch, self.setup.mesh)
        self.rng, sub = jax.random.split(self.rng)
        ids: list[int] = []
        shown = ""
        for tok in self.decoder.stream(self.setup.params, placed, sub):
            t = int(tok[0])
            if t == self.sc.eos_token_id:
                break
            ids.append(t)
            text = self.tok.decode(ids, skip_special_tokens=True)
            stable = text.rstrip("\ufffd")  # an incomplete multi-byte character: wait
            if len(stable) > len(shown) and stable.startswith(shown):
                yield stable[len(shown) :]
                shown = stable
        final = self.tok.decode(ids, skip_special_tokens=True)
        if final.startswith(shown) and len(final) > len(shown):
            yield final[len(shown) :]
        if self.save_attention or self.keep_attention:
            self.last_attention = self._relevance(placed)
        if self.save_attention and self.last_attention is not None:
            self._save_maps(self.last_attention, question)
        self.history.append(tpl.Turn(question, final.strip() or "..."))
        self.turn += 1

    def _relevance(self, placed: dict) -> np.ndarray | None:
        """float32[num_frames, h, w]: prompt-to-patch cosine of ``placed`` (None: the model's
        pooling has no prompt guidance)."""
        maps = self.setup.relevance(placed)
        return None if maps is None else maps[0][: self.num_frames]

    def _save_maps(self, maps: np.ndarray, question: str) -> None:
        from ppllava_jax.evaluate import heatmap

        heatmap.save_heatmaps(
            os.path.join(self.save_attention, f"turn_{self.turn:02d}"),
            self.frames_uint8,
            maps[: self.num_frames],
            caption=question,
            size=max(224, self.frames_uint8.shape[1]),
        )


def video_pixels(cfg: Any, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8[T, H, W, 3] decoded frames -> (uint8[T, S, S, 3], float32[T, S, S, 3]): the frames
    as the model family's video processor makes them (``data.image.tower_frames``: squashed,
    or for the Qwen family resized keeping the aspect ratio and padded) and normalised with
    its tower's mean / std; S = ``cfg.vision.image_size``."""
    from ppllava_jax.data import image as img

    qwen = bool(getattr(cfg, "qwen", False))
    views = img.tower_frames(frames, int(cfg.vision.image_size), qwen)
    return views, img.normalize(views, *img.pixel_stats(qwen))


def load_clip(video: str, num_frames: int) -> Any:
    """The ``num_frames`` frames the chat reads (segment middles) of ``video`` (a file, GIF or
    frame folder); a missing or unreadable one raises ``MediaError`` naming it."""
    from ppllava_jax.data import video as vid
    from ppllava_jax.data.errors import MediaError

    if not os.path.exists(video):
        raise MediaError(video, "not found (--video): give an existing video file, GIF or folder")
    return vid.load_video(video, num_frames, "middle")


def checkpoint_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser of ``--checkpoint`` and the other flags of ``load_setup``
    (:func:`setup_from_flags`); the chat and the web demo add their own."""
    from ppllava_jax import command_line

    p = command_line.argument_parser(description, prog)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (as for eval.py)")
    p.add_argument(
        "--template",
        default="",
        help="conversation template (default: inference.json's, else the checkpoint family's: "
        "plain_v1 or plain_qwen)",
    )
    p.add_argument("--tokenizer", default="")
    p.add_argument("--clip_tokenizer", default="")
    p.add_argument("--mesh", default="", help="mesh over local devices, e.g. 'fsdp=-1'")
    p.add_argument("--dtype", default="", help="float32 | bfloat16")
    p.add_argument("--num_frames", type=int, default=0, help="frames (0: inference.json or 32)")
    p.add_argument("--max_new_tokens", type=int, default=0, help="0: inference.json's, at most 200")
    return p


def generation_defaults(a: argparse.Namespace, defaults: dict[str, Any]) -> tuple[int, int]:
    """(frames, max new tokens): ``--num_frames`` / ``--max_new_tokens``, or with 0 the
    checkpoint's ``inference.json`` (``defaults``) else 32 frames, 200 tokens (at most 200)."""
    num_frames = a.num_frames or int(defaults.get("num_frames", 32))
    max_new = a.max_new_tokens or min(int(defaults.get("max_new_tokens", 200)), 200)
    return num_frames, max_new


def setup_from_flags(a: argparse.Namespace) -> Any:
    """``load_setup`` of ``a.checkpoint`` with the flags of :func:`checkpoint_parser`."""
    from ppllava_jax.evaluate import model_setup

    return model_setup.load_setup(
        a.checkpoint,
        tokenizer=a.tokenizer,
        clip_tokenizer=a.clip_tokenizer,
        template=a.template,
        mesh=a.mesh or None,
        dtype=a.dtype or None,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = checkpoint_parser("python -m ppllava_jax.chat", __doc__)
    p.add_argument("--video", required=True, help="video file, GIF or frame folder")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--save-attention", "--save_attention", dest="save_attention", default="")
    p.add_argument("--show_prompt", action="store_true", help="print each prompt to stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, stdin=None, stdout=None, stderr=None) -> int:
    """The chat command; a user's mistake is printed as ``error: ...`` (exit status 1)."""
    from ppllava_jax import command_line

    a = parse_args(argv)
    return command_line.report_user_errors(_main, a, stdin, stdout, stderr)


def _main(a: argparse.Namespace, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    from ppllava_jax.evaluate.model_setup import inference_defaults

    # the video first: a wrong path is said before minutes of model loading
    num_frames, max_new = generation_defaults(a, inference_defaults(a.checkpoint))
    clip = load_clip(a.video, num_frames)
    setup = setup_from_flags(a)
    chat = Chat(
        setup,
        a.video,
        num_frames=num_frames,
        max_new_tokens=max_new,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        system=a.system,
        save_attention=a.save_attention,
        clip=clip,
    )
    tty = hasattr(stdin, "isatty") and stdin.isatty()
    if tty:
        print("Ask about the video; /reset forgets the conversation, /quit leaves.", file=stderr)
    while True:
        if tty:
            print("USER: ", end="", file=stderr, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        q = line.strip()
        if not q:
            continue
        if q in ("/quit", "/exit"):
            break
        if q == "/reset":
            chat.reset()
            print("[conversation reset]", file=stderr, flush=True)
            continue
        try:
            gen = chat.ask(q)
            first = next(gen, "")  # the prompt exists once the first piece is out
            if a.show_prompt:
                print(f"[prompt] {chat.last_prompt!r}", file=stderr, flush=True)
            print("ASSISTANT: " + first, end="", file=stdout, flush=True)
            for piece in gen:
                print(piece, end="", file=stdout, flush=True)
            print(file=stdout, flush=True)
        except ValueError as e:  # e.g. a question too long for the model
            print(f"[error] {e}", file=stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
