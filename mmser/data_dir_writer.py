"""Writing a DATA_DIR: what every collector shares (the data contract's files, written the same way).

  write_data_dir(DATA_DIR, rows, read_row_audio, classes, about, progress, wants_audio=, extra_files=)
                         Text/ of every row, Audio/ of the labelled ones (or of the rows wants_audio
                         picks), a corpus's own extra files (IEMOCAP's labels_train_t.txt), classes.json
                         and, last, utterances.csv; files whose content is unchanged are not rewritten,
                         and the Audio/ and Text/ files of an earlier run that this one does not vouch
                         for are removed (only names a collector gives: a user's own files survive)
  name_rows(rows)        name = "{index}_s_{session}_{emotion}", as the data contract gives IEMOCAP's
  CorpusError            a corpus a collector cannot read; the message names the file
Every file is written atomically and the manifest last, so an interrupted run leaves no half-written
file and no manifest that promises files which are not there.
"""
import csv
import io
import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from mmser.data_contract import CLASSES_RECORD, MANIFEST, MANIFEST_COLUMNS, OPTIONAL_COLUMNS, SAMPLE_RATE, classes_bytes
from mmser.utils import AudioError, wav_bytes, write_bytes_atomic

# TAB, CR and the other characters str.splitlines() breaks on: none may survive inside a text.
INNER_BREAK_RE = re.compile(r"[\t\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# The names the collectors give: only these are ever removed from DATA_DIR.
NAME_RE = re.compile(r"^\d+_s_\d+_[A-Za-z0-9-]+$")
# utils.atomic_path's temporary names: ".<target>.<random>.tmp<suffix>"
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp\.[a-z]+$")


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



def has_label(row):
    return bool(row["label"])


def write_data_dir(data_dir, rows, read_row_audio, classes, about, progress=True, wants_audio=has_label,
                   extra_files=None):
    """Text/ of every row, Audio/ of the rows wants_audio picks (the labelled ones; read_row_audio(row)
    -> 16 kHz mono int16, or AudioError: that row becomes context only), extra_files ({file name:
    rows -> bytes}, made from the rows as written), classes.json and, last, utterances.csv.
    -> ([(row, problem)] of the audio that failed, [removed files])."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CorpusError(f"{data_dir}: cannot create DATA_DIR ({err.strerror})") from None
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
    removed = remove_stale(data_dir, rows, audio_names, tuple(extra_files))
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
