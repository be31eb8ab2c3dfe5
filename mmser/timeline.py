"""A recording's timeline: its utterances found (mmser.segmentation), each one heard and predicted by a
trained run as predict.py predicts a dialogue, and the result written as CSV, JSON and a figure.

    run = predictor.LoadedRun(RUN_DIR)
    result = make_timeline(run, "meeting.flac")               # or subtitles=, rttm=, channels_as_speakers=
    write_timeline(result, "meeting_timeline.csv")            # + meeting_timeline.json and .png

Segments: Silero VAD's (cut at Whisper's sentence ends when the run has an ASR model), or a subtitle
file's cues, with speakers from an RTTM file, WebVTT voice tags or one speaker a channel
(segmentation.segment_recording). Each segment's transcript: its subtitle text, else the run's ASR
model's (or --asr-model's) transcript of its audio, else none (a speech-only run needs none). Its
context: the segments before and after it in the recording, in time order, as the context branch
was trained on a dialogue's utterances (the run's window, its sentence model): a recording is one
dialogue. Its prediction: predictor.LoadedRun.predict over rows of its samples, its transcript and its
neighbours' transcripts, the very path predict.py and the API's predict() take (tests/test_timeline.py
checks that each segment's prediction is predict()'s of its samples with the same neighbours).

The recording streams through twice (utils.AudioStream): once for the voice activity, once to cut
each segment's samples out as the stream passes its end (segmentation.region_audio). Segments are
predicted CHUNK at a time, as soon as the `context_window` segments after them are transcribed, so
what is held at once is about CHUNK + window segments' audio (at most MAX_SECONDS each, 20 s): memory
stays flat however long the recording. What grows with its length is the result itself (a few
hundred bytes a segment).
"""
import csv
import io
import json
import math
from collections import deque
from pathlib import Path


from mmser.data_contract import SAMPLE_RATE
from mmser.predictor import PredictError, prediction_fields, prediction_values, row_transcript
from mmser.segmentation import (MAX_SECONDS, MIN_PAUSE_SECONDS, MIN_SECONDS, SegmentationError, region_audio,
                                segment_recording)
from mmser.utils import AudioError, AudioStream, atomic_path, write_text_atomic

CHUNK = 16  # segments predicted together (one pass of the model over each fold's weights)
DIALOG = "recording"  # every segment's dialogue: a recording is one conversation


def timeline_fields(classes, attributes=()):
    """The timeline CSV's columns, in order; the JSON's segments have the same keys."""
    return ["start", "end", "speaker", "transcript"] + prediction_fields(classes, attributes) + ["note"]


def context_row(row):
    """A segment as its neighbours' context: its transcript, no audio, no prediction of its own."""
    return {"text": "", "_transcript": row_transcript(row), "dialog": DIALOG, "_context_only": True}


def join_notes(*notes):
    return "; ".join(n for n in notes if n)


def make_timeline(run, recording, subtitles=None, rttm=None, channels_as_speakers=False, min_seconds=MIN_SECONDS,
                  max_seconds=MAX_SECONDS, min_pause=MIN_PAUSE_SECONDS, progress=True, chunk=CHUNK):
    """-> the timeline of `recording` by `run` (a predictor.LoadedRun) as plain Python: {"recording",
    "duration", "classes", "attributes", "segmenter", "speakers", "transcripts", "notes", "segments": [{column:
    value} as timeline_fields]}. PredictError (one line naming the file) for a file that is not audio
    or is damaged, an unusable subtitle or RTTM file, or a run whose text or context branch has no way
    to hear the segments' words."""
    recording, branches = Path(recording), run.settings.branches
    needs_text = bool({"text", "context"} & set(branches))
    if needs_text and not subtitles and run.asr_model is None:
        branch = "text" if "text" in branches else "context"
        raise PredictError(f"{run.run_dir} has a {branch} branch, which reads each segment's words: give an ASR "
                           f"model to transcribe them (--asr-model) or the recording's subtitles (--subtitles)")
    try:
        stream = AudioStream(recording)
        # Whisper's sentence ends cut long speech when the run can transcribe (the VAD alone otherwise).
        asr = run.asr() if (run.asr_model is not None and not subtitles) else None
        segments = segment_recording(recording, min_seconds, max_seconds, min_pause, channels_as_speakers, rttm,
                                     subtitles, asr, progress)
        result = {"recording": str(recording), "run": str(run.run_dir),
                  "duration": None if stream.duration is None else round(stream.duration, 3),
                  "classes": list(run.classes), "attributes": list(run.attributes),
                  "segmenter": (f"subtitles ({Path(subtitles).name})" if subtitles else
                                f"Silero VAD (speech over {max_seconds:g} s cut at " +
                                ("Whisper's sentence ends)" if asr is not None else "its least speech-like frame)")),
                  "speakers": (f"RTTM ({Path(rttm).name})" if rttm else "one a channel" if channels_as_speakers
                               else "WebVTT voice tags" if subtitles and Path(subtitles).suffix.lower() == ".vtt"
                               else "unknown"),
                  "transcripts": (f"subtitles ({Path(subtitles).name})" if subtitles else
                                  f"speech recognition ({run.asr_model})" if needs_text else "none (speech-only run)"),
                  "notes": recording_notes(stream, channels_as_speakers), "segments": []}
        if not segments:
            result["notes"].append(f"{recording}: no speech found in {describe_seconds(stream.duration)}: "
                                   f"an empty timeline")
            return result
        result["segments"] = predict_segments(run, stream, segments, channels_as_speakers, progress, chunk)
    except (AudioError, SegmentationError) as e:
        raise PredictError(str(e)) from None
    return result


def describe_seconds(seconds):
    return "the recording" if seconds is None else f"{seconds:.1f} s of audio"


def recording_notes(stream, channels_as_speakers):
    """What was done to the recording to read it, as the data contract's 16 kHz mono audio."""
    notes = []
    if stream.rate != SAMPLE_RATE:
        notes.append(f"resampled {stream.rate} Hz to {SAMPLE_RATE} Hz (ffmpeg's resampler, as one stream)")
    if stream.channels > 1 and not channels_as_speakers:
        notes.append(f"mixed {stream.channels} channels to mono")
    return notes


def segment_samples(stream, segments, per_channel):
    """Yield (index, 16 kHz mono samples) of each segment in the segments' order (start time), cut
    from the stream in one pass; only the segments not yet handed out are held."""
    spans = [((s.channel - 1) if per_channel else 0, s.start, s.end) for s in segments]
    waiting, next_index = {}, 0
    for i, samples in region_audio(stream, spans, per_channel):
        waiting[i] = samples
        while next_index in waiting:
            yield next_index, waiting.pop(next_index)
            next_index += 1


def predict_segments(run, stream, segments, per_channel, progress=True, chunk=CHUNK):
    """Each segment's row of the timeline (timeline_fields), predicted CHUNK at a time with its
    context from the `window` segments on either side."""
    from tqdm import tqdm
    window = run.settings.context_window if "context" in run.settings.branches else 0
    before, held, out = deque(maxlen=window), [], []
    total = round(stream.duration, 1) if stream.duration else round(segments[-1].end, 1)

    def predict(rows, after):
        """rows (with their audio) predicted, `before` and `after` as their context."""
        run.transcribe(rows + after)
        given = [context_row(r) for r in before] + rows + [context_row(r) for r in after]
        # One segment at a time through the model, as predict() takes one utterance: in a padded batch
        # the last bits of a probability depend on the other segments' lengths (up to 3e-5 on the
        # demo's run), and a segment's answer should not.
        probs, notes = run.predict(given, batch_size=1)
        for k, (row, p) in enumerate(zip(rows, probs[len(before):]), len(before)):
            segment = row["_segment"]
            out.append({"start": segment.start, "end": segment.end, "speaker": segment.speaker,
                        "transcript": row_transcript(row), **prediction_values(p, run.classes, run.attributes),
                        "note": join_notes(segment.note, notes.get(k))})
            row.pop("_wav")  # done with its audio; its transcript stays, as context for the next
            bar.update(max(0.0, min(segment.end, total) - bar.n))
        before.extend(rows)

    # Closed on an error too, so that the error's line starts a line of its own.
    with tqdm(total=total, unit="s", desc="timeline", disable=not progress,
              bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}]") as bar:
        for i, samples in segment_samples(stream, segments, per_channel):
            segment = segments[i]
            held.append({"_wav": samples, "_name": f"{stream.path.name} {segment.start:.2f}-{segment.end:.2f} s",
                         "text": "", "_transcript": segment.text, "dialog": DIALOG, "_segment": segment})
            if len(held) >= chunk + window:
                predict(held[:chunk], held[chunk:chunk + window])
                held = held[chunk:]
        while held:
            predict(held[:chunk], held[chunk:chunk + window])
            held = held[chunk:]
        bar.update(total - bar.n)
    return out


# ------------------------------------------------------------------------------------------------
# output

def output_paths(output):
    """The CSV, JSON and PNG that --output names: OUT.csv, OUT.json, OUT.png (OUT: the path given,
    less a .csv, .json or .png suffix)."""
    output = Path(output)
    base = output.with_suffix("") if output.suffix.lower() in (".csv", ".json", ".png") else output
    return {kind: base.with_name(base.name + f".{kind}") for kind in ("csv", "json", "png")}


def timeline_csv(result):
    """The timeline as CSV text: one row per segment (timeline_fields), times in seconds to the ms,
    other numbers (the probabilities) to 6 decimals, an empty cell for what is missing."""
    fields = timeline_fields(result["classes"], result.get("attributes", ()))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, lineterminator="\n")
    writer.writeheader()
    for segment in result["segments"]:
        writer.writerow({k: csv_cell(k, segment[k]) for k in fields})
    return buffer.getvalue()


def csv_cell(field, value):
    """One cell of the timeline CSV (app_page.html's table shows the same)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if field in ("start", "end") else f"{value:.6f}"
    return value


def write_timeline(result, output):
    """OUT.csv, OUT.json and OUT.png (output_paths), each written whole or not at all. -> their paths."""
    paths = output_paths(output)
    write_text_atomic(paths["csv"], timeline_csv(result))
    write_text_atomic(paths["json"], json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    with atomic_path(paths["png"]) as tmp:
        timeline_figure(result).savefig(tmp, format="png")
    return paths


# Fixed colours for the classes this tool knows, so that a figure reads the same from run to run;
# another label set takes matplotlib's tab10 in its order.
CLASS_COLOURS = {"ang": "#d62728", "hap": "#f2a900", "exc": "#ff7f0e", "sad": "#1f77b4", "neu": "#8c8c8c",
                 "fru": "#9467bd", "sur": "#17becf", "fea": "#2ca02c", "dis": "#8c564b", "joy": "#f2a900",
                 "anger": "#d62728", "sadness": "#1f77b4", "neutral": "#8c8c8c", "fear": "#2ca02c",
                 "disgust": "#8c564b", "surprise": "#17becf"}


def class_colours(classes):
    from matplotlib import colormaps
    tab10 = colormaps["tab10"].colors
    return {c: CLASS_COLOURS.get(c, tab10[k % 10]) for k, c in enumerate(classes)}


def clock(seconds, _position=None):
    """Axis labels: m:ss, or h:mm:ss past the hour."""
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


ATTRIBUTE_COLOURS = {"valence": "#2ca02c", "arousal": "#d62728", "dominance": "#1f77b4"}


def plot_spans(axes, segments, key, colour, label):
    """Each segment's value of `key` as a flat stretch over its span, joined to the next by a thin line."""
    spans = [(s["start"], s["end"], s[key]) for s in segments if s[key] is not None]
    axes.plot([x for start, end, _ in spans for x in (start, end, math.nan)],
              [y for *_, v in spans for y in (v, v, math.nan)], color=colour, linewidth=2.4, label=label,
              solid_capstyle="butt")
    axes.plot([x for start, end, _ in spans for x in (start, end)], [y for *_, v in spans for y in (v, v)],
              color=colour, linewidth=0.8, alpha=0.6)


def timeline_figure(result):
    """The timeline as a matplotlib Figure (no pyplot: no display needed): above, each class's
    probability over every segment's span, one line per class (a run with classes), and each attribute's
    value (a run with --target dimensional or both); below, one row per speaker, each segment a bar in the
    colour of its predicted class (grey: no prediction, or a run without classes)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    classes, attributes, segments = result["classes"], result.get("attributes", []), result["segments"]
    colours = class_colours(classes)
    speakers = list(dict.fromkeys(s["speaker"] or "speaker unknown" for s in segments)) or ["no speech found"]
    panels = [kind for kind, given in (("classes", classes), ("attributes", attributes)) if given]
    fig = Figure(figsize=(11, 3.2 * len(panels) + 0.3 * len(speakers)), dpi=100, layout="constrained")
    *tops, bottom = fig.subplots(len(panels) + 1, 1, sharex=True,
                                 height_ratios=[3] * len(panels) + [0.35 + 0.3 * len(speakers)])
    end = max([s["end"] for s in segments] + [result.get("duration") or 0, 1.0])
    for top, kind in zip(tops, panels):
        if kind == "classes":
            for c in classes:
                plot_spans(top, segments, f"p_{c}", colours[c], c)
            top.set_ylim(0, 1.02)
            top.set_ylabel("probability")
        else:
            for a in attributes:
                plot_spans(top, segments, a, ATTRIBUTE_COLOURS.get(a, "#555555"), a)
            top.set_ylabel("value (the corpus's scale)")
        top.grid(axis="y", alpha=0.3)
        top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
                   title="class" if kind == "classes" else "attribute")
    title = (f"{Path(result['recording']).name}: {len(segments)} segments by {result['segmenter']}, "
             f"speakers: {result['speakers']}")
    tops[0].set_title(title if segments else f"{Path(result['recording']).name}: no speech found", loc="left",
                      fontsize=11)
    for row, speaker in enumerate(speakers):
        spans = [s for s in segments if (s["speaker"] or "speaker unknown") == speaker]
        bottom.broken_barh([(s["start"], s["end"] - s["start"]) for s in spans], (row - 0.4, 0.8),
                           facecolors=[colours.get(s.get("prediction"), "#dddddd") for s in spans],
                           edgecolor="white", linewidth=0.5)
    bottom.set_yticks(range(len(speakers)), speakers)
    bottom.set_ylim(len(speakers) - 0.5, -0.5)
    bottom.set_xlim(0, end)
    bottom.xaxis.set_major_formatter(FuncFormatter(clock))
    bottom.set_xlabel("time (m:ss); bars: segments" + (" in the colour of their predicted class" if classes else ""))
    return fig
