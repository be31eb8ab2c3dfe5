"""The Python API (mmser/api.py) on the demo's run: docs/recordings.md's example runs as written, one
utterance from a file or from samples, the run loaded once, and a long utterance predicted on what
fits with a note saying how much (and no tokenizer warning on the way)."""
import contextlib
import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import predict
from mmser import asr, predictor
from mmser.api import PredictError, Recognizer

REPO = Path(__file__).resolve().parent.parent
CONVERSATION = REPO / "tests" / "data" / "conversation"


@pytest.fixture(scope="module")
def recognizer(demo):
    return Recognizer(demo["run_dir"])


def docs_example():
    """The Python block of docs/recordings.md's section "The Python API"."""
    text = (REPO / "docs" / "recordings.md").read_text(encoding="utf-8")
    section = text.split("## The Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_example_runs_as_written(demo, tmp_path, monkeypatch):
    """Run from a folder holding demo_run (a link to the suite's demo) and tests/data (a link to the
    repository's): exactly where the docs' reader runs it after `python main.py --demo`."""
    (tmp_path / "demo_run").symlink_to(demo["run_dir"], target_is_directory=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(REPO / "tests" / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(docs_example(), "docs/recordings.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert lines[0] == "['ang', 'hap', 'sad', 'neu'] ['text', 'speech', 'context']"
    assert lines[1].split()[0] in ("ang", "hap", "sad", "neu")
    assert len(lines) == 5 and "Did you get the report I sent last night?" in lines[2]
    for kind in ("csv", "json", "png"):
        assert (tmp_path / f"conversation_timeline.{kind}").stat().st_size > 100


def test_one_utterance_from_a_file_or_its_samples(recognizer, demo, tmp_path):
    wav = next(p for p in sorted((demo["data_dir"] / "Audio").glob("*.wav")))
    samples, _ = sf.read(wav, dtype="float32")
    by_file = recognizer.predict(wav, text="I can't believe you did that!")
    by_samples = recognizer.predict(samples, text="I can't believe you did that!")
    assert by_file == by_samples
    assert list(by_file) == ["transcript", "prediction", "p_ang", "p_hap", "p_sad", "p_neu", "note"]
    assert by_file["transcript"] == "I can't believe you did that!"
    assert sum(by_file[f"p_{c}"] for c in recognizer.classes) == pytest.approx(1, abs=1e-5)
    # Its neighbours change its context, and so its probabilities.
    talk = recognizer.predict(samples, text="I can't believe you did that!",
                              context={"before": ["You broke it again."], "after": ["Calm down, please."]})
    assert talk["p_ang"] != by_file["p_ang"]
    silent = recognizer.predict(np.zeros(16000, dtype=np.float32), text="Hello")
    assert silent["prediction"] is None and silent["p_ang"] is None and "silent" in silent["note"]


def test_bad_calls_are_named(recognizer):
    with pytest.raises(ValueError, match="context: the keys are 'before' and 'after', not previous"):
        recognizer.predict(np.zeros(16000, dtype=np.float32), text="hi", context={"previous": ["x"]})
    with pytest.raises(PredictError, match="has a speech branch: give the recording"):
        recognizer.predict(text="hi")
    with pytest.raises(ValueError, match="one-dimensional"):
        recognizer.predict(np.zeros((2, 16000), dtype=np.float32), text="hi")
    with pytest.raises(PredictError, match="config.json: not found"):
        Recognizer(REPO / "tests")


def test_the_run_and_its_asr_model_are_loaded_once(demo, tmp_path, monkeypatch):
    from fixtures.tiny_models import write_tiny_whisper
    whisper = write_tiny_whisper(tmp_path / "tiny-whisper")
    loads = []
    real_load_asr = asr.load_asr
    monkeypatch.setattr(asr, "load_asr", lambda *a, **k: loads.append(a) or real_load_asr(*a, **k))
    recognizer = Recognizer(demo["run_dir"], asr_model=whisper)
    monkeypatch.setattr(predictor, "load_run", lambda *a, **k: pytest.fail("the run was loaded again"))
    monkeypatch.setattr(predictor, "load_extractors", lambda *a, **k: pytest.fail("the extractors were loaded again"))
    samples, _ = sf.read(CONVERSATION / "conversation.flac", dtype="float32", frames=3 * 16000)
    first, second = recognizer.predict(samples), recognizer.predict(samples[16000:])
    assert len(loads) == 1  # at the first utterance without text, and only then
    assert first["transcript"] and first["prediction"] and second["prediction"]


def test_a_long_utterance_is_predicted_on_what_fits_and_says_how_much(demo, tmp_path, capsys):
    """The issue's case: minutes of audio and a long text given as one utterance. Before, exit 0 and a
    prediction over the first 3.1 s with nothing said, and transformers' warning "Token indices
    sequence length is longer than the specified maximum sequence length" on the terminal."""
    samples, _ = sf.read(CONVERSATION / "conversation.flac", dtype="float32")
    sf.write(tmp_path / "long.wav", np.tile(samples, 2)[:150 * 16000], 16000)
    text = " ".join(["We worked so hard on that project and it still failed."] * 40)
    warned = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # what transformers would show, shown or not
    try:
        assert predict.main([str(demo["run_dir"]), "--wav", str(tmp_path / "long.wav"), "--text", text,
                             "--output", str(tmp_path / "out.csv")]) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    captured = capsys.readouterr()
    note = ("speech cut: about the first 3.1 s of 150.0 s read (the run reads at most 310 speech tokens); "
            "text cut: the first 64 of ")
    assert note in captured.out and note in (tmp_path / "out.csv").read_text()
    assert "--recording cuts it into utterances" in captured.err
    assert not [w for w in warned if "Token indices sequence length" in w]


def test_fold_weights_held_in_memory_or_read_at_each_call_predict_alike(loso_run, monkeypatch):
    """A cross-validation run's five folds: held in memory, or (past FOLD_WEIGHTS_IN_MEMORY) read from
    disk at each call, one at a time; the same mean either way, call after call."""
    texts = ["I can't believe you did that!", "Calm down, please.", "No, I will not calm down."]

    def rows():
        return [{"text": t, "dialog": "call", "_wav_path": None} for t in texts]

    held = predictor.LoadedRun(loso_run["run_dir"])
    assert held.held is not None and len(held.held) == len(held.checkpoints) == 5
    monkeypatch.setattr(predictor, "FOLD_WEIGHTS_IN_MEMORY", 0)
    from_disk = predictor.LoadedRun(loso_run["run_dir"])
    assert from_disk.held is None
    first = held.predict(rows())[0]
    assert np.array_equal(first, from_disk.predict(rows())[0]) and np.array_equal(first, held.predict(rows())[0])
    assert not np.isnan(first).any()
