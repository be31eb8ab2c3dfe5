"""Feature extraction: speech tokens, text token ids and sentence embeddings, each a step.

Reads DATA_DIR (written by mocap_data_collect.py): utterances.csv, Audio/<name>.wav (16 kHz, only
target utterances), Text/<name>.txt (every utterance); and MODELS_DIR: vq-wav2vec_kmeans.pt,
bert_kmeans/dict.txt, plus optional local copies bert-base-uncased/ and roberta-large/.
Writes, one .npy per utterance, into the folders data_contract.STEPS names:
  vqw2vTokens/<name>.npy  int32 speech-dictionary ids `<s> g0-g1 ... </s>`, utterances with audio
  GPT2Tokens/<name>.npy   int32 text RoBERTa ids `<s> ... </s>`, every utterance (cheap, and a
                          later experiment may want context utterances too)
  BertEmb/<name>.npy      float32 (H,) last-layer [CLS] vector, every utterance (context needs all)
An empty transcript is a valid utterance: its tokens are `<s> </s>` and its embedding that of the
empty text. The fairseq files load through fairseq_checkpoints.py.
Other text encoders (BERT, DeBERTa-v2/v3, ELECTRA, another RoBERTa: data_contract.TEXT_ENCODERS),
given as --text-model or --sentence-model, and mean pooling (--sentence-pooling mean) write folders
of their own beside these (TextTokens-<model>/, SentenceEmb-<model>[+mean]/; data_contract.STEPS),
so the original folders always hold the original models' outputs.

Each step runs on its own:
  python feature_ext.py {speech-tokens,text-tokens,sentence-embeddings} DATA_DIR MODELS_DIR
      [--sentence-model M] [--sentence-pooling cls|mean] [--text-model M] [--device cpu|cuda]
      [--transcripts reference|asr --asr-model M]
  python feature_ext.py transcripts DATA_DIR MODELS_DIR [--asr-model M]
The transcripts step (speech recognition) writes ASR-<tag>/Text/<name>.txt for every utterance with
a Whisper checkpoint (data_contract.model_tag names the folder): English, the transcribe task, greedy
decoding, no timestamps, an utterance over 30 s in consecutive 30-s windows; silent or too short audio
gets an empty transcript and a word in the summary. ASR-<tag>/wer.json holds its word error rate
against Text/, overall and per session, after WER_NORMALISATION (jiwer). With --transcripts asr the
text steps write the set's own ASR-<tag>/GPT2Tokens/ and ASR-<tag>/BertEmb/ from its transcripts.
A rerun skips outputs that exist and are valid; a bad input (an unreadable or cut-off wav, a
transcript that is not UTF-8) is reported by name and the others go on; a missing model stops the
step with one line. Anything else (a bug, CUDA out of memory) stops with its traceback.
DATA_DIR/features.json records, per step, which pretrained files (path, size, sha256) made its
outputs; a rerun with other files stops unless --overwrite recomputes them all, so outputs of two
models never mix, and main.py copies the record into each run's config.json for predict.py.
Under torchrun (torchrun --nproc_per_node N feature_ext.py ...) each rank takes its share of the step, on
cuda:LOCAL_RANK with --device cuda, and rank 0 writes features.json and prints the summary (docs/sharding.md).
torch and transformers are imported by the steps that use them, so --help answers at once.
"""
import argparse
import sys

from mmser.asr import asr_model_name
from mmser.distributed import end_distributed
from mmser.extraction import format_summary
from mmser.options import add_asr_arguments, add_model_arguments, asr_transcripts, start_extraction
from mmser.speech.routes import ROUTES, step_route
from mmser.steps import STEP_NAMES, run_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=STEP_NAMES,
                        help="which features to extract (transcripts: speech recognition with --asr-model)")
    add_model_arguments(parser)
    add_asr_arguments(parser)
    args = parser.parse_args(argv)
    if args.step in ROUTES:  # a speech route's step, and a --speech-model that route does not take
        try:
            step_route(args.step, args.speech_model)
        except ValueError as error:
            parser.error(str(error))
    rank, device = start_extraction(args, parser)  # under torchrun: this rank's device and share (docs/sharding.md)
    try:
        # Progress bars on a terminal only: in a log file their redrawn frames pile up (16 KB for one run).
        report = run_step(args.step, args.data_dir, args.models_dir, args.sentence_model, args.text_model, device,
                          args.overwrite, progress=rank == 0 and sys.stderr.isatty(),
                          sentence_pooling=args.sentence_pooling, transcripts=asr_transcripts(args),
                          asr_model=asr_model_name(args.models_dir, args.asr_model), speech_model=args.speech_model,
                          asr_backend=args.asr_backend, asr_precision=args.asr_precision)
    finally:
        end_distributed()
    if rank == 0:  # the report of every rank's share
        print(format_summary([report]))
    return 0 if report.ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash; nothing finished is lost
        print("feature_ext.py: interrupted: finished files are kept; rerun the same command to go on", file=sys.stderr)
        sys.exit(130)
