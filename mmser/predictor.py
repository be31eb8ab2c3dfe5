"""Predictions from a trained run: the run's models, the features of new recordings made as the
extraction made them, and the mean of its folds' probabilities (predict.py is its command line).

  load_run(RUN_DIR, fold)          config.json and the fold checkpoints (every seed's, for a --seeds run)
  check_pretrained(config)         every pretrained file the run recorded, where it was and unchanged
  predict_rows(RUN_DIR, rows)      -> probabilities per row (NaN where none), notes, classes
A row is a dict with "_wav_path" (a Path or None), "text" and optionally "dialog": rows of one
dialogue, in order, are each other's context, exactly as in training.
"""
import json
import sys
from pathlib import Path

import numpy as np

from mmser.context import context_vectors, dialogues
from mmser.data_contract import pretrained_roles
from mmser.utils import SILENCE_PEAK, AudioError, fingerprint, quiet_transformers, read_audio


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
    # An entry without a path is a setting (the transcripts' asr_decoding), not a file.
    recorded = {role: {**entry, "path": moved(entry["path"], config.get("models_dir"), models_dir)}
                for role, entry in recorded.items() if "path" in entry}
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
    from mmser.text_features import sentence_embeddings
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
    row["_asr_transcript"]: Whisper's transcript (asr.transcribe), "" for silent or too short
    audio. Without an ASR model nothing is transcribed (featurize then says the text is missing)."""
    from mmser.asr import load_asr, recorded_decoding, transcribe
    from mmser.extraction import FeatureError
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
        asr = load_asr(asr_model, device, **recorded_decoding(config.get("pretrained", {})))
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
