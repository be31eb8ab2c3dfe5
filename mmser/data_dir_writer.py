"""Writing a DATA_DIR: what every collector shares (the data contract's files, written the same way).

  write_data_dir(DATA_DIR, rows, read_row_audio, classes, about, progress, wants_audio=, extra_files=)
                         Text/ of every row, Audio/ of the labelled ones (or of the rows wants_audio
                         picks), a corpus's own extra files (IEMOCAP's labels_train_t.txt), classes.json
                         and, last, utterances.csv; files whose content is unchanged are not rewritten,
                         and the Audio/ and Text/ files of an earlier run that this one does not vouch
                         for are removed (only names a collector gives: a user's own files survive)
  claim_data_dir(DATA_DIR, about, overwrite)
                         a DATA_DIR belongs to the corpus whose collector wrote it (classes.json's
                         "collector" and "corpus"): another corpus's is refused without overwrite, and
                         with it all the earlier corpus's files go (features included)
  check_coverage(rows, classes, where)
                         a corpus with no labelled utterance, or a class or split without one, is refused
  context_audio_advice(DATA_DIR)
                         what to do about an utterance without audio, in the words of its collector
  name_rows(rows)        name = "{index}_s_{session}_{emotion}", as the data contract gives IEMOCAP's
  CorpusError            a corpus a collector cannot read; the message names the file

Every collector writes the audio of its labelled utterances, and with --all-audio that of every
utterance that has audio (speech recognition transcribes the context too): one rule, so that the
advice for a missing wav is the same whichever collector wrote DATA_DIR. MELD has no flag: all its
utterances are labelled, and the only ones without audio are clips the release lacks or breaks.
Every file is written atomically and the manifest last, so an interrupted run leaves no half-written
file and no manifest that promises files which are not there.
"""
import csv
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from mmser.data_contract import (CLASSES_RECORD, FEATURES_RECORD, MANIFEST, MANIFEST_COLUMNS, OPTIONAL_COLUMNS,
                                 SAMPLE_RATE, SPLITS, STEPS, classes_bytes)
from mmser.utils import AudioError, wav_bytes, write_bytes_atomic

# TAB, CR and the other characters str.splitlines() breaks on: none may survive inside a text.
INNER_BREAK_RE = re.compile(r"[\t\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# The names the collectors give: only these are ever removed from DATA_DIR.
NAME_RE = re.compile(r"^\d+_s_\d+_[A-Za-z0-9-]+$")
# utils.atomic_path's temporary names: ".<target>.<random>.tmp<suffix>"
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp\.[a-z]+$")
# IEMOCAP's extra file, the seed's label list (mocap_data_collect.py writes it; the data contract lists it).
SEED_LABELS = "labels_train_t.txt"
# Who wrote a DATA_DIR made before classes.json said so: IEMOCAP's and MELD's collectors named their
# corpus; a CSV corpus was named by its file.
COLLECTOR_OF_CORPUS = {"IEMOCAP": "mocap_data_collect.py", "MELD": "meld_data_collect.py"}


class CorpusError(ValueError):
    """The corpus (or a manifest) is not what a collector can read; the message names the file."""


def normalise_transcript(text):
    return INNER_BREAK_RE.sub(" ", text).strip()


def few(items, n=3):
    """The first n items and how many more, for a summary line."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def file_safe(label):
    """A label as the last part of a file name: letters, digits and '-' kept, the rest '-'."""
    return re.sub(r"[^A-Za-z0-9-]", "-", label) or "xxx"


def name_rows(rows):
    """name = "{index}_s_{session}_{emotion}", as the data contract gives IEMOCAP's."""
    for index, row in enumerate(rows):
        row["name"] = f"{index}_s_{row['session']}_{file_safe(row['emotion']) if row['emotion'] else 'xxx'}"
    return rows


def write_if_changed(path, data):
    """Atomically write bytes, leaving the file (and its mtime) alone when it already holds them."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    write_bytes_atomic(path, data)



def manifest_columns(rows):
    """MANIFEST_COLUMNS, then the optional columns these rows have."""
    return MANIFEST_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in rows[0])


def manifest_bytes(rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = manifest_columns(rows)
    writer.writerow(columns)
    writer.writerows([row[c] for c in columns] for row in rows)
    return buf.getvalue().encode("utf-8")


def is_our_file(name, extra_names=()):
    """A file a collector writes: the manifest, classes.json, a corpus's extra files, or a name it gives."""
    return name in (MANIFEST, CLASSES_RECORD, *extra_names) or (
        Path(name).suffix in (".txt", ".wav") and NAME_RE.match(Path(name).stem) is not None)


def remove_stale(data_dir, rows, audio_names, extra_names=()):
    """Remove the Audio/ and Text/ files named like an utterance that this run does not vouch
    for, and temporary files a killed run (one that could not clean up) left beside ours.

    Vouched for: the Text/ of every row, the Audio/ of the names in audio_names (the rows whose audio
    this run wrote: not a row whose wav --allow-missing let through, or an earlier run's copy would be
    read as its audio). Only names a collector gives are touched, so a user's own files survive.
    Returns the removed files (not the temporary ones) as "Audio/<name>.wav", ...
    """
    keep = {("Text", r["name"] + ".txt") for r in rows} | {("Audio", name + ".wav") for name in audio_names}
    is_ours = lambda name: is_our_file(name, extra_names)  # noqa: E731
    removed = []
    for sub in ("Text", "Audio", "."):
        folder = Path(data_dir) / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            temp = TEMP_RE.match(f.name)
            if temp and is_ours(temp["target"]):
                f.unlink()
            elif sub != "." and is_ours(f.name) and (sub, f.name) not in keep:
                f.unlink()
                removed.append(f"{sub}/{f.name}")
    return removed



# ------------------------------------------------------------------------------------------------
# whose DATA_DIR

def data_dir_owner(data_dir):
    """{"collector", "corpus"} of the corpus DATA_DIR holds; None when it holds none (no classes.json, no
    manifest). A DATA_DIR written before classes.json named its collector: by its corpus; before
    classes.json existed: IEMOCAP's."""
    data_dir = Path(data_dir)
    record = data_dir / CLASSES_RECORD
    if record.is_file():
        try:
            about = json.loads(record.read_text(encoding="utf-8"))
            corpus = str(about["corpus"])
        except (OSError, ValueError, KeyError, TypeError):
            return {"collector": "an unknown collector", "corpus": f"unreadable {CLASSES_RECORD}"}
        return {"corpus": corpus, "collector": about.get("collector") or COLLECTOR_OF_CORPUS.get(corpus) or (
            "csv_data_collect.py" if corpus.lower().endswith(".csv") else f"{corpus}'s collector")}
    if (data_dir / MANIFEST).is_file():
        return {"collector": "mocap_data_collect.py", "corpus": "IEMOCAP"}
    return None


def claim_data_dir(data_dir, about, overwrite=False):
    """The other corpus DATA_DIR holds, to be replaced (overwrite), or None when it holds none or this one
    (a rerun: its files are brought up to date). CorpusError without overwrite: one line naming both."""
    owner = data_dir_owner(data_dir)
    # A collector that does not name itself in `about` is told apart by its corpus alone.
    if owner is None or (owner["corpus"] == about["corpus"]
                         and owner["collector"] == about.get("collector", owner["collector"])):
        return None
    if not overwrite:
        raise CorpusError(f"{data_dir}: holds the DATA_DIR of another corpus ({owner['corpus']}, written by "
                          f"{owner['collector']}); give --overwrite to replace it with {about['corpus']} (all its files "
                          f"go, features included), or give another DATA_DIR")
    return owner


def feature_folders(data_dir):
    """DATA_DIR's folders that the extraction steps write (data_contract.STEPS' folders, every model's
    and transcript set's), sorted."""
    from mmser.speech.routes import ROUTES  # each route's step (vqw2vTokens/, SpeechLayers-*/) is the route's own
    patterns = set()
    for step in [*STEPS.values(), *(STEPS[name] for name in ROUTES)]:
        for template in (step.folder, step.per_model):
            if template:  # the top folder: ASR-{model}/Text lives in ASR-{model}/
                patterns.add(re.escape(template.split("/")[0]).replace(r"\{c\}", r"\d+").replace(r"\{model\}", ".+"))
    folder_re = re.compile("^(?:" + "|".join(sorted(patterns)) + ")$")
    return sorted(p for p in Path(data_dir).iterdir() if p.is_dir() and folder_re.match(p.name))


def remove_corpus(data_dir):
    """Remove every file of the corpus DATA_DIR holds: the manifest first (no manifest then promises
    what is gone), classes.json, labels_train_t.txt, features.json, the feature folders (made for that
    manifest), and the Text/ and Audio/ files named like an utterance (a user's own files survive).
    -> what went, as "utterances.csv", "BertEmb/", "Text/ (400 files)", ..."""
    data_dir, removed = Path(data_dir), []
    for name in (MANIFEST, CLASSES_RECORD, SEED_LABELS, FEATURES_RECORD):
        if (data_dir / name).is_file():
            (data_dir / name).unlink()
            removed.append(name)
    for folder in feature_folders(data_dir):
        shutil.rmtree(folder)
        removed.append(f"{folder.name}/")
    for sub in ("Text", "Audio"):
        ours = [f for f in (data_dir / sub).glob("*") if f.is_file() and is_our_file(f.name)]
        for f in ours:
            f.unlink()
        if ours:
            removed.append(f"{sub}/ ({len(ours)} files)")
    return removed


def check_coverage(rows, classes, where, hint=""):
    """CorpusError (one line, naming `where`) unless some utterance is labelled, every class has a labelled
    utterance, and so has every split the corpus has (the official protocol trains, validates and tests on
    them): a collection that ends without them has nothing a model can be trained or scored on."""
    labels = Counter(r["label"] for r in rows if r["label"])
    if not labels:
        raise CorpusError(f"{where}: none of the {len(rows)} utterances is labelled with usable audio; nothing to "
                          f"train or test on{hint}")
    missing = [c for c in classes if not labels[c]]
    if missing:
        raise CorpusError(f"{where}: no labelled utterance with usable audio of class {', '.join(missing)} (of "
                          f"{', '.join(classes)}){hint}")
    if "split" in rows[0]:
        empty = [s for s in SPLITS if any(r["split"] == s for r in rows)
                 and not any(r["split"] == s and r["label"] for r in rows)]
        if empty:
            raise CorpusError(f"{where}: split {', '.join(empty)} has no labelled utterance with usable audio{hint}")


def context_audio_advice(data_dir):
    """What to do about an utterance of DATA_DIR without Audio/<name>.wav, in the words of the collector
    that wrote DATA_DIR (classes.json)."""
    collector = (data_dir_owner(data_dir) or {}).get("collector", "the corpus's collector")
    if collector == "meld_data_collect.py":
        return ("meld_data_collect.py writes every clip's audio; this utterance's clip is missing or unusable in the "
                "release (listed when it ran)")
    return (f"{collector} writes the labelled utterances' audio only; rerun it with --all-audio so that the "
            f"context utterances can be transcribed too")


# ------------------------------------------------------------------------------------------------
# writing

def has_label(row):
    return bool(row["label"])


def write_data_dir(data_dir, rows, read_row_audio, classes, about, progress=True, wants_audio=has_label,
                   extra_files=None, overwrite=False, check=None):
    """Text/ of every row, Audio/ of the rows wants_audio picks (the labelled ones; read_row_audio(row)
    -> 16 kHz mono int16, or AudioError: that row becomes context only), extra_files ({file name:
    rows -> bytes}, made from the rows as written), classes.json and, last, utterances.csv.
    about: what classes.json says of the corpus beside its classes: "corpus" and "collector" (the script)
    at least; a DATA_DIR of another corpus is refused (claim_data_dir: call it first, to refuse before
    any slow check), or with overwrite emptied of it first. check(rows): called once the audio is read, before classes.json and the manifest are written
    (check_coverage). -> ([(row, problem)] of the audio that failed, [removed files])."""
    data_dir = Path(data_dir)
    replaced = claim_data_dir(data_dir, about, overwrite)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CorpusError(f"{data_dir}: cannot create DATA_DIR ({err.strerror})") from None
    removed = [] if replaced is None else remove_corpus(data_dir)
    problems, audio_names, extra_files = [], set(), extra_files or {}
    for row in tqdm(rows, desc="writing utterances", unit="utt", disable=not progress):
        write_if_changed(data_dir / "Text" / f"{row['name']}.txt", row["transcript"].encode("utf-8"))
        if wants_audio(row):
            try:
                samples = read_row_audio(row)
            except AudioError as err:
                problems.append((row, str(err)))
                row["label"] = ""  # its text is still its neighbours' context
                continue
            write_if_changed(data_dir / "Audio" / f"{row['name']}.wav", wav_bytes(samples, SAMPLE_RATE))
            audio_names.add(row["name"])
    if check is not None:
        check(rows)
    removed += remove_stale(data_dir, rows, audio_names, tuple(extra_files))
    for name, make in extra_files.items():
        write_if_changed(data_dir / name, make(rows))
    write_if_changed(data_dir / CLASSES_RECORD, classes_bytes(classes, **about))
    write_if_changed(data_dir / MANIFEST, manifest_bytes(rows))
    return problems, removed


def count_table(rows, classes, by):
    """Utterances per value of `by` (split, group, ...) and per class, as printed after a run."""
    header = [by, "dialogues", "utterances"] + list(classes) + ["labelled", "context"]
    lines = []
    for value in sorted({r[by] for r in rows}, key=str) + ["all"]:
        sel = [r for r in rows if value == "all" or r[by] == value]
        labels = Counter(r["label"] for r in sel)
        lines.append([str(value), str(len({(r['session'], r['dialog']) for r in sel})), str(len(sel))]
                     + [str(labels[c]) for c in classes] + [str(len(sel) - labels[""]), str(labels[""])])
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in [header, *lines])
