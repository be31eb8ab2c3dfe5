"""The fairseq checkpoints load without fairseq and reproduce what fairseq itself computed.

Reference outputs in tests/data/fairseq_reference/ were made by fairseq 0.12.2 (see its README).
"""
import argparse
import pickle
from pathlib import Path

import pytest
import torch

from mmser import fairseq_checkpoints, vq_wav2vec
from mmser.fairseq_checkpoints import (codes_to_string, load_fairseq_roberta, load_speech_dictionary, load_vq_wav2vec,
                                       safe_torch_load)
from mmser.vq_wav2vec import parse_conv_spec

REF = Path(__file__).parent / "data" / "fairseq_reference"
VQ_FILES = ["vq-wav2vec_kmeans_w64.pt", "vq-wav2vec_variant_w48.pt"]
CASES = ["noise_2.3s", "voiced_1.7s", "minimum_465", "silence_0.5s", "loud_1.0s"]
ROBERTA_LAYOUTS = ["bert_kmeans", "bert_kmeans_inproj"]



@pytest.fixture(scope="module")
def vq_reference():
    return torch.load(REF / "vq_wav2vec_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def roberta_reference():
    return torch.load(REF / "roberta_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def speech_dictionary():
    return load_speech_dictionary(REF / "bert_kmeans" / "dict.txt")


@pytest.mark.parametrize("checkpoint", VQ_FILES)
def test_vq_wav2vec_codes_equal_fairseq(checkpoint, vq_reference):
    model = load_vq_wav2vec(REF / checkpoint)
    for case in CASES:
        expected = vq_reference[checkpoint][case]
        z = model.features(expected["wav"])
        # fp32 rounding through eight conv layers, relative to the features' scale (up to about 5):
        # a few ulps, and more on some CPUs than others; the codes below must be exact.
        assert (z - expected["z"]).abs().max() <= 1e-5 * max(1.0, expected["z"].abs().max().item()), case
        codes = model.codes(expected["wav"].numpy())
        assert codes.dtype == torch.int64
        assert torch.equal(codes, expected["idx"]), case
        assert codes_to_string(codes) == expected["string"], case


def test_too_short_waveform_has_no_frames(vq_reference):
    model = load_vq_wav2vec(REF / VQ_FILES[0])
    assert model.min_samples == 465
    wav = vq_reference[VQ_FILES[0]]["minimum_465"]["wav"]
    assert model.codes(wav).shape == (1, 2)
    assert model.codes(wav[:464]).shape == (0, 2)
    assert codes_to_string(model.codes(wav[:10])) == "<s>"


@pytest.mark.parametrize("tf32_set_by", ["legacy flags", "per-operator settings", "global setting"])
def test_codes_switch_tf32_off_on_cuda_whichever_api_the_process_used(tf32_set_by, monkeypatch, precision_settings):
    # The switch itself touches no GPU, so a machine without one can check it by claiming CUDA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if tf32_set_by == "legacy flags":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif tf32_set_by == "per-operator settings":
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:  # as transformers' enable_tf32 does on torch >= 2.9
        torch.backends.fp32_precision = "tf32"
    # Read through the per-operator settings only: torch 2.11 refuses the legacy readers once the
    # process has used the new API (seen on an H200), and the switch must not trip over them either.
    def settings():
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision

    before = settings()
    assert before == ("tf32", "tf32")
    with vq_wav2vec.full_fp32_precision():
        assert settings() == ("ieee", "ieee")
    assert settings() == before


def test_legacy_checkpoint_needs_the_restricted_unpickler():
    path = REF / "vq-wav2vec_kmeans_w64.pt"
    # fairseq pickled its training options as an argparse.Namespace, which torch's own safe load refuses.
    with pytest.raises(pickle.UnpicklingError, match=r"Unsupported global: GLOBAL argparse\.Namespace"):
        torch.load(path, weights_only=True)
    ckpt = safe_torch_load(path)
    assert isinstance(ckpt["args"], argparse.Namespace)
    meter = ckpt["extra_state"]["train_meters"]["train_loss"]
    assert isinstance(meter, fairseq_checkpoints.FairseqPlaceholder)
    assert type(meter).__qualname__ == "fairseq.meters.AverageMeter"


def test_speech_dictionary_matches_fairseq(speech_dictionary, roberta_reference):
    d = speech_dictionary
    assert len(d) == roberta_reference["dictionary_size"] == 597
    assert (d.bos(), d.pad(), d.eos(), d.unk()) == (0, 1, 2, 3)
    assert d.mask_index == roberta_reference["mask_idx"] == len(d) - 1
    for case in CASES:
        expected = roberta_reference["sequences"][case]
        assert torch.equal(d.encode_line(expected["string"]), expected["ids"]), case


def test_speech_dictionary_edge_cases(speech_dictionary, tmp_path):
    d = speech_dictionary
    first = d.index("29-209")  # the first entry of dict.txt
    assert first == 4
    assert d.encode_line("<s> 999-999 29-209").tolist() == [0, 3, 4, 2]
    assert d.encode_line("").tolist() == [2]
    assert d.encode_line("", append_eos=False).tolist() == []
    assert d.encode_line("  <s>\t29-209 \n ").tolist() == [0, 4, 2]
    assert d.encode_line("<mask>").tolist() == [d.mask_index, 2]
    # A folder holding dict.txt works too; a malformed line is named.
    assert len(load_speech_dictionary(REF / "bert_kmeans")) == len(d)
    bad = tmp_path / "dict.txt"
    bad.write_text("1-2 10\nno_count_here\n")
    with pytest.raises(ValueError, match=r"dict.txt:2"):
        load_speech_dictionary(bad)


@pytest.mark.parametrize("layout", ROBERTA_LAYOUTS)
def test_speech_roberta_hidden_states_equal_fairseq(layout, roberta_reference, speech_dictionary):
    model = load_fairseq_roberta(REF / layout / "bert_kmeans.pt")
    assert not model.training and model.pooler is None
    assert model.config.max_position_embeddings == 514 and model.config.pad_token_id == 1
    for case in CASES:
        expected = roberta_reference["sequences"][case]
        ids = speech_dictionary.encode_line(expected["string"])
        with torch.no_grad():
            hidden = model(ids[None], output_hidden_states=True).hidden_states
        assert len(hidden) == len(expected["hidden_states"]) == 3
        for ours, theirs in zip(hidden, expected["hidden_states"]):
            assert (ours[0] - theirs).abs().max() < 1e-5, case

    batch = roberta_reference["padded_batch"]
    with torch.no_grad():
        out = model(batch["ids"], attention_mask=(batch["ids"] != 1).long()).last_hidden_state
    for row, length in enumerate(batch["lengths"]):
        assert (out[row, :length] - batch["last_hidden"][row, :length]).abs().max() < 1e-5


def test_roberta_with_encoder_prefix_and_layernorm_embedding(tmp_path, roberta_reference, speech_dictionary):
    # fairseq >= 0.10 names the same weights encoder.sentence_encoder.* / layernorm_embedding.
    ckpt = safe_torch_load(REF / "bert_kmeans" / "bert_kmeans.pt")
    renamed = {k.replace("decoder.", "encoder.", 1).replace("emb_layer_norm", "layernorm_embedding"): v
               for k, v in ckpt["model"].items()}
    path = tmp_path / "model.pt"
    torch.save({"args": ckpt["args"], "model": renamed}, path)
    model = load_fairseq_roberta(path)
    expected = roberta_reference["sequences"]["voiced_1.7s"]
    with torch.no_grad():
        last = model(speech_dictionary.encode_line(expected["string"])[None]).last_hidden_state[0]
    assert (last - expected["hidden_states"][-1]).abs().max() < 1e-5

    # A weight with no place in RobertaModel is an error, not silently dropped.
    renamed["encoder.sentence_encoder.layers.0.self_attn.bias_k"] = torch.zeros(1, 1, 64)
    torch.save({"args": ckpt["args"], "model": renamed}, path)
    with pytest.raises(ValueError, match="bias_k"):
        load_fairseq_roberta(path)


class _RunsCode:
    """Pickles as a call to `func(arg)`: what a malicious checkpoint does."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("zip_format", [True, False])
def test_safe_load_refuses_a_checkpoint_that_runs_code(tmp_path, zip_format):
    import os

    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    payload = {"args": argparse.Namespace(arch="wav2vec"),
               "model": {"w": torch.zeros(2)},
               "extra_state": {"x": _RunsCode(os.system, f"touch {marker}"),
                               "y": _RunsCode(eval, f"open({str(marker)!r}, 'w')")}}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(fairseq_checkpoints.CheckpointError, match=r"evil\.pt.*(posix|os|nt)\.system|builtins\.eval"):
        safe_torch_load(path)
    with pytest.raises(fairseq_checkpoints.CheckpointError, match="refusing to load global"):
        load_vq_wav2vec(path)
    assert not marker.exists()


def test_conv_spec_is_parsed_without_eval():
    spec = "[(48, 10, 5), (48, 8, 4)] + [(48, 4, 2)] * 3 + [(48, 1, 1)] * 3"
    assert parse_conv_spec(spec) == [(48, 10, 5), (48, 8, 4)] + [(48, 4, 2)] * 3 + [(48, 1, 1)] * 3
    assert parse_conv_spec("2 * [(8, 3, 1)]") == [(8, 3, 1), (8, 3, 1)]
    for bad in ["__import__('os').system('true')", "[(8, 3, 1)] * x", "[(8, 3, 1)][0:1]",
                "[(8, 3)]", "[(8, 3, 1)] * 10**9", "[(8, 3, 1.5)]", "", "[]", "lambda: 1"]:
        with pytest.raises(ValueError, match="conv spec"):
            parse_conv_spec(bad)


def _fake_checkpoint(tmp_path, args, keys):
    path = tmp_path / "other.pt"
    torch.save({"args": argparse.Namespace(**args), "model": {k: torch.zeros(1) for k in keys}}, path)
    return path


@pytest.mark.parametrize("args, keys, what", [
    (dict(arch="wav2vec", vq_type="gumbel", conv_feature_layers="[(8, 10, 5)]", vq_vars=4, vq_groups=2),
     ["feature_extractor.conv_layers.0.0.weight", "vector_quantizer.vars"], "gumbel"),
    (dict(arch="wav2vec2"), ["quantizer.vars", "encoder.pos_conv.0.weight"], "wav2vec 2.0"),
    (dict(arch="wav2vec", vq_type="none"), ["feature_extractor.conv_layers.0.0.weight"], "without a k-means"),
])
def test_non_kmeans_checkpoints_are_refused_by_name(tmp_path, args, keys, what):
    with pytest.raises(ValueError, match=what):
        load_vq_wav2vec(_fake_checkpoint(tmp_path, args, keys))


def test_roberta_checkpoint_is_not_taken_for_vq_wav2vec():
    with pytest.raises(ValueError, match="RoBERTa"):
        load_vq_wav2vec(REF / "bert_kmeans" / "bert_kmeans.pt")
    with pytest.raises(ValueError, match="not a fairseq RoBERTa"):
        load_fairseq_roberta(REF / VQ_FILES[1])


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"not a pickle at all \xff" * 10, "truncated"])
def test_a_file_that_is_no_checkpoint_is_named_not_a_traceback(tmp_path, content):
    # torch's own loaders raise EOFError, KeyError, UnpicklingError or RuntimeError on these.
    path = tmp_path / "model.pt"
    if content == "truncated":
        torch.save({"model": {"w": torch.zeros(100)}}, path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(fairseq_checkpoints.CheckpointError, match="model.pt"):
        safe_torch_load(path)
