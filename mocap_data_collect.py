"""Extract IEMOCAP's utterances into DATA_DIR: the manifest, the transcripts, the target audio.

    python mocap_data_collect.py IEMOCAP_ROOT DATA_DIR [--emotions ang,hap,exc,sad,neu]
                                 [--allow-missing] [--expect-full | --no-expect-full] [--all-audio]
                                 [--overwrite]

Reads (never writes) an IEMOCAP_full_release tree:
    IEMOCAP_ROOT/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt    labels, times, V/A/D
    IEMOCAP_ROOT/Session{1..5}/dialog/transcriptions/<dialog>.txt   transcripts
    IEMOCAP_ROOT/Session{1..5}/sentences/wav/<dialog>/<utterance_id>.wav
Writes, as the data contract says:
    DATA_DIR/utterances.csv      one row per utterance in corpus order (MANIFEST_COLUMNS)
    DATA_DIR/Text/<name>.txt     the transcript of every utterance, one line, no line break
    DATA_DIR/Audio/<name>.wav    16 kHz mono PCM16, for the utterances of the target emotions
                                 (every utterance with --all-audio, for speech recognition)
    DATA_DIR/labels_train_t.txt  "<name>.txt<TAB><code>" per target utterance (the seed's codes)
    DATA_DIR/classes.json        the label set: the classes of --emotions, in CLASSES order, and the
                                 corpus and collector (IEMOCAP, mocap_data_collect.py)
where name = "{index}_s_{session}_{emotion}" and index is the row's position in the manifest.

How the corpus is read (each rule is a quirk of the real release):
- An utterance is a summary line of an EmoEvaluation block,
  "[START - END]<TAB>UTTERANCE_ID<TAB>EMO<TAB>[V, A, D]". Annotator lines (C-E2:, A-E3:, ...;
  some malformed) and the sub-directories (Categorical/, Attribute/, Self-evaluation/) are not
  read. A line that starts like a summary line but does not parse stops the run (file:line).
- Only files named like a dialogue (Ses01F_impro01.txt, Ses05M_script01_1b.txt) are dialogues;
  macOS "._*" files and other stray files are ignored. An utterance belongs to the dialogue
  named by its id minus the last part, matched exactly (Ses03M_impro05a is not Ses03M_impro05b).
- Transcription lines "ID [START-END]: text" are looked up by exact id; lines of ids without an
  EmoEvaluation entry (speaker-only "M: Yeah.", the XX lines) are not utterances.
- A transcript is kept as it is in the file (tags, double spaces), except that surrounding
  whitespace is stripped and each TAB, carriage return or other line-breaking character inside
  it becomes one space, so that the manifest row and Text/<name>.txt stay one line. A line
  with no text is an utterance with an empty transcript (the release has one): it is kept,
  with an empty Text/<name>.txt, and the summary counts and names such utterances.
- The speaker is the F/M of the id's last part (Ses01F_impro01_M013 is spoken by Ses01M).
- Corpus order: session, dialogue name, then (start, end, utterance id) -- neither file is in
  time order.

Verification: a summary table per session and class is printed. A target utterance whose wav
is missing, cut off (shorter than its header says) or not 16 kHz mono, or an utterance without a
transcript line, stops the run before anything is written. With --allow-missing the run goes on
and lists them: the row stays in the manifest (and labels_train_t.txt) with its label, but has no
Audio/<name>.wav, or an empty text (main.py --skip-missing then leaves it out). When the corpus
is the full release (all five sessions, at least half its 10039 utterances; --expect-full forces
the check, --no-expect-full turns it off) the counts must be the published ones or the run stops,
as SpeechBrain's recipe does: a corpus read wrongly should not silently train a model.

Re-running gives byte-identical files, never appends; files whose content is unchanged are not
rewritten; Audio/ and Text/ files named like an utterance that the run does not vouch for are
removed and listed in the summary (an utterance the new manifest does not list, or an earlier
run's Audio/<name>.wav of an utterance whose wav --allow-missing now lets through unusable, so
that the next stage never reads it as this one's), and so are the temporary files of a run that
was killed before it could clean up. A DATA_DIR that another corpus's collector wrote (classes.json
says which) is refused; --overwrite replaces it, removing all its files, features included.
Every file is written atomically and the manifest last, so an interrupted run
leaves no half-written file and no manifest that promises files which are not there.
"""
import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from mmser.data_contract import CLASSES
from mmser.data_dir_writer import SEED_LABELS, CorpusError, claim_data_dir, few, normalise_transcript, write_data_dir
from mmser.options import add_all_audio, add_overwrite_corpus
from mmser.utils import AudioError, read_audio

LABEL_OF_EMOTION = {"ang": "ang", "hap": "hap", "exc": "hap", "sad": "sad", "neu": "neu"}
SEED_CODES = {"ang": 0, "hap": 1, "exc": 2, "sad": 3, "neu": 4}
DEFAULT_EMOTIONS = ("ang", "hap", "exc", "sad", "neu")
EMOTION_CODES = ("ang", "hap", "exc", "sad", "neu", "fru", "sur", "fea", "dis", "oth", "xxx")
SESSIONS = (1, 2, 3, 4, 5)

# The published shape of IEMOCAP_full_release, counted by emotion code so that it does not
# depend on --emotions. "labelled" means one of the five codes of the 4-class task.
FULL_CORPUS = {
    "utterances": 10039,
    "labelled": 5531,
    "ang": 1103, "hap+exc": 1636, "sad": 1084, "neu": 1708,
    "labelled_per_session": {1: 1085, 2: 1023, 3: 1151, 4: 1031, 5: 1241},
}

DIALOG_RE = re.compile(r"^Ses0([1-5])[FM]_(?:impro|script)\w+$")
SUMMARY_RE = re.compile(
    r"^\[\s*(?P<start>\d+(?:\.\d*)?)\s*-\s*(?P<end>\d+(?:\.\d*)?)\s*\]\s+"
    r"(?P<utterance_id>\S+)\s+(?P<emotion>[a-z]{3})\s+"
    r"\[\s*(?P<valence>\d+(?:\.\d*)?)\s*,\s*(?P<activation>\d+(?:\.\d*)?)\s*,"
    r"\s*(?P<dominance>\d+(?:\.\d*)?)\s*\]\s*$")
TRANSCRIPT_RE = re.compile(r"^(?P<utterance_id>\S+)\s+\[[^\]]*\]:(?P<text>.*)$")


# ---------------------------------------------------------------------------------------------
# reading the corpus

def dialogue_of(utterance_id):
    return utterance_id.rsplit("_", 1)[0]


def read_lines(path):
    """The file's lines without their line endings (LF or CRLF); a lone CR stays in the line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM would hide the first line's "["
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # every byte decodes; the release is ASCII in practice
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def parse_emo_evaluation(path):
    """The summary lines of one EmoEvaluation file: a list of dicts, in file order."""
    path = Path(path)
    dialog = path.stem
    entries = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.lstrip().startswith("["):
            continue  # header, blank and annotator lines carry nothing the manifest needs
        m = SUMMARY_RE.match(line.strip())
        if m is None:
            raise CorpusError(f"{path}:{lineno}: malformed summary line, expected "
                              f"'[START - END]<TAB>UTTERANCE_ID<TAB>EMO<TAB>[V, A, D]': {line!r}")
        e = m.groupdict()
        where = f"{path}:{lineno}"
        if dialogue_of(e["utterance_id"]) != dialog:
            raise CorpusError(f"{where}: utterance {e['utterance_id']} does not belong to "
                              f"dialogue {dialog}")
        if not re.match(r"^[FM]", e["utterance_id"].rsplit("_", 1)[-1]):
            raise CorpusError(f"{where}: utterance id {e['utterance_id']} does not end in "
                              f"_F... or _M..., so its speaker is unknown")
        if e["emotion"] not in EMOTION_CODES:
            raise CorpusError(f"{where}: unknown emotion code {e['emotion']!r}")
        start, end = float(e["start"]), float(e["end"])
        if end < start:
            raise CorpusError(f"{where}: utterance {e['utterance_id']} ends before it starts")
        entries.append({"utterance_id": e["utterance_id"], "start": start, "end": end,
                        "emotion": e["emotion"], "valence": float(e["valence"]),
                        "activation": float(e["activation"]),
                        "dominance": float(e["dominance"]), "where": where})
    return entries


def parse_transcription(path):
    """{utterance_id: transcript} for every line shaped "ID [START-END]: text".

    Which of them are utterances is decided by EmoEvaluation, not here. An id repeated with
    the same text is one line written twice; with a different text, the first one is kept
    and a warning names both lines.
    """
    texts, first_line = {}, {}
    for lineno, line in enumerate(read_lines(path), 1):
        m = TRANSCRIPT_RE.match(line)
        if m is None:
            continue
        uid, text = m["utterance_id"], normalise_transcript(m["text"])
        if uid in texts:
            if texts[uid] != text:
                print(f"warning: {path}:{lineno}: {uid} already has a different transcript "
                      f"on line {first_line[uid]}; keeping that one", file=sys.stderr)
            continue
        texts[uid], first_line[uid] = text, lineno
    return texts


def find_dialogues(session_dir):
    """Sorted dialogue names of one session and the stray entries skipped beside them."""
    emo_dir = Path(session_dir) / "dialog" / "EmoEvaluation"
    if not Path(session_dir).is_dir():
        raise CorpusError(f"{session_dir}: session folder not found; IEMOCAP_ROOT must be the "
                          f"IEMOCAP_full_release folder that holds Session1 .. Session5")
    if not emo_dir.is_dir():
        raise CorpusError(f"{session_dir}: empty session folder: no dialog/EmoEvaluation/ in it")
    dialogs, stray = [], []
    for entry in sorted(emo_dir.iterdir()):
        if entry.is_dir():
            continue  # Categorical/, Attribute/, Self-evaluation/: per-annotator copies
        if entry.suffix == ".txt" and DIALOG_RE.match(entry.stem):
            dialogs.append(entry.stem)
        else:
            stray.append(entry)
    if not dialogs:
        raise CorpusError(f"{session_dir}: empty session folder: no dialogue files "
                          f"(Ses0*_impro*.txt, Ses0*_script*.txt) in {emo_dir}")
    return sorted(dialogs), stray


def read_corpus(iemocap_root, emotions=DEFAULT_EMOTIONS, allow_missing=False):
    """Manifest rows of every utterance of Session1..5, in corpus order, named.

    Returns (rows, notes): notes lists what --allow-missing let through, the utterances whose
    transcript line is empty, and what was skipped.
    """
    root = Path(iemocap_root)
    if not root.is_dir():
        raise CorpusError(f"{root}: IEMOCAP root folder not found")
    rows, notes, seen = [], {"missing_transcript": [], "empty_transcript": [], "stray": []}, {}
    for session in SESSIONS:
        session_dir = root / f"Session{session}"
        dialogs, stray = find_dialogues(session_dir)
        notes["stray"] += stray
        for dialog in dialogs:
            if int(DIALOG_RE.match(dialog)[1]) != session:
                raise CorpusError(f"{session_dir / 'dialog/EmoEvaluation' / (dialog + '.txt')}: "
                                  f"dialogue of another session in Session{session}")
            emo_path = session_dir / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
            entries = parse_emo_evaluation(emo_path)
            if not entries:
                raise CorpusError(f"{emo_path}: no summary line, so no utterance, in this "
                                  f"EmoEvaluation file")
            trans_path = session_dir / "dialog" / "transcriptions" / f"{dialog}.txt"
            if not trans_path.is_file():
                raise CorpusError(f"{trans_path}: transcription file not found for dialogue "
                                  f"{dialog}")
            texts = parse_transcription(trans_path)
            entries.sort(key=lambda e: (e["start"], e["end"], e["utterance_id"]))
            for e in entries:
                uid = e["utterance_id"]
                if uid in seen:
                    raise CorpusError(f"{e['where']}: utterance {uid} appears twice "
                                      f"(first at {seen[uid]})")
                seen[uid] = e["where"]
                if uid not in texts:
                    if not allow_missing:
                        raise CorpusError(f"{trans_path}: no transcript line for utterance {uid} "
                                          f"(--allow-missing goes on with an empty text)")
                    notes["missing_transcript"].append(f"{uid} ({trans_path})")
                elif not texts[uid]:
                    notes["empty_transcript"].append(uid)  # said nothing: an utterance all the same
                speaker = f"Ses0{session}{uid.rsplit('_', 1)[-1][0]}"
                rows.append({
                    "name": f"{len(rows)}_s_{session}_{e['emotion']}",
                    "utterance_id": uid, "session": session, "dialog": dialog,
                    "speaker": speaker, "gender": speaker[-1],
                    "start": e["start"], "end": e["end"], "emotion": e["emotion"],
                    "label": LABEL_OF_EMOTION[e["emotion"]] if e["emotion"] in emotions else "",
                    "valence": e["valence"], "activation": e["activation"],
                    "dominance": e["dominance"], "transcript": texts.get(uid, ""),
                })
    return rows, notes


def wav_path(iemocap_root, row):
    return (Path(iemocap_root) / f"Session{row['session']}" / "sentences" / "wav" / row["dialog"]
            / f"{row['utterance_id']}.wav")


def check_audio(iemocap_root, rows, progress=True, all_audio=False):
    """[(row, problem)] for every target utterance (every utterance with all_audio) whose wav is
    missing, cut off or not 16 kHz mono."""
    problems = []
    for row in tqdm(rows, desc="checking audio", unit="utt", disable=not progress):
        if not (row["label"] or all_audio):
            continue
        path = wav_path(iemocap_root, row)
        if not path.is_file():
            problems.append((row, f"{path}: wav not found for {row['utterance_id']}"))
            continue
        try:
            read_audio(path, dtype="int16")
        except AudioError as err:  # unreadable, not 16 kHz mono, or cut off
            problems.append((row, str(err)))
    return problems


def corpus_counts(rows):
    """The figures FULL_CORPUS lists, counted from the rows' emotion codes."""
    emo = Counter(r["emotion"] for r in rows)
    per_session = Counter(r["session"] for r in rows if r["emotion"] in SEED_CODES)
    return {
        "utterances": len(rows),
        "labelled": sum(emo[e] for e in SEED_CODES),
        "ang": emo["ang"], "hap+exc": emo["hap"] + emo["exc"], "sad": emo["sad"],
        "neu": emo["neu"],
        "labelled_per_session": {s: per_session[s] for s in SESSIONS},
    }


def looks_like_full_corpus(rows):
    return len(rows) >= FULL_CORPUS["utterances"] // 2


def verify_full_corpus(rows, iemocap_root="IEMOCAP_ROOT"):
    """Stop unless the counts are those of the published IEMOCAP_full_release."""
    found = corpus_counts(rows)
    diffs = [f"{key}: expected {FULL_CORPUS[key]}, found {found[key]}"
             for key in FULL_CORPUS if found[key] != FULL_CORPUS[key]]
    if diffs:
        raise CorpusError(f"{iemocap_root}: this is not the corpus the full release should give "
                          f"({'; '.join(diffs)}). Check the tree (missing or extra files?); "
                          f"use --no-expect-full to read a modified corpus on purpose.")


def summary_table(rows):
    """Utterances per session and per class, as printed after a run."""
    header = ["session", "dialogues", "utterances"] + list(CLASSES) + ["labelled", "other"]
    lines = []
    for session in list(SESSIONS) + ["all"]:
        sel = [r for r in rows if session == "all" or r["session"] == session]
        labels = Counter(r["label"] for r in sel)
        cells = [str(session), str(len({r["dialog"] for r in sel})), str(len(sel))]
        cells += [str(labels[c]) for c in CLASSES]
        cells += [str(len(sel) - labels[""]), str(labels[""])]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    exc = sum(r["emotion"] == "exc" and r["label"] == "hap" for r in rows)
    return "\n".join([fmt(header), *map(fmt, lines)]
                     + [f"(hap includes {exc} exc; other = emotions outside the targets)"])


# ---------------------------------------------------------------------------------------------
# writing DATA_DIR (through the collectors' one writer, with IEMOCAP's extra file)

ABOUT = {"corpus": "IEMOCAP", "collector": "mocap_data_collect.py"}


def seed_labels(rows):
    """labels_train_t.txt: "<name>.txt<TAB><code>" per target utterance, the seed's codes."""
    return "".join(f"{r['name']}.txt\t{SEED_CODES[r['emotion']]}\n" for r in rows if r["label"]).encode("utf-8")


def write_iemocap(iemocap_root, data_dir, rows, skip_audio=(), progress=True, all_audio=False,
                  emotions=DEFAULT_EMOTIONS, overwrite=False):
    """Text/, Audio/ (target utterances, every one with all_audio, none of skip_audio),
    labels_train_t.txt, classes.json and, last, utterances.csv; -> write_data_dir's (problems, removed)."""
    targets = {LABEL_OF_EMOTION[e] for e in emotions}
    problems, removed = write_data_dir(
        data_dir, rows, lambda row: read_audio(wav_path(iemocap_root, row), dtype="int16")[0],
        [c for c in CLASSES if c in targets], ABOUT, progress,
        wants_audio=lambda row: bool(row["label"] or all_audio) and row["name"] not in skip_audio,
        extra_files={SEED_LABELS: seed_labels}, overwrite=overwrite)
    return problems, removed


def collect(iemocap_root, data_dir, emotions=DEFAULT_EMOTIONS, allow_missing=False,
            expect_full=None, progress=True, out=sys.stdout, all_audio=False, overwrite=False):
    """Read the corpus, verify it, write DATA_DIR. Returns the manifest rows.

    expect_full: True checks the full release's counts, False never does, None checks when
    the corpus looks like the full release (see looks_like_full_corpus). all_audio: Audio/ for every
    utterance, not only the target emotions' (speech recognition transcribes the context too).
    overwrite: replace the DATA_DIR of another corpus (refused otherwise), all its files.
    """
    unknown = [e for e in emotions if e not in LABEL_OF_EMOTION]
    if unknown or not emotions:
        raise CorpusError(f"target emotions must be among {', '.join(LABEL_OF_EMOTION)}; "
                          f"got {', '.join(emotions) or 'none'}")
    iemocap_root, data_dir = Path(iemocap_root), Path(data_dir)
    if data_dir.resolve().is_relative_to(iemocap_root.resolve()):
        raise CorpusError(f"{data_dir}: DATA_DIR lies inside IEMOCAP_ROOT; the corpus is never "
                          f"written to")
    replaced = claim_data_dir(data_dir, ABOUT, overwrite)
    rows, notes = read_corpus(iemocap_root, emotions, allow_missing)
    if expect_full or (expect_full is None and looks_like_full_corpus(rows)):
        verify_full_corpus(rows, iemocap_root)
    problems = check_audio(iemocap_root, rows, progress, all_audio)
    if problems and not allow_missing:
        raise CorpusError(problems[0][1] + (f" (and {len(problems) - 1} more)" if
                                            len(problems) > 1 else "")
                          + "; use --allow-missing to go on without these utterances' audio")
    late, removed = write_iemocap(iemocap_root, data_dir, rows, skip_audio={r["name"] for r, _ in problems},
                            progress=progress, all_audio=all_audio, emotions=emotions, overwrite=overwrite)
    problems += late  # a wav that turned unreadable after the check: written as context only
    print(summary_table(rows), file=out)
    if notes["empty_transcript"]:
        print(f"{len(notes['empty_transcript'])} utterance(s) with an empty transcript line, kept "
              f"with an empty Text/<name>.txt: {few(notes['empty_transcript'])}", file=out)
    if notes["stray"]:
        print(f"ignored {len(notes['stray'])} stray file(s) beside the dialogues, "
              f"e.g. {notes['stray'][0]}", file=out)
    for what, items in (("audio", [p for _, p in problems]),
                        ("transcript", notes["missing_transcript"])):
        if items:
            print(f"--allow-missing: {len(items)} utterance(s) without {what}:", file=out)
            for item in items:
                print(f"  {item}", file=out)
    if replaced:
        print(f"--overwrite: replaced the DATA_DIR of {replaced['corpus']} ({replaced['collector']}): removed "
              f"{few(removed, 8)}", file=out)
    elif removed:
        print(f"removed {len(removed)} file(s) of an earlier run that this run does not vouch for "
              f"(utterance gone, or its wav now unusable): {few(removed)}", file=out)
    print(f"wrote {data_dir / 'utterances.csv'} ({len(rows)} utterances)", file=out)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("iemocap_root", help="the IEMOCAP_full_release folder (Session1..5)")
    parser.add_argument("data_dir", help="output folder (created if needed)")
    parser.add_argument("--emotions", default=",".join(DEFAULT_EMOTIONS),
                        help="target emotion codes, comma separated (default: %(default)s)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="go on when a target wav is missing, cut off or not 16 kHz mono, or a "
                             "transcript line is missing, and list them")
    parser.add_argument("--expect-full", action=argparse.BooleanOptionalAction, default=None,
                        help="check the full release's published counts (default: when the "
                             "corpus has at least half of them)")
    add_all_audio(parser)
    add_overwrite_corpus(parser)
    args = parser.parse_args(argv)
    emotions = tuple(e.strip() for e in args.emotions.split(",") if e.strip())
    try:
        collect(args.iemocap_root, args.data_dir, emotions, args.allow_missing, args.expect_full,
                progress=sys.stderr.isatty(), all_audio=args.all_audio, overwrite=args.overwrite)
    except CorpusError as err:
        print(f"mocap_data_collect.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash; every file written is whole
        print("mocap_data_collect.py: interrupted: the files written so far are whole and kept "
              "(utterances.csv is written last); rerun the same command to finish", file=sys.stderr)
        sys.exit(130)
