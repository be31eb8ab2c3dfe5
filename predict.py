"""Predict the emotion of new recordings with a trained run.

    python predict.py RUN_DIR --wav FILE --text "..." [--output OUT.csv] [--fold K]
    python predict.py RUN_DIR --text "..."           (a run trained without the speech branch)
    python predict.py RUN_DIR --wav FILE [--asr-model M]  (no text: transcribed by the run's ASR model or M)
    python predict.py RUN_DIR --list FILE.csv [--output OUT.csv] [--fold K] [--device cpu|cuda]
                      [--models-dir DIR] [--threads N]
    python predict.py RUN_DIR --recording FILE [--output OUT.csv] [--subtitles FILE.vtt|.srt] [--rttm FILE]
                      [--channels-as-speakers] [--min-seconds S] [--max-seconds S] [--asr-model M]

Reads RUN_DIR/config.json (every setting inference repeats, and the pretrained files the run was
trained with, by path and sha256) and RUN_DIR/fold{k}/best.pt; writes nothing into RUN_DIR. A
recorded pretrained file that is missing or has changed stops the run: a model applied to features
of another extractor gives confident nonsense.

Audio in any rate and channel count that soundfile reads (wav, flac, ogg) becomes 16 kHz mono
(scipy's polyphase resampler), and a wav cut off (shorter than its header says) is used as it is;
the tool says so of each. A list is a CSV with the columns `wav` and `text` and optionally `dialog`
(wav paths relative to the CSV's folder). Its rows are taken as conversations: the rows of one
dialogue, in the order given, are each other's context exactly as in training; a row without a
dialogue is a conversation of its own (zeros around it). A row with text but no wav gives context
and no prediction, so a whole dialogue, its unlabelled utterances included, can be given in order.
The run's own encoders (config.json: its text encoder and tokenizer, sentence model and pooling,
vq-wav2vec or transformers speech encoder) make the features, as in training. Branches the run was
trained without are not computed: a speech-only run needs no text, and a run without the speech
branch needs no audio (every row with text is predicted, and a wav given is not read).

Output per utterance: the predicted emotion and one probability per class of the run, and for a run
trained with --target dimensional or both each attribute's value on the corpus's scale (valence,
arousal, dominance), as a table on screen and, with --output, as CSV (the input's columns, then
prediction, p_<class>..., the attributes, and note: the reason a row asked for got no prediction, or
what the token limits cut). A recording given without text, in a run with a text or context branch,
is transcribed with Whisper (asr.transcribe: English, greedy, 30-s windows)
by --asr-model, or by the ASR model whose transcripts the run was trained on (checked against its
sha256); its transcript is shown beside the prediction and written to --output's asr_transcript
column. Text given is used as it is. An empty transcript (silence) is a transcript all the same: the
utterance is predicted and is context, as an empty transcript was in training; a row whose text is
empty and that cannot be transcribed (no ASR model) is, as before, context for no one and not
predicted. A cross-validation run predicts with the mean of all
folds' probabilities (of every seed, for a --seeds run), or with one fold's model (--fold K; of
every seed). A run whose MODELS_DIR moved reads its
files from --models-dir, each still checked against the sha256 it recorded.

An utterance longer than the run's token limits (MAX_AUDIO_TOKENS of speech, MAX_TEXT_TOKENS of
text: config.json) is predicted on what fits, as in training, and its note says how much was read.

A whole recording (--recording: a meeting, a call, an interview; any length, any format ffmpeg
decodes) is cut into utterances and each is predicted with its neighbours as context: its timeline
(mmser/timeline.py, docs/recordings.md). Segments come from voice activity (Silero VAD; long speech
cut at --max-seconds) or from --subtitles' cues (their text is then the transcript); speakers from
--rttm, the WebVTT voice tags, or --channels-as-speakers. Each segment is transcribed by the run's
ASR model or --asr-model unless subtitles give its text. It prints the timeline and, with --output
OUT.csv, writes OUT.csv, OUT.json and OUT.png (probabilities over time, speakers marked). A
recording without speech gives an empty timeline and a line saying so (exit 0); a file that is not
audio or is damaged, one line and exit 2. It is an option of predict.py, not a script of its own,
since it predicts with a trained run as --wav and --list do and takes their options (--fold,
--models-dir, --asr-model, --device, --threads).
"""
import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

from mmser.options import (add_asr_model, add_device, add_models_dir_moved, add_threads, check_device_option,
                           check_model_paths)
from mmser.predictor import PredictError, audio_name, load_run, predict_rows, prediction_fields, prediction_values
from mmser.segmentation import MAX_SECONDS, MIN_SECONDS
from mmser.utils import set_threads, write_text_atomic


def read_requests(list_path):
    """The rows of a list CSV as dicts (columns as given); `wav` paths resolved against its folder."""
    list_path = Path(list_path)
    try:
        with open(list_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets' "CSV UTF-8" has a BOM
            reader = csv.DictReader(f)
            rows, columns = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PredictError(f"{list_path}: unreadable list ({e})") from None
    missing = {"wav", "text"} - set(columns)
    if missing:
        raise PredictError(f"{list_path}: needs the columns wav and text (dialog optional); "
                           f"missing {', '.join(sorted(missing))}, found {', '.join(columns) or 'none'}")
    for row in rows:
        wav = (row.get("wav") or "").strip()
        row["_wav_path"] = (list_path.parent / wav) if wav and not Path(wav).is_absolute() else (Path(wav) if wav else None)
    return rows, columns


def table_head(classes, attributes):
    """The prediction's part of a table's header (prediction_fields' columns, as results_table prints them)."""
    return ((f"{'prediction':<11}" if classes else "") + "".join(f"{'p_' + c:>7}" for c in classes) +
            "".join(f"{a:>10}" for a in attributes))


def table_cells(values, classes, attributes):
    """A prediction's values (predictor.prediction_values) under table_head."""
    return ((f"{values['prediction']:<11}" if classes else "") + "".join(f"{values['p_' + c]:>7.3f}" for c in classes)
            + "".join(f"{values[a]:>10.3f}" for a in attributes))


def results_table(rows, outputs, notes, classes, attributes=()):
    """The predictions as a plain-text table, one line per input row; below it, what was cut from
    the rows that have a prediction."""
    lines, cut = [f"{'#':>3}  {'dialog':<14}{'text':<34}" + table_head(classes, attributes)], []
    for i, row in enumerate(rows):
        text = (row.get("text") or "").strip()
        if not text and row.get("_asr_transcript") is not None:  # shown beside its prediction, marked as heard
            text = f"(ASR) {row['_asr_transcript']}"
        text = text if len(text) <= 32 else text[:31] + "…"
        start = f"{i:>3}  {(row.get('dialog') or '')[:13]:<14}{text:<34}"
        if not np.isnan(outputs[i, 0]):
            lines.append(start + table_cells(prediction_values(outputs[i], classes, attributes), classes, attributes))
            if i in notes:
                cut.append(f"{i:>3}  {notes[i]}")
        else:
            lines.append(start + (f"none: {notes[i]}" if i in notes else "-"))  # "-": context only
    return "\n".join(lines + cut)


def csv_cells(values):
    """A prediction's values (predictor.prediction_values) as CSV cells: floats to 6 decimals, "" for None."""
    return ["" if v is None else f"{v:.6f}" if isinstance(v, float) else str(v) for v in values]


def write_output(path, rows, columns, outputs, classes, notes, attributes=()):
    """The input's columns, then prediction and one probability per class, and one value per attribute
    of a run with --target dimensional or both, on the corpus's scale (predictor.prediction_fields), and
    `note`: for a row without a prediction the reason (empty for a row given as context only), for one
    with a prediction what the token limits cut. When a recording was transcribed, an asr_transcript
    column (after the input's) holds what the ASR model heard."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    asr = any(row.get("_asr_transcript") is not None for row in rows)
    writer.writerow(columns + (["asr_transcript"] if asr else []) + prediction_fields(classes, attributes) + ["note"])
    for i, (row, p) in enumerate(zip(rows, outputs)):
        writer.writerow([row.get(c, "") for c in columns] + ([row.get("_asr_transcript") or ""] if asr else []) +
                        csv_cells(prediction_values(p, classes, attributes).values()) + [notes.get(i, "")])
    write_text_atomic(path, buffer.getvalue())


def timeline_table(result):
    """A recording's timeline as a plain-text table, one line per segment, its notes below."""
    classes, attributes = result["classes"], result["attributes"]
    lines = [f"{'start':>8} {'end':>8}  {'speaker':<12}{'transcript':<34}" + table_head(classes, attributes)]
    notes = []
    for k, s in enumerate(result["segments"]):
        text = s["transcript"] or ""
        text = text if len(text) <= 32 else text[:31] + "…"
        line = f"{s['start']:>8.2f} {s['end']:>8.2f}  {(s['speaker'] or '')[:11]:<12}{text:<34}"
        predicted = s[prediction_fields(classes, attributes)[0]] is not None
        lines.append(line + (table_cells(s, classes, attributes) if predicted else "none"))
        if s["note"]:
            notes.append(f"{s['start']:>8.2f} {s['end']:>8.2f}  {s['note']}")
    return "\n".join(lines + notes + result["notes"])


def predict_recording(args):
    """--recording: the timeline (api.Recognizer.timeline), printed and, with --output, written. -> exit code."""
    from mmser.api import Recognizer
    from mmser.timeline import write_timeline
    recognizer = Recognizer(args.run_dir, args.fold, args.device, args.models_dir, args.asr_model)
    result = recognizer.timeline(args.recording, args.subtitles, args.rttm, args.channels_as_speakers,
                                 args.min_seconds, args.max_seconds, progress=True)
    if result["segments"]:
        print(timeline_table(result))
    else:
        print(result["notes"][-1], file=sys.stderr)  # the one line: no speech found
    if args.output:
        try:
            paths = write_timeline(result, args.output)
        except OSError as e:  # a read-only folder, a folder given as the file, ...
            print(f"predict.py: error: --output {args.output}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    elif result["segments"]:
        print("(--output OUT.csv writes this timeline as OUT.csv, OUT.json and the figure OUT.png)")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a RUN_DIR trained by main.py")
    parser.add_argument("--wav", help="one recording (any rate and channels soundfile reads; not needed by a "
                                      "run without the speech branch)")
    parser.add_argument("--text", help="its transcript (needed unless the run is speech-only)")
    parser.add_argument("--list", help="a CSV with columns wav, text and optionally dialog")
    parser.add_argument("--recording", help="a whole recording (any length; any format ffmpeg decodes): cut into "
                                            "utterances, each predicted with its neighbours as context")
    parser.add_argument("--output", help="write the predictions to this CSV (with --recording also OUT.json and the "
                                         "figure OUT.png)")
    parser.add_argument("--fold", type=int, help="predict with this fold's model (default: mean of all folds)")
    add_models_dir_moved(parser)
    add_asr_model(parser, "transcribe")
    add_device(parser)
    add_threads(parser)
    whole = parser.add_argument_group("a whole recording (--recording)")
    whole.add_argument("--subtitles", help="an SRT or WebVTT file of the recording: its cues are the segments and "
                                           "their text (WebVTT's <v Name> tags their speakers)")
    whole.add_argument("--rttm", help="a diarizer's RTTM file naming the speakers")
    whole.add_argument("--channels-as-speakers", action="store_true",
                       help="one speaker a channel (a call recorded in stereo)")
    whole.add_argument("--min-seconds", type=float, default=MIN_SECONDS,
                       help=f"shorter speech is no utterance: joined to the nearer speech within half a second, "
                            f"else dropped (default {MIN_SECONDS:g}: a word at most)")
    whole.add_argument("--max-seconds", type=float, default=MAX_SECONDS,
                       help=f"longer speech is cut, at a sentence end where the ASR model finds one (default "
                            f"{MAX_SECONDS:g}: 99.7%% of IEMOCAP's utterances are shorter)")
    return parser


def check_options(args, parser):
    """What the command line can be refused for before any model loads (parser.error: exit 2)."""
    if args.list and args.output and Path(args.output).resolve() == Path(args.list).resolve():
        parser.error("--output is the --list file itself: write the predictions elsewhere")
    if sum(map(bool, (args.list, args.wav or args.text, args.recording))) != 1:
        parser.error("give one of --wav FILE [--text ...], --list FILE.csv or --recording FILE")
    given = [o for o, v in (("--subtitles", args.subtitles), ("--rttm", args.rttm),
                            ("--channels-as-speakers", args.channels_as_speakers)) if v]
    if given and not args.recording:
        parser.error(f"{', '.join(given)}: options of --recording")
    if not 0 < args.min_seconds < args.max_seconds:
        parser.error(f"--min-seconds {args.min_seconds:g} and --max-seconds {args.max_seconds:g}: need 0 < min < max")
    if args.models_dir and not Path(args.models_dir).is_dir():
        parser.error(f"--models-dir {args.models_dir}: no such folder")
    if args.wav and not Path(args.wav).is_file():
        parser.error(f"--wav {args.wav}: no such file")
    for option, path in (("--recording", args.recording), ("--subtitles", args.subtitles), ("--rttm", args.rttm)):
        if path and not Path(path).is_file():
            parser.error(f"{option} {path}: no such file")
    check_model_paths(args, parser, ("asr_model",))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(args, parser)
    rows = [{"wav": args.wav or "", "text": args.text or "", "_wav_path": Path(args.wav) if args.wav else None}]
    columns = ["wav", "text"]
    try:
        # What needs no model is checked before torch loads (seconds): the run, the list, the options.
        settings = load_run(args.run_dir, args.fold)[0]
        if args.recording:
            check_device_option(args, parser)
            set_threads(args.threads)
            return predict_recording(args)
        if not args.list:  # one recording: what the run's branches need must be given
            branches = settings.branches
            if not args.wav and "speech" in branches:
                parser.error(f"{args.run_dir} has a speech branch: give the recording with --wav")
            can_transcribe = args.wav and (args.asr_model or "asr_model" in (settings.pretrained or {}))
            if not args.text and ("text" in branches or "context" in branches) and not can_transcribe:
                parser.error(f"{args.run_dir} has a {'text' if 'text' in branches else 'context'} branch: give the "
                             f"transcript with --text, or an ASR model to make it from --wav with --asr-model")
        if args.list:
            rows, columns = read_requests(args.list)
        check_device_option(args, parser)
        set_threads(args.threads)
        outputs, notes, target = predict_rows(args.run_dir, rows, args.fold, args.device,
                                              models_dir=args.models_dir, asr_model=args.asr_model)
    except PredictError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    print(results_table(rows, outputs, notes, target.classes, list(target.attributes)))
    long = [row for row in rows if row.get("_seconds", 0) > MAX_SECONDS]
    if long:
        print(f"{audio_name(long[0])}: {long[0]['_seconds']:.1f} s, predicted as one utterance; for a recording of "
              f"many, --recording cuts it into utterances and predicts each", file=sys.stderr)
    if args.output:
        try:
            write_output(args.output, rows, columns, outputs, target.classes, notes, list(target.attributes))
        except OSError as e:  # a read-only folder, a folder given as the file, ...
            print(f"predict.py: error: --output {args.output}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {args.output}")
    return 1 if any(np.isnan(outputs[i, 0]) for i in notes) else 0  # a row asked for but not predicted


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash; RUN_DIR is only read
        print("predict.py: interrupted", file=sys.stderr)
        sys.exit(130)
