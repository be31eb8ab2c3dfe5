"""Fixtures shared across the suite: the small DATA_DIR and MODELS_DIR (tests/small_runs.py),
the demo's run, and a leave-one-session-out run on the demo's data."""
import contextlib
import io
import json

import pytest
import torch

import main
from small_runs import run_like_the_demo, run_main, write_feature_dir, write_tiny_models


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_from_the_start():
    """The first module's fixtures too run on one thread (set up before any function fixture):
    the tiny models fitted there are byte-identical only for the same thread count."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread(one_torch_thread_from_the_start):
    """The suite's models are tiny: one thread runs them as fast as two, and torch's spinning
    worker threads make them 10-20x slower when the cores are shared with anything else. Set
    for every test, since a benchmark under test sets all cores and the demo sets one."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)  # also for the next module's fixtures, set up before its first test


@pytest.fixture
def precision_settings():
    """TF32 settings are process-wide: put back what a test changed, through the per-operator API."""
    ops = (torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cudnn.conv)
    saved = [op.fp32_precision for op in ops]
    yield
    for op, value in zip(ops, saved):
        op.fp32_precision = value


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Read only: a test that breaks a file works on a copy."""
    return write_feature_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One `python main.py --demo RUN_DIR` at its default size (400 utterances, seconds on a CPU),
    shared by the tests that need a trained run: -> (run_dir, results, what it printed)."""
    run_dir = tmp_path_factory.mktemp("demo") / "demo_run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # On the CPU even where a GPU is present: the tests compare it with CPU computations
        # (tests/test_cuda.py covers the GPU).
        results = main.main(["--demo", str(run_dir), "--device", "cpu"])
    return run_dir, results, printed.getvalue()


@pytest.fixture(scope="session")
def loso_run(demo_run, tmp_path_factory):
    """A leave-one-session-out run on the demo's data (context branch, one epoch: five folds in
    seconds), stopped once on the way as a job's time limit would, and run again to the end:
    -> {"run_dir", "results", "fold1_before_rerun": fold1/fold_result.json's (bytes, mtime)}."""
    run_dir = tmp_path_factory.mktemp("loso") / "run"
    options = ["--protocol", "loso", "--branches", "context", "--epochs", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        # Fold 1 finishes; fold 2 stops after its epoch, before its test.
        assert run_like_the_demo(demo_run[0], run_dir, *options, "--stop-after-epochs", "2") is None
        finished = run_dir / "fold1" / "fold_result.json"
        before = (finished.read_bytes(), finished.stat().st_mtime_ns)
        results = run_like_the_demo(demo_run[0], run_dir, *options)
    return {"run_dir": run_dir, "results": results, "fold1_before_rerun": before}


@pytest.fixture(scope="session")
def demo(demo_run):
    """The shared demo run's folders and config: {"run_dir", "data_dir", "config"}."""
    run_dir = demo_run[0]
    return {"run_dir": run_dir, "data_dir": run_dir / "data", "config": json.loads((run_dir / "config.json").read_text())}


@pytest.fixture(scope="session")
def seeds_run(data_dir, models_dir, tmp_path_factory):
    """Two seeds of the small settings' session-5 run (`--seeds 0,1`): -> (run_dir, results)."""
    run_dir = tmp_path_factory.mktemp("seeds") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        results = run_main(run_dir, data_dir, models_dir, "--seeds", "0,1", "--epochs", "2")
    return run_dir, results


@pytest.fixture(scope="session")
def original_recipe_run(data_dir, models_dir, tmp_path_factory):
    """`--recipe original` on the small data with two seeds (so it pairs with seeds_run), its
    epochs cut to 3 and its patience to 1: -> (run_dir, results)."""
    run_dir = tmp_path_factory.mktemp("original") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        results = main.main([run_dir, data_dir, models_dir, "1", "--recipe", "original", "--epochs", "3",
                             "--patience", "1", "--batch-size", "8", "--fusion-hidden", "32", "--seeds", "0,1",
                             "--device", "cpu"])
    return run_dir, results
