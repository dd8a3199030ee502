"""Headless chromium for the tests of HTML pages (report.html, explorer.html): one-shot commands
(``--dump-dom``, ``--screenshot``) and a DevTools-protocol session over a pipe, which loads a page,
collects what a developer console would show as errors, evaluates script, sends real mouse events
and takes screenshots.

Debian's chromium (which .ci/run installs); the ``chromium`` fixture of conftest.py skips without it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
BROWSER_TIMEOUT_S = 60

# --- chromium ----------------------------------------------------------------------------------


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless chromium command (e.g. ``--dump-dom URL``) with a fresh profile in ``profile``."""
    return subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
        check=True,
    )


# --- the console check, over the DevTools protocol ----------------------------------------------


@dataclass
class PageLoad:
    """What loading a page showed: its problems and, for each ``<img>``, its decoded width (0 = broken)."""

    problems: list[str] = field(default_factory=list)
    image_widths: list[int] = field(default_factory=list)


class DevToolsPipe:
    """A chromium started with ``--remote-debugging-pipe``: JSON messages separated by NUL bytes,
    written to its fd 3 and read from its fd 4."""

    def __init__(self, binary: str, profile: Path) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium-stderr.txt"
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium's ends go above fd 10 first, so bash's moves to fds 3 and 4 cannot clobber them
        # (dash, Debian's sh, takes no fd number above 9).
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        script = f'exec "$0" "$@" 3<&{theirs[0]} 4>&{theirs[1]} {theirs[0]}<&- {theirs[1]}>&-'
        with self.log.open("w") as stderr:
            self.proc = subprocess.Popen(
                ["bash", "-c", script, binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"],
                pass_fds=theirs,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        for fd in theirs:
            os.close(fd)
        self._buffer = b""
        self._last_id = 0
        self.events: list[dict[str, Any]] = []
        self.deadline = time.monotonic() + BROWSER_TIMEOUT_S

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        """Sends a command; returns its id."""
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        return self._last_id

    def receive(self, until: float) -> dict[str, Any] | None:
        """The next message, or None when none came before the monotonic time ``until``."""
        while b"\0" not in self._buffer:
            left = until - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                return None
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Sends a command and returns its result (within :data:`BROWSER_TIMEOUT_S`); the events
        that arrive meanwhile are kept."""
        self.deadline = time.monotonic() + BROWSER_TIMEOUT_S
        call_id = self.send(method, params, session)
        while (message := self.receive(self.deadline)) is not None:
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)
        raise TimeoutError(f"chromium did not answer {method}; its stderr ends:\n{self.stderr_tail()}")

    def wait_for(self, event: str, settle_s: float = 0.3) -> None:
        """Keeps events until ``event`` arrived, then for ``settle_s`` more (late console messages)."""
        while not any(e.get("method") == event for e in self.events):
            message = self.receive(self.deadline)
            if message is None:
                raise TimeoutError(f"no {event} from chromium; its stderr ends:\n{self.stderr_tail()}")
            self.events.append(message)
        settle = time.monotonic() + settle_s
        while (message := self.receive(settle)) is not None:
            self.events.append(message)

    def stderr_tail(self, lines: int = 20) -> str:
        """The last lines chromium wrote to stderr (for the message of a failure)."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Asks chromium to quit, kills it if it does not, and closes the pipes."""
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self._to_chrome)
            os.close(self._from_chrome)


def load_page(binary: str, profile: Path, page: Path) -> PageLoad:
    """Loads ``page`` in headless chromium and collects what a developer console would show as errors.

    Problems are uncaught exceptions (``Runtime.exceptionThrown``), ``console.error`` / ``console.assert``
    calls (``Runtime.consoleAPICalled``) and browser log entries of level error, such as
    ``Failed to load resource`` for a missing image (``Log.entryAdded``).
    """
    browser = DevToolsPipe(binary, profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        widths = browser.call(
            "Runtime.evaluate",
            {"expression": "Array.from(document.images, i => i.naturalWidth)", "returnByValue": True},
            session,
        )["result"]["value"]
        return PageLoad(console_problems(browser.events), widths)
    finally:
        browser.close()


def console_problems(events: list[dict[str, Any]]) -> list[str]:
    """The error-level messages among DevTools events, one line each."""
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            problems.append(f"{details['text']} {details.get('exception', {}).get('description', '')}".strip())
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            problems.append(
                "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            problems.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
    return problems


class BrowserPage:
    """One page open in headless chromium for interaction: script, real mouse input, screenshots.

    Use as a context manager; :attr:`problems` then lists what a developer console showed as errors.
    """

    def __init__(self, binary: str, profile: Path, page: Path, size: tuple[int, int] = (1280, 800)) -> None:
        self.browser = DevToolsPipe(binary, profile)
        try:
            target = self.browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Runtime", "Log", "Page"):
                self.call(f"{domain}.enable")
            width, height = size
            self.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
            self.navigated_at = time.monotonic()
            self.call("Page.navigate", {"url": page.resolve().as_uri()})
            self.browser.wait_for("Page.loadEventFired", settle_s=0.2)
            self.loaded_s = time.monotonic() - self.navigated_at
        except BaseException:
            self.browser.close()
            raise

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A DevTools command in the page's session."""
        return self.browser.call(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a script expression in the page (awaited when it is a promise)."""
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        """A real input event (``mouseMoved``, ``mousePressed``, ``mouseReleased``, ``mouseWheel``)."""
        params: dict[str, Any] = {"type": kind, "x": x, "y": y, **extra}
        if kind in ("mousePressed", "mouseReleased"):
            params |= {"button": "left", "clickCount": 1}
        self.call("Input.dispatchMouseEvent", params)

    def click(self, x: float, y: float) -> None:
        """Moves to ``(x, y)``, presses and releases the left button there."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.mouse(kind, x, y)

    def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        """A PNG of the viewport, or of ``clip`` (``x, y, width, height`` in CSS pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.call("Page.captureScreenshot", params)["data"])

    @property
    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads so far."""
        self.browser.wait_for("Page.loadEventFired", settle_s=0.1)
        return console_problems(self.browser.events)

    def __enter__(self) -> BrowserPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.browser.close()
