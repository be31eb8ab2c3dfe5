"""The synthetic corpus: IEMOCAP's shape and quirks, deterministic, and learnable."""
import filecmp
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fixtures import synthetic_iemocap
from fixtures.synthetic_iemocap import EMOTION_CODES, TRUTH_FILE, load_truth, main, make_corpus

TARGETS = {"ang": "ang", "hap": "hap", "exc": "hap", "sad": "sad", "neu": "neu"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("IEMOCAP_full_release")
    return root, make_corpus(root, seed=0)


def all_files(root):
    return sorted(p.relative_to(root) for p in Path(root).rglob("*") if p.is_file())


def test_default_size_is_a_few_hundred_utterances_with_enough_labelled_per_session(corpus):
    _, truth = corpus
    utts = truth["utterances"]
    assert 300 <= len(utts) <= 500
    for session in range(1, 6):
        labelled = [u for u in utts if u["session"] == session and u["emotion"] in TARGETS]
        assert len(labelled) >= 40
        assert {TARGETS[u["emotion"]] for u in labelled} == {"ang", "hap", "sad", "neu"}
    assert set(EMOTION_CODES) == {u["emotion"] for u in utts}


def test_sessions_speakers_and_dialogues_look_like_iemocap(corpus):
    root, truth = corpus
    utts = truth["utterances"]
    for session in range(1, 6):
        in_session = [u for u in utts if u["session"] == session]
        assert {u["speaker"] for u in in_session} == {f"Ses0{session}F", f"Ses0{session}M"}
        assert any("_impro" in u["dialog"] for u in in_session)
        assert any("_script" in u["dialog"] for u in in_session)
    dialogs = {u["dialog"] for u in utts}
    assert {"Ses03M_impro05a", "Ses03M_impro05b", "Ses05M_script01_1",
            "Ses05M_script01_1b"} <= dialogs
    assert "Ses03M_impro05" not in dialogs
    # The dialogue prefix names the actor with markers; both actors speak.
    assert any(u["utterance_id"].rsplit("_", 1)[1][0] != u["dialog"][5] for u in utts)
    for u in utts:
        assert u["speaker"] == f"Ses0{u['session']}" + u["utterance_id"].rsplit("_", 1)[1][0]
        assert (root / "Session{}/dialog/EmoEvaluation/{}.txt".format(u["session"], u["dialog"])
                ).is_file()


def test_wavs_are_16k_mono_pcm16_as_long_as_their_times(corpus):
    root, truth = corpus
    for u in truth["utterances"]:
        info = sf.info(str(root / u["wav"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames == u["n_samples"] == round((u["end"] - u["start"]) * 16000)
        assert 1.0 <= u["end"] - u["start"] <= 3.0


def test_truth_is_in_corpus_order(corpus):
    _, truth = corpus
    keys = [(u["session"], u["dialog"], u["start"], u["end"], u["utterance_id"])
            for u in truth["utterances"]]
    assert keys == sorted(keys)
    # Ties the order must break by end time, then by id.
    assert any(len(group) == 2 for group in truth["quirks"]["same_start"])


def test_emo_evaluation_has_annotator_lines_subdirectories_and_no_time_order(corpus):
    root, truth = corpus
    emo_dir = root / "Session2/dialog/EmoEvaluation"
    assert {"Categorical", "Attribute", "Self-evaluation"} <= {p.name for p in emo_dir.iterdir()
                                                               if p.is_dir()}
    text = (emo_dir / f"{truth['quirks']['malformed_annotator_line'][0]}.txt").read_text()
    assert "A-E2:\tval 6; act 6; dom ;\t()" in text
    assert re.search(r"^C-E2:\t", text, re.M) and re.search(r"^A-E1:\tval \d", text, re.M)
    starts = [float(m) for m in re.findall(r"^\[(\d+\.\d{4}) - ", text, re.M)]
    assert starts != sorted(starts)


def test_transcriptions_carry_the_odd_lines_of_the_release(corpus):
    root, truth = corpus
    q = truth["quirks"]
    raw = {}
    for path in root.glob("Session*/dialog/transcriptions/Ses*.txt"):
        data = path.read_bytes()
        assert data.endswith(b"\r\n") and data.count(b"\n") == data.count(b"\r\n")
        raw[path.stem] = data.decode().split("\r\n")[:-1]
    lines = [line for d in raw.values() for line in d]
    assert "M: Yeah." in lines and "F:Umm." in lines
    xx_dialog = q["xx_lines"][0]
    xx = [line for line in raw[xx_dialog] if "XX" in line.split(" ")[0]]
    assert len(xx) == 4 and len(set(xx)) == 3  # one line twice
    assert any(line.endswith("]: ") for line in xx)  # empty text
    backwards = [tuple(map(float, re.search(r"\[([\d.]+)-([\d.]+)\]", line).groups()))
                 for line in xx]
    assert any(end < start for start, end in backwards)
    dup = raw[q["duplicate_line"][0]]
    assert len(dup) != len(set(dup))
    by_id = {u["utterance_id"]: u for u in truth["utterances"]}
    assert "\t" in by_id[q["tab_in_text"][0]]["transcript_raw"]
    assert all("  " in by_id[i]["transcript_raw"] for i in q["double_space"])
    assert all("[LAUGHTER]" in by_id[i]["transcript_raw"] for i in q["laughter"])
    assert q["double_space"] and q["laughter"]
    ids = [line.split(" ")[0] for line in raw[xx_dialog] if "_" in line.split(" ")[0]]
    times = [by_id[i]["start"] for i in ids if i in by_id]
    assert times != sorted(times)


def test_stray_files_sit_beside_the_dialogues(corpus):
    root, truth = corpus
    stray = truth["quirks"]["stray_files"]
    assert any(Path(s).name.startswith("._") for s in stray)
    assert any(Path(s).name == ".DS_Store" for s in stray)
    assert all((root / s).is_file() for s in stray)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    small = dict(dialogues_per_session=2, utterances_per_dialogue=10)
    make_corpus(tmp_path / "a", seed=3, **small)
    make_corpus(tmp_path / "b", seed=3, **small)
    make_corpus(tmp_path / "c", seed=4, **small)
    files = all_files(tmp_path / "a")
    assert files == all_files(tmp_path / "b")
    assert all(filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False) for f in files)
    assert load_truth(tmp_path / "a") != load_truth(tmp_path / "c")


def test_an_empty_transcript_is_opt_in_and_changes_nothing_else(tmp_path):
    small = dict(seed=1, dialogues_per_session=2, utterances_per_dialogue=10)
    plain = make_corpus(tmp_path / "plain", **small)
    truth = make_corpus(tmp_path / "empty", empty_transcript=True, **small)
    assert plain["quirks"]["empty_transcript"] == [] and all(u["transcript"] for u in plain["utterances"])
    [uid] = truth["quirks"]["empty_transcript"]
    u = next(u for u in truth["utterances"] if u["utterance_id"] == uid)
    assert u["transcript"] == u["transcript_raw"] == "" and u["emotion"] in TARGETS
    transcription = Path(f"Session{u['session']}/dialog/transcriptions/{u['dialog']}.txt")
    text = (tmp_path / "empty" / transcription).read_bytes().decode()
    assert re.search(rf"^{uid} \[[^\]]*\]: *\r$", text, re.M)
    # The generator's draws are untouched: only that line (and the truth) differ.
    differ = [f for f in all_files(tmp_path / "plain")
              if not filecmp.cmp(tmp_path / "plain" / f, tmp_path / "empty" / f, shallow=False)]
    assert differ == sorted([transcription, Path(TRUTH_FILE)])


def dialogues_on_disk(root):
    return {p.stem for p in Path(root).glob("Session*/dialog/EmoEvaluation/Ses*.txt")}


def test_a_corpus_of_other_settings_is_replaced_only_with_overwrite_a_real_one_never(tmp_path):
    syn = tmp_path / "syn"
    first = make_corpus(syn, dialogues_per_session=3, utterances_per_dialogue=10)
    with pytest.raises(synthetic_iemocap.SyntheticCorpusError,
                       match=rf"^{syn}: .* made with --seed 0 --dialogues-per-session 3 .*--overwrite"):
        make_corpus(syn, dialogues_per_session=2, utterances_per_dialogue=10)
    with pytest.raises(synthetic_iemocap.SyntheticCorpusError, match="--empty-transcript; give"):
        make_corpus(syn, dialogues_per_session=3, utterances_per_dialogue=10, empty_transcript=True)
    assert load_truth(syn) == first and dialogues_on_disk(syn) == set(first["dialog_moods"])
    assert make_corpus(syn, dialogues_per_session=3, utterances_per_dialogue=10) == first  # a rerun
    truth = make_corpus(syn, dialogues_per_session=2, utterances_per_dialogue=10, overwrite=True)
    assert dialogues_on_disk(syn) == {u["dialog"] for u in truth["utterances"]}

    real = tmp_path / "IEMOCAP_full_release"
    (real / "Session1").mkdir(parents=True)
    with pytest.raises(synthetic_iemocap.SyntheticCorpusError, match="not overwriting"):
        make_corpus(real, overwrite=True)
    assert not (real / TRUTH_FILE).exists() and (real / "Session1").is_dir()


def test_each_modality_and_the_context_carry_signal(corpus):
    """Simple classifiers trained on sessions 1-4 beat chance (UA 0.25) on session 5."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    root, truth = corpus
    utts = truth["utterances"]
    labelled = [u for u in utts if u["emotion"] in TARGETS]
    train = [u for u in labelled if u["session"] < 5]
    test = [u for u in labelled if u["session"] == 5]
    y_train, y_test = [TARGETS[u["emotion"]] for u in train], [TARGETS[u["emotion"]] for u in test]

    words = CountVectorizer().fit([u["transcript"] for u in train])
    clf = LogisticRegression(max_iter=1000).fit(words.transform([u["transcript"] for u in train]),
                                                 y_train)
    text_ua = balanced_accuracy_score(y_test, clf.predict(words.transform(
        [u["transcript"] for u in test])))

    def prosody(u):  # loudness, its spread, brightness (pitch), syllable rate
        x, _ = sf.read(str(root / u["wav"]))
        frames = x[: len(x) // 400 * 400].reshape(-1, 400)
        energy = np.sqrt((frames ** 2).mean(1))
        crossings = (np.diff(np.sign(frames), axis=1) != 0).mean()
        spectrum = np.abs(np.fft.rfft(energy - energy.mean()))
        return [np.log(energy.mean()), np.log(energy.std()), crossings,
                (np.argmax(spectrum[1:]) + 1) / (len(energy) * 0.025)]

    scale = StandardScaler().fit([prosody(u) for u in train])
    clf = LogisticRegression(max_iter=1000).fit(scale.transform([prosody(u) for u in train]),
                                                 y_train)
    audio_ua = balanced_accuracy_score(y_test, clf.predict(scale.transform(
        [prosody(u) for u in test])))

    def neighbours_vote(u):
        i = utts.index(u)
        near = [TARGETS[v["emotion"]] for v in utts[max(i - 2, 0): i + 3]
                if v is not u and v["dialog"] == u["dialog"] and v["emotion"] in TARGETS]
        return Counter(near).most_common(1)[0][0] if near else "neu"

    context_ua = balanced_accuracy_score(y_test, [neighbours_vote(u) for u in test])
    assert text_ua > 0.5 and audio_ua > 0.5 and context_ua > 0.4, (text_ua, audio_ua, context_ua)
    # ... and none is perfect: there is ambiguity left to learn around.
    assert max(text_ua, audio_ua, context_ua) < 0.99


def test_cli_writes_the_corpus_and_says_how_much(tmp_path, capsys):
    main([str(tmp_path / "corpus"), "--seed", "1", "--dialogues-per-session", "2",
          "--utterances-per-dialogue", "10"])
    assert "wrote 100 utterances" in capsys.readouterr().out
    assert len(load_truth(tmp_path / "corpus")["utterances"]) == 100


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("synthetic_iemocap.py: error: "), err
    return err


def test_cli_refuses_a_corpus_of_other_settings_in_one_line(tmp_path, capsys):
    small = ["--dialogues-per-session", "2", "--utterances-per-dialogue", "10"]
    assert main([str(tmp_path / "corpus"), *small]) == 0
    assert main([str(tmp_path / "corpus"), "--seed", "3", *small]) == 2
    assert str(tmp_path / "corpus") in one_error_line(capsys)
    assert load_truth(tmp_path / "corpus")["seed"] == 0
    assert main([str(tmp_path / "corpus"), "--seed", "3", "--overwrite", *small]) == 0
    assert load_truth(tmp_path / "corpus")["seed"] == 3


def test_cli_refuses_a_data_dir_or_other_files_even_with_overwrite(tmp_path, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "utterances.csv").write_text("name\n")
    for overwrite in ([], ["--overwrite"]):
        assert main([str(data_dir), *overwrite]) == 2
        assert f"{data_dir}: holds a DATA_DIR (utterances.csv), which synthetic_iemocap.py did not write" in \
            one_error_line(capsys)
    (data_dir / "utterances.csv").unlink()
    (data_dir / "notes.txt").write_text("mine")
    assert main([str(data_dir)]) == 2 and "holds notes.txt, which" in one_error_line(capsys)
    assert sorted(p.name for p in data_dir.iterdir()) == ["notes.txt"]


def test_cli_says_in_one_line_when_the_folder_cannot_be_made(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert main([str(tmp_path / "a_file" / "corpus")]) == 2
    assert f"{tmp_path / 'a_file' / 'corpus'}: cannot create the corpus folder" in one_error_line(capsys)


def test_an_interrupted_corpus_is_replaced_by_the_rerun(tmp_path, monkeypatch):
    from fixtures import synthetic_iemocap
    from small_runs import interrupting

    at_the_3rd_file = interrupting(synthetic_iemocap.write_text_atomic, at_call=3)
    monkeypatch.setattr(synthetic_iemocap, "write_text_atomic", at_the_3rd_file)
    with pytest.raises(KeyboardInterrupt):
        make_corpus(tmp_path / "corpus", seed=1)
    assert (tmp_path / "corpus" / "Session1").exists() and not (tmp_path / "corpus" / TRUTH_FILE).exists()
    monkeypatch.undo()
    truth = make_corpus(tmp_path / "corpus", seed=1)
    assert load_truth(tmp_path / "corpus") == truth and not (tmp_path / "corpus" / ".synthetic_corpus_partial").exists()
