"""Chat: talk to a GGUF exported through the UI, in llama.cpp with the chat template it carries
(as `backprop chat` does: each answer in a child process, so a native crash ends one answer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from backpropagate.ui.context import UiContext
from backpropagate.ui.handlers import shown_errors
from backpropagate_api.errors import NotFoundError

Messages = list[dict[str, Any]]


def gguf_choices(context: UiContext) -> list[tuple[str, str]]:
    return [(path.name, str(path)) for path in context.exported_ggufs()]


def build(context: UiContext, tab: gr.Tab) -> None:
    with gr.Row():
        gguf = gr.Dropdown(
            [], label="model (a GGUF exported on the Export page)", scale=3, elem_id="chat-model"
        )
        refresh = gr.Button("Refresh", scale=1)
    with gr.Row():
        system = gr.Textbox(label="system prompt", scale=3)
        max_tokens = gr.Number(256, precision=0, label="longest answer (tokens)", scale=1)
    chatbot = gr.Chatbot(label="chat", height=360, elem_id="chat-history")
    with gr.Row():
        message = gr.Textbox(label="message", scale=4, elem_id="chat-message")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1)

    def choices() -> Any:
        listed = gguf_choices(context)
        return gr.update(choices=listed, value=listed[0][1] if listed else None)

    @shown_errors
    def answer(
        chosen: str | None, question: str, history: Messages, system_prompt: str, longest: float
    ) -> tuple[Messages, str]:
        from backpropagate import chat

        offered = {str(path) for path in context.exported_ggufs()}
        if not chosen or chosen not in offered:
            raise NotFoundError(
                "No exported model picked.", hint="Export a run as GGUF first, then pick it."
            )
        if not question.strip():
            return history, ""
        turns = [{"role": turn["role"], "content": str(turn["content"])} for turn in history]
        asked = [*turns, {"role": "user", "content": question}]
        text = chat.answer(
            Path(chosen),
            asked,
            system=system_prompt,
            threads=context.settings.export.threads,
            max_tokens=int(longest or 256),
        )
        return [*asked, {"role": "assistant", "content": text}], ""

    refresh.click(choices, None, gguf)
    tab.select(choices, None, gguf)
    inputs = [gguf, message, chatbot, system, max_tokens]
    send.click(answer, inputs, [chatbot, message])
    message.submit(answer, inputs, [chatbot, message])
    clear.click(lambda: [], None, chatbot)
