"""The headless-browser harness (tests/browser.py) against a trivial page this test serves itself:
a person chooses a WAV file, presses the button, the page uploads it and shows the byte count the
server received. Skipped, with the reason, only where no chromium can be found."""
import http.server
import threading

import numpy as np
import pytest
import soundfile as sf

from browser import Browser, BrowserUnavailable, artifact_dir, find_chromium

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>upload</title></head>
<body style="font-family: sans-serif">
  <h1>Byte counter</h1>
  <input type="file" id="audio" accept="audio/*">
  <button id="go">Upload</button>
  <p id="result">nothing uploaded yet</p>
  <script>
    document.getElementById("go").onclick = async () => {
      const file = document.getElementById("audio").files[0];
      const reply = await fetch("/upload", {method: "POST", body: file});
      document.getElementById("result").innerText = `${file.name}: ${await reply.text()} bytes received`;
    };
  </script>
</body></html>
"""


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self._answer(PAGE, "text/html")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(str(len(body)).encode(), "text/plain")

    def _answer(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def page_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def browser():
    try:
        find_chromium()
    except BrowserUnavailable as e:
        pytest.skip(str(e))
    with Browser() as b:
        yield b


def test_upload_a_wav_and_read_what_the_page_shows(browser, page_url, tmp_path):
    wav = tmp_path / "tone.wav"
    sf.write(wav, (0.1 * np.sin(np.arange(8000) / 10)).astype(np.float32), 16000, subtype="PCM_16")
    browser.open(page_url)
    assert browser.wait_for_text("#result") == "nothing uploaded yet"
    browser.set_files("#audio", [wav])
    browser.click("#go")
    size = wav.stat().st_size
    assert browser.wait_for_text("#result", "received") == f"tone.wav: {size} bytes received"
    png = browser.screenshot(artifact_dir(tmp_path) / "browser_upload.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_without_chromium_the_reason_to_skip_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrowserUnavailable, match="no chromium found .* apt-get install chromium"):
        Browser()
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "nothing"))
    with pytest.raises(BrowserUnavailable, match=r"\$CHROMIUM is .*nothing', not an executable"):
        find_chromium()
