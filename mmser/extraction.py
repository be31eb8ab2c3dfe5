"""The machinery every extraction step shares: its report, its record of the models that made its
files (DATA_DIR/features.json), what is left to do, and the loading of a transformers model that
names the model a step wanted when it fails.

A step writes one file per utterance into the folder data_contract.STEPS names; a rerun skips
outputs that exist and are valid. A user's problem that stops a whole step (a model missing, a
manifest that does not read) is a FeatureError or DataError recorded in its StepReport, and the
next step runs; anything else (a bug, CUDA out of memory) keeps its traceback.

Under torchrun (docs/sharding.md) every rank runs every step over its share of the work, chosen in
one place (pending, by distributed.share); before any rank writes, the ranks agree that each loaded
the same models and none stopped (agree_ranks), and only rank 0 writes features.json; every rank
ends the step with the reports of all of them merged (gather_reports), which only rank 0 prints.
"""
import datetime
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import (FEATURES_RECORD, MANIFEST_KEY, TEXT_ENCODERS, DataError, carries_audio,
                                 feature_folder, manifest_fingerprint, read_features_record, read_withheld, step_entry,
                                 transcript_folder)
from mmser.distributed import gather_from_ranks, rank_and_world, share, wait_for_ranks
from mmser.models_dir import missing_path
from mmser.utils import VOCABULARY_FILES, audio_seconds, fingerprint, quiet_transformers, write_text_atomic

# How long a rank waits for the others at a step's end (distributed.setup_distributed's timeout): its
# share may end hours before the slowest rank's on a corpus that takes days, where torch's default
# (30 minutes for gloo) would stop the whole job.
RANK_WAIT = datetime.timedelta(days=7)
SHOWN_FAILURES = 20  # per step in the summary; a broken input folder would otherwise bury the table


class FeatureError(Exception):
    """A user's input a step cannot use (a model, a file); the message names it."""


@dataclass
class StepReport:
    """What one step did: counts, the utterances that failed (name, reason), remarks, time."""

    step: str
    written: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    error: str = ""  # the whole step could not run (a model missing, ...)
    seconds: float = 0.0
    agreed: bool = field(default=False, repr=False, compare=False)  # past agree_ranks (under torchrun)

    @property
    def ok(self):
        return not self.failed and not self.error

    def fail(self, name, reason, progress_bar=None):
        self.failed.append((name, str(reason)))
        (progress_bar or tqdm).write(f"{self.step}: FAILED {name}: {reason}", file=sys.stderr)


def format_summary(reports):
    """A table of written/skipped/failed/seconds per step, then every failure by name."""
    width = max([22] + [len(r.step) + 2 for r in reports])  # qualified names: "ASR-<model>/text-tokens@<model>"
    lines = [f"{'step':<{width}}{'written':>9}{'skipped':>9}{'failed':>8}{'seconds':>9}"]
    for r in reports:
        failed = "ERROR" if r.error else len(r.failed)
        lines.append(f"{r.step:<{width}}{r.written:>9}{r.skipped:>9}{failed:>8}{r.seconds:>9.1f}")
    for r in reports:
        if r.error:
            lines.append(f"{r.step}: could not run: {r.error}")
        lines += [f"{r.step}: {note}" for note in r.notes]
        lines += [f"{r.step}: failed {name}: {reason}" for name, reason in r.failed[:SHOWN_FAILURES]]
        if len(r.failed) > SHOWN_FAILURES:
            lines.append(f"{r.step}: ... and {len(r.failed) - SHOWN_FAILURES} more failures (each printed as it happened)")
    n_failed, n_broken = sum(len(r.failed) for r in reports), sum(bool(r.error) for r in reports)
    if not n_failed and not n_broken:
        lines.append("all done")
    else:
        problems = ([f"{n_failed} utterance(s) failed"] if n_failed else []) + \
                   ([f"{n_broken} step(s) could not run"] if n_broken else [])
        lines.append(", ".join(problems) + "; fix and rerun: finished files are kept and skipped")
    return "\n".join(lines)


def valid_npy(path, dtype, shape=None, bos_eos=None):
    """True when `path` loads as a finite array of `dtype` and `shape` (1-D when shape is None),
    starting and ending with `bos_eos` ids when given."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    if array.dtype != dtype or array.ndim != 1 or array.size == 0 or (shape is not None and array.shape != shape):
        return False
    if bos_eos is not None and (len(array) < 2 or (array[0], array[-1]) != bos_eos):
        return False
    return bool(np.isfinite(array).all()) if array.dtype.kind == "f" else True


def read_transcript(data_dir, name, transcripts=None):
    """Text/<name>.txt (of the transcript set `transcripts`, data_contract.transcript_set), stripped;
    an empty transcript is a valid one (IEMOCAP has one; an ASR model writes one for silence)."""
    path = transcript_folder(data_dir, transcripts) / f"{name}.txt"
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise FeatureError(f"{path}: unreadable transcript ({e})") from None


def from_pretrained(loader, name, role):
    """transformers' loaders say what went wrong but not which model the step wanted (and take a local
    path that is not there for a malformed hub name)."""
    missing = missing_path(name)
    if missing:
        raise FeatureError(f"{role} {missing}")
    try:
        with quiet_transformers():
            return loader.from_pretrained(name)
    except (OSError, ValueError) as e:  # no such folder, not in the cache and no network, no model_type
        raise FeatureError(f"{role} {name!r} (a local folder, or a hub name in the cache or online): {e}") from None


def load_tokenizer(name, role):
    """A tokenizer with a vocabulary: without its vocabulary files, transformers 5 builds one of
    special tokens only, which turns every transcript into <s> </s> without a word of warning,
    and 4.x fails saying that protobuf is not installed."""
    from transformers import AutoTokenizer
    path = Path(name)
    if path.is_dir() and not any(any(path.glob(pattern)) for pattern in VOCABULARY_FILES):
        raise FeatureError(f"{role} {name!r}: without tokenizer.json (or vocab.json and merges.txt, or vocab.txt) "
                           f"in it, its tokenizer knows only its special tokens")
    tokenizer = from_pretrained(AutoTokenizer, name, role)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise FeatureError(f"{role} {name!r}: its tokenizer knows only its {len(tokenizer)} special tokens; is "
                           f"tokenizer.json (or vocab.json and merges.txt, or vocab.txt) missing from it?")
    return tokenizer


def text_encoder_config(name, role):
    """The transformers config of a text encoder the text branch or the sentence model takes
    (data_contract.TEXT_ENCODERS); any other model is refused with one line saying what it is."""
    from transformers import AutoConfig
    config = from_pretrained(AutoConfig, name, role)
    if config.model_type not in TEXT_ENCODERS:
        what = ", ".join(getattr(config, "architectures", None) or []) or "no architecture recorded"
        raise FeatureError(f"{role} {name!r} is a {config.model_type!r} model ({what}), not a text encoder this "
                           f"pipeline takes: {', '.join(f'{v} ({k})' for k, v in TEXT_ENCODERS.items())}")
    return config


def stamp_manifest(data_dir, step, rows, out_dir, report, pattern="*.npy"):
    """Record in features.json which manifest `step`'s files are made for. Files made for another
    manifest are named by positions in it, so they are removed (and recomputed) first."""
    record = read_features_record(data_dir)
    made_for = record.get(MANIFEST_KEY, {}).get(step)
    now = manifest_fingerprint(rows)
    if made_for is not None and made_for != now and any(Path(out_dir).glob(pattern)):
        report.notes.append(f"{Path(data_dir) / 'utterances.csv'} lists other utterances than when {out_dir} was "
                            f"made (its files are named by position): recomputing all of it")
        for path in Path(out_dir).glob(pattern):
            path.unlink()
    if made_for != now:
        record.setdefault(MANIFEST_KEY, {})[step] = now
        write_text_atomic(Path(data_dir) / FEATURES_RECORD, json.dumps(record, indent=2) + "\n")


def _identity(entry):
    return entry.get("sha256", entry)


def _described(entry):
    return entry["path"] if "sha256" in entry else " ".join(str(v) for v in entry.values())


def record_models(data_dir, step, current, overwrite, rows, report, pattern="*.npy"):
    """Record in DATA_DIR/features.json which pretrained files this step's outputs come from
    (current: {role: utils.fingerprint(...)}), and which manifest (stamp_manifest). An entry without
    a sha256 is a setting that changes the outputs (the transcripts' {"backend", "precision"}),
    compared whole.

    Outputs of different models must not mix: when the record names other files than `current`
    and outputs exist, stop, unless --overwrite is about to recompute them all. Under torchrun every
    rank checks, the ranks agree (agree_ranks), and rank 0 alone writes, before any output is written.
    """
    def same(old, new):
        """The same files; also where this version fingerprints more of a folder than the record did (the
        ASR model's generation and feature configs): the folder is unchanged by the record's own files."""
        if _identity(old) == _identity(new):
            return True
        if "files" not in old or old["files"] == new.get("files") or old["path"] != new.get("path"):
            return False
        try:
            return fingerprint(old["path"], old["files"])["sha256"] == old["sha256"]
        except FileNotFoundError:
            return False

    out_dir = feature_folder(data_dir, step)
    record = read_features_record(data_dir)
    # Files made for another manifest are about to be removed (stamp_manifest): they mix with nothing.
    made_for = record.get(MANIFEST_KEY, {}).get(step)
    kept = made_for in (None, manifest_fingerprint(rows)) and any(out_dir.glob(pattern))
    old = record.get(step, {})
    changed = [role for role in current if role in old and not same(old[role], current[role])]
    if changed and not overwrite and kept:
        details = "; ".join(f"{role}: {_described(old[role])} -> {_described(current[role])}" for role in changed)
        raise FeatureError(f"{out_dir} was computed with other pretrained files ({details}); "
                           f"rerun with --overwrite to recompute it with the new ones")
    agree_ranks(report, current)
    if rank_and_world()[0] != 0:
        return
    stamp_manifest(data_dir, step, rows, out_dir, report, pattern)
    record = read_features_record(data_dir)
    if record.get(step) != current:
        record[step] = current
        write_text_atomic(Path(data_dir) / FEATURES_RECORD, json.dumps(record, indent=2) + "\n")


def agree_ranks(report, models=None, error=""):
    """Under torchrun, the point every rank passes once per step (record_models; run_reported for a rank
    that stopped before it) before any of them writes: the step goes on only where no rank stopped and
    all loaded the same files (`models`, by sha256), else every rank stops with the first one's reason,
    so that no rank waits for one that has gone. Nothing to do in one process."""
    report.agreed = True
    rank, world = rank_and_world()
    if world == 1:
        return
    ranks = gather_from_ranks((error, models), world)
    if error:
        return
    stopped = [(r, reason) for r, (reason, _) in enumerate(ranks) if reason]
    if stopped:
        raise FeatureError(f"rank {stopped[0][0]} of {world} stopped: {stopped[0][1]}")
    first = ranks[0][1]
    for r, (_, theirs) in enumerate(ranks):
        theirs = theirs or {}
        for role in first:
            if _identity(theirs.get(role, {})) != _identity(first[role]):
                raise FeatureError(f"rank {r} loaded other {role} files than rank 0 ({_described(first[role])} -> "
                                   f"{_described(theirs.get(role, {}))}); every machine needs the same models "
                                   f"(MODELS_DIR, or the hub cache)")


def gather_reports(reports):
    """Under torchrun, every rank's reports merged step by step: counts added, failures and notes
    together (a note once), the longest time, rank 0's error (else the first another rank had); the
    same on every rank. A collective: every rank calls it, each with the reports of the steps it ran
    (rank 0's name them all). In one process, `reports` themselves."""
    world = rank_and_world()[1]
    if world == 1:
        return reports
    merged = {}
    for share_of_rank in gather_from_ranks(reports, world):
        for report in share_of_rank:
            into = merged.setdefault(report.step, StepReport(report.step, agreed=True))
            into.written += report.written
            into.skipped += report.skipped
            into.failed += report.failed
            into.notes += [note for note in report.notes if note not in into.notes]
            into.error = into.error or report.error
            into.seconds = max(into.seconds, report.seconds)
    return list(merged.values())


def rows_of(step, manifest, data_dir=None):
    """The manifest rows a step makes files for: every row ("all"), or ("labelled", the speech steps) the
    labelled rows and, given data_dir, the rows whose audio is data without a label (data_contract.
    carries_audio: rated on the attributes, or of a withheld partition) and whose Audio/ file the collector
    wrote (MSP-Podcast's X, O and Test3 rows; an IEMOCAP or CSV corpus's with --all-audio), so that
    --attribute-utterances rated and a withheld partition find their speech features. Without their audio
    such a row is context only, as before."""
    if step_entry(step).rows != "labelled":
        return manifest
    if data_dir is None:
        return [row for row in manifest if row["label"]]
    withheld = read_withheld(data_dir)
    return [row for row in manifest if row["label"] or (
        carries_audio(row, withheld) and (Path(data_dir) / "Audio" / f"{row['name']}.wav").is_file())]


def pending(rows, out_dir, is_valid, overwrite, report, weigh=None, suffix=".npy"):
    """The rows whose output (out_dir/<name><suffix>) is still to be made, each valid one counted as
    skipped. Under torchrun, this rank's share of them (distributed.share, by weigh(row): audio_weight
    where the step reads the audio): each rank checks every world-th row once rank 0 has recorded the
    models, and they divide what is left among them, so a rerun after a rank was stopped shares out
    only what it left."""
    rank, world = rank_and_world()
    wait_for_ranks()  # rank 0 has removed the files made for another manifest (record_models)
    to_do = [overwrite or not is_valid(out_dir / f"{row['name']}{suffix}") for row in rows[rank::world]]
    report.skipped += to_do.count(False)
    needed = [None] * len(rows)
    for r, flags in enumerate(gather_from_ranks(to_do, world)):
        needed[r::world] = flags
    return share([row for row, row_needed in zip(rows, needed) if row_needed], weigh)


def audio_weight(data_dir):
    """pending's weigh where a step reads the audio: a row's seconds (its wav's header), its share of the work."""
    return lambda row: audio_seconds(Path(data_dir) / "Audio" / f"{row['name']}.wav")


def run_reported(report, work):
    """Run a step's body. A user's problem that stops the whole step (a model missing, a manifest
    that does not read) is recorded, and the next step runs; anything else is raised. Under torchrun,
    -> the step's report merged over the ranks (gather_reports)."""
    start = time.perf_counter()
    try:
        work()
    except (FeatureError, DataError) as e:
        report.error = str(e)
    if not report.agreed:  # stopped before record_models: the other ranks wait there to hear it
        agree_ranks(report, error=report.error)
    report.seconds = time.perf_counter() - start
    return gather_reports([report])[0]
