"""Fixtures shared across the suite."""
import contextlib
import io

import pytest
import torch

import main


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The suite's models are tiny: one thread runs them as fast as two, and torch's spinning
    worker threads make them 10-20x slower when the cores are shared with anything else."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reduced_demo(tmp_path_factory):
    """One reduced `python main.py --demo RUN_DIR` (200 utterances), shared by the tests that need
    a trained run: -> (run_dir, results, what it printed)."""
    run_dir = tmp_path_factory.mktemp("reduced_demo") / "demo"
    args = main.parse_args(["--demo", str(run_dir), "--epochs", "10", "--batch-size", "8"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = main.run_demo(args, dialogues_per_session=2, utterances_per_dialogue=20)
    return run_dir, results, printed.getvalue()
