"""Faster frozen inference of a transformers speech encoder, computing what transformers' own does.

The speech-layers extraction runs a frozen encoder over every utterance of a corpus. While it runs
(`faster(encoder)`), stand-ins take the place of parts of transformers' code, each within 1e-5 of it
(tests/test_speech_encoders.py), and all are put back afterwards:

  - On a CPU, the convolutional feature encoder (wav2vec 2.0, HuBERT, WavLM, data2vec-audio) runs in
    (frames, channels) layout, every convolution a few matrix products (vq_wav2vec.time_major_conv),
    with no layout copy and no per-length oneDNN kernel. The first two layers run together a block of
    frames at a time, so the first layer's output (64 MB on 10 s) is never written out whole, and a
    group norm in the first layer is folded into its weights: its per-channel mean and variance over
    the utterance are linear and quadratic in the convolution's weights, so they follow from the
    mean and the 10 x 10 covariance of the waveform's windows (in float64), without a pass over the
    layer's output.
  - On a CPU, the positional convolution (WavLM, HuBERT, wav2vec 2.0) as a channels-last 2-D
    convolution over the hidden states' own memory, its weight normalised once.
  - WavLM's attention without the attention weights it throws away: transformers 5 asks torch's
    multi-head attention for them on every call (need_weights=True), which makes torch write out
    every head's softmax and average them; transformers 4 asked only when the caller wanted
    attentions, and torch then runs scaled_dot_product_attention. The stand-in makes transformers
    4's call.

Each one's share, switched off alone in the extraction of 10-s WavLM-base utterances on 2 cores
(two workers, speech_encoders.layer_means_of_batches): the front end 12%, the attention 8%, the
positional convolution 2% of the time (docs/speed.md).
"""
import contextlib
import types

import torch
from torch import nn

# Second-layer frames computed per block of the first two layers: the first layer's block (1025 x 512
# fp32, 2 MB) stays in the core's cache between being written and being read.
BLOCK_FRAMES = 512


def knows_front_end(encoder):
    """Whether time_major_front_end computes this encoder's feature encoder: one input channel, bias-free
    or biased convolutions, a group norm with one group per channel in the first layer or a layer norm
    in any, exact GELU (every released checkpoint of the four families)."""
    layers = getattr(getattr(encoder, "feature_extractor", None), "conv_layers", None)
    if layers is None or len(layers) < 2 or getattr(layers[0].conv, "in_channels", None) != 1:
        return False
    for k, layer in enumerate(layers):
        norm, act = getattr(layer, "layer_norm", None), getattr(layer, "activation", None)
        if (not isinstance(getattr(layer, "conv", None), nn.Conv1d) or layer.conv.groups != 1
                or layer.conv.padding != (0,) or layer.conv.dilation != (1,)):
            return False
        if isinstance(norm, nn.GroupNorm) and (k > 0 or norm.num_groups != norm.num_channels or not norm.affine):
            return False
        if norm is not None and not isinstance(norm, (nn.GroupNorm, nn.LayerNorm)):
            return False
        if not _exact_gelu(act):
            return False
    return True


def _exact_gelu(act):
    from transformers.activations import GELUActivation
    return (isinstance(act, GELUActivation) and act.act is nn.functional.gelu) or \
        (isinstance(act, nn.GELU) and act.approximate == "none")


def _first_layer_product(layer, windows):
    """The first layer's convolution over `windows` (frames, kernel) of a one-channel input as one
    product: (weight (kernel, channels), bias (channels,)), its group norm, if any, folded in. The norm
    makes each channel c zero-mean, unit-variance over the utterance: with w_c its kernel and u the
    windows, the mean is w_c . mean(u) and the variance w_c' cov(u) w_c (the convolution's bias cancels)."""
    conv, norm = layer.conv, getattr(layer, "layer_norm", None)
    w = conv.weight.detach()[:, 0]
    if not isinstance(norm, nn.GroupNorm):
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(len(w), dtype=w.dtype, device=w.device)
        return w.t(), bias
    u = windows.double()
    mean = u.mean(0)
    centred = u - mean
    w64 = w.double()
    variance = ((w64 @ (centred.t() @ centred / len(u))) * w64).sum(1)
    scale = norm.weight.double() * torch.rsqrt(variance + norm.eps)
    return (w64 * scale[:, None]).t().float(), (norm.bias.double() - (w64 @ mean) * scale).float()


def _after_conv(layer, x, bias=True):
    """A layer's bias, layer norm and GELU on its convolution's output rows x (frames, channels), in x."""
    norm = getattr(layer, "layer_norm", None)
    if bias and layer.conv.bias is not None:
        x.add_(layer.conv.bias)
    if isinstance(norm, nn.LayerNorm):  # over the channels of each frame
        x.copy_(nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
    return torch.ops.aten.gelu_(x)


def time_major_front_end(feature_encoder, wav):
    """transformers' convolutional feature encoder over one utterance (1-D samples) in (frames, channels)
    layout, for the encoders knows_front_end accepts: the first two layers a block of BLOCK_FRAMES at a
    time, the rest one layer at a time into two buffers, the norms and activations in place."""
    from mmser.vq_wav2vec import time_major_conv
    layers = feature_encoder.conv_layers
    caches = feature_encoder.__dict__.setdefault("_time_major_weights", {})
    first, second = layers[0], layers[1]
    windows = wav.unfold(0, first.conv.kernel_size[0], first.conv.stride[0])  # (frames, kernel), a view
    weight, bias = _first_layer_product(first, windows)
    kernel, stride = second.conv.kernel_size[0], second.conv.stride[0]
    frames = (len(windows) - kernel) // stride + 1
    x = torch.empty(frames, second.conv.out_channels, dtype=wav.dtype, device=wav.device)
    block = torch.empty((BLOCK_FRAMES - 1) * stride + kernel, len(bias), dtype=wav.dtype, device=wav.device)
    for start in range(0, frames, BLOCK_FRAMES):
        end = min(start + BLOCK_FRAMES, frames)
        rows = windows[start * stride:(end - 1) * stride + kernel]
        y = _after_conv(first, torch.addmm(bias, rows, weight, out=block[:len(rows)]), bias=False)
        _after_conv(second, time_major_conv(y, second.conv.weight, stride, caches.setdefault(1, {}), x[start:end]))
    buffers = [None, None]
    for k, layer in enumerate(layers[2:], 2):
        conv = layer.conv
        frames = (x.shape[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        buffer = buffers[k % 2]
        if buffer is None or buffer.numel() < frames * conv.out_channels:
            buffer = buffers[k % 2] = torch.empty(frames * conv.out_channels, dtype=x.dtype, device=x.device)
        out = buffer[:frames * conv.out_channels].view(frames, conv.out_channels)
        x = _after_conv(layer, time_major_conv(x, conv.weight, conv.stride[0], caches.setdefault(k, {}), out))
    return x


class _TimeMajorFeatureEncoder(nn.Module):
    """Stands in for an encoder's feature encoder (inference on a CPU): (batch, samples) -> (batch,
    channels, frames) as transformers' returns it, a transposed view of the time-major result, which
    the model transposes back without a copy."""

    def __init__(self, original):
        super().__init__()
        self.original = original

    def forward(self, input_values):
        x = torch.stack([time_major_front_end(self.original, w) for w in input_values])
        return x.transpose(1, 2)


class _ChannelsLastPositionalConv(nn.Module):
    """Stands in for the positional convolution of WavLM, HuBERT and wav2vec 2.0 (frozen, on a CPU): the
    same grouped convolution, its weight normalised once instead of on every call, run by oneDNN as a
    2-D convolution over a (batch, channels, 1, frames) view of the (batch, frames, channels) hidden
    states, whose memory is already channels-last, so no copy goes in or comes out (WavLM-base over
    10 s: 44 ms against 57 on one thread)."""

    def __init__(self, original):
        super().__init__()
        conv = original.conv
        # kept on the original for as long as its parameters (the weight norm's two) are unchanged
        key = tuple((p.data_ptr(), p._version) for p in conv.parameters())
        kept = original.__dict__.get("_channels_last_weight")
        if kept is None or kept[0] != key:
            kept = original.__dict__["_channels_last_weight"] = (
                key, conv.weight.detach()[:, :, None, :].contiguous(memory_format=torch.channels_last))
        self.weight = kept[1]
        self.bias, self.groups, self.pad = conv.bias.detach(), conv.groups, conv.padding[0]
        self.remove = original.padding.num_pad_remove

    def forward(self, hidden_states):
        x = hidden_states.transpose(1, 2)[:, :, None, :].contiguous(memory_format=torch.channels_last)
        y = nn.functional.conv2d(x, self.weight, self.bias, padding=(0, self.pad), groups=self.groups)
        y = y[:, :, 0, :y.shape[-1] - self.remove].transpose(1, 2)
        return nn.functional.gelu(y)


def _positional_conv(encoder):
    """The encoder's positional convolution where _ChannelsLastPositionalConv computes it, else None."""
    module = getattr(getattr(encoder, "encoder", None), "pos_conv_embed", None)
    conv = getattr(module, "conv", None)
    if (not isinstance(conv, nn.Conv1d) or getattr(module, "batch_norm", None) is not None
            or not isinstance(getattr(getattr(module, "padding", None), "num_pad_remove", None), int)
            or not _exact_gelu(getattr(module, "activation", None)) or conv.bias is None
            or conv.stride != (1,) or conv.dilation != (1,) or conv.padding != (conv.kernel_size[0] // 2,)):
        return None
    return module


def _attention_without_weights(self, hidden_states, attention_mask, gated_position_bias, *_):
    """WavLMAttention.torch_multi_head_self_attention as transformers 4 calls torch when attentions are
    not asked for: the same arguments, need_weights=False; (output, None). The padding mask goes in as
    the float mask torch would make of it (0, -inf), which spares torch's warning about mixing a
    boolean and a float mask and so any filtering of warnings, which is not safe across threads."""
    query = hidden_states.transpose(0, 1)
    padding = None
    if attention_mask is not None:  # as torch turns transformers' boolean mask into one like the float bias
        padding = torch.zeros(attention_mask.shape, dtype=gated_position_bias.dtype, device=query.device)
        padding.masked_fill_(attention_mask.ne(1), float("-inf"))
    output, _ = nn.functional.multi_head_attention_forward(
        query, query, query, self.embed_dim, self.num_heads, torch.empty([0]),
        torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)), None, None, False, self.dropout,
        self.out_proj.weight, self.out_proj.bias, self.training, padding, need_weights=False,
        attn_mask=gated_position_bias, use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight,
        k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight)
    return output.transpose(0, 1), None


def _wavlm_attentions(encoder):
    return [m for m in encoder.modules()
            if type(m).__name__ == "WavLMAttention" and hasattr(m, "torch_multi_head_self_attention")]


@contextlib.contextmanager
def faster(encoder):
    """While a frozen encoder runs: on a CPU, its feature encoder time-major (where knows_front_end) and
    its positional convolution channels-last (where _positional_conv finds one it computes); on any
    device, WavLM's attention without the discarded weights. Put back on the way out."""
    on_cpu = next(encoder.parameters()).device.type == "cpu"
    front_end = getattr(encoder, "feature_extractor", None)
    swap_front_end = on_cpu and knows_front_end(encoder)
    positional = _positional_conv(encoder) if on_cpu else None
    attentions = _wavlm_attentions(encoder)
    if swap_front_end:
        encoder.feature_extractor = _TimeMajorFeatureEncoder(front_end)
    if positional is not None:
        encoder.encoder.pos_conv_embed = _ChannelsLastPositionalConv(positional)
    for attention in attentions:
        attention.torch_multi_head_self_attention = types.MethodType(_attention_without_weights, attention)
    try:
        yield
    finally:
        for attention in attentions:
            del attention.torch_multi_head_self_attention
        if positional is not None:
            encoder.encoder.pos_conv_embed = positional
        if swap_front_end:
            encoder.feature_extractor = front_end
