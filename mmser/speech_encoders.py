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
                                 equal lengths only for the others; faster than transformers' own
                                 code and within 1e-5 of it (encoder_speedups.faster)
  frames(speech, samples), too_short(speech, samples)   the encoder frames of so many samples; why none
  pooled_layers(...)             the same over a padded batch, with gradients (--finetune-speech;
                                 Whisper: every utterance's windows in one encoder batch)
  SpeechLayerSum                 the speech branch over them: a learned softmax-weighted sum of the layers
  layer_sum_branch(model, ...)   that branch, with the encoder when fine-tuned
The frozen way (SUPERB's) stores layer_means per labelled utterance (the layers route's step); the
model learns a softmax-weighted sum over the layers. transformers is imported by the functions that
use it; the speech routes import this module only when they run an encoder.
"""
import collections
import contextlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmser import encoder_speedups
from mmser.data_contract import SAMPLE_RATE
from mmser.models_dir import missing_path
from mmser.utils import audio_windows, quiet_transformers, torch_threads

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
    user's, which the user cannot act on. Only that warning is silenced, and only while the encoder
    trains (--finetune-speech); the frozen extraction's attention (encoder_speedups) makes no such mix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask",
                                category=UserWarning)
        yield


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
    # fp32 on a GPU too: cuDNN's convolutions run in TF32 by default, which a cached feature would keep.
    with full_fp32_precision(), encoder_speedups.faster(speech.encoder):
        return _batch_means(speech, wavs)


def extraction_workers(speech):
    """How many batches layer_means_of_batches runs at once: on a CPU, one per torch thread; else one."""
    return torch.get_num_threads() if next(speech.encoder.parameters()).device.type == "cpu" else 1


def layer_means_of_batches(speech, batches, workers=1):
    """batch_layer_means over `batches`, an iterable of (key, waveforms) read as it goes: (key, means)
    pairs in the same order. With workers > 1 (a CPU: extraction_workers), as many batches run at once,
    each on a thread of its own with one torch thread, instead of one batch at a time on all of them:
    between an utterance's products run its norms, softmaxes and copies, which keep several threads
    less busy than the products do (WavLM-base on 2 cores: 3% to 10% faster on 10-s utterances, more
    on IEMOCAP's shorter ones; docs/speed.md). At most 2 x workers batches are read ahead."""
    from mmser.vq_wav2vec import full_fp32_precision
    if workers <= 1:
        for key, wavs in batches:
            yield key, batch_layer_means(speech, wavs)
        return
    with full_fp32_precision(), encoder_speedups.faster(speech.encoder), torch_threads(1), \
            ThreadPoolExecutor(workers) as pool:
        running = collections.deque()
        for key, wavs in batches:
            running.append((key, pool.submit(_batch_means, speech, wavs)))
            if len(running) >= 2 * workers:
                key, done = running.popleft()
                yield key, done.result()
        while running:
            key, done = running.popleft()
            yield key, done.result()


def _batch_means(speech, wavs):
    """batch_layer_means inside its precision and encoder settings (entered once by the caller)."""
    if len({len(w) for w in wavs}) > 1 and not speech.pads_freely:
        raise ValueError(f"the {FAMILIES[speech.kind]} encoder's hidden states change with padding: "
                         "it batches only utterances of equal length")
    short = too_short(speech, min(len(w) for w in wavs))
    if short:
        raise ValueError(short)
    device = next(speech.encoder.parameters()).device
    with torch.inference_mode():
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
    out = encoder(wave, attention_mask=wave_mask if takes_attention_mask else None, output_hidden_states=True)
    first = out.hidden_states[0]  # each (B, frames, hidden)
    lengths = encoder._get_feat_extract_output_lengths(wave_mask.sum(-1)).clamp(min=1)
    real = (torch.arange(first.shape[1], device=first.device)[None] < lengths[:, None]).to(first.dtype)
    # each hidden state read once: its real frames summed by a (1, frames) product, not a masked copy
    sums = torch.stack([torch.bmm(real[:, None], h)[:, 0] for h in out.hidden_states], 1)
    return sums / lengths[:, None, None].to(first.dtype)


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
            with _quiet_wavlm_masks():
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
