"""A researcher's own corpus, listed in a CSV, into DATA_DIR: the manifest, the transcripts, the audio.

    python csv_data_collect.py CORPUS.csv DATA_DIR [--classes a,b,c] [--allow-missing] [--all-audio] [--overwrite]
                               [--attribute-scale LOW:HIGH | --attribute-scale NAME=LOW:HIGH ...]

Reads a CSV (UTF-8, a spreadsheet's BOM allowed) with the columns
    wav, text, label          required: audio file (relative to the CSV's folder), transcript, class
    id                        utterance id (default: "row<N>", N the CSV line); must be unique
    dialog, order             conversation and position in it (default: the rows' order)
    speaker, split, group     who speaks; train/dev/test of a corpus that ships splits (main.py
                              --protocol official); any grouping to hold out (--protocol folds --fold-by group)
    start, end                seconds: the utterance is that stretch of the wav
    valence, arousal, dominance   dimensional ratings (main.py --target dimensional|both), any numeric range:
                              --attribute-scale gives it (LOW:HIGH for every one, NAME=LOW:HIGH for one),
                              classes.json records it, and a value outside it is named with its CSV line;
                              an empty cell is an unknown value
Any other column is refused: a misspelt "dialogue" would silently lose the conversation order.
A row with an empty label is context only: its text is its neighbours' context, it is not trained
on or tested, and its wav may be empty; a wav it names that is not there is listed. Its audio is
written with --all-audio (speech recognition then transcribes the context too), and then checked
as a labelled row's is. Audio in any format, rate and channel count that
soundfile reads becomes 16 kHz mono PCM16 (utils.read_audio, as predict.py reads recordings).

Writes the DATA_DIR that mocap_data_collect.py writes (the data contract), for the same later stages:
    DATA_DIR/utterances.csv      one row per utterance, dialogues in order of first appearance, each
                                 in its order; the columns of data_contract.MANIFEST_COLUMNS, then split
                                 and group when the CSV has them. session is 0, emotion is the label.
    DATA_DIR/Text/<name>.txt     every transcript, one line
    DATA_DIR/Audio/<name>.wav    16 kHz mono PCM16, for the labelled rows and the rated ones with a wav (every
                                 row with a wav: --all-audio)
    DATA_DIR/classes.json        the label set: --classes in that order, or the labels sorted; the
                                 corpus (the CSV's file name) and collector (csv_data_collect.py); the
                                 attributes and their scales, when the CSV rates any
with name = "{index}_s_0_{label}" ("xxx" for a context-only row). A row without a dialog is a
conversation of its own.

Checked before anything is written, each problem named with its CSV line: a missing column, an
unknown column, an empty text or wav on a labelled row, a missing, unreadable or cut-off audio file,
start/end that are not times inside the file, an order that is not a number or repeats in a
dialogue, a label that appears once (no model can learn it, nor can a stratified split hold it),
a label outside --classes, duplicated ids, a split outside train/dev/test. --allow-missing goes on
past missing or unusable audio: those rows become context only, and are listed. A collection that
would end with no labelled row, or a class of the label set or a split without one, stops. Files are
written atomically, the manifest last; a rerun rewrites only what changed and removes the Audio/ and
Text/ files of an earlier run that this one does not vouch for. A DATA_DIR that another corpus (or
another collector) wrote is refused; --overwrite replaces it, all its files, features included.
"""
import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import MANIFEST, SAMPLE_RATE, SPLITS, attributes_record
from mmser.data_dir_writer import (CorpusError, check_coverage, claim_data_dir, count_table, few, name_rows,
                                   normalise_transcript, write_data_dir)
from mmser.dimensional import ATTRIBUTES, MANIFEST_COLUMN, Scale
from mmser.options import add_all_audio, add_overwrite_corpus
from mmser.utils import AudioError, read_audio

REQUIRED = ("wav", "text", "label")
OPTIONAL = ("id", "dialog", "order", "speaker", "split", "group", "start", "end", *ATTRIBUTES)
# Names a rating column might be given by mistake: the tool's one name for each (mmser/dimensional.py).
ATTRIBUTE_ALIASES = {"activation": "arousal", "act": "arousal", "val": "valence", "dom": "dominance"}


# ------------------------------------------------------------------------------------------------
# reading the CSV

def read_table(csv_path):
    """(header, [(line number, {column: cell})]) of a UTF-8 CSV; one line names a problem."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            table = [(reader.line_num, cells) for cells in reader]
    except FileNotFoundError:
        raise CorpusError(f"{csv_path}: no such CSV file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CorpusError(f"{csv_path}: unreadable CSV ({e})") from None
    rows = []
    for lineno, cells in table:
        if not any(c.strip() for c in cells):
            continue  # a blank line, as spreadsheets leave at the end
        if len(cells) != len(header):
            raise CorpusError(f"{csv_path}:{lineno}: {len(cells)} fields, the header has {len(header)}")
        rows.append((lineno, {h: c.strip() for h, c in zip(header, cells)}))
    return header, rows


def seconds(text, where, column):
    try:
        value = float(text)
    except ValueError:
        raise CorpusError(f"{where}: {column} {text!r} is not a time in seconds") from None
    if not value >= 0:
        raise CorpusError(f"{where}: {column} {text!r} is not a time in seconds")
    return value


def parse_scales(texts):
    """--attribute-scale's values -> {attribute or None (every attribute column): Scale}; CorpusError naming
    the value that does not read."""
    scales = {}
    for text in texts or ():
        name, _, bounds = text.rpartition("=")
        name = name.strip() or None
        if name is not None and name not in ATTRIBUTES:
            raise CorpusError(f"--attribute-scale {text}: {name!r} is none of {', '.join(ATTRIBUTES)}")
        try:
            low, high = (float(b) for b in bounds.split(":"))
            scales[name] = Scale(low, high)
        except ValueError:
            raise CorpusError(f"--attribute-scale {text}: expected LOW:HIGH or NAME=LOW:HIGH with LOW below HIGH, "
                              f"e.g. 1:5 or valence=-1:1") from None
    return scales


def attribute_scales(csv_path, header, given):
    """{attribute: Scale} of the CSV's rating columns, from --attribute-scale (parse_scales): each column
    needs one (the range its ratings can take cannot be read from the ratings), and a scale needs its column."""
    rated = [a for a in ATTRIBUTES if a in header]
    scales = {a: given.get(a, given.get(None)) for a in rated}
    unscaled = [a for a, scale in scales.items() if scale is None]
    if unscaled:
        raise CorpusError(f"{csv_path}: column {', '.join(unscaled)} needs the range its ratings can take: "
                          f"--attribute-scale LOW:HIGH (every rating column), or {unscaled[0]}=LOW:HIGH")
    stray = [a for a in given if a is not None and a not in rated] + (["LOW:HIGH"] if None in given and not rated else [])
    if stray:
        raise CorpusError(f"{csv_path}: --attribute-scale {', '.join(stray)} given, but the CSV has no such rating "
                          f"column (its columns: {', '.join(header)})")
    return scales


def rating(text, scale, where, name):
    """A rating cell as a number on its scale; "" (unknown) for an empty cell."""
    if text == "":
        return ""
    try:
        value = float(text)
    except ValueError:
        raise CorpusError(f"{where}: {name} {text!r} is not a number") from None
    if not (np.isfinite(value) and scale.contains(value)):
        raise CorpusError(f"{where}: {name} {value:g} lies outside its scale {scale.low:g}:{scale.high:g} "
                          f"(--attribute-scale)")
    return value


def read_corpus_csv(csv_path, classes=None, scales=None):
    """Manifest rows (without names yet) in corpus order, each with "wav_path" and "where"; the label
    set; the rating columns' scales (scales: parse_scales' of --attribute-scale). Every check that needs
    no audio is done here."""
    csv_path = Path(csv_path)
    header, table = read_table(csv_path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise CorpusError(f"{csv_path}: needs the columns {', '.join(REQUIRED)}; missing {', '.join(missing)}")
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if unknown or len(set(header)) != len(header):
        what = f"unknown column {unknown[0]!r}" if unknown else "a column named twice"
        if unknown and unknown[0].lower() in ATTRIBUTE_ALIASES:
            what += f" (a rating? this tool calls it {ATTRIBUTE_ALIASES[unknown[0].lower()]})"
        raise CorpusError(f"{csv_path}:1: {what}; the columns are {', '.join(REQUIRED)} and optionally "
                          f"{', '.join(OPTIONAL)}")
    scales = attribute_scales(csv_path, header, scales or {})
    if not table:
        raise CorpusError(f"{csv_path}: no rows")
    rows, first_line, dialogs = [], {}, {}
    for lineno, cells in table:
        where = f"{csv_path}:{lineno}"
        uid = cells.get("id") or f"row{lineno}"
        if uid in first_line:
            raise CorpusError(f"{where}: id {uid!r} already on line {first_line[uid]}")
        first_line[uid] = lineno
        label, text = cells["label"], normalise_transcript(cells["text"])
        if label and not text:
            raise CorpusError(f"{where}: labelled row with an empty text")
        if label and not cells["wav"]:
            raise CorpusError(f"{where}: labelled row without a wav")
        ratings = {a: rating(cells[a], scale, where, a) for a, scale in scales.items()}
        if cells.get("split", "train") not in SPLITS:
            raise CorpusError(f"{where}: split {cells['split']!r} is not one of {', '.join(SPLITS)}")
        start = seconds(cells["start"], where, "start") if cells.get("start") else None
        end = seconds(cells["end"], where, "end") if cells.get("end") else None
        if start is not None and end is not None and end <= start:
            raise CorpusError(f"{where}: end {end} is not after start {start}")
        if cells.get("order"):
            try:
                order = float(cells["order"])
            except ValueError:
                raise CorpusError(f"{where}: order {cells['order']!r} is not a number") from None
        else:
            order = len(rows)
        dialog = cells.get("dialog") or f"row{lineno}"  # no dialogue: a conversation of its own
        dialogs.setdefault(dialog, len(dialogs))
        row = {"utterance_id": uid, "session": 0, "dialog": dialog, "speaker": cells.get("speaker", ""),
               "gender": "", "start": "" if start is None else start, "end": "" if end is None else end,
               "emotion": label, "label": label, "valence": "", "activation": "", "dominance": "",
               **{MANIFEST_COLUMN[a]: value for a, value in ratings.items()},
               "transcript": text, "wav_path": (csv_path.parent / cells["wav"]) if cells["wav"] else None,
               "where": where, "order": order}
        row.update({c: cells[c] for c in ("split", "group") if c in header})
        rows.append(row)
    seen_order = {}
    for row in rows:
        if "order" in header and (row["dialog"], row["order"]) in seen_order:
            raise CorpusError(f"{row['where']}: order {row['order']:g} already in dialog {row['dialog']!r} "
                              f"(line {seen_order[row['dialog'], row['order']]})")
        seen_order[row["dialog"], row["order"]] = row["where"].rsplit(":", 1)[1]
    rows.sort(key=lambda r: (dialogs[r["dialog"]], r["order"]))
    counts = Counter(r["label"] for r in rows if r["label"])
    if classes is None:
        classes = sorted(counts)
    for row in rows:
        if row["label"] and row["label"] not in classes:
            raise CorpusError(f"{row['where']}: label {row['label']!r} is not one of --classes {','.join(classes)}")
        if counts[row["label"]] == 1:
            raise CorpusError(f"{row['where']}: label {row['label']!r} appears once in the corpus; a class needs "
                              f"at least two utterances (fix it, or empty its label to keep the row as context)")
    if len([c for c in classes if counts[c]]) < 2:
        raise CorpusError(f"{csv_path}: labelled rows of {len(counts)} class(es); a classifier needs at least two")
    return rows, list(classes), scales


def is_rated(row):
    return any(row[column] != "" for column in ("valence", "activation", "dominance"))




def read_segment(row):
    """The row's audio as 16 kHz mono int16: the file (any rate, channels) cut to start/end."""
    samples, notes = read_audio(row["wav_path"], convert=True, dtype="int16")
    if any(note.startswith("cut off") for note in notes):
        raise AudioError(f"{row['wav_path']}: cut off (shorter than its header says)")
    samples = np.clip(np.round(samples), -32768, 32767).astype(np.int16)
    start = 0 if row["start"] == "" else round(row["start"] * SAMPLE_RATE)
    end = len(samples) if row["end"] == "" else round(row["end"] * SAMPLE_RATE)
    if end > len(samples) + SAMPLE_RATE // 100 or start >= min(end, len(samples)):
        raise AudioError(f"{row['wav_path']}: start/end {row['start']}-{row['end']} s outside its "
                         f"{len(samples) / SAMPLE_RATE:.2f} s")
    return samples[start:end]


def wants_audio(row, all_audio=False):
    """Whether a row's audio is written: a labelled row's, a rated row's that names a wav (its attributes
    train the speech branch: data_contract.carries_audio), and with all_audio every row's that names one."""
    return bool(row["label"]) or (row["wav_path"] is not None and (all_audio or is_rated(row)))


def check_audio(rows, progress=True, all_audio=False):
    """[(row, problem)] for every row whose audio is written (wants_audio) and is missing, unreadable or cut
    off; [problem] for every other row whose wav cell names a file that is not there."""
    problems, missing_context = [], []
    for row in tqdm(rows, desc="checking audio", unit="utt", disable=not progress):
        if wants_audio(row, all_audio):
            try:
                read_segment(row)
            except AudioError as err:
                problems.append((row, f"{row['where']}: {err}"))
        elif row["wav_path"] is not None and not row["wav_path"].is_file():
            missing_context.append(f"{row['where']}: {row['wav_path']}: no such file")
    return problems, missing_context


def collect(csv_path, data_dir, classes=None, allow_missing=False, progress=True, out=sys.stdout, all_audio=False,
            overwrite=False, scales=None):
    """Read and check the CSV and its audio, then write DATA_DIR. -> the manifest rows.
    all_audio: Audio/ for the context rows with a wav too; overwrite: replace another corpus's DATA_DIR;
    scales: --attribute-scale's, parsed (parse_scales), for the rating columns."""
    rows, classes, scales = read_corpus_csv(csv_path, classes, scales)
    if Path(data_dir).resolve() == Path(csv_path).resolve().parent:
        raise CorpusError(f"{data_dir}: DATA_DIR is the CSV's own folder; give the corpus a DATA_DIR of its own")
    about = {"corpus": str(Path(csv_path).name), "collector": "csv_data_collect.py"}
    if scales:  # the ratings' range, beside the label set (data_contract.read_attributes)
        about["attributes"] = attributes_record(scales)
    replaced = claim_data_dir(data_dir, about, overwrite)
    problems, missing_context = check_audio(rows, progress, all_audio)
    if problems and not allow_missing:
        raise CorpusError(problems[0][1] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                          + "; use --allow-missing to go on without their audio (labelled rows become context only)")
    unusable = {id(r) for r, _ in problems}
    labelled_problems = [problem for r, problem in problems if r["label"]]
    context_problems = [problem for r, problem in problems if not r["label"]]
    for row in rows:
        if id(row) in unusable:  # context only: nothing trains or tests on audio it does not have
            row.update(label="", valence="", activation="", dominance="")
    check_coverage(rows, classes, csv_path)
    name_rows(rows)
    _, removed = write_data_dir(data_dir, rows, read_segment, classes, about, progress, overwrite=overwrite,
                                wants_audio=lambda row: id(row) not in unusable and wants_audio(row, all_audio))
    print(count_table(rows, classes, "split" if "split" in rows[0] else "session"), file=out)
    for problems_of, what in ((labelled_problems, "labelled row(s) without usable audio, kept as context only"),
                              (context_problems, "context row(s) without usable audio")):
        if problems_of:
            print(f"--allow-missing: {len(problems_of)} {what}:", file=out)
            for problem in problems_of:
                print(f"  {problem}", file=out)
    if missing_context:
        print(f"{len(missing_context)} context row(s) name a wav that is not there (their text is still context; "
              f"with --all-audio they would stop the run):", file=out)
        for problem in missing_context:
            print(f"  {problem}", file=out)
    if all_audio:
        silent = [r["where"] for r in rows if not r["label"] and r["wav_path"] is None]
        if silent:
            print(f"--all-audio: {len(silent)} context row(s) without a wav, so without audio to transcribe: "
                  f"{few(silent)}", file=out)
    if replaced:
        print(f"--overwrite: replaced the DATA_DIR of {replaced['corpus']} ({replaced['collector']}): removed "
              f"{few(removed, 8)}", file=out)
    elif removed:
        print(f"removed {len(removed)} file(s) of an earlier run that this run does not vouch for: {few(removed)}",
              file=out)
    if scales:
        rated = {a: sum(r[MANIFEST_COLUMN[a]] != "" for r in rows) for a in scales}
        print("attributes: " + ", ".join(f"{a} {scales[a].low:g}:{scales[a].high:g} ({n} rated)"
                                         for a, n in rated.items()), file=out)
    print(f"wrote {Path(data_dir) / MANIFEST} ({len(rows)} utterances, classes {', '.join(classes)})", file=out)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="the corpus's CSV (columns wav, text, label, ...)")
    parser.add_argument("data_dir", help="output folder (created if needed)")
    parser.add_argument("--classes", default=None,
                        help="the label set in the model's output order, comma separated (default: the labels sorted)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="keep labelled rows whose audio is missing or unusable as context only, and list them")
    parser.add_argument("--attribute-scale", action="append", metavar="[NAME=]LOW:HIGH",
                        help="the range of the rating columns (valence, arousal, dominance): LOW:HIGH for every one, "
                             "NAME=LOW:HIGH for one (repeat it per column); recorded in classes.json")
    add_all_audio(parser)
    add_overwrite_corpus(parser)
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        collect(args.csv, args.data_dir, classes, args.allow_missing, progress=sys.stderr.isatty(),
                all_audio=args.all_audio, overwrite=args.overwrite, scales=parse_scales(args.attribute_scale))
    except CorpusError as err:
        print(f"csv_data_collect.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("csv_data_collect.py: interrupted: the files written so far are whole (utterances.csv is written "
              "last); rerun the same command to finish", file=sys.stderr)
        sys.exit(130)
