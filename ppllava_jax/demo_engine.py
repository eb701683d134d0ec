"""The web demo's engine (``python -m ppllava_jax.demo``): the loaded model shared by every
browser session, its start-up warm-up, and the clock of JAX's compiling the page reports.

:class:`Engine` keeps the chats (``ppllava_jax.chat.Chat``) of the videos talked about and
answers one question at a time; :meth:`Engine.warm_up` compiles what a first question runs
before the page is served; :class:`CompileClock` says how much of an answer's time was spent
compiling (a new setting or a longer prompt); :func:`with_ticks` runs an answer in a worker
thread so the page can say meanwhile what is going on.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from ppllava_jax.chat import Chat, load_clip

WARM_UP_QUESTION = "What happens in the video?"
WARM_UP_VIDEO = "<warm-up: a blank clip>"


class DemoError(Exception):
    """Something the person using the page can fix; shown in the page as it is."""


def unreadable(video: str, e: Exception) -> DemoError:
    """A video the data layer cannot read, in the page's words (its name, not the server's
    paths)."""
    name = os.path.basename(video)
    why = str(getattr(e, "reason", e)).replace(video, name)
    return DemoError(f"Cannot read {name!r} as a video: {why}")


class CompileClock:
    """Seconds JAX spent compiling (tracing, lowering, XLA) after a moment: the union of the
    time spans of JAX's compile events (``jax.monitoring``), whichever thread compiled."""

    PREFIX = "/jax/core/compile/"

    def __init__(self) -> None:
        self._spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        jax.monitoring.register_event_time_span_listener(self._record)

    def _record(self, event: str, start: float, end: float, **_: Any) -> None:
        if event.startswith(self.PREFIX):
            with self._lock:
                self._spans.append((start, end))

    def seconds_since(self, t: float) -> float:
        """Compiling seconds after ``t`` (``time.time()``)."""
        with self._lock:
            spans = sorted((max(s, t), e) for s, e in self._spans if e > t)
        total, reach = 0.0, t
        for s, e in spans:
            if e > max(s, reach):
                total += e - max(s, reach)
                reach = e
        return total


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
        self.clock = CompileClock()
        self.warm_up_s: float | None = None  # what compiling the start-up settings took
        self._chats: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        # one compiled decoder per (max new tokens, temperature); the relevance function is
        # the set-up's own (Setup.relevance), shared already
        self._decoders: dict[tuple, Any] = {}
        self._read: tuple[tuple, Any] | None = None  # ((video, frames), clip): read_video's

    def read_video(self, video: str, num_frames: int) -> None:
        """Read ``num_frames`` frames of ``video`` now (kept for its chat): ``DemoError`` when
        it is no readable video."""
        from ppllava_jax.data.errors import DataError

        try:
            self._read = ((video, int(num_frames)), load_clip(video, int(num_frames)))
        except DataError as e:
            raise unreadable(video, e) from e

    def chat_for(
        self,
        video: str,
        num_frames: int,
        max_new_tokens: int,
        temperature: float,
        clip: Any = None,
    ):
        """The :class:`Chat` for these settings (``DemoError`` for a video it cannot read);
        ``clip``: the frames to use instead of reading ``video`` (``chat.load_clip``'s)."""
        from ppllava_jax.data.errors import DataError

        key = (video, int(num_frames), int(max_new_tokens), float(temperature))
        if key in self._chats:
            self._chats.move_to_end(key)
            return self._chats[key]
        if clip is None and self._read is not None and self._read[0] == key[:2]:
            clip, self._read = self._read[1], None  # the chat keeps its frames
        try:
            chat = Chat(
                self.setup,
                video,
                num_frames=int(num_frames),
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                keep_attention=True,
                clip=clip,
            )
        except DataError as e:
            raise unreadable(video, e) from e
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
        clip: Any = None,
    ) -> Iterator[str]:
        """Stream the answer's text pieces; then ``turns`` holds the conversation so far
        (oldest turns dropped when it outgrows the decoder) and ``result`` the question's
        relevance ``"attention"``, float32[num_frames, h, w] (or None), and the sampled
        ``"frames"``, uint8[num_frames, S, S, 3]."""
        with self.lock:
            chat = self.chat_for(video, num_frames, max_new_tokens, temperature, clip)
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

    def warm_up(self, num_frames: int, max_new_tokens: int, temperature: float) -> float:
        """Answer :data:`WARM_UP_QUESTION` about a blank clip with these settings and draw its
        relevance, so that what a first question runs (prefill and decoding step at the
        shortest prompt length, the relevance, the pictures) is compiled before anyone asks;
        returns the seconds it took (also :attr:`warm_up_s`)."""
        from ppllava_jax.data.video import Clip

        t0 = time.perf_counter()
        n, s = int(num_frames), int(self.cfg.vision.image_size)
        blank = Clip(np.zeros((n, s, s, 3), np.uint8), np.arange(n), np.zeros(n), 1.0, n)
        settings = dict(num_frames=n, max_new_tokens=max_new_tokens, temperature=temperature)
        result: dict = {}
        for _ in self.ask(
            WARM_UP_VIDEO, [], WARM_UP_QUESTION, result=result, clip=blank, **settings
        ):
            pass
        gallery_pictures(result)
        self._chats.pop((WARM_UP_VIDEO, n, int(max_new_tokens), float(temperature)), None)
        self.warm_up_s = time.perf_counter() - t0
        return self.warm_up_s


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


def gallery_pictures(result: dict) -> list[tuple[Any, str]]:
    """(picture, caption) per sampled frame of an answer's ``result`` (``Engine.ask``): the
    relevance over the frame (``heatmap.frame_overlays``, at least 224 pixels wide)."""
    from ppllava_jax.evaluate import heatmap

    rel, shown = result.get("attention"), result.get("frames")
    if rel is None or shown is None:
        return []
    pics = heatmap.frame_overlays(shown, rel, size=max(224, int(shown.shape[1])))
    return [(p, f"frame {i}") for i, p in enumerate(pics)]


def with_ticks(pieces: Iterator[str], every: float) -> Iterator[str | None]:
    """The items of ``pieces``, produced in a worker thread, and ``None`` whenever ``every``
    seconds pass without one (so the page can say meanwhile what is going on). What
    ``pieces`` raises is raised here."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def work() -> None:
        try:
            for p in pieces:
                items.put(("piece", p))
        except BaseException as e:  # handed to the reader
            items.put(("error", e))
        else:
            items.put(("end", None))

    threading.Thread(target=work, name="demo-answer", daemon=True).start()
    while True:
        try:
            kind, item = items.get(timeout=every)
        except queue.Empty:
            yield None
            continue
        if kind == "end":
            return
        if kind == "error":
            raise item
        yield item
