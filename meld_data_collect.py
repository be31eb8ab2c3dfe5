"""MELD (Poria et al., ACL 2019) into DATA_DIR: the manifest, the transcripts, the audio of the clips.

    python meld_data_collect.py MELD_ROOT DATA_DIR [--target emotion|sentiment]
                                [--expect-full | --no-expect-full] [--overwrite]

Reads (never writes) the release as distributed (MELD.Raw, its three archives unpacked in place):
    MELD_ROOT/{train,dev,test}_sent_emo.csv      Sr No., Utterance, Speaker, Emotion, Sentiment,
                                                 Dialogue_ID, Utterance_ID, Season, Episode, StartTime, EndTime
    MELD_ROOT/train_splits/dia{D}_utt{U}.mp4
    MELD_ROOT/dev_splits_complete/dia{D}_utt{U}.mp4
    MELD_ROOT/output_repeated_splits_test/dia{D}_utt{U}.mp4
Writes the DATA_DIR of the data contract (mmser.data_dir_writer, as every collector does):
    DATA_DIR/utterances.csv   every utterance of train, dev, test (in that order), dialogues by
                              Dialogue_ID, utterances by Utterance_ID; the contract's columns, then
                              split and sentiment. utterance_id "{split}_dia{D}_utt{U}", dialog
                              "{split}_dia{D}" (Dialogue_IDs restart in each split), speaker the
                              Speaker, start/end the clip's times in the episode, session 0,
                              emotion the Emotion, label the target (--target) or empty
    DATA_DIR/Text/<name>.txt, Audio/<name>.wav (16 kHz mono PCM16, decoded from the clip's audio
                              stream with PyAV, ffmpeg's own resampler), classes.json (the 7
                              emotions, or the 3 sentiments, in MELD's own index order,
                              first_metric weighted_f1: what MELD's papers report, and the corpus
                              and collector: MELD, meld_data_collect.py)
with name = "{index}_s_0_{emotion}". main.py --protocol official trains on train, chooses the
checkpoint on dev and tests on test.

MELD's known defects, handled by name and listed in the summary:
- a clip the CSV lists that the release lacks (dev dia110_utt7, MELD issues #22, #27), a corrupted
  clip that ffmpeg cannot decode (train dia125_utt3, issue #39), a clip without an audio stream or
  with no samples in it: the utterance stays in the manifest with its emotion and text (the context
  of its neighbours) but without a label, so no stage trains or tests on audio it does not have;
- text with mis-encoded characters: the release's CSVs hold Windows-1252 bytes read as Latin-1
  (U+0080-U+009F, "I\\x92m", and U+00A0; declare-lab/MELD pull request #28 lists them), and a copy
  saved through another program may hold UTF-8 read as Windows-1252 ("donâ€™t"): repaired, and counted;
- clips in the folders that no CSV row lists (dev dia66_utt9, test final_videos_test*): ignored, counted.
The release's counts are checked (train 9989, dev 1109, test 2610 utterances) when the tree looks
like the full release (--expect-full forces it, --no-expect-full skips it); the summary table has
the utterances per split and per class. A collection that would leave no labelled utterance, or a
split or class without one, stops before anything is written (the CSVs without the unpacked clip
folders: the folders are named). A DATA_DIR that another corpus (or another collector) wrote is
refused; --overwrite replaces it, all its files, features included. Every utterance is labelled, so
all the audio there is gets written: there is no --all-audio.
"""
import argparse
import csv
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mmser.data_contract import MANIFEST, SAMPLE_RATE, SPLITS
from mmser.data_dir_writer import (CorpusError, check_coverage, claim_data_dir, count_table, few, name_rows,
                                   normalise_transcript, write_data_dir)
from mmser.options import add_overwrite_corpus
from mmser.utils import AudioError

CSV_NAMES = {split: f"{split}_sent_emo.csv" for split in SPLITS}
CLIP_FOLDERS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
CSV_COLUMNS = ("Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime")
# The label sets in the index order of MELD's own baselines (declare-lab/MELD, baseline/data_helpers.py).
TARGETS = {"emotion": ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
           "sentiment": ("neutral", "positive", "negative")}
FULL_RELEASE = {"train": 9989, "dev": 1109, "test": 2610}
CLIP_RE = re.compile(r"^dia(\d+)_utt(\d+)\.mp4$")
TIME_RE = re.compile(r"^(\d+):(\d\d):(\d\d)[,.](\d{1,3})$")
C1_RE = re.compile("[\u0080-\u009f]")
MOJIBAKE_RE = re.compile("[\u00c2\u00c3\u00e2][\u0080-\u00bf\u2018-\u203a\u0152-\u0178\u02c6\u02dc\u20ac\u2122]")


def repair_text(text):
    """Undo the mis-encodings: UTF-8 bytes read as Windows-1252 ("donâ€™t" -> "don’t"), Windows-1252
    bytes read as Latin-1 (U+0092 -> ’), and the no-break space U+00A0 (a space, as MELD's own fix of
    its CSVs made it). Text without them is returned as it is."""
    if MOJIBAKE_RE.search(text):
        try:
            text = text.encode("cp1252").decode("utf-8")
        except UnicodeError:  # not cleanly mis-decoded UTF-8: leave it to the next rule
            pass
    return C1_RE.sub(lambda m: bytes([ord(m[0])]).decode("cp1252", errors="replace"), text).replace("\u00a0", " ")


def episode_seconds(text, where):
    """"00:16:16,059" (StartTime, EndTime: SRT times in the episode) -> 976.059."""
    m = TIME_RE.match(text.strip())
    if m is None:
        raise CorpusError(f"{where}: time {text!r} is not HH:MM:SS,mmm")
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def read_split(meld_root, split, target):
    """Manifest rows (without names) of one split's CSV, in dialogue order; the number of repaired texts."""
    path = Path(meld_root) / CSV_NAMES[split]
    if not path.is_file():
        raise CorpusError(f"{path}: not found; MELD_ROOT is the folder of {', '.join(CSV_NAMES.values())}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, table = reader.fieldnames or [], [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CorpusError(f"{path}: unreadable CSV ({e})") from None
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise CorpusError(f"{path}: not a MELD CSV: no column {', '.join(missing)}")
    rows, seen, repaired = [], {}, []
    for lineno, cells in table:
        where = f"{path}:{lineno}"
        try:
            dia, utt = int(cells["Dialogue_ID"]), int(cells["Utterance_ID"])
        except (TypeError, ValueError):
            raise CorpusError(f"{where}: Dialogue_ID/Utterance_ID {cells['Dialogue_ID']!r}/{cells['Utterance_ID']!r} "
                              f"are not numbers") from None
        if (dia, utt) in seen:
            raise CorpusError(f"{where}: dia{dia}_utt{utt} already on line {seen[dia, utt]}")
        seen[dia, utt] = lineno
        emotion, sentiment = cells["Emotion"].strip(), cells["Sentiment"].strip()
        if emotion not in TARGETS["emotion"] or sentiment not in TARGETS["sentiment"]:
            raise CorpusError(f"{where}: emotion {emotion!r} / sentiment {sentiment!r} not MELD's")
        text = normalise_transcript(repair_text(cells["Utterance"]))
        if text != normalise_transcript(cells["Utterance"]):
            repaired.append(f"{split}_dia{dia}_utt{utt}")
        rows.append({"utterance_id": f"{split}_dia{dia}_utt{utt}", "session": 0, "dialog": f"{split}_dia{dia}",
                     "speaker": cells["Speaker"].strip(), "gender": "",
                     "start": episode_seconds(cells["StartTime"], where),
                     "end": episode_seconds(cells["EndTime"], where),
                     "emotion": emotion, "label": emotion if target == "emotion" else sentiment,
                     "valence": "", "activation": "", "dominance": "", "transcript": text,
                     "split": split, "sentiment": sentiment,
                     "clip": Path(meld_root) / CLIP_FOLDERS[split] / f"dia{dia}_utt{utt}.mp4", "key": (dia, utt)})
    rows.sort(key=lambda r: r["key"])  # the CSVs are in this order; a reordered copy is put back in it
    return rows, repaired


def read_release(meld_root, target="emotion"):
    """Rows of train, dev and test in corpus order, and notes: repaired texts, unlisted clips."""
    rows, notes = [], {"repaired": [], "unlisted": []}
    for split in SPLITS:
        split_rows, repaired = read_split(meld_root, split, target)
        rows += split_rows
        notes["repaired"] += repaired
        folder = Path(meld_root) / CLIP_FOLDERS[split]
        listed = {r["clip"].name for r in split_rows}
        if folder.is_dir():
            notes["unlisted"] += [f"{CLIP_FOLDERS[split]}/{p.name}" for p in sorted(folder.iterdir())
                                  if p.suffix == ".mp4" and p.name not in listed]
    return rows, notes


def verify_full_release(rows, meld_root):
    found = Counter(r["split"] for r in rows)
    diffs = [f"{s}: expected {n}, found {found[s]}" for s, n in FULL_RELEASE.items() if found[s] != n]
    if diffs:
        raise CorpusError(f"{meld_root}: not the utterances the full release has ({'; '.join(diffs)}); check the "
                          f"CSVs, or use --no-expect-full to read a modified MELD on purpose")


def decode_clip(path):
    """The audio stream of an mp4 clip as 16 kHz mono int16 (ffmpeg's resampler through PyAV).
    A missing or undecodable clip, or one without audio, is an AudioError that names it."""
    import av
    if not Path(path).is_file():
        raise AudioError(f"{path}: clip missing from the release")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(f"{path}: clip without an audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            chunks = [frame.to_ndarray().reshape(-1)
                      for decoded in container.decode(audio=0)
                      for frame in resampler.resample(decoded)]
            chunks += [frame.to_ndarray().reshape(-1) for frame in resampler.resample(None)]  # flush
    except av.FFmpegError as e:
        raise AudioError(f"{path}: corrupted clip, ffmpeg cannot decode it ({e.strerror})") from None
    samples = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    if len(samples) < SAMPLE_RATE // 100:
        raise AudioError(f"{path}: clip without audio samples")
    return samples


def summary(rows, classes, problems, notes, data_dir):
    """The printed report: counts per split and class, then every defect by name."""
    lines = [count_table(rows, classes, "split")]
    if problems:
        lines.append(f"{len(problems)} clip(s) without usable audio; their utterances are kept as context only "
                     f"(emotion and text in the manifest, no label):")
        lines += [f"  {r['utterance_id']}: {problem}" for r, problem in problems]
    if notes["repaired"]:
        lines.append(f"repaired mis-encoded characters in {len(notes['repaired'])} text(s): {few(notes['repaired'])}")
    if notes["unlisted"]:
        lines.append(f"ignored {len(notes['unlisted'])} clip(s) that no CSV row lists: {few(notes['unlisted'])}")
    lines.append(f"wrote {Path(data_dir) / MANIFEST} ({len(rows)} utterances)")
    return "\n".join(lines)


def check_clips(rows, classes, meld_root):
    """Before any clip is decoded: the clips the CSVs list must leave every split and class a labelled
    utterance (MELD_ROOT with the CSVs but without the unpacked clip folders leaves none)."""
    missing = {id(r) for r in rows if not r["clip"].is_file()}
    folders = [f"{name}/" for name in CLIP_FOLDERS.values() if not (Path(meld_root) / name).is_dir()]
    hint = (f" ({len(missing)} of {len(rows)} clips missing; unpack {', '.join(folders)} into MELD_ROOT)" if folders
            else f" ({len(missing)} of {len(rows)} clips missing)" if missing else "")
    check_coverage([{**r, "label": "" if id(r) in missing else r["label"]} for r in rows], classes, meld_root, hint)


def collect(meld_root, data_dir, target="emotion", expect_full=None, progress=True, out=sys.stdout, overwrite=False):
    """Read MELD, check it, decode its clips into DATA_DIR. -> the manifest rows.
    overwrite: replace the DATA_DIR of another corpus (refused otherwise), all its files."""
    meld_root, data_dir = Path(meld_root), Path(data_dir)
    if not meld_root.is_dir():
        raise CorpusError(f"{meld_root}: MELD root folder not found")
    if data_dir.resolve().is_relative_to(meld_root.resolve()):
        raise CorpusError(f"{data_dir}: DATA_DIR lies inside MELD_ROOT; the corpus is never written to")
    about = {"corpus": "MELD", "collector": "meld_data_collect.py", "target": target, "first_metric": "weighted_f1"}
    replaced = claim_data_dir(data_dir, about, overwrite)
    rows, notes = read_release(meld_root, target)
    if expect_full or (expect_full is None and len(rows) >= sum(FULL_RELEASE.values()) // 2):
        verify_full_release(rows, meld_root)
    classes = list(TARGETS[target])
    check_clips(rows, classes, meld_root)
    name_rows(rows)
    problems, removed = write_data_dir(data_dir, rows, lambda row: decode_clip(row["clip"]), classes, about, progress,
                                       overwrite=overwrite,
                                       check=lambda rows: check_coverage(rows, classes, meld_root,
                                                                         " (its clips are unusable: see above)"))
    print(summary(rows, classes, problems, notes, data_dir), file=out)
    if replaced:
        print(f"--overwrite: replaced the DATA_DIR of {replaced['corpus']} ({replaced['collector']}): removed "
              f"{few(removed, 8)}", file=out)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("meld_root", help="the MELD.Raw folder: the three CSVs and the unpacked clip folders")
    parser.add_argument("data_dir", help="output folder (created if needed)")
    parser.add_argument("--target", choices=tuple(TARGETS), default="emotion",
                        help="7 emotions (default) or 3 sentiments as the label set")
    parser.add_argument("--expect-full", action=argparse.BooleanOptionalAction, default=None,
                        help="check the full release's counts (default: when the CSVs hold at least half of them)")
    add_overwrite_corpus(parser)
    args = parser.parse_args(argv)
    try:
        collect(args.meld_root, args.data_dir, args.target, args.expect_full, progress=sys.stderr.isatty(),
                overwrite=args.overwrite)
    except CorpusError as err:
        print(f"meld_data_collect.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("meld_data_collect.py: interrupted: the files written so far are whole (utterances.csv is written "
              "last); rerun the same command to finish", file=sys.stderr)
        sys.exit(130)
