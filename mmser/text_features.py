"""The text steps: the text encoder's token ids and the sentence model's embeddings.

  text-tokens           GPT2Tokens/<name>.npy: int32 text RoBERTa ids `<s> ... </s>` (fairseq's
                        roberta.encode ids), every utterance; another text encoder's ids go to
                        TextTokens-<model>/
  sentence-embeddings   BertEmb/<name>.npy: float32 (H,), the sentence model's last-layer [CLS]
                        vector (or the mean over its real tokens), every utterance (context needs
                        them all); another model or pooling writes SentenceEmb-<model>[+mean]/
An empty transcript is a valid utterance: its tokens are `<s> </s>` and its embedding that of the
empty text. With a transcript set (an ASR model's, data_contract.transcript_set), each step reads
that set's Text/ and writes into the set's own folder. text_token_ids and sentence_embeddings are
the one way a text becomes these features, for the steps and for predict.py alike.
"""
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import (DEFAULT_SENTENCE_POOLING, SENTENCE_POOLINGS, feature_folder, instance_tag, qualified_step, read_manifest,
                                 sentence_tag)
from mmser.extraction import (FeatureError, StepReport, from_pretrained, load_tokenizer, pending, read_transcript,
                              record_models, rows_of, run_reported, text_encoder_config, valid_npy)
from mmser.models_dir import resolve_model
from mmser.utils import TOKENIZER_FILES, check_device, fingerprint, save_npy_atomic

SENTENCE_BATCH_SIZE = 32


def text_token_ids(text, tokenizer):
    """One transcript's token ids (int32) as the text encoder's tokenizer gives them: `<s> ... </s>`
    for RoBERTa (fairseq's roberta.encode ids), `[CLS] ... [SEP]` for BERT's kind."""
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)


def text_token_limit(config):
    """The most tokens the text encoder of this transformers config takes: its positions (RoBERTa's
    first pad_token_id + 1 position embeddings are never used, as fairseq numbers positions; the
    speech RoBERTa's too)."""
    if config.model_type == "roberta":
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.max_position_embeddings


def extract_text_tokens(data_dir, models_dir=None, text_model=None, overwrite=False, progress=True,
                        transcripts=None):
    """GPT2Tokens/<name>.npy: the text RoBERTa's ids `<s> ... </s>` (int32), as fairseq's
    roberta.encode gives them, for every utterance (of the transcript set `transcripts`: its own
    <set>/GPT2Tokens/). Another text encoder's tokenizer writes its own ids (e.g. [CLS] ... [SEP])
    into that model's folder, TextTokens-<model_tag>/ (data_contract.STEPS)."""
    text_model = resolve_model(models_dir, "text_model", text_model)
    data_dir, step = Path(data_dir), qualified_step("text-tokens", instance_tag("text-tokens", text_model), transcripts)
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def work():
        manifest = read_manifest(data_dir)
        text_encoder_config(text_model, "text model")
        # Loaded first: a hub name is in the local cache (to be fingerprinted) only after a load.
        tokenizer = load_tokenizer(text_model, "text model")
        record_models(data_dir, step, {"text_tokenizer": fingerprint(text_model, TOKENIZER_FILES)}, overwrite,
                      manifest, report)
        todo = pending(rows_of(step, manifest), out_dir, lambda p: valid_npy(p, np.int32), overwrite, report)
        bar = tqdm(todo, desc=step, unit="utt", disable=not progress)
        for row in bar:
            try:
                text = read_transcript(data_dir, row["name"], transcripts)
            except FeatureError as e:
                report.fail(row["name"], e, bar)
                continue
            save_npy_atomic(out_dir / f"{row['name']}.npy", text_token_ids(text, tokenizer))
            report.written += 1

    return run_reported(report, work)


def equal_length_batches(lengths, batch_size):
    """Indices in batches of one length each, shortest first (stable), at most batch_size a batch."""
    by_length = {}
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        by_length.setdefault(lengths[i], []).append(i)
    return [group[start:start + batch_size] for group in by_length.values() for start in range(0, len(group), batch_size)]


def sentence_embeddings(texts, tokenizer, model, batch_size=SENTENCE_BATCH_SIZE, progress_bar=None,
                        pooling=DEFAULT_SENTENCE_POOLING):
    """Last-layer [CLS] vectors (float32, (len(texts), H)); pooling "mean": the mean of the last layer
    over the real tokens (attention mask 1, [CLS] and [SEP] included). Batched by token length, each
    batch of one length: without padding a text's vector does not depend on the texts batched with it
    (padding changed the last bits of 10 of the demo's 400 vectors), so predict.py's conversations
    get the very vectors the corpus got, bit for bit (measured on the CPU, in batches of 1 to 32)."""
    import torch
    device = next(model.parameters()).device
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    vectors = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for batch in equal_length_batches(lengths, batch_size):
            inputs = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt").to(device)
            hidden = model(**inputs).last_hidden_state
            if pooling == "mean":
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vectors[batch] = ((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy()
            else:
                vectors[batch] = hidden[:, 0].float().cpu().numpy()
            if progress_bar is not None:
                progress_bar.update(len(batch))
    return vectors


def extract_sentence_embeddings(data_dir, models_dir=None, sentence_model=None, device="cpu",
                                overwrite=False, progress=True, batch_size=SENTENCE_BATCH_SIZE, pooling=DEFAULT_SENTENCE_POOLING,
                                transcripts=None):
    """BertEmb/<name>.npy: the sentence model's last-layer [CLS] vector (float32, (H,)) for every
    utterance, since context vectors need the neighbours of every target utterance (of the
    transcript set `transcripts`: its own <set>/BertEmb/). Another sentence model, or mean pooling,
    writes SentenceEmb-<model_tag>[+mean]/ instead (data_contract.sentence_tag)."""
    if pooling not in SENTENCE_POOLINGS:
        raise ValueError(f"pooling must be one of {SENTENCE_POOLINGS}, got {pooling!r}")
    sentence_model = resolve_model(models_dir, "sentence_model", sentence_model)
    data_dir = Path(data_dir)
    step = qualified_step("sentence-embeddings", sentence_tag(sentence_model, pooling), transcripts)
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def work():
        from transformers import AutoModel
        manifest = read_manifest(data_dir)
        text_encoder_config(sentence_model, "sentence model")
        # Loaded first: a hub name is in the local cache (to be fingerprinted) only after a load.
        tokenizer = load_tokenizer(sentence_model, "sentence model")
        model = from_pretrained(AutoModel, sentence_model, "sentence model").to(check_device(device)).eval()
        record_models(data_dir, step, {"sentence_model": fingerprint(sentence_model)}, overwrite, manifest, report)
        width = model.config.hidden_size
        todo = pending(rows_of(step, manifest), out_dir, lambda p: valid_npy(p, np.float32, shape=(width,)),
                        overwrite, report)
        names, texts = [], []
        for row in todo:
            try:
                texts.append(read_transcript(data_dir, row["name"], transcripts))
                names.append(row["name"])
            except FeatureError as e:
                report.fail(row["name"], e)
        if not texts:
            return
        with tqdm(total=len(texts), desc=step, unit="utt", disable=not progress) as bar:
            # In slices, so that an interrupted run keeps what it finished.
            for start in range(0, len(texts), 16 * batch_size):
                part = slice(start, start + 16 * batch_size)
                vectors = sentence_embeddings(texts[part], tokenizer, model, batch_size, bar, pooling)
                for name, vector in zip(names[part], vectors):
                    save_npy_atomic(out_dir / f"{name}.npy", vector)
                    report.written += 1

    return run_reported(report, work)
