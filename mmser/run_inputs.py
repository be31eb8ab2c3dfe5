"""What a run reads, resolved once before it starts: its device, its models and their token limits,
its transcript sets, and the record of every pretrained file it depends on -> RunSettings.

  resolve_device(options)              (device, precision): auto picks a GPU and bf16 where there are
  model_paths(options)                 (text model, speech model): the options, or MODELS_DIR's files
  resolve_token_limits(options, ...)   MAX_TEXT_TOKENS / MAX_AUDIO_TOKENS bounded by the encoders' positions
  resolve_transcripts(options)         which transcripts train and test the run (ASR sets)
  resolve_settings(options, data, ...) the run's RunSettings, config.json exactly
"""
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from mmser.data_contract import (BRANCHES, WER_FILE, branch_steps, feature_folder, qualified_step,
                                 read_features_record, split_step, step_entry, text_models, transcript_set,
                                 transcript_sets)
from mmser.speech.routes import route_of
from mmser.models_dir import resolve_model
from mmser.settings import DEFAULTS, TOKEN_LIMITS, RunError, RunSettings, option_settings
from mmser.utils import WEIGHT_FILES, check_device, fingerprint

log = logging.getLogger("main")


def resolve_device(options):
    """(device, precision) from --device and --precision: auto picks a GPU and bf16 where there are."""
    import torch
    device = "cuda" if options.device == "auto" and torch.cuda.is_available() else \
        "cpu" if options.device == "auto" else options.device
    try:
        check_device(device)
    except ValueError as error:
        raise RunError(str(error)) from None
    precision = options.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return device, precision


def model_paths(options):
    """(text model, speech model): the options, or MODELS_DIR's default files."""
    models_dir = Path(options.models_dir).resolve()
    text_model = resolve_model(models_dir, "text_model", options.text_model)
    if Path(text_model).exists():
        text_model = str(Path(text_model).resolve())
    speech_model = resolve_model(models_dir, "speech_roberta", options.speech_model)
    if Path(speech_model).exists() or route_of(speech_model).model_is_file:
        speech_model = Path(speech_model).resolve()  # a hub name of a transformers encoder stays a name
    return str(text_model), str(speech_model)


def text_encoder_settings(options, branches):
    """The run's text and sentence models -> data_contract.text_models (which folders the branches
    read). The text encoder must be one the branch takes (one line saying what it is otherwise; its
    positions bound MAX_TEXT_TOKENS in resolve_token_limits); a per-model folder that is not there is
    refused with one line naming it and the command that makes it."""
    from mmser.extraction import FeatureError, text_encoder_config
    text_model = model_paths(options)[0]
    if "text" in branches:
        try:
            text_encoder_config(text_model, "text model (--text-model)")
        except FeatureError as error:
            raise RunError(str(error)) from None
    models = text_models(text_model, options.sentence_model, options.sentence_pooling)
    for branch in branches:
        for step in branch_steps(branch, options.context_window, models):
            folder = feature_folder(options.data_dir, step)
            if split_step(step)[2] is not None and not folder.is_dir():
                raise RunError(f"{folder}: not found (the {step} features of this run's options); make it with: "
                               f"{making_command(options, step, text_model)}")
    return models


def making_command(options, step, text_model):
    """The command line that makes the per-model folder of `step` (docs/features.md)."""
    sentence = [f"--sentence-model {options.sentence_model}"] if options.sentence_model else []
    sentence += [f"--sentence-pooling {options.sentence_pooling}"] if options.sentence_pooling != "cls" else []
    data_dir, models_dir = str(options.data_dir), str(options.models_dir)
    concatenate = " ".join(["python concatenate_embds.py", data_dir, "--context", str(options.context_window), *sentence])
    kind = split_step(step)[1]
    if kind == "text-tokens":
        return f"python feature_ext.py text-tokens {data_dir} {models_dir} --text-model {text_model}"
    if kind == "sentence-embeddings":
        return " ".join(["python feature_ext.py sentence-embeddings", data_dir, models_dir, *sentence, "&&", concatenate])
    return concatenate


def resolve_token_limits(options, branches):
    """MAX_TEXT_TOKENS / MAX_AUDIO_TOKENS: the one given, else the default or the recipe's, lowered to
    what the encoder's learned positions hold (a sequence beyond them has no position to take).
    -> ({setting: limit}, the log's notes on what was lowered)."""
    from mmser.recipes import recipe_settings
    recipe = recipe_settings(options.recipe) if options.recipe else {}
    text_model, speech_model = model_paths(options)
    limits, notes = {}, []
    for key, branch in (("max_text_tokens", "text"), ("max_audio_tokens", "speech")):
        wanted = getattr(options, key)
        wanted = recipe.get(key, getattr(DEFAULTS, key)) if wanted is None else wanted
        positions = encoder_positions(branch, text_model if branch == "text" else speech_model) \
            if branch in branches else None
        if positions is not None and positions < wanted:
            notes.append(f"{TOKEN_LIMITS[key]} {wanted} lowered to {positions}: the {branch} encoder's positions")
            wanted = positions
        limits[key] = wanted
    return limits, notes


def encoder_positions(branch, model):
    """The longest sequence an encoder's learned positions hold (text_features.text_token_limit:
    RoBERTa's start after its padding index); for the speech branch, its route's (none for a transformers
    speech encoder's layer means); None for a model that cannot be read here (a missing file,
    CheckpointError: its own error then comes where it is loaded)."""
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


def resolve_settings(options, data, device, precision, limits, models=None, asr=None):
    """The complete settings of a run, config.json exactly; nothing changes them afterwards (data:
    runner.RunData; limits: resolve_token_limits'; models: the run's non-default text and sentence
    models, text_models; asr: resolve_transcripts', which transcripts trained and tested it)."""
    import torch
    import transformers
    data_dir, models_dir = Path(options.data_dir).resolve(), Path(options.models_dir).resolve()
    chosen = {**option_settings(options, precision), **limits}
    text_model, speech_model = model_paths(options)
    transcripts = asr and (asr["sets"]["train"] or asr["sets"]["test"])
    sentence_model = options.sentence_model
    if sentence_model and Path(sentence_model).exists():
        sentence_model = str(Path(sentence_model).resolve())
    return RunSettings(
        data_dir=str(data_dir), models_dir=str(models_dir), text_model=text_model, speech_model=speech_model,
        pretrained=pretrained_files(data_dir, chosen["branches"], text_model, speech_model, models,
                                    options.context_window, transcripts, options.finetune_speech),
        sentence_model=sentence_model,
        feature_folders={branch: step_entry(branch_steps(branch, options.context_window, models,
                                                         asr and asr["sets"]["train"])[-1]).folder
                         for branch in chosen["branches"]},
        classes=list(data.classes), context_width=data.context_width, left_out=list(data.left_out),
        device=device, world_size=int(os.environ.get("WORLD_SIZE", 1)),
        versions={"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
                  "transformers": transformers.__version__},
        code=code_version(), first_metric=data.first_metric,
        **({} if asr is None else {"transcripts": asr["transcripts"], "asr_model": asr["asr_model"],
                                   "asr_wer": asr["asr_wer"]}),
        **chosen)


def resolve_transcripts(options):
    """Which transcripts the run trains and tests on (--transcripts, --test-transcripts, --asr-model):
    None when both are the reference ones, else {"transcripts": {"train", "test"}, "sets": the folders
    (None for the reference), "asr_model", "asr_wer" (overall, wer.json's)}."""
    train, test = options.transcripts, options.test_transcripts or options.transcripts
    if "asr" not in (train, test):
        return None
    data_dir = Path(options.data_dir)
    sets = transcript_sets(data_dir)
    if options.asr_model:
        name = transcript_set(options.asr_model)
        if name not in sets:
            raise RunError(f"{data_dir / name / 'Text'}: not found; make {options.asr_model}'s transcripts and their "
                           f"features first (feature_extraction_main.py DATA_DIR MODELS_DIR --asr-model "
                           f"{options.asr_model}){'; transcript sets here: ' + ', '.join(sets) if sets else ''}")
    elif len(sets) == 1:
        name = sets[0]
    elif not sets:
        raise RunError(f"{data_dir}: no ASR transcript set (ASR-<model>/Text/); make one with "
                       f"feature_extraction_main.py DATA_DIR MODELS_DIR --asr-model M")
    else:
        raise RunError(f"{data_dir}: several ASR transcript sets ({', '.join(sets)}); say which with --asr-model")
    record = read_features_record(data_dir).get(qualified_step("transcripts", name[len("ASR-"):]), {})
    asr_model = record.get("asr_model", {}).get("path", options.asr_model or name)
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


def pretrained_files(data_dir, branches, text_model, speech_model, step_models=None, context_window=None,
                     transcripts=None, finetune_speech=DEFAULTS.finetune_speech):
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


def speech_encoder_of(options, branches):
    """(speech model, its route: mmser.speech.routes.route_of); None, None without a speech branch. A model
    the route cannot take is refused, saying what it is."""
    from mmser.speech_encoders import SpeechModelError
    if "speech" not in branches:
        return None, None
    speech_model = model_paths(options)[1]
    route = route_of(speech_model, options.finetune_speech)
    try:
        route.check()
    except SpeechModelError as error:
        raise RunError(f"--speech-model: {error}") from None
    return speech_model, route
