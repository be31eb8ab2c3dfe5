"""main.py end to end: folds, the run folder, resuming, bad runs, torchrun, the demo.

What each training option does (schedulers, gradient accumulation, class weights, validation
splits, protocols) is in test_training_options.py.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from mmser import train_function
from small_runs import (SMALL, checkpoint_weights, fold_result, manifest, read_csv, run_like_the_demo,
                        run_main)
from mmser.protocols import make_folds

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir, models_dir):
    run_dir = tmp_path_factory.mktemp("run")
    results = run_main(run_dir, data_dir, models_dir)
    return run_dir, results


# ------------------------------------------------------------------------------------------------
# folds

def utterances_of(sessions=(1, 2, 3, 4, 5), per_speaker=10):
    return [{"index": i, "name": f"{i}", "session": s, "speaker": f"Ses0{s}{g}", "label": i % 4}
            for i, (s, g, _) in enumerate((s, g, n) for s in sessions for g in "FM" for n in range(per_speaker))]


@pytest.mark.parametrize("protocol,n_folds", [("session5", 1), ("loso", 5), ("speaker", 10)])
@pytest.mark.parametrize("val_split", ["stratified", "speaker", "original"])
def test_test_utterances_never_train_or_validate(protocol, n_folds, val_split):
    utterances = utterances_of()
    folds = make_folds(utterances, protocol, val_split, seed=0)
    assert len(folds) == n_folds
    for fold in folds:
        train, val, test = ({u["index"] for u in fold[k]} for k in ("train", "val", "test"))
        assert train and val and test and not (train & val) and not (train & test) and not (val & test)
        test_sessions = {u["session"] for u in fold["test"]}
        # The test speaker's dialogues (their words are in each other's context) never train.
        assert not test_sessions & {u["session"] for u in fold["train"]}
        if val_split == "original":
            assert {u["session"] for u in fold["val"]} == test_sessions
            assert not {u["speaker"] for u in fold["val"]} & {u["speaker"] for u in fold["test"]}
        else:
            assert not test_sessions & {u["session"] for u in fold["val"]}
        if val_split == "speaker":
            assert len({u["speaker"] for u in fold["val"]}) == 1


def test_protocol_folds_hold_out_what_they_say():
    folds = make_folds(utterances_of(), "loso")
    assert [f["test_sessions"] for f in folds] == [[1], [2], [3], [4], [5]]
    speaker_folds = make_folds(utterances_of(), "speaker")
    assert [f["test_speakers"] for f in speaker_folds][:2] == [["Ses01F"], ["Ses01M"]]
    stratified = make_folds(utterances_of(per_speaker=40), "session5", val_fraction=0.1)[0]
    assert len(stratified["val"]) == 32 and sorted(u["label"] for u in stratified["val"]) == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8


# ------------------------------------------------------------------------------------------------
# a run

def test_run_folder_holds_config_checkpoints_predictions_figures_and_results(finished_run, data_dir):
    run_dir, results = finished_run
    config = json.loads((run_dir / "config.json").read_text())
    # everything predict.py must repeat
    for key in ("data_dir", "text_model", "speech_model", "context_window", "max_text_tokens", "max_audio_tokens",
                "branches", "classes", "context_width", "finetune_speech", "fusion_hidden", "val_split_description"):
        assert key in config
    assert config["classes"] == ["ang", "hap", "sad", "neu"] and config["context_width"] == 16
    assert config["data_dir"] == str(Path(data_dir).resolve())

    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["protocol"] == "session5" and saved["val_split"] == "stratified" and set(saved["summary"]) == {
        "wa_mean", "wa_std", "ua_mean", "ua_std", "macro_f1_mean", "macro_f1_std", "weighted_f1_mean",
        "weighted_f1_std", "std", "pooled"}
    # One fold, one seed: no spread to show, and the table shows none ("± 0.0000" would claim one).
    assert saved["summary"]["ua_std"] is None and saved["summary"]["std"].startswith("none")
    assert "±" not in (run_dir / "summary.md").read_text().split("Spread:")[0]
    fold = saved["folds"][0]
    assert set(fold) == {"fold", "test_sessions", "n_train", "n_val", "n_test", "test", "best_epoch", "val"}
    assert 1 <= fold["best_epoch"] <= 3 and set(fold["val"]) >= {"wa", "ua", "macro_f1", "loss"}
    assert fold["test_sessions"] == [5] and fold["n_train"] + fold["n_val"] == 80 and fold["n_test"] == 20
    assert set(fold["test"]) == {"wa", "ua", "macro_f1", "weighted_f1", "per_class_recall", "confusion_matrix"}
    assert set(fold["test"]["per_class_recall"]) == {"ang", "hap", "sad", "neu"}
    assert sum(map(sum, fold["test"]["confusion_matrix"])) == 20

    fold_dir = run_dir / "fold1"
    checkpoint = torch.load(fold_dir / "best.pt", weights_only=True)
    assert not any(k.startswith("speech_encoder.") for k in checkpoint["model"])
    assert not (fold_dir / "last.pt").exists()  # only needed while the fold is unfinished
    rows = read_csv(fold_dir / "predictions.csv")
    assert len(rows) == 20 and list(rows[0]) == ["name", "true", "predicted", "p_ang", "p_hap", "p_sad", "p_neu"]
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in ("ang", "hap", "sad", "neu")) - 1) < 1e-4
    for png in ("confusion_matrix.png", "training_curves.png", "attention.png"):
        assert (fold_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert "| pooled |" in (run_dir / "summary.md").read_text()
    assert "epoch 3/3" in (run_dir / "train.log").read_text()
    assert not list(run_dir.rglob("*.tmp*"))


def test_a_rerun_after_an_interruption_ends_with_the_same_numbers(tmp_path, finished_run, data_dir, models_dir):
    run_dir = tmp_path / "run"
    assert run_main(run_dir, data_dir, models_dir, "--stop-after-epochs", "1") is None
    last = torch.load(run_dir / "fold1" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 1
    run_main(run_dir, data_dir, models_dir)
    assert "resuming after epoch 1" in (run_dir / "train.log").read_text()
    assert (run_dir / "results.json").read_text() == (finished_run[0] / "results.json").read_text()
    assert (run_dir / "fold1" / "predictions.csv").read_text() == (finished_run[0] / "fold1" / "predictions.csv").read_text()


def test_a_run_folder_refuses_other_settings(finished_run, data_dir, models_dir):
    with pytest.raises(SystemExit, match="lr_head"):
        main.main([str(finished_run[0]), str(data_dir), str(models_dir), *SMALL, "--lr-head", "1e-2"])


def test_a_run_begun_before_skip_missing_existed_resumes(tmp_path, finished_run, data_dir, models_dir):
    run_dir = tmp_path / "run"
    assert run_main(run_dir, data_dir, models_dir, "--stop-after-epochs", "1") is None
    config = json.loads((run_dir / "config.json").read_text())
    del config["skip_missing"], config["left_out"]
    (run_dir / "config.json").write_text(json.dumps(config))
    run_main(run_dir, data_dir, models_dir)
    assert (run_dir / "results.json").read_text() == (finished_run[0] / "results.json").read_text()


def test_a_rerun_keeps_the_folds_already_finished(loso_run):
    """The loso run was stopped after fold 1 had finished and fold 2 had trained its epoch."""
    run_dir = loso_run["run_dir"]
    finished = run_dir / "fold1" / "fold_result.json"
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == loso_run["fold1_before_rerun"]
    log = (run_dir / "train.log").read_text()
    assert "fold 1 (session 1): already finished, kept" in log and log.count("fold 1 test (") == 1
    assert "fold 2: resuming after epoch 1" in log
    assert loso_run["results"]["folds"][0]["test"] == fold_result(run_dir, 1)["test"]


def test_loso_tests_every_session_once_and_pools_them(loso_run, demo_run):
    results, run_dir = loso_run["results"], loso_run["run_dir"]
    assert [f["test_sessions"] for f in results["folds"]] == [[1], [2], [3], [4], [5]]
    labelled = [row for row in manifest(demo_run[0] / "data") if row["label"]]
    for k in range(1, 6):
        tested = [row["name"] for row in read_csv(run_dir / f"fold{k}" / "predictions.csv")]
        assert tested == [row["name"] for row in labelled if row["session"] == k]
    assert sum(map(sum, results["summary"]["pooled"]["confusion_matrix"])) == len(labelled)


def test_a_missing_pretrained_model_is_named_before_anything_is_written(tmp_path, data_dir):
    with pytest.raises(SystemExit, match=r"MODELS_DIR .*no_models: no such folder"):
        main.main([str(tmp_path / "run"), str(data_dir), str(tmp_path / "no_models"), *SMALL, "--branches", "speech"])
    (tmp_path / "no_models").mkdir()
    with pytest.raises(SystemExit, match=r"bert_kmeans.pt: not found; the speech branch's RoBERTa comes from bert_kmeans.tar"):
        main.main([str(tmp_path / "run"), str(data_dir), str(tmp_path / "no_models"), *SMALL, "--branches", "speech"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device,message", [("cuda", "torch sees no CUDA device"),
                                            ("tpu", r"not a device this tool runs on \(cpu, cuda\)"),
                                            ("gpu0", r"not a device this tool runs on \(cpu, cuda\)")])
def test_an_unusable_device_is_named_before_anything_is_written(tmp_path, monkeypatch, data_dir, models_dir,
                                                               device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [str(tmp_path / "run"), str(data_dir), str(models_dir), *SMALL, "--device", device]
    with pytest.raises(SystemExit, match=f"--device '?{device}'?: {message}"):
        main.main(args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--val-fraction", "0", "--val-fraction must be a share above 0 and below 1"),
    ("--eval-batch-size", "0", "--eval-batch-size must be at least 1"),
    ("--clip-norm", "-1", "--clip-norm must be at least 0"),
    ("--lr-head", "-1e-3", "--lr-head must be positive"),
    ("--warmup", "1.5", "--warmup must be a share from 0 and below 1")])
def test_impossible_numbers_are_refused_before_anything_is_written(tmp_path, data_dir, models_dir, capsys,
                                                                   option, value, message):
    with pytest.raises(SystemExit):
        run_main(tmp_path / "run", data_dir, models_dir, f"{option}={value}")
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_refused_for_its_data_leaves_no_folder_to_block_the_next(tmp_path, data_dir, models_dir):
    with pytest.raises(SystemExit, match="fold 1: no stratified validation share of 1% from 80 utterances"):
        run_main(tmp_path / "run", data_dir, models_dir, "--val-fraction", "0.01")
    assert not (tmp_path / "run").exists()


def test_non_finite_features_are_named_when_loaded(tmp_path, data_dir, models_dir):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    labelled = next(row["name"] for row in manifest(broken) if row["label"])
    path = broken / "FullBertEmb1" / f"{labelled}.npy"
    vector = np.load(path)
    vector[3] = np.nan
    np.save(path, vector)
    with pytest.raises(SystemExit, match=f"{path.name}: context vector .* NaN or infinite"):
        run_main(tmp_path / "run", broken, models_dir)


def test_utterances_without_features_stop_the_run_or_are_left_out_and_listed(tmp_path, data_dir, models_dir):
    """mocap_data_collect.py --allow-missing keeps a labelled row without audio: its speech tokens
    can never be made, so main.py offers --skip-missing rather than a dead end."""
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    name = next(row["name"] for row in manifest(broken) if row["label"] and row["session"] == 5)
    (broken / "vqw2vTokens" / f"{name}.npy").unlink()
    with pytest.raises(SystemExit, match=f"{name}.npy: not found \\(1 of 100 labelled .*--skip-missing"):
        run_main(tmp_path / "run", broken, models_dir, "--branches", "speech")
    assert not (tmp_path / "run").exists()
    # The text branch does not need the missing file.
    assert run_main(tmp_path / "text", broken, models_dir, "--branches", "text", "--epochs", "1")["left_out"] == []

    results = run_main(tmp_path / "run", broken, models_dir, "--branches", "speech", "--epochs", "1", "--skip-missing")
    assert results["left_out"] == [name] and results["folds"][0]["n_test"] == 19
    assert json.loads((tmp_path / "run" / "config.json").read_text())["left_out"] == [name]
    assert "Left out for missing features (--skip-missing): 1 labelled utterance(s)" in (tmp_path / "run" / "summary.md").read_text()
    assert name not in {row["name"] for row in read_csv(tmp_path / "run" / "fold1" / "predictions.csv")}

    shutil.rmtree(broken / "vqw2vTokens")
    with pytest.raises(SystemExit, match="not found \\(100 of 100 .*run feature_extraction_main.py first"):
        run_main(tmp_path / "none", broken, models_dir, "--branches", "speech", "--skip-missing")


def test_token_ids_beyond_the_encoders_vocabulary_are_named(tmp_path, data_dir, models_dir):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    labelled = next(row["name"] for row in manifest(broken) if row["label"])
    np.save(broken / "GPT2Tokens" / f"{labelled}.npy", np.array([0, 30521, 2], dtype=np.int32))  # a BERT id
    with pytest.raises(SystemExit, match="the text token files .* hold ids up to 30521, but the text encoder's vocabulary"):
        run_main(tmp_path / "run", broken, models_dir, "--branches", "text")


def test_a_damaged_checkpoint_names_itself_and_the_way_out(tmp_path, data_dir, models_dir):
    run_dir = tmp_path / "run"
    run_main(run_dir, data_dir, models_dir, "--stop-after-epochs", "1")
    (run_dir / "fold1" / "last.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(SystemExit, match="last.pt: unreadable checkpoint .*delete it to train this fold again"):
        run_main(run_dir, data_dir, models_dir)


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, data_dir, models_dir):
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit, match=r"a file/run: Not a directory"):
        run_main(tmp_path / "a file" / "run", data_dir, models_dir)


def test_a_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, data_dir,
                                                                           models_dir):
    run_dir = tmp_path / "run"
    assert run_main(run_dir, data_dir, models_dir, "--stop-after-epochs", "1") is None
    good = (run_dir / "fold1" / "last.pt").read_bytes()
    real = train_function.forward_loss

    def diverging(*args, **kwargs):  # every loss from here on, as after a step too far
        loss, logits = real(*args, **kwargs)
        return loss * float("nan"), logits

    monkeypatch.setattr(train_function, "forward_loss", diverging)
    # The rerun's first epoch is the run's second.
    with pytest.raises(SystemExit, match=r"epoch 2: the training loss became nan.*last good checkpoint.*epoch 1\)"):
        run_main(run_dir, data_dir, models_dir)
    assert (run_dir / "fold1" / "last.pt").read_bytes() == good
    last = torch.load(run_dir / "fold1" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    with pytest.raises(SystemExit, match=r"epoch 1: the training loss became nan.*no epoch had finished"):
        run_main(tmp_path / "new", data_dir, models_dir)
    assert not (tmp_path / "new" / "fold1" / "last.pt").exists()


@pytest.mark.parametrize("branches,trained", [("text", {"text_encoder", "classifier"}),
                                              ("speech", {"classifier"}),  # the speech encoder stays frozen
                                              ("context", {"context_branch", "classifier"})])
def test_each_branch_alone_trains(tmp_path, data_dir, models_dir, branches, trained):
    results = run_main(tmp_path / "run", data_dir, models_dir, "--branches", branches, "--epochs", "1")
    assert results["folds"][0]["n_test"] == 20
    assert json.loads((tmp_path / "run" / "config.json").read_text())["branches"] == [branches]
    assert {k.split(".")[0] for k in checkpoint_weights(tmp_path / "run" / "fold1" / "best.pt")} == trained


def torchrun(cwd, *argv, program=None):
    """main.py under torchrun with two CPU processes; or, given `program`, that Python code
    (argv as its sys.argv[1:])."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    script = [str(REPO / "main.py")] if program is None else ["--no-python", sys.executable, "-c", program]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script,
               *map(str, argv)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# Two runs in one launch, to spare the suite a third start of torch in three processes: one to the
# end, one stopped after its first epoch. They share one process group: made again after
# main.main destroys it, gloo's new group can find the old one's addresses in torchrun's store.
WHOLE_AND_STOPPED = """import sys, main, torch.distributed as dist
whole, stopped, *settings = sys.argv[1:]
destroy, dist.destroy_process_group = dist.destroy_process_group, lambda: None
main.main([whole, *settings])
main.main([stopped, *settings, "--stop-after-epochs", "1"])
destroy()
"""


def test_torchrun_two_processes_gather_every_test_utterance_and_resume_exactly(tmp_path, data_dir, models_dir):
    settings = [data_dir, models_dir, *SMALL, "--epochs", "2"]
    torchrun(tmp_path, tmp_path / "run", tmp_path / "resumed", *settings, program=WHOLE_AND_STOPPED)
    fold = fold_result(tmp_path / "run")
    assert fold["n_test"] == 20
    assert sum(map(sum, fold["test"]["confusion_matrix"])) == 20  # gathered from both ranks
    tested = [row["name"] for row in read_csv(tmp_path / "run" / "fold1" / "predictions.csv")]
    assert tested == [row["name"] for row in manifest(data_dir) if row["label"] and row["session"] == 5]
    assert "x 2 processes" in (tmp_path / "run" / "train.log").read_text()
    # Resumed by a new launch: each rank restores its own random generators (their dropout
    # draws differ), so the second epoch is the uninterrupted run's.
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert torch.load(tmp_path / "resumed" / "fold1" / "last.pt", weights_only=True)["state"]["epoch"] == 1
    torchrun(tmp_path, tmp_path / "resumed", *settings)
    assert "resuming after epoch 1" in (tmp_path / "resumed" / "train.log").read_text()
    assert fold_result(tmp_path / "resumed")["history"] == fold["history"]
    assert (tmp_path / "resumed" / "fold1" / "predictions.csv").read_bytes() == \
        (tmp_path / "run" / "fold1" / "predictions.csv").read_bytes()


def test_the_demo_runs_every_stage_and_learns(demo_run):
    run_dir, results, out = demo_run
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "| pooled |", "demo finished"):
        assert stage in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data_dir"] == str((run_dir / "data").resolve()) and config["context_window"] == 2
    for name in ("utterances.csv", "vqw2vTokens", "GPT2Tokens", "BertEmb", "FullBertEmb2"):
        assert (run_dir / "data" / name).exists()
    assert (run_dir / "models" / "bert_kmeans" / "bert_kmeans.pt").is_file()
    assert results["folds"][0]["test_sessions"] == [5]
    assert results["summary"]["ua_mean"] > 0.6  # chance is 0.25


@pytest.mark.parametrize("branch", ["text", "speech", "context"])
def test_each_branch_alone_learns_on_the_demo(demo_run, tmp_path, branch):
    """The demo's corpus carries emotion in words, voice and conversation: each branch finds it."""
    results = run_like_the_demo(demo_run[0], tmp_path / branch, "--branches", branch)
    assert results["summary"]["ua_mean"] > 0.4  # chance is 0.25
