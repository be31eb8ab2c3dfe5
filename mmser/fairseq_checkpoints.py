"""fairseq checkpoints without fairseq: safe unpickling, vq-wav2vec, the dictionary, RoBERTa.

fairseq does not import on Python 3.11+ and its loaders break on torch 2.6+, so its files load here
with plain PyTorch and transformers, each checked against outputs fairseq itself produced
(tests/test_fairseq_loading.py):
  safe_torch_load(path)              -> checkpoint dict, never running code from the file
  load_vq_wav2vec(path).codes(wav)   -> (frames, 2) int64 k-means code indices (the network itself:
                                        mmser/vq_wav2vec.py)
  load_speech_dictionary(path)       -> fairseq-compatible Dictionary (encode_line)
  load_fairseq_roberta(path)         -> transformers.RobertaModel in eval mode
  codes_to_string(codes)             -> the line the speech dictionary encodes
A file that is not what a loader expects raises CheckpointError, naming the file.
As transformers keeps its fairseq converters apart from its models, this module is imported by the
stages that need it (feature_ext.py, model_structure.py, predict.py, tiny_models.py) and by nothing else.
"""
import argparse
import collections
import math
import pickle
from pathlib import Path

import numpy as np
import torch
from transformers import RobertaConfig, RobertaModel

from mmser.vq_wav2vec import VqWav2Vec


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
    try:
        model = VqWav2Vec(args)
    except ValueError as e:  # a conv spec or width this model cannot build
        raise CheckpointError(f"{path}: {e}") from None
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


def _roberta_config(args, source, layers, path):
    """transformers' RobertaConfig of a fairseq RoBERTa encoder, from its args and weights' shapes."""
    vocab, hidden = source["embed_tokens.weight"].shape
    activation = getattr(args, "activation_fn", "gelu")
    if activation not in _FAIRSEQ_TO_HF_ACTIVATION:
        raise CheckpointError(f"{path}: activation {activation!r} has no transformers equivalent")
    return RobertaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
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


def _roberta_weights(source, layer_ids, args, prefix, path):
    """The encoder's weights (`source`: fairseq's names without `prefix`) under RobertaModel's names;
    every weight must find its place."""
    embed = source["embed_tokens.weight"]
    hidden = embed.shape[1]
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
    return mapped


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
    if "embed_positions.weight" not in source:
        raise CheckpointError(f"{path}: no learned position table; sinusoidal positions are not supported")
    layer_ids = sorted({int(k.split(".")[1]) for k in source if k.startswith("layers.")})
    if layer_ids != list(range(len(layer_ids))) or not layer_ids:
        raise CheckpointError(f"{path}: encoder layers {layer_ids} are not numbered 0..n-1")
    config = _roberta_config(args, source, len(layer_ids), path)
    mapped = _roberta_weights(source, layer_ids, args, prefix, path)
    model = RobertaModel(config, add_pooling_layer=False)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: key mapping does not fit RobertaModel: {e}") from None
    return model.eval()
