"""predict.py on runs of the demo's data: the same answers as their evaluation (fine-tuned,
frozen or absent encoders, bf16, one fold or the mean of all), any audio format, conversations as
context, and a refusal when a pretrained file changed."""
import csv
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly
import predict
from mmser import predictor
from mmser.speech.tokens import load_speech_roberta
from small_runs import checkpoint_weights, manifest, read_csv, run_like_the_demo
from mmser import text_features
from mmser.settings import RunSettings


def dialogues_as_list(data_dir, sessions, path):
    """Every utterance of the sessions' dialogues, in corpus order: a wav for the labelled ones,
    text alone (context only) for the others, as a user would give whole IEMOCAP dialogues."""
    rows = [r for r in manifest(data_dir) if r["session"] in sessions]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["wav", "text", "dialog"])
        for r in rows:
            wav = str(data_dir / "Audio" / f"{r['name']}.wav") if r["label"] else ""
            writer.writerow([wav, r["transcript"], r["dialog"]])
    return rows


def assert_session5_predictions_equal_the_evaluation(run_dir, data_dir, tmp_path):
    """predict.py over session 5's dialogues gives the run's own predictions.csv, writing nothing in RUN_DIR."""
    rows = dialogues_as_list(data_dir, [5], tmp_path / "session5.csv")
    before = sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file())
    assert predict.main([str(run_dir), "--list", str(tmp_path / "session5.csv"),
                         "--output", str(tmp_path / "out.csv")]) == 0
    assert sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()) == before
    out = read_csv(tmp_path / "out.csv")
    evaluated = {r["name"]: r for r in read_csv(run_dir / "fold1" / "predictions.csv")}
    assert list(out[0]) == ["wav", "text", "dialog", "prediction", "p_ang", "p_hap", "p_sad", "p_neu", "note"]
    assert len(out) == len(rows) and len(evaluated) == sum(bool(r["label"]) for r in rows)
    for row, given in zip(rows, out):
        if not row["label"]:
            assert given["prediction"] == "" and given["p_ang"] == ""  # context only
            continue
        expected = evaluated[row["name"]]
        assert given["prediction"] == expected["predicted"], row["name"]
        for c in ("ang", "hap", "sad", "neu"):
            assert float(given[f"p_{c}"]) == pytest.approx(float(expected[f"p_{c}"]), abs=2e-4), row["name"]


def test_predictions_of_the_test_session_equal_the_evaluation(demo, tmp_path, capsys):
    assert_session5_predictions_equal_the_evaluation(demo["run_dir"], demo["data_dir"], tmp_path)
    assert "prediction" in capsys.readouterr().out


def test_a_bf16_run_predicts_under_bf16_as_it_evaluated(demo, tmp_path):
    # Predicted in fp32, this run's probabilities came out up to 0.006 away from its own evaluation.
    run_like_the_demo(demo["run_dir"], tmp_path / "run", "--precision", "bf16", "--epochs", "1")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "bf16"
    assert_session5_predictions_equal_the_evaluation(tmp_path / "run", demo["data_dir"], tmp_path)


def test_a_frozen_text_encoder_is_not_stored_and_predicts_as_evaluated(demo, tmp_path):
    """--freeze-text: best.pt leaves the encoder to MODELS_DIR, so training must not have moved it."""
    run_like_the_demo(demo["run_dir"], tmp_path / "run", "--freeze-text", "--epochs", "1")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["finetune_text"] is False
    assert not any(k.startswith("text_encoder.") for k in checkpoint_weights(tmp_path / "run" / "fold1" / "best.pt"))
    assert any(k.startswith("text_encoder.") for k in checkpoint_weights(demo["run_dir"] / "fold1" / "best.pt"))
    assert_session5_predictions_equal_the_evaluation(tmp_path / "run", demo["data_dir"], tmp_path)


def test_a_finetuned_speech_encoder_is_stored_and_predicts_as_evaluated(demo, tmp_path):
    run_like_the_demo(demo["run_dir"], tmp_path / "run", "--finetune-speech", "--epochs", "1")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["finetune_speech"] is True
    trained = checkpoint_weights(tmp_path / "run" / "fold1" / "best.pt")
    pretrained = load_speech_roberta(config["speech_model"]).state_dict()
    assert {k for k in trained if k.startswith("speech_encoder.")} == {f"speech_encoder.{k}" for k in pretrained}
    changed = [k for k, v in pretrained.items() if not torch.equal(trained[f"speech_encoder.{k}"], v)]

    def layers(keys):
        return {k.split(".")[2] for k in keys if k.startswith("encoder.layer.")}

    assert layers(pretrained) and layers(changed) == layers(pretrained)  # training reached every layer
    assert_session5_predictions_equal_the_evaluation(tmp_path / "run", demo["data_dir"], tmp_path)


def test_a_cross_validation_run_predicts_with_the_mean_of_its_folds_or_with_one(loso_run, demo, tmp_path):
    run_dir = loso_run["run_dir"]
    rows = dialogues_as_list(demo["data_dir"], [1, 2, 3, 4, 5], tmp_path / "all.csv")

    def probabilities(*fold):
        out = tmp_path / f"out{'_'.join(fold)}.csv"
        assert predict.main([str(run_dir), "--list", str(tmp_path / "all.csv"), "--output", str(out), *fold]) == 0
        return np.array([[float(r[f"p_{c}"]) for c in ("ang", "hap", "sad", "neu")] for r in read_csv(out)])

    folds = {k: probabilities("--fold", str(k)) for k in range(1, 6)}
    assert np.abs(folds[1] - folds[2]).max() > 0.01  # five models, five answers
    np.testing.assert_allclose(probabilities(), np.mean(list(folds.values()), axis=0), atol=2e-6)
    position = {row["name"]: i for i, row in enumerate(rows)}
    for k, p in folds.items():  # each fold's model, on its own test session, as it was evaluated
        evaluated = read_csv(run_dir / f"fold{k}" / "predictions.csv")
        assert evaluated and all(rows[position[r["name"]]]["session"] == k for r in evaluated)
        for r in evaluated:
            expected = [float(r[f"p_{c}"]) for c in ("ang", "hap", "sad", "neu")]
            np.testing.assert_allclose(p[position[r["name"]]], expected, atol=2e-4, err_msg=r["name"])


def test_a_run_without_the_speech_branch_predicts_from_text_alone(demo, tmp_path, capsys):
    run_like_the_demo(demo["run_dir"], tmp_path / "run", "--branches", "text,context", "--epochs", "1")
    capsys.readouterr()
    assert predict.main([str(tmp_path / "run"), "--text", "I can't believe you did that!",
                         "--output", str(tmp_path / "one.csv")]) == 0
    (one,) = read_csv(tmp_path / "one.csv")
    assert one["wav"] == "" and one["prediction"] in ("ang", "hap", "sad", "neu")
    # A list without audio: every row with text is predicted, as the run's own evaluation did.
    rows = dialogues_as_list(demo["data_dir"], [5], tmp_path / "session5.csv")
    given = read_csv(tmp_path / "session5.csv")
    with open(tmp_path / "texts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["wav", "text", "dialog"])
        writer.writerows(["", r["text"], r["dialog"]] for r in given)
    assert predict.main([str(tmp_path / "run"), "--list", str(tmp_path / "texts.csv"),
                         "--output", str(tmp_path / "out.csv")]) == 0
    out = read_csv(tmp_path / "out.csv")
    evaluated = {r["name"]: r for r in read_csv(tmp_path / "run" / "fold1" / "predictions.csv")}
    assert all(row["prediction"] for row in out) and len(out) == len(rows)
    for row, result in zip(rows, out):
        if row["label"]:
            assert float(result["p_ang"]) == pytest.approx(float(evaluated[row["name"]]["p_ang"]), abs=2e-4)
    # A run with the speech branch asks for the recording.
    with pytest.raises(SystemExit):
        predict.main([str(demo["run_dir"]), "--text", "Hello"])
    assert "has a speech branch: give the recording with --wav" in capsys.readouterr().err


def test_44k_stereo_audio_is_resampled_and_predicted(demo, tmp_path, capsys):
    row = next(r for r in manifest(demo["data_dir"]) if r["label"] and r["session"] == 5)
    wav, rate = sf.read(demo["data_dir"] / "Audio" / f"{row['name']}.wav", dtype="float32")
    stereo = np.stack([resample_poly(wav, 441, 160)] * 2, axis=1) * np.array([1.0, 0.5])
    sf.write(tmp_path / "utt.flac", stereo, 44100)
    code = predict.main([str(demo["run_dir"]), "--wav", str(tmp_path / "utt.flac"), "--text", row["transcript"],
                         "--output", str(tmp_path / "one.csv")])
    captured = capsys.readouterr()
    assert code == 0
    assert "resampled 44100 Hz to 16000 Hz" in captured.err and "mixed 2 channels to mono" in captured.err
    (result,) = read_csv(tmp_path / "one.csv")
    probabilities = [float(result[f"p_{c}"]) for c in ("ang", "hap", "sad", "neu")]
    assert sum(probabilities) == pytest.approx(1, abs=1e-5)
    assert result["prediction"] in ("ang", "hap", "sad", "neu")


def test_too_short_silent_or_missing_audio_gets_a_message_not_an_answer(demo, tmp_path, capsys):
    sf.write(tmp_path / "short.wav", np.full(400, 0.3, dtype=np.float32), 16000)
    sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    with open(tmp_path / "list.csv", "w") as f:
        f.write("wav,text\nshort.wav,I am so angry with you\nsilent.wav,That is wonderful news\n"
                "gone.wav,Where did it go\n")
    assert predict.main([str(demo["run_dir"]), "--list", str(tmp_path / "list.csv")]) == 1
    out = capsys.readouterr().out
    assert "too short for one vq-wav2vec frame (400 samples" in out and "silent" in out
    assert "gone.wav: no such audio file" in out


def test_a_cut_off_recording_is_predicted_with_a_word(demo, tmp_path, capsys):
    wav = next((demo["data_dir"] / "Audio").glob("*.wav"))
    whole = wav.read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[:len(whole) * 2 // 3])
    assert predict.main([str(demo["run_dir"]), "--wav", str(tmp_path / "cut.wav"), "--text", "It stops"]) == 0
    captured = capsys.readouterr()
    assert "cut.wav: cut off (shorter than its header says), predicted from what it holds" in captured.err
    assert "It stops" in captured.out and "none:" not in captured.out


def test_a_spreadsheet_list_with_a_byte_order_mark_is_read(demo, tmp_path, capsys):
    wav = next((demo["data_dir"] / "Audio").glob("*.wav"))
    (tmp_path / "list.csv").write_text(f"wav,text\n{wav},Hello there\n", encoding="utf-8-sig")
    assert predict.main([str(demo["run_dir"]), "--list", str(tmp_path / "list.csv")]) == 0
    assert "Hello there" in capsys.readouterr().out


def test_the_list_is_never_overwritten_by_the_output(demo, tmp_path):
    (tmp_path / "list.csv").write_text("wav,text\nclip.wav,Hello\n")
    with pytest.raises(SystemExit):
        predict.main([str(demo["run_dir"]), "--list", str(tmp_path / "list.csv"), "--output", str(tmp_path / "list.csv")])
    assert (tmp_path / "list.csv").read_text() == "wav,text\nclip.wav,Hello\n"


def test_an_unusable_device_is_one_line(demo, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        predict.main([str(demo["run_dir"]), "--wav", str(next((demo["data_dir"] / "Audio").glob("*.wav"))),
                      "--text", "hi", "--device", "cuda"])
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_a_damaged_checkpoint_or_config_is_named(demo, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo["run_dir"], run_dir, ignore=shutil.ignore_patterns("corpus", "data", "models"))
    rows = [{"wav": "x.wav", "text": "hi", "_wav_path": next((demo["data_dir"] / "Audio").glob("*.wav"))}]
    (run_dir / "fold1" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(predictor.PredictError, match="best.pt: unreadable checkpoint .*damaged"):
        predictor.predict_rows(run_dir, rows)
    (run_dir / "config.json").write_text("{")
    with pytest.raises(predictor.PredictError, match="config.json: not a readable config.json"):
        predictor.predict_rows(run_dir, rows)


def test_a_changed_or_missing_pretrained_file_is_refused(demo, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo["run_dir"], run_dir, ignore=shutil.ignore_patterns("corpus", "data"))
    config = json.loads((run_dir / "config.json").read_text())
    old_models = str((demo["run_dir"] / "models").resolve())
    text = json.dumps(config).replace(old_models, str((run_dir / "models").resolve()))
    (run_dir / "config.json").write_text(text)
    predictor.check_pretrained(RunSettings.from_json(json.loads(text)))  # the copy is the same files: accepted
    with open(run_dir / "models" / "bert_kmeans" / "dict.txt", "a") as f:
        f.write("999-999 1\n")
    with pytest.raises(predictor.PredictError, match="speech_dictionary: .*dict.txt has changed since training"):
        predictor.predict_rows(run_dir, [{"wav": "x.wav", "text": "hi", "_wav_path": tmp_path / "x.wav"}])
    (run_dir / "models" / "vq-wav2vec_kmeans.pt").unlink()
    with pytest.raises(predictor.PredictError, match="vq_wav2vec: .*vq-wav2vec_kmeans.pt is missing"):
        predictor.check_pretrained(RunSettings.from_json(json.loads(text)))


def test_a_conversation_is_each_others_context_and_a_lone_utterance_has_none(demo):
    config = RunSettings.from_json(demo["config"])
    paths = predictor.check_pretrained(config)
    extractors = predictor.load_extractors(config, paths, torch.device("cpu"))
    texts = ["I can't believe you did that!", "Calm down, please.", "No, I will not calm down.", "Goodbye."]
    rows = [{"wav": "", "text": t, "dialog": "call", "_wav_path": None} for t in texts[:3]]
    rows.append({"wav": "", "text": texts[3], "dialog": "", "_wav_path": None})
    for row in (rows[1], rows[3]):
        row["_wav_path"] = demo["data_dir"] / "Audio" / next(p.name for p in (demo["data_dir"] / "Audio").glob("*.wav"))
    items = predictor.featurize(rows, config, extractors, notes={})
    assert [item["index"] for item in items] == [1, 3]
    embeddings = text_features.sentence_embeddings(texts, extractors["sentence_tokenizer"], extractors["sentence_model"])
    c = config.context_window
    middle, lone = items[0]["context"].numpy(), items[1]["context"].numpy()
    assert middle.shape == lone.shape == (2 * c + 1, embeddings.shape[1])
    np.testing.assert_allclose(middle[c - 1:c + 2], embeddings[:3], atol=1e-5)  # before, itself, after
    assert not middle[:c - 1].any() and not middle[c + 2:].any()  # past the conversation's edges
    np.testing.assert_allclose(lone[c], embeddings[3], atol=1e-5)
    assert not np.delete(lone, c, axis=0).any()


def test_branches_the_run_lacks_are_not_computed(demo):
    config = RunSettings.from_json(demo["config"]).replace(branches=["speech"])
    extractors = predictor.load_extractors(config, predictor.check_pretrained(config), torch.device("cpu"))
    assert set(extractors) == {"speech"}
    wav = next((demo["data_dir"] / "Audio").glob("*.wav"))
    (item,) = predictor.featurize([{"wav": str(wav), "text": "", "_wav_path": wav}], config, extractors, notes={})
    assert set(item) == {"index", "name", "label", "speech_ids"}
