"""Command-line options that several scripts share, each defined once."""
from pathlib import Path

from mmser.asr import DEFAULT_ASR_MODEL, asr_model_name
from mmser.data_contract import SENTENCE_POOLINGS, transcript_set
from mmser.utils import check_device


def add_model_arguments(parser):
    parser.add_argument("data_dir", help="DATA_DIR written by mocap_data_collect.py")
    parser.add_argument("models_dir", help="MODELS_DIR with vq-wav2vec_kmeans.pt and bert_kmeans/")
    parser.add_argument("--sentence-model", default=None,
                        help="sentence model (a text encoder, as --text-model), a name or folder: BertEmb/ for "
                             "bert-base-uncased (the default: MODELS_DIR/bert-base-uncased if present, else "
                             "bert-base-uncased), SentenceEmb-<model>/ for any other")
    parser.add_argument("--sentence-pooling", choices=SENTENCE_POOLINGS, default="cls",
                        help="the sentence vector: the last layer's [CLS] (the original's) or its mean over the "
                             "real tokens (written to a folder of its own, SentenceEmb-<model>+mean/)")
    parser.add_argument("--text-model", default=None,
                        help="text encoder (RoBERTa, BERT, DeBERTa-v2/v3, ELECTRA) whose tokenizer gives the text "
                             "tokens: GPT2Tokens/ for roberta-large (the default: MODELS_DIR/roberta-large if "
                             "present, else roberta-large), TextTokens-<model>/ for any other")
    parser.add_argument("--asr-model", default=None,
                        help="the Whisper checkpoint of the transcripts step, a name or folder (default: "
                             f"MODELS_DIR/whisper-large-v3 if present, else {DEFAULT_ASR_MODEL}); with "
                             "--transcripts asr, the transcript set the text features are made from")
    parser.add_argument("--transcripts", choices=("reference", "asr"), default="reference",
                        help="which transcripts the text features (tokens, sentence embeddings, context vectors) "
                             "are made from: the corpus's Text/, or --asr-model's ASR-<model>/Text/")
    parser.add_argument("--speech-model", default=None,
                        help="a transformers speech encoder (WavLM, HuBERT, wav2vec 2.0, data2vec-audio, Whisper; "
                             "folder or hub name): its layer means (SpeechLayers-<model>/) replace the vq-wav2vec "
                             "tokens (default: the original's vq-wav2vec tokens)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice, all cores; on a machine "
                             "shared with other jobs, 1 or 2 run far faster)")
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")


def asr_transcripts(args):
    """The transcript set the text steps read: None (reference) or --asr-model's ASR-<tag>."""
    return transcript_set(asr_model_name(args.models_dir, args.asr_model)) if args.transcripts == "asr" else None


def check_folders(args, parser):
    """DATA_DIR and MODELS_DIR must exist: a missing MODELS_DIR would send every model name to the
    hub, and a step would spend minutes retrying the network before saying so."""
    for what, folder in (("DATA_DIR", args.data_dir), ("MODELS_DIR", args.models_dir)):
        if not Path(folder).is_dir():
            parser.error(f"{what} {folder}: no such folder")
    try:
        check_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")


def add_asr_arguments(parser):
    """--asr-backend and --asr-precision: how the transcripts step decodes (mmser.asr.load_asr)."""
    from mmser.asr import ASR_BACKENDS, ASR_PRECISIONS
    parser.add_argument("--asr-backend", choices=ASR_BACKENDS, default="transformers",
                        help="speech recognition by transformers' Whisper, or by CTranslate2's (faster-whisper's "
                             "engine: pip install -r requirements-asr.txt), the --asr-model folder converted once "
                             "into MODELS_DIR/<model>-ctranslate2/")
    parser.add_argument("--asr-precision", choices=ASR_PRECISIONS, default="auto",
                        help="auto: transformers in bf16 where the hardware computes it (a GPU with bf16, a CPU "
                             "with bf16 instructions), fp32 elsewhere; faster-whisper in int8 on a CPU, fp16 on a "
                             "GPU. fp32 gives transformers' own greedy transcripts; features.json records the "
                             "choice, and a rerun with another stops unless --overwrite")
