"""The run folder: what may be one, its config.json, resuming under the same settings, and its log.

A RUN_DIR is new, empty, or a folder main.py made (it has a config.json with a protocol); a run
resumes only under the settings its config.json records (those that change its numbers), and its
log (train.log) keeps every invocation's lines.
"""
import dataclasses
import json
import logging
import sys
from pathlib import Path

from mmser.settings import NOT_COMPARED_ON_RESUME, TOKEN_LIMITS, RunError, RunSettings, read_settings
from mmser.utils import write_text_atomic

log = logging.getLogger("main")  # the run's log (RUN_DIR/train.log)


def check_run_dir(run_dir, data_dir=None, models_dir=None):
    """RUN_DIR is new, empty, or a run folder main.py made (it has a config.json with a protocol):
    a run writes its files into it, so a DATA_DIR, a MODELS_DIR or any other folder is refused."""
    run_dir = Path(run_dir)
    for what, other in (("DATA_DIR", data_dir), ("MODELS_DIR", models_dir)):
        if other is not None and run_dir.resolve() == Path(other).resolve():
            raise RunError(f"RUN_DIR {run_dir} is the {what}: give the run a folder of its own")
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunError(f"RUN_DIR {run_dir}: not a folder")
    if not any(run_dir.iterdir()):
        return
    config = run_dir / "config.json"
    try:
        made_by_main = "protocol" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, unreadable, or not JSON: not a run folder
        made_by_main = False
    if not made_by_main:
        what = "a DATA_DIR" if (run_dir / "utterances.csv").exists() else "not a run folder of main.py"
        raise RunError(f"RUN_DIR {run_dir} holds files and is {what}; give a new or empty folder, or a run folder "
                       f"to resume")


def write_config(run_dir, settings):
    """The one place config.json is written (RunSettings.to_json): predict.py rebuilds the model from it."""
    write_text_atomic(Path(run_dir) / "config.json", json.dumps(settings.to_json(), indent=2) + "\n")


def check_resumable(run_dir, settings):
    """A RUN_DIR with a config.json only resumes under the same settings: those of `settings`, a
    RunSettings, or a dict of some of its fields (the demo checks its options before its data exist).
    -> whether there is a run to resume."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return False
    values = settings.to_json() if isinstance(settings, RunSettings) else settings
    old = dataclasses.asdict(read_settings(path))
    # A token limit not yet resolved (the demo checks its folder before its models exist) is compared later.
    changed = sorted(k for k in values if k not in NOT_COMPARED_ON_RESUME and old.get(k) != values[k]
                     and not (k in TOKEN_LIMITS and values[k] is None))
    if changed:
        details = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(values[k])}" for k in changed)
        raise RunError(f"{path} was written with other settings ({details}); use a new RUN_DIR or the same "
                       f"settings to resume")
    return True


def _short(value, width=60):
    """A setting for a one-line message: a record of pretrained files would fill the screen."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + " ..."


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
