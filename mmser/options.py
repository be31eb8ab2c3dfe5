"""Command-line options that several scripts share, each defined once.

One function per option (or pair of options that go together), which every script calls. An option
that several stages take means one thing in all of them, but each stage says what it does with it:
`use` picks the help text, never the option's name, type or default:
  "make"        the extraction steps make features with the model (feature_ext.py,
                feature_extraction_main.py)
  "read"        the stage reads features made with it (concatenate_embds.py)
  "train"       main.py trains on features made with it (main.py's own help texts)
  "transcribe"  predict.py transcribes a recording with it
Nothing here imports torch: every script's --help answers at once.
"""
import argparse
from pathlib import Path

from mmser.asr import asr_model_name
from mmser.data_contract import SENTENCE_POOLINGS, transcript_set
from mmser.models_dir import MODELS_DIR_FILES, hub_name, missing_path
from mmser.settings import DEFAULTS

DEVICE_HELP = "cpu, cuda or cuda:N"


def _default_copy(role):
    """"MODELS_DIR/<copy> if present, else <hub name>", as a help text says it."""
    return f"MODELS_DIR/{MODELS_DIR_FILES[role][0]} if present, else {hub_name(role)}"


def positive_int(text):
    """argparse type of a count that must be at least 1 (--threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_data_and_models_dirs(parser):
    """The extraction scripts' DATA_DIR and MODELS_DIR (checked by check_folders)."""
    parser.add_argument("data_dir", help="DATA_DIR written by mocap_data_collect.py (or another collector)")
    parser.add_argument("models_dir", help=f"MODELS_DIR with {MODELS_DIR_FILES['vq_wav2vec'][0]} and "
                                           f"{Path(MODELS_DIR_FILES['speech_roberta'][0]).parent}/")


def add_sentence_model(parser, use="make"):
    """--sentence-model and --sentence-pooling: which sentence embeddings (and context vectors)."""
    model_help = {
        "make": "sentence model (a text encoder, as --text-model), a name or folder: BertEmb/ for bert-base-uncased "
                f"(the default: {_default_copy('sentence_model')}), SentenceEmb-<model>/ for any other",
        "read": "the sentence model whose embeddings to read, as given to feature_ext.py (default: "
                "bert-base-uncased's, BertEmb/)",
        "train": "the sentence model the context vectors were made with, as given to feature_ext.py (default: "
                 "bert-base-uncased's, FullBertEmb{c}/)",
    }
    pooling_help = {
        "make": "the sentence vector: the last layer's [CLS] (the original's) or its mean over the real tokens "
                "(written to a folder of its own, SentenceEmb-<model>+mean/)",
        "read": "the pooling they were made with, as given to feature_ext.py",
        "train": "the pooling the context vectors' sentence embeddings were made with (feature_ext.py)",
    }
    parser.add_argument("--sentence-model", default=None, help=model_help[use])
    parser.add_argument("--sentence-pooling", choices=SENTENCE_POOLINGS, default=DEFAULTS.sentence_pooling,
                        help=pooling_help[use])


def add_text_model(parser, use="make"):
    """--text-model: the text branch's encoder, whose tokenizer makes the text tokens."""
    help = {
        "make": "text encoder (RoBERTa, BERT, DeBERTa-v2/v3, ELECTRA) whose tokenizer gives the text tokens: "
                f"GPT2Tokens/ for roberta-large (the default: {_default_copy('text_model')}), TextTokens-<model>/ "
                "for any other",
        "train": "text encoder folder or hub name: RoBERTa, BERT, DeBERTa-v2/v3 or ELECTRA, its tokens made by "
                 f"feature_ext.py text-tokens with the same --text-model (default: {_default_copy('text_model')})",
    }
    parser.add_argument("--text-model", default=None, help=help[use])


def add_speech_model(parser, use="make"):
    """--speech-model: the speech branch's encoder (the original's fairseq RoBERTa, or a transformers one)."""
    help = {
        "make": "a transformers speech encoder (WavLM, HuBERT, wav2vec 2.0, data2vec-audio, Whisper; folder or hub "
                "name): its layer means (SpeechLayers-<model>/) replace the vq-wav2vec tokens (default: the "
                "original's vq-wav2vec tokens)",
        "train": f"speech RoBERTa checkpoint (default: MODELS_DIR/{MODELS_DIR_FILES['speech_roberta'][0]}), or a "
                 "transformers speech encoder (WavLM, HuBERT, wav2vec 2.0, data2vec-audio, Whisper; folder or hub "
                 "name) whose layer means the extraction wrote (--demo: wavlm, hubert, wav2vec2, data2vec-audio or "
                 "whisper, a tiny one)",
    }
    parser.add_argument("--speech-model", default=None, help=help[use])


def add_asr_model(parser, use="make"):
    """--asr-model: the Whisper checkpoint of the transcripts step, or whose transcript set a stage reads."""
    help = {
        "make": f"the Whisper checkpoint of the transcripts step, a name or folder (default: "
                f"{_default_copy('asr_model')}); with --transcripts asr, the transcript set the text features are "
                f"made from",
        "read": "the context vectors of this ASR model's transcript set (ASR-<model>/BertEmb -> "
                "ASR-<model>/FullBertEmb{c}), named as feature_ext.py transcripts was given it",
        "train": "which ASR model's transcripts (as given to feature_extraction_main.py --asr-model; default: the one "
                 "set DATA_DIR holds)",
        "transcribe": "the Whisper checkpoint (name or folder) that transcribes a recording given without text "
                      "(default: the one the run's ASR transcripts came from)",
    }
    parser.add_argument("--asr-model", default=None, help=help[use])


def add_transcripts(parser, use="make"):
    """--transcripts: the corpus's transcripts or speech recognition's."""
    help = {
        "make": "which transcripts the text features (tokens, sentence embeddings, context vectors) are made from: "
                "the corpus's Text/, or --asr-model's ASR-<model>/Text/",
        "train": "the transcripts the text and context features come from: the corpus's (reference) or speech "
                 "recognition's (asr: DATA_DIR/ASR-<model>/, made by feature_extraction_main.py --asr-model)",
    }
    parser.add_argument("--transcripts", choices=("reference", "asr"), default="reference", help=help[use])


def add_device(parser, default="cpu"):
    """--device, checked by check_device_option (torch says which devices there are)."""
    help = f"auto (a GPU where torch sees one), {DEVICE_HELP}" if default == "auto" else DEVICE_HELP
    parser.add_argument("--device", default=default, help=help)


def add_threads(parser):
    """--threads: torch's CPU threads, applied by mmser.utils.set_threads (which holds the default)."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else half the cores this "
                             "process may use, at least 1; torch's own default, every core, ran 2-3x slower on a "
                             "shared 2-core machine)")


def add_all_audio(parser):
    """The collectors' --all-audio: the one rule for context utterances' audio (data_dir_writer)."""
    parser.add_argument("--all-audio", action="store_true",
                        help="write Audio/ for every utterance that has audio, not only the labelled ones' (for "
                             "feature_ext.py transcripts: speech recognition of the context utterances too)")


def add_overwrite_corpus(parser):
    """The collectors' --overwrite: DATA_DIR may hold another corpus, to be replaced."""
    parser.add_argument("--overwrite", action="store_true",
                        help="DATA_DIR holds another corpus's DATA_DIR: replace it, removing all its files (manifest, "
                             "Text/, Audio/, labels_train_t.txt, features.json and the feature folders)")


def add_models_dir_moved(parser):
    """predict.py's --models-dir: where a run's MODELS_DIR is now."""
    parser.add_argument("--models-dir", help="where the run's MODELS_DIR is now, if it moved (the files are still "
                                             "checked against the sha256 the run recorded)")


def add_model_arguments(parser):
    """Every option of the extraction scripts (feature_ext.py, feature_extraction_main.py)."""
    add_data_and_models_dirs(parser)
    add_sentence_model(parser)
    add_text_model(parser)
    add_asr_model(parser)
    add_transcripts(parser)
    add_speech_model(parser)
    add_device(parser)
    add_threads(parser)
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")


def asr_transcripts(args):
    """The transcript set the text steps read: None (reference) or --asr-model's ASR-<tag>."""
    return transcript_set(asr_model_name(args.models_dir, args.asr_model)) if args.transcripts == "asr" else None


def check_device_option(args, parser):
    """--device names a device torch sees (imports torch: after the checks that need no model)."""
    from mmser.utils import check_device
    try:
        check_device(args.device)
    except ValueError as error:
        parser.error(str(error))


def check_model_paths(args, parser, dests=("text_model", "sentence_model", "speech_model", "asr_model")):
    """A model option whose value can only be a local path must name one that is there: transformers
    would take it for a malformed hub name ("Repo id must be in the form ...") or ask the network."""
    for dest in dests:
        value = getattr(args, dest, None)
        missing = missing_path(value) if value else None
        if missing:
            parser.error(f"--{dest.replace('_', '-')} {missing}")


def check_folders(args, parser):
    """DATA_DIR and MODELS_DIR must exist: a missing MODELS_DIR would send every model name to the
    hub, and a step would spend minutes retrying the network before saying so; so must the models
    named by a local path (check_model_paths). The device comes last: it imports torch."""
    for what, folder in (("DATA_DIR", args.data_dir), ("MODELS_DIR", args.models_dir)):
        if not Path(folder).is_dir():
            parser.error(f"{what} {folder}: no such folder")
    check_model_paths(args, parser)
    check_device_option(args, parser)


def add_asr_arguments(parser):
    """--asr-backend and --asr-precision: how the transcripts step decodes (mmser.asr.load_asr)."""
    from mmser.asr import ASR_BACKENDS, ASR_PRECISIONS, DEFAULT_BACKEND, DEFAULT_PRECISION
    parser.add_argument("--asr-backend", choices=ASR_BACKENDS, default=DEFAULT_BACKEND,
                        help="speech recognition by transformers' Whisper, or by CTranslate2's (faster-whisper's "
                             "engine: pip install -r requirements-asr.txt), the --asr-model folder converted once "
                             "into MODELS_DIR/<model>-ctranslate2/")
    parser.add_argument("--asr-precision", choices=ASR_PRECISIONS, default=DEFAULT_PRECISION,
                        help="auto: transformers in bf16 where the hardware computes it (a GPU with bf16, a CPU "
                             "with bf16 instructions), fp32 elsewhere; faster-whisper in int8 on a CPU, fp16 on a "
                             "GPU. fp32 gives transformers' own greedy transcripts; features.json records the "
                             "choice, and a rerun with another stops unless --overwrite")


def start_extraction(args, parser):
    """The extraction scripts' start: the folders and models checked (check_folders), torch's threads,
    and under torchrun this rank's process group and device (docs/sharding.md). -> (rank, device)"""
    from mmser.distributed import setup_distributed
    from mmser.extraction import RANK_WAIT
    from mmser.settings import RunError
    from mmser.utils import set_threads
    check_folders(args, parser)
    set_threads(args.threads)
    try:
        rank, _, device = setup_distributed(args.device, RANK_WAIT)
    except RunError as error:
        parser.error(str(error))
    return rank, device
