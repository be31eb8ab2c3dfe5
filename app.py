"""A page on this computer to hear the emotion in a recording, with a trained run.

    python app.py RUN_DIR [--port 8000] [--fold K] [--models-dir DIR] [--asr-model M] [--device cpu|cuda]
                  [--max-upload-mb 200] [--threads N]

Serves http://127.0.0.1:PORT/ (this computer only: never another address). On the page a person
uploads a recording (any format ffmpeg decodes) or records one in the browser (MediaRecorder's
webm/ogg, decoded by PyAV), with optionally its transcript or its subtitles (SRT, WebVTT), and sees:
  - a clip of at most 20 s (segmentation.MAX_SECONDS) without subtitles: one utterance, its
    transcript (the one given, or the run's ASR model's), the predicted emotion and every class's
    probability (api.Recognizer.predict);
  - a longer recording, or one with subtitles: its timeline (api.Recognizer.timeline): the figure,
    the table of segments, and the table as CSV to download, the same as predict.py --recording writes.
The server is a thin layer over mmser.api (the run is loaded once, at start) on the standard library's
http.server: no web framework to install. It answers one request at a time; a second page waits
until the first has its answer. An upload over --max-upload-mb is refused with a message saying so.
Reads RUN_DIR; writes nothing but temporary copies of the uploads, removed after each answer.
"""
import argparse
import base64
import io
import json
import sys
import tempfile
from pathlib import Path

from mmser.options import add_asr_model, add_device, add_models_dir_moved, add_threads, check_device_option

PAGE = Path(__file__).resolve().parent / "mmser" / "app_page.html"
MAX_UPLOAD_MB = 200  # 100 minutes of 16-bit 16 kHz mono WAV, 10 hours of 64 kbit/s mp3 or opus


def clip_samples(stream, seconds):
    """A recording's 16 kHz mono samples if it lasts at most `seconds`, else None (read no further)."""
    import numpy as np
    from mmser.data_contract import SAMPLE_RATE
    held, count = [], 0
    for window in stream.windows():
        held.append(window.mean(axis=0))
        count += window.shape[1]
        if count > seconds * SAMPLE_RATE:
            return None
    return np.concatenate(held) if held else np.zeros(0, dtype=np.float32)


def analyze(recognizer, audio, subtitles=None, text=None):
    """The page's answer for one upload (files on disk), as JSON-able dicts: {"kind": "utterance",
    "classes", "attributes", "transcript", "prediction", "p_<class>"..., "<attribute>"..., "note"} for a short clip without subtitles,
    else {"kind": "timeline", the timeline's keys, "fields": its columns, "csv": its CSV text, "png":
    its figure, base64}.
    PredictError for a file that is not audio or is damaged, or that cannot be predicted."""
    from mmser.predictor import PredictError
    from mmser.segmentation import MAX_SECONDS
    from mmser.timeline import timeline_csv, timeline_fields, timeline_figure
    from mmser.utils import AudioError, AudioStream
    try:
        samples = None if subtitles else clip_samples(AudioStream(audio), MAX_SECONDS)
    except AudioError as e:
        raise PredictError(str(e)) from None
    if samples is not None:
        return {"kind": "utterance", "classes": recognizer.classes, "attributes": recognizer.attributes, "seconds": round(len(samples) / 16000, 2),
                **recognizer.predict(samples, text=text or None)}
    result = recognizer.timeline(audio, subtitles=subtitles)
    png = io.BytesIO()
    timeline_figure(result).savefig(png, format="png")
    return {"kind": "timeline", **result, "fields": timeline_fields(result["classes"], result["attributes"]), "csv": timeline_csv(result),
            "png": base64.b64encode(png.getvalue()).decode()}


def form_parts(content_type, body):
    """A multipart/form-data body -> {field: (file name or None, bytes)}, parsed by the standard
    library's email parser (the way cgi.FieldStorage did, which Python 3.13 removed)."""
    from email.parser import BytesParser
    from email.policy import HTTP
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise ValueError("not a multipart/form-data upload")
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            parts[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return parts


def make_server(recognizer, port=8000, max_upload_mb=MAX_UPLOAD_MB):
    """An http.server on 127.0.0.1:port (0: any free port) that serves the page and answers its uploads
    with analyze(); one request at a time."""
    import http.server

    from mmser.predictor import PredictError
    page = PAGE.read_text(encoding="utf-8").replace("{{MAX_UPLOAD_MB}}", f"{max_upload_mb:g}")
    limit = int(max_upload_mb * 1024 * 1024)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self.answer(200, page.encode(), "text/html; charset=utf-8")
            else:
                self.answer(404, b"not found", "text/plain")

        def do_POST(self):
            if self.path != "/analyze":
                return self.answer(404, b"not found", "text/plain")
            length = int(self.headers.get("Content-Length") or 0)
            if length > limit:
                self.discard(length)  # read, so that the browser gets the answer and not a reset connection
                return self.reply({"error": f"the upload is {length / 2 ** 20:.0f} MB, more than this page takes "
                                            f"({max_upload_mb:g} MB, app.py --max-upload-mb); for a longer recording "
                                            f"use predict.py --recording"}, 413)
            try:
                parts = form_parts(self.headers.get("Content-Type", ""), self.rfile.read(length))
            except ValueError as e:
                return self.reply({"error": f"unreadable upload: {e}"}, 400)
            if not parts.get("audio", (None, b""))[1]:
                return self.reply({"error": "no recording in the upload: choose a file or record one"}, 400)
            with tempfile.TemporaryDirectory(prefix="mmser-app-") as folder:
                files = {}
                for field in ("audio", "subtitles"):
                    name, data = parts.get(field, (None, b""))
                    if data:  # under its own name (the figure's title shows it), in a folder of its own
                        files[field] = Path(folder) / field / (Path(name or "").name or field)
                        files[field].parent.mkdir()
                        files[field].write_bytes(data)
                text = parts.get("text", (None, b""))[1].decode("utf-8", errors="replace").strip()
                try:
                    answer = analyze(recognizer, files["audio"], files.get("subtitles"), text)
                except PredictError as e:  # the user's file: one line, in the page
                    # Named as the person named it: the upload's own name, without this temporary folder.
                    message = str(e).replace(f"{folder}/audio/", "").replace(f"{folder}/subtitles/", "")
                    return self.reply({"error": message}, 400)
                answer["recording"] = parts["audio"][0] or "recording"
            self.reply(answer)

        def discard(self, length):
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    break
                length -= len(chunk)

        def reply(self, answer, status=200):
            self.answer(status, json.dumps(answer).encode(), "application/json")

        def answer(self, status, body, kind):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the terminal shows the progress bars, not every request
            pass

    return http.server.HTTPServer(("127.0.0.1", port), Handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a RUN_DIR trained by main.py")
    parser.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (default 8000)")
    parser.add_argument("--fold", type=int, help="predict with this fold's model (default: mean of all folds)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                        help=f"refuse larger uploads (default {MAX_UPLOAD_MB})")
    add_models_dir_moved(parser)
    add_asr_model(parser, "transcribe")
    add_device(parser)
    add_threads(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port}: not a port")
    if args.models_dir and not Path(args.models_dir).is_dir():
        parser.error(f"--models-dir {args.models_dir}: no such folder")
    check_device_option(args, parser)
    from mmser.api import Recognizer
    from mmser.predictor import PredictError
    from mmser.utils import set_threads
    set_threads(args.threads)
    try:
        recognizer = Recognizer(args.run_dir, args.fold, args.device, args.models_dir, args.asr_model)
        server = make_server(recognizer, args.port, args.max_upload_mb)
    except PredictError as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken
        print(f"app.py: error: port {args.port} on 127.0.0.1: {e.strerror}; give another with --port", file=sys.stderr)
        return 2
    print(f"serving {args.run_dir} on http://127.0.0.1:{server.server_port}/ (this computer only; one request at "
          f"a time; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("app.py: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
