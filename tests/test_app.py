"""app.py's page over the demo's run: in a real headless chromium (tests/browser.py) a person uploads
the synthetic conversation with its subtitles and reads the timeline's table, the very rows
predict.py --recording writes; the server alone answers a browser's webm/opus recording, refuses an
upload over its limit and names a file that is not audio. The browser test is skipped, with its
reason, only where no chromium can be found."""
import json
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import app
import predict
from browser import Browser, BrowserUnavailable, artifact_dir, find_chromium
from mmser.api import Recognizer
from small_runs import read_csv

CONVERSATION = Path(__file__).resolve().parent / "data" / "conversation"
MONO, VTT = CONVERSATION / "conversation.flac", CONVERSATION / "conversation.vtt"


@pytest.fixture(scope="module")
def server(demo):
    """app.py's server on a free port of 127.0.0.1, over the demo's run, with a 5-MB upload limit."""
    server = app.make_server(Recognizer(demo["run_dir"]), port=0, max_upload_mb=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url(server, path="/"):
    return f"http://127.0.0.1:{server.server_port}{path}"


def post(server, fields):
    """A multipart/form-data POST to /analyze, as the page's FormData sends it: -> (status, JSON answer)."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url(server, "/analyze"), data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_page_shows_the_timeline_table_that_predict_py_writes(server, demo, tmp_path):
    try:
        find_chromium()
    except BrowserUnavailable as e:
        pytest.skip(str(e))
    assert predict.main([str(demo["run_dir"]), "--recording", str(MONO), "--subtitles", str(VTT),
                         "--output", str(tmp_path / "timeline.csv")]) == 0
    expected = read_csv(tmp_path / "timeline.csv")
    with Browser(timeout=120, offline=True) as browser:  # offline: the page needs nothing from the internet
        browser.open(url(server))
        assert "Uploads up to 5 MB" in browser.wait_for_text("body", "Emotion in a recording")
        browser.set_files("#audio", [MONO])
        browser.set_files("#subtitles", [VTT])
        browser.click("#go")
        assert browser.wait_for_text("#status", "Done").startswith("Done: 28 segments by subtitles (conversation.vtt).")
        cells = browser.evaluate("[...document.querySelectorAll('#segments tr')]"
                                 ".map(row => [...row.cells].map(cell => cell.textContent))")
        assert cells[0] == list(expected[0])
        assert [dict(zip(cells[0], row)) for row in cells[1:]] == expected
        # The figure is shown, and the download link holds the same CSV.
        assert browser.evaluate("document.querySelector('#figure').naturalWidth") == 1100
        downloaded = browser.evaluate("fetch(document.querySelector('#download').href).then(r => r.text())")
        assert downloaded == (tmp_path / "timeline.csv").read_text(encoding="utf-8")
        assert browser.evaluate("document.querySelector('#download').download") == "conversation_timeline.csv"
        shot = browser.screenshot(artifact_dir(tmp_path) / "app_timeline.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_recording_made_in_a_browser_is_one_utterance(server, tmp_path):
    """webm/opus, as Chromium's MediaRecorder writes it (made here with PyAV): decoded by PyAV, a clip
    under 20 s is one utterance with its transcript given."""
    import av
    samples, _ = sf.read(MONO, dtype="float32", start=int(16.08 * 16000), stop=int(17.54 * 16000))
    clip = tmp_path / "recording.webm"
    with av.open(str(clip), "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        from scipy.signal import resample_poly
        loud = resample_poly(samples, 3, 1).astype(np.float32)
        for start in range(0, len(loud), 960):
            frame = av.AudioFrame.from_ndarray(loud[None, start:start + 960].copy(), format="flt", layout="mono")
            frame.rate = 48000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    status, answer = post(server, {"audio": ("recording.webm", clip.read_bytes()),
                                   "text": (None, b"It did not fail because of us!")})
    assert status == 200, answer
    assert answer["kind"] == "utterance" and answer["transcript"] == "It did not fail because of us!"
    assert answer["prediction"] in answer["classes"] and abs(answer["seconds"] - 1.46) < 0.1


def test_uploads_over_the_limit_and_files_that_are_not_audio_get_a_message(server, tmp_path):
    status, answer = post(server, {"audio": ("big.wav", b"\0" * (6 * 2 ** 20))})
    assert status == 413 and answer["error"].startswith("the upload is 6 MB, more than this page takes (5 MB")
    status, answer = post(server, {"audio": ("notes.wav", b"these are my notes, not a recording\n" * 50)})
    assert status == 400 and answer["error"].startswith("notes.wav: not an audio file ffmpeg can read")
    status, answer = post(server, {"text": (None, b"hello")})
    assert status == 400 and "no recording in the upload" in answer["error"]


def test_the_page_is_served_on_this_computer_only(server):
    assert server.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(url(server), timeout=30) as reply:
        page = reply.read().decode()
    assert "http://" not in page.split("<script>")[1] and "https://" not in page  # nothing fetched from elsewhere


def test_help_answers_without_loading_torch():
    import subprocess
    import sys
    code = ("import runpy, sys; sys.argv = ['app.py', '--help']\n"
            "try:\n    runpy.run_path('app.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'av', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert "usage: app.py" in out and "--max-upload-mb" in out and out.strip().splitlines()[-1] == "[]"
