"""A transformers speech encoder's route: WavLM, HuBERT, wav2vec 2.0, data2vec-audio or Whisper's encoder.

  speech-layers   SpeechLayers-<model>/<name>.npy: float32 (layers + 1, hidden), the mean over the
                  utterance's frames of every hidden state (speech_encoders.layer_means), one folder
                  per encoder ("speech-layers@<model_tag>"), utterances with audio; the branch: a
                  learned softmax-weighted sum of the layers (speech_encoders.SpeechLayerSum), as SUPERB
With --finetune-speech the encoder itself trains: its input is the waveform as its feature extractor
makes it (speech_encoders.waveform_input), read from Audio/, and no layer means are extracted.
layer_means and waveform_input are the one way a recording becomes this input, for the extraction
step, the training data and predict.py alike.
"""
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import (SAMPLE_RATE, DataError, Step, feature_folder, model_tag, qualified_step, read_feature,
                                 read_manifest, register_step)
from mmser.extraction import FeatureError, StepReport, audio_weight, pending, record_models, rows_of, run_reported
from mmser.speech import SpeechRoute
from mmser.utils import (SILENCE_PEAK, WHISPER_WINDOW_SECONDS, AudioError, check_device, fingerprint, read_audio,
                         save_npy_atomic)

NAME = "speech-layers"
register_step(NAME, Step(None, "labelled", ("speech_encoder",), per_model="SpeechLayers-{model}"))
# The files of an encoder's folder that decide its features: the feature extractor's settings too
# (normalisation, attention mask), which utils.WEIGHT_FILES alone would miss.
ENCODER_FILES = ("config.json", "preprocessor_config.json", "*.safetensors", "pytorch_model*.bin")


# A batch of the extraction step: at most this much padded audio (WavLM-large's hidden states of one
# audio second take 25 layers x 50 frames x 1024 x 4 bytes = 5 MB), and at most MAX_PADDING of it padding.
BATCH_SECONDS = 120
MAX_PADDING = 0.1


def length_batches(items, speech, batch_seconds=BATCH_SECONDS):
    """items: (row, samples) -> lists of them in order of length, each one encoder batch: what the family
    allows (speech_encoders.SpeechModel.pads_freely: similar lengths, at most MAX_PADDING of the batch
    padding; otherwise equal lengths only), at most batch_seconds of padded audio (Whisper: 30 s a
    window), one utterance alone whatever its length."""
    window = WHISPER_WINDOW_SECONDS * SAMPLE_RATE

    def padded(batch):  # samples the encoder reads
        if speech.kind == "whisper":  # utils.audio_windows: one window at least
            return sum(max(1, math.ceil(n / window)) for _, n in batch) * window
        return max(n for _, n in batch) * len(batch)

    def allowed(batch):
        if padded(batch) > batch_seconds * SAMPLE_RATE:
            return False
        if speech.kind == "whisper":
            return True
        if not speech.pads_freely:
            return batch[0][1] == batch[-1][1]
        return padded(batch) - sum(n for _, n in batch) <= MAX_PADDING * padded(batch)

    batches = []
    for item in sorted(items, key=lambda item: item[1]):
        if batches and allowed(batches[-1] + [item]):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def extract_speech_layers(data_dir, speech_model, device="cpu", overwrite=False, progress=True,
                          batch_seconds=BATCH_SECONDS):
    """SpeechLayers-<model>/<name>.npy: float32 (layers + 1, hidden), the mean over the utterance's frames
    of every hidden state of a transformers speech encoder (speech_encoders.layer_means), for every
    target utterance, in fp32 and inference mode, in batches of similar lengths where the family's
    hidden states do not change with padding and of equal lengths where they do (length_batches;
    within 1e-5 of each utterance alone), on a CPU several batches at once (one per torch thread,
    speech_encoders.layer_means_of_batches). One folder per encoder, so the features of different
    encoders sit side by side."""
    from mmser import speech_encoders
    data_dir = Path(data_dir)
    step = qualified_step(NAME, model_tag(speech_model))
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def work():
        manifest = read_manifest(data_dir)
        try:
            speech = speech_encoders.load_speech_model(speech_model, check_device(device))
        except (speech_encoders.SpeechModelError, OSError) as e:
            raise FeatureError(str(e)) from None
        record_models(data_dir, step, {"speech_encoder": fingerprint(speech_model, ENCODER_FILES)},
                      overwrite, manifest, report)
        shape = (speech.layers, speech.hidden_size)

        def valid(path):
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                return False
            return array.dtype == np.float32 and array.shape == shape and bool(np.isfinite(array).all())

        weigh = audio_weight(data_dir)
        todo = pending(rows_of(step, manifest, data_dir), out_dir, valid, overwrite, report, weigh=weigh)
        items = [(row, round(weigh(row) * SAMPLE_RATE)) for row in todo]  # lengths from the headers
        bar = tqdm(total=len(items), desc=step, unit="utt", disable=not progress)
        # The batches in flight together hold at most batch_seconds of padded audio.
        workers = speech_encoders.extraction_workers(speech)
        batches = length_batches(items, speech, batch_seconds / workers)

        def readable_parts():  # (names, waveforms) per encoder batch, the unreadable reported on the way
            for batch in batches:
                readable = []
                for row, _ in batch:
                    wav_path = data_dir / "Audio" / f"{row['name']}.wav"
                    try:
                        wav, _ = read_audio(wav_path)
                    except AudioError as e:  # unreadable or cut off
                        report.fail(row["name"], e, bar)
                        bar.update()
                        continue
                    short = speech_encoders.too_short(speech, len(wav))
                    if short:
                        report.fail(row["name"], f"{wav_path}: {short}", bar)
                        bar.update()
                    else:
                        readable.append((row["name"], wav))
                # Where a header did not tell the length read, a family that batches only equal lengths
                # takes those utterances one at a time.
                if len({len(wav) for _, wav in readable}) > 1 and not speech.pads_freely:
                    yield from ([[name], [wav]] for name, wav in readable)
                elif readable:
                    yield [name for name, _ in readable], [wav for _, wav in readable]

        for names, means in speech_encoders.layer_means_of_batches(speech, readable_parts(), workers):
            for name, array in zip(names, means):
                save_npy_atomic(out_dir / f"{name}.npy", array.astype(np.float32))
                report.written += 1
            bar.update(len(names))
        bar.close()

    return run_reported(report, work)


class SpeechLayers(SpeechRoute):
    """A transformers speech encoder's layer means (frozen), or the encoder fine-tuned on the waveforms."""

    name = NAME
    wants = "a transformers --speech-model (a speech encoder's folder or hub name)"
    kind = "a transformers speech encoder's folder or hub name"
    encoder_files = (ENCODER_FILES,)

    def __init__(self, speech_model=None, finetune=False):
        super().__init__(speech_model, finetune)
        self._speech = None  # the encoder and its feature extractor, for the waveform input, once loaded

    @classmethod
    def takes(cls, speech_model):
        return speech_model is not None

    @property
    def tag(self):
        return model_tag(self.speech_model)

    def extract(self, data_dir, models_dir, device="cpu", overwrite=False, progress=True):
        return extract_speech_layers(data_dir, self.speech_model, device, overwrite, progress)

    def check(self):
        from mmser import speech_encoders
        speech_encoders.speech_kind(self.speech_model)  # refuses what is not a speech encoder, saying what it is

    @property
    def reads_audio(self):
        return self.finetune

    @property
    def takes_gradient_checkpointing(self):  # only the fine-tuned encoder runs in training
        return self.finetune

    def load_input(self, data_dir, name, max_tokens):
        path = self.input_file(data_dir, name)
        if self.reads_audio:
            from mmser import speech_encoders
            if self._speech is None:
                self._speech = speech_encoders.load_speech_model(self.speech_model)
            try:
                wav, _ = read_audio(path)
            except AudioError as error:
                raise DataError(str(error)) from None
            return self.model_input(speech_encoders.waveform_input(self._speech, wav), max_tokens)
        return self.model_input(read_feature(path, "speech layer means (layers + 1, hidden)", ndim=2), max_tokens)

    def model_input(self, features, max_tokens):
        import torch
        return {("speech_wave" if self.reads_audio else "speech_layers"): torch.from_numpy(features.astype(np.float32))}

    def branch(self, gradient_checkpointing=False):
        from mmser import speech_encoders
        return {"speech_layer_sum": speech_encoders.layer_sum_branch(self.speech_model, self.finetune,
                                                                     gradient_checkpointing)}

    def load_extractor(self, paths, device):
        from mmser import speech_encoders
        return speech_encoders.load_speech_model(paths["speech_encoder"], device)

    def features(self, extractor, wav, path):
        from mmser import speech_encoders
        short = speech_encoders.too_short(extractor, len(wav))
        if short:
            return f"{path}: {short}"
        if np.abs(wav).max() < SILENCE_PEAK:
            return f"{path}: silent (peak below -60 dBFS), nothing to classify"
        if self.reads_audio:
            return speech_encoders.waveform_input(extractor, wav)
        return speech_encoders.layer_means(extractor, wav)
