"""A researcher's own corpus from a CSV: its checks, each naming the CSV line, and a 3-class corpus of its
own labels through the whole pipeline (folds over its group column) and predict.py."""
import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

import csv_data_collect
import main
import meld_data_collect
import mocap_data_collect
import predict
from fixtures import synthetic_iemocap
from mmser.data_contract import SAMPLE_RATE, DataError, read_classes, read_manifest
from mmser.data_dir_writer import CorpusError, claim_data_dir, context_audio_advice, data_dir_owner
from small_runs import SMALL, read_csv
from mmser import steps
from mmser.protocols import make_folds
from mmser.settings import RunError

VOICE_OF = {"calm": "neu", "cross": "ang", "low": "sad"}  # the corpus's own labels, voiced as IEMOCAP's


def write_corpus(folder, dialogues=6, per_dialogue=6, seed=0):
    """A CSV corpus: wavs at 22.05 kHz stereo (resampled and mixed down by the collector), one
    long recording cut by start/end, rows of each dialogue shuffled with an order column, a
    context-only row per dialogue (empty label, no wav), two groups and splits. -> the CSV's path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wavs").mkdir(exist_ok=True)
    rows, long_parts = [], []
    labels = list(VOICE_OF)
    for d in range(dialogues):
        dialog_rows = []
        for u in range(per_dialogue):
            label = "" if u == 2 else labels[(d + u) % 3]
            code = VOICE_OF[label] if label else "neu"
            text = synthetic_iemocap.make_transcript(rng, code)
            voice = synthetic_iemocap.synth_voice(rng, code, "FM"[u % 2], int(0.6 * SAMPLE_RATE))
            row = {"id": f"d{d}u{u}", "wav": "", "text": text, "label": label, "dialog": f"conv{d}", "order": u,
                   "speaker": f"spk{d % 2}{u % 2}", "group": f"g{d % 2}", "split": ("train", "train", "dev",
                                                                                   "test")[d % 4],
                   "start": "", "end": ""}
            if label and d == 0 and u < 2:  # both from one long recording, cut by start/end
                row.update(wav="wavs/long.flac", start=f"{len(long_parts) * 0.6:.1f}",
                           end=f"{len(long_parts) * 0.6 + 0.6:.1f}")
                long_parts.append(voice)
            elif label:
                row["wav"] = f"wavs/{row['id']}.wav"
                x = np.interp(np.arange(0, len(voice), SAMPLE_RATE / 22050), np.arange(len(voice)), voice) / 32768
                sf.write(folder / row["wav"], np.stack([x, 0.5 * x], 1), 22050)
            dialog_rows.append(row)
        rows += [dialog_rows[i] for i in rng.permutation(per_dialogue)]  # order, not row order, counts
    sf.write(folder / "wavs" / "long.flac", np.concatenate(long_parts) / 32768, SAMPLE_RATE)
    path = folder / "corpus.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def collect(csv_path, data_dir, **kwargs):
    printed = io.StringIO()
    rows = csv_data_collect.collect(csv_path, data_dir, progress=False, out=printed, **kwargs)
    return rows, printed.getvalue()


def edited(csv_path, edit):
    """The CSV with edit(rows) applied, written beside it; -> its path."""
    rows = read_csv(csv_path)
    columns = list(rows[0])
    rows = edit(rows) or rows
    out = csv_path.with_name("edited.csv")
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else columns)
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_the_label_set_is_recorded_beside_the_manifest_and_read_back(demo, tmp_path):
    # IEMOCAP's collector records its four classes the same way; a DATA_DIR made before classes.json
    # existed reads as IEMOCAP's, and its utterances.csv has no optional column.
    assert json.loads((demo["data_dir"] / "classes.json").read_text())["classes"] == ["ang", "hap", "sad", "neu"]
    assert (demo["data_dir"] / "utterances.csv").read_text().splitlines()[0].endswith(",dominance,transcript")
    older = tmp_path / "older"
    older.mkdir()
    (older / "utterances.csv").write_bytes((demo["data_dir"] / "utterances.csv").read_bytes())
    assert read_classes(older) == ["ang", "hap", "sad", "neu"] and len(read_manifest(older)) == 400
    (older / "classes.json").write_text('{"classes": ["ang", "sad"]}')
    with pytest.raises(DataError, match=r"utterances.csv:\d+: label 'hap' is not one of ang, sad"):
        read_manifest(older)
    (older / "classes.json").write_text('{"classes": ["ang"]}')
    with pytest.raises(DataError, match="classes.json: 'classes' must list at least two"):
        read_classes(older)


def test_each_problem_of_a_csv_corpus_is_named_with_its_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", dialogues=3, per_dialogue=4)
    data_dir = tmp_path / "data"

    def broken(edit, message):
        with pytest.raises(CorpusError, match=message):
            collect(edited(corpus, edit), data_dir)
        assert not (data_dir / "utterances.csv").exists()  # nothing written before the checks

    first_labelled = next(i for i, r in enumerate(read_csv(corpus)) if r["label"])
    line = first_labelled + 2  # the header is line 1
    broken(lambda rows: [dict(r, dialogue="x") for r in rows], r"edited.csv:1: unknown column 'dialogue'")
    broken(lambda rows: rows[first_labelled].update(wav="wavs/gone.wav"),
           rf"edited.csv:{line}: .*gone.wav: no such audio file")
    (corpus.parent / "wavs" / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    broken(lambda rows: rows[first_labelled].update(wav="wavs/broken.wav"), rf"edited.csv:{line}: .*unreadable audio")
    broken(lambda rows: rows[first_labelled].update(label="bored"),
           rf"edited.csv:{line}: label 'bored' appears once")
    broken(lambda rows: rows[first_labelled + 1].update(id=rows[first_labelled]["id"]),
           rf"edited.csv:{line + 1}: id '{read_csv(corpus)[first_labelled]['id']}' already on line {line}")
    broken(lambda rows: rows[first_labelled].update(split="validation"),
           rf"edited.csv:{line}: split 'validation' is not one of train, dev, test")
    broken(lambda rows: [{k: v for k, v in r.items() if k != "label"} for r in rows], "missing label")

    # --allow-missing keeps a row without usable audio as context only, and says so.
    rows, printed = collect(edited(corpus, lambda rows: rows[first_labelled].update(wav="wavs/gone.wav")), data_dir,
                            allow_missing=True)
    gone = read_csv(corpus)[first_labelled]["id"]
    assert [r["label"] for r in read_manifest(data_dir) if r["utterance_id"] == gone] == [""]
    assert "1 labelled row(s) without usable audio" in printed and "gone.wav" in printed


def test_another_corpus_data_dir_is_refused_and_replaced_whole_only_with_overwrite(demo, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", dialogues=3, per_dialogue=4)
    data_dir = tmp_path / "data"
    shutil.copytree(demo["data_dir"], data_dir)  # IEMOCAP's: labels_train_t.txt, features.json, feature folders
    (data_dir / "notes.txt").write_text("mine")
    before = (data_dir / "utterances.csv").read_bytes()
    for collector, corpus_arg in ((csv_data_collect, corpus), (meld_data_collect, corpus.parent)):
        assert collector.main([str(corpus_arg), str(data_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--overwrite" in err
        assert f"{data_dir}: holds the DATA_DIR of another corpus (IEMOCAP, written by mocap_data_collect.py)" in err
    assert (data_dir / "utterances.csv").read_bytes() == before and (data_dir / "labels_train_t.txt").is_file()

    rows, printed = collect(corpus, data_dir, overwrite=True)
    assert "--overwrite: replaced the DATA_DIR of IEMOCAP (mocap_data_collect.py): removed utterances.csv" in printed
    # All of IEMOCAP's files went, features made for its manifest included; the user's own file stayed.
    assert sorted(p.name for p in data_dir.iterdir()) == ["Audio", "Text", "classes.json", "notes.txt",
                                                          "utterances.csv"]
    assert {p.stem for p in (data_dir / "Text").iterdir()} == {r["name"] for r in rows}
    assert data_dir_owner(data_dir) == {"corpus": "corpus.csv", "collector": "csv_data_collect.py"}
    collect(corpus, data_dir)  # a rerun of the same corpus needs no --overwrite
    with pytest.raises(CorpusError, match=r"another corpus \(corpus.csv, written by csv_data_collect.py\)"):
        mocap_data_collect.collect(demo["run_dir"] / "corpus", data_dir, progress=False, out=io.StringIO())


def test_context_rows_audio_is_written_with_all_audio_and_a_missing_wav_is_listed(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", dialogues=3, per_dialogue=4)
    labelled_wav = next(r["wav"] for r in read_csv(corpus) if r["label"] and r["wav"].endswith(".wav"))

    def context_wavs(rows):  # the three context rows: a wav that is there, one that is not, none
        for row, wav in zip([r for r in rows if not r["label"]], (labelled_wav, "wavs/gone.wav", "")):
            row["wav"] = wav
    corpus = edited(corpus, context_wavs)
    data_dir = tmp_path / "data"
    rows, printed = collect(corpus, data_dir)
    assert "1 context row(s) name a wav that is not there" in printed and "gone.wav: no such file" in printed
    assert {p.stem for p in (data_dir / "Audio").iterdir()} == {r["name"] for r in rows if r["label"]}
    # The transcripts step's advice for a context utterance without audio names this collector's option.
    assert context_audio_advice(data_dir).startswith("csv_data_collect.py writes the labelled utterances' audio only; "
                                                     "rerun it with --all-audio")

    with pytest.raises(CorpusError, match=r"gone.wav: no such audio file.*--allow-missing"):
        collect(corpus, data_dir, all_audio=True)
    rows, printed = collect(corpus, data_dir, all_audio=True, allow_missing=True)
    context = [r for r in rows if not r["label"]]
    assert {p.stem for p in (data_dir / "Audio").iterdir()} == {r["name"] for r in rows if r["label"]} | {
        context[0]["name"]}
    assert "--allow-missing: 1 context row(s) without usable audio" in printed
    assert "--all-audio: 1 context row(s) without a wav" in printed


def test_the_advice_for_a_missing_wav_names_the_collector_of_an_older_data_dir(tmp_path):
    (tmp_path / "utterances.csv").write_text("name\n")  # before classes.json: IEMOCAP's
    assert "mocap_data_collect.py" in context_audio_advice(tmp_path)
    (tmp_path / "classes.json").write_text('{"classes": ["a", "b"], "corpus": "MELD"}')  # before "collector"
    assert context_audio_advice(tmp_path).startswith("meld_data_collect.py writes every clip's audio")
    (tmp_path / "classes.json").write_text('{"classes": ["a", "b"], "corpus": "mine.csv"}')
    assert data_dir_owner(tmp_path) == {"corpus": "mine.csv", "collector": "csv_data_collect.py"}
    # A collector that does not name itself is told apart by its corpus alone.
    (tmp_path / "classes.json").write_text('{"classes": ["a", "b"], "corpus": "MSP-Podcast"}')
    assert claim_data_dir(tmp_path, {"corpus": "MSP-Podcast"}) is None
    with pytest.raises(CorpusError, match=r"another corpus \(MSP-Podcast, written by MSP-Podcast's collector\)"):
        claim_data_dir(tmp_path, {"corpus": "MELD", "collector": "meld_data_collect.py"})


def test_a_collection_without_a_labelled_class_or_split_is_refused(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", dialogues=4, per_dialogue=4)
    data_dir = tmp_path / "data"
    with pytest.raises(CorpusError, match=r"corpus.csv: no labelled utterance with usable audio of class bored"):
        collect(corpus, data_dir, classes=["calm", "cross", "low", "bored"])

    def dev_wavs_gone(rows):
        for row in rows:
            if row["split"] == "dev" and row["label"]:
                row["wav"] = "wavs/gone.wav"
    gone = edited(corpus, dev_wavs_gone)
    with pytest.raises(CorpusError, match=r"edited.csv: split dev has no labelled utterance with usable audio"):
        collect(gone, data_dir, allow_missing=True)
    assert not data_dir.exists()


def test_a_csv_corpus_of_its_own_three_labels_through_the_pipeline_and_predict(demo, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", dialogues=8, per_dialogue=8)
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    rows, printed = collect(corpus, data_dir, classes=["calm", "cross", "low"])

    # The manifest: dialogues in order of first appearance, each in its order column's order.
    given = read_csv(corpus)
    manifest = read_manifest(data_dir)
    dialogs = list(dict.fromkeys(r["dialog"] for r in given))
    expected = sorted(given, key=lambda r: (dialogs.index(r["dialog"]), int(r["order"])))
    assert [(r["utterance_id"], r["transcript"], r["label"], r["speaker"], r["group"], r["split"])
            for r in manifest] == [(r["id"], r["text"], r["label"], r["speaker"], r["group"], r["split"])
                                   for r in expected]
    assert read_classes(data_dir) == ["calm", "cross", "low"]
    assert (data_dir / "utterances.csv").read_text().splitlines()[0].endswith(",transcript,split,group")
    for r in manifest:  # 16 kHz mono for the labelled rows, nothing for the context-only ones
        assert (data_dir / "Audio" / f"{r['name']}.wav").is_file() == bool(r["label"])
    cut = next(r for r in manifest if r["utterance_id"] == "d0u1")
    audio, rate = sf.read(data_dir / "Audio" / f"{cut['name']}.wav")
    assert rate == SAMPLE_RATE and audio.ndim == 1 and len(audio) == int(0.6 * SAMPLE_RATE)
    assert "calm" in printed.splitlines()[0]

    # Features with the demo's tiny models, then folds over the group column, then predict.py.
    reports = steps.extract_features(data_dir, demo["run_dir"] / "models", contexts=[1],
                                                       progress=False)
    assert all(r.ok for r in reports)
    with contextlib.redirect_stdout(io.StringIO()):
        results = main.main([run_dir, data_dir, demo["run_dir"] / "models", *SMALL, "--protocol", "folds",
                             "--fold-by", "group", "--val-fraction", "0.2"])
    assert [f["test_group"] for f in results["folds"]] == [["g0"], ["g1"]]
    for f in results["folds"]:  # a fold's test dialogues are not trained on
        assert f["n_test"] == sum(1 for r in manifest if r["label"] and r["group"] == f["test_group"][0])
    assert list(results["summary"]["pooled"]["per_class_recall"]) == ["calm", "cross", "low"]
    assert "first_metric" not in results and "Weighted F1" not in (run_dir / "summary.md").read_text()
    assert json.loads((run_dir / "config.json").read_text())["fold_by"] == "group"
    assert list(read_csv(run_dir / "fold1" / "predictions.csv")[0])[3:] == ["p_calm", "p_cross", "p_low"]

    # The corpus's own CSV is a valid request list: its context-only rows give context only.
    out = tmp_path / "predicted.csv"
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict.main([str(run_dir), "--list", str(corpus), "--output", str(out)]) == 0
    predicted = read_csv(out)
    assert list(predicted[0])[-5:] == ["prediction", "p_calm", "p_cross", "p_low", "note"]
    assert {r["prediction"] for r in predicted if r["label"]} <= {"calm", "cross", "low"}
    assert all(r["prediction"] == "" for r in predicted if not r["label"])


def test_folds_over_a_column_keep_the_test_folds_dialogues_out_of_training():
    # Two conversations between three speakers: holding out speaker b holds out both dialogues b speaks in.
    utterances = [{"index": i, "session": 0, "dialog": d, "speaker": s, "label": i % 2, "group": d}
                  for i, (d, s) in enumerate([("c1", "a"), ("c1", "b")] * 3 + [("c2", "b"), ("c2", "c")] * 3
                                             + [("c3", "a"), ("c3", "c")] * 3)]
    folds = make_folds(utterances, "folds", "stratified", 0.5, 0, fold_by="speaker")
    assert [f["test_speaker"] for f in folds] == [["a"], ["b"], ["c"]]
    held_out_b = folds[1]
    assert {u["dialog"] for u in held_out_b["train"] + held_out_b["val"]} == {"c3"}
    assert {u["speaker"] for u in held_out_b["test"]} == {"b"}
    with pytest.raises(RunError, match="this corpus has none: use --protocol official"):
        make_folds(utterances, "loso")
    with pytest.raises(RunError, match="official needs the manifest's split column"):
        make_folds(utterances, "official")
    with pytest.raises(RunError, match="--fold-by sentiment: the manifest has no such column"):
        make_folds(utterances, "folds", fold_by="sentiment")


def rated(corpus, scale_of_row):
    """The corpus with valence and arousal columns (dominance not rated), each row's from scale_of_row, as
    rated.csv beside it (edited() writes edited.csv)."""
    def add(rows):
        for i, r in enumerate(rows):
            r["valence"], r["arousal"] = scale_of_row(i, r)
    return edited(corpus, add).rename(corpus.with_name("rated.csv"))


def test_a_csv_corpus_with_attributes_records_their_scale_and_trains_them(demo, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", dialogues=4, per_dialogue=6)
    # valence on -1..1 from the voice's class, arousal on 0..10; the context rows are rated, one has a wav
    sign = {"calm": 0.0, "cross": -0.8, "low": -0.5, "": 0.2}
    path = rated(corpus, lambda i, r: (f"{sign[r['label']] + 0.1 * (i % 3):.2f}", str(i % 11)))
    with pytest.raises(CorpusError, match=r"column valence, arousal needs the range its ratings can take: "
                                          r"--attribute-scale LOW:HIGH"):
        collect(path, tmp_path / "data")
    with pytest.raises(CorpusError, match=r"rated.csv:\d+: arousal 10 lies outside its scale 0:9"):
        collect(path, tmp_path / "data", scales=csv_data_collect.parse_scales(["valence=-1:1", "arousal=0:9"]))
    with pytest.raises(CorpusError, match="given, but the CSV has no such rating column"):
        collect(path, tmp_path / "data", scales=csv_data_collect.parse_scales(["-1:10", "dominance=1:5"]))
    bad = edited(path, lambda rows: rows[3].update(valence="high"))
    with pytest.raises(CorpusError, match=r"edited.csv:5: valence 'high' is not a number"):
        collect(bad, tmp_path / "data", scales=csv_data_collect.parse_scales(["-1:10"]))
    alias = edited(path, lambda rows: [{**{k: v for k, v in r.items() if k != "arousal"}, "activation": r["arousal"]}
                                       for r in rows])
    with pytest.raises(CorpusError, match="unknown column 'activation' .a rating. this tool calls it arousal"):
        collect(alias, tmp_path / "data", scales=csv_data_collect.parse_scales(["-1:10"]))
    with pytest.raises(CorpusError, match="--attribute-scale 5:1: expected LOW:HIGH"):
        csv_data_collect.parse_scales(["5:1"])

    data_dir = tmp_path / "data"
    context_wav = edited(path, lambda rows: next(r for r in rows if not r["label"]).update(wav="wavs/long.flac",
                                                                                           start="0", end="0.6"))
    assert context_wav.name == "edited.csv" and path.name == "rated.csv"
    rows, printed = collect(context_wav, data_dir, scales=csv_data_collect.parse_scales(["valence=-1:1",
                                                                                          "arousal=0:10"]))
    from mmser.data_contract import read_attributes
    from mmser.dimensional import Scale
    assert read_attributes(data_dir) == {"valence": Scale(-1, 1), "arousal": Scale(0, 10)}
    assert json.loads((data_dir / "classes.json").read_text())["attributes"] == {"valence": [-1, 1],
                                                                                  "arousal": [0, 10]}
    manifest = read_manifest(data_dir)
    given = {r["id"]: r for r in read_csv(context_wav)}
    assert all(r["valence"] == float(given[r["utterance_id"]]["valence"]) and
               r["activation"] == float(given[r["utterance_id"]]["arousal"]) and np.isnan(r["dominance"])
               for r in manifest)
    rated_context = [r for r in manifest if not r["label"] and (data_dir / "Audio" / f"{r['name']}.wav").is_file()]
    assert len(rated_context) == 1  # a rated context row's audio is data: written without --all-audio
    assert "attributes: valence -1:1 (24 rated), arousal 0:10 (24 rated)" in printed

    # the attributes on the corpus's own scales through a run: both targets, the corpus's splits
    assert all(r.ok for r in steps.extract_features(data_dir, demo["run_dir"] / "models", contexts=[1],
                                                    progress=False))
    run_dir, options = tmp_path / "run", ["--protocol", "official", "--target", "both", "--attribute-utterances",
                                          "rated", "--epochs", "2"]
    # the rated context rows without a wav have no speech to hear: the speech branch says how to get it
    with pytest.raises(SystemExit, match=r"vqw2vTokens/\d+_s_0_xxx.npy: not found \(3 of 24 utterances the run reads.*"
                                         r"collect with --all-audio"):
        main.main([run_dir, data_dir, demo["run_dir"] / "models", *SMALL, *options])
    with contextlib.redirect_stdout(io.StringIO()):
        results = main.main([run_dir, data_dir, demo["run_dir"] / "models", *SMALL, *options,
                             "--branches", "text,context"])
    assert set(results["folds"][0]["test"]["attribute_n"]) == {"valence", "arousal"}
    summary = (run_dir / "summary.md").read_text()
    assert "| valence | -1 to 1 |" in summary and "| arousal | 0 to 10 |" in summary
    predictions = read_csv(run_dir / "fold1" / "predictions.csv")
    assert list(predictions[0])[-4:] == ["true_valence", "true_arousal", "valence", "arousal"]
