"""Serving is training: predict.py's features of a corpus utterance are the extracted files, bit for bit,
for every branch (text ids, speech, context vector) and every encoder family the tool takes: the
fairseq speech tokens and the layer means of a tiny WavLM, HuBERT, wav2vec 2.0, data2vec-audio and
Whisper; RoBERTa's and DeBERTa-v2's text ids; BERT's [CLS] and DeBERTa-v2's mean-pooled sentence
embeddings. The model inputs made from them are the training data's too."""
import csv
import shutil

import numpy as np
import pytest
import torch

from fixtures import tiny_models
from mmser import predictor, speech_encoders, steps
from mmser.context import write_context_vectors
from mmser.data_contract import branch_steps, feature_folder, read_manifest, sentence_tag, text_models
from mmser.dataset_loader import load_utterances
from mmser.speech.routes import route_of, speech_models
from mmser.settings import RunSettings

C = 2  # the context window
DIALOGUE_ROWS = 9  # of each of two dialogues: extraction embeds both in one batch, predict.py each alone
FAMILIES = tiny_models.TINY_SPEECH_FAMILIES


@pytest.fixture(scope="module")
def corpus(demo, tmp_path_factory):
    """Two dialogues of the demo's corpus (their first rows), every feature extracted: the defaults, each
    tiny speech encoder's layer means, and a tiny DeBERTa-v2's text ids and mean-pooled sentence
    embeddings. -> {"data_dir", "models_dir", "encoders": {family: folder}, "deberta", "rows"}."""
    root = tmp_path_factory.mktemp("serving")
    source, data_dir, models_dir = demo["data_dir"], root / "data", demo["run_dir"] / "models"
    with open(source / "utterances.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    dialogues = list(dict.fromkeys(cells[3] for cells in table[1:] if cells[2] == "5"))[:2]
    kept = [cells for d in dialogues for cells in [c for c in table[1:] if c[3] == d][:DIALOGUE_ROWS]]
    (data_dir / "Audio").mkdir(parents=True)
    (data_dir / "Text").mkdir()
    with open(data_dir / "utterances.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([table[0], *kept])
    shutil.copy(source / "classes.json", data_dir)
    for cells in kept:
        shutil.copy(source / "Text" / f"{cells[0]}.txt", data_dir / "Text")
        if (source / "Audio" / f"{cells[0]}.wav").is_file():
            shutil.copy(source / "Audio" / f"{cells[0]}.wav", data_dir / "Audio")
    encoders = {family: tiny_models.make_tiny_speech_encoder(root / family, family) for family in FAMILIES}
    deberta = tiny_models.make_tiny_text_encoder(root / "deberta", "deberta-v2",
                                                 [row["transcript"] for row in read_manifest(source)])
    reports = steps.extract_features(data_dir, models_dir, contexts=[C], progress=False)
    reports += [route_of(folder).extract(data_dir, models_dir, progress=False) for folder in encoders.values()]
    reports += [steps.run_step("text-tokens", data_dir, models_dir, text_model=str(deberta), progress=False),
                steps.run_step("sentence-embeddings", data_dir, models_dir, sentence_model=str(deberta),
                               sentence_pooling="mean", progress=False)]
    reports += write_context_vectors(data_dir, [C], progress=False, tag=sentence_tag(str(deberta), "mean"))
    assert all(report.ok for report in reports), [(r.step, r.error, r.failed) for r in reports if not r.ok]
    return {"data_dir": data_dir, "models_dir": models_dir, "encoders": encoders, "deberta": deberta,
            "rows": read_manifest(data_dir)}


def predicted(corpus, branches, speech_model=None, text_model=None, sentence_model=None, pooling="cls",
              finetune=False, max_text_tokens=512, max_audio_tokens=4096):
    """predict.py's way over the corpus's rows given as a user would (the labelled ones with their wav,
    the others as context, both dialogues in order): (config, extractors, predict.py's rows, the run's
    non-default models as data_contract.branch_steps takes them)."""
    data_dir, models_dir = corpus["data_dir"], corpus["models_dir"]
    speech_model = str(speech_model or models_dir / "bert_kmeans" / "bert_kmeans.pt")
    text_model, sentence_model = (str(text_model or models_dir / "roberta-large"),
                                  str(sentence_model or models_dir / "bert-base-uncased"))
    config = RunSettings(branches=branches, context_window=C, sentence_pooling=pooling, speech_model=speech_model,
                         finetune_speech=finetune, max_text_tokens=max_text_tokens, max_audio_tokens=max_audio_tokens)
    paths = {"text_tokenizer": text_model, "sentence_model": sentence_model, "speech_encoder": speech_model,
             "vq_wav2vec": models_dir / "vq-wav2vec_kmeans.pt", "speech_dictionary": models_dir / "bert_kmeans" / "dict.txt"}
    rows = [{"_wav_path": data_dir / "Audio" / f"{row['name']}.wav" if row["label"] else None,
             "text": (data_dir / "Text" / f"{row['name']}.txt").read_text(encoding="utf-8"), "dialog": row["dialog"]}
            for row in corpus["rows"]]
    models = {**text_models(text_model, sentence_model, pooling), **speech_models(speech_model)}
    return config, predictor.load_extractors(config, paths, torch.device("cpu")), rows, models


def assert_features_are_the_files(corpus, branches, batched=False, **models):
    """predict.py's features equal the extraction's files: bit for bit, or, where the extraction
    batched utterances of different lengths (`batched`), within 1e-5 (the same function, a batch of one)."""
    config, extractors, rows, step_models = predicted(corpus, branches, **models)
    notes = {}
    features = predictor.utterance_features(rows, config, extractors, notes)
    # Rows with a recording, or, without the speech branch, every row (all have text).
    asked = [i for i, row in enumerate(corpus["rows"]) if row["label"] or "speech" not in branches]
    assert not notes and sorted(features) == asked
    for i, made in features.items():
        assert sorted(made) == sorted(branches)
        for branch, array in made.items():
            folder = feature_folder(corpus["data_dir"], branch_steps(branch, C, step_models)[-1])
            stored = np.load(folder / f"{corpus['rows'][i]['name']}.npy")
            assert array.dtype == stored.dtype, (folder.name, i)
            if batched:
                np.testing.assert_allclose(array, stored, rtol=0, atol=1e-5, err_msg=f"{folder.name} {i}")
            else:
                assert np.array_equal(array, stored), (folder.name, i)


def test_the_original_route_s_features_are_the_extracted_files_and_its_inputs_the_training_data_s(corpus):
    assert_features_are_the_files(corpus, ["text", "speech", "context"])
    # With token limits that cut sequences, as a run's: predict.py's model inputs are the training data's.
    config, extractors, rows, models = predicted(corpus, ["text", "speech", "context"], max_text_tokens=6,
                                                 max_audio_tokens=40)
    items = predictor.featurize(rows, config, extractors, notes={})
    loaded = {u["name"]: u for u in load_utterances(corpus["data_dir"], C, 6, 40, ("text", "speech", "context"),
                                                    progress=False, models=models)}
    assert len(items) == len(loaded) and any(len(u["speech_ids"]) == 40 for u in loaded.values())
    for item in items:
        expected = loaded[corpus["rows"][item["index"]]["name"]]
        for key in ("text_ids", "speech_ids", "context"):
            assert item[key].dtype == expected[key].dtype and torch.equal(item[key], expected[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_every_speech_encoder_s_layer_means_are_the_extracted_files(corpus, family):
    # The tiny WavLM and HuBERT (layer-norm front end) and Whisper batch any lengths; the others only equal ones.
    speech = speech_encoders.load_speech_model(corpus["encoders"][family])
    assert speech.pads_freely == (family in ("wavlm", "hubert", "whisper"))
    assert_features_are_the_files(corpus, ["speech"], batched=speech.pads_freely,
                                  speech_model=corpus["encoders"][family])


def test_another_text_encoder_and_sentence_model_give_the_extracted_files(corpus):
    deberta = corpus["deberta"]
    assert_features_are_the_files(corpus, ["text", "context"], text_model=deberta, sentence_model=deberta,
                                  pooling="mean")


@pytest.mark.parametrize("family", ["wavlm", "whisper"])
def test_a_fine_tuned_encoder_s_waveform_input_is_the_training_data_s(corpus, family):
    folder = corpus["encoders"][family]
    config, extractors, rows, _ = predicted(corpus, ["speech"], speech_model=folder, finetune=True)
    items = predictor.featurize(rows, config, extractors, notes={})
    route = route_of(folder, finetune=True)
    for item in items:
        expected = route.load_input(corpus["data_dir"], corpus["rows"][item["index"]]["name"], None)["speech_wave"]
        assert torch.equal(item["speech_wave"], expected)
