"""Reporting a run: the metrics' names, their spread over folds and seeds, results.json and summary.md.

  METRICS            every metric a table shows, in order, with its printed name: the classes' (WA, UA,
                     macro-F1, weighted-F1) and the attributes' (CCC, Pearson r, MAE per attribute and their
                     means); compare_runs.py, the log, the history and the tested checkpoint's choice read it
  run_metrics(...)   the metrics a run of a target reports, in METRICS' order
  SELECT_BY          --select-by: which validation figure chooses the tested checkpoint
  summarize(...)     results.json: per-fold test metrics, their mean and sample std, the pooled predictions
  results_table(...) summary.md
  write_results(...) both files (the runner draws the context attention pooled over the folds)
"""
import json
import logging

import numpy as np

from mmser.dimensional import ATTRIBUTES
from mmser.protocols import fold_title
from mmser.settings import DEFAULTS
from mmser.utils import write_text_atomic

log = logging.getLogger("main")  # the run's log (RUN_DIR/train.log)

# The metrics targets.compute_metrics reports for every split (the classes'), then those of
# targets.flat_attribute_metrics (the attributes': each score's mean over the attributes, then per
# attribute), in the order the tables show them, with the names they print.
CLASS_METRICS = {"wa": "WA", "ua": "UA", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1"}
ATTRIBUTE_METRICS = {}
for _key, _name in (("ccc", "CCC"), ("pearson", "Pearson r"), ("mae", "MAE")):
    ATTRIBUTE_METRICS[_key] = f"mean {_name}"
    ATTRIBUTE_METRICS.update({f"{a}_{_key}": f"{a} {_name}" for a in ATTRIBUTES})
METRICS = {**CLASS_METRICS, **ATTRIBUTE_METRICS}
# Where a lower figure is the better one (the rest: higher is better).
LOWER_IS_BETTER = tuple(k for k in ATTRIBUTE_METRICS if k.endswith("mae"))
# --select-by: the validation figure that chooses the tested checkpoint (a METRICS key, or keys whose mean
# chooses, higher is better; None: the validation loss, lower is better, or the last epoch), and how
# summary.md says so. A target's own default: settings.SELECT_BY_OF_TARGET.
SELECT_BY = {"val_ua": ("ua", "checkpoint chosen by validation UA"),
             "val_weighted_f1": ("weighted_f1", "checkpoint chosen by validation weighted F1"),
             "val_ccc": ("ccc", "checkpoint chosen by validation mean CCC"),
             "val_ua_ccc": (("ua", "ccc"), "checkpoint chosen by the mean of validation UA and mean CCC"),
             "val_loss": (None, "checkpoint chosen by validation loss"),
             "last": (None, "the last epoch's weights tested")}


def run_metrics(target="categorical", attributes=ATTRIBUTES):
    """The METRICS keys a run of `target` reports for every split, in METRICS' order (attributes: the
    attributes it regresses)."""
    keys = list(CLASS_METRICS) if target != "dimensional" else []
    if target != "categorical":
        keys += [k for k in ATTRIBUTE_METRICS if k in ("ccc", "pearson", "mae") or k.split("_")[0] in attributes]
    return keys


def table_metrics(target="categorical", attributes=ATTRIBUTES):
    """summary.md's columns: the classes' four; the attributes' CCC each and their mean, then the mean Pearson
    r and MAE (the rest is in the pooled table per attribute); for both, the classes' and the CCCs."""
    keys = list(CLASS_METRICS) if target != "dimensional" else []
    if target != "categorical":
        keys += [f"{a}_ccc" for a in ATTRIBUTES if a in attributes] + ["ccc"]
        keys += ["pearson", "mae"] if target == "dimensional" else []
    return keys


def selects_by(select_by, target):
    """Whether --select-by's figure is one a run of `target` reports (the loss and the last epoch always are)."""
    metric = SELECT_BY[select_by][0]
    return all(m in run_metrics(target) for m in (metric if isinstance(metric, tuple) else (metric,) if metric else ()))


def selection_score(select_by, val, val_loss, epoch):
    """The score --select-by keeps the highest of: a validation metric (or the mean of several), minus the
    validation loss, or the epoch (the last one wins)."""
    metric = SELECT_BY[select_by][0]
    if isinstance(metric, tuple):
        return float(np.mean([val[m] for m in metric]))
    if metric is not None:
        return val[metric]
    return -val_loss if select_by == "val_loss" else epoch


def counted(n, word):
    """1 fold, 2 folds."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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


def summarize(protocol, fold_results, classes, val_split=DEFAULTS.val_split, left_out=(), seeds=None, target=None):
    """results.json: the folds' test metrics (with each fold's best epoch and validation metrics),
    their mean and sample std (ddof 1) over folds, and the metrics of all test predictions pooled.
    With `seeds` (fold_results then holds every seed's folds, each with its "seed"), the mean and
    sample std over seeds of each seed's fold mean, and over all fold x seed results, are added.
    val_split says how checkpoints were chosen ("original": by the test session's other speaker);
    left_out names the labelled utterances that --skip-missing left out for lack of features;
    target (targets.Target; None: the classes) what was scored: the attributes are pooled from each
    fold's attributes_true and attributes_pred."""
    from mmser.targets import compute_metrics
    # what the fold held out (test_sessions, test_speakers, test_group, ...), then its figures
    folds = [{k: r[k] for k in ("seed", "fold", *[k for k in r if k.startswith("test_")], "n_train", "n_val",
                                 "n_test", "test", "best_epoch", "val", "withheld") if k in r} for r in fold_results]
    pooled = {}
    if target is None or target.num_classes:
        y_true = np.array([y for r in fold_results for y in r["y_true"]], dtype=np.int64)
        y_pred = np.array([y for r in fold_results for y in r["y_pred"]], dtype=np.int64)
        known = y_true >= 0  # an utterance trained and scored on its attributes only has no label
        pooled = compute_metrics(y_true[known].tolist(), y_pred[known].tolist(), classes)
    if target is not None and target.num_attributes:
        from mmser.targets import flat_attribute_metrics
        true, pred = (np.array([v for r in fold_results for v in r[key]], dtype=np.float64)
                      for key in ("attributes_true", "attributes_pred"))
        pooled.update(flat_attribute_metrics(pred, true, list(target.attributes)))
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


def _with_spread(mean, std):
    """A mean, with its spread only where there is one (no "± 0.0000" for a single fold)."""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def results_table(results, settings):
    """summary.md: one row per fold, the mean (± sample std where there is a spread) and the pooled
    test predictions; with --seeds, a row per seed too. A dimensional run shows CCC first, with the
    pooled figures per attribute beneath."""
    target, attributes = settings.target, list(settings.attributes or ())
    metrics = table_metrics(target, attributes)
    select = SELECT_BY[settings.select_by][1]
    recipe = f"; recipe `{settings.recipe}`" if settings.recipe else ""
    early = (f" at most (a fold stops after {settings.patience} without a lower validation loss)"
             if settings.patience else "")
    lines = [f"# Results: {settings.protocol}, branches {'+'.join(settings.branches)}{recipe}", ""]
    s, p = results["summary"], results["summary"]["pooled"]
    if target != "categorical":  # the headline of a dimensional run
        lines += ["**CCC " + ", ".join(f"{a} {p[f'{a}_ccc']:.4f}" for a in attributes) + f", mean {p['ccc']:.4f}** "
                  f"(pooled test predictions; mean over folds {s['ccc_mean']:.4f}), Pearson r {p['pearson']:.4f}, "
                  f"MAE {p['mae']:.4f} (on the corpus's scale).", ""]
    if settings.first_metric in ("weighted_f1", "macro_f1") and target != "dimensional":  # the corpus's papers' first
        name = {"weighted_f1": "Weighted F1", "macro_f1": "Macro-F1"}[settings.first_metric]
        lines += [f"**{name} {p[settings.first_metric]:.4f}** "
                  f"(pooled test predictions; mean over folds {s[settings.first_metric + '_mean']:.4f}), "
                  f"UA {p['ua']:.4f}, WA {p['wa']:.4f}.", ""]
    lines += [f"Data: `{settings.data_dir}`; validation: {settings.val_split_description}; "
             f"{settings.epochs} epochs{early}, {select}.", "",
             f"| {'seed | ' if results.get('seeds') else ''}fold | test | train | val | test n | best epoch | "
             + " | ".join(METRICS[m] for m in metrics) + " |",
             "| " + " | ".join(["---"] * (6 + len(metrics) + bool(results.get("seeds")))) + " |"]
    for f in results["folds"]:
        t = f["test"]
        seed = f"{f['seed']} | " if results.get("seeds") else ""
        lines.append(f"| {seed}{f['fold']} | {fold_title(f)} | {f['n_train']} | {f['n_val']} | {f['n_test']} | "
                     f"{f.get('best_epoch', '')} | " + " | ".join(f"{t[m]:.4f}" for m in metrics) + " |")
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
    if target != "dimensional":
        recall = ", ".join(f"{c} {r:.3f}" if r is not None else f"{c} -" for c, r in p["per_class_recall"].items())
        lines += ["", f"Pooled per-class recall: {recall}. Chance UA is {1 / len(settings.classes):.2f}."]
    if target != "categorical":
        lines += attribute_lines(p, settings)
    lines += ["", f"Spread: {s['std']}" + ("; ± is one standard deviation." if not s["std"].startswith("none") else
                                           " (--seeds gives a spread over seeds).")]
    if results.get("seeds"):
        o = results["over_fold_x_seed"]
        lines.append("Over all fold x seed results: " + ", ".join(
            f"{METRICS[m]} {_with_spread(o[m]['mean'], o[m]['std'])}" for m in metrics) + ".")
    binary = [k for k in s if k.startswith("ovr_") and k.endswith("_mean")]
    if binary:
        lines += ["", "One-vs-rest binary scores per emotion (Siriwardhana et al.'s IEMOCAP metric: not comparable "
                      "with 4-class UA), mean over folds:", "",
                  "| emotion | binary accuracy | binary F1 (weighted) |", "| --- | --- | --- |"]
        for c in settings.classes:
            lines.append(f"| {c} | {_with_spread(s[f'ovr_{c}_accuracy_mean'], s[f'ovr_{c}_accuracy_std'])} | "
                         f"{_with_spread(s[f'ovr_{c}_f1_mean'], s[f'ovr_{c}_f1_std'])} |")
    withheld = {split: w for f in results["folds"] for split, w in f.get("withheld", {}).items()}
    for split, w in withheld.items():
        lines += ["", f"Withheld partition {split}: {w['n']} utterances whose labels the corpus withholds, predicted "
                      f"(not scored) into {', '.join(w['files'])}, in the challenge's submission format."]
    if settings.transcripts is not None:
        wer = "unknown" if settings.asr_wer is None else f"{settings.asr_wer:.3f}"
        lines += ["", f"Transcripts: trained on the {settings.transcripts['train']} transcripts, tested on the "
                      f"{settings.transcripts['test']} ones; ASR model `{settings.asr_model}`, WER {wer} "
                      f"(feature_ext.py's normalisation, all utterances)."]
    if results["left_out"]:
        which = "labelled " if target == "categorical" else ""
        lines += ["", f"Left out for missing features (--skip-missing): {len(results['left_out'])} {which}"
                      f"utterance(s), named in results.json."]
    return "\n".join(lines) + "\n"


def attribute_lines(p, settings):
    """summary.md's table of the pooled test predictions per attribute (p: results' pooled figures)."""
    attributes = list(settings.attributes)
    scale = {a: " to ".join(f"{b:g}" for b in settings.attributes[a]) for a in attributes}
    lines = ["", "Pooled test predictions per attribute (MAE on the corpus's scale; a constant prediction has "
                 "CCC 0):", "", "| attribute | scale | n | CCC | Pearson r | MAE |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {a} | {scale[a]} | {p['attribute_n'][a]} | {p[f'{a}_ccc']:.4f} | {p[f'{a}_pearson']:.4f} | "
              f"{p[f'{a}_mae']:.4f} |" for a in attributes]
    lines.append(f"| mean | | | {p['ccc']:.4f} | {p['pearson']:.4f} | {p['mae']:.4f} |")
    if settings.attribute_utterances == "rated":
        lines += ["", "The attributes are trained and scored on every utterance that has them (--attribute-"
                      "utterances rated)" + (", the classes on the labelled ones only (rows of no class, such "
                                             "as MSP-Podcast's X and O, are left out of them, as the challenge "
                                             "leaves them out)." if settings.target == "both" else ".")]
    return lines


def write_results(settings, fold_results, run_dir, rank, show=True):
    """results.json and summary.md in run_dir (by rank 0); the table goes to the log when `show`. -> results."""
    seeds = settings.seeds
    from mmser.targets import target_of
    results = summarize(settings.protocol, fold_results, settings.classes, settings.val_split, settings.left_out,
                        seeds, target_of(settings))
    if settings.transcripts is not None:  # which transcripts, only where ASR ones are used (as config.json)
        results.update(transcripts=settings.transcripts, asr_model=settings.asr_model, asr_wer=settings.asr_wer)
    if settings.first_metric:
        results["first_metric"] = settings.first_metric
    table = results_table(results, settings)
    if rank == 0:
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(run_dir / "summary.md", table)
        if show:
            log.info("\n" + table)
        log.info(f"wrote {run_dir / 'results.json'} and {run_dir / 'summary.md'}")
    return results
