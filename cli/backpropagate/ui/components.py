"""Gradio components that several pages show alike, so the pages keep one look."""

from __future__ import annotations

import gradio as gr


def loss_chart(title: str, height: int, elem_id: str) -> gr.LinePlot:
    """An empty loss chart, one line per series (train, eval, or a campaign's runs), filled by
    the frames `views.loss_frame` builds."""
    return gr.LinePlot(
        None, x="step", y="loss", color="series", title=title, height=height, elem_id=elem_id
    )
