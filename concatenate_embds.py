"""Context vectors: each utterance's sentence embedding with its dialogue neighbours'.

    python concatenate_embds.py DATA_DIR [--context 3] [--overwrite] [--sentence-model M] [--sentence-pooling mean]

Reads DATA_DIR/utterances.csv and DATA_DIR/BertEmb/<name>.npy (feature_ext.py, every utterance);
writes DATA_DIR/FullBertEmb{c}/<name>.npy, float32 ((2c+1)*H,), for every utterance. Slot j
(j = -c..c, laid out in that order) holds the embedding of utterance i+j of the same dialogue in
corpus order, whatever its emotion, or zeros past the dialogue's edges; the utterance itself is
the centre slot. The embeddings of another sentence model or pooling (SentenceEmb-<model>[+mean]/,
--sentence-model, --sentence-pooling as given to feature_ext.py) give FullSentenceEmb{c}-<model>[+mean]/.
With --asr-model M, the same from and into M's transcript set (ASR-<tag>/).

--context takes one or more window sizes; this script writes c = 3 unless told otherwise
(`--context 1 2 3` writes all three). feature_extraction_main.py writes c = 1, 2 and 3.
A rerun skips files that already hold what they should, and rewrites the others (so recomputed
sentence embeddings never leave stale context vectors behind); a missing embedding fails only the
utterances whose window needs it.
"""
import argparse
import sys
from pathlib import Path

from mmser.context import DEFAULT_CONTEXT, write_context_vectors
from mmser.data_contract import sentence_tag, transcript_set
from mmser.extraction import format_summary
from mmser.options import add_asr_model, add_sentence_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="DATA_DIR with utterances.csv and BertEmb/")
    parser.add_argument("--context", type=int, nargs="+", default=list(DEFAULT_CONTEXT), metavar="C",
                        help="window size(s) c: utterances on each side (default: %(default)s)")
    add_sentence_model(parser, "read")
    parser.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    add_asr_model(parser, "read")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.context):
        parser.error("--context sizes must be at least 1")
    if not Path(args.data_dir).is_dir():
        parser.error(f"DATA_DIR {args.data_dir}: no such folder")
    tag = sentence_tag(args.sentence_model, args.sentence_pooling)
    reports = write_context_vectors(args.data_dir, args.context, args.overwrite, progress=sys.stderr.isatty(), tag=tag,
                                    transcripts=transcript_set(args.asr_model))
    print(format_summary(reports))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash; nothing finished is lost
        print("concatenate_embds.py: interrupted: finished files are kept; rerun the same command to go on",
              file=sys.stderr)
        sys.exit(130)
