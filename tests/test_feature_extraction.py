"""Feature extraction end to end: synthetic corpus -> DATA_DIR -> tiny models -> features.

One extraction is shared by the module (scope="module"); tests that change files work on a copy.
"""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoModel, AutoTokenizer

import concatenate_embds
from mmser import data_contract
import feature_ext
import feature_extraction_main
import main
import mocap_data_collect
from fixtures import synthetic_iemocap
from mmser.context import context_vectors
from mmser.fairseq_checkpoints import codes_to_string, load_fairseq_roberta, load_speech_dictionary, load_vq_wav2vec
from mmser import data_dir_writer
from mmser.models_dir import resolve_model
from mmser.text_features import sentence_embeddings
from fixtures.tiny_models import make_tiny_bert, make_tiny_models
from mmser.utils import fingerprint
from mmser import context, extraction, steps, text_features
from mmser.speech import tokens as speech_tokens
from mmser import distributed
from test_main import torchrun

CONTEXTS = (1, 2, 3)


def dialogues_of(rows):
    """The manifest's rows by dialogue, as concatenate_embds groups them."""
    return [[rows[i] for i in group] for group in context.dialogues([(r["session"], r["dialog"]) for r in rows])]



@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A small synthetic corpus collected into DATA_DIR, tiny models, and every feature extracted."""
    root = tmp_path_factory.mktemp("extraction")
    synthetic_iemocap.make_corpus(root / "IEMOCAP", seed=0, dialogues_per_session=2, utterances_per_dialogue=10)
    data_dir = root / "data"
    rows = mocap_data_collect.collect(root / "IEMOCAP", data_dir, progress=False, out=io.StringIO())
    # Some of the audio is enough to fit the tiny codebook; codes it never saw become <unk>.
    wavs = sorted((data_dir / "Audio").glob("*.wav"))[:30]
    models = make_tiny_models(root / "models", [r["transcript"] for r in rows], wavs, seed=0)
    reports = steps.extract_features(data_dir, root / "models", progress=False)
    return {"root": root, "data_dir": data_dir, "models_dir": root / "models", "models": models,
            "rows": rows, "wavs": wavs, "reports": reports}


def _copy_data_dir(extracted, tmp_path):
    return Path(shutil.copytree(extracted["data_dir"], tmp_path / "data"))


def test_every_step_writes_what_the_contract_says(extracted):
    data_dir, rows = extracted["data_dir"], extracted["rows"]
    assert all(r.ok for r in extracted["reports"]), extraction.format_summary(extracted["reports"])
    labelled = [r["name"] for r in rows if r["label"]]
    assert 0 < len(labelled) < len(rows)
    width = AutoModel.from_pretrained(extracted["models"]["sentence_model"]).config.hidden_size
    assert sorted(p.stem for p in (data_dir / "vqw2vTokens").glob("*.npy")) == sorted(labelled)
    for row in rows:
        name = row["name"]
        text_ids = np.load(data_dir / "GPT2Tokens" / f"{name}.npy")
        assert text_ids.dtype == np.int32 and text_ids[0] == 0 and text_ids[-1] == 2
        embedding = np.load(data_dir / "BertEmb" / f"{name}.npy")
        assert embedding.dtype == np.float32 and embedding.shape == (width,)
        for c in CONTEXTS:
            context = np.load(data_dir / f"FullBertEmb{c}" / f"{name}.npy")
            assert context.dtype == np.float32 and context.shape == ((2 * c + 1) * width,)
    for name in labelled:
        speech_ids = np.load(data_dir / "vqw2vTokens" / f"{name}.npy")
        assert speech_ids.dtype == np.int32 and speech_ids[0] == 0 and speech_ids[-1] == 2


def test_speech_tokens_are_the_dictionary_ids_of_the_codes(extracted):
    data_dir, models = extracted["data_dir"], extracted["models"]
    quantizer = load_vq_wav2vec(models["vq_wav2vec"])
    dictionary = load_speech_dictionary(models["speech_dictionary"])
    name = next(r["name"] for r in extracted["rows"] if r["label"])
    wav, rate = sf.read(data_dir / "Audio" / f"{name}.wav", dtype="float32")
    codes = quantizer.codes(wav)
    assert len(codes) == (len(wav) - 465) // 160 + 1  # 100 frames a second, as the real model
    stored = np.load(data_dir / "vqw2vTokens" / f"{name}.npy")
    assert stored.tolist() == dictionary.encode_line(codes_to_string(codes)).tolist()
    # The tiny codebook was fitted on this audio: codes spread, and the speech RoBERTa reads them.
    assert len({tuple(c) for c in codes.tolist()}) > 5
    speech_roberta = load_fairseq_roberta(models["speech_roberta"])
    assert speech_roberta.config.vocab_size == len(dictionary)
    with torch.no_grad():
        hidden = speech_roberta(torch.from_numpy(stored).long()[None]).last_hidden_state
    assert hidden.shape == (1, len(stored), speech_roberta.config.hidden_size)


def test_text_tokens_are_the_roberta_tokenizer_ids(extracted):
    data_dir, row = extracted["data_dir"], extracted["rows"][0]
    tokenizer = AutoTokenizer.from_pretrained(extracted["models"]["text_model"])
    # fairseq's ids: <s> 0, <pad> 1, </s> 2, <unk> 3, as the tiny tokenizer was trained to number them.
    assert [tokenizer.convert_tokens_to_ids(t) for t in ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]] == [0, 1, 2, 3, 4]
    stored = np.load(data_dir / "GPT2Tokens" / f"{row['name']}.npy")
    assert stored.tolist() == tokenizer(row["transcript"])["input_ids"]


def test_batched_sentence_embeddings_equal_one_at_a_time(extracted):
    data_dir, rows = extracted["data_dir"], extracted["rows"]
    path = extracted["models"]["sentence_model"]
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = [r["transcript"] for r in rows[:12]]
    alone = sentence_embeddings(texts, tokenizer, model, batch_size=1)
    stored = np.stack([np.load(data_dir / "BertEmb" / f"{r['name']}.npy") for r in rows[:12]])
    assert np.abs(alone - stored).max() < 1e-5


def test_context_vector_layout():
    embeddings = np.arange(1, 4, dtype=np.float32)[:, None] * np.ones((3, 2), np.float32)  # rows 1, 2, 3
    vectors = context_vectors(embeddings, 2)
    assert vectors.shape == (3, 10)
    assert vectors[0].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert vectors[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    assert vectors[2].tolist() == [1, 1, 2, 2, 3, 3, 0, 0, 0, 0]


def test_context_vectors_follow_each_dialogue_in_corpus_order(extracted):
    data_dir, rows = extracted["data_dir"], extracted["rows"]
    c = 3
    for dialogue in dialogues_of(rows):
        assert len({r["dialog"] for r in dialogue}) == 1
        own = [np.load(data_dir / "BertEmb" / f"{r['name']}.npy") for r in dialogue]
        width = own[0].shape[0]
        for i, row in enumerate(dialogue):
            slots = np.load(data_dir / f"FullBertEmb{c}" / f"{row['name']}.npy").reshape(2 * c + 1, width)
            for j in range(-c, c + 1):
                expected = own[i + j] if 0 <= i + j < len(dialogue) else np.zeros(width)
                assert np.array_equal(slots[j + c], expected)


def test_rerun_skips_valid_outputs_and_redoes_corrupted_ones(extracted, tmp_path):
    data_dir = _copy_data_dir(extracted, tmp_path)
    labelled = next(r["name"] for r in extracted["rows"] if r["label"])
    other = extracted["rows"][1]["name"]
    (data_dir / "vqw2vTokens" / f"{labelled}.npy").write_bytes(b"half a file")
    np.save(data_dir / "BertEmb" / f"{other}.npy", np.zeros(3, np.float64))  # wrong dtype and width
    (data_dir / "FullBertEmb2" / f"{other}.npy").unlink()
    before = np.load(extracted["data_dir"] / "vqw2vTokens" / f"{labelled}.npy")

    reports = {r.step: r for r in steps.extract_features(
        data_dir, extracted["models_dir"], progress=False)}
    assert all(r.ok for r in reports.values())
    n_rows, n_labelled = len(extracted["rows"]), sum(1 for r in extracted["rows"] if r["label"])
    assert (reports["speech-tokens"].written, reports["speech-tokens"].skipped) == (1, n_labelled - 1)
    assert (reports["text-tokens"].written, reports["text-tokens"].skipped) == (0, n_rows)
    assert (reports["sentence-embeddings"].written, reports["sentence-embeddings"].skipped) == (1, n_rows - 1)
    assert (reports["context-2"].written, reports["context-2"].skipped) == (1, n_rows - 1)
    assert np.array_equal(np.load(data_dir / "vqw2vTokens" / f"{labelled}.npy"), before)
    assert not list(data_dir.rglob("*.tmp*"))  # atomic writes leave nothing behind


def test_recomputed_sentence_embeddings_leave_no_stale_context_vector(extracted, tmp_path):
    data_dir, rows = _copy_data_dir(extracted, tmp_path), extracted["rows"]
    dialogue = max(dialogues_of(rows), key=len)
    changed = dialogue[3]["name"]  # as if another sentence model had made it
    embedding = np.load(data_dir / "BertEmb" / f"{changed}.npy")
    np.save(data_dir / "BertEmb" / f"{changed}.npy", embedding + 1)
    (report,) = context.write_context_vectors(data_dir, [2], progress=False)
    assert (report.written, report.skipped) == (5, len(rows) - 5)  # the windows that hold it: 1..5
    slots = np.load(data_dir / "FullBertEmb2" / f"{changed}.npy").reshape(5, -1)
    assert np.array_equal(slots[2], embedding + 1)
    assert np.array_equal(np.load(data_dir / "FullBertEmb2" / f"{dialogue[1]['name']}.npy").reshape(5, -1)[4],
                          embedding + 1)


def test_bad_inputs_are_named_and_the_rest_is_written(extracted, tmp_path, capsys):
    data_dir = _copy_data_dir(extracted, tmp_path)
    rows = extracted["rows"]
    labelled = [r["name"] for r in rows if r["label"]]
    wrong_rate, unreadable, too_short, good, cut_off = labelled[:5]
    unlabelled = [r for r in rows if not r["label"]]
    empty = unlabelled[0]["name"]  # and, in another dialogue, a transcript that does not decode
    undecodable = next(r["name"] for r in unlabelled if r["dialog"] != unlabelled[0]["dialog"])
    for name in (wrong_rate, unreadable, too_short, good, cut_off, empty, undecodable):
        for folder in ("vqw2vTokens", "GPT2Tokens", "BertEmb"):
            (data_dir / folder / f"{name}.npy").unlink(missing_ok=True)
    sf.write(data_dir / "Audio" / f"{wrong_rate}.wav", np.zeros(8000, np.int16), 8000)
    (data_dir / "Audio" / f"{unreadable}.wav").write_bytes(b"RIFF, but not really")
    sf.write(data_dir / "Audio" / f"{too_short}.wav", np.zeros(400, np.int16), 16000)
    whole = (data_dir / "Audio" / f"{cut_off}.wav").read_bytes()
    (data_dir / "Audio" / f"{cut_off}.wav").write_bytes(whole[:len(whole) // 2])
    (data_dir / "Text" / f"{empty}.txt").write_text("  \n")
    (data_dir / "Text" / f"{undecodable}.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    shutil.rmtree(data_dir / "FullBertEmb1")

    status = feature_extraction_main.main([str(data_dir), str(extracted["models_dir"])])
    out = capsys.readouterr().out
    assert status == 1
    assert f"failed {wrong_rate}: " in out and "8000 Hz, 1 channel(s); expected 16000 Hz mono" in out
    assert f"failed {unreadable}: " in out and "unreadable audio" in out
    assert f"failed {cut_off}: " in out and f"{cut_off}.wav: cut off: its header promises" in out
    assert f"failed {undecodable}: " in out and "unreadable transcript" in out
    assert f"failed {empty}" not in out
    assert f"{too_short}.wav: 400 samples, fewer than 465" in out
    assert np.load(data_dir / "vqw2vTokens" / f"{too_short}.npy").tolist() == [0, 2]
    written = {p.stem for p in (data_dir / "vqw2vTokens").glob("*.npy")}
    assert written == set(labelled) - {wrong_rate, unreadable, cut_off}
    # An empty transcript is an utterance like any other: <s> </s>, and the empty text's embedding.
    assert np.load(data_dir / "GPT2Tokens" / f"{empty}.npy").tolist() == [0, 2]
    for folder in ("GPT2Tokens", "BertEmb"):
        assert {p.stem for p in (data_dir / folder).glob("*.npy")} == {r["name"] for r in rows} - {undecodable}
    # Only the context windows that need the missing embedding fail; the empty text's neighbours keep theirs.
    for name, missing in ((undecodable, True), (empty, False)):
        dialogue = next(d for d in dialogues_of(rows) if name in [r["name"] for r in d])
        position = [r["name"] for r in dialogue].index(name)
        for i, row in enumerate(dialogue):
            assert (data_dir / "FullBertEmb1" / f"{row['name']}.npy").exists() == (not missing or abs(i - position) > 1)


def test_without_sentence_embeddings_the_context_step_says_so_once(extracted, tmp_path):
    data_dir = _copy_data_dir(extracted, tmp_path)
    shutil.rmtree(data_dir / "BertEmb")
    (report,) = context.write_context_vectors(data_dir, [1], progress=False)
    assert "no valid sentence embedding; run the sentence-embeddings step first" in report.error
    assert not report.failed and report.written == 0


def test_the_summary_lists_the_first_failures_and_counts_the_rest():
    report = extraction.StepReport("text-tokens")
    report.failed = [(f"{i}_s_1_neu", "empty transcript") for i in range(extraction.SHOWN_FAILURES + 5)]
    summary = extraction.format_summary([report])
    assert summary.count(": failed ") == extraction.SHOWN_FAILURES and "... and 5 more failures" in summary


def test_each_step_runs_alone_from_its_own_script(extracted, tmp_path, capsys):
    data_dir = _copy_data_dir(extracted, tmp_path)
    shutil.rmtree(data_dir / "GPT2Tokens")
    shutil.rmtree(data_dir / "FullBertEmb3")
    assert feature_ext.main(["text-tokens", str(data_dir), str(extracted["models_dir"])]) == 0
    assert concatenate_embds.main([str(data_dir)]) == 0  # --context 3 by default
    out = capsys.readouterr().out
    assert "text-tokens" in out and "context-3" in out and "all done" in out
    assert len(list((data_dir / "GPT2Tokens").glob("*.npy"))) == len(extracted["rows"])
    assert len(list((data_dir / "FullBertEmb3").glob("*.npy"))) == len(extracted["rows"])


def test_a_missing_model_stops_that_step_only(extracted, tmp_path):
    data_dir = _copy_data_dir(extracted, tmp_path)
    shutil.rmtree(data_dir / "vqw2vTokens")
    report = speech_tokens.extract_speech_tokens(data_dir, tmp_path / "no_models", progress=False)
    assert not report.ok and "dict.txt" in report.error
    assert text_features.extract_text_tokens(data_dir, extracted["models_dir"], progress=False).ok


def test_models_resolve_to_local_copies_first(extracted, tmp_path):
    assert resolve_model(extracted["models_dir"], "sentence_model") == str(extracted["models_dir"] / "bert-base-uncased")
    assert resolve_model(tmp_path, "sentence_model") == "bert-base-uncased"
    assert resolve_model(tmp_path, "asr_model") == "openai/whisper-large-v3"  # the local copy's name differs
    assert resolve_model(tmp_path, "sentence_model", given="my/model") == "my/model"
    assert resolve_model(tmp_path, "speech_roberta") == str(tmp_path / "bert_kmeans" / "bert_kmeans.pt")


def test_tiny_tokenizers_are_the_same_for_the_same_texts(tmp_path):
    texts = ["Hello there, how are you?", "I am so angry!", "We lost everything, it's so sad."] * 5
    make_tiny_bert(tmp_path / "a", texts)
    make_tiny_bert(tmp_path / "b", texts)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tokenizer.convert_ids_to_tokens(tokenizer("Hello THERE")["input_ids"]) == ["[CLS]", "hello", "there", "[SEP]"]


def test_tiny_models_are_the_same_files_for_the_same_corpus_and_seed(extracted, tmp_path):
    make_tiny_models(tmp_path / "models", [r["transcript"] for r in extracted["rows"]], extracted["wavs"], seed=0)
    first, again = extracted["models_dir"], tmp_path / "models"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_tiny_encoders_give_vectors_standardized_over_their_corpus(extracted):
    # Random small weights alone give vectors that hardly differ from one utterance to the next,
    # too little for a new layer to learn from in a demo's few epochs.
    data_dir, models = extracted["data_dir"], extracted["models"]
    sentence = np.stack([np.load(data_dir / "BertEmb" / f"{r['name']}.npy") for r in extracted["rows"]])
    np.testing.assert_allclose(sentence.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(sentence.std(0, ddof=1), 1, rtol=1e-3)
    # The speech RoBERTa's <s> vector, as the speech branch takes it, over the audio it was made from.
    speech_roberta = load_fairseq_roberta(models["speech_roberta"])
    with torch.no_grad():
        speech = np.stack([speech_roberta(torch.from_numpy(np.load(data_dir / "vqw2vTokens" / f"{wav.stem}.npy"))
                                          .long()[None]).last_hidden_state[0, 0].numpy()
                           for wav in extracted["wavs"]])
    np.testing.assert_allclose(speech.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(speech.std(0, ddof=1), 1, rtol=1e-3)


def test_features_made_for_another_manifest_are_recomputed_not_kept(extracted, tmp_path):
    """Feature files are named by position in utterances.csv: after the manifest changes (say, a
    fixed corpus), a name may stand for another utterance, so its old file must not be kept."""
    data_dir, rows = _copy_data_dir(extracted, tmp_path), extracted["rows"]
    changed = [dict(row) for row in rows]
    changed[0]["utterance_id"], changed[0]["transcript"] = rows[1]["utterance_id"], "Another utterance now."
    (data_dir / "utterances.csv").write_bytes(data_dir_writer.manifest_bytes(changed))
    (data_dir / "Text" / f"{rows[0]['name']}.txt").write_text("Another utterance now.", encoding="utf-8")
    with pytest.raises(SystemExit, match="lists other utterances than the text-tokens features were made for"):
        main.main([str(tmp_path / "run"), str(data_dir), str(extracted["models_dir"]), "2", "--branches", "text"])
    reports = {r.step: r for r in steps.extract_features(data_dir, extracted["models_dir"],
                                                                           contexts=[2], progress=False)}
    for step in ("text-tokens", "sentence-embeddings", "context-2"):
        assert reports[step].written == len(rows) and any("lists other utterances" in n for n in reports[step].notes)
    assert reports["speech-tokens"].written == sum(1 for r in rows if r["label"])
    assert data_contract.stale_features(data_dir, list(steps.EXTRACTORS) + ["context-2"], changed) == []


def test_tiny_models_never_overwrite_what_may_be_the_real_ones(extracted, tmp_path):
    real = tmp_path / "models"
    (real / "roberta-large").mkdir(parents=True)
    (real / "roberta-large" / "model.safetensors").write_bytes(b"a real download")
    with pytest.raises(FileExistsError, match="not overwriting what may be the real pretrained models"):
        make_tiny_models(real, [r["transcript"] for r in extracted["rows"]], extracted["wavs"], seed=0)
    assert (real / "roberta-large" / "model.safetensors").read_bytes() == b"a real download"
    assert (extracted["models_dir"] / "TINY_MODELS.txt").is_file()  # its own folder: rebuilt freely


def test_a_model_folder_without_its_vocabulary_is_refused_not_used(extracted, tmp_path):
    broken = tmp_path / "roberta-large"
    shutil.copytree(extracted["models"]["text_model"], broken)
    (broken / "tokenizer.json").unlink()  # transformers would build a tokenizer of special tokens only
    data_dir = _copy_data_dir(extracted, tmp_path)
    report = text_features.extract_text_tokens(data_dir, text_model=broken, overwrite=True, progress=False)
    assert not report.ok and "tokenizer knows only its" in report.error and "tokenizer.json" in report.error


def test_the_models_behind_each_step_are_recorded_and_never_mixed(extracted, tmp_path):
    data_dir, models = _copy_data_dir(extracted, tmp_path), extracted["models"]
    record = data_contract.read_features_record(data_dir)
    assert set(record) == set(steps.EXTRACTORS) | {data_contract.MANIFEST_KEY}
    assert set(record[data_contract.MANIFEST_KEY]) == set(steps.EXTRACTORS) | {"context-1", "context-2", "context-3"}
    assert record["speech-tokens"]["vq_wav2vec"]["path"] == str(Path(models["vq_wav2vec"]).resolve())
    assert record["sentence-embeddings"]["sentence_model"]["sha256"] == fingerprint(models["sentence_model"])["sha256"]
    # Another sentence model under the default's name (so its folder is BertEmb/ too): the existing
    # embeddings came from the old one, so nothing is skipped silently; --overwrite recomputes them
    # all and the record follows.
    other = make_tiny_bert(tmp_path / "other" / "bert-base-uncased", [r["transcript"] for r in extracted["rows"]],
                           seed=1)
    report = text_features.extract_sentence_embeddings(data_dir, sentence_model=other, progress=False)
    assert not report.ok and "other pretrained files" in report.error and "--overwrite" in report.error
    report = text_features.extract_sentence_embeddings(data_dir, sentence_model=other, overwrite=True, progress=False)
    assert report.ok and report.written == len(extracted["rows"])
    assert data_contract.read_features_record(data_dir)["sentence-embeddings"]["sentence_model"]["path"] == str(Path(other).resolve())


def test_audio_windows_cut_long_audio_into_consecutive_30_s_windows():
    from mmser.utils import audio_windows
    samples = np.arange(16000 * 65)
    windows = audio_windows(samples)
    assert [len(w) for w in windows] == [480000, 480000, 80000]
    assert np.array_equal(np.concatenate(windows), samples)
    assert [len(w) for w in audio_windows(samples[:0])] == [0]


# ------------------------------------------------------------------------------------------------
# sharded under torchrun (docs/sharding.md)

# Three runs in one launch of two ranks (a start of torch in three processes spared): every step; then,
# as if a rank had been stopped before writing them, again once rank 0 removed some files; then once
# more with rank 1 given a MODELS_DIR without the vq-wav2vec file (the text models the same files by
# other paths). Each rank writes down how much of each step it took; rank 0 the summaries.
SHARDED_RUNS = """import contextlib, io, json, sys, feature_extraction_main, torch.distributed as dist
from pathlib import Path
from mmser import extraction
data_dir, models_dir, models_without_vq, out, *removed = sys.argv[1:]
destroy, dist.destroy_process_group = dist.destroy_process_group, lambda: None
share, took, summaries, codes = extraction.share, [], [], []
def counted(items, weigh=None):
    mine = share(items, weigh)
    took.append((len(mine), len(items)))
    return mine
extraction.share = counted
for run in ("first", "rerun", "one rank without a model"):
    if run == "rerun":  # in the process group the first run started
        if dist.get_rank() == 0:
            for name in removed:
                Path(data_dir, name).unlink()
        dist.barrier()
    models = models_without_vq if run == "one rank without a model" and dist.get_rank() == 1 else models_dir
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        codes.append(feature_extraction_main.main([data_dir, models]))
    summaries.append(printed.getvalue())
Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"took": took, "summaries": summaries, "codes": codes}))
destroy()
"""


def summary_counts(summary):
    """{step: (written, skipped)} from format_summary's table."""
    rows = [line.split() for line in summary.splitlines()[1:]]
    return {row[0]: (int(row[1]), int(row[2])) for row in rows if len(row) == 5 and row[1].isdigit()}


def test_two_ranks_write_the_files_of_one_process_and_a_rerun_finishes_only_what_is_missing(extracted, tmp_path):
    """Two ranks with gloo on the CPU, one thread each: every folder and features.json byte for byte
    one process's; each rank took a share of each step; a rerun makes only the files removed; a rank
    that stops for want of a model stops the step on both, which say why."""
    one_process, models_dir = extracted["data_dir"], extracted["models_dir"]
    data_dir = _copy_data_dir(extracted, tmp_path)
    folders = ["vqw2vTokens", "GPT2Tokens", "BertEmb", "FullBertEmb1", "FullBertEmb2", "FullBertEmb3"]
    for folder in folders:
        shutil.rmtree(data_dir / folder)
    (data_dir / data_contract.FEATURES_RECORD).unlink()
    without_vq = tmp_path / "models_without_vq"
    shutil.copytree(models_dir, without_vq, ignore=shutil.ignore_patterns("vq-wav2vec_kmeans.pt"))
    labelled = sorted(p.name for p in (one_process / "vqw2vTokens").glob("*.npy"))
    everyone = sorted(p.name for p in (one_process / "GPT2Tokens").glob("*.npy"))
    removed = {"vqw2vTokens": labelled[:3], "GPT2Tokens": everyone[5:7], "BertEmb": everyone[:1]}
    torchrun(tmp_path, data_dir, models_dir, without_vq, tmp_path,
             *[f"{folder}/{name}" for folder, names in removed.items() for name in names], program=SHARDED_RUNS)

    for folder in folders:
        ours, theirs = sorted((data_dir / folder).iterdir()), sorted((one_process / folder).iterdir())
        assert [p.name for p in ours] == [p.name for p in theirs], folder
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs)), folder
    assert (data_dir / "features.json").read_bytes() == (one_process / "features.json").read_bytes()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # speech tokens, text tokens, sentence embeddings (twice, then text only): each rank a share, together all
    took0, took1 = ranks[0]["took"], ranks[1]["took"]
    assert len(took0) == len(took1) == 8
    for (mine0, of0), (mine1, of1) in zip(took0, took1):
        assert of0 == of1 and mine0 + mine1 == of0 and (of0 < 2 or min(mine0, mine1) > 0)
    assert [of for _, of in took0] == [len(labelled), len(everyone), len(everyone), 3, 2, 1, 0, 0]
    counts = summary_counts(ranks[0]["summaries"][1])
    assert counts["speech-tokens"] == (3, len(labelled) - 3)
    assert counts["text-tokens"] == (2, len(everyone) - 2)
    assert counts["sentence-embeddings"] == (1, len(everyone) - 1)
    assert counts["context-1"] == (0, len(everyone))  # the same embedding again: nothing to rewrite
    assert ranks[1]["summaries"] == ["", "", ""]  # rank 0 alone prints
    assert ranks[0]["codes"] == ranks[1]["codes"] == [0, 0, 1]
    stopped = ranks[0]["summaries"][2]
    assert "speech-tokens: could not run: rank 1 of 2 stopped: " in stopped
    assert "models_without_vq/vq-wav2vec_kmeans.pt: not found" in stopped
    assert summary_counts(stopped)["text-tokens"] == (0, len(everyone))


def test_a_rank_s_share_is_balanced_by_weight_and_each_item_falls_to_one_rank(monkeypatch):
    assert distributed.share([3, 1, 2]) == [3, 1, 2]  # one process: all of it
    weights = [5, 1, 1, 1, 4, 2, 2, 3, 8, 1]
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 3))
        shares.append(distributed.share(list(range(10)), weigh=weights.__getitem__))
    assert sorted(sum(shares, [])) == list(range(10)) and all(share == sorted(share) for share in shares)
    loads = [sum(weights[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= 1, loads
    assert distributed.share(list("abcdefg")) == list("cf")  # unweighted: in turn, rank 2 of 3 every third


def test_ranks_that_loaded_other_model_files_stop_before_any_writes(monkeypatch):
    ours = {"sentence_model": {"path": "/node0/bert", "sha256": "1"}}
    same_files_elsewhere = {"sentence_model": {"path": "/node1/bert", "sha256": "1"}}
    other_files = {"sentence_model": {"path": "/node1/bert", "sha256": "2"}}
    monkeypatch.setattr(extraction, "rank_and_world", lambda: (0, 3))
    monkeypatch.setattr(extraction, "gather_from_ranks",
                        lambda value, world: [value, ("", same_files_elsewhere), ("", other_files)])
    with pytest.raises(extraction.FeatureError, match="rank 2 loaded other sentence_model files than rank 0 "
                                                      r"\(/node0/bert -> /node1/bert\)"):
        extraction.agree_ranks(extraction.StepReport("sentence-embeddings"), ours)
    monkeypatch.setattr(extraction, "gather_from_ranks",
                        lambda value, world: [value, ("", same_files_elsewhere), ("", same_files_elsewhere)])
    extraction.agree_ranks(extraction.StepReport("sentence-embeddings"), ours)
