"""Today's speech encoders through transformers: WavLM, HuBERT, wav2vec 2.0, data2vec-audio, Whisper's encoder.

What the speech branch's layers route (mmser/speech/layers.py) runs, beside the original's route
(vq-wav2vec codes into a fairseq speech RoBERTa, bert_kmeans.pt, fairseq_checkpoints.py). A
transformers speech encoder is named by a hub name or a local folder; its family is read from its
config (config.json's model_type), and it is loaded with its own feature extractor
(AutoFeatureExtractor; WhisperFeatureExtractor for Whisper), so the normalisation of the waveform
and the attention mask follow the checkpoint.

  speech_kind(model)             the family (FAMILIES); anything else is a SpeechModelError that says
                                 what it is
  load_speech_model(model)       -> SpeechModel(encoder, feature_extractor, kind), in eval mode, fp32
  layer_means(speech, wav)       float32 (layers + 1, hidden): the mean over the utterance's frames of
                                 every hidden state (output_hidden_states, the embedding output first),
                                 the utterance alone (a batch of one), in inference mode. Whisper reads 30-s windows
                                 (utils.audio_windows) and only the frames that cover audio count: the
                                 first ceil(samples / 320) of each window.
  batch_layer_means(speech, wavs) layer_means of several utterances in one batch (the extraction step's
                                 way): any lengths for the families that pad freely (PADS_FREELY, Whisper),
                                 equal lengths only for the others; on a CPU the convolutional front end
                                 runs time-major (_time_major_front_end), within 1e-5 of transformers' own
  frames(speech, samples), too_short(speech, samples)   the encoder frames of so many samples; why none
  pooled_layers(...)             the same over a padded batch, with gradients (--finetune-speech;
                                 Whisper: every utterance's windows in one encoder batch)
  SpeechLayerSum                 the speech branch over them: a learned softmax-weighted sum of the layers
  layer_sum_branch(model, ...)   that branch, with the encoder when fine-tuned
The frozen way (SUPERB's) stores layer_means per labelled utterance (the layers route's step); the
model learns a softmax-weighted sum over the layers. transformers is imported by the functions that
use it; the speech routes import this module only when they run an encoder.
"""
import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmser.data_contract import SAMPLE_RATE
from mmser.models_dir import missing_path
from mmser.utils import audio_windows, quiet_transformers

# model_type -> the family's name, as a user reads it
FAMILIES = {"wavlm": "WavLM", "hubert": "HuBERT", "wav2vec2": "wav2vec 2.0", "data2vec-audio": "data2vec-audio",
            "whisper": "Whisper (its encoder)"}
# Whisper: 100 mel frames a second, halved by its second convolution: one encoder frame per 320 samples.
WHISPER_SAMPLES_PER_FRAME = 320
# The families whose hidden states over an utterance's frames stay the same when it is zero-padded
# into a batch with an attention mask (tiny models of each: within 5e-7 of the utterance alone), with a
# layer-norm feature encoder: it works frame by frame, and the one positional convolution reads the
# masked frames as zeros. Not so, and batched only at equal lengths: the group-norm feature encoder
# (wav2vec 2.0, HuBERT and WavLM base: its first norm spans the padded time; 0.18 to 0.35 off) and
# data2vec-audio (its five stacked positional convolutions carry the padding into the last real
# frames; 0.06 to 0.13 off). Whisper pads each 30-s window alone, whatever the batch.
PADS_FREELY = ("wavlm", "hubert", "wav2vec2")



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
    def pads_freely(self):
        """Whether utterances of different lengths can share a batch (PADS_FREELY): else only equal lengths."""
        return self.kind == "whisper" or (self.kind in PADS_FREELY and self.takes_attention_mask
                                          and getattr(self.encoder.config, "feat_extract_norm", None) == "layer")

    @property
    def takes_attention_mask(self):
        """What the checkpoint's feature extractor says: wav2vec 2.0 base-style models (group-norm
        feature encoder) were trained on zero-padded batches without one."""
        return bool(getattr(self.feature_extractor, "return_attention_mask", False))


def speech_kind(model):
    """The transformers family of a speech encoder, from its config; SpeechModelError names anything else."""
    from transformers import AutoConfig
    missing = missing_path(model)  # transformers would take it for a malformed hub name
    if missing:
        raise SpeechModelError(f"speech model {missing}")
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
    with quiet_transformers():
        if kind == "whisper":
            encoder = transformers.WhisperModel.from_pretrained(str(model)).get_encoder()
            extractor = transformers.WhisperFeatureExtractor.from_pretrained(str(model))
        else:
            encoder = transformers.AutoModel.from_pretrained(str(model))
            extractor = transformers.AutoFeatureExtractor.from_pretrained(str(model))
    return SpeechModel(encoder.float().to(device).eval(), extractor, kind)


@contextlib.contextmanager
def _quiet_wavlm_masks():
    """WavLM's attention hands torch a boolean padding mask beside its float position bias, and torch
    warns on every utterance that mixing the two is deprecated (UserWarning: "Support for mismatched
    key_padding_mask and attn_mask is deprecated"): a warning about transformers' code, not the
    user's, which the user cannot act on. Only that warning is silenced, and only while the encoder runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask",
                                category=UserWarning)
        yield


def _time_major_front_end(feature_encoder, wav):
    """transformers' convolutional feature encoder (wav2vec 2.0, HuBERT, WavLM, data2vec-audio) over one
    utterance (1-D samples) in (frames, channels) layout: every convolution a few matrix products
    (vq_wav2vec.time_major_conv), the norms and activations in place, and no copy between layers:
    WavLM-base's on a 10-s utterance took 193 ms against 260 for transformers' own in its (channels,
    time) layout through oneDNN, which also compiles a kernel for every new input length
    (bench_speech.py). Only for the layers _knows_front_end accepts."""
    from mmser.vq_wav2vec import time_major_conv
    x, buffers = wav[:, None], [None, None]
    for k, layer in enumerate(feature_encoder.conv_layers):
        conv, norm = layer.conv, getattr(layer, "layer_norm", None)
        channels, kernel, stride = conv.out_channels, conv.kernel_size[0], conv.stride[0]
        frames = (x.shape[0] - kernel) // stride + 1
        buffer = buffers[k % 2]
        if buffer is None or buffer.numel() < frames * channels:
            buffer = buffers[k % 2] = torch.empty(frames * channels, dtype=x.dtype, device=x.device)
        cache = feature_encoder.__dict__.setdefault("_time_major_weights", {}).setdefault(k, {})
        x = time_major_conv(x, conv.weight, stride, cache, buffer[:frames * channels].view(frames, channels))
        if conv.bias is not None:
            x.add_(conv.bias)
        if isinstance(norm, nn.GroupNorm):  # one group per channel: each channel over the utterance's time
            x.sub_(x.mean(0))
            x.mul_(torch.rsqrt(_mean_square(x) + norm.eps) * norm.weight).add_(norm.bias)
        elif isinstance(norm, nn.LayerNorm):  # over the channels of each frame
            x = torch.nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        torch.ops.aten.gelu_(x)
    return x


def _mean_square(x, rows=2048):
    """The mean over dim 0 of x * x, (time, channels), a block of rows at a time in one small scratch
    tensor (torch's var over dim 0 of this layout runs on one thread, 60 ms on 10 s; the squares in one
    new tensor of x's size cost more in fresh pages than the arithmetic)."""
    total, scratch = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device), torch.empty_like(x[:rows])
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        total += torch.mul(block, block, out=scratch[:len(block)]).sum(0)
    return total / x.shape[0]


def _knows_front_end(encoder):
    """Whether _time_major_front_end computes this encoder's feature encoder: bias-free or biased
    convolutions, GroupNorm with one group per channel or LayerNorm, exact GELU (every released
    checkpoint of the four families)."""
    from transformers.activations import GELUActivation
    layers = getattr(getattr(encoder, "feature_extractor", None), "conv_layers", None)
    if layers is None:
        return False
    for layer in layers:
        norm, act = getattr(layer, "layer_norm", None), getattr(layer, "activation", None)
        if (not isinstance(getattr(layer, "conv", None), nn.Conv1d) or layer.conv.groups != 1
                or layer.conv.padding != (0,) or layer.conv.dilation != (1,)):
            return False
        if isinstance(norm, nn.GroupNorm) and (norm.num_groups != norm.num_channels or not norm.affine):
            return False
        if norm is not None and not isinstance(norm, (nn.GroupNorm, nn.LayerNorm)):
            return False
        if not ((isinstance(act, GELUActivation) and act.act is nn.functional.gelu)
                or (isinstance(act, nn.GELU) and act.approximate == "none")):
            return False
    return True


class _TimeMajorFeatureEncoder(nn.Module):
    """Stands in for an encoder's feature encoder (inference on a CPU): (batch, samples) -> (batch,
    channels, frames) as transformers' returns it, a transposed view of the time-major result, which
    the model transposes back without a copy."""

    def __init__(self, original):
        super().__init__()
        self.original = original

    def forward(self, input_values):
        x = torch.stack([_time_major_front_end(self.original, w) for w in input_values])
        return x.transpose(1, 2)


@contextlib.contextmanager
def _fast_front_end(encoder):
    """On a CPU, while the encoder runs frozen, its feature encoder is _time_major_front_end (within
    1e-5 of transformers' own, tests/test_speech_encoders.py); elsewhere, and for a front end that path
    does not know, transformers' own."""
    original = getattr(encoder, "feature_extractor", None)
    if next(encoder.parameters()).device.type != "cpu" or not _knows_front_end(encoder):
        yield
        return
    encoder.feature_extractor = _TimeMajorFeatureEncoder(original)
    try:
        yield
    finally:
        encoder.feature_extractor = original


def frames(speech, samples):
    """Encoder frames that `samples` of audio give (0: too short for the model)."""
    if speech.kind == "whisper":
        return math.ceil(samples / WHISPER_SAMPLES_PER_FRAME)
    return int(speech.encoder._get_feat_extract_output_lengths(torch.tensor(samples)))


def too_short(speech, samples):
    """Why `samples` of audio give the encoder nothing to read (shorter than one frame), or None."""
    if frames(speech, samples) < 1:
        return f"{samples} samples: too short for one frame of the {FAMILIES[speech.kind]} encoder"
    return None


def _whisper_window_sums(encoder, feature_extractor, windows):
    """Whisper over 30-s windows (numpy, each padded to 30 s by its feature extractor): per window, the
    sum over the frames that cover audio (the first ceil(samples / 320)) of every hidden state,
    (windows, layers + 1, hidden), and those frame counts. With gradients where the caller allows them."""
    device = next(encoder.parameters()).device
    features = feature_extractor(list(windows), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    states = torch.stack(encoder(features.to(device), output_hidden_states=True).hidden_states, 1)
    counts = torch.tensor([math.ceil(len(w) / WHISPER_SAMPLES_PER_FRAME) for w in windows], device=device)
    real = (torch.arange(states.shape[2], device=device)[None] < counts[:, None]).to(states.dtype)
    return (states * real[:, None, :, None]).sum(2), counts


def layer_means(speech, wav):
    """(layers + 1, hidden) float32 numpy: the mean over the frames of `wav` (16 kHz mono) of each hidden
    state, the embedding output first; `wav` alone (a batch of one of batch_layer_means), in fp32 and
    inference mode."""
    return batch_layer_means(speech, [wav])[0]


def batch_layer_means(speech, wavs):
    """layer_means of several utterances (16 kHz mono numpy) in one encoder batch: (N, layers + 1,
    hidden) float32 numpy, within 1e-5 of each alone (tests/test_speech_encoders.py), in fp32 and
    inference mode. Whisper reads 30-s windows (utils.audio_windows), all of the batch's in one encoder
    batch, and only the frames that cover audio count. Utterances of different lengths only where the
    family pads freely (SpeechModel.pads_freely); else a ValueError."""
    from mmser.vq_wav2vec import full_fp32_precision
    if len({len(w) for w in wavs}) > 1 and not speech.pads_freely:
        raise ValueError(f"the {FAMILIES[speech.kind]} encoder's hidden states change with padding: "
                         "it batches only utterances of equal length")
    short = too_short(speech, min(len(w) for w in wavs))
    if short:
        raise ValueError(short)
    device = next(speech.encoder.parameters()).device
    # fp32 on a GPU too: cuDNN's convolutions run in TF32 by default, which a cached feature would keep.
    with torch.inference_mode(), full_fp32_precision():
        if speech.kind == "whisper":
            wave = torch.zeros(len(wavs), max(len(w) for w in wavs))
            for b, w in enumerate(wavs):
                wave[b, :len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
            mask = (torch.arange(wave.shape[1])[None] < torch.tensor([len(w) for w in wavs])[:, None]).float()
            means = pooled_layers(speech.encoder, wave, mask, False, speech.feature_extractor)
        else:
            inputs = speech.feature_extractor(list(wavs), sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                              padding=True, return_attention_mask=True)
            # Without padding, no mask: the same hidden states, and WavLM's attention then skips merging
            # a padding mask into its position bias for every layer.
            padded = bool((inputs.attention_mask == 0).any())
            with _fast_front_end(speech.encoder):
                means = pooled_layers(speech.encoder, inputs.input_values.to(device), inputs.attention_mask.to(device),
                                      speech.takes_attention_mask and padded)
        return means.float().cpu().numpy()


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
    if whisper_features is not None:
        samples = wave_mask.sum(-1).long().tolist()
        per_utterance = [audio_windows(wave[b, :n].detach().float().cpu().numpy()) for b, n in enumerate(samples)]
        sums, counts = _whisper_window_sums(encoder, whisper_features, [w for ws in per_utterance for w in ws])
        owner = torch.repeat_interleave(torch.arange(len(samples), device=sums.device),
                                        torch.tensor([len(ws) for ws in per_utterance], device=sums.device))
        total = torch.zeros(len(samples), *sums.shape[1:], dtype=sums.dtype, device=sums.device).index_add(0, owner, sums)
        counted = torch.zeros(len(samples), dtype=sums.dtype, device=sums.device).index_add(0, owner, counts.to(sums.dtype))
        return total / counted.clamp(min=1)[:, None, None]
    with _quiet_wavlm_masks():
        out = encoder(wave, attention_mask=wave_mask if takes_attention_mask else None, output_hidden_states=True)
    states = torch.stack(out.hidden_states, 1)  # (B, layers + 1, frames, hidden)
    lengths = encoder._get_feat_extract_output_lengths(wave_mask.sum(-1)).clamp(min=1)
    real = (torch.arange(states.shape[2], device=states.device)[None] < lengths[:, None]).to(states.dtype)
    return (states * real[:, None, :, None]).sum(2) / lengths[:, None, None].to(states.dtype)


class SpeechLayerSum(nn.Module):
    """The speech branch over a transformers speech encoder: SUPERB's softmax-weighted sum of the
    (layers + 1) layer means, the weights starting equal. Frozen (default), it reads the cached layer
    means and holds no encoder; with --finetune-speech it runs `encoder` on the waveform batch (its
    convolutional feature encoder frozen) and mean-pools every hidden state over the real frames."""

    def __init__(self, layers, hidden_size, encoder=None, takes_attention_mask=False, whisper_features=None):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(layers))
        self.hidden_size, self.encoder, self.takes_attention_mask = hidden_size, encoder, takes_attention_mask
        self.whisper_features = whisper_features  # Whisper's feature extractor: log-mel windows per batch

    def layer_weights(self):
        return torch.softmax(self.layer_logits.float(), dim=0)

    def forward(self, layers=None, wave=None, wave_mask=None):
        """layers (B, layers + 1, hidden), or wave and wave_mask (B, samples) -> (B, hidden)."""
        if layers is None:
            layers = pooled_layers(self.encoder, wave, wave_mask, self.takes_attention_mask, self.whisper_features)
        return (self.layer_weights()[None, :, None] * layers.float()).sum(1)


def layer_sum_branch(speech_model, finetune=False, gradient_checkpointing=False):
    """The weighted layer sum over a transformers speech encoder: without the encoder when frozen
    (its layer means are cached), with it, its feature encoder frozen, when fine-tuned."""
    if not finetune:
        from transformers import AutoConfig
        speech_kind(speech_model)  # refuses what is not a speech encoder, saying what it is
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(speech_model))
        return SpeechLayerSum(config.num_hidden_layers + 1, config.hidden_size)
    speech = load_speech_model(speech_model)
    # As fine-tuning recipes do: the convolutional front end stays as pre-trained.
    if speech.kind == "whisper":
        speech.encoder.conv1.requires_grad_(False)
        speech.encoder.conv2.requires_grad_(False)
    else:
        speech.encoder.freeze_feature_encoder()
    # LayerDrop skips layers at random in training, and a skipped layer returns no hidden state, so
    # the weighted sum would not know which layer is which (Whisper's encoder reads its own copy).
    speech.encoder.config.layerdrop = 0.0
    if speech.kind == "whisper":
        speech.encoder.layerdrop = 0.0
    if gradient_checkpointing:
        speech.encoder.gradient_checkpointing_enable()
    return SpeechLayerSum(speech.layers, speech.hidden_size, speech.encoder, speech.takes_attention_mask,
                          speech.feature_extractor if speech.kind == "whisper" else None)
