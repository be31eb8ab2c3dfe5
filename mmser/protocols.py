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

Utterances without a label (label -1: rated on the attributes only, --attribute-utterances rated) leave the
folds of the labelled ones exactly as they are: the labelled utterances are split first, as always, and
each other utterance then joins the part its session, speaker, dialogue or split belongs to (place_unlabelled),
or none where it would put a test dialogue or speaker into training. Under the official protocol the
manifest's split decides for every utterance, and a withheld partition's (never scored) is kept apart.
"""
import numpy as np

from mmser.settings import DEFAULT_FOLD_BY, DEFAULTS, TEST_SPLITS, RunError

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
               fold_by=DEFAULT_FOLD_BY, test_set=DEFAULTS.test_set, withheld=()):
    """-> list of {"fold", "test_sessions" | "test_speakers" | "test_<fold_by>" | "test_split", "train", "val",
    "test"} (utterance lists); under the official protocol, the partition test_set tests (settings.TEST_SPLITS)
    and the withheld partitions' utterances are the fold's "withheld" ({split: utterances}). Unlabelled
    utterances (label -1) join the folds of the labelled ones (place_unlabelled)."""
    if protocol == "official":
        return [official_fold(utterances, test_set, withheld)]
    labelled = [u for u in utterances if u["label"] >= 0]
    folds = labelled_folds(labelled, protocol, val_split, val_fraction, seed, fold_by)
    unlabelled = [u for u in utterances if u["label"] < 0]
    if unlabelled:
        for fold in folds:
            place_unlabelled(fold, unlabelled, val_split, fold_by)
    return folds


def labelled_folds(utterances, protocol, val_split, val_fraction, seed, fold_by):
    """make_folds over labelled utterances."""
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


def place_unlabelled(fold, unlabelled, val_split, fold_by):
    """Add the utterances without a label to `fold` (made from the labelled ones, which stay where they are):
    each joins the test, validation or training part that its session, speaker or dialogue belongs to, or
    none where it would train on what the fold tests (the test speaker's session partner, a test dialogue)."""
    parts = {part: fold[part] for part in ("train", "val", "test")}
    speakers = {part: {u["speaker"] for u in us} for part, us in parts.items()}
    dialogues = {part: {(u["session"], u["dialog"]) for u in us} for part, us in parts.items()}
    if "test_sessions" in fold and "test_speakers" not in fold:  # session5, loso
        held = lambda u: "test" if u["session"] in fold["test_sessions"] else "pool"  # noqa: E731
    elif "test_speakers" in fold:  # speaker, or the original's split of a session: the sessions of the test
        sessions = {u["session"] for u in parts["test"]} | set(fold.get("test_sessions", ()))

        def held(u):
            if u["session"] not in sessions:
                return "pool"
            if u["speaker"] in fold["test_speakers"]:
                return "test"
            # the test speaker's session partner: validates under the original's split, else is left out
            return "val" if u["speaker"] in speakers["val"] and u["speaker"] not in speakers["train"] else None
    else:  # --protocol folds: no dialogue the test fold speaks in trains
        values = fold[next(k for k in fold if k.startswith("test_"))]

        def held(u):
            dialogue = (u["session"], u["dialog"])
            if u[fold_by] in values:
                return None if dialogue in dialogues["train"] | dialogues["val"] else "test"
            return None if dialogue in dialogues["test"] else "pool"
    added = {"train": [], "val": [], "test": []}
    for u in unlabelled:
        part = held(u)
        if part == "pool":
            if u["speaker"] in speakers["val"] and u["speaker"] not in speakers["train"]:  # --val-split speaker
                part = "val"
            else:
                part = "train"
                if val_split == "in-train-session" and u["session"] in {v["session"] for v in parts["val"]}:
                    added["val"].append(u)  # the last training session validates and trains (the released lists)
        if part:
            added[part].append(u)
    for part, us in added.items():
        fold[part] = sorted(parts[part] + us, key=lambda u: u["index"])
    return fold


def official_fold(utterances, test_set=DEFAULTS.test_set, withheld=()):
    """The corpus's own splits (the manifest's split column): train on train, validate on dev, test on the
    partition test_set names (settings.TEST_SPLITS: test1 is the split "test"); the utterances of the
    withheld partitions are kept apart, to be predicted and never scored."""
    if "split" not in utterances[0]:
        raise RunError("--protocol official needs the manifest's split column (train/dev/test), which corpora that "
                       "ship their splits have (meld_data_collect.py, or csv_data_collect.py with a split column)")
    tested = TEST_SPLITS[test_set]
    if tested in withheld:
        raise RunError(f"--test-set {test_set}: the corpus withholds its labels (classes.json \"withheld\"), so it "
                       f"cannot be scored; every --protocol official run predicts it into fold1/submission_{tested}"
                       f"*.csv for the challenge; test on test1 or test2")
    fold = {"fold": 1, "test_split": [tested]}
    fold.update({part: [u for u in utterances if u["split"] == split]
                 for part, split in (("train", "train"), ("val", "dev"), ("test", tested))})
    if not all(fold[part] for part in ("train", "val", "test")):
        raise RunError(f"--protocol official: an empty split (train {len(fold['train'])}, dev {len(fold['val'])}, "
                       f"{tested} {len(fold['test'])} utterances)")
    kept = {split: [u for u in utterances if u["split"] == split] for split in withheld}
    if any(kept.values()):
        fold["withheld"] = {split: us for split, us in kept.items() if us}
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
