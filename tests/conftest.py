"""Fixtures shared by every test directory; the server machinery lives in `servers.py`."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers

from backpropagate_api.settings import Settings

GIB = 1024**3
FREE_AT_START = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    """A home of its own for the session (queue file, artifacts, logs, for this process and
    the ones it starts), so no job left by another session, or in the user's own
    ~/.backpropagate, is taken by a test's worker; the model cache stays shared. It is removed
    at the end, as a machine that runs the suite again and again keeps its /tmp."""
    os.environ.setdefault("BACKPROPAGATE_MODEL_CACHE", str(Settings().model_cache_dir))
    os.environ["BACKPROPAGATE_HOME"] = tempfile.mkdtemp(prefix="bp-test-home-")
    config.stash[FREE_AT_START] = shutil.disk_usage(tempfile.gettempdir()).free
    # Started in the background (`make test &`, nohup), the suite inherits SIGINT ignored, and
    # so would every process it starts: the drills that press Ctrl-C on one need it delivered.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["BACKPROPAGATE_HOME"], ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Seconds spent in each test folder (setup, call and teardown together), so a slow CI
    run says which part of the suite grew, not only which single tests were slowest; and the
    free space of the disk the tests write to, so a run that filled it says so. Last, just
    above the counts, where a CI log cut to its tail still shows them."""
    seconds: dict[str, float] = defaultdict(float)
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                seconds[report.nodeid.split("/")[1] if "/" in report.nodeid else "."] += (
                    report.duration
                )
    if seconds:
        terminalreporter.section("time per test folder")
        for folder, spent in sorted(seconds.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{folder:<12} {spent:8.1f} s")
    temp = tempfile.gettempdir()
    usage = shutil.disk_usage(temp)
    terminalreporter.write_line(
        f"disk under {temp}: {usage.free / GIB:.1f} GiB free of {usage.total / GIB:.1f} "
        f"({terminalreporter.config.stash[FREE_AT_START] / GIB:.1f} at the start)"
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis started for this test session (fails, never skips, without one)."""
    with servers.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """host:port of a moto S3 server started for this test session; any credentials work."""
    with servers.moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where dequantised base models are kept across test sessions (the product's default)."""
    return Settings().model_cache_dir


@pytest.fixture(scope="session")
def quickstart() -> Path:
    return Path(__file__).resolve().parents[1] / "examples" / "quickstart.jsonl"
