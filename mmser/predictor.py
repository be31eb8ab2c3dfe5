"""Predictions from a trained run: the run's models, the features of new recordings made as the
extraction made them, and the mean of its folds' probabilities (predict.py is its command line).

  load_run(RUN_DIR, fold)          config.json and the fold checkpoints (every seed's, for a --seeds run)
  check_pretrained(config)         every pretrained file the run recorded, where it was and unchanged
  utterance_features(rows, ...)    each row's features, made by the functions the extraction steps call
  featurize(rows, ...)             -> utterance dicts, made from them as the training data is
  LoadedRun(RUN_DIR, ...)          all of that loaded once; .predict(rows) -> outputs, notes
  predict_rows(RUN_DIR, rows)      -> outputs per row (NaN where none), notes, the run's target
  prediction_fields(classes, attributes), prediction_values(outputs, ...)   a prediction's output columns
A row's outputs are the run's target's (mmser.targets): one probability per class (a run with classes),
then one value per attribute on the corpus's scale (a run with --target dimensional or both).
A row is a dict with its recording, "_wav_path" (a Path or None) or "_wav" (16 kHz mono samples),
"text", and optionally "dialog": rows of one dialogue, in order, are each other's context, exactly
as in training. Optional: "_transcript" (a transcript known to be the utterance's words, even empty:
a timeline's neighbour, the API's context), "_name" (what notes call an in-memory recording),
"_context_only" (a row that is context for the others and is not predicted itself). Prediction adds
"_asr_transcript" (transcribe_rows: what speech recognition heard) and "_seconds" (the recording's
length, utterance_features).
"""
import sys
from pathlib import Path

import numpy as np

from mmser.context import context_vectors, dialogues
from mmser.data_contract import SAMPLE_RATE, pretrained_roles
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
    # An entry without a path is a setting (the transcripts' asr_decoding), not a file.
    recorded = {role: {**entry, "path": moved(entry["path"], settings.models_dir, models_dir)}
                for role, entry in recorded.items() if "path" in entry}
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


def has_audio(row):
    return row.get("_wav") is not None or row.get("_wav_path") is not None


def row_audio(row):
    """A row's recording -> (16 kHz mono float32, a note on what was converted, or ""): its samples
    ("_wav", used as they are), else its file read by read_recording (PredictError)."""
    if row.get("_wav") is not None:
        return np.asarray(row["_wav"], dtype=np.float32), ""
    return read_recording(row["_wav_path"])


def audio_name(row):
    """What a note calls a row's recording: its file, or its "_name"."""
    return row["_wav_path"] if row.get("_wav_path") is not None else row.get("_name", "the recording")


def row_transcript(row):
    """The words the text and context branches read for a row, or None where it has none: the text
    given, else "_transcript", else what speech recognition heard ("" for silence, a transcript all
    the same)."""
    text = (row.get("text") or "").strip()
    if text:
        return text
    return row["_transcript"] if row.get("_transcript") is not None else row.get("_asr_transcript")



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
    """Indices of the rows a prediction is asked for: those with a recording, and for a run without the
    speech branch, those with text too. The others (and those marked "_context_only") are context only."""
    return [i for i, row in enumerate(rows) if not row.get("_context_only") and
            (has_audio(row) or ("speech" not in branches and row_transcript(row)))]


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
    texts = [row_transcript(row) for row in rows]
    has_text = [text is not None for text in texts]
    texts = [text or "" for text in texts]
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
                wav, note = row_audio(rows[i])
            except PredictError as e:
                notes[i] = str(e)
                continue
            if note:
                print(note, file=sys.stderr)
            rows[i]["_seconds"] = len(wav) / SAMPLE_RATE  # for the note on what the token limit cut
            made["speech"] = route.features(extractors["speech"], wav, audio_name(rows[i]))
            if isinstance(made["speech"], str):  # too short, silent: why there is nothing to classify
                notes[i] = made["speech"]
                continue
        if "text" in branches:
            # A transcript longer than the tokenizer's model_max_length is cut by the run's own limit
            # (featurize); transformers' warning about its length would only alarm the user.
            with quiet_transformers():
                made["text"] = text_token_ids(texts[i], extractors["text_tokenizer"])
        if "context" in branches:
            made["context"] = contexts[i]
        features[i] = made
    return features


def featurize(rows, settings, extractors, notes, cuts=None):
    """-> utterance dicts (as dataset_loader makes them, from the same features by the same functions)
    for the rows that can be predicted; the others get a message in `notes[row index]`. What the
    run's token limits cut from a row goes into `cuts[row index]` (cut_note)."""
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
        note = cut_note(features, item, rows[i].get("_seconds"), settings)
        if note and cuts is not None:
            cuts[i] = note
        items.append(item)
    return items


def cut_note(features, item, seconds, settings):
    """What the run's token limits left out of an utterance's features, in words ("" if nothing): an
    input shorter than its features was cut (the speech route's model_input, text_input)."""
    said = []
    speech = [v for k, v in item.items() if k.startswith("speech_")]
    if "speech" in features and speech and len(speech[0]) < len(features["speech"]):
        kept, made = len(speech[0]), len(features["speech"])
        heard = f"about the first {seconds * kept / made:.1f} s of {seconds:.1f} s" if seconds else \
            f"the first {kept} of {made} speech tokens"
        said.append(f"speech cut: {heard} read (the run reads at most {settings.max_audio_tokens} speech tokens)")
    if "text" in features and len(item["text_ids"]) < len(features["text"]):
        said.append(f"text cut: the first {len(item['text_ids'])} of {len(features['text'])} tokens read "
                    f"(the run reads at most {settings.max_text_tokens})")
    return "; ".join(said)


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


def transcribe_rows(rows, settings, load_asr):
    """Each row with a recording and no transcript that the run's text or context branch needs gets
    row["_asr_transcript"]: Whisper's transcript (asr.transcribe), "" for silent or too short
    audio. `load_asr()` gives the loaded ASR model (LoadedRun.asr), asked for only when a row needs
    it; None: no ASR model, nothing is transcribed (featurize then says the text is missing)."""
    from mmser.asr import transcribe
    if not ({"text", "context"} & set(settings.branches)):
        return
    wanted = [i for i, row in enumerate(rows) if has_audio(row) and row_transcript(row) is None
              and not row.get("_context_only")]
    if not wanted:
        return
    asr = load_asr()
    if asr is None:
        return
    transcribed, wavs = [], []
    for i in wanted:
        try:
            wavs.append(row_audio(rows[i])[0])
            transcribed.append(i)
        except PredictError:  # the speech branch, or featurize, names the file
            continue
    texts, empty = transcribe(wavs, asr)
    for k, (i, text) in enumerate(zip(transcribed, texts)):
        rows[i]["_asr_transcript"] = text
        if k in empty:
            print(f"{audio_name(rows[i])}: {empty[k]} for speech recognition: an empty transcript", file=sys.stderr)


# Every fold's weights are held in memory when together they take at most this much (a frozen or
# base-sized encoder's run: megabytes to a few hundred); above it (a fine-tuned RoBERTa-large is 1.4 GB a
# fold) each predict() call reads them from disk one at a time, holding one fold's.
FOLD_WEIGHTS_IN_MEMORY = 2 * 2 ** 30


class LoadedRun:
    """A trained run loaded once for any number of predictions: its settings, the pretrained parts that
    make its features (load_extractors), its model and every fold's weights (of every seed, for a
    --seeds run; one fold's with `fold`; held in memory up to FOLD_WEIGHTS_IN_MEMORY), and its ASR
    model, loaded when first needed.

        run = LoadedRun(RUN_DIR)                   # PredictError naming what is wrong with the run
        outputs, notes = run.predict(rows)         # rows as the module docstring says
    """

    def __init__(self, run_dir, fold=None, device="cpu", models_dir=None, asr_model=None):
        import torch

        from mmser import model_structure
        self.run_dir = Path(run_dir)
        self.settings, self.checkpoints = load_run(run_dir, fold)
        self.paths = check_pretrained(self.settings, models_dir)
        self.target = target_of(self.settings)
        self.classes, self.attributes = self.target.classes, list(self.target.attributes)
        self.device = torch.device(device)
        self.asr_model, self.models_dir = run_asr_model(self.settings, asr_model, models_dir), models_dir
        self._asr = None
        self.extractors = load_extractors(self.settings, self.paths, self.device)
        # The run's precision too: a run trained and evaluated under bf16 autocast predicts under it.
        self.amp = torch.bfloat16 if self.settings.precision == "bf16" else None
        self.model = model_structure.build_model(self.settings.replace(
            text_model=self.paths.get("text_model", self.settings.text_model),
            speech_model=self.paths.get("speech_model", self.settings.speech_model)))
        # Each fold's trained weights (a frozen encoder is not in them: it stays the pretrained one),
        # each checked to fit the model now, so that a wrong checkpoint is named before any prediction.
        self.held = None
        if len(self.checkpoints) == 1:
            self.use_weights(self.checkpoints[0], load_fold_checkpoint(self.checkpoints[0]))
        elif sum(path.stat().st_size for path in self.checkpoints) <= FOLD_WEIGHTS_IN_MEMORY:
            self.held = [load_fold_checkpoint(path) for path in self.checkpoints]
            for path, weights in zip(self.checkpoints, self.held):
                self.use_weights(path, weights)
        self.model.to(self.device).eval()

    def use_weights(self, path, weights):
        """Fold `path`'s weights into the model."""
        from mmser.model_structure import CheckpointMismatchError
        try:
            self.model.load_trained_state_dict(weights)
        except CheckpointMismatchError as e:
            raise PredictError(f"{path}: not a checkpoint of this run's model ({e})") from None

    def folds(self):
        """Put each fold's weights into the model in turn (yield between): held, or read from disk."""
        if len(self.checkpoints) == 1:  # in the model for good
            yield
            return
        for k, path in enumerate(self.checkpoints):
            self.use_weights(path, self.held[k] if self.held is not None else load_fold_checkpoint(path))
            yield

    def asr(self):
        """The ASR model (mmser.asr.load_asr's) that transcribes recordings given without text, loaded
        at the first call; None where the run has none and none was given."""
        from mmser.asr import load_asr, recorded_decoding
        from mmser.extraction import FeatureError
        if self._asr is None and self.asr_model is not None:
            # As the run's transcripts were heard: the backend and precision features.json recorded.
            decoding = recorded_decoding(self.settings.pretrained or {})
            decoding["models_dir"] = decoding["models_dir"] and moved(decoding["models_dir"], self.settings.models_dir,
                                                                      self.models_dir)
            try:
                self._asr = load_asr(self.asr_model, self.device, **decoding)
            except FeatureError as e:
                raise PredictError(str(e)) from None
        return self._asr

    def transcribe(self, rows):
        """Rows with a recording and no transcript get speech recognition's (transcribe_rows)."""
        transcribe_rows(rows, self.settings, self.asr)

    def predict(self, rows, batch_size=16):
        """-> (outputs (len(rows), target width): each row's class probabilities, then its attributes' values
        on the corpus's scale, NaN rows where none was made; notes by row: why a row asked for has no
        prediction, or what the token limits cut of one that has). Both are the mean over the run's folds
        (the attributes' on the unit scale the model regresses). Rows with a recording and no text are
        transcribed first (transcribe_rows)."""
        from mmser.validation_function import predict
        notes, cuts = {}, {}
        self.transcribe(rows)
        items = featurize(rows, self.settings, self.extractors, notes, cuts)
        outputs, width = np.full((len(rows), self.target.width), np.nan), self.target.num_classes
        if items:
            probs, attributes = [], []
            for _ in self.folds():
                predicted = predict(self.model, items, batch_size, self.device, self.amp)
                probs.append(predicted["probs"])
                attributes.append(predicted.get("attribute_outputs", np.zeros((len(items), 0))))
            index = [item["index"] for item in items]
            outputs[index, :width] = np.mean(probs, axis=0)
            outputs[index, width:] = self.target.values(np.mean(attributes, axis=0))
        return outputs, {**notes, **cuts}


def predict_rows(run_dir, rows, fold=None, device="cpu", batch_size=16, models_dir=None, asr_model=None):
    """-> (outputs (len(rows), target width) with NaN rows where none was made, notes by row, the run's
    targets.Target): LoadedRun(...).predict(rows) for a run used once."""
    run = LoadedRun(run_dir, fold, device, models_dir, asr_model)
    if "speech" not in run.settings.branches and any(has_audio(row) and (row.get("text") or "").strip()
                                                     for row in rows):  # a recording without text is transcribed
        print(f"{run_dir} was trained without the speech branch: its predictions do not read the audio",
              file=sys.stderr)
    outputs, notes = run.predict(rows, batch_size)
    return outputs, notes, run.target


# ------------------------------------------------------------------------------------------------
# what a prediction says: the one place its output columns are made (predict.py's CSV, the API, the
# timeline's CSV and JSON, the page)

def prediction_fields(classes, attributes=()):
    """The columns of one prediction, in order: the predicted class and one probability per class (a run
    with classes), then one value per attribute (a run with --target dimensional or both)."""
    return (["prediction"] + [f"p_{c}" for c in classes] if classes else []) + list(attributes)


def prediction_values(outputs, classes, attributes=()):
    """{column: value} of one row's outputs (LoadedRun.predict's; prediction_fields): the predicted class,
    each probability and each attribute's value as a float; None everywhere for a row without a
    prediction (NaN)."""
    if outputs is None or np.isnan(outputs[0]):
        return dict.fromkeys(prediction_fields(classes, attributes))
    probs, values = outputs[:len(classes)], outputs[len(classes):]
    predicted = {"prediction": classes[int(np.argmax(probs))],
                 **{f"p_{c}": float(p) for c, p in zip(classes, probs)}} if classes else {}
    return {**predicted, **{a: float(v) for a, v in zip(attributes, values)}}
