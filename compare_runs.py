"""Compare finished runs of main.py: the settings that differ, each metric with its spread, and a
paired significance test of each run against the first.

    python compare_runs.py RUN_DIR [RUN_DIR ...] [--output DIR]

Reads each RUN_DIR's config.json and results.json (any metrics they hold: WA, UA, macro-F1,
weighted-F1, one-vs-rest scores; a dimensional run's CCC, Pearson r and MAE per attribute and their
means, ...). Writes into DIR (default: comparison/):
  comparison.md    the table in Markdown (also printed)
  comparison.tex   the same table as a LaTeX tabular
  comparison.png   a bar chart of each metric's mean per run, error bars one standard deviation
Each run's spread is the one its results.json gives (sample standard deviation, ddof 1: over seeds
for a --seeds run, over folds otherwise). The test is scipy.stats.ttest_rel, a paired t-test over
the (seed, fold) pairs both runs tested; fewer than two pairs give no test. Runs of different
protocols, test partitions (--test-set) or attribute utterances (--attribute-utterances) test on
different utterances and are refused, not compared; runs of different targets compare on the metrics
they share (a both run beside a categorical one on WA, UA, ...; beside a dimensional one on CCC, ...). The transcripts a run trained
and tested on are a setting like any other, shown when they differ (a run whose config.json does not
record them trained and tested on the reference transcripts): the test folds hold the same utterances
and labels whichever transcripts the text came from, so the paired test measures what ASR costs.
An --output that is a file is refused before anything is read.
"""
import argparse
import json
import sys
from pathlib import Path

from mmser.reporting import LOWER_IS_BETTER, METRICS
from mmser.settings import DEFAULTS

# Shown first, in this order, when the runs hold them (the run's own tables' order and names); any
# other metric all runs share follows.
PREFERRED, NAMES = tuple(METRICS), METRICS
# Settings that say how or where a run was made, not what it trained: never listed as differences.
# The models' paths are left out too: the same files in two places are the same models, and
# "pretrained" (their sha256) tells whether they are.
BOOKKEEPING = ("versions", "code", "val_split_description", "stop_after_epochs", "left_out", "recipe_overridden",
               "device", "world_size", "models_dir", "text_model", "speech_model")
# Settings under which two runs' numbers are not of the same thing: other test utterances. (A config.json
# written before a setting existed had its default.)
MUST_MATCH = ("protocol", "test_set", "attribute_utterances")


class CompareError(Exception):
    """A run folder that cannot be compared; the message names it and says why."""


def load_run(run_dir):
    """-> {"name", "dir", "config", "results"} of a finished run."""
    run_dir = Path(run_dir)
    out = {"dir": run_dir, "name": run_dir.resolve().name}
    for what in ("config", "results"):
        path = run_dir / f"{what}.json"
        try:
            out[what] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CompareError(f"{path}: not found; give a RUN_DIR of main.py whose run has finished") from None
        except (OSError, ValueError) as e:
            raise CompareError(f"{path}: unreadable ({e})") from None
    return out


def transcripts_of(config):
    """Which transcripts a run trained and tested on, whatever its config.json records: main.py writes
    "transcripts" only for a run that used ASR ones."""
    sets = config.get("transcripts") or {"train": "reference", "test": "reference"}
    return sets["train"] if sets["train"] == sets["test"] else f"{sets['train']}, tested on {sets['test']}"


def check_comparable(runs):
    """Refuse runs whose protocol differs: their numbers are of other test utterances."""
    for key in MUST_MATCH:
        values = {json.dumps(r["config"].get(key, getattr(DEFAULTS, key))) for r in runs}
        if len(values) > 1:
            detail = ", ".join(f"{r['dir']}: {r['config'].get(key, getattr(DEFAULTS, key))}" for r in runs)
            raise CompareError(f"the runs differ in {key} ({detail}); only runs of one {key} are compared")


def fold_metrics(run):
    """{(seed, fold): test metrics} of a run (a single-seed run's seed from its config)."""
    seed = run["config"].get("seed")
    return {(f.get("seed", seed), f["fold"]): f["test"] for f in run["results"]["folds"]}


def shared_metrics(runs):
    """The scalar metrics every run's folds hold: PREFERRED first, then the rest in the first run's order."""
    common = None
    for run in runs:
        for test in fold_metrics(run).values():
            keys = {k for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            common = keys if common is None else common & keys
    common = common or set()
    first = next(iter(fold_metrics(runs[0]).values()))
    return [k for k in PREFERRED if k in common] + [k for k in first if k in common and k not in PREFERRED]


def _sha256s(value):
    """Every sha256 in a config's record of pretrained files, wherever it sits."""
    if isinstance(value, dict):
        return [d for k, v in sorted(value.items()) for d in ([v] if k == "sha256" else _sha256s(v))]
    if isinstance(value, list):
        return [d for v in value for d in _sha256s(v)]
    return []


def differing_settings(runs):
    """{setting: [value per run]} for the settings whose values are not the same in every run; the
    pretrained files by a short digest of their sha256s (equal files, equal digest)."""
    import hashlib

    def value(run, key):
        v = run["config"].get(key)
        if key == "pretrained" and v is not None:
            return hashlib.sha256(" ".join(_sha256s(v)).encode()).hexdigest()[:8]
        if key == "seed" and run["config"].get("seeds"):  # --seeds: the seeds run, not --seed
            return run["config"]["seeds"]
        if key == "transcripts":
            return transcripts_of(run["config"])
        return v

    keys = list(dict.fromkeys(["transcripts"] + [k for r in runs for k in r["config"] if k not in BOOKKEEPING]))
    return {k: [value(r, k) for r in runs] for k in keys
            if len({json.dumps(value(r, k), sort_keys=True) for r in runs}) > 1}


def paired_test(base, other, metric):
    """scipy.stats.ttest_rel over the (seed, fold) pairs both runs tested -> (p, pairs); p None when
    there are fewer than two pairs; 1.0 when every pair is equal (no difference to test)."""
    from scipy.stats import ttest_rel
    a, b = fold_metrics(base), fold_metrics(other)
    keys = sorted(set(a) & set(b), key=str)
    x, y = [a[k][metric] for k in keys], [b[k][metric] for k in keys]
    if len(keys) < 2:
        return None, len(keys)
    if all(u == v for u, v in zip(x, y)):
        return 1.0, len(keys)
    return float(ttest_rel(y, x).pvalue), len(keys)


def compare(runs):
    """Everything the table shows: {"runs", "settings", "metrics", "rows", "pairs"}."""
    check_comparable(runs)
    metrics = shared_metrics(runs)
    if not metrics:
        raise CompareError("the runs share no metric to compare")
    rows = []
    for i, run in enumerate(runs):
        summary = run["results"]["summary"]
        row = {"name": run["name"], "spread": summary.get("std", "population std over folds (older run)"),
               "values": {}}
        for m in metrics:
            mean = summary.get(f"{m}_mean")
            if mean is None:  # a metric the summary does not list: the mean over folds
                values = [t[m] for t in fold_metrics(run).values()]
                mean = sum(values) / len(values)
            p, pairs = paired_test(runs[0], run, m) if i else (None, None)
            row["values"][m] = {"mean": mean, "std": summary.get(f"{m}_std"), "p": p, "pairs": pairs}
        rows.append(row)
    return {"runs": runs, "settings": differing_settings(runs), "metrics": metrics, "rows": rows}


def _cell(value):
    mean, std = value["mean"], value["std"]
    text = f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
    if value["p"] is not None:
        text += f" (p={value['p']:.3g})"
    return text


def _setting(value):
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "-" if value is None else str(value)


def note(comparison):
    runs = comparison["runs"]
    spreads = "; ".join(f"{r['name']}: {r['spread']}" for r in comparison["rows"])
    return (f"Mean ± one standard deviation ({spreads}). p: paired t-test (scipy.stats.ttest_rel) of each run "
            f"against {runs[0]['name']} over the (seed, fold) pairs both tested; none where fewer than two pairs.")


def markdown(comparison):
    settings, metrics = comparison["settings"], comparison["metrics"]
    head = ["run"] + list(settings) + [NAMES.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for i, row in enumerate(comparison["rows"]):
        cells = [row["name"]] + [_setting(v[i]) for v in settings.values()] + [_cell(row["values"][m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if not settings:
        lines += ["", "The runs' settings do not differ."]
    return "\n".join(lines + ["", note(comparison)]) + "\n"


def _tex(text):
    """Text for a LaTeX cell: its special characters escaped, ± as \\pm."""
    out = []
    for ch in text:
        out.append({"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                    "{": r"\{", "}": r"\}", "±": r"$\pm$"}.get(ch, ch))
    return "".join(out)


def latex(comparison):
    settings, metrics = comparison["settings"], comparison["metrics"]
    head = ["run"] + list(settings) + [NAMES.get(m, m) for m in metrics]
    lines = [r"\begin{tabular}{" + "l" * (1 + len(settings)) + "r" * len(metrics) + "}", r"\hline",
             " & ".join(_tex(h) for h in head) + r" \\", r"\hline"]
    for i, row in enumerate(comparison["rows"]):
        cells = [row["name"]] + [_setting(v[i]) for v in settings.values()] + [_cell(row["values"][m]) for m in metrics]
        lines.append(" & ".join(_tex(c) for c in cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}", "", "% " + _tex(note(comparison))]
    return "\n".join(lines) + "\n"


def bar_chart(comparison, path):
    """Each metric's mean per run, error bars one standard deviation (none where a run has no spread)."""
    import numpy as np
    from matplotlib.figure import Figure
    from mmser.utils import atomic_path
    metrics, rows = comparison["metrics"], comparison["rows"]
    fig = Figure(figsize=(max(5, 1.4 * len(metrics) * max(1, len(rows)) / 2 + 2), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    x = np.arange(len(metrics))
    for i, row in enumerate(rows):
        where = x + (i - (len(rows) - 1) / 2) * width
        means = [row["values"][m]["mean"] for m in metrics]
        ax.bar(where, means, width, label=row["name"])
        # error bars only where the run has a spread: a bar of 0 would claim one
        spread = [(w, mean, row["values"][m]["std"]) for w, mean, m in zip(where, means, metrics)
                  if row["values"][m]["std"] is not None]
        if spread:
            ax.errorbar(*zip(*spread), fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(x, [NAMES.get(m, m) + (" (lower is better)" if m in LOWER_IS_BETTER else "") for m in metrics],
                  rotation=30 if len(metrics) > 4 else 0, ha="right" if len(metrics) > 4 else "center")
    # scores run from 0 to 1, but a CCC may fall below 0 and an MAE on a 1-7 scale rise above 1
    values = [row["values"][m]["mean"] for row in rows for m in metrics]
    ax.set(ylim=(min(0, min(values) * 1.1), max(1, max(values) * 1.1)), ylabel="score",
           title="mean ± one standard deviation (no error bar: no spread)")
    ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def write_comparison(run_dirs, output):
    """Compare the runs and write comparison.md, .tex and .png into output; -> the Markdown table."""
    from mmser.utils import write_text_atomic
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise CompareError(f"--output {output}: a file, not a folder; give a folder for comparison.md, .tex and .png")
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # two folders of one name: their paths tell them apart
        for r in runs:
            r["name"] = str(r["dir"])
    comparison = compare(runs)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, a folder where nothing can be made
        raise CompareError(f"--output {output}: cannot create the folder ({e.strerror})") from None
    table = markdown(comparison)
    write_text_atomic(output / "comparison.md", table)
    write_text_atomic(output / "comparison.tex", latex(comparison))
    bar_chart(comparison, output / "comparison.png")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished runs of main.py; the first is the "
                                                                    "baseline of the paired tests")
    p.add_argument("--output", default="comparison", help="folder for comparison.md, .tex and .png")
    args = p.parse_args(argv)
    try:
        table = write_comparison(args.run_dirs, args.output)
    except CompareError as error:
        raise SystemExit(f"compare_runs.py: error: {error}") from None
    print(table, end="")
    print(f"wrote {Path(args.output) / 'comparison.md'}, comparison.tex and comparison.png")


if __name__ == "__main__":
    sys.exit(main())
