"""The extraction steps by name, and all of them in order over one DATA_DIR.

  run_step(step, ...)         one step: speech-tokens (or a transformers encoder's speech-layers),
                              text-tokens, sentence-embeddings, transcripts
  extract_features(...)       speech, text tokens, sentence embeddings, context vectors c = 1, 2, 3;
                              with an ASR model, its transcripts and the text features made from them
Each returns StepReports (mmser.extraction) for the summary table.
"""
from mmser.asr import transcribe_utterances
from mmser.context import write_context_vectors
from mmser.data_contract import sentence_tag, speech_step, transcript_set
from mmser.extraction import resolve_model
from mmser.speech_features import extract_speech_layers, extract_speech_tokens
from mmser.text_features import extract_sentence_embeddings, extract_text_tokens

CONTEXTS = (1, 2, 3)

EXTRACTORS = {"speech-tokens": extract_speech_tokens, "text-tokens": extract_text_tokens,
              "sentence-embeddings": extract_sentence_embeddings}


def run_step(step, data_dir, models_dir, sentence_model=None, text_model=None, device="cpu",
             overwrite=False, progress=True, sentence_pooling="cls", transcripts=None, asr_model=None,
             speech_model=None, asr_backend="transformers", asr_precision="auto"):
    """Run one of EXTRACTORS' steps, or "transcripts" (speech recognition with `asr_model`), by name;
    the text steps read the transcript set `transcripts` (data_contract.transcript_set; None: the
    reference; asr_backend and asr_precision: asr.load_asr's). Returns its StepReport. With a transformers --speech-model, "speech-tokens" (or
    "speech-layers") makes that encoder's layer means instead."""
    if step in ("speech-tokens", "speech-layers") and speech_step(speech_model) != "speech-tokens":
        return extract_speech_layers(data_dir, speech_model, device, overwrite, progress)
    if step == "speech-layers":
        raise ValueError("the speech-layers step needs a transformers --speech-model (a folder or hub name)")
    if step == "speech-tokens":
        return extract_speech_tokens(data_dir, models_dir, device, overwrite, progress)
    if step == "text-tokens":
        return extract_text_tokens(data_dir, models_dir, text_model, overwrite, progress, transcripts)
    if step == "sentence-embeddings":
        return extract_sentence_embeddings(data_dir, models_dir, sentence_model, device, overwrite, progress,
                                           pooling=sentence_pooling, transcripts=transcripts)
    if step == "transcripts":
        return transcribe_utterances(data_dir, models_dir, asr_model, device, overwrite, progress,
                                     backend=asr_backend, precision=asr_precision)
    raise ValueError(f"unknown step {step!r}; one of {', '.join(EXTRACTORS)}, transcripts")



def extract_features(data_dir, models_dir, sentence_model=None, text_model=None, device="cpu",
                     contexts=CONTEXTS, overwrite=False, progress=True, sentence_pooling="cls", asr_model=None,
                     speech_model=None, asr_backend="transformers", asr_precision="auto"):
    """Run speech tokens, text tokens, sentence embeddings, then context vectors; return the reports.
    Another text or sentence model, or mean pooling, writes folders of its own (feature_ext.py).
    With asr_model: then its transcripts, and the text features and context vectors of that set too.
    With a transformers speech_model, its layer means instead of the speech tokens."""
    reports = [run_step(step, data_dir, models_dir, sentence_model, text_model, device, overwrite, progress,
                        sentence_pooling, speech_model=speech_model) for step in EXTRACTORS]
    tag = sentence_tag(sentence_model or resolve_model(models_dir, "bert-base-uncased"), sentence_pooling)
    reports += write_context_vectors(data_dir, contexts, overwrite, progress, tag=tag)
    if asr_model is None:
        return reports
    transcripts = transcript_set(asr_model)
    reports.append(run_step("transcripts", data_dir, models_dir, device=device, overwrite=overwrite, progress=progress,
                            asr_model=asr_model, asr_backend=asr_backend, asr_precision=asr_precision))
    reports += [run_step(step, data_dir, models_dir, sentence_model, text_model, device, overwrite, progress,
                         sentence_pooling, transcripts) for step in ("text-tokens", "sentence-embeddings")]
    return reports + write_context_vectors(data_dir, contexts, overwrite, progress, tag=tag, transcripts=transcripts)
