"""The original's speech route: vq-wav2vec codes as speech-dictionary tokens, read by a fairseq speech RoBERTa.

  speech-tokens   vqw2vTokens/<name>.npy: int32 speech-dictionary ids `<s> g0-g1 ... </s>` of the
                  vq-wav2vec codes, utterances with audio (MODELS_DIR/vq-wav2vec_kmeans.pt and
                  bert_kmeans/dict.txt); the branch: the speech RoBERTa of bert_kmeans/bert_kmeans.pt
                  (or --speech-model FILE.pt) at its <s>, frozen unless --finetune-speech
speech_token_ids is the one way a recording becomes these ids, for the extraction step and for
predict.py alike; the fairseq files load through fairseq_checkpoints.py.
"""
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import Step, feature_folder, read_feature, read_manifest, register_step, truncate_tokens
from mmser.models_dir import models_dir_path
from mmser.extraction import (FeatureError, StepReport, audio_weight, pending, record_models, rows_of, run_reported,
                              valid_npy)
from mmser.speech import SpeechRoute
from mmser.utils import SILENCE_PEAK, AudioError, check_device, fingerprint, read_audio, save_npy_atomic

NAME = "speech-tokens"
register_step(NAME, Step("vqw2vTokens", "labelled", ("vq_wav2vec", "speech_dictionary")))


def speech_model_files(models_dir):
    """The two fairseq files the speech tokens come from, each checked to be there: a missing one is
    named with where docs/encoders.md's "Pretrained files" says to get it."""
    paths = {role: models_dir_path(models_dir, role) for role in ("vq_wav2vec", "speech_dictionary")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FeatureError(f"{' and '.join(missing)}: not found; download vq-wav2vec_kmeans.pt and bert_kmeans.tar "
                           f"into MODELS_DIR (docs/encoders.md, \"Pretrained files\")")
    return paths


def speech_token_ids(wav, quantizer, dictionary):
    """One recording's speech-dictionary ids `<s> g0-g1 ... </s>` (int32) of its vq-wav2vec codes
    (16 kHz mono `wav`; shorter than one frame: `<s> </s>`)."""
    from mmser.fairseq_checkpoints import codes_to_string
    return dictionary.encode_line(codes_to_string(quantizer.codes(wav))).numpy().astype(np.int32)


def extract_speech_tokens(data_dir, models_dir, device="cpu", overwrite=False, progress=True):
    """vqw2vTokens/<name>.npy: `<s> g0-g1 ... </s>` speech-dictionary ids (int32) for every target
    utterance (the ones with audio), one utterance at a time."""
    data_dir, step = Path(data_dir), NAME
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def work():
        from mmser.fairseq_checkpoints import CheckpointError, load_speech_dictionary, load_vq_wav2vec
        manifest = read_manifest(data_dir)
        paths = speech_model_files(models_dir)
        try:
            dictionary = load_speech_dictionary(paths["speech_dictionary"])
            model = load_vq_wav2vec(paths["vq_wav2vec"]).to(check_device(device))
        except CheckpointError as e:
            raise FeatureError(str(e)) from None
        record_models(data_dir, step, {role: fingerprint(p) for role, p in paths.items()}, overwrite, manifest, report)
        for row in rows_of(step, manifest, data_dir):
            # Audio that collection no longer vouches for is gone: so are the tokens made from it.
            if not (data_dir / "Audio" / f"{row['name']}.wav").is_file():
                (out_dir / f"{row['name']}.npy").unlink(missing_ok=True)
        todo = pending(rows_of(step, manifest, data_dir), out_dir, lambda p: valid_npy(p, np.int32, bos_eos=(0, 2)),
                       overwrite, report, weigh=audio_weight(data_dir))
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
            if len(wav) < model.min_samples:
                report.notes.append(f"{wav_path}: {len(wav)} samples, fewer than {model.min_samples}: "
                                    f"no frame, stored <s> </s>")
            save_npy_atomic(out_dir / f"{row['name']}.npy", speech_token_ids(wav, model, dictionary))
            report.written += 1

    return run_reported(report, work)


def load_speech_roberta(path):
    """The speech RoBERTa from a fairseq bert_kmeans.pt, by the project's one fairseq loader."""
    from mmser.fairseq_checkpoints import load_fairseq_roberta
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: speech RoBERTa checkpoint not found; download bert_kmeans.tar into "
                                f"MODELS_DIR (docs/encoders.md, \"Pretrained files\")")
    return load_fairseq_roberta(path)


class SpeechTokens(SpeechRoute):
    """vq-wav2vec tokens into the fairseq speech RoBERTa (--finetune-speech trains the RoBERTa)."""

    name = NAME
    wants = "a fairseq speech RoBERTa checkpoint (--speech-model FILE.pt, or none: MODELS_DIR's bert_kmeans.pt)"
    kind = "a fairseq checkpoint file (*.pt), the speech RoBERTa that reads the speech-tokens step's features"
    model_is_file = True

    @classmethod
    def takes(cls, speech_model):
        # A missing *.pt is one too, to be named as missing.
        return speech_model is None or Path(speech_model).is_file() or str(speech_model).endswith(".pt")

    def extract(self, data_dir, models_dir, device="cpu", overwrite=False, progress=True):
        return extract_speech_tokens(data_dir, models_dir, device, overwrite, progress)

    def missing(self):
        if Path(self.speech_model).is_file():
            return None
        return (f"{self.speech_model}: not found; the speech branch's RoBERTa comes from bert_kmeans.tar, unpacked "
                f"into MODELS_DIR (docs/encoders.md, \"Pretrained files\")")

    def positions(self):
        from mmser.fairseq_checkpoints import load_fairseq_roberta
        from mmser.text_features import text_token_limit
        try:
            config = load_fairseq_roberta(self.speech_model).config
        except (OSError, ValueError):  # no such file; not a checkpoint (CheckpointError)
            return None
        return text_token_limit(config)

    def load_input(self, data_dir, name, max_tokens):
        return self.model_input(read_feature(self.input_file(data_dir, name), "speech tokens"), max_tokens)

    def model_input(self, features, max_tokens):
        import torch
        return {"speech_ids": torch.from_numpy(truncate_tokens(features, max_tokens).astype(np.int64))}

    def branch(self, gradient_checkpointing=False):
        return {"speech_encoder": load_speech_roberta(self.speech_model)}

    def load_extractor(self, paths, device):
        from mmser.fairseq_checkpoints import load_speech_dictionary, load_vq_wav2vec
        return load_vq_wav2vec(paths["vq_wav2vec"]).to(device), load_speech_dictionary(paths["speech_dictionary"])

    def features(self, extractor, wav, path):
        quantizer, dictionary = extractor
        if len(wav) < quantizer.min_samples:
            return (f"{path}: too short for one vq-wav2vec frame ({len(wav)} samples at 16 kHz, at least "
                    f"{quantizer.min_samples} needed)")
        if np.abs(wav).max() < SILENCE_PEAK:
            return f"{path}: silent (peak below -60 dBFS), nothing to classify"
        return speech_token_ids(wav, quantizer, dictionary)
