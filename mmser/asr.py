"""Speech recognition: a transcript set of its own per ASR model (Whisper), and its word error rate.

The transcripts step writes ASR-<tag>/Text/<name>.txt for every utterance with a Whisper checkpoint
(data_contract.model_tag names the folder): English, the transcribe task, greedy decoding, no
timestamps, an utterance over 30 s in consecutive 30-s windows; silent or too short audio gets an
empty transcript and a word in the summary. ASR-<tag>/wer.json holds its word error rate against
Text/, overall and per session, after WER_NORMALISATION (jiwer). predict.py transcribes recordings
given without text with the same transcribe().
"""
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import SAMPLE_RATE, WER_FILE, feature_folder, model_tag, qualified_step, read_manifest, transcript_set
from mmser.extraction import (FeatureError, StepReport, from_pretrained, load_tokenizer, read_transcript, record_models,
                              run_reported)
from mmser.data_dir_writer import context_audio_advice
from mmser.models_dir import hub_name, resolve_model
from mmser.utils import (SILENCE_PEAK, AudioError, audio_windows, check_device, fingerprint, quiet_transformers,
                         read_audio, write_text_atomic)

DEFAULT_ASR_MODEL = hub_name("asr_model")
ASR_BATCH_SIZE = 8  # 30-s windows per generate() call
# Whisper hears nothing in these, and on silence it makes words up ("Thank you."): such a window is
# not transcribed, and an utterance with no other window gets an empty transcript.
ASR_MIN_SECONDS = 0.1
WER_NORMALISATION = ("IEMOCAP's bracketed tags ([LAUGHTER], [BREATHING], [GARBAGE], ...) removed, lower case, "
                     "punctuation removed (apostrophes and hyphens too: don't -> dont), runs of spaces made one; "
                     "the same for the reference and the ASR transcript")


def asr_model_name(models_dir=None, asr_model=None):
    """--asr-model, or MODELS_DIR/whisper-large-v3 when that local copy exists, else the hub's."""
    return resolve_model(models_dir, "asr_model", asr_model)


def load_asr(asr_model, device="cpu"):
    """(feature extractor, tokenizer, model) of a Whisper checkpoint (hub name or folder)."""
    from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq
    model = from_pretrained(AutoModelForSpeechSeq2Seq, asr_model, "ASR model")
    if model.config.model_type != "whisper":
        raise FeatureError(f"ASR model {asr_model!r}: a {model.config.model_type} model; the transcripts step "
                           f"takes a Whisper checkpoint")
    return (from_pretrained(AutoFeatureExtractor, asr_model, "ASR model"), load_tokenizer(asr_model, "ASR model"),
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


def format_wer(counts):
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
                        report.fail(row["name"], f"{wav_path}: missing audio ({context_audio_advice(data_dir)})", bar)
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

    return run_reported(report, work)


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
    report.notes.append(f"WER {format_wer(overall)} over {overall['utterances']} utterances ({overall['words']} "
                        f"reference words; per session " +
                        ", ".join(f"{s}: {format_wer(c)}" for s, c in wer["sessions"].items()) +
                        f"), after normalisation: {WER_NORMALISATION}; written to {path}")
    return wer
