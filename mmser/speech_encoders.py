"""Today's speech encoders through transformers: WavLM, HuBERT, wav2vec 2.0, data2vec-audio, Whisper's encoder.

The speech branch's other route beside the original's (vq-wav2vec codes into a fairseq speech
RoBERTa, bert_kmeans.pt, fairseq_checkpoints.py). A transformers speech encoder is named by a hub name
or a local folder; its family is read from its config (config.json's model_type), and it is loaded
with its own feature extractor (AutoFeatureExtractor; WhisperFeatureExtractor for Whisper), so the
normalisation of the waveform and the attention mask follow the checkpoint.

  speech_kind(model)             "fairseq" for a bert_kmeans.pt, else the family (FAMILIES); anything else
                                 is a SpeechModelError that says what it is
  load_speech_model(model)       -> SpeechModel(encoder, feature_extractor, kind), in eval mode, fp32
  layer_means(speech, wav)       float32 (layers + 1, hidden): the mean over the utterance's frames of
                                 every hidden state (output_hidden_states, the embedding output first),
                                 the utterance alone, in inference mode. Whisper reads 30-s windows
                                 (utils.audio_windows) and only the frames that cover audio count: the
                                 first ceil(samples / 320) of each window.
  pooled_layers(...)             the same over a padded batch, with gradients (--finetune-speech;
                                 Whisper: every utterance's windows in one encoder batch)
The frozen route (SUPERB's) stores layer_means per labelled utterance (feature_ext.py's speech-layers
step); the model learns a softmax-weighted sum over the layers (model_structure.SpeechLayerSum).
torch and transformers are imported by the functions that use them.
"""
import math
from dataclasses import dataclass

import numpy as np

from mmser.data_contract import SAMPLE_RATE, speech_step
from mmser.utils import audio_windows, quiet_transformers

# model_type -> the family's name, as a user reads it
FAMILIES = {"wavlm": "WavLM", "hubert": "HuBERT", "wav2vec2": "wav2vec 2.0", "data2vec-audio": "data2vec-audio",
            "whisper": "Whisper (its encoder)"}
# The files of an encoder's folder that decide its features: the feature extractor's settings too
# (normalisation, attention mask), which utils.WEIGHT_FILES alone would miss.
SPEECH_FILES = ("config.json", "preprocessor_config.json", "*.safetensors", "pytorch_model*.bin")
# Whisper: 100 mel frames a second, halved by its second convolution: one encoder frame per 320 samples.
WHISPER_SAMPLES_PER_FRAME = 320



class SpeechModelError(ValueError):
    """A --speech-model that is not a speech encoder this tool takes; the message says what it is."""


@dataclass
class SpeechModel:
    encoder: object  # the transformers model (Whisper: WhisperModel's encoder)
    feature_extractor: object
    kind: str  # a key of FAMILIES

    @property
    def layers(self):
        return self.encoder.config.num_hidden_layers + 1

    @property
    def hidden_size(self):
        return self.encoder.config.hidden_size

    @property
    def takes_attention_mask(self):
        """What the checkpoint's feature extractor says: wav2vec 2.0 base-style models (group-norm
        feature encoder) were trained on zero-padded batches without one."""
        return bool(getattr(self.feature_extractor, "return_attention_mask", False))


def is_fairseq_speech_model(model):
    """The original route: no --speech-model (MODELS_DIR/bert_kmeans/bert_kmeans.pt) or a checkpoint file."""
    return speech_step(model) == "speech-tokens"


def speech_kind(model):
    """'fairseq' for a checkpoint file (bert_kmeans.pt), else the transformers family from the model's
    config; SpeechModelError names anything else."""
    if is_fairseq_speech_model(model):
        return "fairseq"
    from transformers import AutoConfig
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as e:
        raise SpeechModelError(f"speech model {model!r}: neither a fairseq bert_kmeans.pt nor a transformers "
                               f"model folder or hub name ({e})") from None
    if config.model_type not in FAMILIES:
        made = ", ".join(getattr(config, "architectures", None) or []) or "no architecture named"
        raise SpeechModelError(f"speech model {model!r}: its config says model_type {config.model_type!r} ({made}), "
                               f"not a speech encoder this tool takes ({', '.join(FAMILIES)})")
    return config.model_type


def load_speech_model(model, device="cpu"):
    """The encoder and its own feature extractor, in eval mode; a Whisper folder's decoder (an
    openai/whisper-* folder holds both) is left out."""
    import transformers
    kind = speech_kind(model)
    if kind == "fairseq":
        raise SpeechModelError(f"speech model {model!r}: a fairseq checkpoint; its route is the vq-wav2vec tokens")
    with quiet_transformers():
        if kind == "whisper":
            encoder = transformers.WhisperModel.from_pretrained(str(model)).get_encoder()
            extractor = transformers.WhisperFeatureExtractor.from_pretrained(str(model))
        else:
            encoder = transformers.AutoModel.from_pretrained(str(model))
            extractor = transformers.AutoFeatureExtractor.from_pretrained(str(model))
    return SpeechModel(encoder.float().to(device).eval(), extractor, kind)


def frames(speech, samples):
    """Encoder frames that `samples` of audio give (0: too short for the model)."""
    if speech.kind == "whisper":
        return math.ceil(samples / WHISPER_SAMPLES_PER_FRAME)
    import torch
    return int(speech.encoder._get_feat_extract_output_lengths(torch.tensor(samples)))


def _whisper_window_sums(encoder, feature_extractor, windows):
    """Whisper over 30-s windows (numpy, each padded to 30 s by its feature extractor): per window, the
    sum over the frames that cover audio (the first ceil(samples / 320)) of every hidden state,
    (windows, layers + 1, hidden), and those frame counts. With gradients where the caller allows them."""
    import torch
    device = next(encoder.parameters()).device
    features = feature_extractor(list(windows), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    states = torch.stack(encoder(features.to(device), output_hidden_states=True).hidden_states, 1)
    counts = torch.tensor([math.ceil(len(w) / WHISPER_SAMPLES_PER_FRAME) for w in windows], device=device)
    real = (torch.arange(states.shape[2], device=device)[None] < counts[:, None]).to(states.dtype)
    return (states * real[:, None, :, None]).sum(2), counts


def _whisper_layer_sums(speech, wav):
    """Whisper: (sum over counted frames of every hidden state (layers + 1, hidden), frames counted),
    one window at a time."""
    total, counted = 0.0, 0
    for window in audio_windows(wav):
        sums, counts = _whisper_window_sums(speech.encoder, speech.feature_extractor, [window])
        total, counted = total + sums[0].float(), counted + int(counts[0])
    return total, counted


def layer_means(speech, wav):
    """(layers + 1, hidden) float32 numpy: the mean over the frames of `wav` (16 kHz mono) of each hidden
    state, the embedding output first; `wav` alone, in fp32 and inference mode."""
    import torch

    from mmser.fairseq_checkpoints import full_fp32_precision
    if frames(speech, len(wav)) < 1:
        raise ValueError(f"{len(wav)} samples: too short for one frame of the {FAMILIES[speech.kind]} encoder")
    # fp32 on a GPU too: cuDNN's convolutions run in TF32 by default, which a cached feature would keep.
    with torch.inference_mode(), full_fp32_precision():
        if speech.kind == "whisper":
            total, counted = _whisper_layer_sums(speech, wav)
            return (total / counted).cpu().numpy()
        device = next(speech.encoder.parameters()).device
        inputs = speech.feature_extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                          return_attention_mask=speech.takes_attention_mask)
        states = speech.encoder(**inputs.to(device), output_hidden_states=True).hidden_states
        return torch.stack(states)[:, 0].float().mean(1).cpu().numpy()


def waveform_input(speech, wav):
    """One utterance's encoder input as the feature extractor makes it (normalised over the utterance
    when the checkpoint says so), 1-D float32 numpy; zero-padded into batches (its padding value).
    Whisper's are the samples themselves: its log-mel windows are made as the batch runs (pooled_layers)."""
    if speech.kind == "whisper":
        return np.asarray(wav, dtype=np.float32)
    return speech.feature_extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]


def pooled_layers(encoder, wave, wave_mask, takes_attention_mask, whisper_features=None):
    """(B, layers + 1, hidden): for a zero-padded batch of waveform_input's (wave (B, samples), wave_mask
    (B, samples) 1 on real samples), the mean over each utterance's real frames of every hidden state.
    With gradients where the caller allows them (fine-tuning). Whisper (whisper_features: its feature
    extractor): every utterance's 30-s windows in one encoder batch, each counting the frames over
    audio, as layer_means does."""
    import torch
    if whisper_features is not None:
        samples = wave_mask.sum(-1).long().tolist()
        per_utterance = [audio_windows(wave[b, :n].detach().float().cpu().numpy()) for b, n in enumerate(samples)]
        sums, counts = _whisper_window_sums(encoder, whisper_features, [w for ws in per_utterance for w in ws])
        owner = torch.repeat_interleave(torch.arange(len(samples), device=sums.device),
                                        torch.tensor([len(ws) for ws in per_utterance], device=sums.device))
        total = torch.zeros(len(samples), *sums.shape[1:], dtype=sums.dtype, device=sums.device).index_add(0, owner, sums)
        counted = torch.zeros(len(samples), dtype=sums.dtype, device=sums.device).index_add(0, owner, counts.to(sums.dtype))
        return total / counted.clamp(min=1)[:, None, None]
    out = encoder(wave, attention_mask=wave_mask if takes_attention_mask else None, output_hidden_states=True)
    states = torch.stack(out.hidden_states, 1)  # (B, layers + 1, frames, hidden)
    lengths = encoder._get_feat_extract_output_lengths(wave_mask.sum(-1)).clamp(min=1)
    real = (torch.arange(states.shape[2], device=states.device)[None] < lengths[:, None]).to(states.dtype)
    return (states * real[:, None, :, None]).sum(2) / lengths[:, None, None].to(states.dtype)
