"""Recipes (main.py --recipe, recipes.py), repeated seeds (--seeds) and TensorBoard's live curves,
seen in the files a run writes."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from mmser import recipes
from mmser import validation_function
import dataclasses
from mmser.settings import DEFAULTS
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# the table

def test_every_recipe_value_has_a_source_and_the_docs_show_the_table():
    for name, settings in recipes.RECIPES.items():
        assert set(settings) == set(recipes.SETTINGS) == set(recipes.SOURCES[name])
        assert all(recipes.SOURCES[name][k] for k in recipes.SETTINGS)
    # every setting a recipe sets is an option of main.py, and the table in README is the code's
    parser = main.build_parser()
    dests = {action.dest for action in parser._actions}
    assert set(recipes.recipe_settings("original")) <= dests
    # the table a page shows is the code's (python -m mmser.recipes prints it): README's or a docs/ page's
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert any(recipes.markdown_table(dataclasses.asdict(DEFAULTS)) in page.read_text() for page in pages)


def test_a_recipe_sets_every_setting_and_options_given_still_override_it():
    args = main.parse_args(["run", "data", "models", "--recipe", "siriwardhana2020", "--lr-head", "1e-3"])
    assert (args.lr_encoders, args.adam_betas, args.adam_eps, args.weight_decay, args.clip_norm) == \
        (1e-5, [0.9, 0.98], 1e-6, 0.1, 0.0)
    assert (args.scheduler, args.select_by, args.val_split, args.branches, args.head) == \
        ("polynomial", "val_loss", "in-train-session", "text,speech", "linear")
    assert args.finetune_speech and not args.freeze_text and args.lr_head == 1e-3
    assert args.recipe_overridden == ["lr_head"]
    assert args.max_text_tokens is None  # left to be bounded by the encoder's positions


# ------------------------------------------------------------------------------------------------
# runs

@pytest.fixture(scope="module")
def siriwardhana_run(tmp_path_factory, data_dir, models_dir):
    run_dir = tmp_path_factory.mktemp("siriwardhana") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        results = main.main([run_dir, data_dir, models_dir, "--recipe", "siriwardhana2020", "--epochs", "2",
                             "--batch-size", "8", "--lr-encoders", "1e-3", "--lr-head", "1e-3", "--device", "cpu"])
    return run_dir, results


def test_siriwardhana2020_runs_its_split_head_and_limits_and_reports_its_binary_metric(siriwardhana_run):
    run_dir, results = siriwardhana_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"] == "siriwardhana2020" and config["recipe_overridden"] == [
        "batch_size", "epochs", "lr_encoders", "lr_head"]
    assert config["finetune_speech"] and config["finetune_text"] and config["branches"] == ["text", "speech"]
    # The recipe's 512 text tokens, bounded by the tiny text model's 130 - 2 positions; the log says so.
    assert config["max_text_tokens"] == 128 and config["max_audio_tokens"] <= 2048
    assert "MAX_TEXT_TOKENS 512 lowered to 128" in (run_dir / "train.log").read_text()
    # Session 4 validates and also trains (its released lists); session 5 tests.
    fold = results["folds"][0]
    assert (fold["n_train"], fold["n_val"], fold["n_test"]) == (80, 20, 20)
    weights = torch.load(run_dir / "fold1" / "best.pt", weights_only=True)["model"]
    assert [k for k in weights if k.startswith("classifier.")] == ["classifier.1.weight", "classifier.1.bias"]
    assert any(k.startswith("speech_encoder.") for k in weights)  # fine-tuned, so kept
    # The checkpoint is the epoch of the lowest validation loss.
    history = json.loads((run_dir / "fold1" / "fold_result.json").read_text())["history"]
    assert fold["best_epoch"] == 1 + int(np.argmin([h["val_loss"] for h in history]))
    # One-vs-rest binary accuracy and F1 per emotion, beside the 4-class metrics.
    y = json.loads((run_dir / "fold1" / "fold_result.json").read_text())
    truth, guess = np.array(y["y_true"]), np.array(y["y_pred"])
    assert fold["test"]["ovr_sad_accuracy"] == pytest.approx(np.mean((truth == 2) == (guess == 2)))
    summary = (run_dir / "summary.md").read_text()
    assert "One-vs-rest binary scores per emotion" in summary and "| sad |" in summary


def test_original_recipe_trains_its_way_and_stops_early(original_recipe_run):
    run_dir, results = original_recipe_run
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["loss"], config["scheduler"], config["select_by"], config["lr_head"], config["fusion_hidden"]) == \
        ("multi_margin", "constant", "last", 5e-5, 32)
    assert not config["finetune_text"] and not config["finetune_speech"]
    assert config["recipe_overridden"] == ["batch_size", "epochs", "fusion_hidden", "patience"]
    for seed in (0, 1):
        fold = json.loads((run_dir / f"seed{seed}" / "fold1" / "fold_result.json").read_text())
        losses = [h["val_loss"] for h in fold["history"]]
        # the last epoch's weights are tested; a validation loss that did not fall stops the fold
        assert fold["best_epoch"] == len(losses)
        assert len(losses) == 3 or losses[-1] >= min(losses[:-1])
        assert all(h["lr"] == 5e-5 for h in fold["history"])  # constant rate


# ------------------------------------------------------------------------------------------------
# seeds

def test_seeds_report_the_mean_and_sample_std_over_seeds(seeds_run):
    run_dir, results = seeds_run
    assert results["seeds"] == [0, 1] and [f["seed"] for f in results["folds"]] == [0, 1]
    assert (run_dir / "seed0" / "fold1" / "best.pt").exists() and (run_dir / "seed1" / "fold1" / "best.pt").exists()
    # each seed's folder is a run folder predict.py can read
    assert json.loads((run_dir / "seed1" / "config.json").read_text())["seed"] == 1
    ua = [f["test"]["ua"] for f in results["folds"]]  # one fold per seed: each seed's mean is its fold
    assert results["summary"]["ua_mean"] == pytest.approx(np.mean(ua))
    assert results["summary"]["ua_std"] == pytest.approx(np.std(ua, ddof=1))
    assert "ddof 1" in results["summary"]["std"] and "2 seeds" in results["summary"]["std"]
    assert results["summary"]["weighted_f1_std"] is not None
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    summary = (run_dir / "summary.md").read_text()
    assert "mean ± std over seeds" in summary and "Over all fold x seed results" in summary
    assert (run_dir / "attention_pooled.png").read_bytes()[:4] == b"\x89PNG"


def test_attention_pooled_over_folds_is_that_of_all_their_utterances():
    rng = np.random.default_rng(0)
    attention = rng.dirichlet(np.ones(3), size=(30, 2)).astype(np.float32)  # (utterances, heads, slots)
    labels = rng.integers(0, 4, size=30)
    labels[:12] = np.repeat([0, 1, 2, 3], 3)  # every class in the first part too
    parts = [validation_function.attention_means(attention[a:b], labels[a:b], 4) for a, b in ((0, 12), (12, 30))]
    whole = validation_function.attention_means(attention, labels, 4)
    pooled = validation_function.pool_attention_means(parts)
    assert pooled["n"] == 30 and pooled["per_class_n"] == whole["per_class_n"]
    np.testing.assert_allclose(pooled["per_head"], whole["per_head"], rtol=1e-5)
    np.testing.assert_allclose(np.array(pooled["per_class"], dtype=float), np.array(whole["per_class"]), rtol=1e-5)


def test_training_curves_go_to_tensorboard(seeds_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = seeds_run[0] / "seed0" / "fold1" / "tensorboard"
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/train_loss", "step/grad_norm", "step/samples_per_s", "epoch/val_ua", "epoch/val_loss",
            "epoch/val_macro_f1"} <= tags
    assert any(t.startswith("step/lr/") for t in tags)
    steps = [e.step for e in events.Scalars("step/train_loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(events.Scalars("epoch/val_ua")) == 2
    history = json.loads((seeds_run[0] / "seed0" / "fold1" / "fold_result.json").read_text())["history"]
    assert [e.value for e in events.Scalars("epoch/val_ua")] == pytest.approx([h["val_ua"] for h in history])


def test_config_records_the_code_and_library_versions(seeds_run):
    config = json.loads((seeds_run[0] / "config.json").read_text())
    assert set(config["versions"]) == {"python", "numpy", "torch", "transformers"}
    assert config["code"]["commit"] is None or len(config["code"]["commit"]) == 40
    assert config["seeds"] == [0, 1]


def test_predict_serves_a_seeds_run_with_every_seed_s_folds(seeds_run):
    from mmser import predictor
    run_dir = seeds_run[0]
    seed_folds = [run_dir / "seed0" / "fold1" / "best.pt", run_dir / "seed1" / "fold1" / "best.pt"]
    assert predictor.load_run(run_dir)[1] == seed_folds  # predict_rows takes the mean over these
    assert predictor.load_run(run_dir, fold=1)[1] == seed_folds
    assert predictor.load_run(run_dir / "seed1")[1] == seed_folds[1:]  # one seed's folder alone, a finished run
    seed1 = json.loads((run_dir / "seed1" / "results.json").read_text())
    assert seed1["folds"][0]["test"] == seeds_run[1]["folds"][1]["test"] and "seeds" not in seed1
    with pytest.raises(predictor.PredictError, match="no fold2/best.pt"):
        predictor.load_run(run_dir, fold=2)
