"""A real headless browser for the page tests: Debian's chromium, driven over the DevTools protocol.

    with Browser() as browser:                          # BrowserUnavailable if no chromium is found
        browser.open("http://127.0.0.1:8000/")
        browser.set_files("input[type=file]", [wav_path])
        browser.click("#go")
        text = browser.wait_for_text("#result", "bytes")  # the element's text once it holds "bytes"
        browser.screenshot(png_path)

Chromium runs with --remote-debugging-pipe: the DevTools protocol (CDP) as NUL-separated JSON on its
file descriptors 3 and 4, the way Puppeteer and Playwright talk to it. So this client needs nothing
beyond the standard library: no websocket package, no open debugging port, no chromedriver matched
to the browser's version (Selenium would need both its package and Debian's chromium-driver).
Every flag that makes chromium reach out (updates, sync, first-run, QUIC, background networking)
is off and each browser gets a fresh profile folder, so a test runs the same offline.
"""
import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--window-size=1280,900")


def artifact_dir(tmp_path):
    """Where a page test keeps its screenshots: $TEST_ARTIFACTS (CI may collect it), else the test's
    tmp_path (pytest keeps the last three runs' under its base temporary folder)."""
    folder = Path(os.environ.get("TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",)


class BrowserUnavailable(RuntimeError):
    """No chromium on this machine: a page test is skipped with this reason."""


class BrowserError(RuntimeError):
    """The browser answered with an error, died, or a wait ran out; the message says which."""


def find_chromium():
    """The path of a chromium (or Chrome) executable: $CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    if os.environ.get("CHROMIUM"):
        if shutil.which(os.environ["CHROMIUM"]):
            return shutil.which(os.environ["CHROMIUM"])
        raise BrowserUnavailable(f"$CHROMIUM is {os.environ['CHROMIUM']!r}, not an executable")
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    raise BrowserUnavailable(f"no chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH, and $CHROMIUM); "
                             f"on Debian: apt-get install chromium")


def _above(fd, lowest):
    """The same pipe end on a descriptor number >= lowest (the old one closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return moved


class Browser:
    """One headless chromium with one page (tab); every call waits at most `timeout` seconds.
    offline=True also makes every host name but 127.0.0.1 and localhost unresolvable, so a page that
    would fetch anything from the internet (a CDN's script, a web font) shows what it does without."""

    def __init__(self, timeout=30.0, offline=False):
        self.timeout = timeout
        executable = find_chromium()
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser, self._commands = os.pipe()  # we write commands, chromium reads them on its fd 3
        self._replies, from_browser = os.pipe()  # chromium writes on its fd 4, we read
        # bash puts the pipe ends on fds 3 and 4 and becomes chromium (exec). Its two redirections
        # would clobber each other if an end were itself 3 or 4 (as under pytest's output capture), so
        # chromium's ends are moved to 10 or above first, which dash (Debian's sh) cannot redirect.
        to_browser, from_browser = (_above(fd, 10) for fd in (to_browser, from_browser))
        # Its log goes to a file: a pipe nobody reads would fill up and stall it.
        self._log = Path(self._profile) / "chromium.log"
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [shutil.which("bash") or "/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}',
                 executable, *FLAGS, *(OFFLINE if offline else ()), f"--user-data-dir={self._profile}",
                 "--remote-debugging-pipe", "about:blank"],
                pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)  # its own process group: close() can end its helpers with it
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self._session = b"", 0, None
        try:
            target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    # -- the protocol -------------------------------------------------------------------------
    def _send(self, method, params=None, session=None):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:  # events come in between; the answer carries our id
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    error = reply["error"]
                    raise BrowserError(f"{method}: {error.get('message')} {error.get('data', '')}".strip())
                return reply.get("result", {})

    def _read(self, deadline, waiting_for):
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{waiting_for}: no answer from chromium within {self.timeout:g} s")
            if select.select([self._replies], [], [], left)[0]:
                chunk = os.read(self._replies, 1 << 16)
                if not chunk:
                    raise BrowserError(f"{waiting_for}: chromium closed the connection ({self._stderr_tail()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _stderr_tail(self):
        if self._process.poll() is None:
            return "it is still running"
        return f"exit status {self._process.returncode}: {self._log.read_text(errors='replace')[-500:]}"

    def send(self, method, params=None):
        """One CDP command to the page: -> its result (a dict)."""
        return self._send(method, params, self._session)

    def evaluate(self, expression):
        """A JavaScript expression's value in the page (awaited if it is a promise)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            why = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r}: {why}")
        return result["result"].get("value")

    # -- what a test does -------------------------------------------------------------------------
    def open(self, url):
        """Load `url` and wait until its document has loaded."""
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", f"{url} to load")

    def wait_for(self, expression, what):
        """Poll a JavaScript expression until it is truthy: -> its value."""
        deadline = time.monotonic() + self.timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {self.timeout:g} s for {what}")
            time.sleep(0.05)

    def wait_for_text(self, selector, text=""):
        """The text of the element `selector` (CSS) once it exists and contains `text`."""
        query = f"document.querySelector({json.dumps(selector)})"
        return self.wait_for(f"(() => {{ const e = {query}; return e && e.innerText.includes({json.dumps(text)}) "
                             f"? e.innerText : null; }})()", f"{selector} to show {text!r}")

    def set_files(self, selector, paths):
        """Choose files on an <input type=file>, as a person does in the file dialog (its change event fires)."""
        root = self.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise BrowserError(f"no element {selector!r} on the page")
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(Path(p).resolve()) for p in paths]})

    def click(self, selector):
        self.wait_for(f"!!document.querySelector({json.dumps(selector)})", f"{selector} to exist")
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path):
        """The page as it looks now, as a PNG file: -> its path."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self):
        if self._process.poll() is None:
            try:
                self._send("Browser.close")
            except (BrowserError, OSError):
                pass
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        for fd in (self._commands, self._replies):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
