"""Headless Chromium for the web UI's tests, driven by Selenium.

Debian's `chromium` and `chromium-driver` (.ci/run installs them): the driver's path is given, so
Selenium Manager never runs and nothing is downloaded. The flags keep Chromium off the network:
no background requests, no component or sync updates, no QUIC, a fresh profile; the only host a
test's page may reach is the UI under test on loopback (`hosts_contacted` checks it).

`UiPage` speaks the UI's language: tabs by name, components by their elem_id, Gradio's dropdowns,
uploads, chart points and error toasts; every wait fails with what the page showed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
WIDTH, HEIGHT = 1400, 1000

T = TypeVar("T")


@contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile in `profile`, closed at the end."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not found: the browser tests need Debian's chromium and "
            "chromium-driver (apt-get install chromium chromium-driver; .ci/run installs them)."
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class UiPage:
    """The UI in a browser tab."""

    def __init__(self, driver: WebDriver, url: str, screenshots: Path) -> None:
        self.driver = driver
        self.url = url
        self.screenshots = screenshots
        self.requested: list[str] = []  # every URL the page asked for, in order

    def open(self) -> None:
        self.driver.get(self.url)
        self.wait_for(
            lambda: self.driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"), "the app's tabs"
        )

    # --- finding and reading ------------------------------------------------------------

    def element(self, elem_id: str, css: str = "") -> WebElement:
        """The component with this elem_id, or the first of its parts matching `css` (a
        comma-separated list: each alternative is looked for inside the component)."""
        within = ", ".join(f"#{elem_id} {part.strip()}".strip() for part in css.split(","))
        return self.driver.find_element(By.CSS_SELECTOR, within)

    def text(self, elem_id: str) -> str:
        return self.element(elem_id).text

    def value(self, elem_id: str) -> str:
        return self.element(elem_id, "input, textarea").get_attribute("value") or ""

    def errors(self) -> list[str]:
        """The error toasts the page shows (a handler's failure, with its code and hint)."""
        return [toast.text for toast in self.driver.find_elements(By.CSS_SELECTOR, ".toast-body")]

    def chart_points(self, elem_id: str) -> list[str]:
        """The points of a chart, as it describes them to screen readers:
        "step: 1; loss: 5.17; series: train"."""
        labels = self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]),"
            " mark => mark.getAttribute('aria-label') || '');",
            f"#{elem_id} [aria-label^='step: ']",
        )
        return sorted({label for label in labels if not label.startswith("step: null")})

    def wait_for(self, condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
        """Poll `condition` until it is truthy; fail with the page's errors if it never is.

        A live page redraws while it is read (a chart gains a point, a table a row): an element
        gone stale under a read counts as not yet, and the next poll reads the new one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = condition()
            except StaleElementReferenceException:
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout:.0f} s for {what}; errors: {self.errors()}")
            time.sleep(0.25)

    def wait_until(
        self, read: Callable[[], T], accept: Callable[[T], bool], what: str, timeout: float = 60.0
    ) -> T:
        """What `read` returns once `accept` takes it."""
        accepted: list[T] = []

        def taken() -> bool:
            value = read()
            if accept(value):
                accepted.append(value)
            return bool(accepted)

        self.wait_for(taken, what, timeout)
        return accepted[0]

    def wait_for_text(self, elem_id: str, needle: str, timeout: float = 60.0) -> str:
        return self.wait_until(
            lambda: self.text(elem_id),
            lambda text: needle in text,
            f"{needle!r} in #{elem_id}",
            timeout,
        )

    # --- acting -------------------------------------------------------------------------

    def tab(self, name: str) -> None:
        for button in self.driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
            if button.text.strip() == name:
                button.click()
                return
        raise AssertionError(f"no tab named {name!r}")

    def click(self, elem_id: str) -> None:
        self.element(elem_id).click()

    def fill(self, elem_id: str, value: object) -> None:
        field = self.element(elem_id, "input, textarea")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value))
        field.send_keys(Keys.TAB)  # Gradio takes the value when the field loses focus

    def choose(self, elem_id: str, option: str, timeout: float = 60.0) -> str:
        """Pick the first option of a dropdown whose text contains `option`; returns its
        text. The choices may still be on their way from the server (a tab fills its
        dropdowns when it is selected, covering them with a spinner meanwhile), so the list is
        opened and read again until the option is there."""
        field = self.element(elem_id, "input")
        listbox = field.get_attribute("aria-controls")
        offered: list[str] = []

        def matching() -> WebElement | None:
            if not self.driver.find_elements(By.ID, listbox):
                try:
                    field.click()
                except ElementClickInterceptedException:  # still loading its choices
                    return None
            options = self.driver.find_elements(By.CSS_SELECTOR, f"#{listbox} li[role=option]")
            offered[:] = [candidate.text for candidate in options]
            return next((candidate for candidate in options if option in candidate.text), None)

        try:
            candidate = self.wait_for(matching, f"{option!r} in #{elem_id}", timeout)
        except AssertionError as error:
            raise AssertionError(f"#{elem_id} offers no {option!r}: {offered}") from error
        text = candidate.text.strip()
        candidate.click()
        return text

    def upload(self, elem_id: str, path: Path) -> None:
        self.element(elem_id, "input[type=file]").send_keys(str(path))

    def screenshot(self, name: str, *, to: Path | None = None, whole: bool = True) -> Path:
        """The page as PNG, under the screenshots directory or at `to`: `whole`, the window
        grown to the page's height; else what a 1400x1000 window shows."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        if whole:
            self.driver.set_window_size(WIDTH, max(HEIGHT, int(height)))
        path = to or self.screenshots / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(WIDTH, HEIGHT)
        return path

    def hosts_contacted(self) -> set[str]:
        """Every host the page sent an HTTP(S) or WebSocket request to so far."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])
            elif message["method"] == "Network.webSocketCreated":
                self.requested.append(message["params"]["url"])
        return {
            urlsplit(url).netloc
            for url in self.requested
            if urlsplit(url).scheme in ("http", "https", "ws", "wss")
        }
