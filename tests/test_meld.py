"""MELD: the real release's CSVs read row by row, and a synthetic MELD-shaped tree with the release's
defects taken through the whole pipeline under the official protocol, weighted F1 first."""
import contextlib
import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import main
import meld_data_collect
import predict
from fixtures import synthetic_meld
from mmser.data_contract import read_classes, read_manifest
from mmser.data_dir_writer import CorpusError, normalise_transcript
from small_runs import SMALL, read_csv
from mmser import steps

REAL_CSVS = Path(__file__).parent / "data" / "meld"


def csv_rows(root, split):
    with open(Path(root) / f"{split}_sent_emo.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def real_release():
    """MELD's own three CSVs read as the release (no clips): -> (rows, notes)."""
    return meld_data_collect.read_release(REAL_CSVS)


def test_the_real_csvs_give_the_release_counts_and_every_row_as_written(real_release):
    rows, notes = real_release
    assert Counter(r["split"] for r in rows) == {"train": 9989, "dev": 1109, "test": 2610}
    meld_data_collect.verify_full_release(rows, REAL_CSVS)  # does not raise
    expected = [(split, r) for split in ("train", "dev", "test") for r in csv_rows(REAL_CSVS, split)]
    assert len(rows) == len(expected)
    for row, (split, r) in zip(rows, expected):  # the CSVs are in dialogue order already
        assert row["utterance_id"] == f"{split}_dia{r['Dialogue_ID']}_utt{r['Utterance_ID']}"
        assert (row["split"], row["speaker"], row["emotion"], row["sentiment"]) == \
               (split, r["Speaker"], r["Emotion"], r["Sentiment"])
        assert row["transcript"] == normalise_transcript(r["Utterance"])
    assert notes == {"repaired": [], "unlisted": []}  # GitHub's copy of the CSVs is clean UTF-8
    assert rows[0]["start"] == pytest.approx(16 * 60 + 16.059) and rows[0]["end"] == pytest.approx(16 * 60 + 21.731)


def test_sentiment_is_the_other_target():
    rows, _ = meld_data_collect.read_split(REAL_CSVS, "dev", "sentiment")
    assert Counter(r["label"] for r in rows) == Counter(r["Sentiment"] for r in csv_rows(REAL_CSVS, "dev"))
    assert {r["label"] for r in rows} == set(meld_data_collect.TARGETS["sentiment"])


def test_a_release_with_other_counts_is_refused(real_release):
    rows, _ = real_release
    with pytest.raises(CorpusError, match=r"dev: expected 1109, found 1108"):
        meld_data_collect.verify_full_release([r for r in rows if r["utterance_id"] != "dev_dia0_utt0"], "MELD")


def test_mis_encoded_text_is_repaired():
    assert meld_data_collect.repair_text("I\x92m here\xa0\x85") == "I’m here …"
    assert meld_data_collect.repair_text("donâ€™t â€” stop") == "don’t — stop"
    assert meld_data_collect.repair_text("Café, naïve…") == "Café, naïve…"


def test_synthetic_meld_through_the_pipeline_with_the_official_protocol(demo, tmp_path):
    root, data_dir, run_dir = tmp_path / "MELD.Raw", tmp_path / "data", tmp_path / "run"
    truth = synthetic_meld.make_tree(root, seed=0, dialogues_per_split=(3, 1, 2), utterances_per_dialogue=6)
    printed = io.StringIO()
    rows = meld_data_collect.collect(root, data_dir, progress=False, out=printed)
    report = printed.getvalue()

    # Every row is the CSVs' row, in dialogue order, its text repaired; the defects are named.
    expected = sorted(truth["utterances"], key=lambda u: (("train", "dev", "test").index(u["split"]),
                                                          u["dialogue"], u["utterance"]))
    manifest = read_manifest(data_dir)
    assert [(r["split"], r["utterance_id"], r["transcript"], r["speaker"], r["emotion"], r["sentiment"])
            for r in manifest] == [(u["split"], f"{u['split']}_dia{u['dialogue']}_utt{u['utterance']}", u["text"],
                                    u["speaker"], u["emotion"], u["sentiment"]) for u in expected]
    assert sum(u["real"] for u in expected) == 46 and sum(u["garbled"] for u in expected) == 2
    defective = {r["utterance_id"] for r in manifest if not r["label"]}
    assert defective == {"train_dia125_utt3", "dev_dia110_utt7", "test_dia1_utt2"}
    assert all(r["label"] == r["emotion"] for r in manifest if r["utterance_id"] not in defective)
    for uid, what in (("train_dia125_utt3", "corrupted clip"), ("dev_dia110_utt7", "clip missing from the release"),
                      ("test_dia1_utt2", "clip without an audio stream")):
        assert f"{uid}: " in report and what in report
    assert "repaired mis-encoded characters in 2 text(s)" in report
    assert "ignored 2 clip(s) that no CSV row lists" in report and "final_videos_testdia101_utt0.mp4" in report
    assert read_classes(data_dir) == list(meld_data_collect.TARGETS["emotion"])
    assert len(rows) == len(manifest) and not (data_dir / "labels_train_t.txt").exists()

    # The rest of the pipeline trains on it: train on train, checkpoint on dev, test on test.
    reports = steps.extract_features(data_dir, demo["run_dir"] / "models", contexts=[1],
                                                       progress=False)
    assert all(r.ok for r in reports)
    with contextlib.redirect_stdout(io.StringIO()):
        results = main.main([run_dir, data_dir, demo["run_dir"] / "models", *SMALL, "--protocol", "official",
                                "--select-by", "val_weighted_f1"])
    fold = results["folds"][0]
    labelled = Counter(r["split"] for r in manifest if r["label"])
    assert (fold["n_train"], fold["n_val"], fold["n_test"]) == (labelled["train"], labelled["dev"], labelled["test"])
    assert results["first_metric"] == "weighted_f1" and 0 <= results["summary"]["pooled"]["weighted_f1"] <= 1
    summary = (run_dir / "summary.md").read_text()
    assert summary.splitlines()[2].startswith(f"**Weighted F1 {results['summary']['pooled']['weighted_f1']:.4f}**")
    assert "official dev split" in summary and "checkpoint chosen by validation weighted F1" in summary
    history = json.loads((run_dir / "fold1" / "fold_result.json").read_text())["history"]
    assert fold["best_epoch"] == max(history, key=lambda h: h["val_weighted_f1"])["epoch"]  # the first best
    predictions = read_csv(run_dir / "fold1" / "predictions.csv")
    assert list(predictions[0])[3:] == [f"p_{c}" for c in meld_data_collect.TARGETS["emotion"]]
    assert [p["name"] for p in predictions] == [r["name"] for r in manifest if r["split"] == "test" and r["label"]]
    config = json.loads((run_dir / "config.json").read_text())
    present = {r["label"] for r in manifest}
    assert config["classes"] == [c for c in meld_data_collect.TARGETS["emotion"] if c in present]

    # predict.py follows the run's label set.
    requests = tmp_path / "requests.csv"
    with open(requests, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["wav", "text", "dialog"])
        writer.writerows([data_dir / "Audio" / f"{r['name']}.wav", r["transcript"], r["dialog"]]
                         for r in manifest if r["split"] == "test" and r["label"])
    out = tmp_path / "predicted.csv"
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict.main([str(run_dir), "--list", str(requests), "--output", str(out)]) == 0
    assert list(read_csv(out)[0])[3:-1] == ["prediction"] + [f"p_{c}" for c in config["classes"]]



def test_a_release_without_its_clips_or_a_split_of_them_is_refused_before_anything_is_written(tmp_path, capsys):
    root, data_dir = tmp_path / "MELD.Raw", tmp_path / "data"
    synthetic_meld.make_tree(root, seed=1, dialogues_per_split=(1, 1, 1), utterances_per_dialogue=4)
    csvs_only = tmp_path / "csvs_only"
    csvs_only.mkdir()
    for name in meld_data_collect.CSV_NAMES.values():
        (csvs_only / name).write_bytes((root / name).read_bytes())
    # The CSVs without the unpacked clip folders: exit 2, one line naming the folders (it said "wrote ...").
    assert meld_data_collect.main([str(csvs_only), str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"meld_data_collect.py: error: {csvs_only}: none of the ")
    assert "unpack train_splits/, dev_splits_complete/, output_repeated_splits_test/ into MELD_ROOT" in err
    # A whole split without its clips.
    for clip in (root / "output_repeated_splits_test").iterdir():
        clip.unlink()
    with pytest.raises(CorpusError, match=r"split test has no labelled utterance with usable audio"):
        meld_data_collect.collect(root, data_dir, progress=False, out=io.StringIO())
    assert not data_dir.exists()


def test_synthetic_meld_replaces_its_own_tree_and_nothing_else(tmp_path):
    root = tmp_path / "MELD.Raw"
    synthetic_meld.make_tree(root, seed=0, dialogues_per_split=(1, 1, 1), utterances_per_dialogue=2, real_csvs=None)
    (root / "utterances.csv").write_text("name\n")  # a DATA_DIR collected into the tree's folder
    with pytest.raises(FileExistsError, match=r"holds a DATA_DIR \(utterances.csv\), which synthetic_meld.py did not"):
        synthetic_meld.make_tree(root, seed=0, dialogues_per_split=(1, 1, 1), utterances_per_dialogue=2,
                                 real_csvs=None)
    assert (root / "utterances.csv").is_file() and (root / synthetic_meld.TRUTH_FILE).is_file()
