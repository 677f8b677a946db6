"""Who may use the web UI, and where it may write: what `backprop ui` checks before anything
binds, and the login limiter its server applies. Plain Python, no web framework: the rules are
tested on their own.

- Exposure: the UI listens on loopback. `--share` (a public gradio.live URL) or a `--host`
  beyond loopback needs a login (`--auth user:password`, or BACKPROPAGATE_UI__AUTH out of the
  process list), else INPUT_AUTH_REQUIRED before any port is bound; the product's opt-out,
  BACKPROPAGATE_SECURITY__REQUIRE_AUTH_FOR_SHARE=false, turns the refusal into a loud warning.
- Logins: an address that fails too often in a row is refused for a while, a right password
  included, so a password cannot be guessed at the server's speed.
- Output directory: every file the UI writes (uploads, downloaded exports) goes under one
  directory, and the server hands out any file in it to whoever is signed in. A system or
  credential directory, or one that holds such a directory (the home, `/`), is refused.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from backpropagate_api.channels import is_loopback
from backpropagate_api.errors import (
    AuthRequiredError,
    ConfigError,
    LoginRateLimitedError,
    UiOutputDirForbiddenError,
)
from backpropagate_api.private_files import private_directory
from backpropagate_api.settings import Settings

# Where the system keeps what a user's files must never be written into, or served from.
SYSTEM_DIRECTORIES = (
    "/etc",
    "/var",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/boot",
    "/dev",
    "/proc",
    "/sys",
    "/run",
    "/System",
    "/Library",
    "/private/etc",
    "/private/var",
    "C:/Windows",
    "C:/Program Files",
    "C:/Program Files (x86)",
    "C:/ProgramData",
)
# Under the home directory: where keys, tokens and passwords live.
CREDENTIAL_DIRECTORIES = (
    ".ssh",
    ".aws",
    ".gnupg",
    ".kube",
    ".docker",
    ".azure",
    ".netrc",
    ".password-store",
    ".huggingface",
    ".cache/huggingface",
    ".config/gcloud",
    ".config/gh",
    ".local/share/keyrings",
)


@dataclass(frozen=True)
class Credentials:
    """The one user:password the UI asks for. The password is a SecretStr: it never prints."""

    user: str
    password: SecretStr

    def match(self, user: str, password: str) -> bool:
        """Both compared in constant time, and both always compared: a wrong user takes as long
        as a wrong password."""
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        password_ok = hmac.compare_digest(
            password.encode(), self.password.get_secret_value().encode()
        )
        return user_ok and password_ok


def parse_credentials(text: str) -> Credentials:
    """`user:password` (the password may hold colons). The text is never quoted in the error:
    it is a password."""
    user, colon, password = text.partition(":")
    if not (colon and user.strip() and password):
        raise ConfigError(
            "--auth (or BACKPROPAGATE_UI__AUTH) takes user:password, with both parts non-empty.",
            hint="e.g. --auth alice:hunter2, or BACKPROPAGATE_UI__AUTH=alice:hunter2 to keep the "
            "password out of the process list.",
        )
    return Credentials(user.strip(), SecretStr(password))


def login_of(auth: str, settings: Settings) -> Credentials | None:
    """The login the UI asks for: `--auth`, else BACKPROPAGATE_UI__AUTH; None: no login."""
    text = auth or (settings.ui.auth.get_secret_value() if settings.ui.auth else "")
    return parse_credentials(text) if text else None


def exposure(host: str, share: bool) -> str:
    """What makes the UI reachable from beyond this machine, in words; "" when nothing does."""
    if share:
        return "--share publishes it at a public gradio.live URL"
    if not is_loopback(f"{host}:0"):
        return f"--host {host} listens beyond this machine"
    return ""


def check_exposure(host: str, share: bool, login: Credentials | None, settings: Settings) -> str:
    """Refuse to expose the UI without a login (AuthRequiredError), unless the settings opt
    out: then the warning to print, loudly, before the grace period. "" when all is well."""
    reached = exposure(host, share)
    if not reached or login is not None:
        return ""
    if settings.security.require_auth_for_share:
        raise AuthRequiredError(
            f"{reached}, and without a login anyone who reaches it could train, export and "
            "read your runs.",
            hint="Pass --auth user:password (or set BACKPROPAGATE_UI__AUTH), or leave --share "
            "and --host out and reach it over `ssh -L 7860:127.0.0.1:7860 HOST`.",
        )
    return (
        f"{reached} WITHOUT A LOGIN (BACKPROPAGATE_SECURITY__REQUIRE_AUTH_FOR_SHARE=false): "
        "anyone who reaches it can train, export and read your runs."
    )


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _forbidden_directories() -> list[Path]:
    home = Path.home()
    return [
        *(Path(name) for name in SYSTEM_DIRECTORIES),
        *(home / name for name in CREDENTIAL_DIRECTORIES),
    ]


def forbidden_reason(directory: Path, settings: Settings) -> str:
    """Why the UI may not write into `directory` ("" if it may). Symlinks are followed first,
    so a link into /etc is /etc."""
    resolved = Path(os.path.realpath(directory.expanduser()))
    for forbidden in _forbidden_directories():
        for candidate in {forbidden, Path(os.path.realpath(forbidden))}:
            if _inside(resolved, candidate):
                return f"it is inside {candidate}, a system or credential directory"
            if _inside(candidate, resolved):
                return f"it holds {candidate}, which the UI would then serve"
    stack_home = Path(os.path.realpath(settings.home.expanduser()))
    if _inside(stack_home, resolved):
        return f"it holds the stack's own directory {stack_home}"
    return ""


def ui_output_dir(settings: Settings) -> Path:
    """The UI's output directory, checked (UiOutputDirForbiddenError) and created 0700."""
    directory = settings.ui_output_dir.expanduser()
    reason = forbidden_reason(directory, settings)
    if reason:
        raise UiOutputDirForbiddenError(
            f"The UI may not write into {directory}: {reason}.", path=str(directory)
        )
    return private_directory(Path(os.path.realpath(directory)))


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0


@dataclass
class LoginLimiter:
    """Failed logins per client address: after `max_failures` in a row the address is refused
    for `lockout_seconds`, whatever it sends; a successful login clears its count. Bounded: at
    most `max_addresses` are remembered (the oldest forgotten first)."""

    max_failures: int
    lockout_seconds: float
    clock: Callable[[], float] = time.monotonic
    max_addresses: int = 4096
    _failures: dict[str, _Failures] = field(default_factory=dict)

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again; 0: now."""
        entry = self._failures.get(address)
        return max(0.0, entry.locked_until - self.clock()) if entry else 0.0

    def check(self, address: str) -> None:
        """LoginRateLimitedError while `address` is locked out."""
        wait = self.retry_after(address)
        if wait:
            raise LoginRateLimitedError(
                f"Too many failed logins from {address}: try again in {wait:.0f} s.",
                retry_after=f"{wait:.0f}",
            )

    def failed(self, address: str) -> int:
        """Count a failure; returns the failures in a row (the lockout starts at the limit)."""
        entry = self._failures.pop(address, None) or _Failures()
        self._failures[address] = entry  # most recent last: the oldest is forgotten first
        entry.count += 1
        if entry.count >= self.max_failures:
            entry.locked_until = self.clock() + self.lockout_seconds
            entry.count = 0
        while len(self._failures) > self.max_addresses:
            del self._failures[next(iter(self._failures))]
        return entry.count or self.max_failures

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
