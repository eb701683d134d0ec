"""The web demo in a real headless browser (Debian's chromium driven by selenium).

`python -m ppllava_jax.demo` serves a tiny random checkpoint on 127.0.0.1 (a free port); the
browser uploads a file that is no video (an error in the page), uploads a synthetic clip, asks
two questions (the answers must be what `Chat` answers with the history kept, streamed: the
page shows growing prefixes), reads the heatmap gallery (each frame's picture must be the
relevance of the question computed here by the model's own forward pass), asks a question
too long for the context (an error in the page, the conversation kept), and picks a sample
video. Skipped only where chromium, chromedriver, selenium or gradio are missing and
PPLLAVA_REQUIRE_BROWSER is unset (`.ci/run` sets it and installs them).
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

    from tests.evaluate.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "data"))
    clip, bad = tmp_path / "moving_square.mp4", tmp_path / "not_a_video.mp4"
    _clip(clip)
    bad.write_text("this is text, not a video\n")
    server = Server(ckpt, tmp_path)
    d = None
    try:
        a1, a2, pics = _expected(ckpt, clip)  # while the server starts
        url = server.wait_url(240)
        d = _driver(chrome, chromedriver, tmp_path)
        page = Page(d)
        d.get(url)
        page.wait(lambda: "Pick a sample" in page.status(), 60, "the page")
        assert d.title == "PPLLaVA video chat"

        # a file that is no video: an error in the page, no conversation
        page.upload(bad)
        s = page.ask(Q1)
        assert s.startswith("Error:") and "not_a_video.mp4" in s and "Cannot read" in s, s
        assert str(tmp_path) not in s  # the server's paths stay on the server
        assert page.messages() == []

        # the synthetic clip, two questions: streamed, history kept, Chat's answers
        page.upload(clip)
        s = page.ask(Q1)
        assert s.startswith("Answered") and "1 turn in the context" in s, s
        msgs = page.messages()
        assert [r for r, _ in msgs] == ["user", "bot"] and msgs[0][1].strip() == Q1
        assert _norm(msgs[1][1]) == _norm(a1), (msgs, a1)
        growing = [t for t in dict.fromkeys(map(_norm, page.seen())) if t]
        assert len(growing) >= 2 and growing[-1] == _norm(a1), growing  # streamed, not at once
        assert all(_norm(a1).startswith(t) for t in growing), growing
        s = page.ask(Q2)
        assert s.startswith("Answered") and "2 turns in the context" in s, s
        msgs = page.messages()
        assert [r for r, _ in msgs] == ["user", "bot", "user", "bot"], msgs
        assert msgs[2][1].strip() == Q2 and _norm(msgs[3][1]) == _norm(a2), (msgs, a2)

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

        # a question too long for the context: an error, the conversation and server intact
        s = page.ask("What colour is the square " + "and the circle " * 300 + "?")
        assert s.startswith("Error:") and "does not fit in the model's context" in s, s
        assert "shorter question" in s and "--" not in s, s  # the page's settings, not flags
        assert len(page.messages()) == 4

        # a sample video: a new conversation about it
        page.find("#demo-samples input").click()
        page.wait(
            lambda: d.find_elements(page.By.CSS_SELECTOR, "[aria-label='eval_00000.mp4']"),
            30,
            "the sample list",
        )[0].click()
        page.wait(lambda: "eval_00000.mp4" in page.status(), 60, "the sample")
        assert page.messages() == []
        s = page.ask(Q1)
        assert s.startswith("Answered") and "1 turn in the context" in s, s
        assert len(page.messages()) == 2
    finally:
        if d is not None:
            d.quit()
        server.stop()
    assert server.proc.returncode is not None
