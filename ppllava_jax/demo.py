"""A web page to talk about a video (gradio), like the original's chatbox.

    python -m ppllava_jax.demo --checkpoint runs/demo/final
    python -m ppllava_jax.demo --checkpoint ckpt/ppllava --samples 'videos/*.mp4' --port 8080

serves http://127.0.0.1:7860 (``--port 0`` picks a free port; the address is printed once the
page is up). Before the page is served the model answers one question about a blank clip with
the start-up settings, so that everything a first question runs is compiled (the console says
how long it took) and the first answer comes as quickly as the next ones. Pick a sample video
or upload one, then ask questions: the answer streams into the chat token by token, earlier
turns stay in the prompt (as in ``ppllava_jax.chat``, whose session logic this reuses), and
next to the answer the prompt-to-patch relevance of the question is drawn over each sampled
frame, with its colour legend. Frames, maximum new tokens and temperature are set in the page;
other settings than the start-up's (or a longer prompt) compile on their first question, and
the status line under the chat says so while it happens. A new video or "New conversation"
starts afresh. A file that is not a readable video (said as soon as it is uploaded) or a
question too long for the model is reported in that status line; the server goes on.

Sample videos: ``--samples`` (a folder or a glob; default: the held-out clips of the demo
dataset beside the checkpoint, ``<checkpoint>/../data/videos/eval_*.mp4``). Needs the
``demo`` extra: ``pip install -e '.[demo]'``. The page is served on 127.0.0.1 only unless
``--host`` says otherwise; nothing is shared through gradio's tunnels.
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from ppllava_jax import demo_page
from ppllava_jax.chat import checkpoint_parser, generation_defaults, setup_from_flags
from ppllava_jax.demo_engine import DemoError, Engine, gallery_pictures, with_ticks
from ppllava_jax.evaluate.common import VIDEO_EXTS

MAX_SAMPLES = 12


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


class Handlers:
    """What the page's events do: each returns (or yields, while an answer streams) the new
    values of its outputs. A browser session's ``state``: the ``video`` talked about, its
    ``turns`` (the model's context) and its ``messages`` (the chat shown)."""

    TICK = 1.0  # seconds between status updates while the model is busy

    def __init__(self, engine: Engine):
        import gradio as gr

        self.engine, self.gr = engine, gr

    @staticmethod
    def fresh(video: str | None = None) -> dict:
        return {"video": video, "turns": [], "messages": []}

    def status(self, text: str, error: bool = False) -> Any:
        return demo_page.status_update(self.gr, text, error)

    def on_sample(self, path: str | None) -> Any:
        return path if path else self.gr.skip()

    def on_video(self, video: str | None, frames: float, state: dict) -> tuple:
        state = self.fresh(video)
        if not video:
            return [], [], self.status("Pick a sample video or upload one."), state
        try:
            self.engine.read_video(video, int(frames))
        except DemoError as e:
            return [], [], self.status(str(e), error=True), state
        return [], [], self.status(f"Video: `{os.path.basename(video)}`. Ask a question."), state

    def on_reset(self, state: dict) -> tuple:
        state = self.fresh(state.get("video") if state else None)
        return [], [], self.status("New conversation."), state

    def _failed(self, state: dict, text: str, keep: str) -> tuple:
        """The page as it was, the question kept (``keep``), and what went wrong."""
        return state["messages"], self.gr.skip(), self.status(text, error=True), state, keep

    def _progress(self, t0: float, wall0: float, answered: bool) -> Any:
        took = time.perf_counter() - t0
        compiling = self.engine.clock.seconds_since(wall0)
        if not compiling:
            return self.status(f"Generating... {took:.0f} s")
        if answered:
            return self.status(f"Generating... {took:.0f} s ({compiling:.0f} s compiling, once)")
        warm = self.engine.warm_up_s
        about = f" (at start-up it took {warm:.0f} s)" if warm else ""
        return self.status(
            f"Compiling the model for these settings or this prompt length, once{about}... "
            f"{took:.0f} s"
        )

    def on_ask(
        self,
        question: str,
        video: str | None,
        frames: float,
        max_new: float,
        temp: float,
        state: dict | None,
    ) -> Iterator[tuple]:
        """Answer ``question`` about ``video``: the conversation with the answer so far and
        the status line (what the model is doing, for how long), then the answer kept, the
        relevance pictures and how long it took (of it compiling, if anything was)."""
        state = state or self.fresh()
        question = (question or "").strip()
        if not video:
            yield self._failed(state, "pick a sample video or upload one first.", question)
            return
        if not question:
            yield self._failed(state, "type a question first.", "")
            return
        if state.get("video") != video:  # a new video: a new conversation
            state = self.fresh(video)
        turns = list(state["turns"])
        messages = [*state["messages"], {"role": "user", "content": question}]
        answer, result = "", {}
        t0, wall0 = time.perf_counter(), time.time()

        def page(status: Any) -> tuple:  # the conversation with the answer so far
            shown = [*messages, {"role": "assistant", "content": answer}]
            return shown, self.gr.skip(), status, state, ""

        yield page(self.status("Generating..."))
        settings = dict(num_frames=int(frames), max_new_tokens=int(max_new))
        pieces = self.engine.ask(
            video, turns, question, temperature=float(temp), result=result, **settings
        )
        try:
            for piece in with_ticks(pieces, self.TICK):
                answer += piece or ""
                yield page(self._progress(t0, wall0, bool(answer)))
        except DemoError as e:
            yield self._failed(state, str(e), question)
            return
        except Exception as e:  # keep serving; the details go to the server's log
            traceback.print_exc()
            yield self._failed(state, f"{type(e).__name__}: {e}", question)
            return
        messages.append({"role": "assistant", "content": answer.strip() or "(no answer)"})
        state = {"video": video, "turns": turns, "messages": messages}
        note = f"Answered in {time.perf_counter() - t0:.1f} s"
        compiled = self.engine.clock.seconds_since(wall0)
        if compiled:  # none after the warm-up, for the start-up settings
            note += f" ({compiled:.1f} s of it compiling for these settings or this prompt length)"
        note += f"; {_plural(len(turns), 'turn')} in the context."
        rel = result.get("attention")
        if rel is not None:
            note += f" Relevance of {question!r} to each patch of the {len(rel)} frames."
        yield messages, gallery_pictures(result), self.status(note), state, ""


def build_app(
    engine: Engine,
    samples: list[str],
    *,
    num_frames: int,
    max_new_tokens: int,
    temperature: float = 0.0,
):
    """The gradio ``Blocks`` page (not launched; launch it with ``css=demo_page.CSS``)."""
    import gradio as gr

    handlers = Handlers(engine)
    with gr.Blocks(title="PPLLaVA video chat") as app:
        page = demo_page.layout(
            engine.cfg,
            engine.setup.checkpoint,
            samples,
            num_frames=num_frames,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            warm_up_s=engine.warm_up_s,
            state=Handlers.fresh(),
        )
        demo_page.wire(page, handlers)
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
    num_frames = demo_page.clamp_frames(setup.cfg, num_frames)
    engine = Engine(setup)
    print(
        f"Compiling the model for a first question ({num_frames} frames, at most {max_new} new "
        "tokens); the page is served once this is done...",
        flush=True,
    )
    took = engine.warm_up(num_frames, max_new, a.temperature)
    print(
        f"Warm-up done in {took:.1f} s: the first answer comes as quickly as the next.", flush=True
    )
    app = build_app(
        engine, samples, num_frames=num_frames, max_new_tokens=max_new, temperature=a.temperature
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
            css=demo_page.CSS,
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
