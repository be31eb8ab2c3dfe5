"""Evaluation protocols: which utterances each fold tests, trains and validates on.

  session5   train on sessions 1-4, test on 5 (IEMOCAP)
  loso       one fold per session held out
  speaker    one fold per speaker held out; the test speaker's session partner shares their dialogues,
             so their context, and is not trained on
  folds      one fold per value of a manifest column (--fold-by: session, speaker, group, ...); no
             dialogue of the test fold is trained on
  official   a corpus that ships train/dev/test splits (the manifest's split column): train on train,
             choose the checkpoint on dev, test on test
Validation comes from the training utterances: a stratified share (default), one held-out speaker,
the test session's other speaker ("original", the original's cross-validation script), or the last
training session, trained on too ("in-train-session", Siriwardhana et al.'s released lists).
"""
import numpy as np

from mmser.settings import DEFAULT_FOLD_BY, DEFAULTS, RunError

SESSION_PROTOCOLS = ("session5", "loso", "speaker")


def held_out_sets(utterances, protocol, fold_by=DEFAULT_FOLD_BY):
    """[(key, held-out values)] per fold: ("test_sessions", [5]), ("test_speakers", ["Ses01F"]),
    ("test_<fold_by>", [value]), in fold order."""
    sessions = sorted({u["session"] for u in utterances})
    if protocol in SESSION_PROTOCOLS and sessions == [0]:  # what other corpora's collectors write
        raise RunError(f"protocol {protocol} holds out IEMOCAP's sessions, and this corpus has none: use --protocol "
                       f"official (its train/dev/test split) or folds --fold-by COLUMN")
    if protocol == "session5":
        if 5 not in sessions:
            raise RunError("protocol session5 needs session 5 in the data")
        return [("test_sessions", [5])]
    if protocol == "loso":
        return [("test_sessions", [s]) for s in sessions]
    if protocol == "speaker":
        return [("test_speakers", [sp]) for s in sessions for sp in speakers_of_session(utterances, s)]
    if protocol == "folds":
        if fold_by not in utterances[0]:
            raise RunError(f"--fold-by {fold_by}: the manifest has no such column (session, speaker, dialog, or "
                           f"one of the optional split, group, sentiment)")
        values = sorted({u[fold_by] for u in utterances})
        if len(values) < 2:
            raise RunError(f"--fold-by {fold_by}: every labelled utterance has the value {values[0]!r}; folds need "
                           f"at least two values")
        return [(f"test_{fold_by}", [v]) for v in values]
    raise ValueError(f"unknown protocol {protocol!r}: use session5, loso or speaker")


def speakers_of_session(utterances, session):
    return sorted({u["speaker"] for u in utterances if u["session"] == session})


def test_and_pool(utterances, key, held_out, fold_by):
    """(the test utterances, the utterances training and validation may come from, the test sessions)."""
    if key == "test_sessions":
        test_sessions = set(held_out)
        test = [u for u in utterances if u["session"] in test_sessions]
    elif key == "test_speakers":
        test_sessions = {u["session"] for u in utterances if u["speaker"] == held_out[0]}
        test = [u for u in utterances if u["speaker"] == held_out[0]]
    else:  # --protocol folds: no dialogue the test fold speaks in trains
        test = [u for u in utterances if u[fold_by] == held_out[0]]
        shared = {(u["session"], u["dialog"]) for u in test}
        pool = [u for u in utterances if u[fold_by] != held_out[0] and (u["session"], u["dialog"]) not in shared]
        return test, pool, set()
    return test, [u for u in utterances if u["session"] not in test_sessions], test_sessions


def validation_split(pool, k, val_split, val_fraction, seed):
    """(train, validation) of fold k from its pool, for every --val-split but "original"."""
    from sklearn.model_selection import train_test_split
    if val_split == "speaker":
        candidates = sorted({u["speaker"] for u in pool})
        val_speaker = candidates[np.random.RandomState(seed + k).randint(len(candidates))]
        return [u for u in pool if u["speaker"] != val_speaker], [u for u in pool if u["speaker"] == val_speaker]
    if val_split == "stratified":
        try:
            train, val = train_test_split(pool, test_size=val_fraction, random_state=seed,
                                          stratify=[u["label"] for u in pool])
        except ValueError as e:  # too few utterances of a class, or too small a share, to stratify
            raise RunError(f"fold {k}: no stratified validation share of {val_fraction:.0%} from "
                           f"{len(pool)} utterances ({e})") from None
        return sorted(train, key=lambda u: u["index"]), sorted(val, key=lambda u: u["index"])
    if val_split == "in-train-session":
        # As Siriwardhana et al.'s released lists: session 4 validates and is trained on too.
        val_session = max(u["session"] for u in pool) if pool else None
        return pool, [u for u in pool if u["session"] == val_session]
    raise ValueError(f"unknown validation split {val_split!r}: use stratified, speaker, original or "
                     f"in-train-session")


def make_folds(utterances, protocol, val_split=DEFAULTS.val_split, val_fraction=DEFAULTS.val_fraction, seed=0,
               fold_by=DEFAULT_FOLD_BY):
    """-> list of {"fold", "test_sessions" | "test_speakers" | "test_<fold_by>" | "test_split", "train", "val",
    "test"} (utterance lists)."""
    if protocol == "official":
        return [official_fold(utterances)]
    if val_split == "original" and protocol == "folds":
        raise RunError("--val-split original is IEMOCAP's split by session; with --protocol folds use "
                       "stratified or speaker")
    folds = []
    for k, (key, held_out) in enumerate(held_out_sets(utterances, protocol, fold_by), 1):
        test, pool, test_sessions = test_and_pool(utterances, key, held_out, fold_by)
        fold = {"fold": k, key: held_out}
        if val_split == "original":
            # The test session's F speaker is tested, its M speaker validates (the original's script).
            test_speakers = set(held_out) if key == "test_speakers" else {
                sp for s in test_sessions for sp in speakers_of_session(utterances, s) if sp.endswith("F")}
            in_session = [u for u in utterances if u["session"] in test_sessions]
            val = [u for u in in_session if u["speaker"] not in test_speakers]
            test = [u for u in in_session if u["speaker"] in test_speakers]
            fold["test_speakers"] = sorted(test_speakers)
            train = pool
        else:
            train, val = validation_split(pool, k, val_split, val_fraction, seed)
        if not train or not val or not test:
            raise RunError(f"fold {k} ({key} {held_out}): empty split (train {len(train)}, "
                           f"validation {len(val)}, test {len(test)})")
        fold.update(train=train, val=val, test=test)
        folds.append(fold)
    return folds


def official_fold(utterances):
    """The corpus's own splits (the manifest's split column): train on train, validate on dev, test on test."""
    if "split" not in utterances[0]:
        raise RunError("--protocol official needs the manifest's split column (train/dev/test), which corpora that "
                       "ship their splits have (meld_data_collect.py, or csv_data_collect.py with a split column)")
    fold = {"fold": 1, "test_split": ["test"]}
    fold.update({part: [u for u in utterances if u["split"] == split]
                 for part, split in (("train", "train"), ("val", "dev"), ("test", "test"))})
    if not all(fold[part] for part in ("train", "val", "test")):
        raise RunError(f"--protocol official: an empty split (train {len(fold['train'])}, dev {len(fold['val'])}, "
                       f"test {len(fold['test'])} labelled utterances)")
    return fold


def fold_title(fold):
    """What a fold tests, for the log and the tables: "session 5 (Ses05F)", "speaker Ses01M", "split test"."""
    held_out = [k for k in fold if k.startswith("test_") and k not in ("test_sessions", "test_speakers")]
    if held_out:  # --protocol folds or official
        return f"{held_out[0][len('test_'):]} " + ",".join(map(str, fold[held_out[0]]))
    if "test_sessions" in fold:
        title = "session " + ",".join(map(str, fold["test_sessions"]))
        return title + (f" ({','.join(fold['test_speakers'])})" if "test_speakers" in fold else "")
    return "speaker " + ",".join(fold["test_speakers"])
