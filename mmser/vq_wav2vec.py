"""vq-wav2vec (k-means) in plain PyTorch: the conv feature extractor and the k-means quantizer under
fairseq's own key names, and its codes (frames, 2) for a waveform, equal to fairseq's.

  VqWav2Vec(args).codes(wav)   -> (frames, 2) int64 k-means code indices (args: the checkpoint's own)
  parse_conv_spec(spec)        fairseq's conv layer spec, evaluated without eval
  full_fp32_precision()        TF32 off where the codes' nearest-centroid choice needs full fp32
  plain_cpu_convolutions()     the plain torch convolutions instead of the time-major CPU path (benchmarks)
  time_major_conv(...)         a conv1d of one utterance in (time, channels) layout as matrix products
                               (also the CPU path of the transformers speech encoders' front end)
The checkpoint file is read by mmser.fairseq_checkpoints.load_vq_wav2vec, which builds this model from
its args and names the file in any error; a spec or width this model cannot build is a ValueError.
"""
import ast
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

def parse_conv_spec(spec):
    """Evaluate fairseq's conv layer spec, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 3", safely.

    Only literal numbers, lists and tuples combined with `+` and `*` are accepted (fairseq itself
    calls eval on this string); the result is a list of (channels, kernel, stride) int tuples.
    """
    max_items = 10_000

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                if type(left) is type(right) and isinstance(left, (list, tuple)):
                    return left + right
                if type(left) is int and type(right) is int:
                    return left + right
            else:
                if isinstance(left, int) and isinstance(right, (list, tuple)):
                    left, right = right, left
                if isinstance(left, (list, tuple)) and type(right) is int:
                    if len(left) * max(right, 0) > max_items:
                        raise ValueError(f"conv spec {spec!r} is implausibly long")
                    return left * right
                if type(left) is int and type(right) is int:
                    return left * right
            raise ValueError(f"conv spec {spec!r}: cannot combine {type(left).__name__} and "
                             f"{type(right).__name__}")
        raise ValueError(f"conv spec {spec!r}: only literal lists/tuples of numbers with + and * "
                         f"are allowed, found {type(node).__name__}")

    try:
        tree = ast.parse(str(spec), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"conv spec {spec!r} is not a Python literal expression: {e.msg}") from None
    layers = value(tree.body)
    if not isinstance(layers, list) or not layers or not all(
            isinstance(layer, tuple) and len(layer) == 3 and all(type(v) is int and v > 0 for v in layer)
            for layer in layers):
        raise ValueError(f"conv spec {spec!r} is not a non-empty list of (channels, kernel, stride)")
    return layers


# ---------------------------------------------------------------------------------------------
# vq-wav2vec (k-means): conv feature extractor + k-means quantizer, fairseq's key names


def time_major_conv(x, weight, stride, cache, out):
    """A bias-free conv1d of one utterance in (time, channels) layout, written into `out`
    ((frames, out channels), contiguous). A kernel of r strides is r matrix products over blocks of
    `stride` time steps: in this layout a block is a plain view of the input (no im2col copy), the
    products accumulate in place (addmm) and are large enough to run at the matmul peak; a layer
    with few inputs per frame (the first: one channel, kernel 10) is one product over its unfolded
    windows; a kernel that is no multiple of its stride (wav2vec 2.0's 3 over 2) is one product per
    tap, over a strided view of the input (measured at 512 channels on 10 s: 76 ms, against 95 for
    the kernel padded to 4 and 163 for oneDNN's conv1d). `cache` keeps the reshaped weights for as
    long as the weight is unchanged."""
    channels_out, channels_in, kernel = weight.shape
    frames = (x.shape[0] - kernel) // stride + 1
    key = (weight.data_ptr(), weight._version, x.dtype)
    entry = cache.get("entry")  # one tuple, replaced whole: safe for threads that share the cache
    if entry is None or entry[0] != key:
        w = weight.detach().to(x.dtype)
        if channels_in * kernel <= 64:
            mode, blocks = "unfold", [w.reshape(channels_out, channels_in * kernel).t().contiguous()]
        elif kernel % stride:  # tap j multiplies time step i * stride + j
            mode, blocks = "taps", [w[:, :, j].t().contiguous() for j in range(kernel)]
        else:  # weight[:, :, j*stride + s] multiplies time step s of block j: (stride, in) rows per block
            mode, blocks = "blocks", [b.reshape(channels_out, stride * channels_in).t().contiguous() for b in
                                      w.reshape(channels_out, channels_in, kernel // stride, stride).permute(2, 0, 3, 1)]
        entry = cache["entry"] = (key, mode, blocks)
    _, mode, blocks = entry
    if mode == "unfold":
        windows = x.unfold(0, kernel, stride)  # (frames, channels_in, kernel)
        return torch.mm(windows.reshape(frames, channels_in * kernel), blocks[0], out=out)
    if mode == "taps":
        span = (frames - 1) * stride + 1
        torch.mm(x[:span:stride], blocks[0], out=out)
        for j, w in enumerate(blocks[1:], 1):
            torch.addmm(out, x[j:j + span:stride], w, out=out)
        return out
    x = x[:(frames + len(blocks) - 1) * stride].reshape(frames + len(blocks) - 1, stride * channels_in)
    torch.mm(x[:frames], blocks[0], out=out)
    for j, w in enumerate(blocks[1:], 1):
        torch.addmm(out, x[j:j + frames], w, out=out)
    return out


class ConvFeatureExtractor(nn.Module):
    """fairseq's wav2vec ConvFeatureExtractionModel: conv (no bias), dropout, one-group norm over
    channels and time, activation; optional scaled skip connections and log compression.

    On the CPU it runs in (batch, time, channels) layout (time_major), where every layer is a few
    large matrix products and no copy between layers (profiled on a 10-s utterance: the layout
    changes and the first layer's unbatched convolution had taken a fifth of the time); on a GPU
    cuDNN's convolutions in fairseq's own layout."""

    def __init__(self, conv_layers, activation="relu", log_compression=False, skip_connections=False,
                 residual_scale=0.5, affine_group_norm=True):
        super().__init__()
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
        self.conv_layers = nn.ModuleList()
        in_channels = 1
        for channels, kernel, stride in conv_layers:
            # The dropout slot keeps fairseq's module indices (0 conv, 2 norm) for the key names.
            self.conv_layers.append(nn.Sequential(
                nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=False),
                nn.Dropout(0.0),
                nn.GroupNorm(1, channels, affine=affine_group_norm),
                act(),
            ))
            in_channels = channels
        self.log_compression = log_compression
        self.skip_connections = skip_connections
        self.residual_scale = math.sqrt(residual_scale)
        self._weights = [{} for _ in conv_layers]  # time_major's reshaped weights, per layer
        # The shortest input that yields one frame (465 samples for vq-wav2vec).
        self.min_samples = 1
        for _, kernel, stride in reversed(conv_layers):
            self.min_samples = (self.min_samples - 1) * stride + kernel

    def forward(self, wav):
        """(batch, samples) -> (batch, channels, frames), fairseq's `z`."""
        if wav.device.type == "cpu":
            return self.time_major(wav).transpose(1, 2)
        x = wav.unsqueeze(1)  # (batch, samples) -> (batch, 1, samples)
        for conv, dropout, norm, act in self.conv_layers:
            residual = x
            x = act(norm(dropout(F.conv1d(x, conv.weight, stride=conv.stride[0]))))
            if self.skip_connections and x.size(1) == residual.size(1):
                frames, residual_frames = x.size(2), residual.size(2)
                residual = residual[..., :: residual_frames // frames][..., :frames]
                x = (x + residual) * self.residual_scale
        if self.log_compression:
            x = (x.abs() + 1).log()
        return x

    def time_major(self, wav):
        """(batch, samples) -> (batch, frames, channels): forward's `z` in time-major layout, one
        utterance at a time (the first layer's norm spans the clip)."""
        return torch.stack([self._time_major(w) for w in wav]) if len(wav) > 1 else self._time_major(wav[0])[None]

    def _time_major(self, wav):
        # Every step after each convolution works in place, and the layers write into two buffers
        # in turn: a new tensor of the first layer's size costs more in fresh pages than the
        # arithmetic on it (measured: 40 ms for a new 10-s gelu output, 7 ms in place).
        x, buffers = wav[:, None], [None, None]
        for k, ((conv, _, norm, act), cache) in enumerate(zip(self.conv_layers, self._weights)):
            channels, kernel, stride = conv.out_channels, conv.kernel_size[0], conv.stride[0]
            frames = (x.shape[0] - kernel) // stride + 1
            buffer = buffers[k % 2]
            if buffer is None or buffer.numel() < frames * channels:
                buffer = buffers[k % 2] = torch.empty(frames * channels, dtype=x.dtype, device=x.device)
            residual, x = x, time_major_conv(x, conv.weight, stride, cache, buffer[:frames * channels].view(frames, channels))
            # GroupNorm(1, C): one mean and variance over the whole clip, then a per-channel affine,
            # folded into one scale and shift per channel.
            mean, var = x.mean(), x.var(unbiased=False)
            scale = torch.rsqrt(var + norm.eps)
            if norm.affine:
                scale = scale * norm.weight
                x.mul_(scale).add_(norm.bias - mean * scale)
            else:
                x.sub_(mean).mul_(scale)
            if isinstance(act, nn.GELU):
                torch.ops.aten.gelu_(x)
            else:
                x.relu_()
            if self.skip_connections and x.size(1) == residual.size(1):
                residual = residual[:: residual.size(0) // frames][:frames]
                x.add_(residual).mul_(self.residual_scale)
        if self.log_compression:
            x = x.abs_().add_(1).log_()
        return x


class KMeansVectorQuantizer(nn.Module):
    """fairseq's KMeansVectorQuantizer, inference only: project, then per group the nearest codeword."""

    def __init__(self, dim, num_vars, groups, combine_groups):
        super().__init__()
        if dim % groups:
            raise ValueError(f"quantizer width {dim} is not divisible by {groups} groups")
        self.num_vars, self.groups, self.var_dim = num_vars, groups, dim // groups
        self.embedding = nn.Parameter(torch.zeros(num_vars, 1 if combine_groups else groups, self.var_dim))
        self.projection = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size=1, groups=groups, bias=False),
            nn.GroupNorm(groups, dim),
        )

    def project(self, z):
        """(batch, dim, frames) features -> (batch, frames, groups, var_dim) vectors to quantize."""
        return self.project_time_major(z.transpose(1, 2))

    def project_time_major(self, z):
        """(batch, frames, dim) features -> (batch, frames, groups, var_dim): the grouped 1x1
        convolution as one product per group, then GroupNorm(groups, dim) over each group's
        channels and frames."""
        conv, norm = self.projection
        batch, frames, _ = z.shape
        groups, var_dim = self.groups, self.var_dim
        weight = conv.weight.view(groups, var_dim, var_dim)  # (group, out, in)
        z = z.reshape(batch, frames, groups, var_dim)
        y = torch.stack([z[:, :, g] @ weight[g].t() for g in range(groups)], dim=2)
        var, mean = torch.var_mean(y, dim=(1, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(var + norm.eps) * norm.weight.view(groups, var_dim)
        return torch.addcmul(norm.bias.view(groups, var_dim) - mean * scale, y, scale)

    def nearest(self, ze):
        """(batch, frames, groups, var_dim) -> (batch, frames, groups) index of the nearest codeword.

        As fairseq: the least norm of the difference, |a - b| (not |a|^2 - 2ab + |b|^2, whose
        rounding flips near ties). That form is computed only for the codewords that can be
        nearest: the expanded form, one matrix product, finds them with a margin a thousand times
        its rounding error; fairseq's own norm then decides among them (it was 12% of codes()'s
        time for all 320 codewords)."""
        batch, frames, groups, dim = ze.shape
        codebook = self.embedding.expand(self.num_vars, groups, dim)
        idx = []
        for g in range(groups):
            a, b = ze[:, :, g].reshape(batch * frames, dim), codebook[:, g]
            a2, b2 = (a * a).sum(1, keepdim=True), (b * b).sum(1)
            approx = torch.addmm(a2 + b2, a, b.t(), alpha=-2)
            margin = 1e-3 * (a2 + b2.max())
            rows, cols = (approx <= approx.min(1, keepdim=True).values + margin).nonzero(as_tuple=True)
            exact = torch.full_like(approx, float("inf"))
            exact[rows, cols] = (a[rows] - b[cols]).norm(dim=-1)
            idx.append(exact.argmin(dim=1).view(batch, frames))  # the first of equal minima, as fairseq's
        return torch.stack(idx, dim=-1)

    def forward_idx(self, z):
        """(batch, dim, frames) features -> (batch, frames, groups) code indices."""
        return self.nearest(self.project(z))


@contextlib.contextmanager
def full_fp32_precision():
    """TF32 matmuls/convs on CUDA would move features enough to flip near-tie codes.

    Through the per-operator `fp32_precision` settings where torch has them (2.9+): they read and
    write whatever API the process used before, while the legacy readers
    (`get_float32_matmul_precision`, `allow_tf32`) raise on torch 2.11 once anything in the process
    (transformers' enable_tf32, a user) has used the new settings. Older torch: the legacy flags."""
    if not torch.cuda.is_available():
        yield
        return
    backends = torch.backends
    if hasattr(backends.cudnn, "conv"):  # torch >= 2.9
        ops = (backends.cuda.matmul, backends.cudnn.conv)
        saved = [op.fp32_precision for op in ops]
        try:
            for op in ops:
                op.fp32_precision = "ieee"
            yield
        finally:
            for op, value in zip(ops, saved):
                op.fp32_precision = value
        return
    matmul = backends.cuda.matmul.allow_tf32
    backends.cuda.matmul.allow_tf32 = False
    try:
        with backends.cudnn.flags(enabled=backends.cudnn.enabled, benchmark=backends.cudnn.benchmark,
                                  deterministic=backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        backends.cuda.matmul.allow_tf32 = matmul


@contextlib.contextmanager
def plain_cpu_convolutions(device):
    """oneDNN compiles (and keeps, up to 1024) a convolution for every new input length: over a
    corpus of utterances of every length, tokenization then spends most of its time compiling and
    its memory grows with the number of utterances (measured at the real size: 100 utterances of
    different lengths took 44 s and +1.6 GB with oneDNN, 12 s and +85 MB without)."""
    if device.type != "cpu":
        yield
        return
    mkldnn = torch.backends.mkldnn
    with mkldnn.flags(enabled=False, deterministic=mkldnn.deterministic, allow_tf32=mkldnn.allow_tf32):
        yield


class VqWav2Vec(nn.Module):
    """The parts of a vq-wav2vec k-means model that turn a waveform into discrete codes."""

    def __init__(self, args):
        super().__init__()
        conv_layers = parse_conv_spec(args.conv_feature_layers)
        dim = conv_layers[-1][0]
        vq_dim = getattr(args, "vq_dim", 0) or dim
        if vq_dim != dim:
            raise ValueError(f"vq_dim {vq_dim} differs from the feature width {dim}; unsupported")
        self.feature_extractor = ConvFeatureExtractor(
            conv_layers,
            activation=getattr(args, "activation", "relu"),
            log_compression=getattr(args, "log_compression", False),
            skip_connections=getattr(args, "skip_connections_feat", False),
            residual_scale=getattr(args, "residual_scale", 0.5),
            affine_group_norm=not getattr(args, "non_affine_group_norm", False),
        )
        self.vector_quantizer = KMeansVectorQuantizer(
            dim, args.vq_vars, args.vq_groups, getattr(args, "combine_groups", False))

    @property
    def min_samples(self):
        return self.feature_extractor.min_samples

    def _as_batch(self, wav):
        wav = torch.as_tensor(np.asarray(wav, dtype=np.float32) if not torch.is_tensor(wav) else wav)
        if wav.dim() != 1:
            raise ValueError(f"expected a 1-D waveform, got shape {tuple(wav.shape)}")
        device = self.vector_quantizer.embedding.device
        return wav.to(device=device, dtype=torch.float32)[None]

    @torch.inference_mode()
    def features(self, wav):
        """1-D 16 kHz waveform -> (channels, frames) float32 conv features (fairseq's `z`)."""
        wav = self._as_batch(wav)
        with full_fp32_precision():
            return self.feature_extractor(wav)[0].contiguous()

    @torch.inference_mode()
    def codes(self, wav):
        """1-D float32 16 kHz waveform -> (frames, groups) int64 code indices on the CPU.

        One utterance at a time: the first layer's norm spans the clip, so padding would change
        the codes. Fewer than `min_samples` samples give zero frames.
        """
        wav = self._as_batch(wav)
        if wav.shape[1] < self.min_samples:
            return torch.zeros((0, self.vector_quantizer.groups), dtype=torch.int64)
        # oneDNN keeps a compiled conv per distinct input length (up to 1024 of them), so over a
        # corpus of utterances of every length the CPU memory would grow with the corpus size.
        with full_fp32_precision(), plain_cpu_convolutions(wav.device):
            if wav.device.type == "cpu":
                z = self.feature_extractor.time_major(wav)
            else:
                z = self.feature_extractor(wav).transpose(1, 2)
            return self.vector_quantizer.nearest(self.vector_quantizer.project_time_major(z))[0].cpu()
