"""Speech recognition: a tiny Whisper's transcripts of a synthetic corpus, their word error rate,
training on them, and predict.py on a recording given without text.

One corpus, one tiny Whisper and one transcription are shared by the module (scope="module").
"""
import contextlib
import functools
import io
import json
import shutil
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq, AutoTokenizer

import concatenate_embds
import feature_ext
import main
import mocap_data_collect
import predict
from fixtures import synthetic_iemocap
from mmser.data_contract import SAMPLE_RATE, qualified_step, read_features_record, read_manifest, transcript_set
from mmser.asr import normalise_for_wer, transcribe, word_errors
from mmser.extraction import read_transcript
from small_runs import SMALL, read_csv
from fixtures.tiny_models import make_tiny_bert, make_tiny_roberta, write_tiny_whisper
from mmser.utils import write_text_atomic
from mmser import asr as asr_module, extraction

SILENT = 3  # the manifest row whose audio the fixture replaces with silence


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    """A synthetic corpus collected with every utterance's audio, tiny text models, a tiny Whisper,
    its transcripts (the command line of feature_ext.py) and the text features made from them."""
    root = tmp_path_factory.mktemp("asr")
    synthetic_iemocap.make_corpus(root / "IEMOCAP", seed=0, dialogues_per_session=2, utterances_per_dialogue=10)
    data_dir, models_dir = root / "data", root / "models"
    rows = mocap_data_collect.collect(root / "IEMOCAP", data_dir, progress=False, out=io.StringIO(), all_audio=True)
    silent = data_dir / "Audio" / f"{rows[SILENT]['name']}.wav"
    import soundfile as sf
    sf.write(silent, np.zeros(SAMPLE_RATE, np.int16), SAMPLE_RATE, subtype="PCM_16")
    texts = [r["transcript"] for r in rows]
    make_tiny_bert(models_dir / "bert-base-uncased", texts)
    make_tiny_roberta(models_dir / "roberta-large", texts)
    whisper = write_tiny_whisper(models_dir / "tiny-whisper", texts)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = feature_ext.main(["transcripts", str(data_dir), str(models_dir), "--asr-model", str(whisper),
                                   "--asr-precision", "fp32"])
        for step in ("text-tokens", "sentence-embeddings"):
            assert feature_ext.main([step, str(data_dir), str(models_dir), "--transcripts", "asr",
                                     "--asr-model", str(whisper)]) == 0
        assert concatenate_embds.main([str(data_dir), "--context", "1", "--asr-model", str(whisper)]) == 0
        for step in ("text-tokens", "sentence-embeddings"):  # the reference set's, for mixing
            assert feature_ext.main([step, str(data_dir), str(models_dir)]) == 0
        assert concatenate_embds.main([str(data_dir), "--context", "1"]) == 0
    return {"root": root, "data_dir": data_dir, "models_dir": models_dir, "whisper": whisper, "rows": rows,
            "set": transcript_set(whisper), "status": status, "summary": printed.getvalue()}


@functools.lru_cache
def _whisper(whisper):
    return (AutoFeatureExtractor.from_pretrained(whisper), AutoTokenizer.from_pretrained(whisper),
            AutoModelForSpeechSeq2Seq.from_pretrained(whisper).eval())


def greedy_generate(whisper, wav):
    """transformers' own greedy generate for one waveform of at most 30 s: English, transcribe, no timestamps."""
    extractor, tokenizer, model = _whisper(whisper)
    features = extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(features, language="en", task="transcribe", num_beams=1, do_sample=False)
    return tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def test_each_transcript_is_whispers_own_greedy_generate(asr):
    import soundfile as sf
    data_dir, rows = asr["data_dir"], asr["rows"]
    assert asr["status"] == 0, asr["summary"]
    assert all((data_dir / asr["set"] / "Text" / f"{row['name']}.txt").is_file() for row in rows)
    record = read_features_record(data_dir)[f"transcripts@{asr['whisper'].name}"]
    assert record["asr_model"]["path"] == str(asr["whisper"].resolve()) and len(record["asr_model"]["sha256"]) == 64
    assert record["asr_decoding"] == {"backend": "transformers", "precision": "fp32"}
    heard = [read_transcript(data_dir, row["name"], asr["set"]) for row in rows]
    assert len(set(heard)) > len(rows) // 2  # the tiny model hears the utterances differently
    for row, text in list(zip(rows, heard))[:20]:  # one session: 20 generate calls
        if row is rows[SILENT]:
            continue
        wav = sf.read(data_dir / "Audio" / f"{row['name']}.wav", dtype="float32")[0]
        assert text == greedy_generate(asr["whisper"], wav), row["name"]


def test_a_long_recording_is_transcribed_in_30_s_windows_and_silence_is_empty(asr):
    whisper = asr["whisper"]
    asr_parts = asr_module.load_asr(str(whisper), precision="fp32")
    rng = np.random.default_rng(0)
    long = (0.1 * rng.standard_normal(65 * SAMPLE_RATE)).astype(np.float32)
    windows = [long[:30 * SAMPLE_RATE], long[30 * SAMPLE_RATE:60 * SAMPLE_RATE], long[60 * SAMPLE_RATE:]]
    texts, empty = transcribe([long, np.zeros(SAMPLE_RATE, np.float32), long[:800]], asr_parts, batch_size=2)
    assert texts[0] == " ".join(" ".join(greedy_generate(whisper, w) for w in windows).split())
    assert texts[1:] == ["", ""] and empty[1].startswith("silent") and empty[2].startswith("too short")


def test_batches_of_windows_give_the_texts_of_one_utterance_at_a_time(asr):
    # Windows of every length, a 65-s recording's three among them: decoded longest first in
    # batches of 3, each utterance's texts put back in order, as when each is transcribed alone.
    whisper = asr_module.load_asr(str(asr["whisper"]), precision="fp32")
    rng = np.random.default_rng(1)
    wavs = [(0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32) for s in (2.5, 65, 0.7, 12, 4, 31)]
    batched, _ = transcribe(wavs, whisper, batch_size=3)
    assert batched == [transcribe([wav], whisper, batch_size=1)[0][0] for wav in wavs]
    assert len(set(batched)) == len(wavs)


def test_faster_whisper_in_fp32_writes_transformers_words_and_another_precision_needs_overwrite(asr, tmp_path):
    pytest.importorskip("ctranslate2")  # requirements-asr.txt
    data_dir, models_dir = tmp_path / "data", tmp_path / "models"
    shutil.copytree(asr["data_dir"], data_dir, ignore=shutil.ignore_patterns("ASR-*", "features.json"))
    models_dir.mkdir()
    args = ["transcripts", str(data_dir), str(models_dir), "--asr-model", str(asr["whisper"]),
            "--asr-backend", "faster-whisper"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert feature_ext.main(args + ["--asr-precision", "fp32"]) == 0
    converted = models_dir / f"{asr['whisper'].name}-ctranslate2"
    record = read_features_record(data_dir)[f"transcripts@{asr['whisper'].name}"]
    assert Path(record["asr_ctranslate2_model"]["path"]).resolve() == converted.resolve()
    assert len(record["asr_ctranslate2_model"]["sha256"]) == 64
    assert record["asr_decoding"] == {"backend": "faster-whisper", "precision": "fp32"}
    for row in asr["rows"]:  # CTranslate2 in fp32 hears what transformers in fp32 heard
        assert read_transcript(data_dir, row["name"], asr["set"]) == read_transcript(asr["data_dir"], row["name"],
                                                                                     asr["set"]), row["name"]
    # int8 (auto on a CPU) would mix other transcripts into the set: it stops, saying so, unless
    # --overwrite makes them all again; the converted model is reused.
    converted_at = (converted / "model.bin").stat().st_mtime_ns
    with contextlib.redirect_stdout(printed):
        assert feature_ext.main(args) == 1
    assert "asr_decoding: faster-whisper fp32 -> faster-whisper int8" in printed.getvalue()
    with contextlib.redirect_stdout(printed):
        assert feature_ext.main(args + ["--overwrite"]) == 0
    record = read_features_record(data_dir)[f"transcripts@{asr['whisper'].name}"]
    assert record["asr_decoding"] == {"backend": "faster-whisper", "precision": "int8"}
    assert (converted / "model.bin").stat().st_mtime_ns == converted_at


def test_auto_precision_is_bf16_where_the_cpu_computes_it_and_int8_for_faster_whisper(monkeypatch):
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(asr_module, "cpu_has_native_bf16", lambda: native)
        assert asr_module.asr_precision("transformers", "cpu", "auto") == expected
    assert asr_module.asr_precision("faster-whisper", "cpu", "auto") == "int8"
    assert asr_module.asr_precision("transformers", "cpu", "fp32") == "fp32"
    for backend, precision in (("transformers", "int8"), ("transformers", "fp16")):
        with pytest.raises(ValueError, match=precision):
            asr_module.asr_precision(backend, "cpu", precision)


def test_silent_audio_gets_an_empty_transcript_a_word_and_a_valid_context_vector(asr):
    data_dir, name = asr["data_dir"], asr["rows"][SILENT]["name"]
    assert read_transcript(data_dir, name, asr["set"]) == ""
    assert "silent or too short" in asr["summary"] and name in asr["summary"]
    vector = np.load(data_dir / asr["set"] / "FullBertEmb1" / f"{name}.npy")
    assert vector.dtype == np.float32 and np.isfinite(vector).all() and vector.any()


def test_the_wer_file_agrees_with_jiwer_overall_and_per_session(asr):
    data_dir, rows = asr["data_dir"], asr["rows"]
    wer = json.loads((data_dir / asr["set"] / "wer.json").read_text())
    refs = [normalise_for_wer(r["transcript"]) for r in rows]
    hyps = [normalise_for_wer(read_transcript(data_dir, r["name"], asr["set"])) for r in rows]
    assert wer["overall"]["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    for session in (1, 5):
        mine = [i for i, r in enumerate(rows) if r["session"] == session]
        assert wer["sessions"][str(session)]["wer"] == pytest.approx(jiwer.wer([refs[i] for i in mine],
                                                                               [hyps[i] for i in mine]))
    assert f"WER {wer['overall']['wer']:.3f}" in asr["summary"]


def test_wer_of_transcripts_with_known_errors(asr, tmp_path):
    # The normalisation: tags, case and punctuation go; what is left is compared word by word.
    assert normalise_for_wer("[LAUGHTER] Well, I DON'T know... [BREATHING]") == "well i dont know"
    counts = word_errors(["Hello there, [LAUGHTER] how are you?", "Yes."], ["hello their how are you doing", ""])
    assert counts == {"wer": 3 / 6, "words": 6, "substitutions": 1, "deletions": 1, "insertions": 1, "utterances": 2}
    # The step's WER file, over a transcript set whose errors are known: one word left out of the
    # first utterance of session 2, the second one not heard at all, the rest transcribed exactly.
    rows = read_manifest(asr["data_dir"])
    for row in rows:
        write_text_atomic(tmp_path / "ASR-known" / "Text" / f"{row['name']}.txt", row["transcript"])
        write_text_atomic(tmp_path / "Text" / f"{row['name']}.txt", row["transcript"])
    first, second = [row for row in rows if row["session"] == 2][:2]
    words = normalise_for_wer(first["transcript"]).split()
    write_text_atomic(tmp_path / "ASR-known" / "Text" / f"{first['name']}.txt", " ".join(words[1:]))
    write_text_atomic(tmp_path / "ASR-known" / "Text" / f"{second['name']}.txt", "")
    report = extraction.StepReport("transcripts@known")
    wer = asr_module.write_wer(tmp_path, rows, "known", report)
    session_words = sum(len(normalise_for_wer(r["transcript"]).split()) for r in rows if r["session"] == 2)
    missed = 1 + len(normalise_for_wer(second["transcript"]).split())
    assert wer["sessions"]["2"]["deletions"] == missed and wer["sessions"]["2"]["wer"] == missed / session_words
    assert wer["sessions"]["1"]["wer"] == 0 and wer["overall"]["insertions"] == wer["overall"]["substitutions"] == 0
    assert json.loads((tmp_path / "ASR-known" / "wer.json").read_text()) == wer


def test_a_run_trains_on_asr_transcripts_and_predicts_a_recording_without_text(asr, tmp_path, capsys):
    data_dir, run_dir = asr["data_dir"], tmp_path / "run"
    main.main([str(run_dir), str(data_dir), str(asr["models_dir"]), *SMALL, "--branches", "text,context",
               "--transcripts", "asr"])
    wer = json.loads((data_dir / asr["set"] / "wer.json").read_text())["overall"]["wer"]
    results, config = (json.loads((run_dir / name).read_text()) for name in ("results.json", "config.json"))
    for record in (results, config):
        assert record["transcripts"] == {"train": "asr", "test": "asr"}
        assert record["asr_model"] == str(asr["whisper"].resolve()) and record["asr_wer"] == wer
    assert config["pretrained"]["asr_model"]["path"] == str(asr["whisper"].resolve())
    assert f"tested on the asr ones; ASR model `{asr['whisper'].resolve()}`, WER {wer:.3f}" in \
        (run_dir / "summary.md").read_text()
    # A recording given without text: transcribed by the run's Whisper, as the transcripts step did.
    row = next(r for r in asr["rows"] if r["session"] == 5 and r["label"])
    capsys.readouterr()
    out = tmp_path / "out.csv"
    assert predict.main([str(run_dir), "--wav", str(data_dir / "Audio" / f"{row['name']}.wav"),
                         "--output", str(out)]) == 0
    (written,) = read_csv(out)
    heard = read_transcript(data_dir, row["name"], asr["set"])
    assert written["text"] == "" and written["asr_transcript"] == heard and written["prediction"]
    assert f"(ASR) {heard}"[:31] in capsys.readouterr().out
    # A whole test dialogue without text, in order: each other's context as in training, so each
    # labelled utterance is predicted as the run evaluated it.
    dialog = [r for r in asr["rows"] if r["dialog"] == row["dialog"]]
    listing = tmp_path / "dialog.csv"
    listing.write_text("wav,text,dialog\n" + "".join(f"{data_dir / 'Audio' / (r['name'] + '.wav')},,{r['dialog']}\n"
                                                     for r in dialog))
    assert predict.main([str(run_dir), "--list", str(listing), "--output", str(out)]) == 0
    evaluated = {r["name"]: r for r in read_csv(run_dir / "fold1" / "predictions.csv")}
    for r, written in zip(dialog, read_csv(out)):
        assert written["asr_transcript"] == read_transcript(data_dir, r["name"], asr["set"])
        if r["label"]:
            assert written["prediction"] == evaluated[r["name"]]["predicted"]
            assert float(written["p_ang"]) == pytest.approx(float(evaluated[r["name"]]["p_ang"]), abs=1e-5)


def test_mixing_trains_on_one_transcript_set_and_tests_on_the_other(asr, tmp_path):
    data_dir, models_dir = asr["data_dir"], asr["models_dir"]
    runs = {}
    for test_set in ("asr", "reference"):
        runs[test_set] = tmp_path / test_set
        main.main([str(runs[test_set]), str(data_dir), str(models_dir), *SMALL, "--epochs", "1",
                   "--branches", "text,context", "--transcripts", "asr", "--test-transcripts", test_set])
    mixed = json.loads((runs["reference"] / "results.json").read_text())
    assert mixed["transcripts"] == {"train": "asr", "test": "reference"}
    # One training (the same transcripts, seed and validation), two test sets: the same weights,
    # other inputs, other probabilities.
    same, mixed_weights = (torch.load(runs[t] / "fold1" / "best.pt", weights_only=True)["model"] for t in runs)
    assert all(torch.equal(same[k], mixed_weights[k]) for k in same)
    probs = {t: [r["p_ang"] for r in read_csv(runs[t] / "fold1" / "predictions.csv")] for t in runs}
    assert probs["asr"] != probs["reference"]
    with pytest.raises(SystemExit, match="ASR-other/Text: not found"):
        main.main([str(tmp_path / "x"), str(data_dir), str(models_dir), *SMALL, "--transcripts", "asr",
                   "--asr-model", "other"])


def test_a_model_that_is_not_a_whisper_is_named_as_such(asr, capsys):
    """Issue 22 row 12: a RoBERTa given as the ASR model is one line, not transformers' list of config classes."""
    roberta = asr["models_dir"] / "roberta-large"
    status = feature_ext.main(["transcripts", str(asr["data_dir"]), str(asr["models_dir"]), "--asr-model", str(roberta)])
    printed = capsys.readouterr()
    assert status != 0
    assert f"--asr-model {roberta}: not a Whisper model (its config.json says roberta)" in printed.out + printed.err
    assert "WhisperConfig" not in printed.out + printed.err


def test_the_asr_fingerprint_covers_the_generation_and_feature_configs(asr, tmp_path):
    """Issue 22 row 13: editing the Whisper's generation_config.json (what it suppresses) changes its words:
    the transcripts step then stops, and predict.py names the ASR model as changed since training. A record
    written before these files were fingerprinted still counts as the same model while it is unchanged."""
    from mmser.predictor import PredictError, run_asr_model
    from mmser.settings import DEFAULTS
    from mmser.utils import fingerprint
    data_dir, whisper = tmp_path / "data", tmp_path / "models" / "tiny-whisper"
    shutil.copytree(asr["data_dir"], data_dir)
    shutil.copytree(asr["whisper"], whisper)
    shutil.rmtree(data_dir / asr["set"])
    step = qualified_step("transcripts", asr["set"][len("ASR-"):])
    args = ["transcripts", str(data_dir), str(tmp_path / "models"), "--asr-model", str(whisper), "--asr-precision",
            "fp32"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert feature_ext.main(args) == 0
    record = read_features_record(data_dir)[step]["asr_model"]
    assert {"generation_config.json", "preprocessor_config.json"} <= set(record["files"])
    # a record of the older, narrower fingerprint: the same model while its files are unchanged
    features = json.loads((data_dir / "features.json").read_text())
    features[step]["asr_model"] = fingerprint(whisper)
    (data_dir / "features.json").write_text(json.dumps(features))
    with contextlib.redirect_stdout(io.StringIO()):
        assert feature_ext.main(args) == 0
    assert read_features_record(data_dir)[step]["asr_model"] == record
    settings = DEFAULTS.replace(pretrained={"asr_model": record})
    assert run_asr_model(settings) == record["path"]
    generation = json.loads((whisper / "generation_config.json").read_text())
    generation["suppress_tokens"] = list(generation.get("suppress_tokens") or []) + [5, 6, 7]
    (whisper / "generation_config.json").write_text(json.dumps(generation))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert feature_ext.main(args) != 0
    assert "computed with other pretrained files (asr_model:" in printed.getvalue()
    with pytest.raises(PredictError, match="asr_model: .* has changed since training"):
        run_asr_model(settings)
