"""The web UI, `backprop ui` (docs/ui.md): a client of the SDK like the CLI, no training logic
of its own, so it drives the embedded default and a remote stack alike.

- command: the Typer command: its security checks, then serving until Ctrl-C
- security: who may reach it (exposure, login, login limiter) and where it may write
- guard: the ASGI gate in front of the server: sessions on every route, logins rate-limited
- app: the pages in one Gradio app, and how it is served (offline, nothing phoned home)
- context: what every page works with: settings, the output directory, the SDK
- data_page, train_page, runs_page, multirun_page, export_page, chat_page: one page each
- train_form: the Train page's settings with their defaults and reasons
- follow: a run as pages show it while it goes; views: records as Markdown and chart data
- handlers: errors as one readable message; streaming: a blocking SDK call as a stream

Only `command` is imported by the CLI; the rest needs the `ui` extra (Gradio).
"""
