"""The web demo's page (``python -m ppllava_jax.demo``): its parts, their places and style.

``demo.build_app`` builds the page in three phases: :func:`layout` places the components (a
:class:`Page`: the video and the settings on the left, the conversation with the status line
right under it, the relevance gallery with its colour legend on the right), ``demo.Handlers``
says what each event does, and :func:`wire` connects the two. Gradio is imported where it is
used (it is the ``demo`` extra).
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any

import numpy as np

from ppllava_jax.evaluate import heatmap

ELEM_STATUS = "demo-status"
ELEM_LEGEND = "demo-legend"
ELEM_GALLERY = "demo-heatmap"
ERROR_CLASS = "demo-error"  # the status line while it shows an error
GALLERY_COLUMNS = 4
LEGEND_STOPS = 11  # colours of the legend's gradient, evenly spaced over [0, 1]

# The gallery's columns share its width (gradio's are at least 100 px wide, and the last one ran
# out of a narrow column); the status line stands out when it reports an error.
CSS = f"""
#{ELEM_GALLERY} .grid-container {{
  grid-template-columns: repeat({GALLERY_COLUMNS}, minmax(0, 1fr)) !important;
}}
#{ELEM_LEGEND} {{ font-size: var(--text-sm); padding: 0 var(--size-2); }}
#{ELEM_LEGEND} .demo-legend-bar {{ height: 14px; border-radius: 3px; }}
#{ELEM_LEGEND} .demo-legend-ends {{ display: flex; justify-content: space-between; }}
#{ELEM_STATUS} {{ min-height: 1.5em; }}
#{ELEM_STATUS}.{ERROR_CLASS} {{
  border: 1px solid var(--error-border-color, #ef4444);
  background: var(--error-background-fill, #fef2f2);
  border-radius: var(--radius-md);
  padding: var(--size-1) var(--size-2);
}}
"""


def legend_html() -> str:
    """The gallery's colour legend: the colour map's gradient from low to high relevance and
    what the colours mean (HTML)."""
    x = np.linspace(0.0, 1.0, LEGEND_STOPS)
    stops = ", ".join(
        f"rgb({r}, {g}, {b}) {100 * v:g}%" for v, (r, g, b) in zip(x, heatmap.colormap(x))
    )
    return (
        f'<div class="demo-legend-bar" style="background: linear-gradient(to right, {stops})">'
        "</div>"
        '<div class="demo-legend-ends"><span>low relevance</span><span>high relevance</span>'
        "</div>"
        f"<div>Colour ({html.escape(heatmap.CMAP)}) over the greyed frame: how much each patch "
        "matches the question (cosine of the prompt encoder's text and the patch, scaled from "
        "the lowest to the highest over all the frames shown).</div>"
    )


def status_update(gr: Any, text: str, error: bool = False) -> Any:
    """The status line's new text; an error is marked (``Error: ...``) and framed."""
    return gr.update(
        value=f"**Error:** {text}" if error else text,
        elem_classes=[ERROR_CLASS] if error else [],
    )


def frame_range(cfg: Any) -> tuple[int, int]:
    """(fewest, most) frames the model takes: the pooling kernel's length in time with
    prompt-guided pooling, else 1; ``cfg.max_T``."""
    return (int(cfg.pooling_kernel[0]) if cfg.pooling == "ppllava" else 1), int(cfg.max_T)


def clamp_frames(cfg: Any, num_frames: int) -> int:
    """``num_frames`` within :func:`frame_range`."""
    lo, hi = frame_range(cfg)
    return max(lo, min(int(num_frames), hi))


@dataclasses.dataclass
class Page:
    """The page's components (gradio objects)."""

    state: Any
    sample: Any
    video: Any
    frames: Any
    max_new: Any
    temperature: Any
    chatbot: Any
    status: Any
    question: Any
    ask: Any
    reset: Any
    gallery: Any


def layout(
    cfg: Any,
    checkpoint: str,
    samples: list[str],
    *,
    num_frames: int,
    max_new_tokens: int,
    temperature: float,
    warm_up_s: float | None,
    state: dict,
) -> Page:
    """Place the page's components (inside an open ``gr.Blocks``); ``warm_up_s``: how long
    compiling the start-up settings took (said beside the settings)."""
    import gradio as gr

    lo, hi = frame_range(cfg)
    gr.Markdown(
        "## PPLLaVA: talk about a video\n"
        f"Checkpoint `{checkpoint}`. Pick a sample or upload a video, then ask; the question also "
        "guides which patches the model pools (right)."
    )
    st = gr.State(state)
    with gr.Row():
        with gr.Column(scale=2):
            sample = gr.Dropdown(
                choices=[(os.path.basename(p), p) for p in samples],
                value=None,
                label="Sample videos",
                elem_id="demo-samples",
                interactive=True,
            )
            video = gr.Video(label="Video", sources=["upload"], elem_id="demo-video", height=260)
            with gr.Accordion("Generation settings", open=True):
                frames = gr.Slider(
                    lo,
                    hi,
                    value=clamp_frames(cfg, num_frames),
                    step=1,
                    label="Frames sampled",
                    elem_id="demo-frames",
                )
                top = max(int(cfg.llm.max_position_embeddings) // 2, max_new_tokens)
                max_new = gr.Slider(
                    1,
                    top,
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
                took = f" (about {warm_up_s:.0f} s here)" if warm_up_s else ""
                gr.Markdown(
                    "Compiled for these settings at start-up; others compile on their first "
                    f"question{took}.",
                    elem_id="demo-settings-note",
                )
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", elem_id="demo-chat", height=380)
            status = gr.Markdown("Pick a sample video or upload one.", elem_id=ELEM_STATUS)
            question = gr.Textbox(
                label="Question",
                placeholder="What colour is the square?",
                elem_id="demo-question",
                lines=1,
                max_lines=4,  # a long paste scrolls inside the box instead of pushing the page
            )
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="demo-ask")
                reset = gr.Button("New conversation", elem_id="demo-reset")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Prompt-to-patch relevance per sampled frame",
                elem_id=ELEM_GALLERY,
                columns=GALLERY_COLUMNS,
                height=420,
                format="png",
                object_fit="contain",
                interactive=False,
                buttons=["download"],
            )
            gr.HTML(legend_html(), elem_id=ELEM_LEGEND)
    return Page(
        st, sample, video, frames, max_new, temp, chatbot, status, question, ask, reset, gallery
    )


def wire(page: Page, handlers: Any) -> None:
    """Connect the page's events to ``handlers`` (``demo.Handlers``)."""
    p = page
    # the sample list only by hand (.input): clearing it below must not clear the video
    p.sample.input(handlers.on_sample, [p.sample], [p.video])
    # an uploaded (or removed) video is no longer the sample picked: clear the list
    p.video.upload(lambda: None, None, [p.sample])
    p.video.clear(lambda: None, None, [p.sample])
    shown = [p.chatbot, p.gallery, p.status, p.state]
    p.video.change(handlers.on_video, [p.video, p.frames, p.state], shown)
    p.reset.click(handlers.on_reset, [p.state], shown)
    p.chatbot.clear(handlers.on_reset, [p.state], shown)
    inputs = [p.question, p.video, p.frames, p.max_new, p.temperature, p.state]
    outputs = [*shown, p.question]
    # one queue for both ways of asking: one answer generated at a time
    p.ask.click(handlers.on_ask, inputs, outputs, concurrency_id="generate")
    p.question.submit(handlers.on_ask, inputs, outputs, concurrency_id="generate")
