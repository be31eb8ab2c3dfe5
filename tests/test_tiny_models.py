"""tiny_models.py's command line: a MODELS_DIR of its own from a DATA_DIR, and a user's mistake
in one line."""
import io

import numpy as np
import pytest
import soundfile as sf

from mocap_data_collect import collect
from fixtures.synthetic_iemocap import make_corpus
from fixtures import tiny_models
from fixtures.tiny_models import MARKER, TINY_ROLES, main, make_tiny_models
from mmser.data_contract import read_manifest
from mmser.models_dir import models_dir_path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_corpus(root / "corpus", seed=1, dialogues_per_session=2, utterances_per_dialogue=10)
    collect(root / "corpus", root / "data", progress=False, out=io.StringIO())
    return root / "data"


def one_error_line(capsys):
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("tiny_models.py: error: "), captured.err
    return captured.err


def test_cli_writes_the_models_and_names_them_and_a_whisper_the_transcripts_step_takes(data_dir, tmp_path, capsys):
    """--asr: a tiny Whisper with a real vocabulary (trained on the transcripts), where the transcripts step
    looks without --asr-model, so that ASR can be tried end to end offline."""
    from mmser.asr import asr_model_name, load_asr, transcribe
    from mmser.utils import read_audio
    models = tmp_path / "models"
    assert main([str(models), str(data_dir), "--asr", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert all(str(models_dir_path(models, role)) in out for role in (*TINY_ROLES, "asr_model"))
    assert (models / MARKER).is_file()
    # What the transcripts step loads (its tokenizer check included) and how it transcribes, on a few clips.
    rows = read_manifest(data_dir)
    asr = load_asr(asr_model_name(models))  # no --asr-model: MODELS_DIR's
    wavs = [read_audio(path)[0] for path in sorted((data_dir / "Audio").glob("*.wav"))[:4]]
    words = {w for row in rows for w in row["transcript"].lower().split()}
    assert any(set(text.lower().split()) & words for text in transcribe(wavs, asr)[0])  # words, not special tokens


def test_a_data_dir_is_never_taken_for_a_models_dir(data_dir, capsys):
    before = sorted(p.name for p in data_dir.iterdir())
    assert main([str(data_dir), str(data_dir)]) == 2
    assert f"{data_dir}: holds utterances.csv, so it is a DATA_DIR" in one_error_line(capsys)
    assert sorted(p.name for p in data_dir.iterdir()) == before
    with pytest.raises(FileExistsError, match="it is a DATA_DIR"):  # callers that caught it still do
        make_tiny_models(data_dir, ["one text", "another text"])


def test_a_missing_or_wrong_data_dir_is_one_line_naming_it(data_dir, tmp_path, capsys):
    assert main([str(tmp_path / "models"), str(tmp_path / "nonexistent")]) == 2
    assert f"{tmp_path / 'nonexistent'}: DATA_DIR not found" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "models"), str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: no utterances.csv" in one_error_line(capsys)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "utterances.csv").write_text("name,emotion\n")
    assert main([str(tmp_path / "models"), str(tmp_path / "broken")]) == 2
    assert "utterances.csv: header is" in one_error_line(capsys)
    assert not (tmp_path / "models").exists()


def test_a_models_dir_that_cannot_be_made_is_one_line(data_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert main([str(tmp_path / "a_file" / "models"), str(data_dir)]) == 2
    assert f"{tmp_path / 'a_file' / 'models'}: cannot create MODELS_DIR" in one_error_line(capsys)


def test_too_little_to_fit_on_is_a_users_mistake_not_a_crash(tmp_path):
    with pytest.raises(tiny_models.TinyModelsError, match="at least 2 non-empty texts"):
        make_tiny_models(tmp_path / "models", ["only one", " "])
    wav = tmp_path / "stereo.wav"
    sf.write(str(wav), np.zeros((4410, 2), dtype=np.int16), 44100, subtype="PCM_16")
    with pytest.raises(tiny_models.TinyModelsError, match="expected 16000 Hz mono"):
        make_tiny_models(tmp_path / "models", ["a text", "another text"], [wav])
    assert not (tmp_path / "models").exists()  # checked before anything is written
    with pytest.raises(tiny_models.TinyModelsError, match="1 recording"):
        make_tiny_models(tmp_path / "models", ["a text", "another text"], [np.zeros(32000, np.float32)])
