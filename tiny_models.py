"""Tiny stand-ins for the pretrained models, written in the layouts of the real downloads.

    python tiny_models.py MODELS_DIR DATA_DIR [--seed 0] [--speech-encoders]

Reads the transcripts (and, for the speech quantizer, the target audio) of a DATA_DIR written by
mocap_data_collect.py, and writes a MODELS_DIR that feature_extraction_main.py and main.py
accept in place of the real one:
  MODELS_DIR/bert-base-uncased/        tiny BertModel + WordPiece tokenizer trained on the texts
  MODELS_DIR/roberta-large/            tiny RobertaModel + byte-level BPE tokenizer (<s> 0, <pad> 1,
                                       </s> 2, <unk> 3, <mask> 4, as fairseq numbers them)
  MODELS_DIR/vq-wav2vec_kmeans.pt      fairseq 0.9 layout (args Namespace + state dict), a narrow
                                       conv stack with the real strides (100 frames/s) and a k-means
                                       codebook fitted on the given audio, so codes spread out
  MODELS_DIR/bert_kmeans/bert_kmeans.pt, dict.txt
                                       tiny speech RoBERTa in fairseq's key layout and the codes seen
                                       in the audio with their counts
  MODELS_DIR/tiny-{wavlm,hubert,wav2vec2,data2vec-audio,whisper}/   (--speech-encoders)
                                       tiny random transformers speech encoders with their feature
                                       extractors (save_pretrained), for --speech-model
  MODELS_DIR/TINY_MODELS.txt           says these are stand-ins; a MODELS_DIR with model files and
                                       without it (the real downloads, perhaps) is never overwritten,
                                       nor is a DATA_DIR (a folder with utterances.csv)
make_tiny_text_encoder(folder, model_type, texts) writes, for the tests and for trying --text-model
and --sentence-model without a download, a tiny BERT, ELECTRA, DeBERTa-v2/v3 or RoBERTa folder with a
tokenizer trained on the texts.
The weights are random (seeded), "pretrained" on the given corpus only in the cheapest ways: the
codebook is fitted on its audio, and the last layer norm of the sentence model and of the speech
RoBERTa is set so that their output vectors are standardized over its utterances. Random small
weights alone give vectors that barely move from one utterance to the next (per-dimension spread
~1/200 of their size), too little for a new layer to learn from in a few epochs, although the
utterance's words and sounds are in them. Good for tests and the demo, meaningless otherwise.
Seconds to build. torch, transformers and scikit-learn are imported by the functions that use
them, so --help and a mistyped argument answer at once.
"""
import argparse
import io
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from data_contract import SAMPLE_RATE, DataError, read_manifest
from feature_ext import sentence_embeddings
from utils import AudioError, atomic_path, length_sorted_batches, quiet_transformers, read_audio, write_text_atomic

TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, TEXT_FFN, TEXT_POSITIONS = 32, 2, 2, 64, 128
CONV_WIDTH = 32
# The real vq-wav2vec's strides and kernels (10,5),(8,4),(4,2)x3,(1,1)x3, narrower.
CONV_LAYERS = [(CONV_WIDTH, 10, 5), (CONV_WIDTH, 8, 4)] + [(CONV_WIDTH, 4, 2)] * 3 + [(CONV_WIDTH, 1, 1)] * 3
# The real model has 320. With 24 the code histogram told the synthetic emotions apart barely above
# chance (leave-one-session-out UA 0.36); 64 gave 0.56, more gave less (too many codes seen rarely).
CODES_PER_GROUP = 64
SPEECH_WIDTH, SPEECH_LAYERS, SPEECH_HEADS, SPEECH_FFN, SPEECH_MAX_TOKENS = 32, 2, 2, 64, 512
KMEANS_MAX_VECTORS = 20000
SPEECH_BATCH_SIZE = 32


class TinyModelsError(ValueError):
    """The folders or the corpus given cannot make tiny models; the message names what is wrong."""


class ModelsDirInUse(TinyModelsError, FileExistsError):
    """MODELS_DIR holds something else (real models, a DATA_DIR). Also a FileExistsError, which
    is what callers caught before this class existed."""


def standardize_layer_norm(layer_norm, outputs):
    """Fold per-dimension standardization of `outputs` ((n, H), produced by `layer_norm`) into the
    norm's affine weights, so that its output over the same inputs has mean 0 and std 1 per dimension.

    Exact because the norm's output is gamma * x_hat + beta, elementwise per dimension.
    """
    import torch
    outputs = torch.as_tensor(outputs, dtype=torch.float64)
    if len(outputs) < 2:
        raise ValueError(f"{len(outputs)} output vectors are too few to standardize a layer norm on")
    mean, std = outputs.mean(0), outputs.std(0).clamp_min(1e-6)
    with torch.no_grad():
        layer_norm.weight.copy_((layer_norm.weight.double() / std).float())
        layer_norm.bias.copy_(((layer_norm.bias.double() - mean) / std).float())


def _save_checkpoint(path, checkpoint):
    """torch.save, byte for byte the same for the same checkpoint: saved to a file, the archive's
    records would be named after the (random) temporary file."""
    import torch
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


class _atomic_dir:
    """Build a folder under a temporary name beside `path`; it replaces `path` on success."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"))
        self.tmp.chmod(0o755)  # mkdtemp makes it private; the models are meant to be shared
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return False


def _wordpiece_tokenizer(texts, fast_class):
    """A lower-casing WordPiece tokenizer ([CLS] ... [SEP]) trained on `texts`, as BERT's and ELECTRA's:
    -> (the transformers tokenizer of `fast_class`, its vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # tokenizers' WordPieceTrainer numbers (and, on ties, picks) its "##" pieces in hash order, so
    # two runs differ; its BPE trainer is deterministic. The BPE pieces, each also as a "##"
    # continuation, make the WordPiece vocabulary.
    pieces = Tokenizer(models.BPE(unk_token="[UNK]"))
    pieces.normalizer, pieces.pre_tokenizer = normalizer, pre_tokenizer
    pieces.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, show_progress=False))
    learned = sorted(pieces.get_vocab())
    vocab = {token: i for i, token in enumerate(specials + learned + [f"##{p}" for p in learned])}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece()
    return fast_class(tokenizer_object=tokenizer, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
                      pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                      model_max_length=TEXT_POSITIONS), vocab


def _unigram_tokenizer(texts):
    """A SentencePiece-style unigram tokenizer ("▁" word starts, [CLS] ... [SEP]) trained on `texts`,
    as DeBERTa-v3's: -> (the transformers DebertaV2TokenizerFast, its vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import DebertaV2TokenizerFast
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # DeBERTa-v3's ids 0-3, then its [MASK]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=1000, special_tokens=specials, unk_token="[UNK]", show_progress=False))
    vocab = tokenizer.get_vocab()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return DebertaV2TokenizerFast(tokenizer_object=tokenizer, bos_token="[CLS]", eos_token="[SEP]",
                                  unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                                  mask_token="[MASK]", model_max_length=TEXT_POSITIONS), vocab


# The text encoder families make_tiny_text_encoder writes besides RoBERTa and BERT (their own
# functions): transformers config class, model class, tokenizer, and the config's family-specific
# settings (DeBERTa-v3's relative attention, without absolute positions).
def _tiny_text_families():
    from transformers import DebertaV2Config, DebertaV2Model, ElectraConfig, ElectraModel, ElectraTokenizerFast
    return {"deberta-v2": (DebertaV2Config, DebertaV2Model, _unigram_tokenizer,
                           dict(relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                                norm_rel_ebd="layer_norm", share_att_key=True, position_buckets=32,
                                max_relative_positions=-1, type_vocab_size=0)),
            "electra": (ElectraConfig, ElectraModel, lambda texts: _wordpiece_tokenizer(texts, ElectraTokenizerFast),
                        dict(embedding_size=TEXT_WIDTH))}


def make_tiny_text_encoder(out_dir, model_type, texts, seed=0):
    """A tiny random text encoder of the family `model_type` (data_contract.TEXT_ENCODERS: "roberta",
    "bert", "deberta-v2", "electra") with a tokenizer trained on `texts`, via save_pretrained; its
    first-token vector is standardized over `texts`, as the tiny BERT's, so it serves as a sentence
    model too. For the tests and for trying --text-model / --sentence-model without a download."""
    import torch
    if model_type == "bert":
        return make_tiny_bert(out_dir, texts, seed)
    if model_type == "roberta":
        return make_tiny_roberta(out_dir, texts, seed)
    families = _tiny_text_families()
    if model_type not in families:
        raise TinyModelsError(f"no tiny text encoder of type {model_type!r}; one of roberta, bert, "
                              f"{', '.join(families)}")
    config_class, model_class, make_tokenizer, settings = families[model_type]
    hf_tokenizer, vocab = make_tokenizer(texts)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config_class(
            vocab_size=len(vocab), hidden_size=TEXT_WIDTH, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=TEXT_HEADS, intermediate_size=TEXT_FFN, max_position_embeddings=TEXT_POSITIONS,
            pad_token_id=vocab["[PAD]"], **settings)).eval()
    standardize_layer_norm(model.encoder.layer[-1].output.LayerNorm, sentence_embeddings(texts, hf_tokenizer, model))
    with _atomic_dir(out_dir) as tmp, quiet_transformers():
        hf_tokenizer.save_pretrained(tmp, legacy_format=False)
        model.save_pretrained(tmp)
    return Path(out_dir)


def make_tiny_bert(out_dir, texts, seed=0):
    """Tiny BertModel + lower-casing WordPiece tokenizer trained on `texts`, via save_pretrained;
    its [CLS] vector (the sentence embedding feature_ext takes) is standardized over `texts`."""
    import torch
    # The *Fast names: transformers 4.x builds a tokenizer from a `tokenizers` object only in its fast
    # classes, and 5.x keeps them as aliases of its (only, fast) BertTokenizer.
    from transformers import BertConfig, BertModel, BertTokenizerFast
    hf_tokenizer, vocab = _wordpiece_tokenizer(texts, BertTokenizerFast)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(BertConfig(
            vocab_size=len(vocab), hidden_size=TEXT_WIDTH, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=TEXT_HEADS, intermediate_size=TEXT_FFN,
            max_position_embeddings=TEXT_POSITIONS, pad_token_id=vocab["[PAD]"])).eval()
    standardize_layer_norm(model.encoder.layer[-1].output.LayerNorm,
                           sentence_embeddings(texts, hf_tokenizer, model))
    with _atomic_dir(out_dir) as tmp, quiet_transformers():
        # tokenizer.json alone, as transformers 5 writes it; 4.x would add the slow tokenizer's
        # vocabulary files, which it falls back on when tokenizer.json is missing.
        hf_tokenizer.save_pretrained(tmp, legacy_format=False)
        model.save_pretrained(tmp)
    return Path(out_dir)


def make_tiny_roberta(out_dir, texts, seed=0):
    """Tiny RobertaModel + byte-level BPE tokenizer trained on `texts`, via save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                            add_prefix_space=False)
    hf_tokenizer = RobertaTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                        sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                        pad_token="<pad>", mask_token="<mask>",
                                        model_max_length=TEXT_POSITIONS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = RobertaModel(RobertaConfig(
            vocab_size=tokenizer.get_vocab_size(), hidden_size=TEXT_WIDTH, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=TEXT_HEADS, intermediate_size=TEXT_FFN,
            max_position_embeddings=TEXT_POSITIONS + 2, type_vocab_size=1, layer_norm_eps=1e-5,
            pad_token_id=1, bos_token_id=0, eos_token_id=2))
    with _atomic_dir(out_dir) as tmp, quiet_transformers():
        hf_tokenizer.save_pretrained(tmp, legacy_format=False)  # tokenizer.json alone, as in make_tiny_bert
        model.save_pretrained(tmp)
    return Path(out_dir)


def _vq_args():
    """vq-wav2vec k-means args as fairseq 0.9 stored them, with the tiny sizes."""
    return argparse.Namespace(
        arch="wav2vec", task="audio_pretraining", criterion="binary_cross_entropy",
        conv_feature_layers=repr(CONV_LAYERS), activation="gelu", log_compression=False,
        skip_connections_feat=False, residual_scale=0.5, non_affine_group_norm=False,
        vq_type="kmeans", vq_vars=CODES_PER_GROUP, vq_groups=2, vq_depth=2, combine_groups=True,
        vq_dim=0, vq_gamma=0.25, dropout=0.0, dropout_features=0.0, offset="auto")


def _read_wav(wav):
    if isinstance(wav, (str, os.PathLike)):
        try:
            return read_audio(wav)[0]
        except AudioError as e:
            raise TinyModelsError(str(e)) from None
    return np.asarray(wav, dtype=np.float32)


def _default_wavs(seed):
    """Without audio to fit on, a few seconds of noisy tones of different pitch and loudness."""
    rng = np.random.default_rng(seed)
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    return [(amp * np.sin(2 * np.pi * f0 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
            for f0, amp in [(110, 0.3), (180, 0.5), (260, 0.2), (330, 0.8)]]


def make_tiny_vq_wav2vec(path, wavs, seed=0):
    """Write a vq-wav2vec k-means checkpoint whose codebook is k-means fitted on the wavs' features.

    Returns the path and, per wav, the line of its codes ("<s> g0-g1 ..."), as feature_ext writes
    them, for the speech dictionary and the speech RoBERTa.
    """
    import torch
    from sklearn.cluster import KMeans

    from fairseq_checkpoints import VqWav2Vec, codes_to_string
    args = _vq_args()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = VqWav2Vec(args).eval()
    quantizer = model.vector_quantizer
    with torch.inference_mode():
        projected = [quantizer.project(model.features(wav)[None]) for wav in wavs if len(wav) >= model.min_samples]
    if len(projected) < 2:  # the speech RoBERTa's statistics need two
        raise TinyModelsError(f"{len(projected)} recording(s) of at least {model.min_samples} samples; "
                              f"the tiny speech models need 2")
    vectors = torch.cat([ze.reshape(-1, quantizer.var_dim) for ze in projected]).numpy()
    if len(vectors) < quantizer.num_vars:
        raise TinyModelsError(f"{len(vectors)} frames of audio are too few to fit {quantizer.num_vars} codes")
    if len(vectors) > KMEANS_MAX_VECTORS:
        rng = np.random.default_rng(seed)
        vectors = vectors[rng.choice(len(vectors), KMEANS_MAX_VECTORS, replace=False)]
    # combine_groups: both groups share one codebook, so it is fitted on both groups' vectors.
    kmeans = KMeans(n_clusters=quantizer.num_vars, n_init=1, max_iter=20, random_state=seed).fit(vectors)
    with torch.no_grad():
        quantizer.embedding.copy_(torch.from_numpy(kmeans.cluster_centers_).float()[:, None, :])
    checkpoint = {"args": args, "model": model.state_dict(), "optimizer_history": [],
                  "extra_state": {"epoch": 0}}
    _save_checkpoint(path, checkpoint)
    with torch.inference_mode():
        lines = [codes_to_string(quantizer.nearest(ze)[0]) for ze in projected]
    return Path(path), lines


def _roberta_args(vocab_size):
    return argparse.Namespace(
        arch="roberta_base", task="masked_lm", criterion="masked_lm", tokens_per_sample=SPEECH_MAX_TOKENS,
        max_positions=SPEECH_MAX_TOKENS, encoder_layers=SPEECH_LAYERS, encoder_embed_dim=SPEECH_WIDTH,
        encoder_ffn_embed_dim=SPEECH_FFN, encoder_attention_heads=SPEECH_HEADS, activation_fn="gelu",
        # No dropout: standardize_layer_norm gives this random stand-in LayerNorm gains in the hundreds,
        # which blow dropout's noise up when it is fine-tuned (--finetune-speech, siriwardhana2020's
        # recipe: vectors of norm ~3000 against ~4 in eval mode); frozen, it runs in eval mode anyway.
        pooler_activation_fn="tanh", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pooler_dropout=0.0, encoder_learned_pos=True, layernorm_embedding=True,
        no_scale_embedding=True, encoder_normalize_before=False, untie_weights_roberta=False)


def _fairseq_roberta_state(vocab_size, generator):
    """Random weights under fairseq 0.9's RoBERTa key names (BERT-style init, padding rows zero)."""
    import torch
    def normal(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    d, enc = SPEECH_WIDTH, "decoder.sentence_encoder."
    state = {enc + "embed_tokens.weight": normal(vocab_size, d),
             enc + "embed_positions.weight": normal(SPEECH_MAX_TOKENS + 2, d),
             enc + "emb_layer_norm.weight": torch.ones(d), enc + "emb_layer_norm.bias": torch.zeros(d)}
    state[enc + "embed_tokens.weight"][1] = 0  # <pad>
    state[enc + "embed_positions.weight"][1] = 0
    for i in range(SPEECH_LAYERS):
        layer = f"{enc}layers.{i}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            state[f"{layer}self_attn.{name}.weight"] = normal(d, d)
            state[f"{layer}self_attn.{name}.bias"] = torch.zeros(d)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            state[f"{layer}{norm}.weight"], state[f"{layer}{norm}.bias"] = torch.ones(d), torch.zeros(d)
        state[f"{layer}fc1.weight"], state[f"{layer}fc1.bias"] = normal(SPEECH_FFN, d), torch.zeros(SPEECH_FFN)
        state[f"{layer}fc2.weight"], state[f"{layer}fc2.bias"] = normal(d, SPEECH_FFN), torch.zeros(d)
    state["decoder.lm_head.weight"] = state[enc + "embed_tokens.weight"]
    state["decoder.lm_head.bias"] = torch.zeros(vocab_size)
    state["decoder.lm_head.dense.weight"], state["decoder.lm_head.dense.bias"] = normal(d, d), torch.zeros(d)
    state["decoder.lm_head.layer_norm.weight"] = torch.ones(d)
    state["decoder.lm_head.layer_norm.bias"] = torch.zeros(d)
    return state


def speech_sentence_vectors(model, dictionary, code_lines, batch_size=SPEECH_BATCH_SIZE):
    """The speech RoBERTa's last-layer <s> vectors ((n, H) float32) for lines "<s> g0-g1 ...",
    encoded as feature_ext does and cut to the model's positions (keeping </s>) as the dataset does."""
    import torch

    from dataset_loader import truncate_tokens
    max_tokens = model.config.max_position_embeddings - model.config.pad_token_id - 1
    ids = [torch.from_numpy(truncate_tokens(dictionary.encode_line(line).numpy(), max_tokens)) for line in code_lines]
    vectors = np.zeros((len(ids), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for batch in length_sorted_batches([len(x) for x in ids], batch_size):
            padded = torch.nn.utils.rnn.pad_sequence([ids[i] for i in batch], batch_first=True,
                                                     padding_value=dictionary.pad())
            vectors[batch] = model(input_ids=padded, attention_mask=padded.ne(dictionary.pad()).long()
                                   ).last_hidden_state[:, 0].numpy()
    return vectors


def make_tiny_speech_roberta(out_dir, code_lines, seed=0):
    """Write dict.txt (the codes in `code_lines` with their counts) and bert_kmeans.pt (fairseq key
    layout), whose <s> vector is standardized over `code_lines` ("<s> g0-g1 ...", one per utterance)."""
    import torch

    from fairseq_checkpoints import load_fairseq_roberta, load_speech_dictionary
    out_dir = Path(out_dir)
    counts = Counter(code for line in code_lines for code in line.split()[1:])
    entries = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    vocab_size = 4 + len(entries) + 1  # specials, codes, <mask>
    generator = torch.Generator().manual_seed(seed)
    checkpoint = {"args": _roberta_args(vocab_size), "model": _fairseq_roberta_state(vocab_size, generator),
                  "optimizer_history": [], "extra_state": {"epoch": 0}}
    write_text_atomic(out_dir / "dict.txt", "".join(f"{code} {n}\n" for code, n in entries))
    _save_checkpoint(out_dir / "bert_kmeans.pt", checkpoint)
    # Measured through the project's own loader, so the statistics are of what main.py will see.
    model = load_fairseq_roberta(out_dir / "bert_kmeans.pt")
    last_norm = model.encoder.layer[-1].output.LayerNorm
    standardize_layer_norm(last_norm, speech_sentence_vectors(
        model, load_speech_dictionary(out_dir / "dict.txt"), code_lines))
    key = f"decoder.sentence_encoder.layers.{SPEECH_LAYERS - 1}.final_layer_norm."
    checkpoint["model"][key + "weight"] = last_norm.weight.detach().clone()
    checkpoint["model"][key + "bias"] = last_norm.bias.detach().clone()
    _save_checkpoint(out_dir / "bert_kmeans.pt", checkpoint)
    return out_dir / "bert_kmeans.pt", out_dir / "dict.txt"


# A Whisper of the real layout at a tiny size: 30-s windows of 80 log-mel bins (Whisper small's),
# one encoder and one decoder layer. max_target_positions bounds a random model's transcript, which
# rarely ends on its own: 24 tokens, 4 of them the prompt (<|startoftranscript|><|en|><|transcribe|>
# <|notimestamps|>).
WHISPER_WIDTH, WHISPER_HEADS, WHISPER_FFN, WHISPER_MELS, WHISPER_TARGET_POSITIONS = 32, 2, 64, 80, 24


# Weights drawn wider than transformers' 0.02: at 0.02 the tiny model writes the same token whatever it hears.
WHISPER_INIT_STD = 1.0
WHISPER_TEXTS = ("I told you not to do that!", "Oh, that is wonderful news.", "I don't know what to say.",
                 "Why would you leave without telling me?", "We can talk about it tomorrow.")


def _whisper_tokenizer_object(texts):
    """Whisper's tokenizer in miniature: byte-level BPE trained on `texts`, then Whisper's special
    tokens in Whisper's order (<|endoftext|>, <|startoftranscript|>, one per language, <|translate|>,
    <|transcribe|>, <|startoflm|>, <|startofprev|>, <|nocaptions|>, <|notimestamps|>); the 1501
    timestamp tokens are left out, since this tool never asks for timestamps."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Only the characters of `texts` (no byte alphabet): a random model's pieces then decode to words,
    # not to stray bytes.
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                   "<|notimestamps|>"])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return tokenizer, specials


def write_tiny_whisper(out_dir, texts=WHISPER_TEXTS, seed=0):
    """A tiny random Whisper for speech recognition (feature_ext.py's transcripts step, predict.py):
    WhisperForConditionalGeneration, its feature extractor and a tokenizer with Whisper's special
    tokens, via save_pretrained, with a generation config that transformers' generate() takes with
    language="en", task="transcribe". Seconds to build; its transcripts are random words of `texts`."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizerFast)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    texts = [t for t in texts if t and t.strip()] or list(WHISPER_TEXTS)
    tokenizer_object, specials = _whisper_tokenizer_object(texts)
    tokenizer = WhisperTokenizerFast(tokenizer_object=tokenizer_object, unk_token="<|endoftext|>",
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>", model_max_length=WHISPER_TARGET_POSITIONS)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=WHISPER_MELS, d_model=WHISPER_WIDTH, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=WHISPER_HEADS, decoder_attention_heads=WHISPER_HEADS,
        encoder_ffn_dim=WHISPER_FFN, decoder_ffn_dim=WHISPER_FFN, max_source_positions=1500,
        max_target_positions=WHISPER_TARGET_POSITIONS, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=sot, init_std=WHISPER_INIT_STD)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config).eval()
    # The fields of a real Whisper's generation_config.json that generate() reads for language,
    # task and timestamps (e.g. openai/whisper-small's).
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=WHISPER_TARGET_POSITIONS, is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        begin_suppress_tokens=[eot], suppress_tokens=[], max_initial_timestamp_index=50, return_timestamps=False)
    # Saved one by one, not as a WhisperProcessor: transformers 4.x's takes only the slow tokenizer.
    with _atomic_dir(out_dir) as tmp, quiet_transformers():
        WhisperFeatureExtractor(feature_size=WHISPER_MELS).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp, legacy_format=False)  # tokenizer.json alone, as in make_tiny_bert
        model.save_pretrained(tmp)
    return Path(out_dir)


# Tiny transformers speech encoders, one per family speech_encoders.py takes: the real feature
# encoders' strides (320 samples a frame; Whisper its 80-mel, 30-s input), narrow and shallow.
SPEECH_ENCODER_WIDTH, SPEECH_ENCODER_LAYERS = 32, 2
_CONV = {"conv_dim": (32,) * 7, "conv_stride": (5, 2, 2, 2, 2, 2, 2), "conv_kernel": (10, 3, 3, 3, 3, 2, 2)}
TINY_SPEECH_FAMILIES = ("wavlm", "hubert", "wav2vec2", "data2vec-audio", "whisper")


def make_tiny_speech_encoder(out_dir, family, seed=0):
    """A tiny random transformers speech encoder of `family` (TINY_SPEECH_FAMILIES) with its feature
    extractor, via save_pretrained, as the hub's folders hold them. WavLM, HuBERT and data2vec-audio
    have the large models' layer-norm feature encoder (normalised input, attention masks); wav2vec 2.0
    the base model's group norm (no attention mask). Whisper is a whole WhisperModel (encoder and
    decoder, as openai/whisper-* folders are); the speech branch uses its encoder only."""
    import torch
    import transformers
    width, layers = SPEECH_ENCODER_WIDTH, SPEECH_ENCODER_LAYERS
    common = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": 2,
              "intermediate_size": 2 * width, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4,
              **_CONV}
    if family == "whisper":
        config = transformers.WhisperConfig(
            d_model=width, encoder_layers=layers, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width, vocab_size=64,
            num_mel_bins=80, max_source_positions=1500, max_target_positions=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        model_class, extractor = transformers.WhisperModel, transformers.WhisperFeatureExtractor()
    else:
        classes = {"wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
                   "hubert": (transformers.HubertConfig, transformers.HubertModel),
                   "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
                   "data2vec-audio": (transformers.Data2VecAudioConfig, transformers.Data2VecAudioModel)}
        if family not in classes:
            raise TinyModelsError(f"no tiny speech encoder of family {family!r}; "
                                  f"one of {', '.join(TINY_SPEECH_FAMILIES)}")
        config_class, model_class = classes[family]
        layer_norm = family != "wav2vec2"
        if family == "data2vec-audio":  # its positional convolutions: 5 of kernel 19, here narrower
            common = {**common, "conv_pos_kernel_size": 5, "num_conv_pos_embeddings": 2}
        if family != "data2vec-audio":
            common["feat_extract_norm"] = "layer" if layer_norm else "group"
        config = config_class(**common)
        extractor = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                                          do_normalize=layer_norm, return_attention_mask=layer_norm)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config).eval()
    with _atomic_dir(out_dir) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        extractor.save_pretrained(tmp)
    return Path(out_dir)


# What make_tiny_models writes into MODELS_DIR, and the file that says they are its stand-ins: a
# MODELS_DIR holding these names without it may be the real downloads, which it never overwrites.
MODEL_NAMES = ("bert-base-uncased", "roberta-large", "vq-wav2vec_kmeans.pt", "bert_kmeans")
MARKER = "TINY_MODELS.txt"


def make_tiny_models(models_dir, texts, wavs=None, seed=0):
    """Write a tiny MODELS_DIR (see the module docstring) and return the paths it wrote.

    texts: transcripts to train the tokenizers on; wavs: 16 kHz mono waveforms (arrays or wav
    paths) to fit the speech codebook and count the codes on (a few synthetic tones when None).
    Returns {"sentence_model", "text_model", "vq_wav2vec", "speech_roberta", "speech_dictionary"}.
    TinyModelsError names what cannot be used.
    """
    models_dir = Path(models_dir)
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < 2:  # the sentence model's statistics need two
        raise TinyModelsError(f"make_tiny_models needs at least 2 non-empty texts to train the tokenizers on, "
                              f"got {len(texts)}")
    if (models_dir / "utterances.csv").exists():
        raise ModelsDirInUse(f"{models_dir}: holds utterances.csv, so it is a DATA_DIR; not writing models "
                             f"into it (give the tiny ones a folder of their own)")
    present = [name for name in MODEL_NAMES if (models_dir / name).exists()]
    if present and not (models_dir / MARKER).is_file():
        raise ModelsDirInUse(f"{models_dir}: holds {', '.join(present)} but no {MARKER}; not overwriting what may "
                             f"be the real pretrained models (give the tiny ones a folder of their own)")
    wavs = [_read_wav(w) for w in wavs] if wavs is not None else _default_wavs(seed)
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, a folder where nothing can be made
        raise TinyModelsError(f"{models_dir}: cannot create MODELS_DIR ({e.strerror})") from None
    (models_dir / MARKER).write_text("Tiny random stand-ins written by tiny_models.py for tests and the demo; "
                                     "not the pretrained models.\n", encoding="utf-8")
    paths = {"sentence_model": make_tiny_bert(models_dir / "bert-base-uncased", texts, seed),
             "text_model": make_tiny_roberta(models_dir / "roberta-large", texts, seed)}
    paths["vq_wav2vec"], code_lines = make_tiny_vq_wav2vec(models_dir / "vq-wav2vec_kmeans.pt", wavs, seed)
    paths["speech_roberta"], paths["speech_dictionary"] = make_tiny_speech_roberta(
        models_dir / "bert_kmeans", code_lines, seed)
    return paths


def read_data_dir(data_dir):
    """The transcripts of a DATA_DIR's utterances and the paths of its target audio."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TinyModelsError(f"{data_dir}: DATA_DIR not found")
    if not (data_dir / "utterances.csv").is_file():
        raise TinyModelsError(f"{data_dir}: no utterances.csv, so not a DATA_DIR; run mocap_data_collect.py "
                              f"first")
    try:
        rows = read_manifest(data_dir)
    except DataError as e:
        raise TinyModelsError(str(e)) from None
    wavs = [p for p in (data_dir / "Audio" / f"{row['name']}.wav" for row in rows) if p.is_file()]
    return [row["transcript"] for row in rows], wavs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models_dir", help="folder to write the tiny models into")
    parser.add_argument("data_dir", help="DATA_DIR written by mocap_data_collect.py (texts and audio)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speech-encoders", action="store_true",
                        help="also write tiny random WavLM, HuBERT, wav2vec 2.0, data2vec-audio and Whisper folders "
                             "(MODELS_DIR/tiny-<family>), for --speech-model")
    args = parser.parse_args(argv)
    try:
        texts, wavs = read_data_dir(args.data_dir)
        paths = make_tiny_models(args.models_dir, texts, wavs, args.seed)
        if args.speech_encoders:
            for family in TINY_SPEECH_FAMILIES:
                paths[family] = make_tiny_speech_encoder(Path(args.models_dir) / f"tiny-{family}", family, args.seed)
    except TinyModelsError as e:
        print(f"tiny_models.py: error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash; each model is written whole or not at all
        print("tiny_models.py: interrupted: nothing was left half-written; rerun the same command", file=sys.stderr)
        sys.exit(130)
