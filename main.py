"""Train and evaluate the fused emotion classifier on extracted features; or run the whole demo.

    python main.py RUN_DIR DATA_DIR MODELS_DIR [CONTEXT_WINDOW MAX_TEXT_TOKENS MAX_AUDIO_TOKENS] [options]
    torchrun --nproc_per_node N main.py ...          (DistributedDataParallel, one process per device)
    python main.py --demo [RUN_DIR]                  (synthetic corpus -> every stage -> results table; demo.py)

Reads DATA_DIR (utterances.csv and the feature folders data_contract.BRANCHES names for each branch;
see dataset_loader.py) and the pretrained encoders in MODELS_DIR (see model_structure.py). RUN_DIR is
a new or empty folder, or a run folder main.py made; writes everything under it:
  config.json                 every resolved setting (and the --recipe they came from), data_dir, the models
                              used, the code's git commit and the library versions
  train.log                   the log of every invocation (appended)
  fold{k}/best.pt             the tested epoch's weights, by --select-by (default: best validation UA;
                              torch.load(weights_only=True))
  fold{k}/last.pt             the last finished epoch, to resume from (removed once the fold is done)
  fold{k}/predictions.csv     name, true, predicted, p_ang, p_hap, p_sad, p_neu (test utterances)
  fold{k}/confusion_matrix.png, training_curves.png, attention.png (context branch, per slot)
  fold{k}/tensorboard/        the live curves (per step and per epoch) for TensorBoard
  fold{k}/fold_result.json    the fold's test and validation metrics and training history
  attention_pooled.png        the context branch's attention over every fold
  results.json                per-fold test metrics and their summary (mean, sample std, pooled)
  summary.md                  the results table (also printed)
  seed{n}/fold{k}/...         with --seeds: each seed's folds; results.json adds the spread over seeds
Running again with the same RUN_DIR and settings resumes: finished folds are kept, an interrupted
fold restarts from its last epoch checkpoint and ends with the numbers of an uninterrupted run.
The labels are the classes the manifest has (data_contract.label_set): a corpus collected with three
emotions trains a 3-way head and is scored over those three.

Protocols: session5 (train 1-4, test 5), loso (5 folds, one session each), speaker (10 folds, one
speaker each; the test speaker's session partner shares their dialogues, so their context, and is
not trained on); for any corpus, folds (one fold per value of a manifest column, --fold-by: session,
speaker, group, ...; no dialogue of the test fold is trained on) and official (a corpus that ships
train/dev/test splits, the manifest's split column: train on train, choose the checkpoint on dev,
test on test). A corpus whose papers report weighted F1 (MELD: its classes.json says so) has it
first in the log and the summary. Validation comes from the training sessions: 10% stratified by class (default)
or one held-out training speaker; `--val-split original` validates on the test session's other
speaker, as the original's cross-validation script did (for session protocols the session's M
speaker validates and its F speaker is tested; that script also ran the other order, and its
main.py validated on a random 10% of sessions 1-4); `--val-split in-train-session` validates on the
last training session, trained on too, as Siriwardhana et al.'s released lists. The test
utterances never train a model or choose its checkpoint, except under `--val-split original`,
where the test session chooses it (and the summary says so).
A user's mistake (a missing file, a RUN_DIR of other settings, a NaN loss) is one line naming the
file and the way out; anything else stops with its traceback, which train.log also keeps. torch and
the training modules are imported once the options are checked, so --help answers at once.
"""
import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmser.data_contract import (BRANCHES, SENTENCE_POOLINGS, TEXT_STEPS, WER_FILE, DataError, branch_steps, feature_folder, label_set,
                           qualified_step, read_classes, read_features_record, read_manifest,
                           split_step, stale_features,
                           step_entry, text_models, transcript_set, transcript_sets)
from mmser.recipes import RECIPES
from mmser.speech.routes import route_of, speech_models
from mmser.utils import WEIGHT_FILES, check_device, cpu_has_native_bf16, fingerprint, set_threads, write_text_atomic

# -- defaults; the command line (and --recipe, recipes.py) overrides each -------------------------
# Shares of IEMOCAP's labelled utterances cut by a limit, from the per-utterance token counts of
# Siriwardhana et al.'s released lists (T_data/iemocap/*_size.tsv, 5499 utterances): text > 100
# tokens 0.09%, > 512 none (the longest has 129); speech > 310 tokens 58%, > 512 31%, > 1024 6.2%,
# > 2048 0.27%. A limit left at its default (or a recipe's) is lowered to what the encoder's
# learned positions hold (the speech RoBERTa's come from its checkpoint), with a line in the log.
CONTEXT_WINDOW = 3  # sentences before and after: FullBertEmb3, the widest window the extraction makes
MAX_TEXT_TOKENS = 512  # cuts no IEMOCAP utterance; batches pad to their longest, so a high limit costs nothing
MAX_AUDIO_TOKENS = 2048  # cuts 0.27%: the frozen speech encoder runs once per run (cached), so length is cheap
DEFAULTS = {
    "epochs": 10,
    "batch_size": 16,
    "eval_batch_size": 32,
    "lr_encoders": 1e-5,  # the pretrained RoBERTas: small steps, or fine-tuning forgets
    "lr_head": 1e-3,  # the new layers: fusion and context branch
    "weight_decay": 0.01,
    "scheduler": "linear",
    "warmup": 0.1,  # share of all optimizer steps spent warming up (linear scheduler)
    "seed": 2022,
    "device": "auto",
    "precision": "auto",  # bf16 autocast on a GPU that has it, fp32 otherwise
    "branches": "text,speech,context",
    "protocol": "session5",
    "val_split": "stratified",
    "val_fraction": 0.1,
    "grad_accum": 1,
    "clip_norm": 1.0,
    "class_weights": "none",
    "fusion_hidden": 256,
    "finetune_speech": False,
    "freeze_text": False,
    # Batches of similar length, in random order, as fairseq batches: on a CPU a RoBERTa-base
    # step ran 2x faster than on randomly mixed lengths (benchmarks/bench_train.py).
    "group_by_length": True,
    # Settings the recipes (recipes.py) needed; these values are what training always did.
    "loss": "cross_entropy",
    "head": "mlp",  # Linear -> ReLU -> Linear; "linear": dropout -> Linear (Siriwardhana et al.'s)
    "head_dropout": 0.0,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "select_by": "val_ua",  # the validation score that chooses the tested checkpoint
    "patience": 0,  # epochs without a lower validation loss before stopping (0: never stop early)
    "one_vs_rest": False,  # also report per-emotion binary accuracy and F1 (Siriwardhana et al.'s metric)
}
# Settings that may differ when a run is resumed: they do not change the numbers.
# (feature_folders follows from settings that are compared: the models, the pooling, the window.)
NOT_COMPARED_ON_RESUME = ("device", "versions", "stop_after_epochs", "code", "val_split_description", "feature_folders")
# Settings added since a run may have started: a config.json without them had these values.
ADDED_SETTINGS = {"skip_missing": False, "left_out": [], "sentence_model": None, "sentence_pooling": "cls",
                  "recipe": None, "recipe_overridden": [], "seeds": None, "gradient_checkpointing": False,
                  **{k: DEFAULTS[k] for k in ("loss", "head", "head_dropout", "adam_betas", "adam_eps", "select_by",
                                              "patience", "one_vs_rest")}}

TOKEN_LIMITS = {"max_text_tokens": "MAX_TEXT_TOKENS", "max_audio_tokens": "MAX_AUDIO_TOKENS"}

log = logging.getLogger("main")


class RunError(Exception):
    """A run that cannot start or go on for a reason the user can fix; the message names the file
    or option and the way out. main() prints it as one line."""


# ------------------------------------------------------------------------------------------------
# the run's data and configuration, resolved once

@dataclass
class RunData:
    """The labelled utterances a run trains and tests on, with what the data decides of its settings."""

    utterances: list
    classes: list  # the labels the manifest has, in the order of DATA_DIR's label set (classes.json)
    left_out: list  # names that --skip-missing left out for lack of a feature file
    context_width: int = None  # H of the context vectors, read from the data
    first_metric: str = None  # the metric the corpus's papers report first (classes.json), if not UA/WA


def parse_branches(text):
    branches = [b.strip() for b in text.split(",") if b.strip()]
    if not branches or set(branches) - set(BRANCHES) or len(set(branches)) != len(branches):
        raise RunError(f"--branches must be a comma-separated subset of {','.join(BRANCHES)}, got {text!r}")
    return [b for b in BRANCHES if b in branches]


def load_run_data(data_dir, branches, context_window, max_text_tokens, max_audio_tokens, skip_missing, progress=True,
                  models=None, transcripts=None, speech_route=None):
    """All labelled utterances with the features `branches` need, read once per run (models: the run's
    non-default text and sentence models, data_contract.text_models, and the speech route's step,
    mmser.speech.routes.speech_models; transcripts: the transcript set of the text features; speech_route:
    the speech branch's, see dataset_loader.load_utterances)."""
    from mmser import dataset_loader
    rows = read_manifest(data_dir)
    steps = [step for branch in branches for step in branch_steps(branch, context_window, models, transcripts)]
    stale = stale_features(data_dir, steps, rows)
    if stale:
        raise RunError(f"{Path(data_dir) / 'utterances.csv'} lists other utterances than the {', '.join(stale)} "
                       f"features were made for (their files are named by position); rerun "
                       f"feature_extraction_main.py on it")
    classes = label_set(rows, read_classes(data_dir))
    if len(classes) < 2:
        raise RunError(f"{Path(data_dir) / 'utterances.csv'}: labelled utterances of {len(classes)} class(es) "
                       f"({', '.join(classes) or 'none'}); a classifier needs at least two")
    missing = dataset_loader.missing_features(data_dir, rows, context_window, branches, models, transcripts,
                                              speech_route)
    labelled = sum(1 for row in rows if row["label"])
    if missing and (not skip_missing or len(missing) == labelled):
        name, path = missing[0]
        remedy = ("run feature_extraction_main.py first" if len(missing) == labelled else
                  "rerun feature_extraction_main.py, or train and test without them with --skip-missing "
                  "(a wav or transcript that mocap_data_collect.py --allow-missing let through has none)")
        raise RunError(f"{path}: not found ({len(missing)} of {labelled} labelled utterances miss a feature file); "
                       f"{remedy}")
    left_out = [name for name, _ in missing]
    rows = [row for row in rows if row["label"] and row["name"] not in set(left_out)]
    utterances = dataset_loader.load_utterances(data_dir, context_window, max_text_tokens, max_audio_tokens, branches,
                                                progress, rows, classes, models, transcripts, speech_route)
    width = dataset_loader.context_slice_width(utterances) if "context" in branches else None
    return RunData(utterances, classes, left_out, width, read_first_metric(data_dir))


def read_first_metric(data_dir):
    """classes.json's "first_metric" (MELD: weighted_f1), or None: IEMOCAP's UA and WA."""
    path = Path(data_dir) / "classes.json"
    metric = json.loads(path.read_text(encoding="utf-8")).get("first_metric") if path.is_file() else None
    if metric not in (None, "wa", "ua", "macro_f1", "weighted_f1"):
        raise RunError(f"{path}: first_metric {metric!r} is not one of wa, ua, macro_f1, weighted_f1")
    return metric


def features_of_test_transcripts(args, branches, data, sets, env, models=None):
    """With --test-transcripts other than --transcripts: {name: the text features of the test set} for
    every utterance the run has (run() predicts the test folds from them); None otherwise."""
    text_branches = [b for b in branches if any(step in TEXT_STEPS for step in BRANCHES[b].steps)]
    if sets["train"] == sets["test"] or not text_branches:
        return None
    test_data = load_run_data(Path(args.data_dir), text_branches, args.context_window, args.max_text_tokens,
                              args.max_audio_tokens, args.skip_missing, env["progress"], models, sets["test"])
    if [u["name"] for u in test_data.utterances] != [u["name"] for u in data.utterances]:
        raise RunError(f"the {sets['test'] or 'reference'} transcripts' features leave out other utterances than the "
                       f"{sets['train'] or 'reference'} ones' (--skip-missing); make both sets' features complete")
    if test_data.context_width != data.context_width:
        raise RunError(f"context vectors of width {test_data.context_width} in the test transcripts' set, "
                       f"{data.context_width} in the training set's: make both with one sentence model")
    return {u["name"]: {BRANCHES[b].key: u[BRANCHES[b].key] for b in text_branches} for u in test_data.utterances}


def resolve_device(args):
    """(device, precision) from --device and --precision: auto picks a GPU and bf16 where there are."""
    import torch
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    try:
        check_device(device)
    except ValueError as error:
        raise RunError(str(error)) from None
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return device, precision


def model_paths(args):
    """(text model, speech model): the options, or MODELS_DIR's default files."""
    models_dir = Path(args.models_dir).resolve()
    text_model = args.text_model
    if text_model is None:  # a local copy in MODELS_DIR, else the hub name through transformers' cache
        text_model = models_dir / "roberta-large" if (models_dir / "roberta-large").is_dir() else "roberta-large"
    if Path(text_model).exists():
        text_model = str(Path(text_model).resolve())
    speech_model = args.speech_model or models_dir / "bert_kmeans" / "bert_kmeans.pt"
    if Path(speech_model).exists() or route_of(speech_model).model_is_file:
        speech_model = Path(speech_model).resolve()  # a hub name of a transformers encoder stays a name
    return str(text_model), str(speech_model)


def text_encoder_settings(args, branches):
    """The run's text and sentence models -> data_contract.text_models (which folders the branches
    read). The text encoder must be one the branch takes (one line saying what it is otherwise; its
    positions bound MAX_TEXT_TOKENS in resolve_token_limits); a per-model folder that is not there is
    refused with one line naming it and the command that makes it."""
    from mmser.extraction import FeatureError, text_encoder_config
    text_model = model_paths(args)[0]
    if "text" in branches:
        try:
            text_encoder_config(text_model, "text model (--text-model)")
        except FeatureError as error:
            raise RunError(str(error)) from None
    models = text_models(text_model, args.sentence_model, args.sentence_pooling)
    for branch in branches:
        for step in branch_steps(branch, args.context_window, models):
            folder = feature_folder(args.data_dir, step)
            if split_step(step)[2] is not None and not folder.is_dir():
                raise RunError(f"{folder}: not found (the {step} features of this run's options); make it with: "
                               f"{making_command(args, step, text_model)}")
    return models


def making_command(args, step, text_model):
    """The command line that makes the per-model folder of `step` (README, stage 2)."""
    sentence = [f"--sentence-model {args.sentence_model}"] if args.sentence_model else []
    sentence += [f"--sentence-pooling {args.sentence_pooling}"] if args.sentence_pooling != "cls" else []
    data_dir, models_dir = str(args.data_dir), str(args.models_dir)
    concatenate = " ".join(["python concatenate_embds.py", data_dir, "--context", str(args.context_window), *sentence])
    kind = split_step(step)[1]
    if kind == "text-tokens":
        return f"python feature_ext.py text-tokens {data_dir} {models_dir} --text-model {text_model}"
    if kind == "sentence-embeddings":
        return " ".join(["python feature_ext.py sentence-embeddings", data_dir, models_dir, *sentence, "&&", concatenate])
    return concatenate


def option_settings(args, precision):
    """The settings the options decide (everything but the files and what the data decides)."""
    return {
        "branches": parse_branches(args.branches),
        "context_window": args.context_window, "max_text_tokens": args.max_text_tokens,
        "max_audio_tokens": args.max_audio_tokens, "skip_missing": args.skip_missing,
        "protocol": args.protocol, "val_split": val_split(args), "val_fraction": args.val_fraction,
        "val_split_description": describe_val_split(val_split(args), args.val_fraction),
        "epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "grad_accum": args.grad_accum, "lr_encoders": args.lr_encoders, "lr_head": args.lr_head,
        "weight_decay": args.weight_decay, "scheduler": args.scheduler, "warmup": args.warmup,
        "clip_norm": args.clip_norm, "class_weights": args.class_weights, "fusion_hidden": args.fusion_hidden,
        "finetune_text": not args.freeze_text, "finetune_speech": args.finetune_speech,
        "group_by_length": args.group_by_length, "seed": args.seed, "precision": precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "sentence_pooling": args.sentence_pooling,
        "loss": args.loss, "head": args.head, "head_dropout": args.head_dropout, "adam_betas": list(args.adam_betas),
        "adam_eps": args.adam_eps, "select_by": args.select_by, "patience": args.patience,
        "one_vs_rest": args.one_vs_rest, "seeds": parse_seeds(args.seeds), "recipe": args.recipe,
        "recipe_overridden": list(getattr(args, "recipe_overridden", [])),
    }


def parse_seeds(text):
    """--seeds 1,2,3 -> [1, 2, 3]; None without it (one run with --seed)."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise RunError(f"--seeds must be distinct non-negative integers separated by commas, got {text!r}")
    return seeds


def resolve_token_limits(args, branches):
    """MAX_TEXT_TOKENS / MAX_AUDIO_TOKENS: the one given, else main.py's default or the recipe's, lowered
    to what the encoder's learned positions hold (a sequence beyond them has no position to take).
    -> the log's notes on what was lowered."""
    from mmser.recipes import recipe_settings
    recipe = recipe_settings(args.recipe) if args.recipe else {}
    text_model, speech_model = model_paths(args)
    notes = []
    for key, branch, default in (("max_text_tokens", "text", MAX_TEXT_TOKENS),
                                 ("max_audio_tokens", "speech", MAX_AUDIO_TOKENS)):
        wanted = getattr(args, key)
        wanted = recipe.get(key, default) if wanted is None else wanted
        positions = encoder_positions(branch, text_model if branch == "text" else speech_model) \
            if branch in branches else None
        if positions is not None and positions < wanted:
            notes.append(f"{TOKEN_LIMITS[key]} {wanted} lowered to {positions}: the {branch} encoder's positions")
            wanted = positions
        setattr(args, key, wanted)
    return notes


def encoder_positions(branch, model):
    """The longest sequence an encoder's learned positions hold (text_features.text_token_limit:
    RoBERTa's start after its padding index); None for a transformers speech encoder (its layer means
    have no token limit) and for a model that cannot be read here (a missing file, CheckpointError:
    its own error then comes where it is loaded)."""
    from transformers import AutoConfig

    from mmser.text_features import text_token_limit
    if branch == "speech":
        return route_of(model).positions()
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):  # no such folder; not a config
        return None
    # A model without learned positions is no encoder of this branch: text_encoder_settings says so.
    return text_token_limit(config) if hasattr(config, "max_position_embeddings") else None


def resolve_config(args, data, device, precision, models=None, asr=None):
    """The complete settings of a run as plain JSON values, config.json exactly; nothing changes
    them afterwards (models: the run's non-default text and sentence models, text_models; asr
    (resolve_transcripts) adds which transcripts trained and tested it)."""
    import torch
    import transformers
    data_dir, models_dir = Path(args.data_dir).resolve(), Path(args.models_dir).resolve()
    options = option_settings(args, precision)
    # Settings of the newer protocols and corpora, written only where they apply, so that an
    # IEMOCAP run's config.json stays what it has always been.
    extra = {"fold_by": args.fold_by if args.protocol == "folds" else None, "first_metric": data.first_metric}
    text_model, speech_model = model_paths(args)
    config = {
        "data_dir": str(data_dir), "models_dir": str(models_dir), "text_model": text_model,
        "speech_model": speech_model,
        "pretrained": pretrained_files(data_dir, options["branches"], text_model, speech_model, models,
                                       args.context_window, asr and (asr["sets"]["train"] or asr["sets"]["test"]),
                                       args.finetune_speech),
        "sentence_model": str(Path(args.sentence_model).resolve()) if args.sentence_model and
        Path(args.sentence_model).exists() else args.sentence_model,
        "feature_folders": {branch: step_entry(branch_steps(branch, args.context_window, models,
                                                            asr and asr["sets"]["train"])[-1]).folder
                            for branch in options["branches"]},
        "classes": list(data.classes), "context_width": data.context_width, "left_out": list(data.left_out),
        "device": device, "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "stop_after_epochs": args.stop_after_epochs,
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "code": code_version(),
        **options,
    }
    # In the order config.json has always had, so that files of older runs compare line by line.
    order = ("data_dir", "models_dir", "text_model", "speech_model", "pretrained", "classes", "branches",
             "context_window", "max_text_tokens", "max_audio_tokens", "context_width", "skip_missing", "left_out",
             "protocol", "val_split", "val_fraction", "val_split_description", "epochs", "batch_size",
             "eval_batch_size", "grad_accum", "lr_encoders", "lr_head", "weight_decay", "scheduler", "warmup",
             "clip_norm", "class_weights", "fusion_hidden", "finetune_text", "finetune_speech", "group_by_length",
             "seed", "device", "precision", "world_size", "stop_after_epochs", "versions",
             # added since: at the end, so that the lines above still compare with older runs' files
             "sentence_model", "sentence_pooling", "feature_folders",
             "recipe", "recipe_overridden", "seeds", "loss", "head", "head_dropout", "adam_betas", "adam_eps",
             "select_by", "patience", "one_vs_rest", "code")
    # Only where ASR transcripts are used: a run on the reference ones keeps the config.json it always had.
    asr_settings = {} if asr is None else {"transcripts": asr["transcripts"], "asr_model": asr["asr_model"],
                                           "asr_wer": asr["asr_wer"]}
    # Likewise only when asked for (ADDED_SETTINGS gives the default to a run's config.json without it).
    checkpointing = {"gradient_checkpointing": True} if config["gradient_checkpointing"] else {}
    return {**{key: config[key] for key in order}, **asr_settings, **checkpointing,
            **{k: v for k, v in extra.items() if v is not None}}


def resolve_transcripts(args):
    """Which transcripts the run trains and tests on (--transcripts, --test-transcripts, --asr-model):
    None when both are the reference ones, else {"transcripts": {"train", "test"}, "sets": the folders
    (None for the reference), "asr_model", "asr_wer" (overall, wer.json's)}."""
    train, test = args.transcripts, args.test_transcripts or args.transcripts
    if "asr" not in (train, test):
        return None
    data_dir = Path(args.data_dir)
    sets = transcript_sets(data_dir)
    if args.asr_model:
        name = transcript_set(args.asr_model)
        if name not in sets:
            raise RunError(f"{data_dir / name / 'Text'}: not found; make {args.asr_model}'s transcripts and their "
                           f"features first (feature_extraction_main.py DATA_DIR MODELS_DIR --asr-model "
                           f"{args.asr_model}){'; transcript sets here: ' + ', '.join(sets) if sets else ''}")
    elif len(sets) == 1:
        name = sets[0]
    elif not sets:
        raise RunError(f"{data_dir}: no ASR transcript set (ASR-<model>/Text/); make one with "
                       f"feature_extraction_main.py DATA_DIR MODELS_DIR --asr-model M")
    else:
        raise RunError(f"{data_dir}: several ASR transcript sets ({', '.join(sets)}); say which with --asr-model")
    record = read_features_record(data_dir).get(qualified_step("transcripts", name[len("ASR-"):]), {})
    asr_model = record.get("asr_model", {}).get("path", args.asr_model or name)
    try:
        asr_wer = json.loads((data_dir / name / WER_FILE).read_text(encoding="utf-8"))["overall"]["wer"]
    except (OSError, ValueError, KeyError, TypeError):
        asr_wer = None
        log.warning(f"{data_dir / name / WER_FILE}: no word error rate recorded; rerun feature_ext.py transcripts")
    return {"transcripts": {"train": train, "test": test},
            "sets": {"train": name if train == "asr" else None, "test": name if test == "asr" else None},
            "asr_model": asr_model, "asr_wer": asr_wer}


def code_version():
    """The git commit of this code and whether the tree had changes (None outside a git checkout)."""
    import subprocess
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an unpacked release)
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def pretrained_files(data_dir, branches, text_model, speech_model, step_models=None, context_window=CONTEXT_WINDOW,
                     transcripts=None, finetune_speech=False):
    """Every pretrained file the run depends on, by role, with its sha256 (utils.fingerprint):
    the encoders the model loads, and the extractors that made its features (as
    DATA_DIR/features.json recorded them, under the steps of the run's models: branch_steps' `models`).
    A fine-tuned transformers speech encoder reads waveforms, not cached layer means: it is its own
    extractor. predict.py checks them all before it predicts."""
    record = read_features_record(data_dir)
    route = route_of(speech_model, finetune_speech)
    models = {"text_model": (text_model, [WEIGHT_FILES]), "speech_model": (speech_model, list(route.encoder_files))}
    pretrained = {}
    if transcripts is not None:  # the ASR model, for predict.py to transcribe recordings given without text
        pretrained.update(record.get(qualified_step("transcripts", transcripts[len("ASR-"):]), {}))
    for branch in branches:
        for step in branch_steps(branch, context_window, step_models, transcripts):
            if step in record:
                pretrained.update(record[step])
            elif branch == "speech" and route.reads_audio:
                continue  # not read: the encoder's own files (below) make its input
            elif step_entry(step).models:
                log.warning(f"{Path(data_dir) / 'features.json'} does not say which models made the {step} "
                            f"features; predict.py will not be able to check them")
        role = BRANCHES[branch].encoder
        if role is None:
            continue
        path, patterns = models[role]
        if role == "speech_model" and route.missing():
            raise RunError(f"{route.missing()}, or give {BRANCHES[branch].encoder_option}")
        try:
            pretrained[role] = fingerprint(path, *patterns)
        except FileNotFoundError as error:
            raise RunError(f"{BRANCHES[branch].encoder_option.lstrip('-').replace('-', ' ')} "
                           f"({BRANCHES[branch].encoder_option}): {error}") from None
        if role == "speech_model" and route.reads_audio:  # predict.py makes the waveform input with it
            pretrained.update(dict.fromkeys(step_entry(route.step).models, pretrained[role]))
    return pretrained


def val_split(args):
    """--val-split, except under the official protocol, where the corpus's dev split validates."""
    return "dev" if args.protocol == "official" else args.val_split


def speech_encoder_of(args, branches):
    """(speech model, its route: mmser.speech.routes.route_of); None, None without a speech branch. A model
    the route cannot take is refused, saying what it is."""
    from mmser.speech_encoders import SpeechModelError
    if "speech" not in branches:
        return None, None
    speech_model = model_paths(args)[1]
    route = route_of(speech_model, args.finetune_speech)
    try:
        route.check()
    except SpeechModelError as error:
        raise RunError(f"--speech-model: {error}") from None
    return speech_model, route


def describe_val_split(val_split, val_fraction):
    return {
        "dev": "the corpus's official dev split",
        "stratified": f"{val_fraction:.0%} of the training utterances, stratified by class",
        "speaker": "one training speaker held out (chosen by the seed)",
        "original": "the test session's other speaker, as the original's cross-validation script (its F speaker "
                    "tested; the test session also chooses the checkpoint)",
        "in-train-session": "the last training session, which also stays in training (Siriwardhana et al.'s "
                            "released lists: validation overlaps training)",
    }[val_split]


# ------------------------------------------------------------------------------------------------
# the run folder

def check_run_dir(run_dir, data_dir=None, models_dir=None):
    """RUN_DIR is new, empty, or a run folder main.py made (it has a config.json with a protocol):
    a run writes its files into it, so a DATA_DIR, a MODELS_DIR or any other folder is refused."""
    run_dir = Path(run_dir)
    for what, other in (("DATA_DIR", data_dir), ("MODELS_DIR", models_dir)):
        if other is not None and run_dir.resolve() == Path(other).resolve():
            raise RunError(f"RUN_DIR {run_dir} is the {what}: give the run a folder of its own")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunError(f"RUN_DIR {run_dir}: not a folder")
    if not any(run_dir.iterdir()):
        return
    config = run_dir / "config.json"
    try:
        made_by_main = "protocol" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, unreadable, or not JSON: not a run folder
        made_by_main = False
    if not made_by_main:
        what = "a DATA_DIR" if (run_dir / "utterances.csv").exists() else "not a run folder of main.py"
        raise RunError(f"RUN_DIR {run_dir} holds files and is {what}; give a new or empty folder, or a run folder "
                       f"to resume")


def write_config(run_dir, config):
    """The one place config.json is written: predict.py rebuilds the model from it."""
    write_text_atomic(Path(run_dir) / "config.json", json.dumps(config, indent=2) + "\n")


def check_resumable(run_dir, config):
    """A RUN_DIR with a config.json only resumes under the same settings (those of `config`)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not a readable config.json ({e}); use a new RUN_DIR") from None
    old = {**ADDED_SETTINGS, **old}
    # A token limit not yet resolved (the demo checks its folder before its models exist) is compared later.
    changed = sorted(k for k in config if k not in NOT_COMPARED_ON_RESUME and old.get(k) != config[k]
                     and not (k in TOKEN_LIMITS and config[k] is None))
    if changed:
        details = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(config[k])}" for k in changed)
        raise RunError(f"{path} was written with other settings ({details}); use a new RUN_DIR or the same "
                       f"settings to resume")
    return True


def _short(value, width=60):
    """A setting for a one-line message: a record of pretrained files would fill the screen."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + " ..."


def setup_logging(run_dir, rank):
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank != 0:
        log.addHandler(logging.NullHandler())
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # The log is appended line by line on purpose (not written atomically): after a crash it
    # should hold everything up to the crash.
    file_handler = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)


# ------------------------------------------------------------------------------------------------
# folds

def make_folds(utterances, protocol, val_split="stratified", val_fraction=0.1, seed=0, fold_by="session"):
    """-> list of {"fold", "test_sessions" | "test_speakers" | "test_<fold_by>" | "test_split", "train", "val",
    "test"} (utterance lists)."""
    from sklearn.model_selection import train_test_split
    if protocol == "official":
        return [official_fold(utterances)]
    sessions = sorted({u["session"] for u in utterances})
    if protocol in ("session5", "loso", "speaker") and sessions == [0]:  # what other corpora's collectors write
        raise RunError(f"protocol {protocol} holds out IEMOCAP's sessions, and this corpus has none: use --protocol "
                       f"official (its train/dev/test split) or folds --fold-by COLUMN")
    speakers_of = {s: sorted({u["speaker"] for u in utterances if u["session"] == s}) for s in sessions}
    if protocol == "session5":
        if 5 not in sessions:
            raise RunError("protocol session5 needs session 5 in the data")
        tests = [("test_sessions", [5])]
    elif protocol == "loso":
        tests = [("test_sessions", [s]) for s in sessions]
    elif protocol == "speaker":
        tests = [("test_speakers", [sp]) for s in sessions for sp in speakers_of[s]]
    elif protocol == "folds":
        if fold_by not in utterances[0]:
            raise RunError(f"--fold-by {fold_by}: the manifest has no such column (session, speaker, dialog, or "
                           f"one of the optional split, group, sentiment)")
        values = sorted({u[fold_by] for u in utterances})
        if len(values) < 2:
            raise RunError(f"--fold-by {fold_by}: every labelled utterance has the value {values[0]!r}; folds need "
                           f"at least two values")
        tests = [(f"test_{fold_by}", [v]) for v in values]
    else:
        raise ValueError(f"unknown protocol {protocol!r}: use session5, loso or speaker")
    folds = []
    for k, (key, held_out) in enumerate(tests, 1):
        if key == "test_sessions":
            test_sessions = set(held_out)
            test = [u for u in utterances if u["session"] in test_sessions]
        elif key != "test_speakers":  # --protocol folds: no dialogue the test fold speaks in trains
            test = [u for u in utterances if u[fold_by] == held_out[0]]
            shared = {(u["session"], u["dialog"]) for u in test}
            pool = [u for u in utterances if u[fold_by] != held_out[0] and (u["session"], u["dialog"]) not in shared]
            test_sessions = set()
        else:
            test_sessions = {u["session"] for u in utterances if u["speaker"] == held_out[0]}
            test = [u for u in utterances if u["speaker"] == held_out[0]]
        if key in ("test_sessions", "test_speakers"):
            pool = [u for u in utterances if u["session"] not in test_sessions]
        fold = {"fold": k, key: held_out}
        if val_split == "original" and protocol == "folds":
            raise RunError("--val-split original is IEMOCAP's split by session; with --protocol folds use "
                           "stratified or speaker")
        if val_split == "original":
            test_speakers = set(held_out) if key == "test_speakers" else {
                sp for s in test_sessions for sp in speakers_of[s] if sp.endswith("F")}
            in_session = [u for u in utterances if u["session"] in test_sessions]
            val = [u for u in in_session if u["speaker"] not in test_speakers]
            test = [u for u in in_session if u["speaker"] in test_speakers]
            fold["test_speakers"] = sorted(test_speakers)
            train = pool
        elif val_split == "speaker":
            candidates = sorted({u["speaker"] for u in pool})
            val_speaker = candidates[np.random.RandomState(seed + k).randint(len(candidates))]
            val = [u for u in pool if u["speaker"] == val_speaker]
            train = [u for u in pool if u["speaker"] != val_speaker]
        elif val_split == "stratified":
            try:
                train, val = train_test_split(pool, test_size=val_fraction, random_state=seed,
                                              stratify=[u["label"] for u in pool])
            except ValueError as e:  # too few utterances of a class, or too small a share, to stratify
                raise RunError(f"fold {k}: no stratified validation share of {val_fraction:.0%} from "
                               f"{len(pool)} utterances ({e})") from None
            train, val = sorted(train, key=lambda u: u["index"]), sorted(val, key=lambda u: u["index"])
        elif val_split == "in-train-session":
            # As Siriwardhana et al.'s released lists: session 4 validates and is trained on too.
            val_session = max(u["session"] for u in pool) if pool else None
            train, val = pool, [u for u in pool if u["session"] == val_session]
        else:
            raise ValueError(f"unknown validation split {val_split!r}: use stratified, speaker, original or "
                             f"in-train-session")
        if not train or not val or not test:
            raise RunError(f"fold {k} ({key} {held_out}): empty split (train {len(train)}, "
                           f"validation {len(val)}, test {len(test)})")
        fold.update(train=train, val=val, test=test)
        folds.append(fold)
    return folds


def official_fold(utterances):
    """The corpus's own splits (the manifest's split column): train on train, validate on dev, test on test."""
    if "split" not in utterances[0]:
        raise RunError("--protocol official needs the manifest's split column (train/dev/test), which corpora that "
                       "ship their splits have (meld_data_collect.py, or csv_data_collect.py with a split column)")
    fold = {"fold": 1, "test_split": ["test"]}
    fold.update({part: [u for u in utterances if u["split"] == split]
                 for part, split in (("train", "train"), ("val", "dev"), ("test", "test"))})
    if not all(fold[part] for part in ("train", "val", "test")):
        raise RunError(f"--protocol official: an empty split (train {len(fold['train'])}, dev {len(fold['val'])}, "
                       f"test {len(fold['test'])} labelled utterances)")
    return fold


def fold_title(fold):
    held_out = [k for k in fold if k.startswith("test_") and k not in ("test_sessions", "test_speakers")]
    if held_out:  # --protocol folds or official
        return f"{held_out[0][len('test_'):]} " + ",".join(map(str, fold[held_out[0]]))
    if "test_sessions" in fold:
        title = "session " + ",".join(map(str, fold["test_sessions"]))
        return title + (f" ({','.join(fold['test_speakers'])})" if "test_speakers" in fold else "")
    return "speaker " + ",".join(fold["test_speakers"])


def run_fold(config, fold, utterances, run_dir, env, test_inputs=None):
    """One fold: trained (or resumed), its best checkpoint tested once, its files written; a fold
    an earlier invocation finished is kept. -> the fold's result (fold_result.json). test_inputs
    (run) replaces the test utterances' text features."""
    from mmser import train_function
    from mmser import validation_function
    fold_dir = Path(run_dir) / f"fold{fold['fold']}"
    result_path = fold_dir / "fold_result.json"
    if result_path.exists():
        log.info(f"fold {fold['fold']} ({fold_title(fold)}): already finished, kept")
        return json.loads(result_path.read_text(encoding="utf-8"))
    log.info(f"fold {fold['fold']} ({fold_title(fold)}): train {len(fold['train'])}, "
             f"validation {len(fold['val'])}, test {len(fold['test'])} utterances")
    model, state = train_function.train_fold(config, fold, utterances, fold_dir, env)
    # The test fold is seen once, with the checkpoint the validation set chose.
    # The training set's utterances, speech vectors cached, with the other transcript set's text features.
    tested = fold["test"] if test_inputs is None else [{**u, **test_inputs[u["name"]]} for u in fold["test"]]
    test, predictions, _ = validation_function.evaluate(model, tested, config["eval_batch_size"], env["device"],
                                                        config["classes"], env["amp_dtype"], env["rank"],
                                                        env["world_size"])
    if config.get("one_vs_rest"):  # Siriwardhana et al.'s per-emotion binary scores, beside ours
        test.update(validation_function.one_vs_rest_metrics(predictions["labels"], predictions["probs"].argmax(1),
                                                            config["classes"]))
    result = {k: fold[k] for k in fold if k == "fold" or k.startswith("test_")}
    result.update(n_train=len(fold["train"]), n_val=len(fold["val"]), n_test=len(fold["test"]), test=test,
                  best_epoch=state["best_epoch"], val=state["best_val"], history=state["history"],
                  y_true=predictions["labels"].tolist(), y_pred=predictions["probs"].argmax(1).tolist())
    if model.speech_layer_sum is not None:  # which layers carry emotion: saved and drawn per fold
        result["speech_layer_weights"] = model.speech_layer_sum.layer_weights().tolist()
    if env["rank"] == 0:
        validation_function.write_fold_reports(fold_dir, predictions, test, state["history"], config["classes"],
                                               f"fold {fold['fold']}: test {fold_title(fold)}", state["best_epoch"])
        if predictions["attention"] is not None:
            result["attention"] = validation_function.attention_means(predictions["attention"], predictions["labels"],
                                                                      len(config["classes"]))
        if "speech_layer_weights" in result:
            validation_function.plot_layer_weights(result["speech_layer_weights"], fold_dir / "speech_layers.png",
                                                   f"fold {fold['fold']}: {Path(config['speech_model']).name}")
        write_text_atomic(result_path, json.dumps(result, indent=1) + "\n")
        (fold_dir / "last.pt").unlink(missing_ok=True)
    if env["world_size"] > 1:
        import torch.distributed as dist
        dist.barrier()
    first = f"weighted-F1 {test['weighted_f1']:.4f}  " if config.get("first_metric") == "weighted_f1" else ""
    log.info(f"fold {fold['fold']} test ({fold_title(fold)}, best epoch {state['best_epoch']}): "
             f"{first}WA {test['wa']:.4f}  UA {test['ua']:.4f}  macro-F1 {test['macro_f1']:.4f}")
    return result


# ------------------------------------------------------------------------------------------------
# the whole run

STD_KIND = "sample standard deviation (ddof 1)"


def spread(results):
    """{metric: {"mean", "std", "n"}} over a list of metric dicts (folds, seeds), for every number they
    all hold, whatever the metrics are; std is the sample standard deviation (ddof 1), None for one value."""
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and all(isinstance(r.get(k), (int, float)) for r in results)]
    out = {}
    for key in keys:
        values = np.array([r[key] for r in results], dtype=float)
        out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                    "n": len(values)}
    return out


def summarize(protocol, fold_results, classes, val_split="stratified", left_out=(), seeds=None):
    """results.json: the folds' test metrics (with each fold's best epoch and validation metrics),
    their mean and sample std (ddof 1) over folds, and the metrics of all test predictions pooled.
    With `seeds` (fold_results then holds every seed's folds, each with its "seed"), the mean and
    sample std over seeds of each seed's fold mean, and over all fold x seed results, are added.
    val_split says how checkpoints were chosen ("original": by the test session's other speaker);
    left_out names the labelled utterances that --skip-missing left out for lack of features."""
    from mmser.validation_function import compute_metrics
    # what the fold held out (test_sessions, test_speakers, test_group, ...), then its figures
    folds = [{k: r[k] for k in ("seed", "fold", *[k for k in r if k.startswith("test_")], "n_train", "n_val",
                                 "n_test", "test", "best_epoch", "val") if k in r} for r in fold_results]
    pooled = compute_metrics([y for r in fold_results for y in r["y_true"]],
                             [y for r in fold_results for y in r["y_pred"]], classes)
    over_folds = spread([r["test"] for r in fold_results])
    summary = {}
    if seeds:
        per_seed = {seed: spread([r["test"] for r in fold_results if r["seed"] == seed]) for seed in seeds}
        main_spread = spread([{k: v["mean"] for k, v in per_seed[seed].items()} for seed in seeds])
        over = f"over {len(seeds)} seeds of each seed's mean over folds"
    else:
        main_spread = over_folds
        over = (f"over {len(fold_results)} folds (one seed: a spread over folds only)" if len(fold_results) > 1
                else None)
    for key, value in main_spread.items():
        summary[f"{key}_mean"], summary[f"{key}_std"] = value["mean"], value["std"]
    summary["std"] = f"{STD_KIND} {over}" if over else "none: one fold and one seed"
    summary["pooled"] = pooled
    results = {"protocol": protocol, "val_split": val_split, "left_out": list(left_out), "folds": folds,
               "summary": summary}
    if seeds:
        results["seeds"] = list(seeds)
        results["per_seed"] = [{"seed": seed, "over_folds": per_seed[seed]} for seed in seeds]
        results["over_fold_x_seed"] = over_folds
    return results


METRIC_NAMES = {"wa": "WA", "ua": "UA", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1"}


def _with_spread(mean, std):
    """A mean, with its spread only where there is one (no "± 0.0000" for a single fold)."""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def results_table(results, config):
    """summary.md: one row per fold, the mean (± sample std where there is a spread) and the pooled
    test predictions; with --seeds, a row per seed too."""
    metrics = list(METRIC_NAMES)
    select = {"val_ua": "checkpoint chosen by validation UA", "val_loss": "checkpoint chosen by validation loss",
              "val_weighted_f1": "checkpoint chosen by validation weighted F1",
              "last": "the last epoch's weights tested"}[config.get("select_by", "val_ua")]
    recipe = f"; recipe `{config['recipe']}`" if config.get("recipe") else ""
    early = (f" at most (a fold stops after {config['patience']} without a lower validation loss)"
             if config.get("patience") else "")
    lines = [f"# Results: {config['protocol']}, branches {'+'.join(config['branches'])}{recipe}", ""]
    if config.get("first_metric") == "weighted_f1":  # what the corpus's papers report: first
        s, p = results["summary"], results["summary"]["pooled"]
        lines += [f"**Weighted F1 {p['weighted_f1']:.4f}** (pooled test predictions; mean over folds "
                  f"{s['weighted_f1_mean']:.4f}), UA {p['ua']:.4f}, WA {p['wa']:.4f}.", ""]
    lines += [f"Data: `{config['data_dir']}`; validation: {config['val_split_description']}; "
             f"{config['epochs']} epochs{early}, {select}.", "",
             f"| {'seed | ' if results.get('seeds') else ''}fold | test | train | val | test n | best epoch | "
             + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
             "| " + " | ".join(["---"] * (6 + len(metrics) + bool(results.get("seeds")))) + " |"]
    for f in results["folds"]:
        t = f["test"]
        seed = f"{f['seed']} | " if results.get("seeds") else ""
        lines.append(f"| {seed}{f['fold']} | {fold_title(f)} | {f['n_train']} | {f['n_val']} | {f['n_test']} | "
                     f"{f.get('best_epoch', '')} | " + " | ".join(f"{t[m]:.4f}" for m in metrics) + " |")
    s, p = results["summary"], results["summary"]["pooled"]
    blank = "| | " if results.get("seeds") else "| "
    if results.get("seeds"):
        for entry in results["per_seed"]:
            o = entry["over_folds"]
            lines.append(f"| {entry['seed']} | mean over folds | | | | | | "
                         + " | ".join(_with_spread(o[m]["mean"], o[m]["std"]) for m in metrics) + " |")
    label = "mean ± std over seeds" if results.get("seeds") else "mean ± std" if len(results["folds"]) > 1 else "mean"
    lines.append(f"{blank}{label} | | | | | | "
                 + " | ".join(_with_spread(s[f"{m}_mean"], s[f"{m}_std"]) for m in metrics) + " |")
    pooled_over = "all folds and seeds" if results.get("seeds") else "all folds"
    lines.append(f"{blank}pooled | {pooled_over} | | | {sum(f['n_test'] for f in results['folds'])} | | "
                 + " | ".join(f"{p[m]:.4f}" for m in metrics) + " |")
    recall = ", ".join(f"{c} {r:.3f}" if r is not None else f"{c} -" for c, r in p["per_class_recall"].items())
    lines += ["", f"Pooled per-class recall: {recall}. Chance UA is {1 / len(config['classes']):.2f}.",
              "", f"Spread: {s['std']}" + ("; ± is one standard deviation." if not s["std"].startswith("none") else
                                           " (--seeds gives a spread over seeds).")]
    if results.get("seeds"):
        o = results["over_fold_x_seed"]
        lines.append("Over all fold x seed results: " + ", ".join(
            f"{METRIC_NAMES[m]} {_with_spread(o[m]['mean'], o[m]['std'])}" for m in metrics) + ".")
    binary = [k for k in s if k.startswith("ovr_") and k.endswith("_mean")]
    if binary:
        lines += ["", "One-vs-rest binary scores per emotion (Siriwardhana et al.'s IEMOCAP metric: not comparable "
                      "with 4-class UA), mean over folds:", "",
                  "| emotion | binary accuracy | binary F1 (weighted) |", "| --- | --- | --- |"]
        for c in config["classes"]:
            lines.append(f"| {c} | {_with_spread(s[f'ovr_{c}_accuracy_mean'], s[f'ovr_{c}_accuracy_std'])} | "
                         f"{_with_spread(s[f'ovr_{c}_f1_mean'], s[f'ovr_{c}_f1_std'])} |")
    if "transcripts" in config:
        wer = "unknown" if config["asr_wer"] is None else f"{config['asr_wer']:.3f}"
        lines += ["", f"Transcripts: trained on the {config['transcripts']['train']} transcripts, tested on the "
                      f"{config['transcripts']['test']} ones; ASR model `{config['asr_model']}`, WER {wer} "
                      f"(feature_ext.py's normalisation, all utterances)."]
    if results["left_out"]:
        lines += ["", f"Left out for missing features (--skip-missing): {len(results['left_out'])} labelled "
                      f"utterance(s), named in results.json."]
    return "\n".join(lines) + "\n"


def setup_distributed(device):
    """(rank, world size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    import torch
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda")
    if cuda and local_rank >= torch.cuda.device_count():
        raise RunError(f"process {local_rank} of this node needs a GPU of its own, but torch sees "
                       f"{torch.cuda.device_count()}; start at most that many per node (--nproc_per_node)")
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)  # before NCCL starts, so its communicator uses this GPU
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(cuda))
    return rank, world, device


def process_group_backend(cuda):
    """NCCL only carries CUDA tensors: the few CPU-side collectives (the loss check, the epoch's
    loss, gathered predictions and speech vectors) go through gloo beside it."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def run(config, run_dir, utterances, env, test_inputs=None):
    """Train and evaluate every fold of config['protocol'] into run_dir; -> results dict (None when paused).
    test_inputs: {name: text features} of another transcript set, which the test utterances are
    predicted from instead (--test-transcripts)."""
    from mmser.train_function import RunPaused
    run_dir, rank, world = Path(run_dir), env["rank"], env["world_size"]
    seeds = config.get("seeds")
    # One pass of the protocol per seed (--seeds), each in its own subfolder, or one with --seed.
    passes = [(seed, run_dir / f"seed{seed}") for seed in seeds] if seeds else [(config["seed"], run_dir)]
    folds = {seed: make_folds(utterances, config["protocol"], config["val_split"], config["val_fraction"], seed,
                              config.get("fold_by", "session"))
             for seed, _ in passes}
    # RUN_DIR is made only now: a run refused for its inputs leaves nothing behind to block the next.
    resuming = check_resumable(run_dir, config)
    setup_logging(run_dir, rank)
    if rank == 0:
        write_config(run_dir, config)
    log.info(f"{'resuming' if resuming else 'starting'} run {run_dir}: {len(utterances)} labelled utterances, "
             f"branches {'+'.join(config['branches'])}, protocol {config['protocol']}, device {env['device']}"
             f"{f' x {world} processes' if world > 1 else ''}, {config['precision']}")
    for note in env.get("notes", ()):
        log.info(note)
    if env["device"] == "cpu" and config["precision"] == "bf16" and not cpu_has_native_bf16():
        log.warning("--precision bf16 on a CPU without bf16 instructions: torch emulates bf16 here, which runs "
                    "slower than fp32 (benchmarks/: a 2048x2048 product at about 1 GFLOP/s on an AVX2-only EPYC)")
    if config["left_out"]:
        log.warning(f"--skip-missing: left out {len(config['left_out'])} labelled utterance(s) without features: "
                    f"{', '.join(config['left_out'][:10])}{', ...' if len(config['left_out']) > 10 else ''}")
    try:
        fold_results = []
        for seed, seed_dir in passes:
            if seeds:
                log.info(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) -> {seed_dir}")
                if rank == 0:  # each seed's folder is a run folder of its own, e.g. for predict.py
                    seed_dir.mkdir(parents=True, exist_ok=True)
                    write_config(seed_dir, {**config, "seed": seed, "seeds": None})
            seed_results = [run_fold({**config, "seed": seed}, fold, utterances, seed_dir, env, test_inputs)
                            for fold in folds[seed]]
            if seeds:  # the seed's own results.json and summary.md: its folder is a finished run too
                write_results({**config, "seed": seed, "seeds": None}, seed_results, seed_dir, rank, show=False)
            fold_results += [{"seed": seed, **result} for result in seed_results] if seeds else seed_results
    except RunPaused as pause:
        log.info(str(pause))
        return None
    return write_results(config, fold_results, run_dir, rank)


def write_results(config, fold_results, run_dir, rank, show=True):
    """results.json, summary.md and the context attention pooled over the folds, in run_dir (by rank
    0); the table goes to the log when `show`. -> results."""
    seeds = config.get("seeds")
    results = summarize(config["protocol"], fold_results, config["classes"], config["val_split"], config["left_out"],
                        seeds)
    if "transcripts" in config:  # which transcripts, only where ASR ones are used (as config.json)
        results.update({key: config[key] for key in ("transcripts", "asr_model", "asr_wer")})
    if config.get("first_metric"):
        results["first_metric"] = config["first_metric"]
    table = results_table(results, config)
    if rank == 0:
        from mmser import validation_function
        attention = [r["attention"] for r in fold_results if r.get("attention")]
        if attention:  # the context branch's attention over every fold (and seed) at once
            validation_function.plot_pooled_attention(attention, run_dir / "attention_pooled.png",
                                                      f"context attention, pooled over {len(attention)} folds",
                                                      config["classes"])
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(run_dir / "summary.md", table)
        if show:
            log.info("\n" + table)
        log.info(f"wrote {run_dir / 'results.json'} and {run_dir / 'summary.md'}")
    return results


def train_and_test(args, run_dir_checked=False):
    """Everything after the options are checked: load the data, resolve the settings once, run.
    (The demo checks its RUN_DIR itself, before it writes its corpus there: run_dir_checked.)"""
    import torch
    from mmser.train_function import TrainingError
    data_dir = Path(args.data_dir)
    if not (data_dir / "utterances.csv").is_file():
        raise RunError(f"{data_dir / 'utterances.csv'}: not found; DATA_DIR is the folder mocap_data_collect.py "
                       f"and the feature extraction wrote")
    if not run_dir_checked:
        check_run_dir(args.run_dir, args.data_dir, args.models_dir)
    branches = parse_branches(args.branches)
    device, precision = resolve_device(args)
    set_threads(args.threads)
    rank, world, device = setup_distributed(device)
    notes = resolve_token_limits(args, branches)
    # Progress bars on a terminal only: in a job's log file (nohup, SLURM) their redrawn frames
    # run together into one endless line, and the per-epoch lines say the same.
    env = {"rank": rank, "world_size": world, "device": device, "progress": rank == 0 and sys.stderr.isatty(),
           "amp_dtype": torch.bfloat16 if precision == "bf16" else None, "notes": notes}
    speech_model, speech_route = speech_encoder_of(args, branches)
    try:
        models = {**text_encoder_settings(args, branches), **speech_models(speech_model)}
        asr = resolve_transcripts(args)
        sets = asr["sets"] if asr else {"train": None, "test": None}
        data = load_run_data(data_dir, branches, args.context_window, args.max_text_tokens, args.max_audio_tokens,
                             args.skip_missing, env["progress"], models, sets["train"], speech_route)
        config = resolve_config(args, data, device, precision, models, asr)
        return run(config, args.run_dir, data.utterances, env,
                   features_of_test_transcripts(args, branches, data, sets, env, models))
    except (DataError, TrainingError) as error:  # a user's file or setting, named in the message
        raise RunError(str(error)) from None
    except (RunError, KeyboardInterrupt):
        raise
    except Exception:  # a bug, CUDA out of memory, ...: its traceback goes to train.log too
        if log.handlers:
            log.exception("the run stopped on an unexpected error")
        raise


# ------------------------------------------------------------------------------------------------
# command line

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except the empty ones (None, off) that the help text explains."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    from fixtures.demo import DEMO
    d = DEFAULTS
    positional = ("context_window", "max_text_tokens", "max_audio_tokens")
    demo = ", ".join(f"{k.upper() if k in positional else '--' + k.replace('_', '-')} {v}" for k, v in DEMO.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"--demo changes these defaults: {demo}.", formatter_class=_HelpFormatter)
    p.add_argument("run_dir", nargs="?", help="where everything the run produces goes (resumes if it exists)")
    p.add_argument("data_dir", nargs="?", help="the extracted features (DATA_DIR of the data contract)")
    p.add_argument("models_dir", nargs="?", help="pretrained models: roberta-large/, bert_kmeans/bert_kmeans.pt")
    p.add_argument("context_window", nargs="?", type=int, default=CONTEXT_WINDOW,
                   help="c: sentences before and after (reads FullBertEmb{c})")
    p.add_argument("max_text_tokens", nargs="?", type=int, default=None,
                   help=f"text RoBERTa tokens kept per utterance, </s> last (default {MAX_TEXT_TOKENS}, or the "
                        f"recipe's, lowered to what the encoder's positions hold)")
    p.add_argument("max_audio_tokens", nargs="?", type=int, default=None,
                   help=f"speech RoBERTa tokens (vq-wav2vec frames + 2) kept per utterance, </s> last (default "
                        f"{MAX_AUDIO_TOKENS}, or the recipe's, lowered to what the checkpoint's positions hold)")
    p.add_argument("--demo", action="store_true",
                   help="make the synthetic corpus and tiny models in RUN_DIR (default demo_run) and run every stage")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="every training setting of a named source (recipes.py; README's recipe table); options "
                        "given still override it")
    p.add_argument("--seeds", default=None,
                   help="e.g. 1,2,3: the whole protocol once per seed, in RUN_DIR/seed{n}/, with the mean and sample "
                        "std over seeds (instead of --seed)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="epochs per fold")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process, per micro-batch")
    p.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"],
                   help="batch size for validation, test and the frozen-speech cache")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per optimizer step")
    p.add_argument("--lr-encoders", type=float, default=d["lr_encoders"], help="learning rate of the pretrained RoBERTas")
    p.add_argument("--lr-head", type=float, default=d["lr_head"], help="learning rate of the new layers")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW's, on weight matrices only")
    p.add_argument("--scheduler", choices=("linear", "newbob", "polynomial", "constant"), default=d["scheduler"],
                   help="linear: warm-up then linear decay; newbob: halve the rate and restore the best weights "
                        "and optimizer state when validation UA improves by less than 0.001; polynomial: fairseq's "
                        "polynomial_decay (power 1, to 0) after the warm-up; constant: the rate never changes")
    p.add_argument("--warmup", type=float, default=d["warmup"], help="share of the steps to warm up (linear)")
    p.add_argument("--clip-norm", type=float, default=d["clip_norm"], help="gradient norm clipping (0: off)")
    p.add_argument("--adam-betas", type=float, nargs=2, default=d["adam_betas"], metavar=("BETA1", "BETA2"),
                   help="AdamW's betas")
    p.add_argument("--adam-eps", type=float, default=d["adam_eps"], help="AdamW's epsilon")
    p.add_argument("--loss", choices=("cross_entropy", "multi_margin"), default=d["loss"],
                   help="multi_margin: torch's MultiMarginLoss(p=1, margin=0.4), the original's")
    p.add_argument("--select-by", choices=("val_ua", "val_weighted_f1", "val_loss", "last"), default=d["select_by"],
                   help="which epoch's weights are tested: best validation UA, best validation weighted F1 (what "
                        "MELD's papers choose on), lowest validation loss, or the last")
    p.add_argument("--patience", type=int, default=d["patience"],
                   help="stop a fold after this many epochs without a lower validation loss (0: never)")
    p.add_argument("--one-vs-rest", action=argparse.BooleanOptionalAction, default=d["one_vs_rest"],
                   help="also report per-emotion binary accuracy and F1 (Siriwardhana et al.'s metric)")
    p.add_argument("--class-weights", choices=("none", "balanced"), default=d["class_weights"],
                   help="balanced: weigh the loss by inverse class frequency in the training set")
    p.add_argument("--fusion-hidden", type=int, default=d["fusion_hidden"], help="width of the fusion layer")
    p.add_argument("--head", choices=("mlp", "linear"), default=d["head"],
                   help="mlp: Linear -> ReLU -> Linear over the branches' vectors; linear: dropout -> Linear")
    p.add_argument("--head-dropout", type=float, default=d["head_dropout"], help="dropout before the head")
    p.add_argument("--branches", default=d["branches"], help="any subset of text,speech,context")
    p.add_argument("--finetune-speech", action="store_true", default=d["finetune_speech"],
                   help="train the speech RoBERTa too (frozen otherwise, and its vectors computed once)")
    p.add_argument("--freeze-text", action="store_true", default=d["freeze_text"],
                   help="keep the text RoBERTa frozen (fine-tuned otherwise)")
    p.add_argument("--text-model", default=None,
                   help="text encoder folder or hub name: RoBERTa, BERT, DeBERTa-v2/v3 or ELECTRA, its tokens made by "
                        "feature_ext.py text-tokens with the same --text-model (default: MODELS_DIR/roberta-large if "
                        "present, else roberta-large)")
    p.add_argument("--sentence-model", default=None,
                   help="the sentence model the context vectors were made with, as given to feature_ext.py (default: "
                        "bert-base-uncased's, FullBertEmb{c}/)")
    p.add_argument("--sentence-pooling", choices=SENTENCE_POOLINGS, default="cls",
                   help="the pooling the context vectors' sentence embeddings were made with (feature_ext.py)")
    p.add_argument("--speech-model", default=None,
                   help="speech RoBERTa checkpoint (default: MODELS_DIR/bert_kmeans/bert_kmeans.pt), or a transformers "
                        "speech encoder (WavLM, HuBERT, wav2vec 2.0, data2vec-audio, Whisper; folder or hub name) "
                        "whose layer means the extraction wrote (--demo: wavlm, hubert, wav2vec2, data2vec-audio or "
                        "whisper, a tiny one)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="with --finetune-speech and a transformers speech encoder: recompute its activations in the "
                        "backward pass: less memory, more time")
    p.add_argument("--transcripts", choices=("reference", "asr"), default="reference",
                   help="the transcripts the text and context features come from: the corpus's (reference) or "
                        "speech recognition's (asr: DATA_DIR/ASR-<model>/, made by feature_extraction_main.py "
                        "--asr-model)")
    p.add_argument("--test-transcripts", choices=("reference", "asr"), default=None,
                   help="the transcripts the test folds are predicted from (default: --transcripts); "
                        "--transcripts reference --test-transcripts asr trains on the corpus's and tests on "
                        "speech recognition's")
    p.add_argument("--asr-model", default=None,
                   help="which ASR model's transcripts (as given to feature_extraction_main.py --asr-model; "
                        "default: the one set DATA_DIR holds)")
    p.add_argument("--protocol", choices=("session5", "loso", "speaker", "folds", "official"), default=d["protocol"],
                   help="session5: train on sessions 1-4, test on 5; loso: 5 folds, one session each; "
                        "speaker: 10 folds, one speaker each; folds: one fold per value of --fold-by; official: "
                        "the corpus's train/dev/test splits (the manifest's split column)")
    p.add_argument("--fold-by", default="session",
                   help="--protocol folds: the manifest column whose values are held out one by one (session, "
                        "speaker, group, ...)")
    p.add_argument("--val-split", choices=("stratified", "speaker", "original", "in-train-session"),
                   default=d["val_split"],
                   help="validation from the training sessions: stratified share or one held-out speaker; "
                        "original: the test session's other speaker (the original's cross-validation script); "
                        "in-train-session: the last training session, trained on too (Siriwardhana et al.'s lists)")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                   help="share of the training utterances that validate (--val-split stratified)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=d["group_by_length"],
                   help="batches of similar length (less padding), in random order; --no-group-by-length "
                        "draws every batch at random")
    p.add_argument("--skip-missing", action="store_true",
                   help="train and test without the labelled utterances that lack a feature file (named in "
                        "the log and results.json, counted in summary.md); without it a missing file stops the run")
    p.add_argument("--seed", type=int, default=d["seed"], help="weights, dropout, batches and validation split")
    p.add_argument("--device", default=d["device"], help="auto, cpu, cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d["precision"],
                   help="auto: bf16 autocast on a GPU that has it, fp32 otherwise")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, one per core); on a machine other jobs share, "
                        "1 or 2 per process run far faster than the default")
    p.add_argument("--stop-after-epochs", type=int, default=0,
                   help="stop (resumably) after this many epochs in this invocation, e.g. for job time limits; "
                        "0: run to the end")
    return p


def parse_args(argv=None, parser=None):
    parser = parser or build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--demo" in argv:  # the demo's own defaults; options given still override them
        from fixtures.demo import DEMO
        parser.set_defaults(**DEMO)
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=sorted(RECIPES))
    name = recipe.parse_known_args(argv)[0].recipe
    settings = {}
    if name:  # the recipe's settings over main.py's (and the demo's); options given still override them
        from mmser.recipes import recipe_settings
        settings = recipe_settings(name)
        # Token limits stay unset here, so that the recipe's are bounded by the encoders' positions.
        parser.set_defaults(**{k: v for k, v in settings.items() if k not in TOKEN_LIMITS},
                            **{k: None for k in TOKEN_LIMITS})
    args = parser.parse_args(argv)
    args.recipe_overridden = sorted(
        k for k, v in settings.items()
        if getattr(args, k) is not None and (list(getattr(args, k)) if isinstance(v, list) else getattr(args, k)) != v)
    return args


def check_options(args, parser):
    """Numbers that would crash a run later, or quietly train something else than asked."""
    at_least = {"--epochs": (args.epochs, 1), "--batch-size": (args.batch_size, 1),
                "--eval-batch-size": (args.eval_batch_size, 1), "--grad-accum": (args.grad_accum, 1),
                "--fusion-hidden": (args.fusion_hidden, 1), "CONTEXT_WINDOW": (args.context_window, 1),
                "MAX_TEXT_TOKENS": (args.max_text_tokens or 2, 2), "MAX_AUDIO_TOKENS": (args.max_audio_tokens or 2, 2),
                "--patience": (args.patience, 0),
                "--seed": (args.seed, 0), "--stop-after-epochs": (args.stop_after_epochs, 0),
                "--clip-norm": (args.clip_norm, 0), "--weight-decay": (args.weight_decay, 0),
                "--threads": (args.threads or 1, 1)}
    for name, (value, least) in at_least.items():
        if value < least:
            parser.error(f"{name} must be at least {least}, got {value}")
    for name, value in (("--lr-encoders", args.lr_encoders), ("--lr-head", args.lr_head)):
        if not value > 0:
            parser.error(f"{name} must be positive, got {value}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be a share above 0 and below 1, got {args.val_fraction}")
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup must be a share from 0 and below 1, got {args.warmup}")
    if not 0 <= args.head_dropout < 1:
        parser.error(f"--head-dropout must be a share from 0 and below 1, got {args.head_dropout}")
    try:
        parse_seeds(args.seeds)
    except RunError as error:
        parser.error(str(error))
    try:
        parse_branches(args.branches)
    except RunError as error:
        parser.error(str(error))
    if args.protocol == "official" and args.val_split != DEFAULTS["val_split"]:
        parser.error("--protocol official validates on the corpus's dev split; --val-split does not apply")


def main(argv=None):
    parser = build_parser()
    args = parse_args(argv, parser)
    check_options(args, parser)
    if args.demo and (args.data_dir or args.models_dir):
        parser.error("--demo takes only RUN_DIR: it makes its own data and models")
    if not args.demo and not (args.run_dir and args.data_dir and args.models_dir):
        parser.error("RUN_DIR, DATA_DIR and MODELS_DIR are required (or --demo)")
    try:
        if args.demo:
            from fixtures import demo
            return demo.run_demo(args)
        return train_and_test(args)
    except RunError as error:
        raise SystemExit(f"main.py: error: {error}") from None
    except OSError as e:  # a file or folder that can't be read or written (read-only, not a folder, ...)
        if e.filename is None:
            raise
        raise SystemExit(f"main.py: error: {e.filename}: {e.strerror}") from None
    finally:
        if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
            sys.modules["torch.distributed"].destroy_process_group()


if __name__ == "__main__":
    # demo.py imports this module as `main`: let that be this very module, not a second copy.
    sys.modules.setdefault("main", sys.modules["__main__"])
    try:
        main()
    except KeyboardInterrupt:  # a traceback would read as a crash; nothing finished is lost
        print("main.py: interrupted: run the same command again to resume from the last finished epoch", file=sys.stderr)
        sys.exit(130)
