"""fairseq checkpoints without fairseq: safe unpickling, vq-wav2vec, the dictionary, RoBERTa.

fairseq does not import on Python 3.11+ and its loaders break on torch 2.6+, so its files load here
with plain PyTorch and transformers, each checked against outputs fairseq itself produced
(tests/test_fairseq_loading.py):
  safe_torch_load(path)              -> checkpoint dict, never running code from the file
  load_vq_wav2vec(path).codes(wav)   -> (frames, 2) int64 k-means code indices
  load_speech_dictionary(path)       -> fairseq-compatible Dictionary (encode_line)
  load_fairseq_roberta(path)         -> transformers.RobertaModel in eval mode
  codes_to_string(codes)             -> the line the speech dictionary encodes
A file that is not what a loader expects raises CheckpointError, naming the file.
As transformers keeps its fairseq converters apart from its models, this module is imported by the
stages that need it (feature_ext.py, model_structure.py, predict.py, tiny_models.py) and by nothing else.
"""
import argparse
import ast
import collections
import contextlib
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import RobertaConfig, RobertaModel


class CheckpointError(ValueError):
    """A checkpoint (or dictionary) that is not what its loader expects; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Loading checkpoints without running code from them


class FairseqPlaceholder:
    """Stands in for any fairseq class found in an old checkpoint (e.g. fairseq.meters.TimeMeter).

    It accepts whatever the pickle hands it and keeps the state as plain data; it has no
    behaviour, so nothing the file names can run.
    """

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __repr__(self):
        return f"<placeholder for {type(self).__qualname__}>"


def _allowed_legacy_globals():
    try:
        from numpy._core.multiarray import scalar as numpy_scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar as numpy_scalar
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): argparse.Namespace,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
    }
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool"):
        allowed[("torch", name)] = getattr(torch, name)
    # fairseq 0.9 meters may hold numpy floats; rebuilding a numpy scalar or dtype runs no code.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = numpy_scalar
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for fairseq 0.9 checkpoints: fairseq classes become inert placeholders,
    tensors and plain containers load, every other global is refused."""

    _allowed = None
    _placeholders = {}

    def find_class(self, module, name):
        if module == "fairseq" or module.startswith("fairseq."):
            key = (module, name)
            if key not in self._placeholders:
                self._placeholders[key] = type(name, (FairseqPlaceholder,), {"__qualname__": f"{module}.{name}"})
            return self._placeholders[key]
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_legacy_globals()
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: not a tensor, a plain container or a "
                f"fairseq class, so the checkpoint may try to run code") from None


class _restricted_pickle_module:
    """What torch.load needs of a pickle module, with every load going through the restrictions."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def safe_torch_load(path, map_location="cpu"):
    """Load a PyTorch/fairseq checkpoint without ever executing code stored in it.

    First torch's own weights-only loader (with argparse.Namespace allowed, which fairseq uses for
    `args`); files written by fairseq 0.9 also pickle `fairseq.meters` objects and need the
    restricted unpickler, which turns fairseq classes into placeholders and refuses anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    # What torch's weights-only unpickler raises on a file that is no plain checkpoint: a refused
    # global (fairseq 0.9's meters), or garbage (a text file gives KeyError, a truncated one EOFError).
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as weights_only_error:
        first_error = weights_only_error
    try:
        # Not weights_only: only what _RestrictedUnpickler admits is unpickled.
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle_module)
    except pickle.UnpicklingError as e:  # a global refused by the restricted unpickler, or no pickle at all
        raise CheckpointError(f"{path}: {e}") from None
    except (RuntimeError, EOFError) as e:  # a truncated zip or pickle: what torch.load raises for them
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e}; the weights-only "
                              f"load said: {first_error})") from None


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
                        raise CheckpointError(f"conv spec {spec!r} is implausibly long")
                    return left * right
                if type(left) is int and type(right) is int:
                    return left * right
            raise CheckpointError(f"conv spec {spec!r}: cannot combine {type(left).__name__} and "
                             f"{type(right).__name__}")
        raise CheckpointError(f"conv spec {spec!r}: only literal lists/tuples of numbers with + and * "
                         f"are allowed, found {type(node).__name__}")

    try:
        tree = ast.parse(str(spec), mode="eval")
    except SyntaxError as e:
        raise CheckpointError(f"conv spec {spec!r} is not a Python literal expression: {e.msg}") from None
    layers = value(tree.body)
    if not isinstance(layers, list) or not layers or not all(
            isinstance(layer, tuple) and len(layer) == 3 and all(type(v) is int and v > 0 for v in layer)
            for layer in layers):
        raise CheckpointError(f"conv spec {spec!r} is not a non-empty list of (channels, kernel, stride)")
    return layers


# ---------------------------------------------------------------------------------------------
# vq-wav2vec (k-means): conv feature extractor + k-means quantizer, fairseq's key names


def _time_major_conv(x, weight, stride, cache, out):
    """A bias-free conv1d of one utterance in (time, channels) layout, written into `out`
    ((frames, out channels), contiguous). A kernel of r strides is r matrix products over blocks of
    `stride` time steps: in this layout a block is a plain view of the input (no im2col copy), the
    products accumulate in place (addmm) and are large enough to run at the matmul peak; a layer
    with few inputs per frame (the first: one channel, kernel 10) is one product over its unfolded
    windows. A kernel that is no multiple of its stride goes through F.conv1d. `cache` keeps the
    reshaped weights for as long as the weight is unchanged."""
    channels_out, channels_in, kernel = weight.shape
    frames = (x.shape[0] - kernel) // stride + 1
    key = (weight.data_ptr(), weight._version, x.dtype)
    if cache.get("key") != key:
        w = weight.detach().to(x.dtype)
        if kernel % stride:
            blocks = None
        elif channels_in * kernel <= 64:
            blocks = [w.reshape(channels_out, channels_in * kernel).t().contiguous()]
        else:  # weight[:, :, j*stride + s] multiplies time step s of block j: (stride, in) rows per block
            blocks = [b.reshape(channels_out, stride * channels_in).t().contiguous()
                      for b in w.reshape(channels_out, channels_in, kernel // stride, stride).permute(2, 0, 3, 1)]
        cache.update(key=key, blocks=blocks)
    blocks = cache["blocks"]
    if blocks is None:
        return out.copy_(F.conv1d(x.t()[None], weight, stride=stride)[0].t())
    if len(blocks) == 1 and channels_in * kernel <= 64:
        windows = x.unfold(0, kernel, stride)  # (frames, channels_in, kernel)
        return torch.mm(windows.reshape(frames, channels_in * kernel), blocks[0], out=out)
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
            residual, x = x, _time_major_conv(x, conv.weight, stride, cache, buffer[:frames * channels].view(frames, channels))
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
            raise CheckpointError(f"quantizer width {dim} is not divisible by {groups} groups")
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
            raise CheckpointError(f"vq_dim {vq_dim} differs from the feature width {dim}; unsupported")
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


def codes_to_string(codes):
    """(frames, 2) codes -> the line the speech dictionary encodes: "<s> g0-g1 g0-g1 ..."."""
    return " ".join(["<s>"] + ["-".join(str(int(c)) for c in frame) for frame in codes])


def _checkpoint_args(ckpt, path):
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    args = ckpt.get("args")
    if args is None and isinstance(ckpt.get("cfg"), dict):
        args = argparse.Namespace(**(ckpt["cfg"].get("model") or {}))
    if args is None:
        raise CheckpointError(f"{path}: fairseq checkpoint without 'args'; cannot tell how to build it")
    return args


def _describe_non_kmeans(args, keys):
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    if any(".sentence_encoder." in k for k in keys) or arch and "roberta" in str(arch):
        return "a RoBERTa / masked-LM checkpoint (load it with load_fairseq_roberta)"
    if arch and "wav2vec2" in str(arch) or any(k.startswith(("quantizer.", "encoder.pos_conv")) for k in keys):
        return "a wav2vec 2.0 checkpoint"
    if arch != "wav2vec":
        return f"a checkpoint of architecture {arch!r}"
    vq_type = getattr(args, "vq_type", "none")
    if vq_type == "gumbel" or "vector_quantizer.vars" in keys:
        return "a gumbel-softmax vq-wav2vec checkpoint"
    if vq_type != "kmeans" or "vector_quantizer.embedding" not in keys:
        return f"a wav2vec checkpoint without a k-means quantizer (vq_type={vq_type!r})"
    return None


def load_vq_wav2vec(path):
    """Load a fairseq vq-wav2vec k-means checkpoint (e.g. vq-wav2vec_kmeans.pt) for `.codes(wav)`.

    Built from the checkpoint's own args and loaded strictly under its own key names; the
    aggregator and prediction weights are not needed for codes and are ignored.
    """
    ckpt = safe_torch_load(path)
    args = _checkpoint_args(ckpt, path)
    state = ckpt["model"]
    what = _describe_non_kmeans(args, set(state))
    if what:
        raise CheckpointError(f"{path}: expected a vq-wav2vec k-means checkpoint, this is {what}")
    model = VqWav2Vec(args)
    wanted = {k: v for k, v in state.items() if k.startswith(("feature_extractor.", "vector_quantizer."))}
    try:
        model.load_state_dict(wanted, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its args describe: {e}") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# fairseq dictionary for the speech RoBERTa


class Dictionary:
    """fairseq's Dictionary, for encoding: <s> 0, <pad> 1, </s> 2, <unk> 3, then the file's
    entries in order. Unlike fairseq's default, encoding never adds unknown symbols: they map to <unk>."""

    def __init__(self, bos="<s>", pad="<pad>", eos="</s>", unk="<unk>"):
        self.symbols, self.count, self.indices = [], [], {}
        self.bos_word, self.pad_word, self.eos_word, self.unk_word = bos, pad, eos, unk
        self.bos_index = self.add_symbol(bos)
        self.pad_index = self.add_symbol(pad)
        self.eos_index = self.add_symbol(eos)
        self.unk_index = self.add_symbol(unk)
        self.nspecial = len(self.symbols)

    def add_symbol(self, word, n=1, overwrite=False):
        if word in self.indices and not overwrite:
            self.count[self.indices[word]] += n
            return self.indices[word]
        self.indices[word] = len(self.symbols)
        self.symbols.append(word)
        self.count.append(n)
        return self.indices[word]

    def add_from_file(self, path):
        """Read `<symbol> <count>` lines (fairseq's dict.txt), as fairseq does."""
        path = Path(path)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.rstrip()
            if not line:
                continue
            overwrite = line.endswith(" #fairseq:overwrite")
            if overwrite:
                line = line[: -len(" #fairseq:overwrite")]
            word, _, count = line.rpartition(" ")
            if not word or not count.lstrip("-").isdigit():
                raise CheckpointError(f"{path}:{number}: expected '<symbol> <count>', got {line!r}")
            if word in self.indices and not overwrite:
                raise CheckpointError(f"{path}:{number}: duplicate symbol {word!r}")
            self.add_symbol(word, int(count), overwrite=overwrite)

    def bos(self):
        return self.bos_index

    def pad(self):
        return self.pad_index

    def eos(self):
        return self.eos_index

    def unk(self):
        return self.unk_index

    def index(self, symbol):
        return self.indices.get(symbol, self.unk_index)

    def __len__(self):
        return len(self.symbols)

    def __getitem__(self, index):
        return self.symbols[index] if 0 <= index < len(self.symbols) else self.unk_word

    def __contains__(self, symbol):
        return symbol in self.indices

    def encode_line(self, line, append_eos=True):
        """Whitespace-split `line` into ids (LongTensor), unknown symbols as <unk>, then </s>."""
        ids = [self.index(word) for word in line.split()]
        if append_eos:
            ids.append(self.eos_index)
        return torch.tensor(ids, dtype=torch.int64)

    def string(self, ids):
        return " ".join(self[int(i)] for i in ids)


def load_speech_dictionary(path):
    """Read bert_kmeans' dict.txt (or the folder holding it) and append <mask> as fairseq's
    masked-LM task does, so the ids match the speech RoBERTa's embedding table."""
    path = Path(path)
    if path.is_dir():
        path = path / "dict.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: speech dictionary not found")
    dictionary = Dictionary()
    dictionary.add_from_file(path)
    dictionary.mask_index = dictionary.add_symbol("<mask>")
    return dictionary


# ---------------------------------------------------------------------------------------------
# fairseq RoBERTa -> transformers.RobertaModel

_FAIRSEQ_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new",
                             "relu": "relu", "tanh": "tanh", "linear": "linear"}


def load_fairseq_roberta(path):
    """Map a fairseq RoBERTa checkpoint (e.g. bert_kmeans.pt) onto transformers.RobertaModel.

    Accepts both key layouts fairseq has used (`decoder.`/`encoder.` prefix, separate q/k/v or
    stacked in_proj, `emb_layer_norm`/`layernorm_embedding`); the config is read from the
    checkpoint; every weight must find its place (lm_head and classification heads are dropped).
    """
    ckpt = safe_torch_load(path)
    args = _checkpoint_args(ckpt, path)
    state = ckpt["model"]
    prefixes = [k[: -len("embed_tokens.weight")] for k in state if k.endswith("sentence_encoder.embed_tokens.weight")]
    if len(prefixes) != 1:
        raise CheckpointError(f"{path}: not a fairseq RoBERTa checkpoint (no sentence_encoder.embed_tokens)")
    prefix = prefixes[0]
    if getattr(args, "encoder_normalize_before", False):
        raise CheckpointError(f"{path}: pre-layer-norm RoBERTa is not supported by transformers.RobertaModel")

    source = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = {k for k in state if not k.startswith(prefix)
               and (".lm_head." in f".{k}" or k.startswith("classification_heads.") or k.endswith(".version"))}
    unplaced = set(state) - ignored - {prefix + k for k in source}
    if unplaced:
        raise CheckpointError(f"{path}: unexpected weights outside the encoder: {sorted(unplaced)[:5]}")

    embed = source["embed_tokens.weight"]
    vocab, hidden = embed.shape
    if "embed_positions.weight" not in source:
        raise CheckpointError(f"{path}: no learned position table; sinusoidal positions are not supported")
    layer_ids = sorted({int(k.split(".")[1]) for k in source if k.startswith("layers.")})
    if layer_ids != list(range(len(layer_ids))) or not layer_ids:
        raise CheckpointError(f"{path}: encoder layers {layer_ids} are not numbered 0..n-1")
    activation = getattr(args, "activation_fn", "gelu")
    if activation not in _FAIRSEQ_TO_HF_ACTIVATION:
        raise CheckpointError(f"{path}: activation {activation!r} has no transformers equivalent")
    config = RobertaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=args.encoder_attention_heads,
        intermediate_size=source["layers.0.fc1.weight"].shape[0],
        hidden_act=_FAIRSEQ_TO_HF_ACTIVATION[activation],
        hidden_dropout_prob=getattr(args, "dropout", 0.1),
        attention_probs_dropout_prob=getattr(args, "attention_dropout", 0.1),
        max_position_embeddings=source["embed_positions.weight"].shape[0],
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )

    used = set()

    def take(name):
        if name not in source:
            raise CheckpointError(f"{path}: missing weight {prefix + name}")
        used.add(name)
        return source[name]

    mapped = {}
    if getattr(args, "no_scale_embedding", True) is False:
        # Newer fairseq encoders scale token embeddings by sqrt(width) unless told not to.
        mapped["embeddings.word_embeddings.weight"] = take("embed_tokens.weight") * math.sqrt(hidden)
    else:
        mapped["embeddings.word_embeddings.weight"] = take("embed_tokens.weight")
    mapped["embeddings.position_embeddings.weight"] = take("embed_positions.weight")
    mapped["embeddings.token_type_embeddings.weight"] = torch.zeros(1, hidden, dtype=embed.dtype)
    norm = "emb_layer_norm" if "emb_layer_norm.weight" in source else "layernorm_embedding"
    for p in ("weight", "bias"):
        mapped[f"embeddings.LayerNorm.{p}"] = take(f"{norm}.{p}")
    for i in layer_ids:
        src, dst = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            if f"{src}self_attn.in_proj_{p}" in source:
                q, k, v = take(f"{src}self_attn.in_proj_{p}").chunk(3, dim=0)
            else:
                q, k, v = (take(f"{src}self_attn.{n}_proj.{p}") for n in "qkv")
            mapped[f"{dst}attention.self.query.{p}"] = q
            mapped[f"{dst}attention.self.key.{p}"] = k
            mapped[f"{dst}attention.self.value.{p}"] = v
            mapped[f"{dst}attention.output.dense.{p}"] = take(f"{src}self_attn.out_proj.{p}")
            mapped[f"{dst}attention.output.LayerNorm.{p}"] = take(f"{src}self_attn_layer_norm.{p}")
            mapped[f"{dst}intermediate.dense.{p}"] = take(f"{src}fc1.{p}")
            mapped[f"{dst}output.dense.{p}"] = take(f"{src}fc2.{p}")
            mapped[f"{dst}output.LayerNorm.{p}"] = take(f"{src}final_layer_norm.{p}")
    left_over = set(source) - used - {"version", "embed_positions._float_tensor"}
    if left_over:
        raise CheckpointError(f"{path}: weights with no place in RobertaModel: {sorted(prefix + k for k in left_over)[:5]}")

    model = RobertaModel(config, add_pooling_layer=False)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: key mapping does not fit RobertaModel: {e}") from None
    return model.eval()
