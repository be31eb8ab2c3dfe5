"""What main.py's training options do, seen in the files a run writes: newbob, gradient
accumulation, balanced class weights, the validation splits and the speaker protocol."""
import json
import math

import pytest
import torch

from mmser.data_contract import CLASSES
from small_runs import checkpoint_weights, fold_result, manifest, read_csv, run_main, write_feature_dir

# Settings under which validation UA improves after the first epoch, then stalls: newbob gives
# both of its answers (checked by the tests, which say so if these settings stop doing it).
NEWBOB = ["--scheduler", "newbob", "--epochs", "4", "--lr-encoders", "1e-4", "--lr-head", "1e-3",
          "--grad-accum", "2", "--class-weights", "balanced"]
NEWBOB_THRESHOLD = 0.001  # the least gain in validation UA that counts as progress (main.py --help)


@pytest.fixture(scope="module")
def newbob_run(tmp_path_factory, data_dir, models_dir):
    run_dir = tmp_path_factory.mktemp("newbob")
    run_main(run_dir, data_dir, models_dir, *NEWBOB)
    return run_dir


def stalled_epochs(history):
    """Epochs whose validation UA beat the best before them by less than newbob's threshold."""
    best, stalled = history[0]["val_ua"], []
    for h in history[1:]:
        if h["val_ua"] - best < NEWBOB_THRESHOLD:
            stalled.append(h["epoch"])
        best = max(best, h["val_ua"])
    return stalled


def test_newbob_halves_the_rate_after_each_epoch_that_stalls(newbob_run):
    history = fold_result(newbob_run)["history"]
    stalled = stalled_epochs(history)
    assert stalled and stalled[0] > 2, f"NEWBOB's settings no longer improve, then stall: {history}"
    lr = history[0]["lr"]
    for before, h in zip(history, history[1:]):
        lr = lr / 2 if before["epoch"] in stalled else lr
        assert h["lr"] == lr, history
    log = (newbob_run / "train.log").read_text()
    assert f"newbob: lr halved, back to epoch {stalled[0] - 1}'s weights" in log


def test_newbob_goes_back_to_the_best_weights_and_resumes_exactly(tmp_path, newbob_run, data_dir, models_dir):
    """Stopped before the first stall, the resumed run must judge it by the best score kept in
    last.pt and go back to the best weights kept there; stopped after it, last.pt holds them."""
    stall = stalled_epochs(fold_result(newbob_run)["history"])[0]
    run_dir = tmp_path / "run"
    assert run_main(run_dir, data_dir, models_dir, *NEWBOB, "--stop-after-epochs", str(stall - 1)) is None
    assert run_main(run_dir, data_dir, models_dir, *NEWBOB, "--stop-after-epochs", "1") is None
    last = torch.load(run_dir / "fold1" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == stall
    best = checkpoint_weights(run_dir / "fold1" / "best.pt")
    assert last["model"].keys() == best.keys()
    assert all(torch.equal(last["model"][k], best[k]) for k in best)
    run_main(run_dir, data_dir, models_dir, *NEWBOB)
    assert fold_result(run_dir)["history"] == fold_result(newbob_run)["history"]
    assert (run_dir / "fold1" / "predictions.csv").read_bytes() == (newbob_run / "fold1" / "predictions.csv").read_bytes()


def test_gradient_accumulation_steps_once_per_micro_batches_and_the_schedule_counts_steps(tmp_path, data_dir,
                                                                                           models_dir):
    run_dir = tmp_path / "run"
    options = ["--branches", "context", "--epochs", "2", "--batch-size", "8", "--grad-accum", "2"]
    assert run_main(run_dir, data_dir, models_dir, *options, "--stop-after-epochs", "1") is None
    optimizer = torch.load(run_dir / "fold1" / "last.pt", weights_only=True)["optimizer"]
    steps = {int(state["step"]) for state in optimizer["state"].values()}
    run_main(run_dir, data_dir, models_dir, *options)
    fold = fold_result(run_dir)
    micro_batches = math.ceil(fold["n_train"] / 8)  # 72 utterances: 9, the last one step alone
    assert steps == {math.ceil(micro_batches / 2)}
    # The linear schedule reaches 0 with the last optimizer step, not after as many as micro-batches.
    assert fold["history"][0]["lr"] > 0 and fold["history"][1]["lr"] == 0


def test_balanced_class_weights_weigh_the_training_loss(tmp_path, data_dir, models_dir):
    options = ["--branches", "context", "--epochs", "1"]
    run_main(tmp_path / "plain", data_dir, models_dir, *options)
    run_main(tmp_path / "balanced", data_dir, models_dir, *options, "--class-weights", "balanced")
    assert json.loads((tmp_path / "balanced" / "config.json").read_text())["class_weights"] == "balanced"
    plain, balanced = (fold_result(tmp_path / name)["history"][0] for name in ("plain", "balanced"))
    # The same seed, batches and initial weights: only the loss's weighting differs.
    assert balanced["train_loss"] != pytest.approx(plain["train_loss"], abs=1e-4)


# ------------------------------------------------------------------------------------------------
# validation splits and protocols

def class_counts(rows):
    return [sum(row["label"] == c for row in rows) for c in CLASSES]


def split_class_counts(metrics):
    """The class counts of a split, from its confusion matrix (rows: the true class)."""
    return [sum(row) for row in metrics["confusion_matrix"]]


def test_val_split_original_tests_the_f_speaker_and_validates_on_the_m_speaker(tmp_path, data_dir, models_dir):
    run_dir = tmp_path / "run"
    results = run_main(run_dir, data_dir, models_dir, "--branches", "context", "--epochs", "1",
                       "--val-split", "original")
    labelled = [row for row in manifest(data_dir) if row["label"]]
    tested = [row for row in labelled if row["speaker"] == "Ses05F"]
    validated = [row for row in labelled if row["speaker"] == "Ses05M"]
    (fold,) = results["folds"]
    assert fold["test_sessions"] == [5] and fold["test_speakers"] == ["Ses05F"]
    assert (fold["n_train"], fold["n_val"], fold["n_test"]) == (
        sum(row["session"] != 5 for row in labelled), len(validated), len(tested))
    assert [row["name"] for row in read_csv(run_dir / "fold1" / "predictions.csv")] == [row["name"] for row in tested]
    assert split_class_counts(fold_result(run_dir)["val"]) == class_counts(validated)
    assert "the test session also chooses the checkpoint" in (run_dir / "summary.md").read_text()


def test_speaker_protocol_tests_each_speaker_and_trains_on_neither_of_their_session(tmp_path, models_dir):
    """Two sessions, so four folds; validation by a held-out training speaker (--val-split speaker)."""
    data_dir = write_feature_dir(tmp_path / "data", sessions=(4, 5))
    run_dir = tmp_path / "run"
    results = run_main(run_dir, data_dir, models_dir, "--branches", "context", "--epochs", "1",
                       "--protocol", "speaker", "--val-split", "speaker")
    labelled = [row for row in manifest(data_dir) if row["label"]]
    speakers = ["Ses04F", "Ses04M", "Ses05F", "Ses05M"]
    by_speaker = {s: [row for row in labelled if row["speaker"] == s] for s in speakers}
    assert [f["test_speakers"] for f in results["folds"]] == [[s] for s in speakers]
    for k, (fold, speaker) in enumerate(zip(results["folds"], speakers), 1):
        tested = by_speaker[speaker]
        assert [row["name"] for row in read_csv(run_dir / f"fold{k}" / "predictions.csv")] == [r["name"] for r in tested]
        # The speaker's session partner shares their dialogues: the fold trains and validates on
        # the other session's speakers alone (Ses0{n} names the session).
        others = {s: rows for s, rows in by_speaker.items() if s[:5] != speaker[:5]}
        assert fold["n_train"] + fold["n_val"] == sum(map(len, others.values())) and fold["n_test"] == len(tested)
        val_counts = split_class_counts(fold_result(run_dir, k)["val"])
        assert any(len(rows) == fold["n_val"] and class_counts(rows) == val_counts for rows in others.values()), \
            f"fold {k}: the validation set is no single training speaker"
    assert sum(map(sum, results["summary"]["pooled"]["confusion_matrix"])) == len(labelled)
