"""Utterance extraction on the synthetic IEMOCAP: every column, the order, the files, the quirks,
bad input, idempotence, interrupted writes."""
import io
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import mocap_data_collect as mdc
from mmser.data_contract import CLASSES, MANIFEST_COLUMNS, read_manifest
from mocap_data_collect import LABEL_OF_EMOTION, SEED_CODES, CorpusError, collect
from fixtures.synthetic_iemocap import make_corpus
from mmser import data_dir_writer, utils
from small_runs import interrupting
from mmser.utils import cut_off_wav


def run(root, data_dir, **kwargs):
    """collect() quietly; returns (rows, what it printed)."""
    out = io.StringIO()
    rows = collect(root, data_dir, progress=False, out=out, **kwargs)
    return rows, out.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("IEMOCAP_full_release")
    return root, make_corpus(root, seed=0)


@pytest.fixture(scope="module")
def collected(corpus, tmp_path_factory):
    root, truth = corpus
    data_dir = tmp_path_factory.mktemp("data")
    _, printed = run(root, data_dir)
    return data_dir, truth, printed


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return root, make_corpus(root, seed=1, dialogues_per_session=2, utterances_per_dialogue=10)


@pytest.fixture
def damaged(small_corpus, tmp_path):
    """A private copy of the small corpus for a test to break."""
    root, truth = small_corpus
    copy = tmp_path / "IEMOCAP_full_release"
    shutil.copytree(root, copy)
    return copy, truth


def first_target(truth):
    return next(u for u in truth["utterances"] if u["emotion"] in LABEL_OF_EMOTION)


def tree_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file()}


def test_every_manifest_column_matches_what_was_generated(collected):
    data_dir, truth, _ = collected
    rows = read_manifest(data_dir)
    assert len(rows) == len(truth["utterances"])
    for i, (row, u) in enumerate(zip(rows, truth["utterances"])):
        assert list(row) == list(MANIFEST_COLUMNS)
        assert row["name"] == f"{i}_s_{u['session']}_{u['emotion']}"
        for column in ("utterance_id", "session", "dialog", "speaker", "gender", "start", "end",
                       "emotion", "valence", "activation", "dominance", "transcript"):
            assert row[column] == u[column], (row["name"], column)
        assert row["label"] == LABEL_OF_EMOTION.get(u["emotion"], "")
        assert isinstance(row["session"], int) and isinstance(row["start"], float)


def test_rows_are_in_corpus_order(collected):
    data_dir, _, _ = collected
    rows = read_manifest(data_dir)
    keys = [(r["session"], r["dialog"], r["start"], r["end"], r["utterance_id"]) for r in rows]
    assert keys == sorted(keys)
    assert [r["session"] for r in rows][0] == 1 and rows[-1]["session"] == 5


def test_text_for_every_utterance_audio_for_every_target(collected, corpus):
    data_dir, truth, _ = collected
    root, _ = corpus
    rows = read_manifest(data_dir)
    assert {p.stem for p in (data_dir / "Text").iterdir()} == {r["name"] for r in rows}
    assert {p.stem for p in (data_dir / "Audio").iterdir()} == {r["name"] for r in rows
                                                                if r["label"]}
    by_id = {u["utterance_id"]: u for u in truth["utterances"]}
    for row in rows:
        text = (data_dir / "Text" / f"{row['name']}.txt").read_text(encoding="utf-8")
        assert text == row["transcript"]
        if row["label"]:
            path = data_dir / "Audio" / f"{row['name']}.wav"
            info = sf.info(str(path))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            source = root / by_id[row["utterance_id"]]["wav"]
            written, _ = sf.read(str(path), dtype="int16")
            assert np.array_equal(written, sf.read(str(source), dtype="int16")[0])
            assert len(written) == by_id[row["utterance_id"]]["n_samples"]


def test_labels_train_t_lists_targets_with_the_seed_codes(collected):
    data_dir, _, _ = collected
    rows = read_manifest(data_dir)
    expected = [f"{r['name']}.txt\t{SEED_CODES[r['emotion']]}" for r in rows if r["label"]]
    assert (data_dir / "labels_train_t.txt").read_text().splitlines() == expected
    assert {line.split("\t")[1] for line in expected} == {"0", "1", "2", "3", "4"}


def test_quirks_of_the_release_are_read_right(collected):
    data_dir, truth, _ = collected
    rows = read_manifest(data_dir)
    ids = [r["utterance_id"] for r in rows]
    q = truth["quirks"]
    assert len(ids) == len(set(ids))  # the line written twice is one utterance
    assert not [i for i in ids if "XX" in i]
    # Exact dialogue matching: the a/b and _1/_1b pairs stay apart.
    for a, b in (("Ses03M_impro05a", "Ses03M_impro05b"),
                 ("Ses05M_script01_1", "Ses05M_script01_1b")):
        assert all(r["utterance_id"].rsplit("_", 1)[0] == r["dialog"] for r in rows
                   if r["dialog"] in (a, b))
        assert {r["dialog"] for r in rows} >= {a, b}
    dialogs = {r["dialog"] for r in rows}
    assert dialogs == set(truth["dialog_moods"])  # no stray file became a dialogue
    by_id = {r["utterance_id"]: r for r in rows}
    tabbed = by_id[q["tab_in_text"][0]]
    assert "\t" not in tabbed["transcript"] and tabbed["transcript"] == \
        next(u for u in truth["utterances"] if u["utterance_id"] == tabbed["utterance_id"]
             )["transcript_raw"].replace("\t", " ")
    assert all("  " in by_id[i]["transcript"] for i in q["double_space"])
    assert all("[LAUGHTER]" in by_id[i]["transcript"] for i in q["laughter"])
    # The speaker is the id's last part, not the dialogue's prefix.
    crossed = [r for r in rows if r["utterance_id"].rsplit("_", 1)[1][0] != r["dialog"][5]]
    assert crossed and all(r["speaker"][-1] == r["gender"] != r["dialog"][5] for r in crossed)
    # Equal start times are ordered by end, equal (start, end) by id.
    for pair in q["same_start"]:
        got = [i for i in ids if i in pair]
        expected = sorted(pair, key=lambda i: (by_id[i]["end"], i))
        assert got == expected


def test_summary_table_counts_sessions_and_classes(collected):
    data_dir, truth, printed = collected
    rows = read_manifest(data_dir)
    header, *lines = printed.splitlines()
    assert header.split() == ["session", "dialogues", "utterances", *CLASSES, "labelled", "other"]
    session1 = lines[0].split()
    assert session1[:3] == ["1", "4", "80"]
    ang1 = sum(r["session"] == 1 and r["label"] == "ang" for r in rows)
    assert int(session1[3]) == ang1
    total = lines[5].split()
    assert total[0] == "all" and int(total[2]) == len(truth["utterances"])
    assert "stray" in printed


def test_rerun_is_byte_identical_and_appends_nothing(collected, corpus, tmp_path):
    data_dir, _, _ = collected
    root, _ = corpus
    before = tree_bytes(data_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    run(root, data_dir)
    assert tree_bytes(data_dir) == before
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()} == mtimes
    lines = (data_dir / "utterances.csv").read_text().splitlines()
    assert len(lines) == len(set(lines)) == len(read_manifest(data_dir)) + 1


def test_rerun_removes_stale_and_half_written_files_but_not_the_users(small_corpus, tmp_path):
    root, _ = small_corpus
    data_dir = tmp_path / "data"
    (data_dir / "Audio").mkdir(parents=True)
    (data_dir / "Audio" / "9999_s_1_ang.wav").write_bytes(b"old run")
    (data_dir / "Audio" / "notes.txt").write_text("mine")
    # What a killed run (no chance to clean up) leaves: utils.atomic_path's temporary names.
    (data_dir / "Audio" / ".3_s_1_ang.wav.k2j4h5ab.tmp.wav").write_bytes(b"half")
    (data_dir / ".utterances.csv.a1b2c3d4.tmp.csv").write_text("name,")
    run(root, data_dir)
    assert not (data_dir / "Audio" / "9999_s_1_ang.wav").exists()
    assert not [p for p in data_dir.rglob(".*")]
    assert (data_dir / "Audio" / "notes.txt").read_text() == "mine"


def test_fewer_target_emotions_leave_the_others_unlabelled(small_corpus, tmp_path):
    root, truth = small_corpus
    rows, _ = run(root, tmp_path / "data", emotions=("ang", "sad"))
    assert {r["label"] for r in rows} == {"ang", "sad", ""}
    assert len(list((tmp_path / "data" / "Audio").iterdir())) == sum(
        u["emotion"] in ("ang", "sad") for u in truth["utterances"])
    with pytest.raises(CorpusError, match="target emotions"):
        run(root, tmp_path / "data", emotions=("fru",))


def test_missing_wav_stops_the_run_naming_the_file(damaged, tmp_path):
    root, truth = damaged
    wav = root / first_target(truth)["wav"]
    wav.unlink()
    with pytest.raises(CorpusError, match="wav not found") as err:
        run(root, tmp_path / "data")
    assert str(wav) in str(err.value) and "--allow-missing" in str(err.value)
    assert not (tmp_path / "data").exists()  # checked before anything is written


def test_a_cut_off_wav_stops_the_run_naming_the_file(damaged, tmp_path):
    """libsndfile reads a wav cut off by an interrupted copy as if whole; its header tells."""
    root, truth = damaged
    wav = root / first_target(truth)["wav"]
    data = wav.read_bytes()
    wav.write_bytes(data[:len(data) // 2])
    with pytest.raises(CorpusError, match="cut off: its header promises") as err:
        run(root, tmp_path / "data")
    assert str(wav) in str(err.value) and "--allow-missing" in str(err.value)


def test_a_streaming_recorders_placeholder_size_is_no_cut_off(tmp_path):
    sf.write(tmp_path / "stream.wav", np.zeros(800, dtype=np.int16), 16000, subtype="PCM_16")
    data = bytearray((tmp_path / "stream.wav").read_bytes())
    data[40:44] = b"\xff\xff\xff\xff"  # the data chunk's size, as a recorder that never finished writes it
    (tmp_path / "stream.wav").write_bytes(bytes(data))
    assert cut_off_wav(tmp_path / "stream.wav", 800) == ""
    data[40:44] = (1600).to_bytes(4, "little")
    (tmp_path / "stream.wav").write_bytes(bytes(data))
    assert "promises 800 samples, the file holds 700" in cut_off_wav(tmp_path / "stream.wav", 700)


def test_allow_missing_goes_on_and_reports(damaged, tmp_path):
    root, truth = damaged
    target = first_target(truth)
    (root / target["wav"]).unlink()
    rows, printed = run(root, tmp_path / "data", allow_missing=True)
    row = next(r for r in rows if r["utterance_id"] == target["utterance_id"])
    assert row["label"] and not (tmp_path / "data" / "Audio" / f"{row['name']}.wav").exists()
    assert str(root / target["wav"]) in printed and "--allow-missing" in printed
    assert len(read_manifest(tmp_path / "data")) == len(truth["utterances"])


def test_an_empty_transcript_is_an_utterance_counted_in_the_summary(damaged, tmp_path):
    """The release has an utterance whose transcription line has no text: kept, and said."""
    root, truth = damaged
    blank = [u for u in truth["utterances"] if u["emotion"] in LABEL_OF_EMOTION][:2]
    for u, text in zip(blank, ("", " \t ")):
        path = root / f"Session{u['session']}/dialog/transcriptions/{u['dialog']}.txt"
        lines = path.read_bytes().decode().split("\r\n")
        i = next(i for i, line in enumerate(lines) if line.startswith(u["utterance_id"] + " "))
        lines[i] = lines[i].split("]:")[0] + "]:" + text
        path.write_bytes("\r\n".join(lines).encode())
    rows, printed = run(root, tmp_path / "data")
    by_id = {r["utterance_id"]: r for r in rows}
    for u in blank:
        row = by_id[u["utterance_id"]]
        assert row["transcript"] == "" and row["label"]
        assert (tmp_path / "data" / "Text" / f"{row['name']}.txt").read_bytes() == b""
        assert (tmp_path / "data" / "Audio" / f"{row['name']}.wav").is_file()
    line = next(line for line in printed.splitlines() if "empty transcript" in line)
    assert line.startswith("2 utterance(s)") and all(u["utterance_id"] in line for u in blank)
    assert len(read_manifest(tmp_path / "data")) == len(truth["utterances"])


def test_the_synthetic_corpus_empty_transcript_is_collected_as_such(tmp_path):
    truth = make_corpus(tmp_path / "corpus", seed=1, dialogues_per_session=2,
                        utterances_per_dialogue=10, empty_transcript=True)
    rows, printed = run(tmp_path / "corpus", tmp_path / "data")
    assert [r["utterance_id"] for r in rows if not r["transcript"]] == \
        truth["quirks"]["empty_transcript"]
    assert f"empty transcript line, kept with an empty Text/<name>.txt: " \
           f"{truth['quirks']['empty_transcript'][0]}" in printed


def test_a_rerun_removes_the_audio_of_a_wav_it_no_longer_vouches_for(damaged, tmp_path):
    """A source wav turned 44.1 kHz stereo after a first run: --allow-missing goes on without
    it, and the first run's Audio/<name>.wav must not stay to be read as this utterance's."""
    root, truth = damaged
    target = first_target(truth)
    rows, _ = run(root, tmp_path / "data")
    name = next(r["name"] for r in rows if r["utterance_id"] == target["utterance_id"])
    stale = tmp_path / "data" / "Audio" / f"{name}.wav"
    assert stale.is_file()
    sf.write(str(root / target["wav"]), np.zeros((44100, 2), dtype=np.int16), 44100,
             subtype="PCM_16")
    _, printed = run(root, tmp_path / "data", allow_missing=True)
    assert not stale.exists()
    assert "removed 1 file(s) of an earlier run" in printed and f"Audio/{name}.wav" in printed
    # The others are still vouched for, and kept.
    assert len(list((tmp_path / "data" / "Audio").iterdir())) == sum(
        bool(r["label"]) for r in rows) - 1


@pytest.mark.parametrize("rate, channels, problem", [(44100, 1, "44100 Hz"),
                                                      (16000, 2, "2 channel")])
def test_wav_not_16k_mono_stops_the_run_naming_the_file(damaged, tmp_path, rate, channels,
                                                        problem):
    root, truth = damaged
    wav = root / first_target(truth)["wav"]
    sf.write(str(wav), np.zeros((rate, channels), dtype=np.int16), rate, subtype="PCM_16")
    with pytest.raises(CorpusError, match=problem) as err:
        run(root, tmp_path / "data")
    assert str(wav) in str(err.value)


def test_malformed_summary_line_names_file_and_line(damaged, tmp_path):
    root, truth = damaged
    u = first_target(truth)
    path = root / f"Session{u['session']}/dialog/EmoEvaluation/{u['dialog']}.txt"
    lines = path.read_text().split("\n")
    lineno = next(i for i, line in enumerate(lines, 1) if u["utterance_id"] in line)
    lines[lineno - 1] = lines[lineno - 1].replace(", ", " ", 1)  # "[V A, D]"
    path.write_text("\n".join(lines))
    with pytest.raises(CorpusError, match="malformed summary line") as err:
        run(root, tmp_path / "data")
    assert f"{path}:{lineno}:" in str(err.value)


def test_empty_or_missing_session_folder_is_a_clear_error(damaged, tmp_path):
    root, _ = damaged
    shutil.rmtree(root / "Session4")
    with pytest.raises(CorpusError, match="session folder not found"):
        run(root, tmp_path / "data")
    (root / "Session4").mkdir()
    with pytest.raises(CorpusError, match="empty session folder") as err:
        run(root, tmp_path / "data")
    assert str(root / "Session4") in str(err.value)
    (root / "Session4" / "dialog" / "EmoEvaluation").mkdir(parents=True)
    with pytest.raises(CorpusError, match="empty session folder"):
        run(root, tmp_path / "data")


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("mocap_data_collect.py: error: "), err
    return err


def test_cli_reports_errors_in_one_line_and_exits_2(damaged, tmp_path, capsys):
    root, truth = damaged
    (root / first_target(truth)["wav"]).unlink()
    assert mdc.main([str(root), str(tmp_path / "data")]) == 2
    assert "wav not found" in one_error_line(capsys)
    assert mdc.main([str(tmp_path / "nonexistent"), str(tmp_path / "data")]) == 2
    assert f"{tmp_path / 'nonexistent'}: IEMOCAP root folder not found" in one_error_line(capsys)


def test_a_data_dir_that_cannot_be_made_is_one_line(small_corpus, tmp_path, capsys):
    root, _ = small_corpus
    (tmp_path / "a_file").write_text("not a folder")
    assert mdc.main([str(root), str(tmp_path / "a_file" / "data")]) == 2
    assert f"{tmp_path / 'a_file' / 'data'}: cannot create DATA_DIR" in one_error_line(capsys)


def test_ctrl_c_says_what_is_kept_and_how_to_resume(small_corpus, tmp_path, monkeypatch, capsys):
    """The script's __main__ block, run as `python mocap_data_collect.py ...` runs it, with a
    Ctrl-C arriving while it writes the audio."""
    root, _ = small_corpus
    data_dir = tmp_path / "data"
    monkeypatch.setattr(data_dir_writer, "wav_bytes", interrupting(utils.wav_bytes, at_call=5))  # at the 5th wav
    monkeypatch.setattr(sys, "argv", ["mocap_data_collect.py", str(root), str(data_dir)])
    with pytest.raises((SystemExit, KeyboardInterrupt)) as stopped:
        runpy.run_path(mdc.__file__, run_name="__main__")
    assert stopped.type is SystemExit and stopped.value.code == 130  # not the Ctrl-C's traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1]  # after the progress bar
    assert last.startswith("mocap_data_collect.py: interrupted: ") and "rerun the same command" in last
    assert len(list((data_dir / "Audio").iterdir())) == 4 and not (data_dir / "utterances.csv").exists()
    monkeypatch.undo()
    run(root, data_dir)  # the rerun finishes it
    assert len(read_manifest(data_dir)) == 100


def test_interrupted_run_leaves_no_partial_file(small_corpus, tmp_path, monkeypatch):
    root, _ = small_corpus
    data_dir = tmp_path / "data"
    real_write = Path.write_bytes
    calls = []

    def disk_full_at_the_30th_file(self, data):
        calls.append(self)
        if len(calls) == 30:
            real_write(self, data[: len(data) // 2])
            raise OSError("No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_at_the_30th_file)
    with pytest.raises(OSError, match="No space"):
        run(root, data_dir)
    monkeypatch.undo()
    written = [p for p in data_dir.rglob("*") if p.is_file()]
    assert len(written) == 29
    assert not [p for p in written if p.name.startswith(".") or ".tmp" in p.name]
    assert not (data_dir / "utterances.csv").exists()  # the manifest comes last
    for p in written:
        if p.suffix == ".wav":
            assert sf.info(str(p)).frames > 0
    run(root, data_dir)  # and the next run completes it
    assert len(read_manifest(data_dir)) == 100


def test_full_corpus_check_compares_with_the_published_counts(small_corpus, tmp_path):
    root, _ = small_corpus
    with pytest.raises(CorpusError, match="utterances: expected 10039, found 100"):
        run(root, tmp_path / "data", expect_full=True)
    # A corpus with the release's shape passes; one utterance relabelled does not.
    rows = []
    full = mdc.FULL_CORPUS
    for session, n in full["labelled_per_session"].items():
        rows += [{"session": session, "emotion": "neu"} for _ in range(n)]
    emotions = ["ang"] * full["ang"] + ["hap"] * full["hap+exc"] + ["sad"] * full["sad"] + \
        ["neu"] * full["neu"]
    for row, emotion in zip(rows, emotions):
        row["emotion"] = emotion
    rows += [{"session": 1, "emotion": "xxx"}
             for _ in range(full["utterances"] - full["labelled"])]
    assert mdc.looks_like_full_corpus(rows)
    mdc.verify_full_corpus(rows)
    rows[0]["emotion"] = "fru"
    with pytest.raises(CorpusError, match=r"ang: expected 1103, found 1102.*labelled_per_session"):
        mdc.verify_full_corpus(rows)


def test_data_dir_inside_the_corpus_is_refused(small_corpus):
    root, _ = small_corpus
    with pytest.raises(CorpusError, match="inside IEMOCAP_ROOT"):
        run(root, root / "data")
    assert not (root / "data").exists()
