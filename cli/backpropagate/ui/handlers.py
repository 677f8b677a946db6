"""Page handlers as Gradio calls them: errors become one readable message in the browser."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gradio as gr

from backpropagate_api.errors import BackpropagateError
from backpropagate_api.redaction import redact

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def shown_errors(handler: F) -> F:
    """A page handler whose failures reach the browser as one readable message: a
    BackpropagateError as its code, message and hint; anything else (a bug) as its type and
    redacted text, with the traceback only in this process's log. Never a bare traceback.
    Generators (pages that stream) are wrapped as generators, as Gradio needs."""

    def shown(error: Exception) -> gr.Error:
        if isinstance(error, BackpropagateError):
            message = f"[{error.code}] {error.message} (hint: {error.hint})"
        else:
            log.exception("web UI handler %s failed", handler.__name__)
            message = f"[INTERNAL] {type(error).__name__}: {redact(str(error))}"
        return gr.Error(message, duration=None, print_exception=False)

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def streaming(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from handler(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as error:
                raise shown(error) from None

        return streaming  # type: ignore[return-value]

    @functools.wraps(handler)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise shown(error) from None

    return plain  # type: ignore[return-value]
