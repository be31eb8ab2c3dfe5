"""Fixtures shared across the suite."""
import contextlib
import io

import pytest
import torch

import main


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The suite's models are tiny: one thread runs them as fast as two, and torch's spinning
    worker threads make them 10-20x slower when the cores are shared with anything else. Set
    for every test, since a benchmark under test sets all cores and the demo sets one."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)  # also for the next module's fixtures, set up before its first test


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One `python main.py --demo RUN_DIR` at its default size (400 utterances, seconds on a CPU),
    shared by the tests that need a trained run: -> (run_dir, results, what it printed)."""
    run_dir = tmp_path_factory.mktemp("demo") / "demo_run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = main.run_demo(main.parse_args(["--demo", str(run_dir)]))
    return run_dir, results, printed.getvalue()
