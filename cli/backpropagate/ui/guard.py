"""The gate in front of the UI's web server (ASGI middleware around Gradio's app).

Gradio's own login leaves some routes open (its API's `reset`, `cancel`, `stream`, heartbeat and
app-id routes, the run-history page, FastAPI's OpenAPI schema); with a login configured this gate
lets through only what the login page itself needs (its HTML shell, scripts, styles, fonts and
the login call) until the browser holds a session, and answers everything else 401 as Gradio
does. It also rate-limits the login call per client address (security.LoginLimiter): Gradio has
no limit of its own. Failed logins are logged with the address, never with what was typed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any

from starlette.responses import JSONResponse

from backpropagate.ui.security import LoginLimiter
from backpropagate_api.errors import LoginRateLimitedError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOGIN_PATHS = ("/login", "/login/")
# What the login page loads before anyone has signed in: static files, the page's shell, and
# the two calls whose 401 makes it show the login form; and the call with which Gradio's launch
# checks, from this process, that its server is up. Nothing here reads or changes a run.
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/gradio_api/startup-events",
        *LOGIN_PATHS,
        "/logout",
        "/config",
        "/config/",
        "/gradio_api/login_check",
        "/gradio_api/login_check/",
        "/favicon.ico",
        "/manifest.json",
        "/robots.txt",
        "/theme.css",
        "/gradio_api/theme.css",
    }
)
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/gradio_api/static/")
NOT_SIGNED_IN = {"detail": {"error": "Not authenticated", "auth_message": None}}


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _cookies(scope: Scope) -> dict[str, str]:
    header = b"; ".join(value for name, value in scope.get("headers", []) if name == b"cookie")
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header.decode("latin-1"))
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def signed_in(scope: Scope) -> bool:
    """Whether the request carries a session Gradio's login handed out (its cookies, its
    token table: the same test its own routes make)."""
    app = scope.get("app")
    tokens: dict[str, str] = getattr(app, "tokens", {})
    cookie_id = getattr(app, "cookie_id", None)
    if cookie_id is None:
        return False
    cookies = _cookies(scope)
    return any(
        cookies.get(name) in tokens
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}")
    )


def client_address(scope: Scope) -> str:
    """The peer's address as the server saw it. Forwarded-for headers are not believed: anyone
    can send one. Behind a tunnel (--share) every caller shares the tunnel's address, so the
    limit then holds for all of them together."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class UiGuard:
    """ASGI middleware: sessions required when `login_required`, logins rate-limited."""

    def __init__(self, app: ASGIApp, *, login_required: bool, limiter: LoginLimiter) -> None:
        self.app = app
        self.login_required = login_required
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.login_required and not is_public(path) and not signed_in(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse(NOT_SIGNED_IN, status_code=401)(scope, receive, send)
            return
        if path in LOGIN_PATHS and scope.get("method") == "POST":
            await self._login(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Gradio's login, unless the address is locked out; its answer counts as a success
        (200) or a failure (400: wrong user or password)."""
        address = client_address(scope)
        try:
            self.limiter.check(address)
        except LoginRateLimitedError as refused:
            headers = {"Retry-After": refused.context["retry_after"]}
            body = {"detail": refused.to_dict()}
            await JSONResponse(body, status_code=429, headers=headers)(scope, receive, send)
            return
        status = 0

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await self.app(scope, receive, send_noting_status)
        if status == 200:
            self.limiter.succeeded(address)
        elif status == 400:
            failures = self.limiter.failed(address)
            log.warning(
                "failed login from %s (%d of %d before a %.0f s lockout)",
                address,
                failures,
                self.limiter.max_failures,
                self.limiter.lockout_seconds,
            )
