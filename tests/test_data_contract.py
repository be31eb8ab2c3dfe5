"""The data contract's tables and readers: one place that every stage asks."""
import pytest

from mmser import data_contract
from mmser.context import dialogues
from mmser.data_contract import (BRANCHES, CLASSES, MANIFEST_COLUMNS, STEPS, DataError, branch_steps, feature_path,
                           label_set, pretrained_roles, read_manifest)
from mmser.speech.routes import speech_models


def write_manifest(folder, rows):
    lines = [",".join(MANIFEST_COLUMNS)]
    for i, (label, dialog) in enumerate(rows):
        cells = {"name": f"{i}_s_1_{label or 'xxx'}", "utterance_id": f"{dialog}_F{i:03d}", "session": "1",
                 "dialog": dialog, "speaker": "Ses01F", "gender": "F", "start": "0", "end": "1",
                 "emotion": label or "xxx", "label": label, "valence": "1", "activation": "1", "dominance": "1",
                 "transcript": "hello"}
        lines.append(",".join(cells[c] for c in MANIFEST_COLUMNS))
    (folder / "utterances.csv").write_text("\n".join(lines) + "\n")


def test_every_branch_reads_a_folder_that_a_step_writes_and_names_its_pretrained_files():
    models = speech_models()  # the speech branch reads its route's step: the original's by default
    for branch in BRANCHES:
        steps = branch_steps(branch, 2, models)
        assert steps and all(data_contract.step_entry(step).folder for step in steps)
    assert feature_path("D", "context", "7_s_1_neu", 2).as_posix() == "D/FullBertEmb2/7_s_1_neu.npy"
    assert feature_path("D", "speech", "7_s_1_neu", 2, models).as_posix() == "D/vqw2vTokens/7_s_1_neu.npy"
    assert branch_steps("speech", 2) == []  # no route named, no step
    assert pretrained_roles("speech", models) == ["speech_model", "vq_wav2vec", "speech_dictionary"]
    assert pretrained_roles("context") == ["sentence_model"]
    assert {role for step in STEPS.values() for role in step.models} >= {"text_tokenizer", "sentence_model"}


def test_the_label_set_is_the_classes_the_manifest_has_in_the_fixed_order(tmp_path):
    write_manifest(tmp_path, [("sad", "d1"), ("", "d1"), ("ang", "d1"), ("neu", "d2"), ("sad", "d2")])
    assert label_set(read_manifest(tmp_path)) == ["ang", "sad", "neu"]
    write_manifest(tmp_path, [(c, "d") for c in reversed(CLASSES)])
    assert label_set(read_manifest(tmp_path)) == list(CLASSES)


def test_read_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="utterances.csv: no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "utterances.csv").write_text("name,emotion\n0_s_1_neu,neu\n")
    with pytest.raises(DataError, match="utterances.csv: header"):
        read_manifest(tmp_path)
    (tmp_path / "utterances.csv").write_text(",".join(MANIFEST_COLUMNS) + "\n"
                                             + "0_s_x_neu,id,x" + ",d" * 11 + "\n")
    with pytest.raises(DataError, match=r"utterances.csv:2:"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, [("fru", "d1")])
    with pytest.raises(DataError, match=r"utterances.csv:2: label 'fru' is not one of"):
        read_manifest(tmp_path)


def test_dialogues_group_equal_keys_in_order_and_leave_others_alone():
    assert dialogues(["a", "b", "a", None, "b", None]) == [[0, 2], [1, 4], [3], [5]]
    assert dialogues([]) == []


def test_model_tag_names_one_folder_per_model(tmp_path):
    from mmser.data_contract import model_tag
    assert model_tag("microsoft/wavlm-large") == "microsoft--wavlm-large"
    assert model_tag("roberta-large") == "roberta-large"
    local = tmp_path / "my wavlm"
    local.mkdir()
    assert model_tag(str(local) + "/") == "my_wavlm"
    with pytest.raises(ValueError):
        model_tag("/")


def test_qualified_step_instances_have_folders_of_their_own(tmp_path, monkeypatch):
    from mmser.data_contract import Step, feature_folder, qualified_step, split_step
    monkeypatch.setitem(STEPS, "layers", Step(None, "labelled", ("encoder",), per_model="Layers-{model}"))
    name = qualified_step("layers", "wavlm-large", "ASR-whisper")
    assert name == "ASR-whisper/layers@wavlm-large"
    assert split_step(name) == ("ASR-whisper", "layers", "wavlm-large")
    assert feature_folder(tmp_path, name) == tmp_path / "ASR-whisper" / "Layers-wavlm-large"
    assert feature_folder(tmp_path, qualified_step("context-2", transcripts="ASR-whisper")) == \
        tmp_path / "ASR-whisper" / "FullBertEmb2"
    assert feature_folder(tmp_path, "text-tokens") == tmp_path / "GPT2Tokens"
    with pytest.raises(ValueError, match="needs a model"):
        feature_folder(tmp_path, "layers")
    with pytest.raises(ValueError, match="no per-model folders"):
        feature_folder(tmp_path, "speech-tokens@other")


def test_other_text_and_sentence_models_and_mean_pooling_have_folders_of_their_own(tmp_path):
    from mmser.data_contract import feature_folder, instance_tag, sentence_tag, text_models
    local = tmp_path / "roberta-large"
    local.mkdir()
    # The original models keep the original folders, however they are named.
    for name in (None, "roberta-large", "FacebookAI/roberta-large", str(local)):
        assert instance_tag("text-tokens", name) is None
    assert sentence_tag("google-bert/bert-base-uncased") is None and text_models() == {}
    models = text_models("microsoft/deberta-v3-large", None, "mean")
    assert models == {"text-tokens": "microsoft--deberta-v3-large", "sentence-embeddings": "bert-base-uncased+mean"}
    assert feature_path("D", "text", "0_s_1_neu", 2, models).as_posix() == \
        "D/TextTokens-microsoft--deberta-v3-large/0_s_1_neu.npy"
    assert branch_steps("context", 2, models) == ["sentence-embeddings@bert-base-uncased+mean",
                                                  "context-2@bert-base-uncased+mean"]
    assert [feature_folder("D", step).as_posix() for step in branch_steps("context", 2, models)] == \
        ["D/SentenceEmb-bert-base-uncased+mean", "D/FullSentenceEmb2-bert-base-uncased+mean"]
    (tmp_path / "bert-base-uncased").mkdir()
    local_bert = text_models(sentence_model=str(tmp_path / "bert-base-uncased"))
    assert feature_path("D", "context", "0_s_1_neu", 2, local_bert).as_posix() == "D/FullBertEmb2/0_s_1_neu.npy"
