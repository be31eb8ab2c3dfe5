"""compare_runs.py on two finished runs of the same protocol and seeds, and its refusal of runs
that measure different things."""
import json
import shutil

import pytest
from scipy.stats import ttest_rel

import compare_runs


def test_two_runs_compare_into_markdown_latex_and_a_bar_chart(tmp_path, seeds_run, original_recipe_run):
    base, other = seeds_run[0], original_recipe_run[0]
    out = tmp_path / "comparison"
    compare_runs.main([str(base), str(other), "--output", str(out)])
    table = (out / "comparison.md").read_text()
    lines = table.splitlines()
    # the settings that differ are columns; the ones that do not are left out
    header = lines[0]
    assert "loss" in header and "scheduler" in header and "recipe" in header and "protocol" not in header
    assert "| WA | UA | macro-F1 | weighted-F1 |" in header
    # each run's mean ± its sample std over seeds, and the paired test against the first run
    base_results, other_results = (json.loads((d / "results.json").read_text()) for d in (base, other))
    s = other_results["summary"]
    assert f"{s['ua_mean']:.4f} ± {s['ua_std']:.4f}" in lines[3]
    pairs = [[f["test"]["ua"] for f in r["folds"]] for r in (base_results, other_results)]
    if pairs[0] != pairs[1]:
        assert f"(p={ttest_rel(pairs[1], pairs[0]).pvalue:.3g})" in lines[3]
    assert "p=" not in lines[2]  # the first run is the baseline
    assert "scipy.stats.ttest_rel" in table and "ddof 1" in table
    tex = (out / "comparison.tex").read_text()
    assert tex.startswith(r"\begin{tabular}") and r"$\pm$" in tex and r"\end{tabular}" in tex
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_of_different_protocols_are_refused(tmp_path, seeds_run):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(seeds_run[0] / "results.json", other / "results.json")
    config = json.loads((seeds_run[0] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "protocol": "loso"}))
    with pytest.raises(SystemExit, match="differ in protocol"):
        compare_runs.main([str(seeds_run[0]), str(other), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="config.json: not found; give a RUN_DIR of main.py"):
        compare_runs.main([str(seeds_run[0]), str(tmp_path), "--output", str(tmp_path / "out")])


def copy_run(run_dir, to, **config_changes):
    """A copy of a finished run whose config.json says otherwise (its results stay the same)."""
    to.mkdir()
    shutil.copy(run_dir / "results.json", to / "results.json")
    config = json.loads((run_dir / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**config, **config_changes}))
    return to


def test_transcript_sets_are_one_setting_whatever_config_json_records(tmp_path, seeds_run, capsys):
    base = seeds_run[0]  # its config.json says nothing of transcripts: the reference ones
    assert "transcripts" not in json.loads((base / "config.json").read_text())
    said = copy_run(base, tmp_path / "said", transcripts={"train": "reference", "test": "reference"})
    asr = copy_run(base, tmp_path / "asr", transcripts={"train": "asr", "test": "asr"})
    ref_asr = copy_run(base, tmp_path / "ref-asr", transcripts={"train": "reference", "test": "asr"})
    compare_runs.main([str(base), str(said), "--output", str(tmp_path / "same")])
    assert "transcripts" not in (tmp_path / "same" / "comparison.md").read_text().splitlines()[0]
    # An ASR run is compared with a reference run as with another ASR run: never refused.
    for pair in ((base, asr), (asr, ref_asr)):
        compare_runs.main([*map(str, pair), "--output", str(tmp_path / "out")])
    lines = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    assert lines[0].startswith("| run | transcripts |")
    assert lines[2].startswith("| asr | asr |") and lines[3].startswith("| ref-asr | reference, tested on asr |")


def test_an_output_that_is_a_file_is_refused_in_one_line(tmp_path, seeds_run):
    readme = tmp_path / "README.md"
    readme.write_text("mine")
    with pytest.raises(SystemExit, match=rf"^compare_runs.py: error: --output {readme}: a file, not a folder"):
        compare_runs.main([str(seeds_run[0]), str(seeds_run[0]), "--output", str(readme)])
    assert readme.read_text() == "mine"


def dimensional_run_folder(folder, ccc_by_fold, **config):
    """A finished dimensional run as compare_runs.py reads it: config.json and results.json with two folds."""
    folder.mkdir()
    folds = [{"fold": k + 1, "test": {"ccc": c, "valence_ccc": c - 0.1, "arousal_ccc": c + 0.1, "dominance_ccc": c,
                                      "pearson": c + 0.05, "mae": 1.5 - c, "attribute_n": {"valence": 10}}}
             for k, c in enumerate(ccc_by_fold)]
    means = {f"{m}_mean": sum(f["test"][m] for f in folds) / len(folds) for m in ("ccc", "mae")}
    (folder / "results.json").write_text(json.dumps({"folds": folds, "summary": {**means, "std": "none"}}))
    (folder / "config.json").write_text(json.dumps({"protocol": "loso", "target": "dimensional", "seed": 0,
                                                    **config}))
    return folder


def test_dimensional_runs_compare_on_ccc_with_the_paired_test(tmp_path):
    base = dimensional_run_folder(tmp_path / "base", [0.40, 0.50, 0.45])
    other = dimensional_run_folder(tmp_path / "other", [0.55, 0.58, 0.60], attribute_loss="mse")
    compare_runs.main([str(base), str(other), "--output", str(tmp_path / "out")])
    lines = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    assert "attribute_loss" in lines[0] and "| mean CCC | valence CCC | arousal CCC | dominance CCC |" in lines[0]
    assert "mean MAE" in lines[0] and "WA" not in lines[0]
    p = ttest_rel([0.55, 0.58, 0.60], [0.40, 0.50, 0.45]).pvalue
    assert f"(p={p:.3g})" in lines[3]
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"  # MAE above 1 on its axis
    test2 = dimensional_run_folder(tmp_path / "test2", [0.5, 0.5, 0.5], test_set="test2")
    with pytest.raises(SystemExit, match="differ in test_set"):
        compare_runs.main([str(base), str(test2), "--output", str(tmp_path / "out2")])
