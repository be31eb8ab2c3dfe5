"""Every feature extraction step, in order, over one DATA_DIR.

    python feature_extraction_main.py DATA_DIR MODELS_DIR [--sentence-model M] [--sentence-pooling cls|mean]
                                      [--text-model M] [--asr-model M]
                                      [--device cpu|cuda] [--context 1 2 3] [--overwrite]

Reads what mocap_data_collect.py wrote (utterances.csv, Audio/, Text/) and the pretrained models
in MODELS_DIR; writes, as feature_ext.py and concatenate_embds.py describe:
  vqw2vTokens/   speech-dictionary ids of the vq-wav2vec codes (utterances with audio)
  GPT2Tokens/    text RoBERTa token ids (every utterance)
  BertEmb/       sentence embeddings (every utterance)
  FullBertEmb{c}/ context vectors, c = 1, 2, 3 by default
With --asr-model M (or --transcripts asr, M's default), then also M's transcripts and the features made
from them, in ASR-<tag>/ (Text/, GPT2Tokens/, BertEmb/, FullBertEmb{c}/: feature_ext.py transcripts).
A rerun resumes: finished, valid files are skipped. A bad input is reported by name and the rest
goes on; the summary at the end says what was written, skipped and failed, and the exit status
is 1 when anything failed. Under torchrun (torchrun --nproc_per_node N feature_extraction_main.py ...)
each rank takes its share of every step (docs/sharding.md).
"""
import argparse
import sys

from mmser.asr import asr_model_name
from mmser.distributed import end_distributed
from mmser.extraction import format_summary
from mmser.options import add_asr_arguments, add_model_arguments, start_extraction
from mmser.steps import CONTEXTS, extract_features


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_asr_arguments(parser)
    parser.add_argument("--context", type=int, nargs="+", default=list(CONTEXTS), metavar="C",
                        help="context window size(s) to write (default: %(default)s)")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.context):
        parser.error("--context sizes must be at least 1")
    rank, device = start_extraction(args, parser)  # under torchrun: this rank's device and share (docs/sharding.md)
    # --transcripts asr (or an --asr-model given): the ASR set too, beside the reference one.
    asr_model = asr_model_name(args.models_dir, args.asr_model) if args.asr_model or args.transcripts == "asr" else None
    try:
        # Progress bars on a terminal only: in a log file their redrawn frames pile up (16 KB for one run).
        reports = extract_features(args.data_dir, args.models_dir, args.sentence_model, args.text_model,
                                   device, args.context, args.overwrite, progress=rank == 0 and sys.stderr.isatty(),
                                   sentence_pooling=args.sentence_pooling, asr_model=asr_model,
                                   speech_model=args.speech_model, asr_backend=args.asr_backend,
                                   asr_precision=args.asr_precision)
    finally:
        end_distributed()
    if rank == 0:  # the reports of every rank's share
        print(format_summary(reports))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash; nothing finished is lost
        print("feature_extraction_main.py: interrupted: finished files are kept; rerun the same command to go on", file=sys.stderr)
        sys.exit(130)
