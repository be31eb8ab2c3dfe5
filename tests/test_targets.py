"""The target (main.py --target): the attributes trained with CCC through a whole run on the demo's data and
scored as the files say, the classes and the attributes at once, a broken loss that learns nothing, the
utterances rated but not labelled (folds unchanged, their speech features), and the options' checks."""
import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import f1_score

import main
from mmser import dimensional
from mmser.dimensional import ccc
from mmser.extraction import rows_of
from mmser.data_contract import read_manifest
from mmser.protocols import make_folds, official_fold
from mmser.settings import RunError
from small_runs import SMALL, read_csv, run_like_the_demo

ATTRIBUTES = ("valence", "arousal", "dominance")


def quiet_run(*args):
    with contextlib.redirect_stdout(io.StringIO()):
        return run_like_the_demo(*args)


@pytest.fixture(scope="module")
def dimensional_run(demo_run, tmp_path_factory):
    """The demo's data and settings with --target dimensional: -> (run_dir, results)."""
    run_dir = tmp_path_factory.mktemp("dimensional") / "run"
    return run_dir, quiet_run(demo_run[0], run_dir, "--target", "dimensional", "--epochs", "10")


@pytest.fixture(scope="module")
def both_run(demo_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("both") / "run"
    return run_dir, quiet_run(demo_run[0], run_dir, "--target", "both", "--epochs", "10")


def recomputed_ccc(predictions, attribute):
    known = [r for r in predictions if r[f"true_{attribute}"] != ""]
    return ccc([float(r[attribute]) for r in known], [float(r[f"true_{attribute}"]) for r in known])


def test_the_attributes_learn_with_ccc_and_the_files_say_so(dimensional_run):
    run_dir, results = dimensional_run
    test = results["folds"][0]["test"]
    assert all(test[f"{a}_ccc"] > 0.4 for a in ATTRIBUTES), test  # a constant prediction scores 0
    # CCC recomputed from predictions.csv: true and predicted value per attribute, on IEMOCAP's 1-5
    predictions = read_csv(run_dir / "fold1" / "predictions.csv")
    assert list(predictions[0]) == ["name", "true_valence", "true_arousal", "true_dominance", *ATTRIBUTES]
    assert len(predictions) == results["folds"][0]["n_test"] == 64
    for a in ATTRIBUTES:
        assert recomputed_ccc(predictions, a) == pytest.approx(test[f"{a}_ccc"], abs=1e-4)
    assert test["ccc"] == pytest.approx(np.mean([test[f"{a}_ccc"] for a in ATTRIBUTES]))
    pooled = results["summary"]["pooled"]
    assert pooled["mae"] == pytest.approx(np.mean([np.mean([abs(float(r[a]) - float(r[f"true_{a}"]))
                                                            for r in predictions]) for a in ATTRIBUTES]), abs=1e-4)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["target"], config["attribute_loss"], config["select_by"]) == ("dimensional", "ccc", "val_ccc")
    assert config["attributes"] == {a: [1, 5] for a in ATTRIBUTES}
    # the checkpoint is the epoch of the best validation mean CCC, and the log line shows that figure
    history = json.loads((run_dir / "fold1" / "fold_result.json").read_text())["history"]
    assert results["folds"][0]["best_epoch"] == 1 + int(np.argmax([h["val_ccc"] for h in history]))
    assert "val CCC valence" in (run_dir / "train.log").read_text()
    summary = (run_dir / "summary.md").read_text()
    assert summary.split("\n")[2].startswith("**CCC valence") and "| valence | 1 to 5 | 64 |" in summary
    assert (run_dir / "fold1" / "attributes.png").is_file() and not (run_dir / "fold1" / "confusion_matrix.png").exists()


def test_both_targets_from_one_head_score_classes_and_attributes(both_run):
    run_dir, results = both_run
    test = results["folds"][0]["test"]
    assert test["ua"] > 0.5 and all(test[f"{a}_ccc"] > 0.3 for a in ATTRIBUTES), test
    predictions = read_csv(run_dir / "fold1" / "predictions.csv")
    assert list(predictions[0])[:3] == ["name", "true", "predicted"] and list(predictions[0])[-3:] == list(ATTRIBUTES)
    assert f1_score([r["true"] for r in predictions], [r["predicted"] for r in predictions],
                    average="macro") == pytest.approx(test["macro_f1"])
    assert recomputed_ccc(predictions, "arousal") == pytest.approx(test["arousal_ccc"], abs=1e-4)
    # --target both chooses by the mean of validation UA and mean CCC
    history = json.loads((run_dir / "fold1" / "fold_result.json").read_text())["history"]
    assert results["folds"][0]["best_epoch"] == 1 + int(np.argmax([h["val_ua"] + h["val_ccc"] for h in history]))
    assert json.loads((run_dir / "config.json").read_text())["select_by"] == "val_ua_ccc"


def test_a_loss_with_its_sign_flipped_learns_no_agreement(demo_run, tmp_path, monkeypatch):
    real = dimensional.attribute_loss
    monkeypatch.setattr(dimensional, "attribute_loss", lambda p, t, kind="ccc": -real(p, t, kind))
    results = quiet_run(demo_run[0], tmp_path / "run", "--target", "dimensional", "--epochs", "4")
    assert all(results["folds"][0]["test"][f"{a}_ccc"] < 0.1 for a in ATTRIBUTES)


def test_a_categorical_run_writes_no_setting_of_the_attributes(demo):
    assert not {"target", "attributes", "attribute_loss", "attribute_utterances", "test_set"} & set(demo["config"])


# ------------------------------------------------------------------------------------------------
# the utterances rated but not labelled

def test_every_rated_utterance_trains_the_attributes_with_the_folds_of_the_labelled_unchanged(demo_run, tmp_path):
    rows = read_manifest(demo_run[0] / "data")
    results = quiet_run(demo_run[0], tmp_path / "run", "--target", "dimensional", "--attribute-utterances", "rated",
                        "--branches", "text,context", "--epochs", "2")
    fold = results["folds"][0]
    # session 5's every utterance is tested; the labelled ones' 211/24 split of sessions 1-4 gains the others
    assert fold["n_test"] == fold["test"]["attribute_n"]["valence"] == sum(r["session"] == 5 for r in rows) == 80
    assert fold["n_train"] + fold["n_val"] == sum(r["session"] < 5 for r in rows)
    assert fold["n_val"] == 24  # validation stays the labelled stratified share
    assert "every utterance that has them" in (tmp_path / "run" / "summary.md").read_text()


def utterances_of(spec):
    """Utterance dicts from (session, speaker, dialog, label) tuples."""
    return [{"index": i, "name": str(i), "session": s, "speaker": sp, "dialog": d, "label": label, "group": d}
            for i, (s, sp, d, label) in enumerate(spec)]


@pytest.mark.parametrize("protocol, val_split", [("session5", "stratified"), ("loso", "speaker"),
                                                 ("speaker", "stratified"), ("session5", "original"),
                                                 ("loso", "in-train-session"), ("folds", "stratified")])
def test_unlabelled_utterances_join_the_folds_without_moving_a_labelled_one(protocol, val_split):
    rng = np.random.default_rng(0)
    spec = [(s, f"S{s}{sp}", f"d{s}{k}", int(rng.integers(4)) if rng.random() < 0.6 else -1)
            for s in range(1, 6) for k in range(2) for sp in "FM" for _ in range(8)]
    utterances = utterances_of(spec)
    labelled = [u for u in utterances if u["label"] >= 0]
    kwargs = {"fold_by": "group"} if protocol == "folds" else {}
    alone = make_folds(labelled, protocol, val_split, 0.2, 3, **kwargs)
    joined = make_folds(utterances, protocol, val_split, 0.2, 3, **kwargs)
    for a, b in zip(alone, joined):
        for part in ("train", "val", "test"):
            assert [u["index"] for u in b[part] if u["label"] >= 0] == [u["index"] for u in a[part]]
            assert [u["index"] for u in b[part]] == sorted(u["index"] for u in b[part])
        tested = {(u["session"], u["dialog"]) for u in b["test"]}
        trained = {(u["session"], u["dialog"]) for u in b["train"]}
        assert not tested & trained  # no test dialogue trains, whichever utterance it is
        assert {u["speaker"] for u in b["test"]} == {u["speaker"] for u in a["test"]}
        assert any(u["label"] < 0 for u in b["test"]) and any(u["label"] < 0 for u in b["train"])


def test_the_official_protocol_tests_the_set_named_and_keeps_the_withheld_apart():
    spec = [(0, "a", "p1", 0), (0, "a", "p1", 1), (0, "b", "p2", 0), (0, "b", "p2", -1), (0, "c", "p3", 1),
            (0, "c", "p3", -1), (0, "d", "p4", -1)]
    utterances = utterances_of(spec)
    for u, split in zip(utterances, ("train", "train", "dev", "dev", "test", "test2", "test3")):
        u["split"] = split
    fold = official_fold(utterances, "test2", ["test3"])
    assert [u["index"] for u in fold["test"]] == [5] and fold["test_split"] == ["test2"]
    assert [u["index"] for u in fold["val"]] == [2, 3] and [u["index"] for u in fold["withheld"]["test3"]] == [6]
    with pytest.raises(RunError, match="--test-set test3: the corpus withholds its labels"):
        official_fold(utterances, "test3", ["test3"])


def test_the_speech_steps_read_the_rated_and_withheld_rows_whose_audio_was_written(tmp_path):
    header = ("name,utterance_id,session,dialog,speaker,gender,start,end,emotion,label,valence,activation,dominance,"
              "transcript,split\n")
    lines = ["0_s_0_A,a,0,d,s,F,,,A,angry,2,3,4,x,train", "1_s_0_X,b,0,d,s,F,,,X,,2,3,4,x,train",
             "2_s_0_X,c,0,d,s,F,,,X,,2,3,4,x,train", "3_s_0_xxx,d,0,d,s,F,,,,,,,,,test3",
             "4_s_0_xxx,e,0,d,s,F,,,,,,,,x,train"]
    (tmp_path / "utterances.csv").write_text(header + "\n".join(lines) + "\n")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["angry", "sad"], "withheld": ["test3"],
                                                       "attributes": {"valence": [1, 7]}}))
    (tmp_path / "Audio").mkdir()
    for name in ("0_s_0_A", "1_s_0_X", "3_s_0_xxx", "4_s_0_xxx"):  # 2: rated, its audio not written
        (tmp_path / "Audio" / f"{name}.wav").write_bytes(b"")
    manifest = read_manifest(tmp_path)
    assert [r["name"] for r in rows_of("speech-tokens", manifest, tmp_path)] == ["0_s_0_A", "1_s_0_X", "3_s_0_xxx"]
    assert [r["name"] for r in rows_of("speech-tokens", manifest)] == ["0_s_0_A"]  # without DATA_DIR: as before
    assert len(rows_of("text-tokens", manifest, tmp_path)) == 5


# ------------------------------------------------------------------------------------------------
# the options

@pytest.mark.parametrize("options, message", [
    (["--select-by", "val_ccc"], "--select-by val_ccc chooses by a figure a --target categorical run does not"),
    (["--target", "dimensional", "--select-by", "val_ua"], "its own is val_ccc"),
    (["--attribute-loss", "mse"], "--attribute-loss apply to the attributes: give --target dimensional or both"),
    (["--target", "dimensional", "--attribute-weight", "2"], "it applies to --target both"),
    (["--target", "dimensional", "--one-vs-rest"], "--one-vs-rest apply to the classes, which --target dimensional"),
    (["--target", "both", "--attribute-weight", "0"], "--attribute-weight must be positive"),
    (["--test-set", "test2"], "it applies to --protocol official"),
])
def test_target_options_that_do_not_apply_are_refused(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit):
        main.main([tmp_path / "run", tmp_path, tmp_path, *SMALL, *options])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_corpus_without_attributes_is_named(tmp_path, data_dir, models_dir):
    meld_like = tmp_path / "data"
    shutil.copytree(data_dir, meld_like)
    manifest = (meld_like / "utterances.csv").read_text().replace(",2.5,2.5,2.5,", ",,,,")
    (meld_like / "utterances.csv").write_text(manifest)
    with pytest.raises(SystemExit, match="the corpus rates no attribute .* --target dimensional needs them"):
        main.main([tmp_path / "run", meld_like, models_dir, *SMALL, "--target", "dimensional"])
