"""MSP-Podcast (Lotfian and Busso, IEEE TAFFC 2019) into DATA_DIR: the manifest, transcripts, audio, scales.

    python msp_podcast_collect.py MSP_ROOT DATA_DIR [--release 1.11|1.12]

Reads (never writes) the release as distributed, as the challenge baseline reads it
(msplabresearch/MSP-Podcast_Challenge, utils/data/podcast.py):
    MSP_ROOT/Audios/<FileName>            16 kHz mono wavs (Audio/ in releases 1.9 and 1.10); in 1.11 and
                                          later also Test3's MSP-PODCAST_test3_<n>.wav, whose labels the
                                          release withholds (no row in the label file)
    MSP_ROOT/Labels/labels_consensus.csv  FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, Gender,
                                          Split_Set (Train, Development, Test1, Test2, Test3); spelt
                                          labels_concensus.csv in releases up to 1.8, under Labels/Labels/
                                          in some copies
    MSP_ROOT/Transcripts/<stem>.txt       where present (not for Test3)
Writes the DATA_DIR of the data contract (mmser.data_dir_writer.write_data_dir):
    utterances.csv   every row of the label file and every Test3 recording, in podcast order: a segment's
                     podcast and position come from its file name, MSP-PODCAST_<podcast>_<segment>[_<part>],
                     so the context branch reads neighbouring segments of the same podcast (dialog
                     "MSP-PODCAST_<podcast>"; a Test3 recording, whose podcast is hidden, is a dialogue of
                     its own). utterance_id the file's stem, session 0, speaker the SpkrID ("Unknown" kept),
                     gender M/F, no start/end, emotion the EmoClass letter, label the class below or empty,
                     valence/activation/dominance EmoVal/EmoAct/EmoDom (1-7, the raters' mean; activation is
                     arousal), then split: Train train, Development dev, Test1 test, Test2 test2, Test3 test3,
                     anything else (no partition) unpartitioned
    Audio/<name>.wav of every row whose audio is data (labelled, rated X and O rows, Test3's:
                     data_contract.carries_audio), Text/<name>.txt, classes.json: the 8 primary emotions in the
                     baseline's order (A S H U F D C N: angry, sad, happy, surprise, fear, disgust, contempt,
                     neutral), first_metric macro_f1 (the challenge's), attributes valence/arousal/dominance on
                     [1, 7], withheld ["test3"] when its labels are withheld, codes (class -> the release's
                     letter), submission (the columns a withheld partition's predictions are written in)
with name = "{index}_s_0_{EmoClass}". Rows labelled X (no agreement among the raters) or O (other) have no
label: they are left out of the categorical task, as the challenge leaves them out, and kept for the
attributes and as their neighbours' context. A withheld partition's rows have neither label nor
attributes: a run predicts them and never scores them. main.py --protocol official trains on train,
chooses on dev and tests on test (Test1).

The release's known problems, each handled by name and listed in the summary:
- a row whose wav the release lacks (MSP-PODCAST_1909_1017.wav in release 2.0, per a public recipe): kept
  as context, without label or attributes; an unreadable wav likewise;
- a recording that is not 16 kHz mono (MSP-PODCAST_1023_0235.wav is 44.1 kHz stereo): mixed down and
  resampled, and named;
- rows without a partition (an empty or unknown Split_Set): kept as context, split unpartitioned;
- speakers "Unknown" (SpkrID): kept and counted per partition (the readme says they may be test speakers);
- rows without a transcript (1.12: 203,936 of 207,136 turns transcribed): empty text, counted;
- wavs that no row lists and that are not Test3's: ignored, counted;
- version differences of the layout: Audio/ or Audios/, labels_concensus.csv or labels_consensus.csv,
  Labels/Labels/, Test3 (from 1.11) as audio only or as rows without labels.
Counts per partition are checked against the published ones with --release (1.11: the lab's page; 1.12:
its readme's audio and transcript totals), and the summary says when the counts match a release's.
"""
import argparse
import csv
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mmser.data_contract import MANIFEST, attributes_record, carries_audio
from mmser.data_dir_writer import CorpusError, count_table, few, name_rows, normalise_transcript, write_data_dir
from mmser.dimensional import ATTRIBUTES, MSP_PODCAST_SCALE
from mmser.utils import AudioError, read_audio

AUDIO_FOLDERS = ("Audios", "Audio")  # 1.11 and later; 1.9 and 1.10
LABEL_FILES = ("Labels/labels_consensus.csv", "Labels/labels_concensus.csv", "Labels/Labels/labels_consensus.csv")
TRANSCRIPTS = "Transcripts"
LABEL_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
# The 8 primary emotions in the order of the challenge baseline's outputs
# (process_labels_for_categorical.py:10-11 at msplabresearch/MSP-Podcast_Challenge 3f60a42).
CODES = {"angry": "A", "sad": "S", "happy": "H", "surprise": "U", "fear": "F", "disgust": "D", "contempt": "C",
         "neutral": "N"}
CLASSES = tuple(CODES)
CLASS_OF = {code: name for name, code in CODES.items()}
NO_CLASS = {"X": "no agreement", "O": "other"}
SPLIT_OF = {"Train": "train", "Development": "dev", "Test1": "test", "Test2": "test2", "Test3": "test3"}
WITHHELD = "test3"
ATTRIBUTE_COLUMNS = {"valence": "EmoVal", "arousal": "EmoAct", "dominance": "EmoDom"}
# How the challenge takes a withheld partition's predictions (classes.json "submission", which main.py's
# official runs write them by): the file name, then the class letter or the attributes in the order the
# baseline writes them (eval_dim_ser_test3.py:136, 144 at msplabresearch/MSP-Podcast_Challenge 3f60a42).
SUBMISSION = {"file": ["FileName", ".wav"], "class": "EmoClass",
              "attributes": {"arousal": "EmoAct", "valence": "EmoVal", "dominance": "EmoDom"}}
GENDER = {"male": "M", "female": "F"}
NAME_RE = re.compile(r"^MSP-PODCAST_(\d+)_(\d+(?:_\d+)*)\.wav$")
TEST3_RE = re.compile(r"^MSP-PODCAST_test3_(\d+)\.wav$", re.IGNORECASE)
UNKNOWN_SPEAKER = "Unknown"
# Published counts. 1.11: rows per partition, Test3's recordings included (151,654 turns; the lab's
# MSP-Podcast page). 1.12: recordings in Audios/ and transcribed turns (the release's readme.txt).
RELEASES = {"1.11": {"partitions": {"train": 84030, "dev": 19815, "test": 30647, "test2": 14815, "test3": 2347}},
            "1.12": {"recordings": 207136, "transcripts": 203936}}


def find_layout(msp_root):
    """(audio folder, label file) of this copy of the release, and the notes on its layout."""
    audio = next((Path(msp_root) / f for f in AUDIO_FOLDERS if (Path(msp_root) / f).is_dir()), None)
    labels = next((Path(msp_root) / f for f in LABEL_FILES if (Path(msp_root) / f).is_file()), None)
    if audio is None or labels is None:
        raise CorpusError(f"{msp_root}: not an MSP-Podcast release: no {' or '.join(AUDIO_FOLDERS)}/ folder or no "
                          f"{' or '.join(LABEL_FILES)}")
    notes = []
    if audio.name != AUDIO_FOLDERS[0]:
        notes.append(f"audio in {audio.name}/ (releases 1.9 and 1.10 name it so; later ones Audios/)")
    if labels.relative_to(msp_root).as_posix() != LABEL_FILES[0]:
        notes.append(f"labels in {labels.relative_to(msp_root).as_posix()} (not {LABEL_FILES[0]})")
    return audio, labels, notes


def segment_key(file_name):
    """MSP-PODCAST_0023_0008_0001.wav -> (23, (8, 1)): the podcast and the segment's place in it."""
    m = NAME_RE.match(file_name)
    return int(m[1]), tuple(int(p) for p in m[2].split("_"))


def number(text, where, column):
    """A rating on the release's 1-7 scale, "" (unknown) for an empty cell."""
    if text.strip() == "":
        return ""
    try:
        value = float(text)
    except ValueError:
        raise CorpusError(f"{where}: {column} {text!r} is not a number") from None
    if not (math.isfinite(value) and MSP_PODCAST_SCALE.contains(value)):
        raise CorpusError(f"{where}: {column} {value:g} lies outside the release's scale 1-7")
    return value


def read_label_file(path):
    """The label file's rows as manifest rows (without names), checked; the rows of no partition."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, table = reader.fieldnames or [], [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CorpusError(f"{path}: unreadable CSV ({e})") from None
    missing = [c for c in LABEL_COLUMNS if c not in header]
    if missing:
        raise CorpusError(f"{path}: not MSP-Podcast's label file: no column {', '.join(missing)}")
    rows, seen, unpartitioned = [], {}, []
    for lineno, cells in table:
        where = f"{path}:{lineno}"
        file_name = (cells["FileName"] or "").strip()
        if not (NAME_RE.match(file_name) or TEST3_RE.match(file_name)):
            raise CorpusError(f"{where}: FileName {file_name!r} is not MSP-PODCAST_<podcast>_<segment>.wav")
        if file_name in seen:
            raise CorpusError(f"{where}: {file_name} already on line {seen[file_name]}")
        seen[file_name] = lineno
        code = (cells["EmoClass"] or "").strip()
        split = SPLIT_OF.get((cells["Split_Set"] or "").strip(), "unpartitioned")
        if split == "unpartitioned":
            unpartitioned.append(f"{file_name} ({(cells['Split_Set'] or '').strip() or 'empty'})")
        if code not in CLASS_OF and code not in NO_CLASS and not (code == "" and split == WITHHELD):
            raise CorpusError(f"{where}: EmoClass {code!r} is none of {' '.join(CLASS_OF)} {' '.join(NO_CLASS)}")
        values = {a: number(cells[ATTRIBUTE_COLUMNS[a]] or "", where, ATTRIBUTE_COLUMNS[a]) for a in ATTRIBUTES}
        rows.append(manifest_row(file_name, code, values, (cells["SpkrID"] or "").strip(),
                                 GENDER.get((cells["Gender"] or "").strip().lower(), ""), split))
    return rows, unpartitioned


def manifest_row(file_name, code, values, speaker, gender, split):
    test3, segment = TEST3_RE.match(file_name), NAME_RE.match(file_name)
    stem = file_name[:-len(".wav")]
    return {"utterance_id": stem, "session": 0, "dialog": stem if test3 else f"MSP-PODCAST_{segment[1]}",
            "speaker": speaker, "gender": gender, "start": "", "end": "", "emotion": code,
            "label": CLASS_OF.get(code, ""), "valence": values["valence"], "activation": values["arousal"],
            "dominance": values["dominance"], "transcript": "", "split": split, "file": file_name,
            "key": (1, int(test3[1]), ()) if test3 else (0, *segment_key(file_name))}


def read_release(msp_root):
    """Rows in podcast order (Test3's last), the audio folder, and notes on every defect found."""
    audio, labels, layout = find_layout(msp_root)
    rows, unpartitioned = read_label_file(labels)
    listed = {r["file"] for r in rows}
    wavs = {e.name for e in os.scandir(audio) if e.name.lower().endswith(".wav")}
    test3 = sorted(w for w in wavs - listed if TEST3_RE.match(w))
    empty = dict.fromkeys(ATTRIBUTES, "")
    rows += [manifest_row(w, "", empty, "", "", WITHHELD) for w in test3]
    rows.sort(key=lambda r: r["key"])  # the label file's own order is not the podcasts'
    notes = {"layout": layout, "unpartitioned": unpartitioned, "test3_audio_only": len(test3),
             "unlisted": sorted(wavs - listed - set(test3)), "missing": [], "untranscribed": [],
             "converted": [], "unreadable": []}
    transcripts = Path(msp_root) / TRANSCRIPTS
    texts = {e.name for e in os.scandir(transcripts)} if transcripts.is_dir() else set()
    for row in rows:
        if row["file"] not in wavs:
            notes["missing"].append(row["file"])
            without_audio(row)
        if f"{row['utterance_id']}.txt" in texts:
            text = (transcripts / f"{row['utterance_id']}.txt").read_text(encoding="utf-8", errors="replace")
            row["transcript"] = normalise_transcript(text)
        elif row["split"] != WITHHELD:  # Test3's transcripts are withheld with its labels
            notes["untranscribed"].append(row["utterance_id"])
    notes["recordings"], notes["transcripts"] = len(wavs), len(texts)
    return rows, audio, notes


def without_audio(row):
    """A row whose recording is missing or unusable: its text stays its neighbours' context, but nothing
    trains or tests on audio it does not have."""
    row["label"] = ""
    row["valence"] = row["activation"] = row["dominance"] = ""


def recording(path, notes):
    """A recording as 16 kHz mono int16; one that is not (the release has one 44.1 kHz stereo file) is
    mixed down and resampled, and named in the notes."""
    samples, changes = read_audio(path, convert=True)
    if changes:
        notes["converted"].append(f"{Path(path).name} ({', '.join(changes)})")
    return np.round(np.clip(samples, -1.0, 32767 / 32768) * 32768).astype(np.int16)


def check_release(rows, notes, release, msp_root):
    """--release: the published counts, or CorpusError naming each difference."""
    found = Counter(r["split"] for r in rows)
    expected = RELEASES[release]
    diffs = [f"{s}: expected {n}, found {found[s]}" for s, n in expected.get("partitions", {}).items() if found[s] != n]
    for what in ("recordings", "transcripts"):
        if what in expected and notes[what] != expected[what]:
            diffs.append(f"{what}: expected {expected[what]}, found {notes[what]}")
    if diffs:
        raise CorpusError(f"{msp_root}: not release {release}'s counts ({'; '.join(diffs)}); leave out --release "
                          f"to read another release or a modified copy")


def matching_release(rows):
    found = Counter(r["split"] for r in rows)
    return next((name for name, counts in RELEASES.items()
                 if "partitions" in counts and all(found[s] == n for s, n in counts["partitions"].items())), None)


def summary(rows, notes, withheld, data_dir):
    """The printed report: counts per partition and class, then every defect by name."""
    lines = [count_table(rows, CLASSES, "split")]
    codes = Counter(r["emotion"] for r in rows)
    lines.append(f"{codes['X']} X (no agreement) and {codes['O']} O (other) rows have no label: left out of the "
                 f"categorical task, as the challenge leaves them out; kept for the attributes and as context")
    if withheld:
        n = sum(r["split"] in withheld for r in rows)
        lines.append(f"{n} {'/'.join(withheld)} recordings whose labels the release withholds: predicted, never "
                     f"scored ({notes['test3_audio_only']} of them audio only, with no row in the label file)")
    unknown = Counter(r["split"] for r in rows if r["speaker"] == UNKNOWN_SPEAKER)
    if unknown:
        lines.append(f"{sum(unknown.values())} rows of speaker Unknown, kept (" +
                     ", ".join(f"{s} {n}" for s, n in sorted(unknown.items())) + ")")
    for key, text in (("missing", "row(s) whose wav the release lacks: kept as context, without label or attributes"),
                      ("unreadable", "unreadable wav(s): kept as context, without label or attributes"),
                      ("converted", "recording(s) not as the contract has them (16 kHz mono, whole), converted"),
                      ("unpartitioned", "row(s) in no partition (Split_Set): kept as context, split unpartitioned"),
                      ("untranscribed", "row(s) without a transcript: empty text"),
                      ("unlisted", "wav(s) that no row lists (not Test3's): ignored")):
        if notes[key]:
            lines.append(f"{len(notes[key])} {text}: {few(notes[key])}")
    lines += [f"layout: {note}" for note in notes["layout"]]
    release = matching_release(rows)
    if release:
        lines.append(f"the counts per partition are release {release}'s published ones")
    lines.append(f"wrote {Path(data_dir) / MANIFEST} ({len(rows)} utterances)")
    return "\n".join(lines)


def collect(msp_root, data_dir, release=None, progress=True, out=sys.stdout):
    """Read MSP-Podcast, check it, write DATA_DIR. -> the manifest rows."""
    msp_root, data_dir = Path(msp_root), Path(data_dir)
    if not msp_root.is_dir():
        raise CorpusError(f"{msp_root}: MSP-Podcast root folder not found")
    if data_dir.resolve().is_relative_to(msp_root.resolve()):
        raise CorpusError(f"{data_dir}: DATA_DIR lies inside MSP_ROOT; the corpus is never written to")
    rows, audio, notes = read_release(msp_root)
    if release:
        check_release(rows, notes, release, msp_root)
    name_rows(rows)
    # A partition is withheld when the release gives its rows neither class nor attributes.
    withheld = sorted({r["split"] for r in rows if r["split"] == WITHHELD and not r["emotion"]
                       and all(r[c] == "" for c in ("valence", "activation", "dominance"))})

    def read_row_audio(row):
        try:
            return recording(audio / row["file"], notes)
        except AudioError:
            notes["unreadable"].append(row["file"])
            without_audio(row)  # write_data_dir writes the manifest after every read: it sees this
            raise

    about = {"corpus": "MSP-Podcast", "collector": "msp_podcast_collect.py", "first_metric": "macro_f1",
             "attributes": attributes_record({a: MSP_PODCAST_SCALE for a in ATTRIBUTES}),
             "withheld": withheld, "codes": CODES, "submission": SUBMISSION}
    # Audio/ of every row whose audio is data: labelled, rated (X and O rows) or withheld (Test3)
    write_data_dir(data_dir, rows, read_row_audio, list(CLASSES), about, progress,
                   wants_audio=lambda row: row["file"] not in notes["missing"] and carries_audio(row, withheld))
    print(summary(rows, notes, withheld, data_dir), file=out)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("msp_root", help="the release's folder: Audios/ (or Audio/), Labels/, Transcripts/")
    parser.add_argument("data_dir", help="output folder (created if needed)")
    parser.add_argument("--release", choices=sorted(RELEASES), default=None,
                        help="check the counts that release publishes (default: no check; the summary says "
                             "when the counts match a release's)")
    args = parser.parse_args(argv)
    try:
        collect(args.msp_root, args.data_dir, args.release, progress=sys.stderr.isatty())
    except CorpusError as err:
        print(f"msp_podcast_collect.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("msp_podcast_collect.py: interrupted: the files written so far are whole (utterances.csv is written "
              "last); rerun the same command to finish", file=sys.stderr)
        sys.exit(130)
