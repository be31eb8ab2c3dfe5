"""Write a small synthetic corpus shaped like IEMOCAP_full_release, for the tests and the demo.

    python synthetic_iemocap.py OUT_ROOT [--seed 0] [--dialogues-per-session 4]
                                [--utterances-per-dialogue 20]

Writes OUT_ROOT/Session{1..5}/... exactly where the real release has its files, and
OUT_ROOT/synthetic_truth.json (outside the Session folders, so a reader of the corpus never
sees it): the ground truth of every utterance in corpus order, for tests to compare with.

It is IEMOCAP in shape, quirks included, so that mocap_data_collect.py is tested on them:
- 5 sessions of two speakers (Ses0nF, Ses0nM); improvised and scripted dialogues, among them
  Ses03M_impro05a / Ses03M_impro05b and Ses05M_script01_1 / Ses05M_script01_1b; both speakers
  talk in every dialogue, so ids like Ses01F_impro01_M003 are spoken by the dialogue's M actor.
- EmoEvaluation: summary lines "[START - END]<TAB>ID<TAB>EMO<TAB>[V, A, D]", annotator lines
  (some malformed: "A-E2:<TAB>val 6; act 6; dom ;<TAB>()"), blocks out of time order, every
  emotion code (ang hap exc sad neu fru sur fea dis oth xxx), sub-directories Categorical/,
  Attribute/, Self-evaluation/, macOS "._*" files, a .DS_Store and a README.txt.
- Transcriptions: CRLF, lines out of time order, speaker-only lines ("M: Yeah.", "F:Umm."), XX
  lines (one duplicated, one ending before it starts, one with empty text), an utterance line
  written twice, double spaces, [LAUGHTER] tags, a TAB inside one text, trailing blanks; with
  --empty-transcript (off by default, so the demo's figures stay as they were) one target
  utterance whose line has no text, as in the release.
- Two utterances that start together and two with the same start and end, so the order by
  (start, end, utterance id) matters.
- 16 kHz mono PCM16 wavs in sentences/wav/<dialog>/, exactly (end - start) * 16000 samples long
  (times are multiples of 0.5 ms).

It is learnable, with some ambiguity, in each modality the model uses:
- text: a transcript mixes words of its emotion's vocabulary, shared filler words, and now and
  then a word of another emotion;
- audio: a voiced signal (harmonics of a moving pitch) whose pitch, loudness and syllable rate
  depend on the emotion (anger loud and fast, sadness low, quiet, slow and falling, ...), with
  per-speaker pitch, per-utterance jitter and background noise;
- context: each dialogue has a prevailing mood (one of the four classes) that most of its
  utterances share, and an emotion tends to repeat in the next utterance.

Same seed and sizes give byte-identical files. Rerunning with the same settings rewrites the
corpus; a synthetic corpus made with other settings (seed, sizes, --empty-transcript) is
replaced only with --overwrite, since tests and runs made on it would no longer match it; a
folder with Session folders but no synthetic_truth.json (a real corpus, perhaps) is never
replaced.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from data_contract import CLASSES, SAMPLE_RATE
from mocap_data_collect import DEFAULT_EMOTIONS, EMOTION_CODES
from utils import atomic_path, wav_bytes, write_bytes_atomic, write_text_atomic

TICK = 0.0005  # seconds; times are whole ticks, so "%.4f" is exact and lengths whole samples
SAMPLES_PER_TICK = 8
TRUTH_FILE = "synthetic_truth.json"
# Present while a corpus is being written (the truth file comes last): an interrupted corpus is
# still known as this script's, and a rerun replaces it instead of refusing it as a real one.
PARTIAL_FILE = ".synthetic_corpus_partial"
MOODS = CLASSES  # a dialogue's prevailing mood is one of the four target classes
# Emotions drawn when an utterance follows neither its dialogue's mood nor its predecessor:
# roughly the real corpus's mix, where xxx and fru are common.
BACKGROUND = {"ang": .07, "hap": .05, "exc": .08, "sad": .07, "neu": .16, "fru": .17, "sur": .04,
              "fea": .03, "dis": .02, "oth": .03, "xxx": .28}
P_MOOD, P_REPEAT = 0.5, 0.2

VOCAB = {
    "ang": "furious damn hate ridiculous shut stupid unfair enough liar outrageous sick yelling "
           "idiot fault",
    "hap": "wonderful great love lovely glad smile fun beautiful sunshine delighted laugh sweet "
           "nice happy",
    "exc": "amazing wow incredible fantastic awesome celebrate thrilled party brilliant "
           "wonderful great love glad",
    "sad": "miss lonely sorry cry lost tired gone hurts funeral empty alone tears sorrow died",
    "neu": "okay maybe meeting paper tuesday office form schedule address table number window "
           "noon desk",
    "fru": "why again whatever seriously waiting line forms pointless annoying ugh stuck",
    "sur": "really suddenly unexpected whoa believe what surprise",
    "fea": "scared afraid dark danger careful worried nervous help",
    "dis": "gross disgusting awful yuck nasty smell",
    "oth": "strange weird odd",
}
VOCAB = {e: words.split() for e, words in VOCAB.items()}
FILLER = ("i you the a it is that we just know well so and think was to this like yeah um oh "
          "right there me it's don't have do not what can about").split()
# (pitch Hz, amplitude, syllables per second, pitch modulation depth, pitch slope over the
# utterance); xxx has none: its voice blends two of the others, as its label blends annotators.
VOICE = {
    "ang": (230, 0.55, 5.5, 0.15, 0.0),
    "hap": (260, 0.42, 4.6, 0.20, 0.05),
    "exc": (280, 0.50, 5.0, 0.22, 0.10),
    "sad": (150, 0.12, 2.2, 0.04, -0.20),
    "neu": (180, 0.25, 3.5, 0.06, 0.0),
    "fru": (210, 0.40, 4.2, 0.10, -0.05),
    "sur": (300, 0.40, 4.0, 0.30, 0.30),
    "fea": (270, 0.22, 6.0, 0.12, 0.05),
    "dis": (165, 0.30, 3.0, 0.08, -0.10),
    "oth": (200, 0.30, 3.8, 0.10, 0.0),
}
SPEAKER_PITCH = {"F": 1.15, "M": 0.85}
VAD_MEAN = {  # valence, activation, dominance on IEMOCAP's 1..5 scales
    "ang": (1.8, 3.9, 3.8), "hap": (4.0, 3.2, 3.2), "exc": (4.0, 3.8, 3.4), "sad": (1.9, 2.2, 2.2),
    "neu": (3.0, 2.4, 2.7), "fru": (2.0, 3.2, 3.0), "sur": (3.3, 3.6, 2.8), "fea": (2.0, 3.4, 2.0),
    "dis": (1.9, 3.0, 3.2), "oth": (2.8, 2.8, 2.8), "xxx": (2.7, 2.9, 2.9),
}
CATEGORY_WORD = {"ang": "Anger", "hap": "Happiness", "exc": "Excited", "sad": "Sadness",
                 "neu": "Neutral state", "fru": "Frustration", "sur": "Surprise", "fea": "Fear",
                 "dis": "Disgust", "oth": "Other"}
# One period of a voiced sound (six harmonics falling as 1/k), looked up rather than summed
# per sample: the corpus is written in about a second.
_THETA = 2 * np.pi * np.arange(4096) / 4096
GLOTTAL_CYCLE = sum(np.sin(k * _THETA) / k for k in range(1, 7)) / 2.45
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00\x00\t\xff\xfe"


class SyntheticCorpusError(ValueError):
    """What was asked for cannot or should not be written; the message names the folder."""


def dialogue_names(session, n):
    """n dialogue names of a session; sessions 3 and 5 hold the pairs a prefix match confuses."""
    special = {3: ["Ses03M_impro05a", "Ses03M_impro05b"],
               5: ["Ses05M_script01_1", "Ses05M_script01_1b"]}.get(session, [])
    names = list(special)
    k = 1
    while len(names) < n:
        actor = "FM"[k % 2]
        kind = f"impro0{k}" if k % 2 else f"script0{k // 2 + 1}_{k % 3 + 1}"
        name = f"Ses0{session}{actor}_{kind}"
        if name not in names and name != "Ses03M_impro05":  # the release has only 05a, 05b
            names.append(name)
        k += 1
    return sorted(names[:n])


def fmt_time(ticks, width=0):
    return f"{ticks * TICK:0{width}.4f}" if width else f"{ticks * TICK:.4f}"


def draw_emotions(rng, mood, n):
    emotions, prev = [], None
    codes, probs = list(BACKGROUND), np.array(list(BACKGROUND.values()))
    for _ in range(n):
        u = rng.random()
        if u < P_MOOD:
            e = mood if mood != "hap" else ("hap", "exc")[rng.integers(2)]
        elif u < P_MOOD + P_REPEAT and prev is not None:
            e = prev
        else:
            e = codes[rng.choice(len(codes), p=probs / probs.sum())]
        emotions.append(e)
        prev = e
    return emotions


def make_transcript(rng, emotion):
    """Words of the emotion, filler, and sometimes a word of another emotion."""
    source = emotion if emotion != "xxx" else MOODS[rng.integers(4)]
    words = []
    for _ in range(rng.integers(3, 9)):
        u = rng.random()
        if u < 0.45:
            words.append(VOCAB[source][rng.integers(len(VOCAB[source]))])
        elif u < 0.55:
            other = list(VOCAB)[rng.integers(len(VOCAB))]
            words.append(VOCAB[other][rng.integers(len(VOCAB[other]))])
        else:
            words.append(FILLER[rng.integers(len(FILLER))])
    words[0] = words[0].capitalize()
    end = "!" if emotion in ("ang", "exc", "sur") and rng.random() < 0.6 else (
        "?" if rng.random() < 0.2 else ".")
    return " ".join(words) + end


def synth_voice(rng, emotion, gender, n_samples):
    """int16 samples of a voiced signal whose pitch, loudness and tempo follow the emotion."""
    if emotion == "xxx":
        a, b = rng.choice(list(VOICE), size=2, replace=False)
        w = rng.random()
        params = [w * x + (1 - w) * y for x, y in zip(VOICE[a], VOICE[b])]
    else:
        params = list(VOICE[emotion])
    f0, amp, rate, depth, slope = params
    jitter = np.exp(rng.normal(0, 0.12, size=3))
    f0, amp, rate = f0 * SPEAKER_PITCH[gender] * jitter[0], amp * jitter[1], rate * jitter[2]
    t = np.arange(n_samples) / SAMPLE_RATE
    frac = t / max(t[-1], 1e-9)
    pitch = f0 * (1 + depth * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi))) \
        * (1 + slope * (frac - 0.5))
    cycles = np.cumsum(pitch) / SAMPLE_RATE
    voice = GLOTTAL_CYCLE[(cycles * len(GLOTTAL_CYCLE)).astype(np.int64) % len(GLOTTAL_CYCLE)]
    syllables = (0.5 - 0.5 * np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))) ** 1.5
    fade = np.minimum(1, np.minimum(t, t[-1] - t) / 0.02)
    x = amp * (0.08 + 0.92 * syllables) * fade * voice + rng.normal(0, 0.01, n_samples)
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def vad(rng, emotion):
    """Mean of 2 or 3 annotators' integer scores per dimension, as IEMOCAP reports them."""
    k = int(rng.integers(2, 4))
    scores = np.clip(np.round(np.array(VAD_MEAN[emotion])[:, None]
                              + rng.normal(0, 0.7, (3, k))), 1, 5)
    return [float(f"{v:.4f}") for v in scores.mean(1)], scores.astype(int)


def plan_dialogue(rng, session, dialog, mood, n, quirks):
    """The utterances of one dialogue, in time order, with ids, texts and labels."""
    emotions = draw_emotions(rng, mood, n)
    ticks = int(rng.integers(2000, 10000))
    speaker = "FM"[rng.integers(2)]
    plan = []
    for i, emotion in enumerate(emotions):
        dur = int(rng.integers(2000, 6001))  # 1 to 3 s
        start = ticks
        if quirks.get("overlap") and i in (3, 7):
            start = plan[-1]["start_ticks"]  # both speakers at once
            if i == 7:
                dur = plan[-1]["end_ticks"] - start  # same start and end: the id decides
        plan.append({"start_ticks": start, "end_ticks": start + dur, "emotion": emotion,
                     "gender": speaker})
        ticks = max(ticks, start + dur) + int(rng.integers(200, 2400))
        if rng.random() < 0.75 or (quirks.get("overlap") and i in (2, 6)):
            speaker = "M" if speaker == "F" else "F"
    plan.sort(key=lambda u: (u["start_ticks"], u["end_ticks"], u["gender"]))
    count = {"F": 0, "M": 0}
    for u in plan:
        u["utterance_id"] = f"{dialog}_{u['gender']}{count[u['gender']]:03d}"
        count[u["gender"]] += 1
        u["speaker"] = f"Ses0{session}{u['gender']}"
    return plan


def emo_evaluation_text(rng, plan, malformed, newline):
    lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
    for j in rng.permutation(len(plan)):
        u = plan[j]
        v, a, d = u["vad"]
        lines.append(f"[{fmt_time(u['start_ticks'])} - {fmt_time(u['end_ticks'])}]\t"
                     f"{u['utterance_id']}\t{u['emotion']}\t[{v:.4f}, {a:.4f}, {d:.4f}]")
        cats = ([CATEGORY_WORD[u["emotion"]]] if u["emotion"] != "xxx"
                else [CATEGORY_WORD[c] for c in rng.choice(list(CATEGORY_WORD), 2, replace=False)])
        for k in range(1, 4):
            lines.append(f"C-E{k + 1}:\t{cats[(k - 1) % len(cats)]};\t()")
        for k in range(u["scores"].shape[1]):
            sv, sa, sd = u["scores"][:, k]
            lines.append(f"A-E{k + 1}:\tval {sv}; act {sa}; dom  {sd};\t()")
        if malformed and j == 0:
            lines.append("A-E2:\tval 6; act 6; dom ;\t()")
        lines.append("")
    return newline.join(lines) + newline


def transcription_text(rng, dialog, plan, extra):
    """CRLF lines out of time order, with the lines of the real release that are no utterance."""
    lines = []
    for u in plan:
        raw = u["transcript_raw"]
        lines.append(f"{u['utterance_id']} [{fmt_time(u['start_ticks'], 8)}-"
                     f"{fmt_time(u['end_ticks'], 8)}]: {raw}" + ("  " if rng.random() < .1 else ""))
    if extra.get("duplicate_line"):
        lines.append(lines[1])
    lines += ["M: Yeah.", "F:Umm."]
    last = plan[-1]["end_ticks"]
    if extra.get("xx"):
        xx = f"{dialog}_MXX0 [{fmt_time(last + 400, 8)}-{fmt_time(last + 4800, 8)}]: Okay, bye."
        lines += [xx, xx,  # a duplicated XX line, one ending before it starts, one empty
                  f"{dialog}_FXX0 [{fmt_time(last + 6000, 8)}-{fmt_time(last + 5000, 8)}]: Hm.",
                  f"{dialog}_FXX1 [{fmt_time(last + 7000, 8)}-{fmt_time(last + 7400, 8)}]: "]
    order = rng.permutation(len(lines))
    return "".join(lines[i] + "\r\n" for i in order)


def add_text_quirks(rng, plans):
    """Tags, double spaces and one TAB inside a text, spread over the corpus; returns their ids."""
    utts = [u for plan in plans for u in plan]
    quirks = {"laughter": [], "double_space": [], "tab_in_text": []}
    for u in utts:
        words = u["transcript_raw"].split(" ")
        r = rng.random()
        if r < (0.35 if u["emotion"] in ("hap", "exc") else 0.04):
            words.insert(int(rng.integers(len(words) + 1)), "[LAUGHTER]")
            quirks["laughter"].append(u["utterance_id"])
        elif r > 0.93 and len(words) > 2:
            i = int(rng.integers(1, len(words)))
            words[i] = " " + words[i]
            quirks["double_space"].append(u["utterance_id"])
        u["transcript_raw"] = " ".join(words)
    tabbed = next(u for u in utts if u["emotion"] in MOODS and " " in u["transcript_raw"]
                  and u["utterance_id"] not in quirks["double_space"])
    tabbed["transcript_raw"] = tabbed["transcript_raw"].replace(" ", "\t", 1)
    quirks["tab_in_text"].append(tabbed["utterance_id"])
    return quirks


def ensure_every_code(rng, plans):
    """Give each emotion code missing by chance to an utterance of a common code."""
    present = {u["emotion"] for plan in plans for u in plan}
    pool = [u for plan in plans for u in plan if u["emotion"] in ("fru", "xxx", "neu")]
    for code in EMOTION_CODES:
        if code not in present:
            pool.pop(int(rng.integers(len(pool))))["emotion"] = code


def blank_one_transcript(plans, quirks):
    """Empty the transcript of one target utterance that carries no other text quirk; return its id.

    Chosen without drawing from the generator, so that the rest of the corpus stays the same bytes.
    """
    taken = {i for ids in quirks.values() for i in ids}
    u = next(u for plan in plans[1:] for u in plan
             if u["emotion"] in DEFAULT_EMOTIONS and u["utterance_id"] not in taken)
    u["transcript_raw"] = ""
    return u["utterance_id"]


def settings_text(settings):
    """Settings as the command line gives them."""
    if settings is None:
        return "unknown settings (its truth file is unreadable)"
    return (f"--seed {settings['seed']} --dialogues-per-session {settings['dialogues_per_session']} "
            f"--utterances-per-dialogue {settings['utterances_per_dialogue']}"
            + (" --empty-transcript" if settings["empty_transcript"] else ""))


def earlier_settings(root):
    """The settings of the synthetic corpus at root, read from its truth file; None if unreadable."""
    try:
        truth = load_truth(root)
        # A corpus made before --empty-transcript existed has no such key, and no empty transcript.
        return {"seed": truth["seed"], "dialogues_per_session": truth["dialogues_per_session"],
                "utterances_per_dialogue": truth["utterances_per_dialogue"],
                "empty_transcript": truth.get("empty_transcript", False)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def clear_out_root(root, settings, overwrite):
    """Make root ready for a corpus of these settings: remove an earlier synthetic corpus made
    with the same ones (a rerun) or, with overwrite, other ones; refuse anything else."""
    sessions = [root / f"Session{s}" for s in range(1, 6)]
    if (root / TRUTH_FILE).is_file():
        earlier = earlier_settings(root)
        if earlier != settings and not overwrite:
            raise SyntheticCorpusError(
                f"{root}: holds a synthetic corpus made with {settings_text(earlier)}, not "
                f"{settings_text(settings)}; give --overwrite to replace it")
    elif any(p.exists() for p in sessions) and not (root / PARTIAL_FILE).is_file():
        raise SyntheticCorpusError(f"{root}: holds Session folders but no {TRUTH_FILE}; not "
                                   f"overwriting what may be a real corpus")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file of that name, a folder where nothing can be made
        raise SyntheticCorpusError(f"{root}: cannot create the corpus folder "
                                   f"({err.strerror})") from None
    (root / PARTIAL_FILE).touch()
    for p in sessions:  # an earlier synthetic corpus: replace it whole, never mix the two
        shutil.rmtree(p, ignore_errors=True)
    (root / TRUTH_FILE).unlink(missing_ok=True)


def make_corpus(root, seed=0, dialogues_per_session=4, utterances_per_dialogue=20,
                empty_transcript=False, overwrite=False):
    """Write the corpus at root (root/Session1..5, root/synthetic_truth.json); return the truth.

    empty_transcript: give one target utterance a transcription line without text, as the real
    release has. Off by default: the demo's corpus, and so its figures, stay as they were.
    overwrite: replace a synthetic corpus at root made with other settings (a real corpus,
    a folder with Session folders but no truth file, is never replaced).
    SyntheticCorpusError names what was refused.

    The truth is a dict: "utterances", every utterance in corpus order with the manifest's
    fields (transcript as a reader should give it: TABs made spaces, surrounding blanks
    stripped; transcript_raw as written, less the trailing blanks some lines get), "wav" (path under root) and "n_samples";
    "dialog_moods"; "quirks" (which ids and files carry which quirk); "seed" and the sizes.
    """
    if dialogues_per_session < 2 or utterances_per_dialogue < 10:
        raise SyntheticCorpusError("need at least 2 dialogues per session and 10 utterances per "
                                   "dialogue to carry every quirk")
    root = Path(root)
    settings = {"seed": seed, "dialogues_per_session": dialogues_per_session,
                "utterances_per_dialogue": utterances_per_dialogue,
                "empty_transcript": empty_transcript}
    clear_out_root(root, settings, overwrite)
    rng = np.random.default_rng(seed)
    plans, moods, where = [], {}, {}
    for session in range(1, 6):
        dialogs = dialogue_names(session, dialogues_per_session)
        mood_order = rng.permutation(MOODS)
        for k, dialog in enumerate(dialogs):
            moods[dialog] = str(mood_order[k % 4])
            overlap = session == 1 and k == 0
            plan = plan_dialogue(rng, session, dialog, moods[dialog], utterances_per_dialogue,
                                 {"overlap": overlap})
            plans.append(plan)
            where[dialog] = session
    ensure_every_code(rng, plans)
    for plan in plans:
        for u in plan:
            u["transcript_raw"] = make_transcript(rng, u["emotion"])
            u["vad"], u["scores"] = vad(rng, u["emotion"])
    quirks = add_text_quirks(rng, plans)
    quirks["empty_transcript"] = [blank_one_transcript(plans, quirks)] if empty_transcript else []
    overlap_plan = plans[0]
    starts = {}
    for u in overlap_plan:
        starts.setdefault(u["start_ticks"], []).append(u)
    quirks["same_start"] = [[u["utterance_id"] for u in group]
                            for group in starts.values() if len(group) > 1]
    quirks.update(stray_files=[], malformed_annotator_line=[], xx_lines=[], duplicate_line=[])

    for plan in plans:
        dialog = plan[0]["utterance_id"].rsplit("_", 1)[0]
        session = where[dialog]
        sdir = root / f"Session{session}"
        emo_dir = sdir / "dialog" / "EmoEvaluation"
        malformed = session in (2, 4)
        newline = "\r\n" if session == 4 else "\n"
        write_text_atomic(emo_dir / f"{dialog}.txt",
                          emo_evaluation_text(rng, plan, malformed, newline))
        if malformed:
            quirks["malformed_annotator_line"].append(dialog)
        # Per-annotator copies the reader must not take for dialogues.
        write_text_atomic(emo_dir / "Categorical" / f"{dialog}_e2_cat.txt",
                          "".join(f"{u['utterance_id']} :{CATEGORY_WORD.get(u['emotion'], 'Other')};"
                                  f" ()\n" for u in plan))
        write_text_atomic(emo_dir / "Attribute" / f"{dialog}_e3_atr.txt",
                          "".join(f"{u['utterance_id']} :act 3; val 3; dom 3; ()\n" for u in plan))
        write_text_atomic(emo_dir / "Self-evaluation" / f"{dialog}.anvil",
                          "<annotation></annotation>\n")
        extra = {"xx": session in (1, 3), "duplicate_line": plan is plans[1]}
        if extra["xx"]:
            quirks["xx_lines"].append(dialog)
        if extra["duplicate_line"]:
            quirks["duplicate_line"].append(dialog)
        with atomic_path(sdir / "dialog" / "transcriptions" / f"{dialog}.txt") as tmp:
            tmp.write_bytes(transcription_text(rng, dialog, plan, extra).encode("utf-8"))
        for u in plan:
            n = (u["end_ticks"] - u["start_ticks"]) * SAMPLES_PER_TICK
            u["n_samples"] = n
            u["wav"] = f"Session{session}/sentences/wav/{dialog}/{u['utterance_id']}.wav"
            write_bytes_atomic(root / u["wav"], wav_bytes(synth_voice(rng, u["emotion"], u["gender"], n), SAMPLE_RATE))
        if session == 2:
            stray = [f"Session2/dialog/EmoEvaluation/._{dialog}.txt",
                     f"Session2/dialog/transcriptions/._{dialog}.txt",
                     f"Session2/sentences/wav/{dialog}/._{plan[0]['utterance_id']}.wav"]
            for rel in stray:
                write_bytes_atomic(root / rel, APPLE_DOUBLE)
            quirks["stray_files"] += stray
    for rel, data in (("Session1/dialog/EmoEvaluation/.DS_Store", b"\x00\x00\x00\x01Bud1"),
                      ("Session5/dialog/EmoEvaluation/README.txt",
                       b"Annotations of session 5; see the release notes.\n")):
        write_bytes_atomic(root / rel, data)
        quirks["stray_files"].append(rel)

    utterances = []
    for plan in plans:
        dialog = plan[0]["utterance_id"].rsplit("_", 1)[0]
        for u in plan:
            v, a, d = u["vad"]
            utterances.append({
                "utterance_id": u["utterance_id"], "session": where[dialog], "dialog": dialog,
                "speaker": u["speaker"], "gender": u["gender"],
                "start": float(fmt_time(u["start_ticks"])), "end": float(fmt_time(u["end_ticks"])),
                "emotion": u["emotion"], "valence": v, "activation": a, "dominance": d,
                "transcript": u["transcript_raw"].replace("\t", " ").strip(),
                "transcript_raw": u["transcript_raw"], "wav": u["wav"],
                "n_samples": u["n_samples"],
            })
    # Corpus order, as the data contract defines it; the plans are already grouped by dialogue.
    utterances.sort(key=lambda u: (u["session"], u["dialog"], u["start"], u["end"],
                                   u["utterance_id"]))
    truth = {"seed": seed, "dialogues_per_session": dialogues_per_session,
             "utterances_per_dialogue": utterances_per_dialogue,
             "empty_transcript": empty_transcript, "sample_rate": SAMPLE_RATE,
             "dialog_moods": moods, "quirks": quirks, "utterances": utterances}
    write_text_atomic(root / TRUTH_FILE, json.dumps(truth, indent=1, sort_keys=True) + "\n")
    (root / PARTIAL_FILE).unlink()
    return truth


def load_truth(root):
    return json.loads((Path(root) / TRUTH_FILE).read_text(encoding="utf-8"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_root", help="folder to write Session1..5 into (created if needed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="same seed and sizes, same bytes (default: %(default)s)")
    parser.add_argument("--dialogues-per-session", type=int, default=4,
                        help="at least 2 (default: %(default)s)")
    parser.add_argument("--utterances-per-dialogue", type=int, default=20,
                        help="at least 10 (default: %(default)s)")
    parser.add_argument("--empty-transcript", action="store_true",
                        help="give one target utterance an empty transcript, as the release has")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a synthetic corpus in OUT_ROOT made with other settings")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        truth = make_corpus(args.out_root, args.seed, args.dialogues_per_session,
                            args.utterances_per_dialogue, args.empty_transcript, args.overwrite)
    except SyntheticCorpusError as err:
        print(f"synthetic_iemocap.py: error: {err}", file=sys.stderr)
        return 2
    utts = truth["utterances"]
    labelled = sum(u["emotion"] in DEFAULT_EMOTIONS for u in utts)
    print(f"wrote {len(utts)} utterances ({labelled} of ang/hap/exc/sad/neu) in 5 sessions to "
          f"{args.out_root} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a traceback would read as a crash
        print("synthetic_iemocap.py: interrupted: rerun the same command to make the corpus", file=sys.stderr)
        sys.exit(130)
