"""`backprop ui`: check who could reach the UI and where it would write, then serve it.

Every refusal happens before a port is bound or Gradio is imported: a light install without the
`ui` extra still refuses `--share` without `--auth` the same way, and says which extra to
install only once the UI may start.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Annotated

import typer

from backpropagate.in_process import services_needed
from backpropagate.render import err_console
from backpropagate.ui.context import UiContext
from backpropagate.ui.security import check_exposure, login_of, ui_output_dir
from backpropagate_api.errors import EXIT_INTERRUPTED, ConfigError
from backpropagate_api.settings import get_settings

DEFAULT_PORT = 7860
GRACE_SECONDS = 5


def grace_period(warning: str, seconds: int = GRACE_SECONDS) -> None:
    """The opt-out's loud warning, then `seconds` to think better of it (Ctrl-C) before the
    unauthenticated UI binds."""
    err_console.print(f"[bold red]WARNING[/]: {warning}", soft_wrap=True)
    try:
        for left in range(seconds, 0, -1):
            err_console.print(f"[bold red]binding in {left} s[/]; Ctrl-C stops it")
            time.sleep(1)
    except KeyboardInterrupt:
        err_console.print("stopped before binding: nothing was served")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def ui_command(
    host: Annotated[
        str, typer.Option(help="Address to listen on; one beyond loopback needs --auth.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    share: Annotated[
        bool,
        typer.Option(
            "--share", help="Also publish a public gradio.live URL (needs --auth and internet)."
        ),
    ] = False,
    auth: Annotated[
        str,
        typer.Option(
            help="user:password every page and API call asks for (or BACKPROPAGATE_UI__AUTH, "
            "which keeps it out of the process list)."
        ),
    ] = "",
) -> None:
    """Serve the web UI: data, training, runs, multi-run, export and chat in a browser,
    through the same stack as the CLI (the embedded default, or BACKPROPAGATE_ENDPOINT)."""
    settings = get_settings()
    login = login_of(auth, settings)
    warning = check_exposure(host, share, login, settings)
    context = UiContext(settings, ui_output_dir(settings))
    if warning:
        grace_period(warning)
    try:
        with services_needed("backprop ui", "ui", services=False):  # Gradio, imported here
            from backpropagate.ui.app import serve

            blocks, local_url, share_url = serve(
                context, host=host, port=port, share=share, login=login
            )
    except OSError as exc:
        raise ConfigError(
            f"Cannot serve the UI on {host}:{port}: {exc}",
            hint="Pass --port with a free port (or --host with an address of this machine).",
        ) from None
    err_console.print(
        f"serving the UI at {local_url}"
        + (f" and {share_url}" if share_url else "")
        + ("; login required" if login else "")
        + f"; its files go to {context.output_dir}. Ctrl-C stops it (runs go on)."
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while blocks.is_running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        blocks.close(verbose=False)
