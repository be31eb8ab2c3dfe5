"""A run, start to end: its data loaded once, its settings resolved once, every fold of its protocol
(and seed) trained and tested, its results written; under torchrun, one process per device.

  train_and_test(options)   main.py's parsed command line -> the run's results (None when paused)
  run(settings, ...)        every fold of settings.protocol (per seed) into RUN_DIR
  run_fold(...)             one fold: trained (or resumed), its best checkpoint tested once
"""
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmser.data_contract import (BRANCHES, TEXT_STEPS, DataError, branch_steps, check_attribute_values, label_set,
                                 read_attributes, read_classes, read_manifest, read_withheld, stale_features)
from mmser.distributed import setup_distributed
from mmser.protocols import fold_title, make_folds
from mmser.reporting import METRICS, counted, write_results
from mmser.run_folder import check_resumable, check_run_dir, setup_logging, write_config
from mmser.run_inputs import (resolve_device, resolve_settings, resolve_token_limits, resolve_transcripts,
                              speech_encoder_of, text_encoder_settings)
from mmser.speech.routes import speech_models
from mmser.settings import DEFAULT_FOLD_BY, DEFAULTS, RunEnv, RunError, parse_branches
from mmser.targets import Target, one_vs_rest_metrics, target_of
from mmser.utils import cpu_has_native_bf16, set_threads, write_text_atomic

log = logging.getLogger("main")  # the run's log (RUN_DIR/train.log)


# ------------------------------------------------------------------------------------------------
# the run's data and configuration, resolved once

@dataclass
class RunData:
    """The utterances a run trains and tests on, with what the data decides of its settings."""

    utterances: list
    classes: list  # the labels the manifest has, in the order of DATA_DIR's label set (classes.json)
    left_out: list  # names that --skip-missing left out for lack of a feature file
    context_width: int = None  # H of the context vectors, read from the data
    first_metric: str = None  # the metric the corpus's papers report first (classes.json), if not UA/WA
    attributes: dict = None  # {attribute: [low, high]} the target regresses (classes.json), None for the classes
    withheld: list = None  # the partitions whose labels the corpus withholds, loaded to be predicted (official)


def run_rows(rows, target, attribute_utterances=DEFAULTS.attribute_utterances, withheld=()):
    """The manifest rows a run reads: the labelled ones; with a target that has attributes and --attribute-
    utterances rated, every row with an attribute value too (IEMOCAP's 10039, MSP-Podcast's X and O rows);
    and the rows of the withheld partitions (official protocol: predicted, never scored)."""
    rated = attribute_utterances == "rated" and target.num_attributes
    return [row for row in rows if row["label"] or row.get("split") in withheld
            or (rated and np.isfinite(target.row_values(row)).any())]


def load_run_data(data_dir, branches, context_window, max_text_tokens, max_audio_tokens, skip_missing, progress=True,
                  models=None, transcripts=None, speech_route=None, target=DEFAULTS.target,
                  attribute_utterances=DEFAULTS.attribute_utterances, official=False):
    """All the utterances the run reads (run_rows) with the features `branches` need, read once per run
    (models: the run's non-default text and sentence models, data_contract.text_models, and the speech
    route's step, mmser.speech.routes.speech_models; transcripts: the transcript set of the text features;
    speech_route: the speech branch's, see dataset_loader.load_utterances; target: --target, with the
    attributes the corpus rates (classes.json); official: the withheld partitions are read too)."""
    from mmser import dataset_loader
    rows = read_manifest(data_dir)
    steps = [step for branch in branches for step in branch_steps(branch, context_window, models, transcripts)]
    stale = stale_features(data_dir, steps, rows)
    if stale:
        raise RunError(f"{Path(data_dir) / 'utterances.csv'} lists other utterances than the {', '.join(stale)} "
                       f"features were made for (their files are named by position); rerun "
                       f"feature_extraction_main.py on it")
    classes = label_set(rows, read_classes(data_dir))
    if len(classes) < 2 and target != "dimensional":
        raise RunError(f"{Path(data_dir) / 'utterances.csv'}: labelled utterances of {len(classes)} class(es) "
                       f"({', '.join(classes) or 'none'}); a classifier needs at least two")
    scales = read_attributes(data_dir, rows) if target != "categorical" else {}
    if target != "categorical" and not scales:
        raise RunError(f"{Path(data_dir) / 'classes.json'}: the corpus rates no attribute (valence, arousal, "
                       f"dominance); --target {target} needs them (IEMOCAP's manifest, MSP-Podcast, or a CSV corpus "
                       f"with those columns)")
    check_attribute_values(data_dir, rows, scales)
    run_target = Target(target, classes, scales)
    withheld = read_withheld(data_dir) if official else []
    wanted = run_rows(rows, run_target, attribute_utterances, withheld)
    missing = dataset_loader.missing_features(data_dir, wanted, context_window, branches, models, transcripts,
                                              speech_route)
    if missing and (not skip_missing or len(missing) == len(wanted)):
        name, path = missing[0]
        remedy = ("run feature_extraction_main.py first" if len(missing) == len(wanted) else
                  "rerun feature_extraction_main.py, or train and test without them with --skip-missing "
                  "(a wav or transcript that mocap_data_collect.py --allow-missing let through has none)")
        if any(not row["label"] for row in wanted):  # rated or withheld rows: their audio is written on request
            remedy += ("; the speech features of utterances without a label need their audio: collect with "
                       "--all-audio, then extract again")
        what = "labelled utterances" if len(wanted) == sum(bool(r["label"]) for r in rows) else "utterances the run reads"
        raise RunError(f"{path}: not found ({len(missing)} of {len(wanted)} {what} miss a feature file); "
                       f"{remedy}")
    left_out = [name for name, _ in missing]
    rows = [row for row in wanted if row["name"] not in set(left_out)]
    utterances = dataset_loader.load_utterances(data_dir, context_window, max_text_tokens, max_audio_tokens, branches,
                                                progress, rows, classes, models, transcripts, speech_route,
                                                run_target)
    width = dataset_loader.context_slice_width(utterances) if "context" in branches else None
    attributes = {a: scale.as_list() for a, scale in run_target.attributes.items()} or None
    return RunData(utterances, classes, left_out, width, read_first_metric(data_dir), attributes,
                   sorted({u["split"] for u in utterances if u.get("split") in withheld}))


def read_first_metric(data_dir):
    """classes.json's "first_metric" (MELD: weighted_f1), or None: IEMOCAP's UA and WA."""
    path = Path(data_dir) / "classes.json"
    metric = json.loads(path.read_text(encoding="utf-8")).get("first_metric") if path.is_file() else None
    if metric not in (None, "wa", "ua", "macro_f1", "weighted_f1"):
        raise RunError(f"{path}: first_metric {metric!r} is not one of wa, ua, macro_f1, weighted_f1")
    return metric


def features_of_test_transcripts(settings, data, sets, env, models=None):
    """With --test-transcripts other than --transcripts: {name: the text features of the test set} for
    every utterance the run has (run() predicts the test folds from them); None otherwise."""
    text_branches = [b for b in settings.branches if any(step in TEXT_STEPS for step in BRANCHES[b].steps)]
    if sets["train"] == sets["test"] or not text_branches:
        return None
    test_data = load_run_data(Path(settings.data_dir), text_branches, settings.context_window, settings.max_text_tokens,
                              settings.max_audio_tokens, settings.skip_missing, env.progress, models, sets["test"],
                              target=settings.target, attribute_utterances=settings.attribute_utterances,
                              official=settings.protocol == "official")
    if [u["name"] for u in test_data.utterances] != [u["name"] for u in data.utterances]:
        raise RunError(f"the {sets['test'] or 'reference'} transcripts' features leave out other utterances than the "
                       f"{sets['train'] or 'reference'} ones' (--skip-missing); make both sets' features complete")
    if test_data.context_width != data.context_width:
        raise RunError(f"context vectors of width {test_data.context_width} in the test transcripts' set, "
                       f"{data.context_width} in the training set's: make both with one sentence model")
    return {u["name"]: {BRANCHES[b].key: u[BRANCHES[b].key] for b in text_branches} for u in test_data.utterances}


def run_fold(settings, fold, utterances, run_dir, env, budget, test_inputs=None):
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
    model, state = train_function.train_fold(settings, fold, utterances, fold_dir, env, budget)
    target = target_of(settings)
    # The test fold is seen once, with the checkpoint the validation set chose.
    # The training set's utterances, speech vectors cached, with the other transcript set's text features.
    tested = fold["test"] if test_inputs is None else [{**u, **test_inputs[u["name"]]} for u in fold["test"]]
    loss_fn = train_function.make_target_criterion(target, None, settings.loss, settings.attribute_loss,
                                                   settings.attribute_weight) if target.num_attributes else None
    test, predictions, _ = validation_function.evaluate(model, tested, settings.eval_batch_size, env.device,
                                                        settings.classes, env.amp_dtype, env.rank,
                                                        env.world_size, loss_fn=loss_fn, target=target)
    if settings.one_vs_rest:  # Siriwardhana et al.'s per-emotion binary scores, beside ours (labelled utterances)
        known = predictions["labels"] >= 0
        test.update(one_vs_rest_metrics(predictions["labels"][known],
                                                            predictions["probs"].argmax(1)[known], settings.classes))
    result = {k: fold[k] for k in fold if k == "fold" or k.startswith("test_")}
    result.update(n_train=len(fold["train"]), n_val=len(fold["val"]), n_test=len(fold["test"]), test=test,
                  best_epoch=state["best_epoch"], val=state["best_val"], history=state["history"])
    if target.num_classes:
        result.update(y_true=predictions["labels"].tolist(), y_pred=predictions["probs"].argmax(1).tolist())
    if target.num_attributes:  # on the corpus's scale, for the pooled figures (None: unknown)
        result.update(attributes_true=_json_values(predictions["attributes_true"]),
                      attributes_pred=_json_values(target.values(predictions["attribute_outputs"])))
    if model.speech_layer_sum is not None:  # which layers carry emotion: saved and drawn per fold
        result["speech_layer_weights"] = model.speech_layer_sum.layer_weights().tolist()
    withheld = {split: validation_function.predict(model, us, settings.eval_batch_size, env.device, env.amp_dtype,
                                                   env.rank, env.world_size)
                for split, us in fold.get("withheld", {}).items()}
    if env.rank == 0:
        validation_function.write_fold_reports(fold_dir, predictions, test, state["history"], settings.classes,
                                               f"fold {fold['fold']}: test {fold_title(fold)}", state["best_epoch"],
                                               target, settings.select_by)
        if predictions["attention"] is not None:
            result["attention"] = validation_function.attention_means(predictions["attention"], predictions["labels"],
                                                                      target.num_classes)
        if "speech_layer_weights" in result:
            validation_function.plot_layer_weights(result["speech_layer_weights"], fold_dir / "speech_layers.png",
                                                   f"fold {fold['fold']}: {Path(settings.speech_model).name}")
        for split, predicted in withheld.items():  # predicted, never scored: the challenge's submission files
            files = write_submission(fold_dir, split, fold["withheld"][split], predicted, target, settings.data_dir)
            result.setdefault("withheld", {})[split] = {"n": len(fold["withheld"][split]),
                                                        "files": [f"fold{fold['fold']}/{f}" for f in files]}
        write_text_atomic(result_path, json.dumps(result, indent=1) + "\n")
        (fold_dir / "last.pt").unlink(missing_ok=True)
    if env.world_size > 1:
        import torch.distributed as dist
        dist.barrier()
    log.info(f"fold {fold['fold']} test ({fold_title(fold)}, best epoch {state['best_epoch']}): "
             f"{test_figures(settings, target, test)}")
    return result


def test_figures(settings, target, test):
    """A fold's test figures for the log: the corpus's first metric, WA, UA and macro-F1 (the classes);
    CCC per attribute and their mean (the attributes)."""
    parts = []
    if target.num_classes:
        first = settings.first_metric if settings.first_metric in ("weighted_f1", "macro_f1") else None
        parts.append((f"{METRICS[first]} {test[first]:.4f}  " if first == "weighted_f1" else "")
                     + f"WA {test['wa']:.4f}  UA {test['ua']:.4f}  macro-F1 {test['macro_f1']:.4f}")
    if target.num_attributes:
        parts.append("CCC " + " ".join(f"{a} {test[f'{a}_ccc']:.4f}" for a in target.attributes)
                     + f" mean {test['ccc']:.4f}")
    return "  ".join(parts)


def _json_values(array):
    """An (n, attributes) array as JSON lists, NaN (unknown) as null."""
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(array, dtype=np.float64)]


def write_submission(fold_dir, split, utterances, predicted, target, data_dir):
    """A withheld partition's predictions in the challenge's submission format (classes.json "submission":
    the release's file-name column and its class and attribute columns, MSP-Podcast's FileName, EmoClass,
    EmoAct, EmoVal, EmoDom; without it: utterance_id, class and the attributes by their names): one file for
    the classes (submission_<split>_categorical.csv, the class by the corpus's own code where classes.json
    gives "codes") and one for the attributes (submission_<split>_attributes.csv, clipped to each attribute's
    scale, as the challenge's site takes them). -> the files' names."""
    import csv
    import io
    record = json.loads((Path(data_dir) / "classes.json").read_text(encoding="utf-8")) \
        if (Path(data_dir) / "classes.json").is_file() else {}
    form = record.get("submission", {})
    file_column, suffix = form.get("file", ["utterance_id", ""])
    codes = record.get("codes", {})
    ids = [u.get("utterance_id", u["name"]) + suffix for u in utterances]
    files = []
    if target.num_classes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([file_column, form.get("class", "emotion")])
        guesses = predicted["probs"].argmax(1)
        writer.writerows([i, codes.get(target.classes[k], target.classes[k])] for i, k in zip(ids, guesses))
        files.append(f"submission_{split}_categorical.csv")
        write_text_atomic(Path(fold_dir) / files[-1], buffer.getvalue())
    if target.num_attributes:
        columns = form.get("attributes", {a: a for a in target.attributes})
        order = [a for a in columns if a in target.attributes]
        values = target.values(predicted["attribute_outputs"])
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([file_column] + [columns[a] for a in order])
        for i, row in zip(ids, values):
            clipped = {a: min(max(v, scale.low), scale.high) for (a, scale), v in zip(target.attributes.items(), row)}
            writer.writerow([i] + [f"{clipped[a]:.6f}" for a in order])
        files.append(f"submission_{split}_attributes.csv")
        write_text_atomic(Path(fold_dir) / files[-1], buffer.getvalue())
    return files


def run(settings, run_dir, utterances, env, test_inputs=None):
    """Train and evaluate every fold of settings.protocol into run_dir; -> results dict (None when paused).
    test_inputs: {name: text features} of another transcript set, which the test utterances are
    predicted from instead (--test-transcripts)."""
    from mmser.train_function import EpochBudget, RunPaused
    run_dir, rank, world = Path(run_dir), env.rank, env.world_size
    seeds = settings.seeds
    # One pass of the protocol per seed (--seeds), each in its own subfolder, or one with --seed.
    passes = [(seed, run_dir / f"seed{seed}") for seed in seeds] if seeds else [(settings.seed, run_dir)]
    # The official protocol predicts the partitions whose labels the corpus withholds (load_run_data read them).
    withheld = read_withheld(settings.data_dir) if settings.protocol == "official" else []
    folds = {seed: make_folds(utterances, settings.protocol, settings.val_split, settings.val_fraction, seed,
                              settings.fold_by or DEFAULT_FOLD_BY, settings.test_set, withheld)
             for seed, _ in passes}
    # RUN_DIR is made only now: a run refused for its inputs leaves nothing behind to block the next.
    resuming = check_resumable(run_dir, settings)
    setup_logging(run_dir, rank)
    if rank == 0:
        write_config(run_dir, settings)
    unlabelled = sum(u["label"] < 0 for u in utterances)
    log.info(f"{'resuming' if resuming else 'starting'} run {run_dir}: {len(utterances) - unlabelled} labelled utterances"
             f"{f' and {unlabelled} without a label (their attributes, or a withheld partition)' if unlabelled else ''}, "
             f"branches {'+'.join(settings.branches)}, protocol {settings.protocol}, device {env.device}"
             f"{f' x {world} processes' if world > 1 else ''}, {settings.precision}")
    for note in env.notes:
        log.info(note)
    if env.device == "cpu" and settings.precision == "bf16" and not cpu_has_native_bf16():
        log.warning("--precision bf16 on a CPU without bf16 instructions: torch emulates bf16 here, which runs "
                    "slower than fp32 (benchmarks/: a 2048x2048 product at about 1 GFLOP/s on an AVX2-only EPYC)")
    if settings.left_out:
        log.warning(f"--skip-missing: left out {len(settings.left_out)} labelled utterance(s) without features: "
                    f"{', '.join(settings.left_out[:10])}{', ...' if len(settings.left_out) > 10 else ''}")
    budget = EpochBudget(settings.stop_after_epochs)  # over every fold and seed of this invocation
    try:
        fold_results = []
        for seed, seed_dir in passes:
            if seeds:
                log.info(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) -> {seed_dir}")
                if rank == 0:  # each seed's folder is a run folder of its own, e.g. for predict.py
                    seed_dir.mkdir(parents=True, exist_ok=True)
                    write_config(seed_dir, settings.replace(seed=seed, seeds=None))
            seed_results = [run_fold(settings.replace(seed=seed), fold, utterances, seed_dir, env, budget, test_inputs)
                            for fold in folds[seed]]
            if seeds:  # the seed's own results.json and summary.md: its folder is a finished run too
                finish_run(settings.replace(seed=seed, seeds=None), seed_results, seed_dir, rank, show=False)
            fold_results += [{"seed": seed, **result} for result in seed_results] if seeds else seed_results
    except RunPaused as pause:
        log.info(str(pause))
        return None
    return finish_run(settings, fold_results, run_dir, rank)


def finish_run(settings, fold_results, run_dir, rank, show=True):
    """The run's figures over all its folds (rank 0: the context attention pooled over every fold and
    seed), then results.json and summary.md (reporting.write_results), the mark of a finished run. -> results."""
    from mmser import validation_function
    attention = [r["attention"] for r in fold_results if r.get("attention")]
    if rank == 0 and attention:
        seeds = settings.seeds
        over = counted(len(attention) // len(seeds or [0]), "fold") + (f" x {len(seeds)} seeds" if seeds else "")
        validation_function.plot_pooled_attention(attention, run_dir / "attention_pooled.png",
                                                  f"context attention, pooled over {over}", target_of(settings).classes)
    return write_results(settings, fold_results, run_dir, rank, show)


def train_and_test(options, run_dir_checked=False):
    """Everything after main.py checked the options: load the data, resolve the settings once, run.
    (The demo checks its RUN_DIR itself, before it writes its corpus there: run_dir_checked.)"""
    data_dir = Path(options.data_dir)
    if not (data_dir / "utterances.csv").is_file():
        raise RunError(f"{data_dir / 'utterances.csv'}: not found; DATA_DIR is the folder mocap_data_collect.py "
                       f"and the feature extraction wrote")
    if not run_dir_checked:
        check_run_dir(options.run_dir, options.data_dir, options.models_dir)
    import torch  # after the checks that need no model: they answer at once

    from mmser.train_function import TrainingError
    branches = parse_branches(options.branches)
    device, precision = resolve_device(options)
    set_threads(options.threads)
    rank, world, device = setup_distributed(device)
    limits, notes = resolve_token_limits(options, branches)
    # Progress bars on a terminal only: in a job's log file (nohup, SLURM) their redrawn frames
    # run together into one endless line, and the per-epoch lines say the same.
    env = RunEnv(rank, world, device, progress=rank == 0 and sys.stderr.isatty(),
                 amp_dtype=torch.bfloat16 if precision == "bf16" else None, notes=tuple(notes))
    speech_model, speech_route = speech_encoder_of(options, branches)
    try:
        models = {**text_encoder_settings(options, branches), **speech_models(speech_model)}
        asr = resolve_transcripts(options)
        sets = asr["sets"] if asr else {"train": None, "test": None}
        data = load_run_data(data_dir, branches, options.context_window, limits["max_text_tokens"],
                             limits["max_audio_tokens"], options.skip_missing, env.progress, models, sets["train"],
                             speech_route, options.target, options.attribute_utterances, options.protocol == "official")
        # the attributes a target regresses, with their scales, are the data's (classes.json), as its classes
        settings = resolve_settings(options, data, device, precision, limits, models, asr).replace(
            attributes=data.attributes)
        return run(settings, options.run_dir, data.utterances, env,
                   features_of_test_transcripts(settings, data, sets, env, models))
    except (DataError, TrainingError) as error:  # a user's file or setting, named in the message
        raise RunError(str(error)) from None
    except (RunError, KeyboardInterrupt):
        raise
    except Exception:  # a bug, CUDA out of memory, ...: its traceback goes to train.log too
        if log.handlers:
            log.exception("the run stopped on an unexpected error")
        raise
