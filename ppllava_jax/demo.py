"""A web page to talk about a video (gradio), like the original's chatbox.

    python -m ppllava_jax.demo --checkpoint runs/demo/final
    python -m ppllava_jax.demo --checkpoint ckpt/ppllava --samples 'videos/*.mp4' --port 8080

serves http://127.0.0.1:7860 (``--port 0`` picks a free port; the address is printed once the
page is up). Pick a sample video or upload one, then ask questions: the answer streams into
the chat token by token, earlier turns stay in the prompt (as in ``ppllava_jax.chat``, whose
session logic this reuses), and next to the answer the prompt-to-patch relevance of the
question is drawn over each sampled frame. Frames, maximum new tokens and temperature are set
in the page; a new video or "New conversation" starts afresh. A file that is not a readable
video or a question too long for the model is reported in the page; the server goes on.

Sample videos: ``--samples`` (a folder or a glob; default: the held-out clips of the demo
dataset beside the checkpoint, ``<checkpoint>/../data/videos/eval_*.mp4``). Needs the
``demo`` extra: ``pip install -e '.[demo]'``. The page is served on 127.0.0.1 only unless
``--host`` says otherwise; nothing is shared through gradio's tunnels.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from ppllava_jax.chat import Chat, checkpoint_parser, generation_defaults, setup_from_flags
from ppllava_jax.evaluate.common import VIDEO_EXTS

MAX_SAMPLES = 12
ELEM_STATUS = "demo-status"


def find_samples(spec: str, checkpoint: str) -> list[str]:
    """Sample video paths: ``spec`` is a folder, a glob or '' (the demo dataset's held-out
    clips beside ``checkpoint``); at most :data:`MAX_SAMPLES`, sorted."""
    if not spec:
        spec = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "data", "videos")
        pattern = os.path.join(spec, "eval_*.mp4")
    elif os.path.isdir(spec):
        pattern = os.path.join(spec, "*")
    else:
        pattern = spec
    paths = sorted(p for p in glob.glob(pattern) if p.lower().endswith(VIDEO_EXTS))
    return [os.path.abspath(p) for p in paths[:MAX_SAMPLES]]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class DemoError(Exception):
    """Something the person using the page can fix; shown in the page as it is."""


class Engine:
    """The loaded model and the conversations' machinery, shared by every browser session.

    One :class:`~ppllava_jax.chat.Chat` per (video, frames, max new tokens, temperature) is
    kept (the video decoded once), at most :attr:`CACHE` of them; they share one compiled decoder
    per generation setting. Each browser session keeps its own history (``turns``) and lends it
    to the chat for the length of one answer, under a lock (one generation at a time).
    """

    CACHE = 4  # chats kept

    def __init__(self, setup: Any):
        self.setup, self.cfg = setup, setup.cfg
        self.lock = threading.Lock()
        self._chats: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        # one compiled decoder per (max new tokens, temperature); the relevance function is
        # the set-up's own (Setup.relevance), shared already
        self._decoders: dict[tuple, Any] = {}

    def chat_for(self, video: str, num_frames: int, max_new_tokens: int, temperature: float):
        """The :class:`Chat` for these settings (``DemoError`` for a video it cannot read)."""
        from ppllava_jax.data.errors import DataError

        key = (video, int(num_frames), int(max_new_tokens), float(temperature))
        if key in self._chats:
            self._chats.move_to_end(key)
            return self._chats[key]
        try:
            chat = Chat(
                self.setup,
                video,
                num_frames=int(num_frames),
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                keep_attention=True,
            )
        except DataError as e:
            name = os.path.basename(video)
            why = str(getattr(e, "reason", e)).replace(video, name)  # not the server's paths
            raise DemoError(f"Cannot read {name!r} as a video: {why}") from e
        except ValueError as e:  # e.g. more frames than the model takes
            raise DemoError(str(e)) from e
        chat.decoder = self._decoders.setdefault(key[2:], chat.decoder)
        self._chats[key] = chat
        while len(self._chats) > self.CACHE:
            self._chats.popitem(last=False)
        return chat

    def ask(
        self,
        video: str,
        turns: list,
        question: str,
        *,
        num_frames: int,
        max_new_tokens: int,
        temperature: float,
        result: dict | None = None,
    ) -> Iterator[str]:
        """Stream the answer's text pieces; then ``turns`` holds the conversation so far
        (oldest turns dropped when it outgrows the decoder) and ``result`` the question's
        relevance ``"attention"``, float32[num_frames, h, w] (or None), and the sampled
        ``"frames"``, uint8[num_frames, S, S, 3]."""
        with self.lock:
            chat = self.chat_for(video, num_frames, max_new_tokens, temperature)
            chat.history = list(turns)
            chat.last_attention = None
            try:
                gen = chat.ask(question)
                try:
                    first = next(gen, None)
                except ValueError as e:  # the prompt cannot fit, even without history
                    raise DemoError(_too_long(str(e))) from e
                if first is not None:
                    yield first
                    yield from gen
                turns[:] = chat.history
                if result is not None:
                    result.update(attention=chat.last_attention, frames=chat.frames_uint8)
            finally:
                chat.history = []


def _too_long(msg: str) -> str:
    """The chat's advice, in the page's words (its settings rather than command-line flags)."""
    for flag, setting in (
        ("--num_frames", "Frames sampled"),
        ("--max_new_tokens", "Max new tokens"),
    ):
        msg = msg.replace(flag, f"'{setting}'")
    if "shorter question" not in msg:
        msg += "; ask a shorter question, or lower 'Frames sampled' or 'Max new tokens'"
    return f"This question does not fit in the model's context: {msg}"


def build_app(
    engine: Engine,
    samples: list[str],
    *,
    num_frames: int,
    max_new_tokens: int,
    temperature: float = 0.0,
):
    """The gradio ``Blocks`` page (not launched)."""
    import gradio as gr

    from ppllava_jax.evaluate import heatmap

    cfg = engine.cfg
    min_frames = int(cfg.pooling_kernel[0]) if cfg.pooling == "ppllava" else 1
    max_frames = int(cfg.max_T)
    num_frames = max(min_frames, min(int(num_frames), max_frames))
    labels = [(os.path.basename(p), p) for p in samples]

    def fresh(video: str | None = None) -> dict:
        return {"video": video, "turns": [], "messages": []}

    def status(text: str, error: bool = False) -> str:
        return f"**Error:** {text}" if error else text

    def on_video(video: str | None, state: dict):
        state = fresh(video)
        msg = (
            f"Video: `{os.path.basename(video)}`. Ask a question."
            if video
            else "Pick a sample video or upload one."
        )
        return [], [], msg, state

    def on_reset(state: dict):
        state = fresh(state.get("video") if state else None)
        return [], [], "New conversation.", state

    def on_ask(question, video, frames, max_new, temp, state):
        state = state or fresh()
        question = (question or "").strip()
        gallery_out = gr.skip()

        def failed(text: str, keep: str = question) -> tuple:  # the page as it was, and why
            return state["messages"], gallery_out, status(text, True), state, keep

        if not video:
            yield failed("pick a sample video or upload one first.")
            return
        if not question:
            yield failed("type a question first.", "")
            return
        if state.get("video") != video:  # a new video: a new conversation
            state = fresh(video)
        turns = list(state["turns"])
        messages = [*state["messages"], {"role": "user", "content": question}]
        answer = {"role": "assistant", "content": ""}
        t0 = time.perf_counter()
        result: dict = {}
        yield [*messages, answer], gallery_out, "Generating...", state, ""
        try:
            for piece in engine.ask(
                video,
                turns,
                question,
                num_frames=int(frames),
                max_new_tokens=int(max_new),
                temperature=float(temp),
                result=result,
            ):
                answer = {"role": "assistant", "content": answer["content"] + piece}
                yield [*messages, answer], gallery_out, "Generating...", state, ""
        except DemoError as e:
            yield failed(str(e))
            return
        except Exception as e:  # keep serving; the details go to the server's log
            traceback.print_exc()
            yield failed(f"{type(e).__name__}: {e}")
            return
        text = answer["content"].strip() or "(no answer)"
        messages.append({"role": "assistant", "content": text})
        state = {"video": video, "turns": turns, "messages": messages}
        rel, shown = result.get("attention"), result.get("frames")
        size = None if shown is None else max(224, int(shown.shape[1]))
        pics = [] if rel is None else heatmap.frame_overlays(shown, rel, size=size)
        gallery_out = [(p, f"frame {i}") for i, p in enumerate(pics)]
        took = time.perf_counter() - t0
        kept = len(turns)
        note = f"Answered in {took:.1f} s; {kept} turn{'s' * (kept != 1)} in the context."
        if rel is not None:
            note += f" Relevance of {question!r} to each patch of the {len(rel)} frames."
        yield messages, gallery_out, note, state, ""

    with gr.Blocks(title="PPLLaVA video chat") as app:
        gr.Markdown(
            "## PPLLaVA: talk about a video\n"
            f"Checkpoint `{engine.setup.checkpoint}`. Pick a sample or upload a video, then "
            "ask; the question also guides which patches the model pools (right)."
        )
        state = gr.State(fresh())
        with gr.Row():
            with gr.Column(scale=2):
                sample = gr.Dropdown(
                    choices=labels,
                    value=None,
                    label="Sample videos",
                    elem_id="demo-samples",
                    interactive=True,
                )
                video = gr.Video(
                    label="Video", sources=["upload"], elem_id="demo-video", height=260
                )
                with gr.Accordion("Generation settings", open=True):
                    frames = gr.Slider(
                        min_frames,
                        max_frames,
                        value=num_frames,
                        step=1,
                        label="Frames sampled",
                        elem_id="demo-frames",
                    )
                    max_new = gr.Slider(
                        1,
                        max(int(cfg.llm.max_position_embeddings) // 2, max_new_tokens),
                        value=max_new_tokens,
                        step=1,
                        label="Max new tokens",
                        elem_id="demo-max-new",
                    )
                    temp = gr.Slider(
                        0.0,
                        1.5,
                        value=temperature,
                        step=0.05,
                        label="Temperature (0 = greedy)",
                        elem_id="demo-temperature",
                    )
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="demo-chat", height=380)
                question = gr.Textbox(
                    label="Question",
                    placeholder="What colour is the square?",
                    elem_id="demo-question",
                    lines=1,
                )
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="demo-ask")
                    reset = gr.Button("New conversation", elem_id="demo-reset")
                info = gr.Markdown("Pick a sample video or upload one.", elem_id=ELEM_STATUS)
            with gr.Column(scale=3):
                gallery = gr.Gallery(
                    label="Prompt-to-patch relevance per sampled frame",
                    elem_id="demo-heatmap",
                    columns=4,
                    height=420,
                    format="png",
                    object_fit="contain",
                    interactive=False,
                )
        sample.change(lambda path: path, [sample], [video])
        video.change(on_video, [video, state], [chatbot, gallery, info, state])
        reset.click(on_reset, [state], [chatbot, gallery, info, state])
        chatbot.clear(on_reset, [state], [chatbot, gallery, info, state])
        inputs = [question, video, frames, max_new, temp, state]
        outputs = [chatbot, gallery, info, state, question]
        # one queue for both ways of asking: one answer generated at a time
        ask.click(on_ask, inputs, outputs, concurrency_id="generate")
        question.submit(on_ask, inputs, outputs, concurrency_id="generate")
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = checkpoint_parser("python -m ppllava_jax.demo", __doc__)
    p.add_argument("--samples", default="", help="folder or glob of sample videos")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=7860, help="port (0: a free one)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max_file_size", default="200mb", help="largest upload")
    return p.parse_args(argv)


def _refuse(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio as gr
    except ImportError:
        return _refuse("The web demo needs gradio: pip install -e '.[demo]'")
    if not os.path.isdir(a.checkpoint):
        return _refuse(
            f"--checkpoint {a.checkpoint}: no such directory (train one with `python train.py "
            "--config configs/demo.py --workdir runs/demo`, then pass runs/demo/final)"
        )
    setup = setup_from_flags(a)
    samples = find_samples(a.samples, a.checkpoint)
    if a.samples and not samples:
        return _refuse(f"--samples {a.samples}: no video files there")
    num_frames, max_new = generation_defaults(a, setup.defaults)
    app = build_app(
        Engine(setup),
        samples,
        num_frames=num_frames,
        max_new_tokens=max_new,
        temperature=a.temperature,
    )
    port = a.port or free_port(a.host)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(
            server_name=a.host,
            server_port=port,
            share=False,
            prevent_thread_lock=True,
            quiet=True,
            show_error=True,
            allowed_paths=sorted({os.path.dirname(p) for p in samples}),
            max_file_size=a.max_file_size,
            theme=gr.themes.Default(),
            footer_links=[],
        )
    except OSError as e:
        return _refuse(
            f"Cannot serve on {a.host}:{port} ({e}); pass another --port (0: a free one)"
        )
    print(f"Serving the demo on http://{a.host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
