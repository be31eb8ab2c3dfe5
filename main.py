"""Train and evaluate the fused emotion classifier on extracted features; or run the whole demo.

    python main.py RUN_DIR DATA_DIR MODELS_DIR [CONTEXT_WINDOW MAX_TEXT_TOKENS MAX_AUDIO_TOKENS] [options]
    torchrun --nproc_per_node N main.py ...          (DistributedDataParallel, one process per device)
    python main.py --demo [RUN_DIR]                  (synthetic corpus -> every stage -> results table)

Reads DATA_DIR (utterances.csv, GPT2Tokens/, vqw2vTokens/, FullBertEmb{c}/; see dataset_loader.py)
and the pretrained encoders in MODELS_DIR (see model_structure.py). Writes everything under RUN_DIR:
  config.json                 every resolved setting, data_dir and the models used
  train.log                   the log of every invocation (appended)
  fold{k}/best.pt             the best epoch's weights by validation UA (torch.load(weights_only=True))
  fold{k}/last.pt             the last finished epoch, to resume from (removed once the fold is done)
  fold{k}/predictions.csv     name, true, predicted, p_ang, p_hap, p_sad, p_neu (test utterances)
  fold{k}/confusion_matrix.png, training_curves.png, attention.png (context branch, per slot)
  fold{k}/fold_result.json    the fold's test and validation metrics and training history
  results.json                per-fold test metrics and their summary (mean, std, pooled)
  summary.md                  the results table (also printed)
Running again with the same RUN_DIR and settings resumes: finished folds are kept, an interrupted
fold restarts from its last epoch checkpoint and ends with the numbers of an uninterrupted run.

Protocols: session5 (train 1-4, test 5), loso (5 folds, one session each), speaker (10 folds, one
speaker each; the test speaker's session partner shares their dialogues, so their context, and is
not trained on). Validation comes from the training sessions: 10% stratified by class (default)
or one held-out training speaker; `--val-split original` is the original's split, validating on the
test session's other speaker (for session protocols the session's M speaker validates and its F
speaker is tested). The test utterances never train a model or choose its checkpoint, except under
`--val-split original`, where the test session chooses it (and the summary says so).
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.model_selection import train_test_split

import dataset_loader
import feature_ext
import model_structure
import train_function
import validation_function
from mocap_data_collect import CLASSES, read_manifest
from utils import WEIGHT_FILES, atomic_path, fingerprint, write_text_atomic

# -- defaults: the original's settings where it had them; the command line overrides each --------
CONTEXT_WINDOW = 3  # sentences before and after: FullBertEmb3
MAX_TEXT_TOKENS = 100
MAX_AUDIO_TOKENS = 310
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
}
# Demo: small enough for 2 CPU cores in well under a minute, on the synthetic corpus and tiny models.
DEMO = {"context_window": 2, "max_text_tokens": 64, "max_audio_tokens": 310, "epochs": 15, "batch_size": 16,
        "lr_encoders": 1e-3, "lr_head": 2e-3, "seed": 0}
DEMO_CORPUS_SEED = 0
# Settings that may differ when a run is resumed: they do not change the numbers.
NOT_COMPARED_ON_RESUME = ("device", "versions", "stop_after_epochs")
# Settings added since a run may have started: a config.json without them had these values.
ADDED_SETTINGS = {"skip_missing": False, "left_out": []}

log = logging.getLogger("main")


class RunPaused(Exception):
    """--stop-after-epochs was reached; the run resumes from RUN_DIR."""


# ------------------------------------------------------------------------------------------------
# configuration

def resolve_config(args):
    """The complete settings of a run as plain JSON values; config.json holds exactly this."""
    data_dir, models_dir = Path(args.data_dir).resolve(), Path(args.models_dir).resolve()
    if not (data_dir / "utterances.csv").is_file():
        raise SystemExit(f"main.py: error: {data_dir / 'utterances.csv'}: not found; DATA_DIR is the folder "
                         f"mocap_data_collect.py and the feature extraction wrote")
    branches = [b.strip() for b in args.branches.split(",") if b.strip()]
    if not branches or set(branches) - set(dataset_loader.BRANCHES) or len(set(branches)) != len(branches):
        raise SystemExit(f"main.py: error: --branches must be a comma-separated subset of "
                         f"{','.join(dataset_loader.BRANCHES)}, got {args.branches!r}")
    branches = [b for b in dataset_loader.BRANCHES if b in branches]
    text_model = args.text_model
    if text_model is None:  # a local copy in MODELS_DIR, else the hub name through transformers' cache
        text_model = models_dir / "roberta-large" if (models_dir / "roberta-large").is_dir() else "roberta-large"
    if Path(text_model).exists():
        text_model = str(Path(text_model).resolve())
    speech_model = Path(args.speech_model or models_dir / "bert_kmeans" / "bert_kmeans.pt").resolve()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        feature_ext.check_device(device)
    except ValueError as error:
        raise SystemExit(f"main.py: error: {error}") from None
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    import transformers
    return {
        "data_dir": str(data_dir), "models_dir": str(models_dir),
        "text_model": str(text_model), "speech_model": str(speech_model),
        "pretrained": pretrained_files(data_dir, branches, text_model, speech_model),
        "classes": list(CLASSES), "branches": branches,
        "context_window": args.context_window, "max_text_tokens": args.max_text_tokens,
        "max_audio_tokens": args.max_audio_tokens,
        "context_width": None,  # H, read from the data by load_run_data
        "skip_missing": args.skip_missing, "left_out": [],  # names, filled by load_run_data
        "protocol": args.protocol, "val_split": args.val_split, "val_fraction": args.val_fraction,
        "val_split_description": describe_val_split(args.val_split, args.val_fraction),
        "epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "grad_accum": args.grad_accum, "lr_encoders": args.lr_encoders, "lr_head": args.lr_head,
        "weight_decay": args.weight_decay, "scheduler": args.scheduler, "warmup": args.warmup,
        "clip_norm": args.clip_norm, "class_weights": args.class_weights, "fusion_hidden": args.fusion_hidden,
        "finetune_text": not args.freeze_text, "finetune_speech": args.finetune_speech,
        "group_by_length": args.group_by_length, "seed": args.seed, "device": device, "precision": precision,
        "world_size": int(os.environ.get("WORLD_SIZE", 1)), "stop_after_epochs": args.stop_after_epochs,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def pretrained_files(data_dir, branches, text_model, speech_model):
    """Every pretrained file the run depends on, by role, with its sha256 (utils.fingerprint):
    the encoders the model loads, and the extractors that made its features (as
    DATA_DIR/features.json recorded them). predict.py checks them all before it predicts."""
    record = feature_ext.read_features_record(data_dir)
    extractors = {"text": ("text-tokens",), "speech": ("speech-tokens",), "context": ("sentence-embeddings",)}
    pretrained = {}
    for branch in branches:
        for step in extractors[branch]:
            if step not in record:
                log.warning(f"{data_dir / feature_ext.FEATURES_RECORD} does not say which models made the {step} "
                            f"features; predict.py will not be able to check them")
            pretrained.update(record.get(step, {}))
    encoders = {"text": ("text_model", "text model (--text-model)", text_model, WEIGHT_FILES),
                "speech": ("speech_model", "speech model (--speech-model)", speech_model, None)}
    for branch, (role, what, model, files) in encoders.items():
        if branch in branches:
            try:
                pretrained[role] = fingerprint(model, *([files] if files else []))
            except FileNotFoundError as error:
                raise SystemExit(f"main.py: error: {what}: {error}") from None
    return pretrained


def describe_val_split(val_split, val_fraction):
    return {
        "stratified": f"{val_fraction:.0%} of the training utterances, stratified by class",
        "speaker": "one training speaker held out (chosen by the seed)",
        "original": "the original's split: the test session's other speaker (the test session "
                    "also chooses the checkpoint)",
    }[val_split]


def write_config(run_dir, config):
    """The one place config.json is written: predict.py rebuilds the model from it."""
    write_text_atomic(Path(run_dir) / "config.json", json.dumps(config, indent=2) + "\n")


def check_resumable(run_dir, config):
    """A RUN_DIR with a config.json only resumes under the same settings."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"main.py: error: {path}: not a readable config.json ({e}); use a new RUN_DIR") from None
    old = {**ADDED_SETTINGS, **old}
    changed = sorted(k for k in set(old) | set(config) if k not in NOT_COMPARED_ON_RESUME and old.get(k) != config.get(k))
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise SystemExit(f"main.py: error: {path} was written with other settings ({details}); "
                         f"use a new RUN_DIR or the same settings to resume")
    return True


# ------------------------------------------------------------------------------------------------
# folds

def make_folds(utterances, protocol, val_split="stratified", val_fraction=0.1, seed=0):
    """-> list of {"fold", "test_sessions" | "test_speakers", "train", "val", "test"} (utterance lists)."""
    sessions = sorted({u["session"] for u in utterances})
    speakers_of = {s: sorted({u["speaker"] for u in utterances if u["session"] == s}) for s in sessions}
    if protocol == "session5":
        if 5 not in sessions:
            raise ValueError("protocol session5 needs session 5 in the data")
        tests = [("test_sessions", [5])]
    elif protocol == "loso":
        tests = [("test_sessions", [s]) for s in sessions]
    elif protocol == "speaker":
        tests = [("test_speakers", [sp]) for s in sessions for sp in speakers_of[s]]
    else:
        raise ValueError(f"unknown protocol {protocol!r}: use session5, loso or speaker")
    folds = []
    for k, (key, held_out) in enumerate(tests, 1):
        if key == "test_sessions":
            test_sessions = set(held_out)
            test = [u for u in utterances if u["session"] in test_sessions]
        else:
            test_sessions = {u["session"] for u in utterances if u["speaker"] == held_out[0]}
            test = [u for u in utterances if u["speaker"] == held_out[0]]
        pool = [u for u in utterances if u["session"] not in test_sessions]
        fold = {"fold": k, key: held_out}
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
                raise ValueError(f"fold {k}: no stratified validation share of {val_fraction:.0%} from "
                                 f"{len(pool)} utterances ({e})") from None
            train, val = sorted(train, key=lambda u: u["index"]), sorted(val, key=lambda u: u["index"])
        else:
            raise ValueError(f"unknown validation split {val_split!r}: use stratified, speaker or original")
        if not train or not val or not test:
            raise ValueError(f"fold {k} ({key} {held_out}): empty split (train {len(train)}, "
                             f"validation {len(val)}, test {len(test)})")
        fold.update(train=train, val=val, test=test)
        folds.append(fold)
    return folds


def fold_title(fold):
    if "test_sessions" in fold:
        title = "session " + ",".join(map(str, fold["test_sessions"]))
        return title + (f" ({','.join(fold['test_speakers'])})" if "test_speakers" in fold else "")
    return "speaker " + ",".join(fold["test_speakers"])


# ------------------------------------------------------------------------------------------------
# one fold

def save_checkpoint(path, state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, remedy):
    """A checkpoint this run wrote; a damaged one is an error naming the file and what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated by a full disk, overwritten, not a checkpoint at all
        raise SystemExit(f"main.py: error: {path}: unreadable checkpoint ({type(e).__name__}: "
                         f"{str(e).split('. ')[0][:200]}); {remedy}") from None


def rng_states(device, world):
    """Every process's random generators, in rank order: the CPU's and its GPU's (dropout draws
    differ between ranks, since their batches differ). Collective: every rank must call it."""
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def set_rng_state(states, rank, device):
    """Restore this rank's generators from rng_states (a run resumes with the same world size)."""
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def check_lengths(model, utterances):
    """RoBERTa's learned positions stop at max_position_embeddings - 2 (fairseq's padding offset),
    and its ids at its vocabulary's size (ids beyond it: features of another tokenizer)."""
    for branch, key in (("text", "text_ids"), ("speech", "speech_ids")):
        encoder = getattr(model, f"{branch}_encoder")
        if encoder is None:
            continue
        largest = max(int(u[key].max()) for u in utterances)
        if largest >= encoder.config.vocab_size:
            folder = "GPT2Tokens" if branch == "text" else "vqw2vTokens"
            raise SystemExit(f"main.py: error: {folder}/ holds ids up to {largest}, but the {branch} encoder's "
                             f"vocabulary has {encoder.config.vocab_size}: its features were made for another "
                             f"model (features.json says which); extract them again with this one")
        limit = encoder.config.max_position_embeddings - 2
        longest = max(len(u[key]) for u in utterances)
        if longest > limit:
            option = "MAX_TEXT_TOKENS" if branch == "text" else "MAX_AUDIO_TOKENS"
            raise SystemExit(f"main.py: error: {branch} sequences of up to {longest} tokens, but the {branch} "
                             f"encoder has positions for {limit}; set {option} to at most {limit}")


def train_fold(config, fold, utterances, run_dir, env):
    """Train one fold (resuming it if interrupted), test its best checkpoint, write its outputs."""
    fold_dir = Path(run_dir) / f"fold{fold['fold']}"
    result_path = fold_dir / "fold_result.json"
    if result_path.exists():
        log.info(f"fold {fold['fold']} ({fold_title(fold)}): already finished, kept")
        return json.loads(result_path.read_text(encoding="utf-8"))
    device, amp, rank, world = env["device"], env["amp_dtype"], env["rank"], env["world_size"]
    torch.manual_seed(config["seed"] + fold["fold"])
    model = model_structure.build_model(config)
    if rank:  # the same initial weights on every rank, but each rank its own dropout draws (as nanoGPT)
        torch.manual_seed(config["seed"] + fold["fold"] + 1_000_003 * rank)
    check_lengths(model, utterances)
    model.to(device)
    if model.speech_encoder is not None and not model.finetune_speech and "speech_vector" not in utterances[0]:
        log.info("computing the frozen speech encoder's vectors once for the whole run")
        train_function.cache_speech_vectors(model, utterances, config["eval_batch_size"], device, amp, rank, world,
                                            progress=env["progress"])
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)

    weights = None
    if config["class_weights"] == "balanced":
        weights = train_function.balanced_class_weights([u["label"] for u in fold["train"]], len(CLASSES)).to(device)
    criterion = train_function.make_criterion(weights)
    optimizer = train_function.configure_optimizer(model, config["lr_encoders"], config["lr_head"], config["weight_decay"])
    loader = dataset_loader.training_loader(fold["train"], config["batch_size"], config["seed"],
                                            config["group_by_length"], rank, world)
    steps_per_epoch = math.ceil(len(loader) / config["grad_accum"])
    scheduler = train_function.make_scheduler(optimizer, config["scheduler"], steps_per_epoch * config["epochs"],
                                              config["warmup"])
    step_scheduler = scheduler if config["scheduler"] == "linear" else None

    state = {"epoch": 0, "history": [], "best_score": -math.inf, "best_epoch": None, "best_val": None}
    last_path, best_path = fold_dir / "last.pt", fold_dir / "best.pt"
    if last_path.exists():
        checkpoint = load_checkpoint(last_path, "delete it to train this fold again from its first epoch")
        model.load_trained_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = checkpoint["state"]
        set_rng_state(checkpoint["rng"], rank, device)
        log.info(f"fold {fold['fold']}: resuming after epoch {state['epoch']} from {last_path}")
    log.info(f"fold {fold['fold']} ({fold_title(fold)}): train {len(fold['train'])}, "
             f"validation {len(fold['val'])}, test {len(fold['test'])} utterances")

    for epoch in range(state["epoch"], config["epochs"]):
        start = time.time()
        loader.batch_sampler.set_epoch(epoch)
        desc = f"fold {fold['fold']} epoch {epoch + 1}/{config['epochs']}"
        try:
            train_loss = train_function.train_epoch(
                trained, loader, criterion, optimizer, device, step_scheduler, config["grad_accum"],
                config["clip_norm"], amp, distributed=world > 1, desc=desc, progress=env["progress"])
        except train_function.NonFiniteLossError as error:
            kept = f"; the last good checkpoint is {last_path} (epoch {state['epoch']})" if last_path.exists() else \
                "; no epoch had finished, so there is no checkpoint"
            raise SystemExit(f"main.py: error: fold {fold['fold']} epoch {epoch + 1}: {error}{kept}. "
                             f"Start a new RUN_DIR with lower learning rates or --clip-norm")
        if world > 1:
            loss = torch.tensor([train_loss])
            dist.all_reduce(loss)
            train_loss = loss.item() / world
        val, _, val_loss = validation_function.evaluate(model, fold["val"], config["eval_batch_size"], device, amp,
                                                        rank, world)
        lr = max(g["lr"] for g in optimizer.param_groups)
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                                 "val_wa": val["wa"], "val_ua": val["ua"], "lr": lr})
        improved = val["ua"] > state["best_score"]
        if improved:
            state.update(best_score=val["ua"], best_epoch=epoch + 1, best_val=val)
            if rank == 0:
                save_checkpoint(best_path, {"model": model.trained_state_dict(), "epoch": epoch + 1, "fold": fold["fold"],
                                            "classes": list(CLASSES), "val": val})
        note = ""
        if config["scheduler"] == "newbob" and scheduler.step_epoch(val["ua"], model):
            note = f"  newbob: lr halved, back to epoch {state['best_epoch']}'s weights"
        state["epoch"] = epoch + 1
        rng = rng_states(device, world)
        if rank == 0:
            save_checkpoint(last_path, {"model": model.trained_state_dict(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "state": state, "rng": rng})
        if world > 1:
            dist.barrier()
        seconds = time.time() - start
        log.info(f"{desc}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  val WA {val['wa']:.4f}  "
                 f"UA {val['ua']:.4f}{' *' if improved else ''}  lr {lr:.2e}  {seconds:.1f}s "
                 f"({len(fold['train']) / seconds:.1f} utt/s){note}")
        env["epochs_run"] = env.get("epochs_run", 0) + 1
        if config["stop_after_epochs"] and env["epochs_run"] >= config["stop_after_epochs"]:
            raise RunPaused(f"stopped after epoch {epoch + 1} of fold {fold['fold']} (--stop-after-epochs); "
                            f"run the same command again to resume")

    # The test fold is seen once, with the checkpoint the validation set chose.
    model.load_trained_state_dict(load_checkpoint(best_path, "delete the fold's folder to train it again")["model"])
    test, predictions, _ = validation_function.evaluate(model, fold["test"], config["eval_batch_size"], device, amp,
                                                        rank, world)
    result = {k: fold[k] for k in ("fold", "test_sessions", "test_speakers") if k in fold}
    result.update(n_train=len(fold["train"]), n_val=len(fold["val"]), n_test=len(fold["test"]), test=test,
                  best_epoch=state["best_epoch"], val=state["best_val"], history=state["history"],
                  y_true=predictions["labels"].tolist(), y_pred=predictions["probs"].argmax(1).tolist())
    if rank == 0:
        title = f"fold {fold['fold']}: test {fold_title(fold)}"
        validation_function.write_predictions_csv(fold_dir / "predictions.csv", predictions)
        validation_function.plot_confusion_matrix(test["confusion_matrix"], fold_dir / "confusion_matrix.png",
                                                  f"{title}  UA {test['ua']:.3f}  WA {test['wa']:.3f}")
        validation_function.plot_training_curves(state["history"], fold_dir / "training_curves.png", title)
        if predictions["attention"] is not None:
            validation_function.plot_attention(predictions["attention"], predictions["labels"],
                                               fold_dir / "attention.png", f"{title}: context attention")
        write_text_atomic(result_path, json.dumps(result, indent=1) + "\n")
        last_path.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    log.info(f"fold {fold['fold']} test ({fold_title(fold)}, best epoch {state['best_epoch']}): "
             f"WA {test['wa']:.4f}  UA {test['ua']:.4f}  macro-F1 {test['macro_f1']:.4f}")
    return result


# ------------------------------------------------------------------------------------------------
# the whole run

def summarize(protocol, fold_results, val_split="stratified", left_out=()):
    """results.json: the folds' test metrics, their mean/std (population, over folds) and pooled.
    val_split says how checkpoints were chosen ("original": by the test session's other speaker);
    left_out names the labelled utterances that --skip-missing left out for lack of features."""
    folds = [{k: r[k] for k in ("fold", "test_sessions", "test_speakers", "n_train", "n_val", "n_test", "test") if k in r}
             for r in fold_results]
    metric = {k: [r["test"][k] for r in fold_results] for k in ("wa", "ua", "macro_f1", "weighted_f1")}
    pooled = validation_function.compute_metrics([y for r in fold_results for y in r["y_true"]],
                                                 [y for r in fold_results for y in r["y_pred"]])
    return {"protocol": protocol, "val_split": val_split, "left_out": list(left_out), "folds": folds, "summary": {
        "wa_mean": float(np.mean(metric["wa"])), "wa_std": float(np.std(metric["wa"])),
        "ua_mean": float(np.mean(metric["ua"])), "ua_std": float(np.std(metric["ua"])),
        "macro_f1_mean": float(np.mean(metric["macro_f1"])),
        "weighted_f1_mean": float(np.mean(metric["weighted_f1"])), "pooled": pooled}}


def results_table(results, config):
    """summary.md: one row per fold, the mean and the pooled test predictions."""
    lines = [f"# Results: {config['protocol']}, branches {'+'.join(config['branches'])}", "",
             f"Data: `{config['data_dir']}`; validation: {config['val_split_description']}; "
             f"{config['epochs']} epochs, checkpoint chosen by validation UA.", "",
             "| fold | test | train | val | test n | WA | UA | macro-F1 | weighted-F1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in results["folds"]:
        t = f["test"]
        held = fold_title(f)
        lines.append(f"| {f['fold']} | {held} | {f['n_train']} | {f['n_val']} | {f['n_test']} | {t['wa']:.4f} | "
                     f"{t['ua']:.4f} | {t['macro_f1']:.4f} | {t['weighted_f1']:.4f} |")
    s, p = results["summary"], results["summary"]["pooled"]
    lines.append(f"| mean ± std | | | | | {s['wa_mean']:.4f} ± {s['wa_std']:.4f} | {s['ua_mean']:.4f} ± "
                 f"{s['ua_std']:.4f} | {s['macro_f1_mean']:.4f} | {s['weighted_f1_mean']:.4f} |")
    lines.append(f"| pooled | all folds | | | {sum(f['n_test'] for f in results['folds'])} | {p['wa']:.4f} | "
                 f"{p['ua']:.4f} | {p['macro_f1']:.4f} | {p['weighted_f1']:.4f} |")
    recall = ", ".join(f"{c} {r:.3f}" if r is not None else f"{c} -" for c, r in p["per_class_recall"].items())
    lines += ["", f"Pooled per-class recall: {recall}. Chance UA is {1 / len(CLASSES):.2f}."]
    if results["left_out"]:
        lines += ["", f"Left out for missing features (--skip-missing): {len(results['left_out'])} labelled "
                      f"utterance(s), named in results.json."]
    return "\n".join(lines) + "\n"


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


def setup_distributed(config):
    """(rank, world size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, config["device"]
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = config["device"].startswith("cuda")
    if cuda and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"main.py: error: process {local_rank} of this node needs a GPU of its own, but torch "
                         f"sees {torch.cuda.device_count()}; start at most that many per node (--nproc_per_node)")
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


def load_run_data(config, progress=True):
    """All labelled utterances with their features, once per run; fills config['context_width']."""
    made_by = {"text": ["text-tokens"], "speech": ["speech-tokens"],
               "context": ["sentence-embeddings", f"context-{config['context_window']}"]}
    steps = [step for branch in config["branches"] for step in made_by[branch]]
    rows = read_manifest(config["data_dir"])
    stale = feature_ext.stale_features(config["data_dir"], steps, rows)
    if stale:
        raise ValueError(f"{Path(config['data_dir']) / 'utterances.csv'} lists other utterances than the "
                         f"{', '.join(stale)} features were made for (their files are named by position); "
                         f"rerun feature_extraction_main.py on it")
    missing = dataset_loader.missing_features(config["data_dir"], rows, config["context_window"], config["branches"])
    labelled = sum(1 for row in rows if row["label"])
    if missing and (not config["skip_missing"] or len(missing) == labelled):
        name, path = missing[0]
        remedy = ("run feature_extraction_main.py first" if len(missing) == labelled else
                  "rerun feature_extraction_main.py, or train and test without them with --skip-missing "
                  "(a wav or transcript that mocap_data_collect.py --allow-missing let through has none)")
        raise FileNotFoundError(f"{path}: not found ({len(missing)} of {labelled} labelled utterances miss a "
                                f"feature file); {remedy}")
    # Part of the configuration: a resumed run must leave out the same utterances.
    config["left_out"] = [name for name, _ in missing]
    utterances = dataset_loader.load_utterances(config["data_dir"], config["context_window"], config["max_text_tokens"],
                                                config["max_audio_tokens"], config["branches"], progress,
                                                exclude=set(config["left_out"]))
    if "context" in config["branches"]:
        config["context_width"] = dataset_loader.context_slice_width(utterances)
    return utterances


def run(config, run_dir):
    """Train and evaluate every fold of config['protocol'] into run_dir; -> results dict (None when paused)."""
    run_dir = Path(run_dir)
    rank, world, device = setup_distributed(config)
    # Progress bars on a terminal only: in a job's log file (nohup, SLURM) their redrawn frames
    # run together into one endless line, and the per-epoch lines say the same.
    env = {"rank": rank, "world_size": world, "device": device, "progress": rank == 0 and sys.stderr.isatty(),
           "amp_dtype": torch.bfloat16 if config["precision"] == "bf16" else None}
    try:
        utterances = load_run_data(config, env["progress"])
        folds = make_folds(utterances, config["protocol"], config["val_split"], config["val_fraction"], config["seed"])
    except (FileNotFoundError, ValueError) as error:  # bad or missing input files, named in the message
        raise SystemExit(f"main.py: error: {error}") from None
    # RUN_DIR is made only now: a run refused for its inputs leaves nothing behind to block the next.
    resuming = check_resumable(run_dir, config)
    setup_logging(run_dir, rank)
    if rank == 0:
        write_config(run_dir, config)
    log.info(f"{'resuming' if resuming else 'starting'} run {run_dir}: {len(utterances)} labelled utterances, "
             f"branches {'+'.join(config['branches'])}, protocol {config['protocol']}, device {device}"
             f"{f' x {world} processes' if world > 1 else ''}, {config['precision']}")
    if config["left_out"]:
        log.warning(f"--skip-missing: left out {len(config['left_out'])} labelled utterance(s) without features: "
                    f"{', '.join(config['left_out'][:10])}{', ...' if len(config['left_out']) > 10 else ''}")
    try:
        fold_results = [train_fold(config, fold, utterances, run_dir, env) for fold in folds]
    except RunPaused as pause:
        log.info(str(pause))
        return None
    results = summarize(config["protocol"], fold_results, config["val_split"], config["left_out"])
    table = results_table(results, config)
    if rank == 0:
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(run_dir / "summary.md", table)
        log.info("\n" + table)
        log.info(f"wrote {run_dir / 'results.json'} and {run_dir / 'summary.md'}")
    return results


# ------------------------------------------------------------------------------------------------
# the demo

def run_demo(args, dialogues_per_session=4, utterances_per_dialogue=20):
    """Every stage of the pipeline on the synthetic corpus, with tiny models, into RUN_DIR.

    RUN_DIR/corpus (IEMOCAP-shaped), RUN_DIR/data (DATA_DIR), RUN_DIR/models (MODELS_DIR), then
    the run's own outputs in RUN_DIR as for any run. Stages whose outputs exist are not redone,
    so a rerun resumes like any run.
    """
    import feature_extraction_main
    import mocap_data_collect
    import synthetic_iemocap
    import tiny_models

    start = time.time()
    # The demo's models are tiny: one thread is as fast as two, while two threads per process
    # contending with other work on a shared 2-core machine ran 10-20x slower (measured).
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir or "demo_run")
    corpus, data_dir, models_dir = run_dir / "corpus", run_dir / "data", run_dir / "models"
    print(f"[1/5] synthetic IEMOCAP-shaped corpus -> {corpus}")
    if not (corpus / synthetic_iemocap.TRUTH_FILE).is_file():
        synthetic_iemocap.make_corpus(corpus, DEMO_CORPUS_SEED, dialogues_per_session, utterances_per_dialogue)
    print(f"[2/5] manifest, transcripts and audio (mocap_data_collect) -> {data_dir}")
    rows = mocap_data_collect.collect(corpus, data_dir, progress=False)
    print(f"[3/5] tiny stand-ins for the pretrained models -> {models_dir}")
    wanted = ("bert-base-uncased", "roberta-large", "vq-wav2vec_kmeans.pt", "bert_kmeans/bert_kmeans.pt")
    if not all((models_dir / name).exists() for name in wanted):
        wavs = [p for p in (data_dir / "Audio" / f"{row['name']}.wav" for row in rows) if p.is_file()]
        tiny_models.make_tiny_models(models_dir, [row["transcript"] for row in rows], wavs, seed=DEMO_CORPUS_SEED)
    print("[4/5] features: speech tokens, text tokens, sentence embeddings, "
          f"context vectors c={args.context_window} (feature_extraction_main)")
    reports = feature_extraction_main.extract_features(data_dir, models_dir, contexts=[args.context_window],
                                                       progress=False)
    print(feature_ext.format_summary(reports))
    if not all(report.ok for report in reports):
        raise SystemExit("main.py: error: feature extraction failed for the demo corpus (see above)")
    print("[5/5] training and evaluation")
    args.data_dir, args.models_dir = str(data_dir), str(models_dir)
    results = run(resolve_config(args), run_dir)
    if results is not None:
        s = results["summary"]
        print(f"demo finished in {time.time() - start:.0f} s: test UA {s['ua_mean']:.3f}, WA {s['wa_mean']:.3f} "
              f"(chance UA 0.25); everything is in {run_dir}")
    return results


# ------------------------------------------------------------------------------------------------
# command line

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except the empty ones (None, off) that the help text explains."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser():
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
    p.add_argument("max_text_tokens", nargs="?", type=int, default=MAX_TEXT_TOKENS,
                   help="text RoBERTa tokens kept per utterance, </s> last")
    p.add_argument("max_audio_tokens", nargs="?", type=int, default=MAX_AUDIO_TOKENS,
                   help="speech RoBERTa tokens (vq-wav2vec frames + 2) kept per utterance, </s> last")
    p.add_argument("--demo", action="store_true",
                   help="make the synthetic corpus and tiny models in RUN_DIR (default demo_run) and run every stage")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="epochs per fold")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process, per micro-batch")
    p.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"],
                   help="batch size for validation, test and the frozen-speech cache")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per optimizer step")
    p.add_argument("--lr-encoders", type=float, default=d["lr_encoders"], help="learning rate of the pretrained RoBERTas")
    p.add_argument("--lr-head", type=float, default=d["lr_head"], help="learning rate of the new layers")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW's, on weight matrices only")
    p.add_argument("--scheduler", choices=("linear", "newbob"), default=d["scheduler"],
                   help="linear: warm-up then linear decay; newbob: halve the rate and restore the best weights "
                        "when validation UA improves by less than 0.001")
    p.add_argument("--warmup", type=float, default=d["warmup"], help="share of the steps to warm up (linear)")
    p.add_argument("--clip-norm", type=float, default=d["clip_norm"], help="gradient norm clipping (0: off)")
    p.add_argument("--class-weights", choices=("none", "balanced"), default=d["class_weights"],
                   help="balanced: weigh the loss by inverse class frequency in the training set")
    p.add_argument("--fusion-hidden", type=int, default=d["fusion_hidden"], help="width of the fusion layer")
    p.add_argument("--branches", default=d["branches"], help="any subset of text,speech,context")
    p.add_argument("--finetune-speech", action="store_true", default=d["finetune_speech"],
                   help="train the speech RoBERTa too (frozen otherwise, and its vectors computed once)")
    p.add_argument("--freeze-text", action="store_true", default=d["freeze_text"],
                   help="keep the text RoBERTa frozen (fine-tuned otherwise)")
    p.add_argument("--text-model", default=None,
                   help="text RoBERTa folder or name (default: MODELS_DIR/roberta-large if present, else roberta-large)")
    p.add_argument("--speech-model", default=None,
                   help="speech RoBERTa checkpoint (default: MODELS_DIR/bert_kmeans/bert_kmeans.pt)")
    p.add_argument("--protocol", choices=("session5", "loso", "speaker"), default=d["protocol"],
                   help="session5: train on sessions 1-4, test on 5; loso: 5 folds, one session each; "
                        "speaker: 10 folds, one speaker each")
    p.add_argument("--val-split", choices=("stratified", "speaker", "original"), default=d["val_split"],
                   help="validation from the training sessions: stratified share or one held-out speaker; "
                        "original: the test session's other speaker (the original's split)")
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
    p.add_argument("--stop-after-epochs", type=int, default=0,
                   help="stop (resumably) after this many epochs in this invocation, e.g. for job time limits; "
                        "0: run to the end")
    return p


def parse_args(argv=None, parser=None):
    parser = parser or build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--demo" in argv:  # the demo's own defaults; options given still override them
        parser.set_defaults(**DEMO)
    return parser.parse_args(argv)


def check_options(args, parser):
    """Numbers that would crash a run later, or quietly train something else than asked."""
    at_least = {"--epochs": (args.epochs, 1), "--batch-size": (args.batch_size, 1),
                "--eval-batch-size": (args.eval_batch_size, 1), "--grad-accum": (args.grad_accum, 1),
                "--fusion-hidden": (args.fusion_hidden, 1), "CONTEXT_WINDOW": (args.context_window, 1),
                "MAX_TEXT_TOKENS": (args.max_text_tokens, 2), "MAX_AUDIO_TOKENS": (args.max_audio_tokens, 2),
                "--seed": (args.seed, 0), "--stop-after-epochs": (args.stop_after_epochs, 0),
                "--clip-norm": (args.clip_norm, 0), "--weight-decay": (args.weight_decay, 0)}
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


def main(argv=None):
    parser = build_parser()
    args = parse_args(argv, parser)
    check_options(args, parser)
    if args.demo:
        if args.data_dir or args.models_dir:
            parser.error("--demo takes only RUN_DIR: it makes its own data and models")
        return run_demo(args)
    if not (args.run_dir and args.data_dir and args.models_dir):
        parser.error("RUN_DIR, DATA_DIR and MODELS_DIR are required (or --demo)")
    config = resolve_config(args)
    try:
        return run(config, args.run_dir)
    except OSError as e:  # a file or folder that can't be read or written (read-only, not a folder, ...)
        if e.filename is None:
            raise
        raise SystemExit(f"main.py: error: {e.filename}: {e.strerror}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a traceback would read as a crash; nothing finished is lost
        print("main.py: interrupted: run the same command again to resume from the last finished epoch", file=sys.stderr)
        sys.exit(130)
