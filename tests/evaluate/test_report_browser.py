"""report.html in a real headless browser (Debian's chromium): the DOM holds the run name and every
section, a screenshot shows a drawn page, and loading it logs no console error, uncaught exception or
failed resource, while pages with exactly those faults are caught by the same check.

They need Debian's chromium, which .ci/run installs; without it they skip, saying why.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from twinview.evaluate.report import label_free_sections, write_html
from twinview.evaluate.results import (
    ClusterSizes,
    Diagnostics,
    DuplicatePairs,
    LabelFreeResult,
    SimilarityStats,
    Spread,
)

pytestmark = pytest.mark.slow  # end-to-end: make test-fast leaves these out

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
RUN_NAME = "runs/label-free <demo> & co"
# matplotlib's C1, C2, C3: the colours of the embeddings, similarity and neighbours histograms (seeds 1-3)
HISTOGRAM_COLOURS = {"embeddings": (255, 127, 14), "similarity": (44, 160, 44), "neighbours": (214, 39, 40)}
PLOT_NAMES = ("training", "embeddings", "similarity", "neighbours", "random_neighbours", "duplicates", "clusters")


# --- chromium ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; the tests skip without one (.ci/run installs Debian's package in CI)."""
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed (CI installs it: apt-get install chromium)")
    return found


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
        """Sends a command and returns its result; the events that arrive meanwhile are kept."""
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


# --- the report under test ---------------------------------------------------------------------


def _figure(name: str, out: Path, seed: int) -> Path:
    """A small matplotlib figure with filled, coloured areas (so a rendered page is not blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)
    ax.hist(rng.normal(size=400), bins=20, color=f"C{seed % 10}")
    ax.set_title(name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _diagnostics(rank: float, warning: str | None) -> Diagnostics:
    stats = Spread(mean=0.2, p5=0.0, p50=0.2, p95=0.6)
    similarity = SimilarityStats(norm=Spread(20.0, 15.0, 19.5, 25.0), cosine=stats, nn_cosine=stats)
    return Diagnostics(-3.1, rank, 512, warning, 0.42, similarity)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of a complete label-free result, its plots drawn by matplotlib."""
    run = tmp_path_factory.mktemp("run")
    images = run / "images"
    plots = {name: str(_figure(name, run / "plots" / f"{name}.png", seed)) for seed, name in enumerate(PLOT_NAMES)}
    for csv in ("duplicates.csv", "clusters.csv"):
        (run / csv).write_text("a,b\n")
    result = LabelFreeResult(
        source=str(images),
        num_images=240,
        skipped=1,
        backbones={
            "pretrained": _diagnostics(97.3, None),
            "random_init": _diagnostics(1.2, "the representation looks collapsed"),
        },
        duplicates=DuplicatePairs(
            0.95, 2, 1, str(run / "duplicates.csv"), ((str(images / "a.png"), str(images / "b.png"), 1.0, True),)
        ),
        clusters=ClusterSizes(4, (100, 70, 50, 20), str(run / "clusters.csv")),
        plots=plots,
    )
    sections = label_free_sections(result)
    assert len(sections) == 7
    return write_html(sections, run / "report.html", RUN_NAME)


class _Headings(HTMLParser):
    """The text of ``<title>``, ``<h1>`` and ``<h2>`` elements, and the ``src`` of images."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, list[str]] = {"title": [], "h1": [], "h2": []}
        self.image_sources: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.texts:
            self._open = tag
            self.texts[tag].append("")
        elif tag == "img":
            self.image_sources.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.texts[self._open][-1] += data


# --- the tests ---------------------------------------------------------------------------------


def test_dom_has_the_run_name_and_every_section(chromium: str, report: Path, tmp_path: Path) -> None:
    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", report.as_uri()).stdout
    parsed = _Headings()
    parsed.feed(dom)

    assert parsed.texts["title"] == [RUN_NAME] and parsed.texts["h1"] == [RUN_NAME]
    sections = [
        "Summary",
        "Representation",
        "Training",
        "Embedding map",
        "Nearest neighbours",
        "Near-duplicates",
        "Clusters",
    ]
    assert parsed.texts["h2"] == ["Contents", *sections]
    assert len(parsed.image_sources) == len(PLOT_NAMES)
    assert all(src.startswith("data:image/png;base64,") for src in parsed.image_sources)


def test_screenshot_shows_a_drawn_page(chromium: str, report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)

    assert pixels.shape == (3000, 1200, 3)
    grey = pixels.mean(axis=2)
    assert grey.std() > 20 and (grey < 250).mean() > 0.05  # text and figures, not a blank page
    # The first figures' histograms are drawn: each fills ~12,000 px of its matplotlib colour, which
    # nothing else on the page uses (C0 blue is left out: it is close to the links' colour).
    for name, colour in HISTOGRAM_COLOURS.items():
        assert (np.abs(pixels - np.array(colour)).max(axis=2) <= 12).sum() > 5000, name


def test_report_loads_without_console_errors(chromium: str, report: Path, tmp_path: Path) -> None:
    load = load_page(chromium, tmp_path / "profile", report)

    assert load.problems == []
    assert len(load.image_widths) == len(PLOT_NAMES) and all(w == 320 for w in load.image_widths)  # 4 in x 80 dpi


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('<img src="missing.png" alt="gone">', "Failed to load resource: net::ERR_FILE_NOT_FOUND"),
        ("<script>throw new Error('deliberate')</script>", "Uncaught Error: deliberate"),
        ("<script>console.error('deliberate')</script>", "console.error: deliberate"),
    ],
)
def test_the_console_check_catches_a_broken_page(chromium: str, tmp_path: Path, body: str, expected: str) -> None:
    page = tmp_path / "broken.html"
    page.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>broken</title></head><body>{body}</body>')

    problems = load_page(chromium, tmp_path / "profile", page).problems

    assert len(problems) == 1 and problems[0].startswith(expected), problems
