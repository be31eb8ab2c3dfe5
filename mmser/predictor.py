"""Predictions from a trained run: the run's models, the features of new recordings made as the
extraction made them, and the mean of its folds' probabilities (predict.py is its command line).

  load_run(RUN_DIR, fold)          config.json and the fold checkpoints (every seed's, for a --seeds run)
  check_pretrained(config)         every pretrained file the run recorded, where it was and unchanged
  utterance_features(rows, ...)    each row's features, made by the functions the extraction steps call
  featurize(rows, ...)             -> utterance dicts, made from them as the training data is
  predict_rows(RUN_DIR, rows)      -> probabilities per row (NaN where none), notes, classes, and the
                                      attributes' values per row (a run with --target dimensional or both)
A row is a dict with "_wav_path" (a Path or None), "text" and optionally "dialog": rows of one
dialogue, in order, are each other's context, exactly as in training.
"""
import sys
from pathlib import Path

import numpy as np

from mmser.context import context_vectors, dialogues
from mmser.data_contract import pretrained_roles
from mmser.settings import RunError, read_settings
from mmser.speech.routes import route_of
from mmser.targets import target_of
from mmser.utils import AudioError, fingerprint, quiet_transformers, read_audio


class PredictError(Exception):
    """A problem with the run or the input that stops prediction; the message says which file."""


# ------------------------------------------------------------------------------------------------
# the trained run

def load_run(run_dir, fold=None):
    """-> (settings, [checkpoint paths]): all folds' best models, or fold `fold`'s; of every seed of a
    --seeds run (its seed{n}/ folders), so that its prediction is the mean over seeds and folds."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise PredictError(f"{path}: not found; RUN_DIR must be a folder that main.py trained")
    try:
        settings = read_settings(path)
    except RunError as e:
        raise PredictError(str(e)) from None
    folders = [run_dir / f"seed{seed}" for seed in settings.seeds] if settings.seeds else [run_dir]
    checkpoints = {}  # fold -> its best.pt in each seed's folder
    for folder in folders:
        for p in sorted(folder.glob("fold*/best.pt")):
            if p.parent.name[4:].isdigit():
                checkpoints.setdefault(int(p.parent.name[4:]), []).append(p)
    where = "seed*/fold*/best.pt" if settings.seeds else "fold*/best.pt"
    if not checkpoints:
        raise PredictError(f"{run_dir}: no {where}; has the run finished a fold?")
    if fold is not None:
        if fold not in checkpoints:
            raise PredictError(f"{run_dir}: no fold{fold}/best.pt (folds: {', '.join(map(str, sorted(checkpoints)))})")
        return settings, checkpoints[fold]
    if not (run_dir / "results.json").is_file():
        raise PredictError(f"{run_dir}: the run has not finished every fold (no results.json); "
                           f"finish it, or pick a finished fold with --fold")
    return settings, [p for k in sorted(checkpoints) for p in checkpoints[k]]


def moved(path, old_models_dir, models_dir):
    """`path` under the run's recorded MODELS_DIR, placed under `models_dir` instead (--models-dir)."""
    if models_dir is None or old_models_dir is None:
        return path
    try:
        return str(Path(models_dir).resolve() / Path(path).relative_to(old_models_dir))
    except ValueError:  # a file outside the old MODELS_DIR (a hub cache, another folder) stays where it is
        return path


def check_pretrained(settings, models_dir=None):
    """Every pretrained file the run's branches need must be where it was (or, with models_dir, at
    the same place under the new MODELS_DIR), with the same content. -> {role: path}."""
    recorded = settings.pretrained
    if not recorded:
        raise PredictError("config.json records no pretrained files (a run from an older version); "
                           "retrain it to predict with it")
    recorded = {role: {**entry, "path": moved(entry["path"], settings.models_dir, models_dir)}
                for role, entry in recorded.items()}
    problems, models = [], run_speech_route(settings).step_models()
    for role in [r for b in settings.branches for r in pretrained_roles(b, models)]:
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

def run_speech_route(settings):
    """The speech route the run was trained with (mmser.speech)."""
    return route_of(settings.speech_model, settings.finetune_speech)


def load_extractors(settings, paths, device):
    """The pretrained parts that turn a recording and its text into the run's features."""
    from transformers import AutoModel, AutoTokenizer
    branches, extractors = settings.branches, {}
    with quiet_transformers():
        if "text" in branches:
            extractors["text_tokenizer"] = AutoTokenizer.from_pretrained(paths["text_tokenizer"])
        if "speech" in branches:
            extractors["speech"] = run_speech_route(settings).load_extractor(paths, device)
        if "context" in branches:
            extractors["sentence_tokenizer"] = AutoTokenizer.from_pretrained(paths["sentence_model"])
            extractors["sentence_model"] = AutoModel.from_pretrained(paths["sentence_model"]).to(device).eval()
    return extractors


def rows_to_predict(rows, branches):
    """Indices of the rows a prediction is asked for: those with a wav, and for a run without the
    speech branch, those with text too. The others are context only."""
    return [i for i, row in enumerate(rows)
            if row["_wav_path"] is not None or ("speech" not in branches and (row.get("text") or "").strip())]


def utterance_features(rows, settings, extractors, notes):
    """-> {row index: {branch: its features}} for the rows that can be predicted, each feature as its
    extraction step stores it (text token ids, the speech route's features, the context vector), made
    by the very functions the steps call. A row that cannot be predicted gets a message in
    `notes[row index]` instead."""
    from mmser.text_features import sentence_embeddings, text_token_ids
    branches = settings.branches
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
        for group in dialogues([(row.get("dialog") or "").strip() or None for row in rows]):
            group = [i for i in group if has_text[i]]  # an utterance without text is no context either
            if not group:
                continue
            embeddings = sentence_embeddings([texts[i] for i in group], extractors["sentence_tokenizer"],
                                             extractors["sentence_model"], pooling=settings.sentence_pooling)
            contexts.update(zip(group, context_vectors(embeddings, settings.context_window)))

    route, features = run_speech_route(settings), {}
    for i in usable:
        made = {}
        if "speech" in branches:
            try:
                wav, note = read_recording(rows[i]["_wav_path"])
            except PredictError as e:
                notes[i] = str(e)
                continue
            if note:
                print(note, file=sys.stderr)
            made["speech"] = route.features(extractors["speech"], wav, rows[i]["_wav_path"])
            if isinstance(made["speech"], str):  # too short, silent: why there is nothing to classify
                notes[i] = made["speech"]
                continue
        if "text" in branches:
            made["text"] = text_token_ids(texts[i], extractors["text_tokenizer"])
        if "context" in branches:
            made["context"] = contexts[i]
        features[i] = made
    return features


def featurize(rows, settings, extractors, notes):
    """-> utterance dicts (as dataset_loader makes them, from the same features by the same functions)
    for the rows that can be predicted; the others get a message in `notes[row index]`."""
    from mmser.dataset_loader import context_input, text_input
    route, items = run_speech_route(settings), []
    for i, features in utterance_features(rows, settings, extractors, notes).items():
        item = {"index": i, "name": str(i), "label": 0}
        if "speech" in features:
            item.update(route.model_input(features["speech"], settings.max_audio_tokens))
        if "text" in features:
            item["text_ids"] = text_input(features["text"], settings.max_text_tokens)
        if "context" in features:
            item["context"] = context_input(features["context"], settings.context_window)
        items.append(item)
    return items


# ------------------------------------------------------------------------------------------------
# prediction

def load_fold_checkpoint(path):
    """A fold's best.pt weights; a damaged file is named, whole."""
    from mmser.train_function import TrainingError, load_checkpoint
    try:
        return load_checkpoint(path, "retrain the fold (delete its folder and rerun main.py)")["model"]
    except TrainingError as e:
        raise PredictError(str(e)) from None


def run_asr_model(settings, asr_model=None, models_dir=None):
    """The Whisper checkpoint that transcribes recordings given without text: --asr-model, else the one
    whose transcripts the run was trained on (config.json's pretrained asr_model, checked against its
    sha256), else None."""
    if asr_model:
        return str(asr_model)
    entry = (settings.pretrained or {}).get("asr_model")
    if entry is None:
        return None
    path = moved(entry["path"], settings.models_dir, models_dir)
    try:
        now = fingerprint(path, *([entry["files"]] if "files" in entry else []))
    except FileNotFoundError:
        raise PredictError(f"asr_model: {path} is missing (if MODELS_DIR moved, give its new place with --models-dir; "
                           f"or give another Whisper with --asr-model)") from None
    if now["sha256"] != entry["sha256"]:
        raise PredictError(f"asr_model: {path} has changed since training (sha256 {entry['sha256'][:12]}... then, "
                           f"{now['sha256'][:12]}... now); give the Whisper to use with --asr-model")
    return path


def transcribe_rows(rows, settings, asr_model, device):
    """Each row with a recording and no text that the run's text or context branch needs gets
    row["_asr_transcript"]: Whisper's transcript (asr.transcribe), "" for silent or too short
    audio. Without an ASR model nothing is transcribed (featurize then says the text is missing)."""
    from mmser.asr import load_asr, transcribe
    from mmser.extraction import FeatureError
    if not ({"text", "context"} & set(settings.branches)) or asr_model is None:
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
    """-> (probabilities (len(rows), classes) with NaN rows where none was made, notes by row, classes,
    attributes: {attribute: values (len(rows),) on the corpus's scale, NaN where none was made}). A run of
    --target dimensional has no classes (probabilities (len(rows), 0)), a categorical one no attributes ({});
    both are the mean over the run's folds (the attributes' on the unit scale the model regresses).
    Rows with a recording and no text are transcribed first (transcribe_rows; --asr-model or the run's)."""
    import torch

    from mmser import model_structure
    from mmser.validation_function import predict
    settings, checkpoints = load_run(run_dir, fold)
    paths = check_pretrained(settings, models_dir)
    device = torch.device(device)
    notes = {}
    if "speech" not in settings.branches and any(row["_wav_path"] is not None and (row.get("text") or "").strip()
                                                  for row in rows):  # a recording without text is transcribed
        print(f"{run_dir} was trained without the speech branch: its predictions do not read the audio",
              file=sys.stderr)
    transcribe_rows(rows, settings, run_asr_model(settings, asr_model, models_dir), device)
    extractors = load_extractors(settings, paths, device)
    items = featurize(rows, settings, extractors, notes)
    target = target_of(settings)
    classes = target.classes
    probs = np.full((len(rows), len(classes)), np.nan)
    attributes = np.full((len(rows), target.num_attributes), np.nan)
    # The run's precision too: a run trained and evaluated under bf16 autocast predicts under it.
    amp = torch.bfloat16 if settings.precision == "bf16" else None
    if items:
        settings = settings.replace(text_model=paths.get("text_model", settings.text_model),
                                    speech_model=paths.get("speech_model", settings.speech_model))
        model = model_structure.build_model(settings)
        fold_probs, fold_attributes = [], []
        for path in checkpoints:
            try:
                model.load_trained_state_dict(load_fold_checkpoint(path))
            except model_structure.CheckpointMismatchError as e:
                raise PredictError(f"{path}: not a checkpoint of this run's model ({e})") from None
            model.to(device).eval()
            predicted = predict(model, items, batch_size, device, amp)
            fold_probs.append(predicted["probs"])
            fold_attributes.append(predicted.get("attribute_outputs", np.zeros((len(items), 0))))
        probs[[item["index"] for item in items]] = np.mean(fold_probs, axis=0)
        attributes[[item["index"] for item in items]] = target.values(np.mean(fold_attributes, axis=0))
    return probs, notes, classes, {a: attributes[:, k] for k, a in enumerate(target.attributes)}
