"""Other text encoders than the original's RoBERTa, for the text branch and the sentence model.

Tiny BERT, ELECTRA and DeBERTa-v2/v3 folders (tiny_models.make_tiny_text_encoder, tokenizers trained
on the transcripts) go through the text-token step, which writes each one's own ids into a folder of
its own; DeBERTa through a text+context run whose context vectors come from a mean-pooled ELECTRA,
and through predict.py, which gives the run's own test predictions back.
"""
import csv
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from mmser import data_contract
import main
import predict
from mmser.dataset_loader import pad_tokens
from mmser.model_structure import EmotionClassifier, load_text_encoder
from small_runs import SMALL, read_csv, write_feature_dir
from fixtures.tiny_models import make_tiny_text_encoder
from mmser import context, text_features
import json

FAMILIES = ("bert", "electra", "deberta-v2")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A small DATA_DIR (tests/small_runs.py) with its transcripts in Text/, and a tiny encoder of
    each family trained on them: {"data_dir", "encoders": {model_type: folder}, "texts": {name: text}}."""
    root = tmp_path_factory.mktemp("text_encoders")
    data_dir = write_feature_dir(root / "data")
    rows = data_contract.read_manifest(data_dir)
    (data_dir / "Text").mkdir()
    texts = {}
    for i, row in enumerate(rows):
        # Words that differ from one utterance to the next, so the tokenizers have pieces to learn.
        texts[row["name"]] = f"{row['transcript']} said {'yes no maybe never'.split()[i % 4]} {row['emotion']}"
        (data_dir / "Text" / f"{row['name']}.txt").write_text(texts[row["name"]], encoding="utf-8")
    encoders = {family: make_tiny_text_encoder(root / f"tiny-{family}", family, list(texts.values()))
                for family in FAMILIES}
    return {"data_dir": data_dir, "encoders": encoders, "texts": texts}


def test_each_family_writes_its_own_tokenizers_ids_into_its_own_folder_and_runs_in_the_branch(text_data, tmp_path):
    data_dir = shutil.copytree(text_data["data_dir"], tmp_path / "data")
    original = {p.name: p.read_bytes() for p in (data_dir / "GPT2Tokens").iterdir()}
    for family, folder in text_data["encoders"].items():
        report = text_features.extract_text_tokens(data_dir, text_model=folder, progress=False)
        assert report.ok and report.step == f"text-tokens@tiny-{family}", report.error
        out = data_dir / f"TextTokens-tiny-{family}"
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for name, text in text_data["texts"].items():
            assert np.load(out / f"{name}.npy").tolist() == tokenizer(text)["input_ids"], (family, name)
        assert data_contract.read_features_record(data_dir)[report.step]["text_tokenizer"]["path"] == str(folder)
        # In the branch: the first token's last hidden state, the same padded in a batch as alone.
        model = EmotionClassifier(text_encoder=load_text_encoder(folder), fusion_hidden=8).eval()
        assert model.text_encoder.config.model_type == family
        ids = [torch.from_numpy(np.load(out / f"{name}.npy").astype(np.int64)) for name in list(text_data["texts"])[:3]]
        batch, mask = pad_tokens(ids)
        with torch.no_grad():
            together = model.text_encoder(input_ids=batch, attention_mask=mask).last_hidden_state[:, 0]
            alone = torch.cat([model.text_encoder(input_ids=x[None]).last_hidden_state[:, 0] for x in ids])
            assert model(text_ids=batch, text_mask=mask)[0].shape == (3, 4)
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # The default model's folder is as it was.
    assert {p.name: p.read_bytes() for p in (data_dir / "GPT2Tokens").iterdir()} == original


def test_mean_pooling_is_the_mean_over_real_tokens_and_never_shares_a_folder_with_cls(text_data, tmp_path):
    data_dir = shutil.copytree(text_data["data_dir"], tmp_path / "data")
    folder = text_data["encoders"]["electra"]
    for pooling in ("cls", "mean"):
        report = text_features.extract_sentence_embeddings(data_dir, sentence_model=folder, pooling=pooling,
                                                         progress=False)
        assert report.ok, report.error
    assert (data_dir / "SentenceEmb-tiny-electra").is_dir() and not (data_dir / "BertEmb").exists()
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    name, text = next(iter(text_data["texts"].items()))
    with torch.no_grad():
        hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].numpy()
    # The batched step padded this text among longer ones: the mean is over its own tokens only.
    np.testing.assert_allclose(np.load(data_dir / "SentenceEmb-tiny-electra+mean" / f"{name}.npy"),
                               hidden.sum(0) / len(hidden), atol=1e-5)
    np.testing.assert_allclose(np.load(data_dir / "SentenceEmb-tiny-electra" / f"{name}.npy"), hidden[0], atol=1e-5)
    reports = context.write_context_vectors(data_dir, [1], progress=False, tag="tiny-electra+mean")
    assert reports[0].ok and reports[0].step == "context-1@tiny-electra+mean"
    vector = np.load(data_dir / "FullSentenceEmb1-tiny-electra+mean" / f"{name}.npy")
    np.testing.assert_allclose(vector[len(hidden[0]):2 * len(hidden[0])], hidden.mean(0), atol=1e-5)


def test_a_deberta_text_run_with_mean_pooled_context_trains_and_predict_gives_its_predictions(
        text_data, models_dir, tmp_path, capsys):
    data_dir = shutil.copytree(text_data["data_dir"], tmp_path / "data")
    deberta, electra = text_data["encoders"]["deberta-v2"], text_data["encoders"]["electra"]
    run_dir = tmp_path / "run"
    options = ["--branches", "text,context", "--text-model", deberta, "--sentence-model", electra,
               "--sentence-pooling", "mean"]
    # Each folder this run's options need is named, with the command that makes it.
    with pytest.raises(SystemExit, match=r"TextTokens-tiny-deberta-v2: not found .*feature_ext.py text-tokens"):
        main.main([run_dir, data_dir, models_dir, *SMALL, *options])
    assert text_features.extract_text_tokens(data_dir, text_model=deberta, progress=False).ok
    with pytest.raises(SystemExit, match=r"SentenceEmb-tiny-electra\+mean: not found .*sentence-embeddings .*"
                                         r"--sentence-pooling mean && python concatenate_embds.py"):
        main.main([run_dir, data_dir, models_dir, *SMALL, *options])
    assert text_features.extract_sentence_embeddings(data_dir, sentence_model=electra, pooling="mean", progress=False).ok
    assert context.write_context_vectors(data_dir, [1], progress=False, tag="tiny-electra+mean")[0].ok
    # MAX_TEXT_TOKENS 500 is more than the tiny DeBERTa's 128 positions: bounded by them.
    results = main.main([run_dir, data_dir, models_dir, "1", "500", "64", *SMALL[3:], *options])
    assert results["folds"][0]["test"]["ua"] >= 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["max_text_tokens"] == 128 and config["sentence_pooling"] == "mean"
    assert config["feature_folders"] == {"text": "TextTokens-tiny-deberta-v2",
                                         "context": "FullSentenceEmb1-tiny-electra+mean"}
    assert config["pretrained"]["sentence_model"]["path"] == str(electra)
    # predict.py on session 5's dialogues, from their text: the run's own test predictions.
    rows = [row for row in data_contract.read_manifest(data_dir) if row["session"] == 5]
    with open(tmp_path / "texts.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["wav", "text", "dialog"])
        writer.writerows(["", text_data["texts"][row["name"]], row["dialog"]] for row in rows)
    capsys.readouterr()
    assert predict.main([str(run_dir), "--list", str(tmp_path / "texts.csv"), "--output", str(tmp_path / "out.csv")]) == 0
    evaluated = {r["name"]: r for r in read_csv(run_dir / "fold1" / "predictions.csv")}
    out = read_csv(tmp_path / "out.csv")
    assert sum(row["name"] in evaluated for row in rows) == len(evaluated) > 0
    for row, given in zip(rows, out):
        if row["name"] in evaluated:
            for c in config["classes"]:
                assert float(given[f"p_{c}"]) == pytest.approx(float(evaluated[row["name"]][f"p_{c}"]), abs=2e-4)


def test_a_model_of_another_kind_is_refused_in_one_line_saying_what_it_is(text_data, models_dir, tmp_path, capsys):
    from transformers import WavLMConfig
    folder = tmp_path / "a-wavlm"
    WavLMConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(folder)
    data_dir = shutil.copytree(text_data["data_dir"], tmp_path / "data")
    report = text_features.extract_text_tokens(data_dir, text_model=folder, progress=False)
    assert "is a 'wavlm' model" in report.error and "DeBERTa-v2/v3" in report.error
    with pytest.raises(SystemExit, match="is a 'wavlm' model") as stop:
        main.main([tmp_path / "run", data_dir, models_dir, *SMALL, "--branches", "text", "--text-model", folder])
    assert "\n" not in str(stop.value)
