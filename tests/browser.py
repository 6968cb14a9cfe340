"""Headless Chromium driven over the DevTools protocol, for the tests that look at pages as a user does.

The protocol runs over ``--remote-debugging-pipe`` (JSON messages ending in a NUL byte on file descriptors 3 and
4 of the browser), so no WebSocket client is needed. Every wait has a deadline: a page that never settles fails
its test instead of stalling it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1366, 768  # a laptop screen


def chromium_path() -> str:
    """The browser. Under CI (the CI environment variable set) a missing browser fails the test: .ci/run installs
    it, and a skip there would silently drop the check. Elsewhere the test is skipped."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium (Debian's chromium package) is not installed: the browser tests "
                        "cannot run; .ci/run installs it", pytrace=False)
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    return CHROMIUM


class Browser:
    """One headless Chromium with one tab: ``open(url)``, ``evaluate(js)``, ``wait_for(js)``, ``screenshot()``.

    ``errors`` collects what the page reported as an error: uncaught exceptions, ``console.error`` calls and the
    browser's own error log (a resource that failed to load, a blocked request).
    """

    def __init__(self, binary: str, width: int = WIDTH, height: int = HEIGHT):
        self.profile = tempfile.mkdtemp(prefix="detpipe-chrome-")
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        # Above 4 so that placing them at 3 and 4 in the browser cannot overwrite one with the other.
        to_browser, from_browser = (self._moved(fd) for fd in (to_browser, from_browser))

        def wire():  # the browser reads commands on fd 3 and writes replies on fd 4 (kept open: pass_fds)
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, pass_fds=(3, 4), start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events, self.errors = b"", 0, [], []
        self.session = None
        target = self.send("Target.createTarget", {"url": "about:blank"}, timeout=60)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    @staticmethod
    def _moved(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _record(self, message: dict) -> None:
        self.events.append(message)
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text"))
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry']['text']} {params['entry'].get('url', '')}".strip())

    def send(self, method: str, params: dict | None = None, timeout: float = 30, to_page: bool = True) -> dict:
        """Send a command (to the tab, or with ``to_page=False`` to the browser) and return its result; the events
        that arrive meanwhile are recorded."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and to_page:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._record(reply)

    def open(self, url: str, timeout: float = 60) -> None:
        """Go to ``url`` and wait for its load event (every image and script of the page loaded or failed)."""
        self.events.clear()
        if "loaderId" not in self.send("Page.navigate", {"url": url}):
            return  # the same document at another #fragment: no new load (a single-page app's own route)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self._record(self._read(deadline))

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = ""):
        """Poll ``expression`` until it is truthy (a single-page app renders after its load event); returns it."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            time.sleep(0.25)

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def screenshot(self) -> bytes:
        """A PNG of what the window shows."""
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10, to_page=False)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self._commands)
        os.close(self._replies)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
