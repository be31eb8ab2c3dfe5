"""Feature extraction: speech tokens, text token ids and sentence embeddings, each a step.

Reads DATA_DIR (written by mocap_data_collect.py): utterances.csv, Audio/<name>.wav (16 kHz, only
target utterances), Text/<name>.txt (every utterance); and MODELS_DIR: vq-wav2vec_kmeans.pt,
bert_kmeans/dict.txt, plus optional local copies bert-base-uncased/ and roberta-large/.
Writes, one .npy per utterance, into the folders data_contract.STEPS names:
  vqw2vTokens/<name>.npy  int32 speech-dictionary ids `<s> g0-g1 ... </s>`, utterances with audio
  GPT2Tokens/<name>.npy   int32 text RoBERTa ids `<s> ... </s>`, every utterance (cheap, and a
                          later experiment may want context utterances too)
  BertEmb/<name>.npy      float32 (H,) last-layer [CLS] vector, every utterance (context needs all)
An empty transcript is a valid utterance: its tokens are `<s> </s>` and its embedding that of the
empty text. The fairseq files load through fairseq_checkpoints.py.
Other text encoders (BERT, DeBERTa-v2/v3, ELECTRA, another RoBERTa: data_contract.TEXT_ENCODERS),
given as --text-model or --sentence-model, and mean pooling (--sentence-pooling mean) write folders
of their own beside these (TextTokens-<model>/, SentenceEmb-<model>[+mean]/; data_contract.STEPS),
so the original folders always hold the original models' outputs.

Each step runs on its own:
  python feature_ext.py {speech-tokens,text-tokens,sentence-embeddings} DATA_DIR MODELS_DIR
      [--sentence-model M] [--sentence-pooling cls|mean] [--text-model M] [--device cpu|cuda]
      [--transcripts reference|asr --asr-model M]
  python feature_ext.py transcripts DATA_DIR MODELS_DIR [--asr-model M]
The transcripts step (speech recognition) writes ASR-<tag>/Text/<name>.txt for every utterance with
a Whisper checkpoint (data_contract.model_tag names the folder): English, the transcribe task, greedy
decoding, no timestamps, an utterance over 30 s in consecutive 30-s windows; silent or too short audio
gets an empty transcript and a word in the summary. ASR-<tag>/wer.json holds its word error rate
against Text/, overall and per session, after WER_NORMALISATION (jiwer). With --transcripts asr the
text steps write the set's own ASR-<tag>/GPT2Tokens/ and ASR-<tag>/BertEmb/ from its transcripts.
A rerun skips outputs that exist and are valid; a bad input (an unreadable or cut-off wav, a
transcript that is not UTF-8) is reported by name and the others go on; a missing model stops the
step with one line. Anything else (a bug, CUDA out of memory) stops with its traceback.
DATA_DIR/features.json records, per step, which pretrained files (path, size, sha256) made its
outputs; a rerun with other files stops unless --overwrite recomputes them all, so outputs of two
models never mix, and main.py copies the record into each run's config.json for predict.py.
torch and transformers are imported by the steps that use them, so --help answers at once.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import (FEATURES_RECORD, MANIFEST_KEY, SAMPLE_RATE, SENTENCE_POOLINGS, TEXT_ENCODERS, WER_FILE,
                           DataError, feature_folder, instance_tag, manifest_fingerprint, model_tag, qualified_step,
                           read_features_record, read_manifest, sentence_tag, speech_step, step_entry, transcript_folder,
                           transcript_set)
from mmser.utils import (SILENCE_PEAK, TOKENIZER_FILES, VOCABULARY_FILES, AudioError, audio_windows, check_device, fingerprint, length_sorted_batches, quiet_transformers,
                   read_audio, save_npy_atomic, set_threads, write_text_atomic)

SENTENCE_BATCH_SIZE = 32
SHOWN_FAILURES = 20  # per step in the summary; a broken input folder would otherwise bury the table


class FeatureError(Exception):
    """A user's input a step cannot use (a model, a file); the message names it."""


# ---------------------------------------------------------------------------------------------
# Extraction steps over a DATA_DIR


@dataclass
class StepReport:
    """What one step did: counts, the utterances that failed (name, reason), remarks, time."""

    step: str
    written: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    error: str = ""  # the whole step could not run (a model missing, ...)
    seconds: float = 0.0

    @property
    def ok(self):
        return not self.failed and not self.error

    def fail(self, name, reason, progress_bar=None):
        self.failed.append((name, str(reason)))
        (progress_bar or tqdm).write(f"{self.step}: FAILED {name}: {reason}", file=sys.stderr)


def format_summary(reports):
    """A table of written/skipped/failed/seconds per step, then every failure by name."""
    width = max([22] + [len(r.step) + 2 for r in reports])  # qualified names: "ASR-<model>/text-tokens@<model>"
    lines = [f"{'step':<{width}}{'written':>9}{'skipped':>9}{'failed':>8}{'seconds':>9}"]
    for r in reports:
        failed = "ERROR" if r.error else len(r.failed)
        lines.append(f"{r.step:<{width}}{r.written:>9}{r.skipped:>9}{failed:>8}{r.seconds:>9.1f}")
    for r in reports:
        if r.error:
            lines.append(f"{r.step}: could not run: {r.error}")
        lines += [f"{r.step}: {note}" for note in r.notes]
        lines += [f"{r.step}: failed {name}: {reason}" for name, reason in r.failed[:SHOWN_FAILURES]]
        if len(r.failed) > SHOWN_FAILURES:
            lines.append(f"{r.step}: ... and {len(r.failed) - SHOWN_FAILURES} more failures (each printed as it happened)")
    n_failed, n_broken = sum(len(r.failed) for r in reports), sum(bool(r.error) for r in reports)
    if not n_failed and not n_broken:
        lines.append("all done")
    else:
        problems = ([f"{n_failed} utterance(s) failed"] if n_failed else []) + \
                   ([f"{n_broken} step(s) could not run"] if n_broken else [])
        lines.append(", ".join(problems) + "; fix and rerun: finished files are kept and skipped")
    return "\n".join(lines)


def resolve_model(models_dir, name):
    """MODELS_DIR/<name> when that local copy exists, else `name` itself (a hub name or a folder)."""
    local = Path(models_dir) / name if models_dir is not None else None
    return str(local) if local is not None and local.is_dir() else str(name)


def valid_npy(path, dtype, shape=None, bos_eos=None):
    """True when `path` loads as a finite array of `dtype` and `shape` (1-D when shape is None),
    starting and ending with `bos_eos` ids when given."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    if array.dtype != dtype or array.ndim != 1 or array.size == 0 or (shape is not None and array.shape != shape):
        return False
    if bos_eos is not None and (len(array) < 2 or (array[0], array[-1]) != bos_eos):
        return False
    return bool(np.isfinite(array).all()) if array.dtype.kind == "f" else True


def read_transcript(data_dir, name, transcripts=None):
    """Text/<name>.txt (of the transcript set `transcripts`, data_contract.transcript_set), stripped;
    an empty transcript is a valid one (IEMOCAP has one; an ASR model writes one for silence)."""
    path = transcript_folder(data_dir, transcripts) / f"{name}.txt"
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise FeatureError(f"{path}: unreadable transcript ({e})") from None


def _from_pretrained(loader, name, role):
    """transformers' loaders say what went wrong but not which model the step wanted."""
    try:
        with quiet_transformers():
            return loader.from_pretrained(name)
    except (OSError, ValueError) as e:  # no such folder, not in the cache and no network, no model_type
        raise FeatureError(f"{role} {name!r} (a local folder, or a hub name in the cache or online): {e}") from None


def _load_tokenizer(name, role):
    """A tokenizer with a vocabulary: without its vocabulary files, transformers 5 builds one of
    special tokens only, which turns every transcript into <s> </s> without a word of warning,
    and 4.x fails saying that protobuf is not installed."""
    from transformers import AutoTokenizer
    path = Path(name)
    if path.is_dir() and not any(any(path.glob(pattern)) for pattern in VOCABULARY_FILES):
        raise FeatureError(f"{role} {name!r}: without tokenizer.json (or vocab.json and merges.txt, or vocab.txt) "
                           f"in it, its tokenizer knows only its special tokens")
    tokenizer = _from_pretrained(AutoTokenizer, name, role)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise FeatureError(f"{role} {name!r}: its tokenizer knows only its {len(tokenizer)} special tokens; is "
                           f"tokenizer.json (or vocab.json and merges.txt, or vocab.txt) missing from it?")
    return tokenizer


def text_encoder_config(name, role):
    """The transformers config of a text encoder the text branch or the sentence model takes
    (data_contract.TEXT_ENCODERS); any other model is refused with one line saying what it is."""
    from transformers import AutoConfig
    config = _from_pretrained(AutoConfig, name, role)
    if config.model_type not in TEXT_ENCODERS:
        what = ", ".join(getattr(config, "architectures", None) or []) or "no architecture recorded"
        raise FeatureError(f"{role} {name!r} is a {config.model_type!r} model ({what}), not a text encoder this "
                           f"pipeline takes: {', '.join(f'{v} ({k})' for k, v in TEXT_ENCODERS.items())}")
    return config


def stamp_manifest(data_dir, step, rows, out_dir, report, pattern="*.npy"):
    """Record in features.json which manifest `step`'s files are made for. Files made for another
    manifest are named by positions in it, so they are removed (and recomputed) first."""
    record = read_features_record(data_dir)
    made_for = record.get(MANIFEST_KEY, {}).get(step)
    now = manifest_fingerprint(rows)
    if made_for is not None and made_for != now and any(Path(out_dir).glob(pattern)):
        report.notes.append(f"{Path(data_dir) / 'utterances.csv'} lists other utterances than when {out_dir} was "
                            f"made (its files are named by position): recomputing all of it")
        for path in Path(out_dir).glob(pattern):
            path.unlink()
    if made_for != now:
        record.setdefault(MANIFEST_KEY, {})[step] = now
        write_text_atomic(Path(data_dir) / FEATURES_RECORD, json.dumps(record, indent=2) + "\n")


def record_models(data_dir, step, current, overwrite, rows, report, pattern="*.npy"):
    """Record in DATA_DIR/features.json which pretrained files this step's outputs come from
    (current: {role: utils.fingerprint(...)}), and which manifest (stamp_manifest).

    Outputs of different models must not mix: when the record names other files than `current`
    and outputs exist, stop, unless --overwrite is about to recompute them all.
    """
    out_dir = feature_folder(data_dir, step)
    stamp_manifest(data_dir, step, rows, out_dir, report, pattern)
    record = read_features_record(data_dir)
    old = record.get(step, {})
    changed = [role for role in current if role in old and old[role]["sha256"] != current[role]["sha256"]]
    if changed and not overwrite and any(out_dir.glob(pattern)):
        details = "; ".join(f"{role}: {old[role]['path']} -> {current[role]['path']}" for role in changed)
        raise FeatureError(f"{out_dir} was computed with other pretrained files ({details}); "
                           f"rerun with --overwrite to recompute it with the new ones")
    if record.get(step) != current:
        record[step] = current
        write_text_atomic(Path(data_dir) / FEATURES_RECORD, json.dumps(record, indent=2) + "\n")


def _rows_of(step, manifest):
    return [row for row in manifest if row["label"]] if step_entry(step).rows == "labelled" else manifest


def _pending(rows, out_dir, is_valid, overwrite, report):
    todo = []
    for row in rows:
        if not overwrite and is_valid(out_dir / f"{row['name']}.npy"):
            report.skipped += 1
        else:
            todo.append(row)
    return todo


def _run_step(report, work):
    """Run a step's body. A user's problem that stops the whole step (a model missing, a manifest
    that does not read) is recorded, and the next step runs; anything else is raised."""
    start = time.perf_counter()
    try:
        work()
    except (FeatureError, DataError) as e:
        report.error = str(e)
    report.seconds = time.perf_counter() - start
    return report


def speech_model_files(models_dir):
    """The two fairseq files the speech tokens come from, each checked to be there: a missing one is
    named with where the README's "Pretrained files" says to get it."""
    paths = {"vq_wav2vec": Path(models_dir) / "vq-wav2vec_kmeans.pt",
             "speech_dictionary": Path(models_dir) / "bert_kmeans" / "dict.txt"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FeatureError(f"{' and '.join(missing)}: not found; download vq-wav2vec_kmeans.pt and bert_kmeans.tar "
                           f"into MODELS_DIR (README, \"Pretrained files\")")
    return paths


def extract_speech_tokens(data_dir, models_dir, device="cpu", overwrite=False, progress=True):
    """vqw2vTokens/<name>.npy: `<s> g0-g1 ... </s>` speech-dictionary ids (int32) for every target
    utterance (the ones with audio), one utterance at a time."""
    data_dir, step = Path(data_dir), "speech-tokens"
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def work():
        from mmser.fairseq_checkpoints import CheckpointError, codes_to_string, load_speech_dictionary, load_vq_wav2vec
        manifest = read_manifest(data_dir)
        paths = speech_model_files(models_dir)
        try:
            dictionary = load_speech_dictionary(paths["speech_dictionary"])
            model = load_vq_wav2vec(paths["vq_wav2vec"]).to(check_device(device))
        except CheckpointError as e:
            raise FeatureError(str(e)) from None
        record_models(data_dir, step, {role: fingerprint(p) for role, p in paths.items()}, overwrite, manifest, report)
        for row in _rows_of(step, manifest):
            # Audio that collection no longer vouches for is gone: so are the tokens made from it.
            if not (data_dir / "Audio" / f"{row['name']}.wav").is_file():
                (out_dir / f"{row['name']}.npy").unlink(missing_ok=True)
        todo = _pending(_rows_of(step, manifest), out_dir, lambda p: valid_npy(p, np.int32, bos_eos=(0, 2)),
                        overwrite, report)
        bar = tqdm(todo, desc=step, unit="utt", disable=not progress)
        for row in bar:
            wav_path = data_dir / "Audio" / f"{row['name']}.wav"
            if not wav_path.is_file():
                report.fail(row["name"], f"{wav_path}: missing audio (if mocap_data_collect.py --allow-missing let it "
                                         f"through, main.py --skip-missing trains without it)", bar)
                continue
            try:
                wav, _ = read_audio(wav_path)
            except AudioError as e:
                report.fail(row["name"], e, bar)
                continue
            codes = model.codes(wav)
            if len(codes) == 0:
                report.notes.append(f"{wav_path}: {len(wav)} samples, fewer than {model.min_samples}: "
                                    f"no frame, stored <s> </s>")
            ids = dictionary.encode_line(codes_to_string(codes)).numpy().astype(np.int32)
            save_npy_atomic(out_dir / f"{row['name']}.npy", ids)
            report.written += 1

    return _run_step(report, work)


def extract_text_tokens(data_dir, models_dir=None, text_model=None, overwrite=False, progress=True,
                        transcripts=None):
    """GPT2Tokens/<name>.npy: the text RoBERTa's ids `<s> ... </s>` (int32), as fairseq's
    roberta.encode gives them, for every utterance (of the transcript set `transcripts`: its own
    <set>/GPT2Tokens/). Another text encoder's tokenizer writes its own ids (e.g. [CLS] ... [SEP])
    into that model's folder, TextTokens-<model_tag>/ (data_contract.STEPS)."""
    text_model = text_model or resolve_model(models_dir, "roberta-large")
    data_dir, step = Path(data_dir), qualified_step("text-tokens", instance_tag("text-tokens", text_model), transcripts)
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def work():
        manifest = read_manifest(data_dir)
        text_encoder_config(text_model, "text model")
        # Loaded first: a hub name is in the local cache (to be fingerprinted) only after a load.
        tokenizer = _load_tokenizer(text_model, "text model")
        record_models(data_dir, step, {"text_tokenizer": fingerprint(text_model, TOKENIZER_FILES)}, overwrite,
                      manifest, report)
        todo = _pending(_rows_of(step, manifest), out_dir, lambda p: valid_npy(p, np.int32), overwrite, report)
        bar = tqdm(todo, desc=step, unit="utt", disable=not progress)
        for row in bar:
            try:
                text = read_transcript(data_dir, row["name"], transcripts)
            except FeatureError as e:
                report.fail(row["name"], e, bar)
                continue
            save_npy_atomic(out_dir / f"{row['name']}.npy", np.asarray(tokenizer(text)["input_ids"], dtype=np.int32))
            report.written += 1

    return _run_step(report, work)


def sentence_embeddings(texts, tokenizer, model, batch_size=SENTENCE_BATCH_SIZE, progress_bar=None, pooling="cls"):
    """Last-layer [CLS] vectors (float32, (len(texts), H)), batched by similar length with padding
    and attention masks; equal to embedding each text alone (within float rounding). pooling "mean":
    the mean of the last layer over the real tokens (attention mask 1, [CLS] and [SEP] included)."""
    import torch
    device = next(model.parameters()).device
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    vectors = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, batch_size):
            inputs = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt").to(device)
            hidden = model(**inputs).last_hidden_state
            if pooling == "mean":
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vectors[batch] = ((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy()
            else:
                vectors[batch] = hidden[:, 0].float().cpu().numpy()
            if progress_bar is not None:
                progress_bar.update(len(batch))
    return vectors


def extract_sentence_embeddings(data_dir, models_dir=None, sentence_model=None, device="cpu",
                                overwrite=False, progress=True, batch_size=SENTENCE_BATCH_SIZE, pooling="cls",
                                transcripts=None):
    """BertEmb/<name>.npy: the sentence model's last-layer [CLS] vector (float32, (H,)) for every
    utterance, since context vectors need the neighbours of every target utterance (of the
    transcript set `transcripts`: its own <set>/BertEmb/). Another sentence model, or mean pooling,
    writes SentenceEmb-<model_tag>[+mean]/ instead (data_contract.sentence_tag)."""
    if pooling not in SENTENCE_POOLINGS:
        raise ValueError(f"pooling must be one of {SENTENCE_POOLINGS}, got {pooling!r}")
    sentence_model = sentence_model or resolve_model(models_dir, "bert-base-uncased")
    data_dir = Path(data_dir)
    step = qualified_step("sentence-embeddings", sentence_tag(sentence_model, pooling), transcripts)
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def work():
        from transformers import AutoModel
        manifest = read_manifest(data_dir)
        text_encoder_config(sentence_model, "sentence model")
        # Loaded first: a hub name is in the local cache (to be fingerprinted) only after a load.
        tokenizer = _load_tokenizer(sentence_model, "sentence model")
        model = _from_pretrained(AutoModel, sentence_model, "sentence model").to(check_device(device)).eval()
        record_models(data_dir, step, {"sentence_model": fingerprint(sentence_model)}, overwrite, manifest, report)
        width = model.config.hidden_size
        todo = _pending(_rows_of(step, manifest), out_dir, lambda p: valid_npy(p, np.float32, shape=(width,)),
                        overwrite, report)
        names, texts = [], []
        for row in todo:
            try:
                texts.append(read_transcript(data_dir, row["name"], transcripts))
                names.append(row["name"])
            except FeatureError as e:
                report.fail(row["name"], e)
        if not texts:
            return
        with tqdm(total=len(texts), desc=step, unit="utt", disable=not progress) as bar:
            # In slices, so that an interrupted run keeps what it finished.
            for start in range(0, len(texts), 16 * batch_size):
                part = slice(start, start + 16 * batch_size)
                vectors = sentence_embeddings(texts[part], tokenizer, model, batch_size, bar, pooling)
                for name, vector in zip(names[part], vectors):
                    save_npy_atomic(out_dir / f"{name}.npy", vector)
                    report.written += 1

    return _run_step(report, work)


def extract_speech_layers(data_dir, speech_model, device="cpu", overwrite=False, progress=True):
    """SpeechLayers-<model>/<name>.npy: float32 (layers + 1, hidden), the mean over the utterance's frames
    of every hidden state of a transformers speech encoder (speech_encoders.layer_means), for every
    target utterance, each alone, in fp32 and inference mode. One folder per encoder, so the features
    of different encoders sit side by side."""
    from mmser import speech_encoders
    data_dir = Path(data_dir)
    step = qualified_step("speech-layers", model_tag(speech_model))
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def work():
        manifest = read_manifest(data_dir)
        try:
            speech = speech_encoders.load_speech_model(speech_model, check_device(device))
        except (speech_encoders.SpeechModelError, OSError) as e:
            raise FeatureError(str(e)) from None
        record_models(data_dir, step, {"speech_encoder": fingerprint(speech_model, speech_encoders.SPEECH_FILES)},
                      overwrite, manifest, report)
        shape = (speech.layers, speech.hidden_size)

        def valid(path):
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                return False
            return array.dtype == np.float32 and array.shape == shape and bool(np.isfinite(array).all())

        todo = _pending(_rows_of(step, manifest), out_dir, valid, overwrite, report)
        bar = tqdm(todo, desc=step, unit="utt", disable=not progress)
        for row in bar:
            wav_path = data_dir / "Audio" / f"{row['name']}.wav"
            try:
                wav, _ = read_audio(wav_path)
                means = speech_encoders.layer_means(speech, wav)
            except (AudioError, ValueError) as e:  # unreadable, cut off, or shorter than one frame
                report.fail(row["name"], e if isinstance(e, AudioError) else f"{wav_path}: {e}", bar)
                continue
            save_npy_atomic(out_dir / f"{row['name']}.npy", means.astype(np.float32))
            report.written += 1

    return _run_step(report, work)


# ---------------------------------------------------------------------------------------------
# Speech recognition: a transcript set of its own per ASR model, and its word error rate

DEFAULT_ASR_MODEL = "openai/whisper-large-v3"
ASR_BATCH_SIZE = 8  # 30-s windows per generate() call
# Whisper hears nothing in these, and on silence it makes words up ("Thank you."): such a window is
# not transcribed, and an utterance with no other window gets an empty transcript.
ASR_MIN_SECONDS = 0.1
WER_NORMALISATION = ("IEMOCAP's bracketed tags ([LAUGHTER], [BREATHING], [GARBAGE], ...) removed, lower case, "
                     "punctuation removed (apostrophes and hyphens too: don't -> dont), runs of spaces made one; "
                     "the same for the reference and the ASR transcript")


def asr_model_name(models_dir=None, asr_model=None):
    """--asr-model, or MODELS_DIR/whisper-large-v3 when that local copy exists, else the hub's."""
    if asr_model:
        return str(asr_model)
    local = resolve_model(models_dir, DEFAULT_ASR_MODEL.split("/")[-1])
    return local if Path(local).is_dir() else DEFAULT_ASR_MODEL


def load_asr(asr_model, device="cpu"):
    """(feature extractor, tokenizer, model) of a Whisper checkpoint (hub name or folder)."""
    from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq
    model = _from_pretrained(AutoModelForSpeechSeq2Seq, asr_model, "ASR model")
    if model.config.model_type != "whisper":
        raise FeatureError(f"ASR model {asr_model!r}: a {model.config.model_type} model; the transcripts step "
                           f"takes a Whisper checkpoint")
    return (_from_pretrained(AutoFeatureExtractor, asr_model, "ASR model"), _load_tokenizer(asr_model, "ASR model"),
            model.to(check_device(device)).eval())


def transcribe(wavs, asr, batch_size=ASR_BATCH_SIZE, progress_bar=None):
    """Whisper's transcripts of 16 kHz waveforms: English, the transcribe task, greedy decoding, no
    timestamps; a waveform over 30 s is transcribed in consecutive 30-s windows (utils.audio_windows)
    and their texts joined with a space. -> (texts, {index: why it is empty}) for silent or too short
    audio, which gets an empty transcript."""
    import torch
    feature_extractor, tokenizer, model = asr
    windows, empty = [], {}
    for i, wav in enumerate(wavs):
        usable = [w for w in audio_windows(np.asarray(wav, dtype=np.float32))
                  if len(w) >= ASR_MIN_SECONDS * SAMPLE_RATE and np.abs(w).max() >= SILENCE_PEAK]
        windows += [(i, w) for w in usable]
        if not usable:
            empty[i] = ("too short" if len(wav) < ASR_MIN_SECONDS * SAMPLE_RATE else "silent") + \
                f" ({len(wav) / SAMPLE_RATE:.2f} s, peak {float(np.abs(wav).max()) if len(wav) else 0:.1e})"
    parts = [[] for _ in wavs]
    device, dtype = model.device, model.dtype
    last_window = {i: k for k, (i, _) in enumerate(windows)}  # an utterance is done with its last window
    if progress_bar is not None:
        progress_bar.update(len(empty))
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        features = feature_extractor([w for _, w in batch], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.inference_mode(), quiet_transformers():
            ids = model.generate(features.input_features.to(device, dtype), language="en", task="transcribe",
                                 num_beams=1, do_sample=False, return_timestamps=False)
        for (i, _), text in zip(batch, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            parts[i].append(text)
        if progress_bar is not None:
            progress_bar.update(sum(1 for k in range(start, start + len(batch)) if last_window[windows[k][0]] == k))
    # One line per transcript, as the data contract says of Text/.
    return [" ".join(" ".join(p).split()) for p in parts], empty


def normalise_for_wer(text):
    """WER_NORMALISATION, through jiwer's transforms."""
    import jiwer
    return jiwer.Compose([jiwer.SubstituteRegexes({r"\[[^\]]*\]": " "}), jiwer.ToLowerCase(), jiwer.RemovePunctuation(),
                          jiwer.RemoveMultipleSpaces(), jiwer.Strip()])(text)


def word_errors(references, hypotheses):
    """jiwer's alignment of the normalised transcripts, summed over utterances: {"wer", "words"
    (of the references), "substitutions", "deletions", "insertions", "utterances"}; wer is None when
    the references have no word."""
    import jiwer
    references = [normalise_for_wer(t) for t in references]
    hypotheses = [normalise_for_wer(t) for t in hypotheses]
    counts = {"wer": None, "words": 0, "substitutions": 0, "deletions": 0, "insertions": 0,
              "utterances": len(references)}
    if references:
        out = jiwer.process_words(references, hypotheses)
        counts.update(words=out.hits + out.substitutions + out.deletions, substitutions=out.substitutions,
                      deletions=out.deletions, insertions=out.insertions)
        counts["wer"] = (out.substitutions + out.deletions + out.insertions) / counts["words"] if counts["words"] else None
    return counts


def wer_report(rows, references, hypotheses, asr_model):
    """The WER file's content: overall and per session, after WER_NORMALISATION."""
    sessions = sorted({row["session"] for row in rows})
    by_session = {str(s): word_errors([r for row, r in zip(rows, references) if row["session"] == s],
                                      [h for row, h in zip(rows, hypotheses) if row["session"] == s]) for s in sessions}
    return {"asr_model": str(asr_model), "normalisation": WER_NORMALISATION,
            "overall": word_errors(references, hypotheses), "sessions": by_session}


def _format_wer(counts):
    return "-" if counts["wer"] is None else f"{counts['wer']:.3f}"


def transcribe_utterances(data_dir, models_dir=None, asr_model=None, device="cpu", overwrite=False, progress=True,
                          batch_size=ASR_BATCH_SIZE):
    """ASR-<tag>/Text/<name>.txt: Whisper's transcript (transcribe()) of every utterance of the manifest,
    from Audio/<name>.wav (the context branch needs every utterance: mocap_data_collect.py --all-audio
    writes their audio), and ASR-<tag>/wer.json: the word error rates against the reference Text/,
    overall and per session, also in the step's summary."""
    data_dir = Path(data_dir)
    asr_model = asr_model_name(models_dir, asr_model)
    step = qualified_step("transcripts", model_tag(asr_model))
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def valid(path):
        try:
            return "\n" not in path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return False

    def work():
        manifest = read_manifest(data_dir)
        # Loaded first: a hub name is in the local cache (to be fingerprinted) only after a load.
        asr = load_asr(asr_model, device)
        record_models(data_dir, step, {"asr_model": fingerprint(asr_model)}, overwrite, manifest, report, "*.txt")
        todo = [row for row in manifest if overwrite or not valid(out_dir / f"{row['name']}.txt")]
        report.skipped = len(manifest) - len(todo)
        empty = []
        with tqdm(total=len(todo), desc=step, unit="utt", disable=not progress) as bar:
            # In slices, so that an interrupted run keeps what it finished.
            for start in range(0, len(todo), 4 * batch_size):
                part, wavs = [], []
                for row in todo[start:start + 4 * batch_size]:
                    wav_path = data_dir / "Audio" / f"{row['name']}.wav"
                    if not wav_path.is_file():
                        report.fail(row["name"], f"{wav_path}: missing audio (mocap_data_collect.py writes the target "
                                                 f"emotions' audio only; rerun it with --all-audio so that the context "
                                                 f"utterances can be transcribed too)", bar)
                        continue
                    try:
                        wavs.append(read_audio(wav_path)[0])
                        part.append(row)
                    except AudioError as e:
                        report.fail(row["name"], e, bar)
                texts, why_empty = transcribe(wavs, asr, batch_size, bar)
                for k, (row, text) in enumerate(zip(part, texts)):
                    write_text_atomic(out_dir / f"{row['name']}.txt", text)
                    report.written += 1
                    if k in why_empty:
                        empty.append(f"{row['name']} ({why_empty[k]})")
        if empty:
            report.notes.append(f"{len(empty)} utterance(s) silent or too short for speech recognition, given an "
                                f"empty transcript: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        write_wer(data_dir, manifest, asr_model, report)

    return _run_step(report, work)


def write_wer(data_dir, manifest, asr_model, report):
    """ASR-<tag>/wer.json over the utterances that have both transcripts; its figures into the summary."""
    transcripts = transcript_set(asr_model)
    rows, references, hypotheses = [], [], []
    for row in manifest:
        try:
            hypothesis = read_transcript(data_dir, row["name"], transcripts)
            reference = read_transcript(data_dir, row["name"])
        except FeatureError:  # not transcribed (failed above), or no reference: not scored
            continue
        rows.append(row)
        references.append(reference)
        hypotheses.append(hypothesis)
    wer = wer_report(rows, references, hypotheses, asr_model)
    path = Path(data_dir) / transcripts / WER_FILE
    write_text_atomic(path, json.dumps(wer, indent=2) + "\n")
    overall = wer["overall"]
    report.notes.append(f"WER {_format_wer(overall)} over {overall['utterances']} utterances ({overall['words']} "
                        f"reference words; per session " +
                        ", ".join(f"{s}: {_format_wer(c)}" for s, c in wer["sessions"].items()) +
                        f"), after normalisation: {WER_NORMALISATION}; written to {path}")
    return wer


EXTRACTORS = {"speech-tokens": extract_speech_tokens, "text-tokens": extract_text_tokens,
              "sentence-embeddings": extract_sentence_embeddings}


def run_step(step, data_dir, models_dir, sentence_model=None, text_model=None, device="cpu",
             overwrite=False, progress=True, sentence_pooling="cls", transcripts=None, asr_model=None,
             speech_model=None):
    """Run one of EXTRACTORS' steps, or "transcripts" (speech recognition with `asr_model`), by name;
    the text steps read the transcript set `transcripts` (data_contract.transcript_set; None: the
    reference). Returns its StepReport. With a transformers --speech-model, "speech-tokens" (or
    "speech-layers") makes that encoder's layer means instead."""
    if step in ("speech-tokens", "speech-layers") and speech_step(speech_model) != "speech-tokens":
        return extract_speech_layers(data_dir, speech_model, device, overwrite, progress)
    if step == "speech-layers":
        raise ValueError("the speech-layers step needs a transformers --speech-model (a folder or hub name)")
    if step == "speech-tokens":
        return extract_speech_tokens(data_dir, models_dir, device, overwrite, progress)
    if step == "text-tokens":
        return extract_text_tokens(data_dir, models_dir, text_model, overwrite, progress, transcripts)
    if step == "sentence-embeddings":
        return extract_sentence_embeddings(data_dir, models_dir, sentence_model, device, overwrite, progress,
                                           pooling=sentence_pooling, transcripts=transcripts)
    if step == "transcripts":
        return transcribe_utterances(data_dir, models_dir, asr_model, device, overwrite, progress)
    raise ValueError(f"unknown step {step!r}; one of {', '.join(EXTRACTORS)}, transcripts")


def add_model_arguments(parser):
    parser.add_argument("data_dir", help="DATA_DIR written by mocap_data_collect.py")
    parser.add_argument("models_dir", help="MODELS_DIR with vq-wav2vec_kmeans.pt and bert_kmeans/")
    parser.add_argument("--sentence-model", default=None,
                        help="sentence model (a text encoder, as --text-model), a name or folder: BertEmb/ for "
                             "bert-base-uncased (the default: MODELS_DIR/bert-base-uncased if present, else "
                             "bert-base-uncased), SentenceEmb-<model>/ for any other")
    parser.add_argument("--sentence-pooling", choices=SENTENCE_POOLINGS, default="cls",
                        help="the sentence vector: the last layer's [CLS] (the original's) or its mean over the "
                             "real tokens (written to a folder of its own, SentenceEmb-<model>+mean/)")
    parser.add_argument("--text-model", default=None,
                        help="text encoder (RoBERTa, BERT, DeBERTa-v2/v3, ELECTRA) whose tokenizer gives the text "
                             "tokens: GPT2Tokens/ for roberta-large (the default: MODELS_DIR/roberta-large if "
                             "present, else roberta-large), TextTokens-<model>/ for any other")
    parser.add_argument("--asr-model", default=None,
                        help="the Whisper checkpoint of the transcripts step, a name or folder (default: "
                             f"MODELS_DIR/whisper-large-v3 if present, else {DEFAULT_ASR_MODEL}); with "
                             "--transcripts asr, the transcript set the text features are made from")
    parser.add_argument("--transcripts", choices=("reference", "asr"), default="reference",
                        help="which transcripts the text features (tokens, sentence embeddings, context vectors) "
                             "are made from: the corpus's Text/, or --asr-model's ASR-<model>/Text/")
    parser.add_argument("--speech-model", default=None,
                        help="a transformers speech encoder (WavLM, HuBERT, wav2vec 2.0, data2vec-audio, Whisper; "
                             "folder or hub name): its layer means (SpeechLayers-<model>/) replace the vq-wav2vec "
                             "tokens (default: the original's vq-wav2vec tokens)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice, all cores; on a machine "
                             "shared with other jobs, 1 or 2 run far faster)")
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")


def asr_transcripts(args):
    """The transcript set the text steps read: None (reference) or --asr-model's ASR-<tag>."""
    return transcript_set(asr_model_name(args.models_dir, args.asr_model)) if args.transcripts == "asr" else None


def check_folders(args, parser):
    """DATA_DIR and MODELS_DIR must exist: a missing MODELS_DIR would send every model name to the
    hub, and a step would spend minutes retrying the network before saying so."""
    for what, folder in (("DATA_DIR", args.data_dir), ("MODELS_DIR", args.models_dir)):
        if not Path(folder).is_dir():
            parser.error(f"{what} {folder}: no such folder")
    try:
        check_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=list(EXTRACTORS) + ["transcripts", "speech-layers"],
                        help="which features to extract (transcripts: speech recognition with --asr-model)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_folders(args, parser)
    set_threads(args.threads)
    # Progress bars on a terminal only: in a log file their redrawn frames pile up (16 KB for one run).
    if args.step == "speech-layers" and speech_step(args.speech_model) == "speech-tokens":
        parser.error("speech-layers needs --speech-model: a transformers speech encoder's folder or hub name")
    report = run_step(args.step, args.data_dir, args.models_dir, args.sentence_model, args.text_model,
                      args.device, args.overwrite, progress=sys.stderr.isatty(), sentence_pooling=args.sentence_pooling,
                      transcripts=asr_transcripts(args), asr_model=asr_model_name(args.models_dir, args.asr_model),
                      speech_model=args.speech_model)
    print(format_summary([report]))
    return 0 if report.ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash; nothing finished is lost
        print("feature_ext.py: interrupted: finished files are kept; rerun the same command to go on", file=sys.stderr)
        sys.exit(130)
