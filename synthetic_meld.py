"""Write a small synthetic tree shaped like the MELD release, with its defects, for the tests and a demo.

    python synthetic_meld.py OUT_ROOT [--seed 0] [--dialogues-per-split 6,2,3]
                             [--utterances-per-dialogue 8] [--real-csvs DIR]
    python meld_data_collect.py OUT_ROOT DATA_DIR          (then the pipeline as for IEMOCAP)

Writes OUT_ROOT/{train,dev,test}_sent_emo.csv (MELD's columns) and the mp4 clips (a tiny video
stream and 48 kHz stereo audio, AAC as MELD's or AC-3, quicker to write; written with PyAV) in
train_splits/, dev_splits_complete/ and output_repeated_splits_test/, as the release has them, and
OUT_ROOT/synthetic_truth.json (beside, never read by the collector): every utterance in corpus
order with its clean text, and the defects.

Real rows: with --real-csvs (default: tests/data/meld, MELD's public CSVs, where present) the
dialogues train 0 and 125, dev 0 and 110, test 0 and 1 are MELD's own rows, with their ids,
speakers, text, emotions and times; the other dialogues are synthetic. Without the CSVs those
dialogues are synthetic too, under the same ids, so the defects below keep their real names.

Defects, under the real release's names where it has them: dev dia110_utt7.mp4 missing, train
dia125_utt3.mp4 corrupted (here: cut after its first bytes), clips that no row lists (dev
dia66_utt9.mp4, test final_videos_testdia101_utt0.mp4); a text mis-encoded as the original CSVs are
(a Windows-1252 apostrophe read as Latin-1, "\\x92"); and two the collector must handle though the
release is not known to have them: test dia1_utt2.mp4 without an audio stream, and a text whose
UTF-8 was read as Windows-1252 ("â€™").

Learnable, like synthetic_iemocap.py: a synthetic utterance's words come from its emotion's
vocabulary and its voice's pitch, loudness and tempo from its emotion, and each dialogue has a
prevailing emotion. MELD's emotions borrow IEMOCAP's synthetic ones (joy: hap, surprise: sur, ...).
"""
import argparse
import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

import synthetic_iemocap as iemocap
from data_contract import SAMPLE_RATE
from meld_data_collect import CLIP_FOLDERS, CSV_COLUMNS, CSV_NAMES, episode_seconds
from utils import write_bytes_atomic, write_text_atomic

TRUTH_FILE = "synthetic_truth.json"
REAL_CSVS = Path(__file__).resolve().parent / "tests" / "data" / "meld"
REAL_DIALOGUES = {"train": (0, 125), "dev": (0, 110), "test": (0, 1)}
FIRST_SYNTHETIC_DIALOGUE = 2000  # above the real Dialogue_IDs (train's last is 1038)
VOICE_OF = {"neutral": "neu", "joy": "hap", "surprise": "sur", "anger": "ang", "sadness": "sad",
            "disgust": "dis", "fear": "fea"}
SENTIMENT_OF = {"neutral": "neutral", "joy": "positive", "surprise": "positive", "anger": "negative",
                "sadness": "negative", "disgust": "negative", "fear": "negative"}
EMOTION_MIX = {"neutral": .40, "joy": .17, "surprise": .12, "anger": .11, "sadness": .08, "disgust": .06, "fear": .06}
CAST = (("Chandler", "M"), ("Monica", "F"), ("Ross", "M"), ("Rachel", "F"), ("Joey", "M"), ("Phoebe", "F"))
MISSING = ("dev", 110, 7)
CORRUPTED = ("train", 125, 3)
NO_AUDIO = ("test", 1, 2)
UNLISTED = (("dev", "dia66_utt9.mp4"), ("test", "final_videos_testdia101_utt0.mp4"))
CLIP_RATE = 48000
# MELD's clips carry AAC, which the first clip of each dialogue has here; the others carry AC-3, which
# ffmpeg decodes through the same path and encodes 15x faster (60 ms against 4 ms a clip, measured).
FAST_CODEC = "ac3"


def srt_time(seconds):
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def synthetic_dialogue(rng, n):
    """n utterances of one conversation: emotions around a prevailing one, words and two speakers."""
    emotions, p = list(EMOTION_MIX), np.array(list(EMOTION_MIX.values()))
    mood = emotions[rng.choice(len(emotions), p=p)]
    pair = [CAST[i] for i in rng.choice(len(CAST), size=2, replace=False)]
    season, episode, t = int(rng.integers(1, 11)), int(rng.integers(1, 25)), float(rng.uniform(60, 1200))
    rows = []
    for u in range(n):
        emotion = mood if rng.random() < 0.5 else emotions[rng.choice(len(emotions), p=p)]
        speaker = pair[u % 2]
        duration = float(rng.uniform(0.6, 1.2))
        sentiment = SENTIMENT_OF[emotion] if emotion != "surprise" else ("positive", "negative")[rng.integers(2)]
        rows.append({"Utterance": iemocap.make_transcript(rng, VOICE_OF[emotion]), "Speaker": speaker[0],
                     "gender": speaker[1], "Emotion": emotion, "Sentiment": sentiment, "Season": season,
                     "Episode": episode, "start": t, "end": t + duration})
        t += duration + float(rng.uniform(0.1, 0.8))
    return rows


def clip_bytes(samples, video=True, audio=True, codec="aac"):
    """An mp4 like MELD's: a tiny video stream and the 16 kHz samples as 48 kHz stereo AAC (or `codec`)."""
    import av
    from scipy.signal import resample_poly
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        streams = []  # every stream is added before the first packet is muxed
        if video:
            v = out.add_stream("mpeg4", rate=4)
            v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
            black = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            streams.append((v, [black, black]))
        if audio:
            a = out.add_stream(codec, rate=CLIP_RATE, layout="stereo")
            y = resample_poly(samples.astype(np.float32) / 32768, CLIP_RATE // SAMPLE_RATE, 1).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([y, y]), format="fltp", layout="stereo")
            frame.sample_rate = CLIP_RATE
            streams.append((a, [frame]))
        for stream, frames in streams:
            for f in [*frames, None]:
                for packet in stream.encode(f):
                    out.mux(packet)
    return buffer.getvalue()


def real_rows(real_csvs, split):
    """{Dialogue_ID: [CSV rows]} of the real dialogues of REAL_DIALOGUES in MELD's CSV, or {}."""
    path = Path(real_csvs) / CSV_NAMES[split] if real_csvs else None
    if path is None or not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if int(r["Dialogue_ID"]) in REAL_DIALOGUES[split]]
    return {d: [r for r in rows if int(r["Dialogue_ID"]) == d] for d in REAL_DIALOGUES[split]}


def mis_encode(text, how):
    """Text as MELD.Raw garbles it: ’ as the Latin-1 reading of its Windows-1252 byte, or as the
    Windows-1252 reading of its UTF-8 bytes."""
    if how == "latin-1":
        return text.replace("’", "\x92")
    return text.replace("’", "’".encode("utf-8").decode("cp1252"))


def make_tree(root, seed=0, dialogues_per_split=(6, 2, 3), utterances_per_dialogue=8, real_csvs=REAL_CSVS):
    """Write the tree (replacing an earlier synthetic one); -> the truth: utterances in corpus order, defects."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not (root / TRUTH_FILE).is_file():
            raise FileExistsError(f"{root}: holds files and is not a synthetic MELD tree; give a new folder")
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    truth, garbled = [], ["latin-1", "cp1252"]
    for split, n_synthetic in zip(CSV_NAMES, dialogues_per_split):
        real = real_rows(real_csvs, split)
        dialog_ids = list(REAL_DIALOGUES[split]) + [FIRST_SYNTHETIC_DIALOGUE + k for k in range(n_synthetic)]
        table = []
        for dia in dialog_ids:
            if dia in real:
                rows = [{**r, "gender": "MF"[int(rng.integers(2))], "real": True} for r in real[dia]]
            else:
                rows = [{**r, "StartTime": srt_time(r.pop("start")), "EndTime": srt_time(r.pop("end")), "real": False}
                        for r in synthetic_dialogue(rng, utterances_per_dialogue)]
            for utt, row in enumerate(rows):
                row.update({"Dialogue_ID": str(dia), "Utterance_ID": str(row.get("Utterance_ID", utt))})
                row["clean"] = row["Utterance"]
                if row["real"] and garbled and "’" in row["Utterance"]:
                    row["Utterance"] = mis_encode(row["Utterance"], garbled.pop(0))
                table.append(row)
        folder = root / CLIP_FOLDERS[split]
        for row in table:
            key = (split, int(row["Dialogue_ID"]), int(row["Utterance_ID"]))
            if key == MISSING:
                continue
            emotion = row["Emotion"]
            voice = iemocap.synth_voice(rng, VOICE_OF[emotion], row["gender"], round(SAMPLE_RATE * clip_seconds(row)))
            data = clip_bytes(voice, audio=key != NO_AUDIO, codec="aac" if key[2] == 0 else FAST_CODEC)
            write_bytes_atomic(folder / f"dia{key[1]}_utt{key[2]}.mp4", data[:400] if key == CORRUPTED else data)
        with io.StringIO() as buffer:
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for k, row in enumerate(table, 1):
                writer.writerow([row.get("Sr No.") or k, row["Utterance"], row["Speaker"], row["Emotion"],
                                 row["Sentiment"], row["Dialogue_ID"], row["Utterance_ID"], row["Season"],
                                 row["Episode"], row["StartTime"], row["EndTime"]])
            write_text_atomic(root / CSV_NAMES[split], buffer.getvalue())
        truth += [{"split": split, "dialogue": int(r["Dialogue_ID"]), "utterance": int(r["Utterance_ID"]),
                   "text": r["clean"], "garbled": r["Utterance"] != r["clean"], "speaker": r["Speaker"],
                   "emotion": r["Emotion"], "sentiment": r["Sentiment"], "real": r["real"]} for r in table]
    short = clip_bytes(np.zeros(SAMPLE_RATE // 2, np.int16))
    for split, name in UNLISTED:
        write_bytes_atomic(root / CLIP_FOLDERS[split] / name, short)
    defects = {"missing": "dev_dia110_utt7", "corrupted": "train_dia125_utt3", "no_audio": "test_dia1_utt2",
               "unlisted": [f"{CLIP_FOLDERS[s]}/{n}" for s, n in UNLISTED]}
    result = {"seed": seed, "utterances": truth, "defects": defects}
    write_text_atomic(root / TRUTH_FILE, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def clip_seconds(row):
    """The clip's length: its times in the episode, held to 0.5-1.2 s so that the tree is quick to write."""
    return min(1.2, max(0.5, episode_seconds(row["EndTime"], "") - episode_seconds(row["StartTime"], "")))


def load_truth(root):
    return json.loads((Path(root) / TRUTH_FILE).read_text(encoding="utf-8"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output folder (new, or a synthetic MELD tree to replace)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dialogues-per-split", default="6,2,3",
                        help="synthetic dialogues in train,dev,test, beside the real ones")
    parser.add_argument("--utterances-per-dialogue", type=int, default=8)
    parser.add_argument("--real-csvs", default=str(REAL_CSVS),
                        help="folder of MELD's CSVs to take the real dialogues from ('' for none)")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(n) for n in args.dialogues_per_split.split(","))
        if len(sizes) != 3 or min(sizes) < 1 or args.utterances_per_dialogue < 2:
            raise ValueError
    except ValueError:
        parser.error("--dialogues-per-split is three numbers of at least 1, --utterances-per-dialogue at least 2")
    try:
        truth = make_tree(args.root, args.seed, sizes, args.utterances_per_dialogue, args.real_csvs or None)
    except FileExistsError as err:
        print(f"synthetic_meld.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.root}: {len(truth['utterances'])} utterances; defects {truth['defects']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
