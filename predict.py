"""Predict the emotion of new recordings with a trained run.

    python predict.py RUN_DIR --wav FILE --text "..." [--output OUT.csv] [--fold K]
    python predict.py RUN_DIR --text "..."           (a run trained without the speech branch)
    python predict.py RUN_DIR --wav FILE [--asr-model M]  (no text: transcribed by the run's ASR model or M)
    python predict.py RUN_DIR --list FILE.csv [--output OUT.csv] [--fold K] [--device cpu|cuda]
                      [--models-dir DIR] [--threads N]

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
prediction, p_<class>..., the attributes, and note, the reason a row asked for got no prediction). A recording given without text, in a run with a text
or context branch, is transcribed with Whisper (asr.transcribe: English, greedy, 30-s windows)
by --asr-model, or by the ASR model whose transcripts the run was trained on (checked against its
sha256); its transcript is shown beside the prediction and written to --output's asr_transcript
column. Text given is used as it is. An empty transcript (silence) is a transcript all the same: the
utterance is predicted and is context, as an empty transcript was in training; a row whose text is
empty and that cannot be transcribed (no ASR model) is, as before, context for no one and not
predicted. A cross-validation run predicts with the mean of all
folds' probabilities (of every seed, for a --seeds run), or with one fold's model (--fold K; of
every seed). A run whose MODELS_DIR moved reads its
files from --models-dir, each still checked against the sha256 it recorded.
"""
import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

from mmser.options import (add_asr_model, add_device, add_models_dir_moved, add_threads, check_device_option,
                           check_model_paths)
from mmser.predictor import PredictError, load_run, predict_rows
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


def predicted(i, probs, attributes):
    """Whether row i got a prediction: probabilities (the classes) or attribute values (a dimensional run)."""
    values = list(probs[i]) + [v[i] for v in attributes.values()]
    return bool(values) and not np.isnan(values[0])


def results_table(rows, probs, notes, classes, attributes=None):
    """The predictions as a plain-text table, one line per input row (attributes: predict_rows', by name)."""
    attributes = attributes or {}
    header = f"{'#':>3}  {'dialog':<14}{'text':<34}" + (f"{'prediction':<11}" if classes else "") + "".join(
        f"{'p_' + c:>7}" for c in classes) + "".join(f"{a:>10}" for a in attributes)
    lines = [header]
    for i, row in enumerate(rows):
        text = (row.get("text") or "").strip()
        if not text and row.get("_asr_transcript") is not None:  # shown beside its prediction, marked as heard
            text = f"(ASR) {row['_asr_transcript']}"
        text = text if len(text) <= 32 else text[:31] + "…"
        start = f"{i:>3}  {(row.get('dialog') or '')[:13]:<14}{text:<34}"
        if predicted(i, probs, attributes):
            lines.append(start + (f"{classes[int(np.argmax(probs[i]))]:<11}" if classes else "")
                         + "".join(f"{p:>7.3f}" for p in probs[i]) + "".join(f"{v[i]:>10.3f}" for v in attributes.values()))
        else:
            lines.append(start + (f"none: {notes[i]}" if i in notes else "-"))  # "-": context only
    return "\n".join(lines)


def write_output(path, rows, columns, probs, classes, notes, attributes=None):
    """The input's columns, then prediction and one probability per class, and one column per attribute of a
    run with --target dimensional or both (its value on the corpus's scale), or, for a row without a
    prediction, the reason (`note`: empty for a row given as context only). When a recording was
    transcribed, an asr_transcript column (after the input's) holds what the ASR model heard."""
    attributes = attributes or {}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    asr = any(row.get("_asr_transcript") is not None for row in rows)
    head = (["prediction"] + [f"p_{c}" for c in classes] if classes else []) + list(attributes)
    writer.writerow(columns + (["asr_transcript"] if asr else []) + head + ["note"])
    for i, (row, p) in enumerate(zip(rows, probs)):
        values = ([classes[int(np.argmax(p))]] + [f"{x:.6f}" for x in p] if classes else []) + [
            f"{v[i]:.6f}" for v in attributes.values()]
        writer.writerow([row.get(c, "") for c in columns] + ([row.get("_asr_transcript") or ""] if asr else []) +
                        (values if predicted(i, probs, attributes) else [""] * len(head)) + [notes.get(i, "")])
    write_text_atomic(path, buffer.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a RUN_DIR trained by main.py")
    parser.add_argument("--wav", help="one recording (any rate and channels soundfile reads; not needed by a "
                                      "run without the speech branch)")
    parser.add_argument("--text", help="its transcript (needed unless the run is speech-only)")
    parser.add_argument("--list", help="a CSV with columns wav, text and optionally dialog")
    parser.add_argument("--output", help="write the predictions to this CSV")
    parser.add_argument("--fold", type=int, help="predict with this fold's model (default: mean of all folds)")
    add_models_dir_moved(parser)
    add_asr_model(parser, "transcribe")
    add_device(parser)
    add_threads(parser)
    args = parser.parse_args(argv)
    if args.list and args.output and Path(args.output).resolve() == Path(args.list).resolve():
        parser.error("--output is the --list file itself: write the predictions elsewhere")
    if bool(args.list) == bool(args.wav or args.text):
        parser.error("give either --wav FILE [--text ...] or --list FILE.csv")
    if args.models_dir and not Path(args.models_dir).is_dir():
        parser.error(f"--models-dir {args.models_dir}: no such folder")
    if args.wav and not Path(args.wav).is_file():
        parser.error(f"--wav {args.wav}: no such file")
    check_model_paths(args, parser, ("asr_model",))
    rows = [{"wav": args.wav or "", "text": args.text or "", "_wav_path": Path(args.wav) if args.wav else None}]
    columns = ["wav", "text"]
    try:
        # What needs no model is checked before torch loads (seconds): the run, the list, the options.
        settings = load_run(args.run_dir, args.fold)[0]
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
        probs, notes, classes, attributes = predict_rows(args.run_dir, rows, args.fold, args.device,
                                                         models_dir=args.models_dir, asr_model=args.asr_model)
    except PredictError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    print(results_table(rows, probs, notes, classes, attributes))
    if args.output:
        try:
            write_output(args.output, rows, columns, probs, classes, notes, attributes)
        except OSError as e:  # a read-only folder, a folder given as the file, ...
            print(f"predict.py: error: --output {args.output}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {args.output}")
    return 1 if notes else 0  # a note for each row asked for but not predicted


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash; RUN_DIR is only read
        print("predict.py: interrupted", file=sys.stderr)
        sys.exit(130)
