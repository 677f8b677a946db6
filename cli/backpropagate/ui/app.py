"""The web app: the six pages in one Gradio Blocks, served behind the guard (guard.UiGuard).

Gradio is this field's convention for such UIs, and it fits ours: its front end ships inside the
wheel (fonts included in its default theme), so the page works offline; it serves from the same
Python process as the SDK calls, with no build step and no Node; its streaming handlers carry a
live chart; its login covers pages and API alike (with the guard closing what it leaves open).
Nothing here phones home: analytics and the version check are off, and server-side rendering
(which needs Node) and the MCP server are not started.
"""

from __future__ import annotations

import os
from typing import Any

from backpropagate.ui.context import UiContext
from backpropagate.ui.security import Credentials, LoginLimiter

TITLE = "Backpropagate"
# Long-running handlers (a followed run, an export) must not queue behind each other, nor behind
# another browser's: each event may run this many at once.
CONCURRENT_HANDLERS = 16


def keep_gradio_inside(context: UiContext) -> None:
    """Before Gradio is imported: no analytics or version check, and every file Gradio writes
    (uploads, files handed to the browser) under the output directory."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(context.output_dir)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(context.output_dir / "examples-cache")


def build(context: UiContext) -> Any:
    """The app's pages (gr.Blocks), not yet served."""
    keep_gradio_inside(context)
    import gradio as gr

    from backpropagate.ui import (
        chat_page,
        data_page,
        export_page,
        multirun_page,
        runs_page,
        train_page,
    )

    where = "embedded in this process" if context.connection.embedded else "a remote stack"
    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        with gr.Row():
            gr.Markdown(
                f"## {TITLE}\nStack: {where}. Every file this UI writes goes under "
                f"`{context.output_dir}`."
            )
            model = gr.Textbox(
                label="model",
                placeholder=f"empty: the stack's default ({context.settings.model.name})",
                elem_id="model",
            )
        dataset = gr.State(None)
        with gr.Tab("Data", id="data"):
            data_page.build(context, model, dataset)
        with gr.Tab("Train", id="train"):
            train_page.build(context, model, dataset)
        with gr.Tab("Runs", id="runs") as runs_tab:
            runs_page.build(context, runs_tab)
        with gr.Tab("Multi-run", id="multi-run"):
            multirun_page.build(context, model, dataset)
        with gr.Tab("Export", id="export") as export_tab:
            export_page.build(context, export_tab)
        with gr.Tab("Chat", id="chat") as chat_tab:
            chat_page.build(context, chat_tab)
    blocks.queue(default_concurrency_limit=CONCURRENT_HANDLERS)
    return blocks


def serve(
    context: UiContext, *, host: str, port: int, share: bool, login: Credentials | None
) -> tuple[Any, str, str | None]:
    """Start serving in a thread of this process; returns the blocks, the local URL and the
    public one (--share). The caller waits (blocks.block_thread()) and closes."""
    blocks = build(context)
    from starlette.middleware import Middleware

    from backpropagate.ui.guard import UiGuard

    settings = context.settings.ui
    limiter = LoginLimiter(settings.max_failed_logins, settings.login_lockout_seconds)
    guard = Middleware(UiGuard, login_required=login is not None, limiter=limiter)
    _, local_url, share_url = blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=login.match if login else None,
        auth_message="Log in with the user and password `backprop ui --auth` was given.",
        max_file_size=settings.max_upload_bytes,
        app_kwargs={"middleware": [guard], "openapi_url": None, "docs_url": None},
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,  # a page's error is the gr.Error shown_errors wrote, nothing more
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
    )
    return blocks, local_url, share_url
