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

Output per utterance: the predicted emotion and one probability per class of the run, as a table
on screen and, with --output, as CSV (the input's columns, then prediction, p_<class>... and note,
the reason a row asked for got no prediction). A recording given without text, in a run with a text
or context branch, is transcribed with Whisper (feature_ext.transcribe: English, greedy, 30-s windows)
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
import json
import sys
from pathlib import Path

import numpy as np

from concatenate_embds import context_vectors, dialogues
from mmser.data_contract import pretrained_roles
from mmser.utils import SILENCE_PEAK, AudioError, check_device, fingerprint, quiet_transformers, read_audio, set_threads, write_text_atomic



class PredictError(Exception):
    """A problem with the run or the input that stops prediction; the message says which file."""


# ------------------------------------------------------------------------------------------------
# the trained run

def load_run(run_dir, fold=None):
    """-> (config, [checkpoint paths]): all folds' best models, or fold `fold`'s; of every seed of a
    --seeds run (its seed{n}/ folders), so that its prediction is the mean over seeds and folds."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise PredictError(f"{path}: not found; RUN_DIR must be a folder that main.py trained")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PredictError(f"{path}: not a readable config.json ({e})") from None
    folders = [run_dir / f"seed{seed}" for seed in config["seeds"]] if config.get("seeds") else [run_dir]
    checkpoints = {}  # fold -> its best.pt in each seed's folder
    for folder in folders:
        for p in sorted(folder.glob("fold*/best.pt")):
            if p.parent.name[4:].isdigit():
                checkpoints.setdefault(int(p.parent.name[4:]), []).append(p)
    where = "seed*/fold*/best.pt" if config.get("seeds") else "fold*/best.pt"
    if not checkpoints:
        raise PredictError(f"{run_dir}: no {where}; has the run finished a fold?")
    if fold is not None:
        if fold not in checkpoints:
            raise PredictError(f"{run_dir}: no fold{fold}/best.pt (folds: {', '.join(map(str, sorted(checkpoints)))})")
        return config, checkpoints[fold]
    if not (run_dir / "results.json").is_file():
        raise PredictError(f"{run_dir}: the run has not finished every fold (no results.json); "
                           f"finish it, or pick a finished fold with --fold")
    return config, [p for k in sorted(checkpoints) for p in checkpoints[k]]


def moved(path, old_models_dir, models_dir):
    """`path` under the run's recorded MODELS_DIR, placed under `models_dir` instead (--models-dir)."""
    if models_dir is None or old_models_dir is None:
        return path
    try:
        return str(Path(models_dir).resolve() / Path(path).relative_to(old_models_dir))
    except ValueError:  # a file outside the old MODELS_DIR (a hub cache, another folder) stays where it is
        return path


def check_pretrained(config, models_dir=None):
    """Every pretrained file the run's branches need must be where it was (or, with models_dir, at
    the same place under the new MODELS_DIR), with the same content. -> {role: path}."""
    recorded = config.get("pretrained")
    if not recorded:
        raise PredictError("config.json records no pretrained files (a run from an older version); "
                           "retrain it to predict with it")
    recorded = {role: {**entry, "path": moved(entry["path"], config.get("models_dir"), models_dir)}
                for role, entry in recorded.items()}
    problems = []
    for role in [r for b in config["branches"] for r in pretrained_roles(b, config.get("speech_model"))]:
        if role not in recorded:
            problems.append(f"{role}: not recorded (was its feature folder made before features.json existed?)")
            continue
        path = recorded[role]["path"]
        try:
            now = fingerprint(path, *([recorded[role]["files"]] if "files" in recorded[role] else []))
        except FileNotFoundError:
            problems.append(f"{role}: {path} is missing" + ("" if models_dir else
                            " (if MODELS_DIR moved, give its new place with --models-dir)"))
            continue
        if now["sha256"] != recorded[role]["sha256"]:
            problems.append(f"{role}: {path} has changed since training (sha256 {recorded[role]['sha256'][:12]}... "
                            f"then, {now['sha256'][:12]}... now)")
    if problems:
        raise PredictError("the run's pretrained files are not the ones it was trained with:\n  " + "\n  ".join(problems))
    return {role: entry["path"] for role, entry in recorded.items()}


# ------------------------------------------------------------------------------------------------
# inputs

def read_recording(path):
    """A user's recording, any rate and channels soundfile reads -> (16 kHz mono float32, a note
    saying what was converted, or "")."""
    try:
        wav, notes = read_audio(path, convert=True)
    except AudioError as e:
        raise PredictError(str(e)) from None
    return wav, (f"{path}: " + ", ".join(notes)) if notes else ""


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


# ------------------------------------------------------------------------------------------------
# features, in memory, the way the extraction stage made them

def load_extractors(config, paths, device):
    """The pretrained parts that turn a recording and its text into the run's features."""
    from transformers import AutoModel, AutoTokenizer

    from mmser.fairseq_checkpoints import load_speech_dictionary, load_vq_wav2vec
    branches, extractors = config["branches"], {}
    with quiet_transformers():
        if "text" in branches:
            extractors["text_tokenizer"] = AutoTokenizer.from_pretrained(paths["text_tokenizer"])
        if "speech" in branches and "speech_encoder" in paths:  # a transformers speech encoder
            from mmser import speech_encoders
            extractors["speech_encoder"] = speech_encoders.load_speech_model(paths["speech_encoder"], device)
        elif "speech" in branches:
            extractors["vq_wav2vec"] = load_vq_wav2vec(paths["vq_wav2vec"]).to(device)
            extractors["speech_dictionary"] = load_speech_dictionary(paths["speech_dictionary"])
        if "context" in branches:
            extractors["sentence_tokenizer"] = AutoTokenizer.from_pretrained(paths["sentence_model"])
            extractors["sentence_model"] = AutoModel.from_pretrained(paths["sentence_model"]).to(device).eval()
    return extractors


def rows_to_predict(rows, branches):
    """Indices of the rows a prediction is asked for: those with a wav, and for a run without the
    speech branch, those with text too. The others are context only."""
    return [i for i, row in enumerate(rows)
            if row["_wav_path"] is not None or ("speech" not in branches and (row.get("text") or "").strip())]


def featurize(rows, config, extractors, notes):
    """-> utterance dicts (as dataset_loader makes them) for the rows that can be predicted.

    A row that cannot be predicted gets a message in `notes[row index]` instead.
    """
    import torch

    from mmser.dataset_loader import truncate_tokens
    from mmser.fairseq_checkpoints import codes_to_string
    from feature_ext import sentence_embeddings
    branches = config["branches"]
    needs_text = "text" in branches or "context" in branches
    # A recording given without text has its ASR transcript (transcribe_rows); an empty one is a
    # transcript all the same (silence): predicted and context, as an empty transcript in training.
    texts = [(row.get("text") or "").strip() or row.get("_asr_transcript") or "" for row in rows]
    has_text = [bool(text) or row.get("_asr_transcript") is not None for text, row in zip(texts, rows)]
    usable = []
    for i in rows_to_predict(rows, branches):
        if needs_text and not has_text[i]:
            notes[i] = ("no text: the run's text/context branch needs the transcript (or an ASR model to make it: "
                        "--asr-model)")
        else:
            usable.append(i)

    contexts = {}
    if "context" in branches:
        c = config["context_window"]
        for group in dialogues([(row.get("dialog") or "").strip() or None for row in rows]):
            group = [i for i in group if has_text[i]]  # an utterance without text is no context either
            if not group:
                continue
            embeddings = sentence_embeddings([texts[i] for i in group], extractors["sentence_tokenizer"],
                                             extractors["sentence_model"], pooling=config.get("sentence_pooling", "cls"))
            for i, vector in zip(group, context_vectors(embeddings, c)):
                contexts[i] = torch.from_numpy(vector.reshape(2 * c + 1, -1))

    items = []
    for i in usable:
        item = {"index": i, "name": str(i), "label": 0}
        if "speech" in branches:
            try:
                wav, note = read_recording(rows[i]["_wav_path"])
            except PredictError as e:
                notes[i] = str(e)
                continue
            if note:
                print(note, file=sys.stderr)
            if "speech_encoder" in extractors:  # a transformers speech encoder: its layer means or waveform
                encoder_input = speech_encoder_input(wav, rows[i]["_wav_path"], extractors["speech_encoder"], config)
                if isinstance(encoder_input, str):
                    notes[i] = encoder_input
                    continue
                item.update(encoder_input)
            else:
                quantizer = extractors["vq_wav2vec"]
                if len(wav) < quantizer.min_samples:
                    notes[i] = (f"{rows[i]['_wav_path']}: too short for one vq-wav2vec frame "
                                f"({len(wav)} samples at 16 kHz, at least {quantizer.min_samples} needed)")
                    continue
                if np.abs(wav).max() < SILENCE_PEAK:
                    notes[i] = f"{rows[i]['_wav_path']}: silent (peak below -60 dBFS), nothing to classify"
                    continue
                ids = extractors["speech_dictionary"].encode_line(codes_to_string(quantizer.codes(wav))).numpy()
                item["speech_ids"] = torch.from_numpy(truncate_tokens(ids, config["max_audio_tokens"]).astype(np.int64))
        if "text" in branches:
            ids = np.asarray(extractors["text_tokenizer"](texts[i])["input_ids"])
            item["text_ids"] = torch.from_numpy(truncate_tokens(ids, config["max_text_tokens"]).astype(np.int64))
        if "context" in branches:
            item["context"] = contexts[i]
        items.append(item)
    return items


def speech_encoder_input(wav, path, speech, config):
    """A transformers speech encoder's input for one recording, as training had it: its layer means
    (frozen) or its waveform (fine-tuned); or a note saying why there is none."""
    import torch

    from mmser import speech_encoders
    if speech_encoders.frames(speech, len(wav)) < 1:
        return f"{path}: too short for one frame of the speech encoder ({len(wav)} samples at 16 kHz)"
    if np.abs(wav).max() < SILENCE_PEAK:
        return f"{path}: silent (peak below -60 dBFS), nothing to classify"
    if config.get("finetune_speech"):
        return {"speech_wave": torch.from_numpy(speech_encoders.waveform_input(speech, wav).astype(np.float32))}
    return {"speech_layers": torch.from_numpy(speech_encoders.layer_means(speech, wav))}


# ------------------------------------------------------------------------------------------------
# prediction

def load_fold_checkpoint(path):
    """A fold's best.pt weights; a damaged file is named, whole."""
    from mmser.train_function import TrainingError, load_checkpoint
    try:
        return load_checkpoint(path, "retrain the fold (delete its folder and rerun main.py)")["model"]
    except TrainingError as e:
        raise PredictError(str(e)) from None


def run_asr_model(config, asr_model=None, models_dir=None):
    """The Whisper checkpoint that transcribes recordings given without text: --asr-model, else the one
    whose transcripts the run was trained on (config.json's pretrained asr_model, checked against its
    sha256), else None."""
    if asr_model:
        return str(asr_model)
    entry = config.get("pretrained", {}).get("asr_model")
    if entry is None:
        return None
    path = moved(entry["path"], config.get("models_dir"), models_dir)
    try:
        now = fingerprint(path, *([entry["files"]] if "files" in entry else []))
    except FileNotFoundError:
        raise PredictError(f"asr_model: {path} is missing (if MODELS_DIR moved, give its new place with --models-dir; "
                           f"or give another Whisper with --asr-model)") from None
    if now["sha256"] != entry["sha256"]:
        raise PredictError(f"asr_model: {path} has changed since training (sha256 {entry['sha256'][:12]}... then, "
                           f"{now['sha256'][:12]}... now); give the Whisper to use with --asr-model")
    return path


def transcribe_rows(rows, config, asr_model, device):
    """Each row with a recording and no text that the run's text or context branch needs gets
    row["_asr_transcript"]: Whisper's transcript (feature_ext.transcribe), "" for silent or too short
    audio. Without an ASR model nothing is transcribed (featurize then says the text is missing)."""
    from feature_ext import FeatureError, load_asr, transcribe
    if not ({"text", "context"} & set(config["branches"])) or asr_model is None:
        return
    wanted, wavs = [], []
    for i, row in enumerate(rows):
        if row["_wav_path"] is not None and not (row.get("text") or "").strip():
            try:
                wavs.append(read_recording(row["_wav_path"])[0])
                wanted.append(i)
            except PredictError:  # the speech branch, or featurize, names the file
                continue
    if not wanted:
        return
    try:
        asr = load_asr(asr_model, device)
    except FeatureError as e:
        raise PredictError(str(e)) from None
    texts, empty = transcribe(wavs, asr)
    for k, (i, text) in enumerate(zip(wanted, texts)):
        rows[i]["_asr_transcript"] = text
        if k in empty:
            print(f"{rows[i]['_wav_path']}: {empty[k]} for speech recognition: an empty transcript", file=sys.stderr)


def predict_rows(run_dir, rows, fold=None, device="cpu", batch_size=16, models_dir=None, asr_model=None):
    """-> (probabilities (len(rows), classes) with NaN rows where none was made, notes by row, classes).
    Rows with a recording and no text are transcribed first (transcribe_rows; --asr-model or the run's)."""
    import torch

    from mmser import model_structure
    from mmser.validation_function import predict
    config, checkpoints = load_run(run_dir, fold)
    paths = check_pretrained(config, models_dir)
    device = torch.device(device)
    notes = {}
    if "speech" not in config["branches"] and any(row["_wav_path"] is not None and (row.get("text") or "").strip()
                                                  for row in rows):  # a recording without text is transcribed
        print(f"{run_dir} was trained without the speech branch: its predictions do not read the audio",
              file=sys.stderr)
    transcribe_rows(rows, config, run_asr_model(config, asr_model, models_dir), device)
    extractors = load_extractors(config, paths, device)
    items = featurize(rows, config, extractors, notes)
    classes = config["classes"]
    probs = np.full((len(rows), len(classes)), np.nan)
    # The run's precision too: a run trained and evaluated under bf16 autocast predicts under it.
    amp = torch.bfloat16 if config.get("precision") == "bf16" else None
    if items:
        config = {**config, "text_model": paths.get("text_model", config["text_model"]),
                  "speech_model": paths.get("speech_model", config["speech_model"])}
        model = model_structure.build_model(config)
        fold_probs = []
        for path in checkpoints:
            try:
                model.load_trained_state_dict(load_fold_checkpoint(path))
            except model_structure.CheckpointMismatchError as e:
                raise PredictError(f"{path}: not a checkpoint of this run's model ({e})") from None
            model.to(device).eval()
            fold_probs.append(predict(model, items, batch_size, device, amp)["probs"])
        probs[[item["index"] for item in items]] = np.mean(fold_probs, axis=0)
    return probs, notes, classes


def results_table(rows, probs, notes, classes):
    """The predictions as a plain-text table, one line per input row."""
    header = f"{'#':>3}  {'dialog':<14}{'text':<34}{'prediction':<11}" + "".join(f"{'p_' + c:>7}" for c in classes)
    lines = [header]
    for i, row in enumerate(rows):
        text = (row.get("text") or "").strip()
        if not text and row.get("_asr_transcript") is not None:  # shown beside its prediction, marked as heard
            text = f"(ASR) {row['_asr_transcript']}"
        text = text if len(text) <= 32 else text[:31] + "…"
        start = f"{i:>3}  {(row.get('dialog') or '')[:13]:<14}{text:<34}"
        if not np.isnan(probs[i, 0]):
            lines.append(start + f"{classes[int(np.argmax(probs[i]))]:<11}" + "".join(f"{p:>7.3f}" for p in probs[i]))
        else:
            lines.append(start + (f"none: {notes[i]}" if i in notes else "-"))  # "-": context only
    return "\n".join(lines)


def write_output(path, rows, columns, probs, classes, notes):
    """The input's columns, then prediction and one probability per class, or, for a row without a
    prediction, the reason (`note`: empty for a row given as context only). When a recording was
    transcribed, an asr_transcript column (after the input's) holds what the ASR model heard."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    asr = any(row.get("_asr_transcript") is not None for row in rows)
    writer.writerow(columns + (["asr_transcript"] if asr else []) + ["prediction"] + [f"p_{c}" for c in classes]
                    + ["note"])
    for i, (row, p) in enumerate(zip(rows, probs)):
        made = not np.isnan(p[0])
        writer.writerow([row.get(c, "") for c in columns] + ([row.get("_asr_transcript") or ""] if asr else []) +
                        ([classes[int(np.argmax(p))]] + [f"{x:.6f}" for x in p] if made else [""] * (1 + len(classes)))
                        + [notes.get(i, "")])
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
    parser.add_argument("--models-dir", help="where the run's MODELS_DIR is now, if it moved (the files are still "
                                             "checked against the sha256 the run recorded)")
    parser.add_argument("--asr-model", help="the Whisper checkpoint (name or folder) that transcribes a recording given "
                                            "without text (default: the one the run's ASR transcripts came from)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's, one per core; 1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.list and args.output and Path(args.output).resolve() == Path(args.list).resolve():
        parser.error("--output is the --list file itself: write the predictions elsewhere")
    if bool(args.list) == bool(args.wav or args.text):
        parser.error("give either --wav FILE [--text ...] or --list FILE.csv")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.models_dir and not Path(args.models_dir).is_dir():
        parser.error(f"--models-dir {args.models_dir}: no such folder")
    try:
        check_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    set_threads(args.threads)
    rows = [{"wav": args.wav or "", "text": args.text or "", "_wav_path": Path(args.wav) if args.wav else None}]
    columns = ["wav", "text"]
    try:
        if not args.list:  # one recording: what the run's branches need must be given
            config = load_run(args.run_dir, args.fold)[0]
            branches = config["branches"]
            if not args.wav and "speech" in branches:
                parser.error(f"{args.run_dir} has a speech branch: give the recording with --wav")
            can_transcribe = args.wav and (args.asr_model or "asr_model" in config.get("pretrained", {}))
            if not args.text and ("text" in branches or "context" in branches) and not can_transcribe:
                parser.error(f"{args.run_dir} has a {'text' if 'text' in branches else 'context'} branch: give the "
                             f"transcript with --text, or an ASR model to make it from --wav with --asr-model")
        if args.list:
            rows, columns = read_requests(args.list)
        probs, notes, classes = predict_rows(args.run_dir, rows, args.fold, args.device, models_dir=args.models_dir,
                                             asr_model=args.asr_model)
    except PredictError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    print(results_table(rows, probs, notes, classes))
    if args.output:
        try:
            write_output(args.output, rows, columns, probs, classes, notes)
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
