"""Who may reach `backprop ui`, and what it may write: against the real command and its server.

Exposing the UI (`--share`, a `--host` beyond loopback) without a login exits 1 with
INPUT_AUTH_REQUIRED before anything binds; the documented opt-out warns and waits before binding.
With `--auth`, every page and API route but the login page's own refuses a caller without a
session, a wrong password is refused and the right one lets in (in Chromium), failed logins are
rate-limited, and the password reaches no log. An output directory in a system or credential
directory is refused (UI_OUTPUT_DIR_FORBIDDEN); uploads over the cap are refused and leave
nothing behind.

`--share` itself needs gradio.live, on the internet, which tests cannot reach: its refusal and
the login it would require are tested here on loopback, the tunnel is not.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import servers
from ui_browser import UiPage, chromium
from ui_server import SCREENSHOTS, UiServer, backprop, ui_env, ui_process

from backpropagate.ui.guard import is_public

pytestmark = pytest.mark.browser

USER, PASSWORD = "alice", "hunter2-not-in-any-log"
MAX_FAILED_LOGINS = 3
LOCKOUT_SECONDS = 2.0
MAX_UPLOAD_BYTES = 4096


def bound(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((servers.LOOPBACK, port)) == 0


def refused_start(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """`backprop ui ARGS` that must exit at once: its result, after checking it bound nothing."""
    port = servers.free_port()
    done = subprocess.run(
        [backprop(), "ui", "--port", str(port), *args],
        env=ui_env(tmp_path, **settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not bound(port), "the refused UI left its port bound"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_share_without_auth_exits_1_with_input_auth_required_and_binds_nothing(
    tmp_path: Path,
) -> None:
    done = refused_start(tmp_path, "--share")

    assert done.returncode == 1, done
    assert "INPUT_AUTH_REQUIRED" in done.stderr and "--share" in done.stderr
    assert "--auth user:password" in done.stderr  # the hint says what to do
    assert not (tmp_path / "ui-outputs").exists()  # refused before anything was written


def test_a_host_beyond_loopback_without_auth_is_refused_the_same_way(tmp_path: Path) -> None:
    done = refused_start(tmp_path, "--host", "0.0.0.0")

    assert done.returncode == 1, done
    assert "INPUT_AUTH_REQUIRED" in done.stderr and "0.0.0.0" in done.stderr


def test_a_malformed_auth_is_refused_without_echoing_it(tmp_path: Path) -> None:
    done = refused_start(tmp_path, "--share", "--auth", "no-colon-secret")

    assert done.returncode == 1, done
    assert "INPUT_CONFIG_INVALID" in done.stderr and "user:password" in done.stderr
    assert "no-colon-secret" not in done.stderr + done.stdout


def test_the_opt_out_warns_loudly_and_binds_nothing_during_its_grace_period(
    tmp_path: Path,
) -> None:
    port = servers.free_port()
    process = subprocess.Popen(
        [backprop(), "ui", "--host", "0.0.0.0", "--port", str(port)],
        env=ui_env(tmp_path, BACKPROPAGATE_SECURITY__REQUIRE_AUTH_FOR_SHARE="false"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        said = ""
        deadline = time.monotonic() + 60
        while "binding in 4 s" not in said and time.monotonic() < deadline:
            if select.select([process.stderr], [], [], 1)[0]:
                said += process.stderr.readline()  # type: ignore[union-attr]
        assert "WARNING" in said and "WITHOUT A LOGIN" in said, said
        assert "binding in 5 s" in said and "Ctrl-C" in said
        assert not bound(port)  # still waiting: nothing bound yet
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, rest
    assert "nothing was served" in rest and "Traceback" not in rest
    assert not bound(port)


@pytest.mark.parametrize(
    "directory", ["/etc/backpropagate-ui", "/var/lib/bp", "~/.ssh/bp", "~/.aws", "~", "/"]
)
def test_an_output_dir_in_or_over_a_system_or_credential_directory_is_refused(
    tmp_path: Path, directory: str
) -> None:
    home = tmp_path / "user"  # the process's ~: its .ssh is the one refused
    (home / ".ssh").mkdir(parents=True)
    done = refused_start(tmp_path / "stack", BACKPROPAGATE_UI__OUTPUT_DIR=directory, HOME=str(home))

    assert done.returncode == 1, done
    assert "UI_OUTPUT_DIR_FORBIDDEN" in done.stderr, done.stderr
    assert not Path(directory.replace("~", str(home))).exists() or directory in ("~", "/")


# --- a UI with a login ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServer]:
    home = tmp_path_factory.mktemp("ui-auth-home")
    with ui_process(
        home,
        "--auth",
        f"{USER}:{PASSWORD}",
        BACKPROPAGATE_UI__MAX_FAILED_LOGINS=str(MAX_FAILED_LOGINS),
        BACKPROPAGATE_UI__LOGIN_LOCKOUT_SECONDS=str(LOCKOUT_SECONDS),
        BACKPROPAGATE_UI__MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
    ) as server:
        yield server


def login(client: httpx.Client, password: str = PASSWORD) -> httpx.Response:
    return client.post("/login", data={"username": USER, "password": password})


def gradio_routes() -> list[tuple[str, str]]:
    """(method, path) of every route Gradio serves, from its own app: the pages' API endpoints
    are the templated /gradio_api/... routes, whatever the pages."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr
    from gradio.routes import App

    def walk(routes: list, prefix: str = "") -> Iterator[tuple[str, str]]:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                yield from walk(included.routes, prefix + (route.include_context.prefix or ""))
            elif hasattr(route, "path"):
                for method in sorted(getattr(route, "methods", None) or {"GET"}):
                    yield method, prefix + route.path

    app = App.create_app(gr.Blocks(analytics_enabled=False))
    return sorted(set(walk(app.routes)))


def concrete(path: str) -> str:
    """A templated path with every parameter filled in."""
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + "0" + path[end + 1 :]
    return path


def test_every_page_and_api_route_refuses_a_caller_who_has_not_logged_in(
    guarded: UiServer,
) -> None:
    routes = gradio_routes()
    assert len(routes) > 60  # the walk found Gradio's API, not just its pages
    private = [(method, path) for method, path in routes if not is_public(concrete(path))]
    with httpx.Client(base_url=guarded.url, timeout=10) as anonymous:
        answers = {
            (method, path): anonymous.request(method, concrete(path)).status_code
            for method, path in private
            if method != "HEAD"
        }
        shell = anonymous.get("/")
    assert {route: status for route, status in answers.items() if status != 401} == {}
    # The page itself is the login form's shell: none of the app's pages is in it.
    assert shell.status_code == 200 and "Estimate memory" not in shell.text
    with httpx.Client(base_url=guarded.url, timeout=10) as user:
        assert login(user).status_code == 200
        config = user.get("/config")
        assert config.status_code == 200 and "Estimate memory" in config.text
        assert user.get("/gradio_api/info").status_code == 200


def test_the_login_page_refuses_a_wrong_password_and_lets_the_right_one_in(
    guarded: UiServer, tmp_path: Path
) -> None:
    with chromium(tmp_path / "profile") as driver:
        page = UiPage(driver, guarded.url, SCREENSHOTS)
        driver.get(guarded.url)

        def log_in(password: str) -> bool:
            """Fill the form and submit it; False until it is there. The form is drawn again
            after a refusal, so it is found afresh each time (a stale one is tried again)."""
            fields = driver.find_elements("css selector", "input")[:2]
            if len(fields) < 2:
                return False
            for field, text in zip(fields, (USER, password), strict=True):
                field.clear()
                field.send_keys(text)
            driver.find_element("xpath", "//button[normalize-space()='Login']").click()
            return True

        page.wait_for(lambda: log_in("wrong"), "the login form")
        page.wait_for(lambda: "Incorrect Credentials" in driver.page_source, "the login's refusal")
        page.screenshot("login-refused")
        page.wait_for(lambda: log_in(PASSWORD), "the login form again")
        # The app's page arrives before it draws its tabs: wait for them, not for its text.
        page.wait_until(
            lambda: {tab.text for tab in driver.find_elements("css selector", "button[role=tab]")},
            lambda tabs: tabs >= {"Data", "Train", "Runs", "Multi-run", "Export", "Chat"},
            "the app's tabs after login",
        )


def test_failed_logins_are_rate_limited_even_for_the_right_password_until_the_lockout_ends(
    guarded: UiServer,
) -> None:
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        failures = [login(client, "guess").status_code for _ in range(MAX_FAILED_LOGINS)]
        limited = login(client)  # the right password: refused while locked out
        time.sleep(LOCKOUT_SECONDS + 0.5)
        after = login(client)
    assert failures == [400] * MAX_FAILED_LOGINS
    assert limited.status_code == 429, limited.text
    assert limited.json()["detail"]["code"] == "INPUT_LOGIN_RATE_LIMITED"
    assert int(limited.headers["retry-after"]) >= 1
    assert after.status_code == 200


def test_an_upload_over_the_cap_is_refused_and_leaves_nothing_behind(guarded: UiServer) -> None:
    def files() -> set[Path]:
        return {p for p in guarded.output_dir.rglob("*") if p.is_file() and p.stat().st_size}

    before = files()
    with httpx.Client(base_url=guarded.url, timeout=30) as user:
        assert login(user).status_code == 200
        too_big = user.post("/gradio_api/upload", files={"files": ("big.jsonl", b"x" * 10_000)})
        small = user.post("/gradio_api/upload", files={"files": ("small.jsonl", b"{}\n")})
    assert too_big.status_code == 413, too_big.text
    assert small.status_code == 200, small.text
    (stored,) = files() - before
    assert stored.name == "small.jsonl" and guarded.output_dir in stored.parents


def test_the_password_is_never_logged(guarded: UiServer) -> None:
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        login(client, f"{PASSWORD}-typo")  # a near miss, logged as a failure
        assert login(client).status_code == 200
    logs = [guarded.log, *(guarded.home / "logs").rglob("*")]
    text = "".join(path.read_text(errors="replace") for path in logs if path.is_file())
    assert "failed login from 127.0.0.1" in text  # the failures are logged...
    assert PASSWORD not in text  # ...never what was typed
