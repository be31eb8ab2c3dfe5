"""A recording of any length cut into utterances: segments with start, end, speaker, channel, text, note.

    segments = segment_recording("meeting.m4a")                                  # voice activity
    segments = segment_recording("call.wav", channels_as_speakers=True)          # one speaker a channel
    segments = segment_recording("talk.mp3", rttm="talk.rttm", asr=load_asr(m)) # named, cut at sentences
    segments = segment_recording("talk.mp3", subtitles="talk.vtt")               # the subtitles' cues

Voice activity is Silero VAD's (the silero-vad package: MIT, its model inside the wheel, so offline):
a speech probability every 32 ms, then its own rule turns them into speech regions: speech starts
where the probability reaches VAD_THRESHOLD and ends after min_pause below the threshold less 0.15,
each region padded by SPEECH_PAD_SECONDS; a region shorter than min_seconds joins the speech it is
nearer to, within JOIN_REACH_SECONDS, or is dropped.
A region longer than max_seconds is cut: with a Whisper model (`asr`, mmser.asr.load_asr's backend) at
the ends of Whisper's timestamped segments (sentence ends), otherwise, or where no sentence ends in
reach, at the least speech-like 32 ms within max_seconds (a breath, most often), said in the note.

The recording streams through (utils.AudioStream): 30-s windows, a progress bar over its duration,
never its whole samples at once; what is kept grows by one float per 32 ms and channel (0.45 MB an
hour). A window of digital silence (peak under -60 dBFS, utils.SILENCE_PEAK) is not run through the
VAD: it holds no speech, and the VAD starts afresh after it, as at a recording's start. A recording
with no speech gives no segment.

Speakers: channels_as_speakers reads each channel of a multi-channel recording as its own speaker
("channel 1", "channel 2", ...; the usual call-centre layout); an RTTM file (a diarizer's output)
names them: each segment takes the RTTM speaker whose turns overlap it longest, other speakers that
overlap it by more than OVERLAP_NOTE_SECONDS are named in its note, and a segment no turn overlaps
keeps no speaker, with a note. Otherwise the speaker is None.

A subtitle file (SRT or WebVTT, read with webvtt-py) replaces the VAD: its cues are the segments,
with their text, and a WebVTT voice tag (<v Name>) names the speaker. Segments from the VAD have text
None: the transcript the classifier reads comes from mmser.asr.transcribe on each segment, the way
the training transcripts were made (no timestamps), not from the timestamped pass that cuts them.
"""
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmser.data_contract import SAMPLE_RATE
from mmser.utils import SILENCE_PEAK, STREAM_WINDOW, WHISPER_WINDOW_SECONDS, AudioError, AudioStream, torch_threads

# -- defaults ---------------------------------------------------------------------------------------
# Shorter speech is not an utterance: under half a second is a word at most (about 50 speech tokens),
# little to tell an emotion by; Whisper makes words up on such scraps; and it is what a VAD's false
# alarms (clicks, breaths, coughs) last.
MIN_SECONDS = 0.5
# Longer speech is cut. 20 s holds 99.7% of IEMOCAP's utterances (mean about 4.5 s; 0.27% pass 2048
# speech tokens, 20.5 s at vq-wav2vec's 100 a second) and is main.py's default MAX_AUDIO_TOKENS of
# audio; it is inside Whisper's 30-s window, so a segment is transcribed in one pass. A segment much
# longer than those the classifier was trained on would mix what it says over many sentences.
MAX_SECONDS = 20.0
# The pause that ends an utterance: Silero's default. In fixtures/conversation.py's recording turns
# follow each other after 0.2-1.5 s (or overlap), and espeak-ng pauses 0.1-0.25 s at a comma. The VAD's
# probability takes a frame or two to fall after speech ends, so a 0.2-s pause looks shorter to it:
# there, 0.2 s joined sentences 0.22-0.25 s apart (15 of its 22 sentences found), 0.05 to 0.12 s found
# all 22 (tests/test_segmentation.py says how), 0.1 and 0.12 splitting fewest of them at a comma.
MIN_PAUSE_SECONDS = 0.1
VAD_THRESHOLD = 0.5  # Silero's default
SPEECH_PAD_SECONDS = 0.03  # Silero's default: the VAD's frames start a little after speech does
VAD_FRAME = 512  # samples Silero VAD reads at a time at 16 kHz (32 ms)
# The VAD's windows: a whole number of its frames, about STREAM_WINDOW long (30.7 s).
VAD_WINDOW = STREAM_WINDOW // VAD_FRAME * VAD_FRAME
# A stretch of speech shorter than min_seconds ("Oh wait,") joins the speech it is nearer to when that
# is within this pause (a comma's or a breath's); farther from any, it is dropped: alone, so short a
# sound is a click, a cough or a backchannel, no utterance.
JOIN_REACH_SECONDS = 0.5
OVERLAP_NOTE_SECONDS = 0.25
# Whisper's last timestamped segment in a window that a longer region fills often ends at the
# window's end, mid-sentence: such an end is no sentence end.
WINDOW_END_MARGIN_SECONDS = 0.5


class SegmentationError(ValueError):
    """A user's file or option that segmentation cannot use; the message names the file and the problem."""


@dataclass
class Segment:
    start: float  # seconds from the recording's start
    end: float
    speaker: str | None = None
    channel: int | None = None  # 1-based, with channels_as_speakers
    text: str | None = None  # a subtitle's text; None: not transcribed yet
    note: str = ""

    @property
    def seconds(self):
        return self.end - self.start


# -- voice activity ------------------------------------------------------------------------------

@functools.cache
def load_vad():
    """Silero VAD's TorchScript model from the silero-vad wheel (offline)."""
    import torch
    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad  # its import sets torch to one thread: put the setting back
    torch.set_num_threads(threads)
    with warnings.catch_warnings():  # importlib.resources.path and torch.jit.load are deprecated: its affair
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()


def speech_probabilities(stream, per_channel=False, progress=True):
    """Silero VAD's speech probability for every 32-ms frame of an AudioStream: -> (float32 (channels,
    frames), the stream's length in samples at 16 kHz); one row per channel with per_channel (each with
    its own VAD state), else one row for the channels' average. A window of digital silence gets zeros
    without the VAD, which then starts afresh."""
    import torch
    from tqdm import tqdm
    model = load_vad()
    model.reset_states()
    rows, samples = [], 0
    # One 32-ms frame at a time through a small network: a second thread only adds its waiting (on 2
    # shared, busy cores the conversation took 21-44 s with two threads, 1-2 s with one).
    total = round(stream.duration, 1) if stream.duration else None
    with torch_threads(1):
        with tqdm(total=total, unit="s", desc="voice activity", disable=not progress,
                  bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}]") as bar, \
                torch.inference_mode():
            for window in stream.windows(VAD_WINDOW):
                x = window if per_channel else window.mean(axis=0, keepdims=True)
                frames = math.ceil(x.shape[1] / VAD_FRAME)
                probs = np.zeros((x.shape[0], frames), dtype=np.float32)
                if np.abs(x).max() < SILENCE_PEAK:
                    model.reset_states()
                else:
                    x = torch.from_numpy(np.pad(x, ((0, 0), (0, frames * VAD_FRAME - x.shape[1]))))
                    for i in range(frames):
                        probs[:, i] = model(x[:, i * VAD_FRAME:(i + 1) * VAD_FRAME], SAMPLE_RATE)[:, 0].numpy()
                rows.append(probs)
                samples += window.shape[1]
                seconds = window.shape[1] / SAMPLE_RATE
                bar.update(min(seconds, total - bar.n) if total else seconds)
    channels = stream.channels if per_channel else 1
    return (np.concatenate(rows, axis=1) if rows else np.zeros((channels, 0), dtype=np.float32)), samples


def speech_regions(probs, samples, min_seconds=MIN_SECONDS, min_pause=MIN_PAUSE_SECONDS):
    """One channel's frame probabilities -> [(start, end)] seconds of speech: Silero's own rule
    (get_speech_timestamps_from_probs) with no maximum length (cutting is cut_long()'s), then
    join_short()."""
    from silero_vad import get_speech_timestamps_from_probs
    # Silero counts a pause from its first quiet frame's start to the current frame's start: n quiet
    # frames count as n - 1. Asked one frame less, it ends speech after min_pause of quiet frames.
    pause_ms = max(min_pause * 1000 - VAD_FRAME * 1000 / SAMPLE_RATE, 0)
    found = get_speech_timestamps_from_probs(
        probs.tolist(), sampling_rate=SAMPLE_RATE, threshold=VAD_THRESHOLD, min_speech_duration_ms=0,
        min_silence_duration_ms=pause_ms, speech_pad_ms=SPEECH_PAD_SECONDS * 1000, audio_length_samples=samples)
    return join_short([(r["start"] / SAMPLE_RATE, r["end"] / SAMPLE_RATE) for r in found], min_seconds)


def join_short(regions, min_seconds=MIN_SECONDS, reach=JOIN_REACH_SECONDS):
    """Regions shorter than min_seconds joined to the nearer neighbour within `reach` seconds (with the
    pause between them), or dropped where none is that near; in time order."""
    regions = list(regions)
    while short := [k for k, (start, end) in enumerate(regions) if end - start < min_seconds]:
        k = short[0]
        gaps = [(regions[k][0] - regions[k - 1][1], k - 1)] if k > 0 else []
        gaps += [(regions[k + 1][0] - regions[k][1], k + 1)] if k + 1 < len(regions) else []
        gaps = [(gap, j) for gap, j in gaps if gap <= reach]
        if not gaps:
            del regions[k]
            continue
        first, last = sorted((k, min(gaps)[1]))
        regions[first:last + 1] = [(regions[first][0], regions[last][1])]
    return regions


# -- cutting long regions -----------------------------------------------------------------------

def cut_long(start, end, probs, min_seconds=MIN_SECONDS, max_seconds=MAX_SECONDS, sentence_ends=()):
    """A region [start, end] (seconds) cut into pieces of at most max_seconds: -> [(start, end, note)].
    Each cut is at the latest sentence end that leaves both sides at least min_seconds and the piece
    at most max_seconds; where there is none, at the frame of lowest speech probability in reach
    (`probs`: the channel's frame probabilities), with a note."""
    pieces, ends = [], sorted(sentence_ends)
    while end - start > max_seconds:
        lo, hi = start + min_seconds, min(start + max_seconds, end - min_seconds)
        usable = [t for t in ends if lo <= t <= hi]
        if usable:
            cut, note = usable[-1], ""
        else:
            first, last = math.ceil(lo * SAMPLE_RATE / VAD_FRAME), int(hi * SAMPLE_RATE / VAD_FRAME)
            window = probs[first:last + 1]
            # The last of the least speech-like frames: pieces as long as the limit allows.
            k = len(window) - 1 - int(np.argmin(window[::-1])) if len(window) else 0
            cut = min(max((first + k) * VAD_FRAME / SAMPLE_RATE, lo), hi)
            note = f"cut where speech was least likely within {max_seconds:g} s (no pause or sentence end in reach)"
        pieces.append((start, cut, note))
        start = cut
    pieces.append((start, end, ""))
    return pieces


def whisper_sentence_ends(wavs, asr, batch_size=None):
    """The ends of Whisper's timestamped segments (seconds from each waveform's start) for 16 kHz
    waveforms of at most 30 s: English, the transcribe task, greedy decoding, timestamps, by the ASR
    backend (mmser.asr.load_asr's), `batch_size` (default: the backend's) a call. -> [[end, ...]]"""
    batch_size = batch_size or asr.batch_size
    ends = []
    for first in range(0, len(wavs), batch_size):
        ends += asr.sentence_ends([np.asarray(w, dtype=np.float32) for w in wavs[first:first + batch_size]])
    return ends


def region_audio(stream, spans, per_channel):
    """Yield (index, 16 kHz mono samples) for each (channel_row, start, end) span of `stream`, in one
    pass, as soon as the stream has passed its end: only the spans being read are held."""
    todo = sorted(range(len(spans)), key=lambda i: spans[i][1])
    held, offset, nxt = {}, 0, 0
    for window in stream.windows():
        x = window if per_channel else window.mean(axis=0, keepdims=True)
        w_end = offset + x.shape[1]
        while nxt < len(todo) and int(spans[todo[nxt]][1] * SAMPLE_RATE) < w_end:
            held[todo[nxt]] = []
            nxt += 1
        for i in list(held):
            row, start, end = spans[i]
            a, b = max(int(start * SAMPLE_RATE), offset), min(int(end * SAMPLE_RATE), w_end)
            if b > a:
                held[i].append(x[row, a - offset:b - offset])
            if int(end * SAMPLE_RATE) <= w_end:
                yield i, np.concatenate(held.pop(i)) if held[i] else np.zeros(0, np.float32)
        offset = w_end
    for i in list(held):  # spans past the stream's end
        yield i, np.concatenate(held.pop(i)) if held[i] else np.zeros(0, np.float32)


def sentence_ends_of(stream, regions, asr, per_channel, batch_size=None, progress=True):
    """Whisper's sentence ends (absolute seconds) inside each (row, start, end) region, each read in
    consecutive 30-s windows, `batch_size` (default: the ASR backend's) a call; -> {region index: [seconds]}"""
    from tqdm import tqdm
    batch_size = batch_size or asr.batch_size
    spans, owner = [], []
    for k, (row, start, end) in enumerate(regions):
        for w_start in np.arange(start, end, WHISPER_WINDOW_SECONDS):
            spans.append((row, float(w_start), float(min(w_start + WHISPER_WINDOW_SECONDS, end))))
            owner.append(k)
    found = {k: [] for k in range(len(regions))}
    pending = []
    bar = tqdm(total=len(spans), desc="sentence ends (Whisper)", unit="window", disable=not progress)

    def run(pending):
        bar.update(len(pending))
        for (i, _), ends in zip(pending, whisper_sentence_ends([w for _, w in pending], asr, batch_size)):
            _, w_start, w_end = spans[i]
            last = spans[i][2] >= regions[owner[i]][2]
            found[owner[i]] += [w_start + t for t in ends
                                if last or w_start + t < w_end - WINDOW_END_MARGIN_SECONDS]

    for i, wav in region_audio(stream, spans, per_channel):
        pending.append((i, wav))
        if len(pending) == batch_size:
            run(pending)
            pending = []
    if pending:
        run(pending)
    bar.close()
    return found


# -- speakers -----------------------------------------------------------------------------------

def read_rttm(path, file_id=None):
    """An RTTM file's SPEAKER turns: [(start, end, speaker)] seconds. A file naming several recordings
    gives those of `file_id` (the recording's file name without its suffix)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SegmentationError(f"{path}: unreadable RTTM file ({e})") from None
    turns = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0] != "SPEAKER":
            continue
        try:
            if len(fields) < 8:
                raise ValueError("fewer than 8 fields")
            onset, duration = float(fields[3]), float(fields[4])
            if not (math.isfinite(onset) and math.isfinite(duration)) or duration < 0:
                raise ValueError("a turn's onset or duration is not a time")
        except ValueError as e:
            raise SegmentationError(f"{path}: line {number}: not an RTTM SPEAKER line ({e}): "
                                    f"{line.strip()!r}") from None
        turns.append((fields[1], onset, onset + duration, fields[7]))
    if not turns:
        raise SegmentationError(f"{path}: no SPEAKER lines (not an RTTM file?)")
    files = {f for f, *_ in turns}
    if len(files) > 1:
        if file_id not in files:
            raise SegmentationError(f"{path}: turns of {len(files)} recordings ({', '.join(sorted(files)[:5])}), "
                                    f"none named {file_id!r} after the recording")
        turns = [t for t in turns if t[0] == file_id]
    return [(start, end, speaker) for _, start, end, speaker in turns]


def name_speakers(segments, turns):
    """Each segment's speaker: the one whose turns overlap it longest (a note names the others that
    overlap it by more than OVERLAP_NOTE_SECONDS); a segment no turn overlaps keeps none, with a note."""
    for segment in segments:
        overlap = {}
        for start, end, speaker in turns:
            shared = min(end, segment.end) - max(start, segment.start)
            if shared > 0:
                overlap[speaker] = overlap.get(speaker, 0.0) + shared
        if not overlap:
            segment.speaker = None
            add_note(segment, "no RTTM turn overlaps it")
            continue
        ranked = sorted(overlap.items(), key=lambda kv: -kv[1])
        segment.speaker = ranked[0][0]
        others = [f"{name} {seconds:.1f} s" for name, seconds in ranked[1:] if seconds > OVERLAP_NOTE_SECONDS]
        if others:
            add_note(segment, f"RTTM turns of others overlap it too ({', '.join(others)}; "
                              f"{segment.speaker} {ranked[0][1]:.1f} s)")


def add_note(segment, note):
    segment.note = f"{segment.note}; {note}" if segment.note else note


# -- subtitles ----------------------------------------------------------------------------------

def read_subtitles(path):
    """An SRT or WebVTT file's cues as segments (start, end, the WebVTT voice tag's speaker, text)."""
    import webvtt
    path = Path(path)
    kind = {".srt": "SRT", ".vtt": "WebVTT"}.get(path.suffix.lower())
    if kind is None:
        raise SegmentationError(f"{path}: not a subtitle file this tool reads (.srt or .vtt)")
    if not path.is_file():
        raise SegmentationError(f"{path}: no such subtitle file")
    try:
        captions = webvtt.from_srt(str(path)) if kind == "SRT" else webvtt.read(str(path))
    except (webvtt.errors.MalformedFileError, webvtt.errors.MalformedCaptionError, UnicodeDecodeError) as e:
        raise SegmentationError(f"{path}: not a readable {kind} file ({e})") from None
    segments = []
    for number, caption in enumerate(captions, 1):
        start, end = caption.start_time.in_milliseconds() / 1000, caption.end_time.in_milliseconds() / 1000
        if end <= start:
            raise SegmentationError(f"{path}: cue {number} ends ({caption.end}) before it starts ({caption.start})")
        segments.append(Segment(start, end, speaker=caption.voice, text=" ".join(caption.text.split())))
    if not segments:
        raise SegmentationError(f"{path}: no cues in it")
    return segments


# -- the whole ----------------------------------------------------------------------------------

def segment_recording(path, min_seconds=MIN_SECONDS, max_seconds=MAX_SECONDS, min_pause=MIN_PAUSE_SECONDS,
                      channels_as_speakers=False, rttm=None, subtitles=None, asr=None, progress=True):
    """A recording (any length; any format and rate ffmpeg decodes) -> its segments in time order
    (list of Segment); the module docstring says how. AudioError for a file that is not usable audio,
    SegmentationError for an unusable RTTM or subtitle file or options that contradict each other."""
    if not 0 < min_seconds < max_seconds:
        raise SegmentationError(f"segment lengths: need 0 < min ({min_seconds:g} s) < max ({max_seconds:g} s)")
    if channels_as_speakers and (rttm or subtitles):
        raise SegmentationError("channels as speakers names the speakers itself: give it without an RTTM or "
                                "subtitle file")
    path = Path(path)
    turns = read_rttm(rttm, path.stem) if rttm else None
    stream = AudioStream(path)
    if subtitles:
        segments = read_subtitles(subtitles)
        for segment in segments:
            if stream.duration is not None and segment.end > stream.duration + 0.5:
                add_note(segment, f"the cue ends after the recording ({stream.duration:.1f} s)")
            if segment.seconds < min_seconds:
                add_note(segment, f"shorter than {min_seconds:g} s")
            if segment.seconds > max_seconds:
                add_note(segment, f"longer than {max_seconds:g} s")
    else:
        if channels_as_speakers and stream.channels < 2:
            raise AudioError(f"{path}: {stream.channels} channel, so it cannot be read as one speaker a channel")
        segments = vad_segments(stream, min_seconds, max_seconds, min_pause, channels_as_speakers, asr, progress)
    if turns is not None:
        name_speakers(segments, turns)
    return sorted(segments, key=lambda s: (s.start, s.channel or 0))


def vad_segments(stream, min_seconds, max_seconds, min_pause, per_channel, asr, progress):
    probs, samples = speech_probabilities(stream, per_channel, progress)
    regions = [(row, start, end) for row in range(len(probs))
               for start, end in speech_regions(probs[row], samples, min_seconds, min_pause)]
    long = [k for k, (_, start, end) in enumerate(regions) if end - start > max_seconds]
    ends = {}
    if asr is not None and long:
        found = sentence_ends_of(stream, [regions[k] for k in long], asr, per_channel, progress=progress)
        ends = {k: found[j] for j, k in enumerate(long)}
    segments = []
    for k, (row, start, end) in enumerate(regions):
        channel = row + 1 if per_channel else None
        for a, b, note in cut_long(start, end, probs[row], min_seconds, max_seconds, ends.get(k, ())):
            segments.append(Segment(round(a, 3), round(b, 3), f"channel {channel}" if channel else None, channel,
                                    note=note))
    return segments
