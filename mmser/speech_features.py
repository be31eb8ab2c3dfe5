"""The speech steps: the original's vq-wav2vec tokens, or a transformers speech encoder's layer means.

  speech-tokens    vqw2vTokens/<name>.npy: int32 speech-dictionary ids `<s> g0-g1 ... </s>` of the
                   vq-wav2vec codes (fairseq_checkpoints.py), utterances with audio
  speech-layers    SpeechLayers-<model>/<name>.npy: float32 (layers + 1, hidden) layer means of a
                   transformers speech encoder (speech_encoders.py), one folder per encoder
"""
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import feature_folder, model_tag, qualified_step, read_manifest
from mmser.extraction import FeatureError, StepReport, pending, record_models, rows_of, run_reported, valid_npy
from mmser.utils import AudioError, check_device, fingerprint, read_audio, save_npy_atomic


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
        for row in rows_of(step, manifest):
            # Audio that collection no longer vouches for is gone: so are the tokens made from it.
            if not (data_dir / "Audio" / f"{row['name']}.wav").is_file():
                (out_dir / f"{row['name']}.npy").unlink(missing_ok=True)
        todo = pending(rows_of(step, manifest), out_dir, lambda p: valid_npy(p, np.int32, bos_eos=(0, 2)),
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

    return run_reported(report, work)


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

        todo = pending(rows_of(step, manifest), out_dir, valid, overwrite, report)
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

    return run_reported(report, work)
