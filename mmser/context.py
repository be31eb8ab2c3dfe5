"""Context vectors: each utterance's sentence embedding with its dialogue neighbours'.

For utterance i of a dialogue of n, slot j (j = -c..c, laid out in that order) holds the sentence
embedding of utterance i+j of the same dialogue in corpus order, whatever its emotion, or zeros past
the dialogue's edges; the utterance itself is the centre slot. context_vectors and dialogues are the
one way this is done, for the extraction step (write_context_vectors: FullBertEmb{c}/ or
FullSentenceEmb{c}-<model>/) and for predict.py's conversations alike.
"""
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import DataError, feature_folder, qualified_step, read_manifest
from mmser.distributed import rank_and_world
from mmser.extraction import StepReport, gather_reports, stamp_manifest, valid_npy
from mmser.utils import save_npy_atomic

DEFAULT_CONTEXT = (3,)


def context_vectors(embeddings, c):
    """(n, H) embeddings of one dialogue in corpus order -> (n, (2c+1)*H) context vectors."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    n, width = embeddings.shape
    edge = np.zeros((c, width), dtype=np.float32)
    padded = np.concatenate([edge, embeddings, edge])
    return np.stack([padded[i:i + 2 * c + 1].reshape(-1) for i in range(n)]) if n else \
        np.zeros((0, (2 * c + 1) * width), dtype=np.float32)


def dialogues(keys):
    """Positions grouped into dialogues, in order of first appearance, each in the given order:
    equal keys are one dialogue, a key of None a dialogue of its own. The manifest's rows (key
    (session, dialog)) and predict.py's lists (key: the dialog column, None when empty) alike."""
    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(("alone", i) if key is None else ("dialog", key), []).append(i)
    return list(groups.values())


def _load_embeddings(data_dir, rows, source="sentence-embeddings"):
    """Every sentence embedding that loads, by name; the width they share."""
    loaded, widths = {}, {}
    for row in rows:
        path = feature_folder(data_dir, source) / f"{row['name']}.npy"
        if valid_npy(path, np.float32):
            loaded[row["name"]] = np.load(path)
            widths[loaded[row["name"]].shape[0]] = widths.get(loaded[row["name"]].shape[0], 0) + 1
    if len(widths) > 1:
        raise DataError(f"{feature_folder(data_dir, source)}: embeddings of different widths "
                        f"{sorted(widths)}; rerun feature_ext.py sentence-embeddings --overwrite")
    return loaded, next(iter(widths), None)


def _holds(path, vector):
    """True when `path` already holds exactly `vector`."""
    return valid_npy(path, np.float32, shape=vector.shape) and np.array_equal(np.load(path), vector)


def write_context_vectors(data_dir, contexts=DEFAULT_CONTEXT, overwrite=False, progress=True, tag=None,
                          transcripts=None):
    """Write FullBertEmb{c}/ for each c in `contexts`; returns one StepReport per c. With `tag` (the
    data_contract.sentence_tag of another sentence model or pooling), from SentenceEmb-<tag>/ into
    FullSentenceEmb{c}-<tag>/; with `transcripts`, those of that transcript set (under ASR-<tag>/,
    from its own embeddings). Under torchrun rank 0 writes them all (seconds for IEMOCAP, against
    minutes for the steps before) and every rank returns its reports."""
    if rank_and_world()[0] != 0:
        return gather_reports([])
    return gather_reports(_write_context_vectors(data_dir, contexts, overwrite, progress, tag, transcripts))


def _write_context_vectors(data_dir, contexts, overwrite, progress, tag, transcripts):
    data_dir = Path(data_dir)
    source = qualified_step("sentence-embeddings", tag, transcripts)
    reports = [StepReport(qualified_step(f"context-{c}", tag, transcripts)) for c in contexts]
    start = time.perf_counter()
    try:
        rows = read_manifest(data_dir)
        embeddings, width = _load_embeddings(data_dir, rows, source)
    except DataError as e:
        for report in reports:
            report.error = str(e)
        return reports
    if width is None:  # one line, not a failure for every utterance of every window
        for report in reports:
            report.error = (f"{feature_folder(data_dir, source)}: no valid sentence embedding; "
                            f"run the sentence-embeddings step first")
        return reports
    groups = dialogues([(row["session"], row["dialog"]) for row in rows])
    for c, report in zip(contexts, reports):
        out_dir = feature_folder(data_dir, report.step)
        stamp_manifest(data_dir, report.step, rows, out_dir, report)
        for dialogue in tqdm(groups, desc=report.step, unit="dialogue", disable=not progress):
            names = [rows[i]["name"] for i in dialogue]
            missing = [name for name in names if name not in embeddings]
            stack = np.stack([embeddings.get(name, np.zeros(width or 0, np.float32)) for name in names])
            vectors = context_vectors(stack, c)
            for i, name in enumerate(names):
                path = out_dir / f"{name}.npy"
                needed = [n for n in names[max(0, i - c):i + c + 1] if n in missing]
                if needed:
                    embedding = feature_folder(data_dir, source) / f"{needed[0]}.npy"
                    report.fail(name, f"no valid sentence embedding {embedding}"
                                      + (f" (and {len(needed) - 1} more in its window)" if len(needed) > 1 else ""))
                    continue
                # Compared by content, not just checked for shape: after the sentence embeddings
                # are recomputed (another sentence model), every stale context vector is rewritten.
                if not overwrite and _holds(path, vectors[i]):
                    report.skipped += 1
                    continue
                save_npy_atomic(path, vectors[i])
                report.written += 1
        report.seconds = time.perf_counter() - start
        start = time.perf_counter()
    return reports
