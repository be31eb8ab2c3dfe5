"""The extraction steps by name, and all of them in order over one DATA_DIR.

  run_step(step, ...)         one step: the speech branch's (mmser.speech: the vq-wav2vec tokens, or a
                              transformers encoder's layer means), text-tokens, sentence-embeddings,
                              transcripts
  extract_features(...)       speech, text tokens, sentence embeddings, context vectors c = 1, 2, 3;
                              with an ASR model, its transcripts and the text features made from them
Each returns StepReports (mmser.extraction) for the summary table.
"""
from mmser.asr import DEFAULT_BACKEND, DEFAULT_PRECISION, transcribe_utterances
from mmser.context import write_context_vectors
from mmser.data_contract import DEFAULT_SENTENCE_POOLING, sentence_tag, transcript_set
from mmser.models_dir import resolve_model
from mmser.speech.routes import DEFAULT_ROUTE, ROUTES, step_route
from mmser.text_features import extract_sentence_embeddings, extract_text_tokens

CONTEXTS = (1, 2, 3)

# The steps extract_features runs, in order: the speech branch's (named as the default route's, it
# runs the route --speech-model takes), then the text steps.
EXTRACTORS = (DEFAULT_ROUTE.name, "text-tokens", "sentence-embeddings")
# Every name run_step takes (feature_ext.py's steps).
STEP_NAMES = (*ROUTES, "text-tokens", "sentence-embeddings", "transcripts")


def run_step(step, data_dir, models_dir, sentence_model=None, text_model=None, device="cpu",
             overwrite=False, progress=True, sentence_pooling=DEFAULT_SENTENCE_POOLING, transcripts=None, asr_model=None,
             speech_model=None, asr_backend=DEFAULT_BACKEND, asr_precision=DEFAULT_PRECISION):
    """Run one step by name (STEP_NAMES): a speech route's (mmser.speech.routes.step_route: the route that
    `speech_model` takes), a text step, or "transcripts" (speech recognition with `asr_model`, decoded
    by asr_backend in asr_precision: asr.load_asr's); the text steps read the transcript set
    `transcripts` (data_contract.transcript_set; None: the reference). Returns its StepReport."""
    if step in ROUTES:
        return step_route(step, speech_model).extract(data_dir, models_dir, device, overwrite, progress)
    if step == "text-tokens":
        return extract_text_tokens(data_dir, models_dir, text_model, overwrite, progress, transcripts)
    if step == "sentence-embeddings":
        return extract_sentence_embeddings(data_dir, models_dir, sentence_model, device, overwrite, progress,
                                           pooling=sentence_pooling, transcripts=transcripts)
    if step == "transcripts":
        return transcribe_utterances(data_dir, models_dir, asr_model, device, overwrite, progress,
                                     backend=asr_backend, precision=asr_precision)
    raise ValueError(f"unknown step {step!r}; one of {', '.join(STEP_NAMES)}")


def extract_features(data_dir, models_dir, sentence_model=None, text_model=None, device="cpu",
                     contexts=CONTEXTS, overwrite=False, progress=True, sentence_pooling=DEFAULT_SENTENCE_POOLING, asr_model=None,
                     speech_model=None, asr_backend=DEFAULT_BACKEND, asr_precision=DEFAULT_PRECISION):
    """Run the speech step (of the route `speech_model` takes), text tokens, sentence embeddings, then
    context vectors; return the reports. Another text or sentence model, or mean pooling, writes folders
    of its own (feature_ext.py). With asr_model: then its transcripts (decoded by asr_backend in
    asr_precision), and the text features and context vectors of that set too."""
    reports = [run_step(step, data_dir, models_dir, sentence_model, text_model, device, overwrite, progress,
                        sentence_pooling, speech_model=speech_model) for step in EXTRACTORS]
    tag = sentence_tag(resolve_model(models_dir, "sentence_model", sentence_model), sentence_pooling)
    reports += write_context_vectors(data_dir, contexts, overwrite, progress, tag=tag)
    if asr_model is None:
        return reports
    transcripts = transcript_set(asr_model)
    reports.append(run_step("transcripts", data_dir, models_dir, device=device, overwrite=overwrite, progress=progress,
                            asr_model=asr_model, asr_backend=asr_backend, asr_precision=asr_precision))
    reports += [run_step(step, data_dir, models_dir, sentence_model, text_model, device, overwrite, progress,
                         sentence_pooling, transcripts) for step in ("text-tokens", "sentence-embeddings")]
    return reports + write_context_vectors(data_dir, contexts, overwrite, progress, tag=tag, transcripts=transcripts)
