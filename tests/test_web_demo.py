"""The web demo in a real headless browser (Debian's chromium driven by selenium).

`python -m ppllava_jax.demo` serves a tiny random checkpoint on 127.0.0.1 (a free port), once
it compiled the answering path (the console says how long it took). The browser picks a sample
video, uploads a file that is no video (the sample list is cleared; an error under the chat at
once), uploads a synthetic clip, asks two questions (the answers must be what `Chat` answers
with the history kept, streamed: the page shows growing prefixes; the first answer compiles
nothing), reads the heatmap gallery (each frame's picture must be the relevance of the question
computed here by the model's own forward pass; the pictures and their colour legend inside the
gallery's column, a picture's preview too), asks a question too long for the context (an error
right under the chat, in view, the conversation kept), and picks a sample video again.
Screenshots of the page are left in the test's temporary directory. Skipped only where
chromium, chromedriver, selenium or gradio are missing and PPLLAVA_REQUIRE_BROWSER is unset
(`.ci/run` sets it and installs them).
"""

import io
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FRAMES, MAX_NEW = 8, 6
Q1, Q2 = "What colour is the square?", "Which colour appears first?"
MESH = "data=1,fsdp=1,tensor=1"


def _browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or skip (fail under PPLLAVA_REQUIRE_BROWSER)."""
    missing = []
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chrome:
        missing.append("chromium (apt-get install chromium)")
    if not driver:
        missing.append("chromedriver (apt-get install chromium-driver)")
    for mod, extra in (("selenium", "test"), ("gradio", "demo")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(f"{mod} (pip install -e '.[{extra}]')")
    if missing:
        why = "the web demo test needs " + ", ".join(missing)
        if os.environ.get("PPLLAVA_REQUIRE_BROWSER"):
            pytest.fail(why + "; PPLLAVA_REQUIRE_BROWSER is set, so this is an error")
        pytest.skip(why)
    return chrome, driver


def _clip(path: Path) -> None:
    """A synthetic clip: a red square moving right over grey, 16 frames of 32x32."""
    from ppllava_jax.data.video import write_video

    frames = np.full((16, 32, 32, 3), 90, np.uint8)
    for t in range(16):
        x = t
        frames[t, 10:22, x : x + 12] = (220, 30, 30)
    write_video(str(path), frames, fps=8.0)


class Server:
    """``python -m ppllava_jax.demo`` in a subprocess; ``url`` once it serves."""

    def __init__(self, ckpt: str, tmp: Path):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "JAX_PLATFORMS": "cpu",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        }
        cmd = [
            sys.executable,
            "-m",
            "ppllava_jax.demo",
            "--checkpoint",
            ckpt,
            "--port",
            "0",
            "--num_frames",
            str(FRAMES),
            "--max_new_tokens",
            str(MAX_NEW),
            "--mesh",
            MESH,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=str(REPO),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def output(self) -> str:
        return "".join(self.log)

    def wait_url(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"Serving the demo on (http://127\.0\.0\.1:\d+)", line)
            if m:
                return m.group(1)
        raise AssertionError("the demo did not start:\n" + "".join(self.log)[-4000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def _driver(chrome: str, chromedriver: str, tmp: Path):
    os.environ["SE_OFFLINE"] = "true"  # selenium's manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    o.binary_location = chrome
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        f"--user-data-dir={tmp / 'chrome-profile'}",
        # only this machine is reachable from the page
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=o)
    d.set_page_load_timeout(60)
    d.set_script_timeout(30)
    return d


class Page:
    """The demo page's controls (by the elem_ids of ``ppllava_jax/demo.py``)."""

    def __init__(self, d):
        from selenium.webdriver.common.by import By

        self.d, self.By = d, By

    def find(self, css: str):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def wait(self, what, timeout: float = 120.0, message: str = ""):
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            try:
                last = what()
            except Exception as e:  # the element may be re-rendered under us
                last = e
            else:
                if last:
                    return last
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {message}: {last!r}; status {self.status()!r}")

    def status(self) -> str:
        # the Markdown's own text, without gradio's progress overlay ("processing | 0.2s")
        return self.d.execute_script(
            """const el = document.querySelector('#demo-status');
            if (!el) return '?';
            const c = el.cloneNode(true);
            c.querySelectorAll('[data-testid=status-tracker]').forEach(e => e.remove());
            return c.textContent.replace(/\\s+/g, ' ').trim();"""
        )

    def upload(self, path: Path) -> None:
        clear = self.d.find_elements(self.By.CSS_SELECTOR, "#demo-video button[aria-label=Clear]")
        if clear:
            clear[0].click()
        inp = self.wait(
            lambda: self.d.find_elements(self.By.CSS_SELECTOR, "#demo-video input[type=file]"),
            30,
            "the upload input",
        )
        inp[0].send_keys(str(path))
        self.wait(lambda: path.name in self.status(), 60, f"{path.name} in the status")

    def rect(self, css: str) -> dict:
        """The bounding box of the first element matching ``css`` (left, right, top, bottom in
        the viewport) and the viewport's height (``view``)."""
        return self.d.execute_script(
            """const r = document.querySelector(arguments[0]).getBoundingClientRect();
            return {left: r.left, right: r.right, top: r.top, bottom: r.bottom,
                    view: window.innerHeight};""",
            css,
        )

    def sample(self) -> str:
        """The sample list's shown value ('' when none is picked)."""
        return self.d.execute_script("return document.querySelector('#demo-samples input').value")

    def pick_sample(self, name: str) -> None:
        self.find("#demo-samples input").click()
        self.wait(
            lambda: self.d.find_elements(self.By.CSS_SELECTOR, f"[aria-label='{name}']"),
            30,
            "the sample list",
        )[0].click()
        self.wait(lambda: name in self.status(), 60, f"{name} in the status")

    def error_under_chat(self) -> None:
        """The status line shows an error, framed, right under the conversation and in view."""
        chat, status = self.rect("#demo-chat"), self.rect("#demo-status")
        cls = self.d.execute_script("return document.querySelector('#demo-status').className")
        assert "demo-error" in cls.split(), cls
        assert 0 <= status["top"] - chat["bottom"] < 40, (chat, status)
        assert 0 <= status["top"] and status["bottom"] <= status["view"], status

    def messages(self) -> list[tuple[str, str]]:
        return self.d.execute_script(
            "return [...document.querySelectorAll('#demo-chat [data-testid=user],"
            " #demo-chat [data-testid=bot]')].map(e => [e.dataset.testid, e.innerText]);"
        )

    def ask(self, question: str) -> str:
        """Type, press Ask, wait for the end; returns the status line. ``window.__seen`` holds
        every text the last bot message showed meanwhile."""
        self.d.execute_script(
            """window.__seen = [];
            const chat = document.querySelector('#demo-chat');
            if (window.__obs) window.__obs.disconnect();
            window.__obs = new MutationObserver(() => {
              const bots = chat.querySelectorAll('[data-testid=bot]');
              if (bots.length) window.__seen.push(bots[bots.length - 1].innerText);
            });
            window.__obs.observe(chat, {subtree: true, childList: true, characterData: true});"""
        )
        box = self.find("#demo-question textarea")
        box.clear()
        box.send_keys(question)
        before = self.status()
        self.find("#demo-ask").click()
        return self.wait(
            lambda: (s := self.status()) != before and s.startswith(("Answered", "Error:")) and s,
            180,
            f"the answer to {question[:40]!r}",
        )

    def seen(self) -> list[str]:
        return self.d.execute_script("return window.__seen")


def _norm(text: str) -> str:
    return "".join(text.split())


def _expected(ckpt: str, video: Path):
    """What the page must show, computed here: Chat's answers to Q1 then Q2 (history kept),
    and Q2's prompt-to-patch relevance through the model's forward pass (the README's way)."""
    from transformers import AutoTokenizer

    from ppllava_jax.chat import Chat
    from ppllava_jax.data import image, templates
    from ppllava_jax.data import video as vid
    from ppllava_jax.data.collate import Media, Sample, collate
    from ppllava_jax.evaluate import heatmap, model_setup

    setup = model_setup.load_setup(ckpt, mesh=MESH)
    chat = Chat(setup, str(video), num_frames=FRAMES, max_new_tokens=MAX_NEW)
    a1 = "".join(chat.ask(Q1)).strip()
    a2 = "".join(chat.ask(Q2)).strip()
    cfg = setup.cfg
    pixels = image.preprocess_frames(
        vid.load_video(str(video), FRAMES, "middle").frames, size=cfg.vision.image_size
    )
    turns = [templates.Turn(Q2)]
    enc = templates.encode_conversation(
        setup.tokenizer, turns, "plain_v1", cfg.image_token_index, training=False
    )
    ctok = AutoTokenizer.from_pretrained(setup.clip_tokenizer_dir)
    clip_len = int(cfg.clip_text.max_position_embeddings)
    ids, mask = templates.encode_clip_prompt(ctok, templates.clip_text_of(turns, False), clip_len)
    batch = collate(
        [Sample(enc.input_ids, media=Media("video", pixels), clip_ids=ids, clip_mask=mask)],
        cfg,
        padding_side="left",
        clip_length=clip_len,
    )
    out = setup.model.apply({"params": setup.params}, batch, return_visual_attention=True)
    rel = np.asarray(out["visual_attention"]["video"], np.float32)[0][:FRAMES]
    frames = heatmap.denormalize(pixels)
    pics = heatmap.frame_overlays(frames, rel, size=max(224, frames.shape[1]))
    return a1, a2, [np.asarray(p) for p in pics]


def test_web_demo_in_a_browser(tmp_path):
    chrome, chromedriver = _browser()
    from PIL import Image

    from ppllava_jax.evaluate import heatmap
    from tests.evaluate.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "data"))
    clip, bad = tmp_path / "moving_square.mp4", tmp_path / "not_a_video.mp4"
    _clip(clip)
    bad.write_text("this is text, not a video\n")
    server = Server(ckpt, tmp_path)
    d = None
    try:
        a1, a2, pics = _expected(ckpt, clip)  # while the server starts
        url = server.wait_url(600)
        # compiled before the page was served, and the console said how long it took
        out = server.output()
        warm = re.search(r"Warm-up done in [0-9.]+ s", out)
        assert warm and out.index(warm.group(0)) < out.index("Serving the demo"), out[-3000:]
        d = _driver(chrome, chromedriver, tmp_path)
        page = Page(d)
        d.get(url)
        page.wait(lambda: "Pick a sample" in page.status(), 60, "the page")
        assert d.title == "PPLLaVA video chat"

        # a sample, then an upload: the sample list no longer names the video talked about
        page.pick_sample("eval_00000.mp4")
        assert page.sample() == "eval_00000.mp4"
        # a file that is no video: said at once, under the chat; no conversation
        page.upload(bad)
        assert page.sample() == ""
        s = page.status()
        assert s.startswith("Error:") and "not_a_video.mp4" in s and "Cannot read" in s, s
        assert str(tmp_path) not in s  # the server's paths stay on the server
        page.error_under_chat()
        page.find("#demo-reset").click()  # and asked about all the same: the same error
        page.wait(lambda: page.status() == "New conversation.", 30, "a new conversation")
        s = page.ask(Q1)
        assert s.startswith("Error:") and "not_a_video.mp4" in s and "Cannot read" in s, s
        assert page.messages() == []
        d.save_screenshot(str(tmp_path / "1_not_a_video.png"))

        # the synthetic clip, two questions: streamed, history kept, Chat's answers, and
        # nothing left to compile (the warm-up did it)
        page.upload(clip)
        s = page.ask(Q1)
        assert s.startswith("Answered") and "1 turn in the context" in s, s
        assert "compiling" not in s, s
        msgs = page.messages()
        assert [r for r, _ in msgs] == ["user", "bot"] and msgs[0][1].strip() == Q1
        assert _norm(msgs[1][1]) == _norm(a1), (msgs, a1)
        growing = [t for t in dict.fromkeys(map(_norm, page.seen())) if t]
        assert len(growing) >= 2 and growing[-1] == _norm(a1), growing  # streamed, not at once
        assert all(_norm(a1).startswith(t) for t in growing), growing
        s = page.ask(Q2)
        assert s.startswith("Answered") and "2 turns in the context" in s, s
        assert "compiling" not in s, s  # the same prompt length
        msgs = page.messages()
        assert [r for r, _ in msgs] == ["user", "bot", "user", "bot"], msgs
        assert msgs[2][1].strip() == Q2 and _norm(msgs[3][1]) == _norm(a2), (msgs, a2)
        d.save_screenshot(str(tmp_path / "2_answers.png"))

        # the heatmap gallery: one picture per sampled frame, Q2's relevance over it
        srcs = d.execute_script(
            "return [...document.querySelectorAll('#demo-heatmap img')].map(e => e.src)"
        )
        assert len(srcs) == FRAMES, srcs
        for i, (src, want) in enumerate(zip(srcs, pics)):
            assert src.startswith(url)
            with urllib.request.urlopen(src, timeout=30) as r:
                got = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), np.int16)
            assert got.shape == want.shape, (i, got.shape, want.shape)
            diff = np.abs(got - want.astype(np.int16))
            assert diff.mean() < 0.5 and diff.max() <= 8, (i, diff.mean(), diff.max())
        # ... all inside the gallery's column, the colour legend under it (the colour map's
        # ends, low to high, and what they mean)
        box = page.rect("#demo-heatmap")
        pictures = d.execute_script(
            """return [...document.querySelectorAll('#demo-heatmap img')].map(e => {
              const r = e.getBoundingClientRect(); return [r.left, r.right]; });"""
        )
        inside = [box["left"] <= x0 and x1 <= box["right"] for x0, x1 in pictures]
        assert all(inside), (box, pictures)
        scrolled = d.execute_script(  # nothing in the gallery wider than its box, to scroll
            """return [...document.querySelectorAll('#demo-heatmap, #demo-heatmap *')]
              .filter(e => e.scrollWidth > e.clientWidth + 1
                           && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX))
              .map(e => [e.className, e.scrollWidth, e.clientWidth]);"""
        )
        assert scrolled == [], scrolled
        legend = page.rect("#demo-legend")
        assert box["left"] - 1 <= legend["left"] and legend["right"] <= box["right"] + 1, legend
        assert box["bottom"] <= legend["top"] and legend["bottom"] <= legend["view"], legend
        text = d.execute_script("return document.querySelector('#demo-legend').innerText")
        assert "low relevance" in text and "high relevance" in text, text
        bar = d.execute_script(
            "return getComputedStyle(document.querySelector('#demo-legend .demo-legend-bar'))"
            ".backgroundImage"
        )
        lo, hi = (f"rgb({r}, {g}, {b})" for r, g, b in heatmap.colormap(np.array([0.0, 1.0])))
        assert bar.startswith("linear-gradient") and bar.index(lo) < bar.rindex(hi), bar
        # a picture opened stays in the gallery (no other window, nothing over the page)
        d.find_elements(page.By.CSS_SELECTOR, "#demo-heatmap img")[0].click()
        big = page.wait(
            lambda: d.execute_script(
                """const i = [...document.querySelectorAll('#demo-heatmap img')]
                  .map(e => e.getBoundingClientRect()).sort((a, b) => b.width - a.width)[0];
                return i.width > 150 && [i.left, i.right, i.top, i.bottom];"""
            ),
            30,
            "the picture's preview",
        )
        assert len(d.window_handles) == 1
        assert box["left"] <= big[0] and big[1] <= box["right"], (box, big)
        assert box["top"] <= big[2] and big[3] <= box["bottom"], (box, big)
        d.save_screenshot(str(tmp_path / "3_preview.png"))

        # a question too long for the context: an error under the chat, in view; the
        # conversation and the server intact
        s = page.ask("What colour is the square " + "and the circle " * 300 + "?")
        assert s.startswith("Error:") and "does not fit in the model's context" in s, s
        assert "shorter question" in s and "--" not in s, s  # the page's settings, not flags
        assert len(page.messages()) == 4
        page.error_under_chat()
        d.save_screenshot(str(tmp_path / "4_too_long.png"))

        # a sample video again: a new conversation about it
        page.pick_sample("eval_00000.mp4")
        assert page.messages() == []
        s = page.ask(Q1)
        assert s.startswith("Answered") and "1 turn in the context" in s, s
        assert len(page.messages()) == 2
    finally:
        if d is not None:
            d.quit()
        server.stop()
    assert server.proc.returncode is not None


def _gradio():
    """gradio (the demo extra), or skip (fail under PPLLAVA_REQUIRE_BROWSER)."""
    try:
        import gradio
    except ImportError:
        if os.environ.get("PPLLAVA_REQUIRE_BROWSER"):
            pytest.fail("the web demo's tests need gradio (pip install -e '.[demo]')")
        pytest.skip("the web demo's tests need gradio (pip install -e '.[demo]')")
    return gradio


def test_compile_clock_measures_jax_compiling():
    import jax

    from ppllava_jax.demo_engine import CompileClock

    clock = CompileClock()
    span = "/jax/core/compile/test_span"
    jax.monitoring.record_event_time_span(span, 10.0, 12.0)
    jax.monitoring.record_event_time_span(span, 11.0, 13.0)  # overlapping: counted once
    jax.monitoring.record_event_time_span("/jax/other/event", 0.0, 100.0)  # not compiling
    assert clock.seconds_since(9.0) == 3.0 and clock.seconds_since(11.5) == 1.5
    t = time.time()
    f = jax.jit(lambda x: x * 3.0 + 1.0)
    f(np.ones(5, np.float32)).block_until_ready()
    assert clock.seconds_since(t) > 0
    t = time.time()
    f(np.zeros(5, np.float32)).block_until_ready()  # compiled already
    assert clock.seconds_since(t) == 0


def test_with_ticks_reports_waiting_and_hands_on_errors():
    from ppllava_jax.demo_engine import with_ticks

    release = threading.Event()

    def pieces():
        yield "a"
        assert release.wait(60)  # until the reader has seen a tick
        yield "b"
        raise ValueError("too long")

    got = []
    with pytest.raises(ValueError, match="too long"):
        for item in with_ticks(pieces(), 0.01):
            got.append(item)
            if item is None:
                release.set()
    assert got[0] == "a" and got[-1] == "b" and None in got[1:-1], got
    assert set(got[1:-1]) == {None}, got


class _CompilingEngine:
    """An engine whose first answer compiles a program and whose next ones do not."""

    warm_up_s = 12.0

    def __init__(self):
        import jax

        from ppllava_jax.demo_engine import CompileClock

        self.clock = CompileClock()
        self.program = jax.jit(lambda x: x * 2.0 + 1.0)

    def read_video(self, video, num_frames):
        pass

    def ask(self, video, turns, question, *, result, **settings):
        self.program(np.ones(3, np.float32)).block_until_ready()
        yield "an answer"
        turns.append(question)


def test_status_says_when_an_answer_compiled():
    _gradio()
    from ppllava_jax.demo import Handlers

    handlers = Handlers(_CompilingEngine())
    state = None
    statuses = []
    for question in ("first?", "second?"):
        *_, (msgs, _, status, state, box) = handlers.on_ask(question, "clip.mp4", 8, 6, 0.0, state)
        statuses.append(status["value"])
    first, second = statuses
    assert first.startswith("Answered") and "s of it compiling for these settings" in first
    assert second.startswith("Answered") and "compiling" not in second, second
    assert [m["content"] for m in msgs] == ["first?", "an answer", "second?", "an answer"]
