"""What a new user ran into: a corpus of fewer classes, folders given in the wrong place, missing
models, and errors that must be one line (a user's mistake) or a whole traceback (anything else)."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

import feature_ext
import feature_extraction_main
from mmser import vq_wav2vec
import main
import predict
from mmser import predictor
from mmser import train_function
from mmser.data_contract import MANIFEST_COLUMNS, read_manifest
from mmser import runner
from mmser.speech import tokens as speech_tokens

REPO = Path(__file__).resolve().parent.parent
DEMO_OPTIONS = ["--demo", "--branches", "text,context", "--epochs", "2", "--device", "cpu"]


def copy_data(demo, tmp_path, drop_label=None):
    """The demo's DATA_DIR, optionally as if collected without one emotion (its rows unlabelled)."""
    data_dir = tmp_path / "data"
    shutil.copytree(demo["data_dir"], data_dir)
    if drop_label:
        rows = read_manifest(data_dir)
        with open(data_dir / "utterances.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows({**row, "label": "" if row["label"] == drop_label else row["label"]} for row in rows)
    return data_dir


def train(run_dir, data_dir, models_dir, *extra):
    args = main.parse_args([*DEMO_OPTIONS, run_dir, *extra])
    args.data_dir, args.models_dir = str(data_dir), str(models_dir)
    return runner.train_and_test(args)


def test_a_corpus_of_three_emotions_trains_scores_and_predicts_three_classes(demo, tmp_path, capsys):
    data_dir = copy_data(demo, tmp_path, drop_label="hap")
    results = train(tmp_path / "run", data_dir, demo["run_dir"] / "models")
    classes = ["ang", "sad", "neu"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == classes
    import torch
    best = torch.load(tmp_path / "run" / "fold1" / "best.pt", weights_only=True)
    assert best["model"]["classifier.2.weight"].shape[0] == 3  # the head has one output per class
    pooled = results["summary"]["pooled"]
    assert list(pooled["per_class_recall"]) == classes and np.array(pooled["confusion_matrix"]).shape == (3, 3)
    fold = json.loads((tmp_path / "run" / "fold1" / "fold_result.json").read_text())
    assert fold["test"]["macro_f1"] == pytest.approx(f1_score(fold["y_true"], fold["y_pred"], average="macro"))
    assert "Chance UA is 0.33." in (tmp_path / "run" / "summary.md").read_text()
    with open(tmp_path / "run" / "fold1" / "predictions.csv", newline="") as f:
        assert next(csv.reader(f)) == ["name", "true", "predicted", "p_ang", "p_sad", "p_neu"]
    capsys.readouterr()
    assert predict.main([str(tmp_path / "run"), "--text", "I am so sorry.", "--output", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        header, row = list(csv.reader(f))
    assert header == ["wav", "text", "prediction", "p_ang", "p_sad", "p_neu", "note"]
    assert row[2] in classes and sum(map(float, row[3:6])) == pytest.approx(1, abs=1e-5)


def test_a_run_dir_must_be_new_empty_or_a_run_folder(demo, tmp_path):
    data_dir, models_dir = demo["data_dir"], demo["run_dir"] / "models"
    before = sorted(p.name for p in models_dir.iterdir())
    for run_dir, what in ((models_dir, "is the MODELS_DIR"), (data_dir, "is the DATA_DIR")):
        with pytest.raises(SystemExit, match=f"RUN_DIR {run_dir} {what}"):
            main.main([run_dir, data_dir, models_dir, "--device", "cpu"])
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="holds files and is not a run folder of main.py"):
        main.main([other, data_dir, models_dir, "--device", "cpu"])
    assert sorted(p.name for p in models_dir.iterdir()) == before and sorted(other.iterdir()) == [other / "todo.txt"]


def test_the_demo_checks_its_folder_before_it_writes(demo, tmp_path):
    run_dir = tmp_path / "real_run"
    train(run_dir, demo["data_dir"], demo["run_dir"] / "models")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(SystemExit, match="not a demo folder"):
        main.main(["--demo", run_dir, "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"other settings \(epochs: 15 -> 3\)"):
        main.main(["--demo", demo["run_dir"], "--device", "cpu", "--epochs", "3"])
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_missing_folders_and_fairseq_files_are_named_with_where_to_get_them(demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        feature_extraction_main.main([str(demo["data_dir"]), str(tmp_path / "nonexistent" / "models")])
    assert stop.value.code == 2 and "MODELS_DIR" in capsys.readouterr().err
    models = tmp_path / "models"
    shutil.copytree(demo["run_dir"] / "models", models)
    (models / "bert_kmeans" / "dict.txt").unlink()
    (models / "vq-wav2vec_kmeans.pt").unlink()
    report = speech_tokens.extract_speech_tokens(copy_data(demo, tmp_path), models, progress=False)
    assert "vq-wav2vec_kmeans.pt and " in report.error and "dict.txt: not found" in report.error
    assert "docs/encoders.md" in report.error


def test_an_unexpected_error_is_never_a_failed_utterance(demo, tmp_path, monkeypatch):
    def broken(self, wav):
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(vq_wav2vec.VqWav2Vec, "codes", broken)
    with pytest.raises(RuntimeError, match="pretend"):
        speech_tokens.extract_speech_tokens(copy_data(demo, tmp_path), demo["run_dir"] / "models", overwrite=True,
                                            progress=False)


def test_an_unexpected_error_in_training_keeps_its_traceback_in_the_log(demo, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch (pretend)")

    monkeypatch.setattr(train_function, "train_epoch", broken)
    with pytest.raises(RuntimeError, match="pretend"):
        train(tmp_path / "run", demo["data_dir"], demo["run_dir"] / "models")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback" in log and "shape mismatch (pretend)" in log


def test_predict_asks_for_what_the_runs_branches_read(demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        predict.main([str(demo["run_dir"]), "--wav", str(next((demo["data_dir"] / "Audio").glob("*.wav")))])
    assert stop.value.code == 2 and "give the transcript with --text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        predict.main([str(demo["run_dir"]), "--text", "hello"])
    assert stop.value.code == 2 and "give the recording with --wav" in capsys.readouterr().err


def test_a_row_without_a_prediction_says_why_in_the_output(demo, tmp_path):
    wav = next((demo["data_dir"] / "Audio").glob("*.wav"))
    (tmp_path / "list.csv").write_text(f"wav,text\n{wav},Hello there.\nmissing.wav,Where is it?\n,Just context.\n")
    assert predict.main([str(demo["run_dir"]), "--list", str(tmp_path / "list.csv"),
                         "--output", str(tmp_path / "out.csv")]) == 1
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["prediction"] and rows[0]["note"] == ""
    assert rows[1]["prediction"] == "" and "missing.wav: no such audio file" in rows[1]["note"]
    assert rows[2]["prediction"] == rows[2]["note"] == ""  # context only


def test_a_moved_models_folder_is_found_with_models_dir_and_still_checked(demo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(demo["run_dir"], run_dir, ignore=shutil.ignore_patterns("corpus", "data", "models"))
    config = json.loads((run_dir / "config.json").read_text())
    moved = tmp_path / "elsewhere"
    shutil.copytree(demo["run_dir"] / "models", moved)
    gone = str(tmp_path / "gone")  # where the run now says its models were
    (run_dir / "config.json").write_text(json.dumps(config).replace(config["models_dir"], gone))
    wav = next((demo["data_dir"] / "Audio").glob("*.wav"))
    ask = [str(run_dir), "--wav", str(wav), "--text", "Hello there.", "--output"]
    assert predict.main([*ask, str(tmp_path / "a.csv")]) == 2
    assert "give its new place with --models-dir" in capsys.readouterr().err
    assert predict.main([*ask, str(tmp_path / "b.csv"), "--models-dir", str(moved)]) == 0
    assert predict.main([str(demo["run_dir"]), *ask[1:], str(tmp_path / "c.csv")]) == 0
    assert (tmp_path / "b.csv").read_text() == (tmp_path / "c.csv").read_text()
    with open(moved / "bert_kmeans" / "dict.txt", "a") as f:
        f.write("999-999 1\n")
    assert predict.main([*ask, str(tmp_path / "d.csv"), "--models-dir", str(moved)]) == 2
    assert "dict.txt has changed since training" in capsys.readouterr().err


TORCH_SCRIPTS = ("main.py", "predict.py", "feature_ext.py", "feature_extraction_main.py", "fixtures.tiny_models")


@pytest.mark.parametrize("script", ["main.py", "predict.py", "feature_ext.py", "feature_extraction_main.py",
                                    "concatenate_embds.py", "mocap_data_collect.py", "fixtures.synthetic_iemocap",
                                    "fixtures.tiny_models", "csv_data_collect.py", "meld_data_collect.py",
                                    "compare_runs.py", "fixtures.synthetic_meld"])
def test_help_answers_without_loading_torch(script):
    """--help and argument errors come before torch, transformers and scikit-learn load (seconds)."""
    run = (f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')" if script.endswith(".py") else
           f"runpy.run_module({script!r}, run_name='__main__')")  # a fixture: python -m fixtures.NAME
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    {run}\n"
            f"except SystemExit:\n    pass\n"
            f"print(sorted(m for m in ('torch', 'transformers', 'sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "usage:" in out and out.strip().splitlines()[-1] == "[]"
    if script in TORCH_SCRIPTS:  # every script that runs torch takes --threads (options.add_threads)
        assert "--threads THREADS" in out


def test_torch_threads_default_to_a_schedulers_share_or_half_the_cores(monkeypatch):
    import os

    import torch
    from mmser.utils import default_threads, set_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_threads() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_threads() == 1  # one core: one thread, never none
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    set_threads(None)
    assert torch.get_num_threads() == 3
    set_threads(2)
    assert torch.get_num_threads() == 2


def test_speech_tokens_of_audio_that_collection_removed_are_removed_too(demo, tmp_path):
    data_dir = copy_data(demo, tmp_path)
    name = next(p.stem for p in (data_dir / "vqw2vTokens").glob("*.npy"))
    (data_dir / "Audio" / f"{name}.wav").unlink()  # as a rerun of collection does with a now unusable wav
    report = speech_tokens.extract_speech_tokens(data_dir, demo["run_dir"] / "models", progress=False)
    assert [n for n, _ in report.failed] == [name] and not (data_dir / "vqw2vTokens" / f"{name}.npy").exists()


def test_a_step_run_into_a_log_file_writes_no_progress_bars_and_takes_threads(demo, tmp_path, capsys):
    import torch
    data_dir = copy_data(demo, tmp_path)
    assert feature_ext.main(["text-tokens", str(data_dir), str(demo["run_dir"] / "models"), "--overwrite",
                             "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    captured = capsys.readouterr()
    assert "%|" not in captured.err and "text-tokens" in captured.out  # the summary, without a redrawn bar


def test_bf16_on_a_cpu_without_bf16_instructions_warns_that_it_is_slower(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "cpu_has_native_bf16", lambda: False)
    train(tmp_path / "run", demo["data_dir"], demo["run_dir"] / "models", "--precision", "bf16", "--epochs", "1")
    assert "runs slower than fp32" in (tmp_path / "run" / "train.log").read_text()


def test_a_checkpoint_of_another_model_is_named(demo, tmp_path):
    import torch
    run_dir = tmp_path / "run"
    shutil.copytree(demo["run_dir"], run_dir, ignore=shutil.ignore_patterns("corpus", "data", "models"))
    best = torch.load(run_dir / "fold1" / "best.pt", weights_only=True)
    best["model"]["classifier.2.weight"] = torch.zeros(7, best["model"]["classifier.2.weight"].shape[1])
    torch.save(best, run_dir / "fold1" / "best.pt")  # a 7-class head where the run has 4
    wav = next((demo["data_dir"] / "Audio").glob("*.wav"))
    rows = [{"wav": str(wav), "text": "hi", "_wav_path": wav}]
    with pytest.raises(predictor.PredictError, match=r"(?s)best.pt: not a checkpoint of this run's model .*size mismatch"):
        predictor.predict_rows(run_dir, rows)


# ------------------------------------------------------------------------------------------------
# issue 22, round two: contradictory options, model paths that are not there, refusals before torch

def refusal(script, *args):
    """Run a script as `python SCRIPT ARGS` in a fresh process -> (exit status, stderr, whether torch
    was imported when it stopped)."""
    run = (f"runpy.run_path({str(REPO / script)!r}, run_name='__main__')" if script.endswith(".py") else
           f"runpy.run_module({script!r}, run_name='__main__')")
    code = (f"import runpy, sys\nsys.argv = [{script!r}, *{[str(a) for a in args]!r}]\ncode = 0\n"
            f"try:\n    {run}\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('torch' in sys.modules, file=sys.__stdout__)\n"
            f"if isinstance(code, str):\n    print(code, file=sys.stderr)\n    code = 1\n"
            f"sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return done.returncode, done.stderr.strip(), done.stdout.strip().splitlines()[-1] == "True"


CONTRADICTIONS = [  # (options, the line's words): each an option the run would have ignored
    (["--seeds", "1,2", "--seed", "5"], "--seed 5 does not apply: --seeds runs each of its seeds; drop --seed"),
    (["--branches", "speech", "--freeze-text"], "--freeze-text does not apply: --branches speech has no text branch"),
    (["--branches", "text,context", "--finetune-speech"], "--finetune-speech does not apply: --branches text,context "
                                                          "has no speech branch"),
    (["--gradient-checkpointing"], "--gradient-checkpointing does not apply: only a transformers speech encoder "
                                   "fine-tuned"),
    (["--branches", "speech", "--test-transcripts", "asr"], "--test-transcripts asr does not apply: --branches "
                                                            "speech reads no transcripts"),
    (["--asr-model", "openai/whisper-large-v3"], "this run reads the reference ones (add --transcripts asr"),
    (["--fold-by", "speaker"], "--fold-by speaker does not apply: it names the folds of --protocol folds"),
    (["--protocol", "official", "--val-split", "speaker"], "--protocol official validates on the corpus's dev split"),
    (["--branches", "text,speech", "--sentence-pooling", "mean"], "--sentence-pooling mean does not apply: --branches "
                                                                  "text,speech has no context branch"),
    (["--branches", "speech,context", "--text-model", "roberta-base"], "has no text branch"),
    (["--branches", "text,context", "--speech-model", "microsoft/wavlm-large"], "has no speech branch"),
    (["--speech-model", "/nonexistent"], "--speech-model /nonexistent: no such folder"),
    (["--text-model", "./nowhere"], "--text-model ./nowhere: no such folder"),
    (["--branches", "speech", "--speech-model", "gone/bert_kmeans.pt"], "--speech-model gone/bert_kmeans.pt: no such file"),
]


@pytest.mark.parametrize("options,message", CONTRADICTIONS, ids=[" ".join(o) for o, _ in CONTRADICTIONS])
def test_an_option_the_run_would_ignore_is_named_and_nothing_is_written(demo, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as stop:
        main.main([tmp_path / "run", demo["data_dir"], demo["run_dir"] / "models", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and message in err[-1], err
    assert not (tmp_path / "run").exists()  # config.json never records what the run would not do


def test_options_a_recipe_or_the_demo_set_are_not_taken_for_given_ones():
    # The recipe's seed with --seeds, its frozen text encoder with a speech-only run: not the user's words.
    args = main.parse_args(["r", "d", "m", "--recipe", "original", "--seeds", "1,2", "--branches", "speech"])
    main.check_options(args, main.build_parser())
    assert args.freeze_text and args.given >= {"recipe", "seeds", "branches"} and "seed" not in args.given
    args = main.parse_args(["--demo", "--seeds", "1,2"])  # the demo's own seed
    main.check_options(args, main.build_parser())


REFUSALS = [  # (script, its arguments (<DEMO>: the demo's run folder), the line's words), all before torch
    ("main.py", ["<A_FILE>", "<DATA>", "<MODELS>"], "RUN_DIR {tmp}/a_file: not a folder"),
    ("main.py", ["{tmp}/run", "<DATA>", "{tmp}/none"], "MODELS_DIR {tmp}/none: no such folder"),
    ("main.py", ["{tmp}/run", "<DATA>", "<MODELS>", "--speech-model", "/nonexistent"],
     "--speech-model /nonexistent: no such folder"),
    ("main.py", ["{tmp}/run", "<DATA>", "<MODELS>", "--seeds", "1,2", "--seed", "5"], "--seed 5 does not apply"),
    ("main.py", ["--demo", "<A_FILE>"], "RUN_DIR {tmp}/a_file: not a folder"),
    ("main.py", ["--demo", "<MODELS>"], "holds files and is not a demo folder"),
    ("concatenate_embds.py", ["{tmp}/none"], "DATA_DIR {tmp}/none: no such folder"),
    ("predict.py", ["{tmp}", "--text", "hi"], "{tmp}/config.json: not found"),
    ("predict.py", ["<DEMO>", "--list", "{tmp}/none.csv"], "none.csv: unreadable list"),
    ("predict.py", ["<DEMO>", "--wav", "{tmp}/none.wav", "--text", "hi"], "--wav {tmp}/none.wav: no such file"),
    ("feature_ext.py", ["speech-layers", "<DATA>", "<MODELS>", "--speech-model", "<MODELS>/bert_kmeans/bert_kmeans.pt"],
     "the speech-layers step needs a transformers --speech-model (a speech encoder's folder or hub name); "
     "--speech-model <MODELS>/bert_kmeans/bert_kmeans.pt is a fairseq checkpoint file"),
    ("feature_ext.py", ["text-tokens", "<DATA>", "<MODELS>", "--text-model", "{tmp}/none"],
     "--text-model {tmp}/none: no such folder"),
    ("fixtures.tiny_models", ["{tmp}/models", "{tmp}/none"], "{tmp}/none: DATA_DIR not found"),
    ("fixtures.tiny_models", ["<DATA>", "<DATA>"], "holds utterances.csv, so it is a DATA_DIR"),
]


@pytest.mark.parametrize("script,args,message", REFUSALS, ids=[f"{s} {' '.join(a)}" for s, a, _ in REFUSALS])
def test_a_refusal_that_needs_no_model_comes_before_torch_loads(demo, tmp_path, script, args, message):
    (tmp_path / "a_file").write_text("not a folder")
    names = {"<A_FILE>": tmp_path / "a_file", "<DATA>": demo["data_dir"], "<MODELS>": demo["run_dir"] / "models",
             "<DEMO>": demo["run_dir"], "{tmp}": tmp_path}

    def fill(text):
        for key, value in names.items():
            text = text.replace(key, str(value))
        return text

    code, err, torch_loaded = refusal(script, *map(fill, args))
    said = [line for line in err.splitlines() if not line.startswith(("usage:", " "))]  # argparse's usage aside
    assert code != 0 and len(said) == 1 and fill(message) in said[0], err
    assert not torch_loaded


def test_another_corpus_s_speech_features_go_with_it_in_a_fresh_process(demo, tmp_path):
    """The speech routes' folders (vqw2vTokens/, SpeechLayers-<model>/) are registered by mmser/speech/,
    which a collector's process never imports by itself: --overwrite must still remove them."""
    data_dir = copy_data(demo, tmp_path)
    (data_dir / "SpeechLayers-tiny-wavlm").mkdir()
    rows = [row for row in read_manifest(demo["data_dir"]) if row["label"]][:24]
    corpus = tmp_path / "corpus.csv"
    with open(corpus, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["wav", "text", "label"])
        writer.writerows([demo["data_dir"] / "Audio" / f"{row['name']}.wav", row["transcript"], row["label"]]
                         for row in rows)
    done = subprocess.run([sys.executable, "csv_data_collect.py", corpus, data_dir, "--overwrite"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in data_dir.iterdir()) == ["Audio", "Text", "classes.json", "utterances.csv"]


def test_a_model_path_that_is_not_there_is_named_by_the_library_too(demo, tmp_path):
    from mmser import speech_encoders, text_features
    report = text_features.extract_text_tokens(copy_data(demo, tmp_path), text_model=tmp_path / "gone", progress=False)
    assert report.error == f"text model {tmp_path / 'gone'}: no such folder"
    with pytest.raises(speech_encoders.SpeechModelError, match=r"speech model /nonexistent: no such folder"):
        speech_encoders.speech_kind("/nonexistent")


def test_a_wavlm_encoder_runs_without_torch_s_mask_warning(tmp_path):
    from fixtures.tiny_models import make_tiny_speech_encoder
    from mmser import speech_encoders
    speech = speech_encoders.load_speech_model(make_tiny_speech_encoder(tmp_path / "wavlm", "wavlm"))
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        speech_encoders.layer_means(speech, wav)
    assert not [w for w in caught if "key_padding_mask" in str(w.message)]


def test_the_demo_s_stage_header_names_the_speech_route_s_step(demo_run):
    assert "[4/5] features: speech-tokens, text-tokens, sentence-embeddings, context vectors c=2" in demo_run[2]
