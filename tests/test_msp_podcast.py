"""MSP-Podcast: msp_podcast_collect.py on the synthetic release (fixtures/synthetic_msp_podcast.py), its
known problems by name, its layouts, and the msp-podcast-baseline recipe's sources."""
import csv
import io
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import msp_podcast_collect as collector
from fixtures import synthetic_msp_podcast as synthetic
from mmser import recipes
from mmser.data_contract import read_attributes, read_classes, read_manifest, read_withheld
from mmser.data_dir_writer import CorpusError
from mmser.dimensional import MSP_PODCAST_SCALE

SPLIT = {"Train": "train", "Development": "dev", "Test1": "test", "Test2": "test2", "Test3": "test3"}


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """The default synthetic release, collected: -> (truth, data_dir, manifest rows, printed summary)."""
    root = tmp_path_factory.mktemp("msp") / "release"
    truth = synthetic.make_tree(root)
    data_dir = root.parent / "data"
    out = io.StringIO()
    collector.collect(root, data_dir, progress=False, out=out)
    return truth, data_dir, read_manifest(data_dir), out.getvalue()


def by_id(rows):
    return {r["utterance_id"]: r for r in rows}


def test_every_row_and_test3_recording_lands_in_its_partition(collected):
    truth, data_dir, rows, printed = collected
    expected = Counter(SPLIT.get(t["split"], "unpartitioned") for t in truth["rows"]) + Counter(test3=12)
    assert Counter(r["split"] for r in rows) == expected
    assert read_classes(data_dir) == list(collector.CLASSES)
    assert read_attributes(data_dir) == dict.fromkeys(("valence", "arousal", "dominance"), MSP_PODCAST_SCALE)
    rows_by_id = by_id(rows)
    for t in truth["rows"]:
        row = rows_by_id[t["file"][:-4]]
        if t["file"] == synthetic.MISSING:
            continue
        assert (row["emotion"], row["speaker"]) == (t["class"], t["speaker"])
        assert (row["valence"], row["activation"], row["dominance"]) == (t["valence"], t["arousal"], t["dominance"])
        assert row["label"] == collector.CLASS_OF.get(t["class"], "")
        assert row["transcript"] == (t["transcript"] or "")
    assert "test2" in printed and "test3" in printed


def test_x_and_o_rows_have_no_label_but_their_attributes_audio_and_place(collected):
    truth, data_dir, rows, printed = collected
    no_class = [r for r in rows if r["emotion"] in ("X", "O")]
    assert {r["emotion"] for r in no_class} == {"X", "O"}
    assert all(r["label"] == "" and math.isfinite(r["activation"]) for r in no_class)
    assert all((data_dir / "Audio" / f"{r['name']}.wav").is_file() for r in no_class)
    codes = Counter(r["emotion"] for r in rows)
    assert f"{codes['X']} X (no agreement) and {codes['O']} O (other) rows have no label" in printed


def test_podcast_order_comes_from_the_file_names(collected):
    truth, data_dir, rows, printed = collected
    ids = [r["utterance_id"] for r in rows]
    regular = [i for i in ids if "test3" not in i]
    keys = [collector.segment_key(i + ".wav") for i in regular]
    assert keys == sorted(keys)  # the label file is shuffled; the manifest is in podcast order
    a, b = (name[:-4] for name in synthetic.SUBSEGMENT)
    assert ids.index(b) == ids.index(a) + 1  # MSP-PODCAST_1214_0008, then its sub-segment 0008_0001
    assert ids[-12:] == [f"MSP-PODCAST_test3_{n:04d}" for n in range(1, 13)]
    # One dialogue per podcast, contiguous, whatever the partitions of its speakers; Test3's each alone.
    dialogues = [r["dialog"] for r in rows]
    assert len({d for d in dialogues}) == len([d for i, d in enumerate(dialogues) if i == 0 or d != dialogues[i - 1]])
    mixed = {r["split"] for r in rows if r["dialog"] == "MSP-PODCAST_0002"}
    assert mixed == {"train", "test"}
    assert all(r["dialog"] == r["utterance_id"] for r in rows if r["split"] == "test3")


def test_the_withheld_partition_is_kept_and_marked_for_prediction_only(collected):
    truth, data_dir, rows, printed = collected
    assert read_withheld(data_dir) == ["test3"]
    test3 = [r for r in rows if r["split"] == "test3"]
    assert len(test3) == 12 and all(r["label"] == "" and r["emotion"] == "" and r["transcript"] == "" for r in test3)
    assert all(math.isnan(r[c]) for r in test3 for c in ("valence", "activation", "dominance"))
    assert all((data_dir / "Audio" / f"{r['name']}.wav").is_file() for r in test3)
    assert "12 test3 recordings whose labels the release withholds: predicted, never scored" in printed


def test_every_named_problem_of_the_release_is_handled_and_listed(collected):
    truth, data_dir, rows, printed = collected
    rows_by_id = by_id(rows)
    missing = rows_by_id[synthetic.MISSING[:-4]]
    assert missing["label"] == "" and math.isnan(missing["valence"]) and missing["transcript"]  # context only
    assert not (data_dir / "Audio" / f"{missing['name']}.wav").exists()
    assert f"row(s) whose wav the release lacks: kept as context, without label or attributes: {synthetic.MISSING}" \
        in printed
    stereo = rows_by_id[synthetic.STEREO[:-4]]
    samples, rate = sf.read(data_dir / "Audio" / f"{stereo['name']}.wav")
    assert rate == 16000 and samples.ndim == 1 and stereo["label"]
    assert f"{synthetic.STEREO} (mixed 2 channels to mono, resampled 44100 Hz to 16000 Hz)" in printed
    nowhere = [rows_by_id[f[:-4]] for f in truth["problems"]["no_partition"]]
    assert [r["split"] for r in nowhere] == ["unpartitioned", "unpartitioned"]
    assert "2 row(s) in no partition (Split_Set): kept as context, split unpartitioned" in printed
    unknown = [rows_by_id[f[:-4]] for f in truth["problems"]["unknown_speaker"]]
    assert {r["speaker"] for r in unknown} == {"Unknown"} and {r["gender"] for r in unknown} == {""}
    assert f"{len(unknown)} rows of speaker Unknown, kept" in printed
    untranscribed = truth["problems"]["untranscribed"]
    assert all(rows_by_id[f[:-4]]["transcript"] == "" for f in untranscribed)
    assert f"{len(untranscribed)} row(s) without a transcript" in printed
    assert synthetic.UNLISTED[:-4] not in rows_by_id
    assert f"1 wav(s) that no row lists (not Test3's): ignored: {synthetic.UNLISTED}" in printed


def test_a_rerun_leaves_the_same_files_unlabelled_audio_included(collected, tmp_path):
    truth, data_dir, rows, printed = collected
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    before = {p.name: p.read_bytes() for p in (copy / "Audio").iterdir()}
    manifest = (copy / "utterances.csv").read_bytes()
    release = data_dir.parent / "release"
    collector.collect(release, copy, progress=False, out=io.StringIO())
    assert {p.name: p.read_bytes() for p in (copy / "Audio").iterdir()} == before
    assert (copy / "utterances.csv").read_bytes() == manifest


def small_tree(path, layout="1.12"):
    synthetic.make_tree(path, seed=1, podcasts=3, segments=4, layout=layout)
    return path


@pytest.mark.parametrize("layout, folder, note", [("1.10", "Audio", "audio in Audio/"),
                                                  ("1.8", "Audio", "labels in Labels/labels_concensus.csv")])
def test_older_layouts_are_read_and_named(tmp_path, layout, folder, note):
    root = small_tree(tmp_path / "release", layout)
    assert (root / folder).is_dir() and not (root / "Audios").exists()
    out = io.StringIO()
    rows = collector.collect(root, tmp_path / "data", progress=False, out=out)
    assert note in out.getvalue()
    assert "test3" not in {r["split"] for r in rows} and read_withheld(tmp_path / "data") == []


def test_test3_given_as_rows_without_labels_and_a_nested_labels_folder(tmp_path):
    root = small_tree(tmp_path / "release")
    labels = root / "Labels" / "labels_consensus.csv"
    with open(labels, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(["MSP-PODCAST_test3_0002.wav", "", "", "", "", "", "", "Test3"])
    (root / "Labels" / "Labels").mkdir()
    labels.rename(root / "Labels" / "Labels" / "labels_consensus.csv")
    out = io.StringIO()
    rows = collector.collect(root, tmp_path / "data", progress=False, out=out)
    test3 = [r for r in rows if r["split"] == "test3"]
    assert len(test3) == 12 and [r["utterance_id"] for r in test3].count("MSP-PODCAST_test3_0002") == 1
    assert read_withheld(tmp_path / "data") == ["test3"]
    printed = out.getvalue()
    assert "(11 of them audio only" in printed and "labels in Labels/Labels/labels_consensus.csv" in printed


def test_release_counts_are_checked_when_asked(tmp_path, monkeypatch):
    root = small_tree(tmp_path / "release")
    with pytest.raises(CorpusError, match=r"not release 1.11's counts \(train: expected 84030, found \d+;"):
        collector.collect(root, tmp_path / "data", release="1.11", progress=False, out=io.StringIO())
    counts = Counter(r["split"] for r in collector.read_release(root)[0])
    monkeypatch.setitem(collector.RELEASES, "1.11", {"partitions": {s: counts[s] for s in
                                                                   ("train", "dev", "test", "test2", "test3")}})
    out = io.StringIO()
    collector.collect(root, tmp_path / "data", release="1.11", progress=False, out=out)
    assert "the counts per partition are release 1.11's published ones" in out.getvalue()


@pytest.mark.parametrize("edit, problem", [
    (lambda rows: rows[1].__setitem__(1, "Z"), r":2: EmoClass 'Z' is none of A S H U F D C N X O"),
    (lambda rows: rows[1].__setitem__(3, "8.2"), r":2: EmoVal 8.2 lies outside the release's scale 1-7"),
    (lambda rows: rows[1].__setitem__(2, "high"), r":2: EmoAct 'high' is not a number"),
    (lambda rows: rows[2].__setitem__(0, rows[1][0]), r":3: MSP-PODCAST_[\d_]+\.wav already on line 2"),
    (lambda rows: rows[1].__setitem__(0, "podcast7.wav"), r":2: FileName 'podcast7.wav' is not MSP-PODCAST_"),
    (lambda rows: [r.pop(7) for r in rows], r"labels_consensus.csv: not MSP-Podcast's label file: no column Split_Set"),
])
def test_a_bad_label_file_is_named_in_one_line(tmp_path, capsys, edit, problem):
    root = small_tree(tmp_path / "release")
    labels = root / "Labels" / "labels_consensus.csv"
    with open(labels, newline="") as f:
        table = list(csv.reader(f))
    edit(table)
    with open(labels, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(table)
    assert collector.main([str(root), str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"msp_podcast_collect.py: error: {labels}")
    assert re.search(problem, err), err
    assert not (tmp_path / "data" / "utterances.csv").exists()


def test_the_corpus_is_never_written_to(tmp_path):
    root = small_tree(tmp_path / "release")
    with pytest.raises(CorpusError, match="DATA_DIR lies inside MSP_ROOT"):
        collector.collect(root, root / "data", progress=False, out=io.StringIO())
    with pytest.raises(CorpusError, match="not an MSP-Podcast release"):
        collector.collect(tmp_path, tmp_path.parent / "elsewhere", progress=False, out=io.StringIO())


def test_synthetic_attributes_follow_the_audio_and_words_on_the_release_scale(collected):
    truth, data_dir, rows, printed = collected
    rated = [t for t in truth["rows"] if t["file"] != synthetic.MISSING]
    values = np.array([[t["valence"], t["arousal"], t["dominance"]] for t in rated])
    assert values.min() >= 1 and values.max() <= 7 and values.std(0).min() > 0.5
    by_class = {c: np.mean([t["arousal"] for t in rated if t["class"] == c]) for c in "AS"}
    assert by_class["A"] > by_class["S"] + 1.5  # angry voices are loud and fast, sad ones quiet and slow


# ------------------------------------------------------------------------------------------------
# the recipe

def test_the_msp_podcast_baseline_recipe_cites_every_value_and_sets_what_main_has():
    import main
    recipe, sources = recipes.RECIPES["msp-podcast-baseline"], recipes.SOURCES["msp-podcast-baseline"]
    assert set(recipe) == set(sources) == set(recipes.SETTINGS) and all(sources.values())
    args = main.parse_args(["run", "data", "models", "--recipe", "msp-podcast-baseline"])
    assert (args.target, args.attribute_loss, args.attribute_utterances, args.select_by, args.protocol,
            args.test_set, args.speech_model, args.epochs, args.batch_size, args.grad_accum) == \
        ("dimensional", "ccc", "rated", "val_ccc", "official", "test1", "microsoft/wavlm-large", 20, 8, 4)
    assert args.finetune_speech and args.branches == "speech" and args.recipe_overridden == []
    assert "attentive statistics pooling" in recipes.markdown_table({})


# ------------------------------------------------------------------------------------------------
# the official protocol, end to end

def test_the_official_path_scores_test1_recomputably_and_writes_test3_for_submission(collected, demo, tmp_path):
    import contextlib

    import main
    import predict
    from mmser import steps
    from sklearn.metrics import f1_score

    from mmser.dimensional import ccc
    from small_runs import read_csv
    truth, collected_dir, rows, printed = collected
    data_dir, run_dir, models = tmp_path / "data", tmp_path / "run", demo["run_dir"] / "models"
    shutil.copytree(collected_dir, data_dir)
    reports = steps.extract_features(data_dir, models, contexts=[1], progress=False)
    assert all(r.ok for r in reports)
    # the X and O rows' and Test3's speech features are made too: they train the attributes, or are predicted
    speech = {p.stem for p in (data_dir / "vqw2vTokens").iterdir()}
    assert {r["name"] for r in rows if r["emotion"] in ("X", "O") or r["split"] == "test3"} <= speech
    options = [run_dir, data_dir, models, "1", "64", "310", "--protocol", "official", "--target", "both",
               "--attribute-utterances", "rated", "--epochs", "6", "--batch-size", "16", "--lr-encoders", "1e-3",
               "--lr-head", "2e-3", "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()):
        results = main.main(options)
    fold, test = results["folds"][0], results["folds"][0]["test"]
    assert fold["test_split"] == ["test"] and fold["n_test"] == sum(r["split"] == "test" for r in rows
                                                                     if r["label"] or r["emotion"] in ("X", "O"))
    # macro-F1 (MSP-Podcast's first metric) and CCC, recomputed from predictions.csv
    predictions = read_csv(run_dir / "fold1" / "predictions.csv")
    labelled = [r for r in predictions if r["true"]]
    assert f1_score([r["true"] for r in labelled], [r["predicted"] for r in labelled],
                    labels=list(collector.CLASSES), average="macro", zero_division=0) == pytest.approx(test["macro_f1"])
    for a in ("valence", "arousal", "dominance"):
        known = [r for r in predictions if r[f"true_{a}"]]
        assert ccc([float(r[a]) for r in known], [float(r[f"true_{a}"]) for r in known]) == \
            pytest.approx(test[f"{a}_ccc"], abs=1e-4)
    summary = (run_dir / "summary.md").read_text()
    assert "**Macro-F1" in summary and "Withheld partition test3: 12 utterances" in summary
    # Test3: predicted, never scored, in the challenge's submission format
    attributes = read_csv(run_dir / "fold1" / "submission_test3_attributes.csv")
    classes = read_csv(run_dir / "fold1" / "submission_test3_categorical.csv")
    assert list(attributes[0]) == ["FileName", "EmoAct", "EmoVal", "EmoDom"] and list(classes[0]) == ["FileName",
                                                                                                     "EmoClass"]
    assert [r["FileName"] for r in attributes] == [f"MSP-PODCAST_test3_{n:04d}.wav" for n in range(1, 13)]
    assert all(1 <= float(r[c]) <= 7 for r in attributes for c in ("EmoAct", "EmoVal", "EmoDom"))
    assert {r["EmoClass"] for r in classes} <= set(collector.CODES.values())
    assert fold["withheld"]["test3"]["n"] == 12
    with pytest.raises(SystemExit, match="--test-set test3: the corpus withholds its labels"):
        main.main([tmp_path / "run3", *options[1:], "--test-set", "test3"])
    # predict.py gives the classes and the attributes of a recording
    one = next(r for r in rows if r["split"] == "test3")
    out = tmp_path / "predicted.csv"
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict.main([str(run_dir), "--wav", str(data_dir / "Audio" / f"{one['name']}.wav"), "--text", "well",
                             "--output", str(out)]) == 0
    predicted = read_csv(out)[0]
    assert list(predicted)[-4:] == ["valence", "arousal", "dominance", "note"] and predicted["prediction"]
    assert all(math.isfinite(float(predicted[a])) for a in ("valence", "arousal", "dominance"))
    # the Python API and a recording's timeline carry the attributes in the same columns
    from mmser.api import Recognizer
    from mmser.timeline import timeline_csv, timeline_figure
    recognizer = Recognizer(run_dir)
    assert recognizer.attributes == ["valence", "arousal", "dominance"]
    answer = recognizer.predict(data_dir / "Audio" / f"{one['name']}.wav", text="well")
    assert all(f"{answer[c]:.6f}" == predicted[c] for c in ["valence", "arousal", "dominance"] +
               [f"p_{c}" for c in recognizer.classes]) and answer["prediction"] == predicted["prediction"]
    conversation = Path(__file__).parent / "data" / "conversation"
    result = recognizer.timeline(conversation / "conversation.flac", subtitles=conversation / "conversation.srt")
    assert result["attributes"] == recognizer.attributes and len(result["segments"]) > 3
    header = timeline_csv(result).split("\n")[0].split(",")
    assert header[-4:] == ["valence", "arousal", "dominance", "note"] and "p_angry" in header
    assert all(math.isfinite(s["arousal"]) for s in result["segments"])
    assert [axes.get_ylabel() for axes in timeline_figure(result).axes[:2]] == ["probability",
                                                                                "value (the corpus's scale)"]
