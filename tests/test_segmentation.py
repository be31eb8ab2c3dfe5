"""Segmentation of whole recordings (mmser/segmentation.py) on a conversation in synthesized speech.

tests/data/conversation (fixtures/conversation.py, its SOURCE.md) holds 28 sentences of two espeak-ng
voices with their true times; 6 of them overlap another. How a sentence counts as found (found_over):
a segment starts within TOLERANCE (0.3 s) of the sentence's start, a segment (the same one, or a later
one) ends within TOLERANCE of its end, and no segment from the first to the last reaches past its end
by more than TOLERANCE. Found over one segment it is whole; over several, split (at a pause inside it:
reported, and counted as found, since its boundaries were found and nothing else was joined to it).
In the mono mix two overlapping sentences cannot be told apart by voice activity, so the mono figures
are over the 22 sentences that overlap no other; the two-channel file, one speaker a channel, counts
all 28. Measured (Silero VAD 6.2.3, the module's defaults): mono 22 of 22 found (21 whole), boundary
errors |mean| 0.06 s, max 0.14 s; two channels 28 of 28 (26 whole).
"""
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmser import segmentation
from mmser.segmentation import Segment, SegmentationError, cut_long, join_short, name_speakers, segment_recording
from mmser.utils import AudioError, AudioStream

CONVERSATION = Path(__file__).parent / "data" / "conversation"
MONO, STEREO = CONVERSATION / "conversation.flac", CONVERSATION / "conversation_stereo.flac"
TRUTH = json.loads((CONVERSATION / "conversation.json").read_text(encoding="utf-8"))["sentences"]
TOLERANCE = 0.3


def found_over(segments, sentence, tolerance=TOLERANCE):
    """Over how many consecutive segments (in time order) `sentence` was found: 0 not found, 1 whole,
    2 or more split; the module docstring says when it is found."""
    segments = sorted(segments, key=lambda s: s.start)
    for first, segment in enumerate(segments):
        if abs(segment.start - sentence["start"]) > tolerance:
            continue
        for last in range(first, len(segments)):
            if segments[last].end > sentence["end"] + tolerance:
                break
            if abs(segments[last].end - sentence["end"]) <= tolerance:
                return last - first + 1
    return 0


def boundary_errors(segments, sentences):
    """(start error, end error) in seconds of each found sentence: its first segment's start minus its
    start, its last segment's end minus its end."""
    segments = sorted(segments, key=lambda s: s.start)
    errors = []
    for sentence in sentences:
        count = found_over(segments, sentence)
        if count:
            first = min((s for s in segments if abs(s.start - sentence["start"]) <= TOLERANCE),
                        key=lambda s: abs(s.start - sentence["start"]))
            k = segments.index(first)
            errors.append((first.start - sentence["start"], segments[k + count - 1].end - sentence["end"]))
    return errors


def overlaps_another(i):
    return any(j != i and min(TRUTH[i]["end"], other["end"]) > max(TRUTH[i]["start"], other["start"])
               for j, other in enumerate(TRUTH))


SOLO = [s for i, s in enumerate(TRUTH) if not overlaps_another(i)]


def report(name, segments, sentences):
    counts = [found_over(segments, s) for s in sentences]
    errors = np.abs(np.array(boundary_errors(segments, sentences)))
    print(f"\n{name}: {sum(c > 0 for c in counts)} of {len(sentences)} sentences found "
          f"({sum(c == 1 for c in counts)} whole, {sum(c > 1 for c in counts)} split), from {len(segments)} segments; "
          f"boundary errors |mean| {errors.mean():.3f} s, max {errors.max():.3f} s")
    return counts


@pytest.fixture(scope="module")
def mono_segments():
    """The mono mix with the truth's RTTM naming the speakers (a VAD pass of 77 s: about 2 s)."""
    return segment_recording(MONO, rttm=CONVERSATION / "conversation.rttm", progress=False)


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory):
    """The conversation's first 20 s as a 16 kHz mono WAV, and how it segments."""
    path = tmp_path_factory.mktemp("excerpt") / "excerpt.wav"
    samples, rate = sf.read(MONO, dtype="float32", frames=20 * 16000)
    sf.write(path, samples, rate)
    return path, segment_recording(path, progress=False)


def test_voice_activity_finds_the_sentences_of_the_mix(mono_segments):
    counts = report("mono mix", mono_segments, SOLO)
    assert sum(c > 0 for c in counts) >= 0.9 * len(SOLO)
    assert sum(c == 1 for c in counts) >= 0.8 * len(SOLO)  # a split is the exception
    assert all(s.text is None and s.channel is None for s in mono_segments)
    assert all(segmentation.MIN_SECONDS <= s.seconds <= segmentation.MAX_SECONDS for s in mono_segments)
    # Two sentences that overlap are one stretch of speech: one segment holds both.
    for i, sentence in enumerate(TRUTH):
        if overlaps_another(i):
            assert any(s.start - TOLERANCE <= sentence["start"] and sentence["end"] <= s.end + TOLERANCE
                       for s in mono_segments), sentence


def test_an_rttm_file_names_the_speakers(mono_segments):
    for sentence in SOLO:
        if found_over(mono_segments, sentence) == 1:
            segment = next(s for s in mono_segments if abs(s.start - sentence["start"]) <= TOLERANCE)
            assert segment.speaker == sentence["speaker"], (segment, sentence)
    # Where two voices overlap, the one that speaks longer in the segment names it; the note names the other.
    joined = [s for s in mono_segments if "RTTM turns of others overlap it too" in s.note]
    assert len(joined) == 3 and {s.speaker for s in joined} <= {"Adam", "Beth"}
    for segment in joined:
        other = "Beth" if segment.speaker == "Adam" else "Adam"
        assert f"{other} " in segment.note


def test_a_segment_no_rttm_turn_overlaps_has_no_speaker():
    segments = [Segment(1.0, 2.0), Segment(3.0, 4.0), Segment(5.0, 6.0)]
    name_speakers(segments, [(0.5, 2.2, "Adam"), (2.9, 3.3, "Beth"), (3.2, 4.5, "Adam")])
    assert [s.speaker for s in segments] == ["Adam", "Adam", None]
    assert segments[1].note == "RTTM turns of others overlap it too (Beth 0.3 s; Adam 0.8 s)"
    assert segments[2].note == "no RTTM turn overlaps it"


def test_rttm_files_of_several_recordings_and_broken_ones(tmp_path):
    rttm = tmp_path / "many.rttm"
    rttm.write_text("SPEAKER a 1 0.0 1.0 <NA> <NA> x <NA> <NA>\nSPEAKER b 1 0.0 1.0 <NA> <NA> y <NA> <NA>\n")
    assert segmentation.read_rttm(rttm, "b") == [(0.0, 1.0, "y")]
    with pytest.raises(SegmentationError, match=r"many\.rttm: turns of 2 recordings \(a, b\), none named 'c'"):
        segmentation.read_rttm(rttm, "c")
    rttm.write_text("SPEAKER a 1 zero 1.0 <NA> <NA> x <NA> <NA>\n")
    with pytest.raises(SegmentationError, match=r"many\.rttm: line 1: not an RTTM SPEAKER line"):
        segmentation.read_rttm(rttm, "a")
    rttm.write_text("hello\n")
    with pytest.raises(SegmentationError, match=r"many\.rttm: no SPEAKER lines"):
        segmentation.read_rttm(rttm, "a")


def test_channels_as_speakers_gives_each_channel_its_speakers_sentences():
    segments = segment_recording(STEREO, channels_as_speakers=True, progress=False)
    assert {s.channel for s in segments} == {1, 2}
    assert all(s.speaker == f"channel {s.channel}" for s in segments)
    counts = []
    for channel in (1, 2):
        on_channel = [s for s in segments if s.channel == channel]
        sentences = [t for t in TRUTH if t["channel"] == channel]
        counts += report(f"channel {channel}", on_channel, sentences)
        # A channel's segments hold its own speaker's sentences only: none lies over the other's alone.
        others = [t for t in TRUTH if t["channel"] != channel]
        for segment in on_channel:
            assert any(min(segment.end, t["end"]) > max(segment.start, t["start"]) for t in sentences), segment
            inside_other = [t for t in others if segment.start >= t["start"] and segment.end <= t["end"]]
            assert not inside_other, segment
    assert sum(c > 0 for c in counts) >= 0.9 * len(TRUTH)


def test_channels_as_speakers_needs_channels_and_no_other_speaker_source(excerpt, tmp_path):
    with pytest.raises(AudioError, match=r"excerpt\.wav: 1 channel"):
        segment_recording(excerpt[0], channels_as_speakers=True, progress=False)
    with pytest.raises(SegmentationError, match="without an RTTM"):
        segment_recording(STEREO, channels_as_speakers=True, rttm=CONVERSATION / "conversation.rttm")
    with pytest.raises(SegmentationError, match=r"need 0 < min"):
        segment_recording(STEREO, min_seconds=5, max_seconds=2)


@pytest.mark.parametrize("kind", ["vtt", "srt"])
def test_subtitles_set_the_segments_their_text_and_speakers(kind):
    segments = segment_recording(MONO, subtitles=CONVERSATION / f"conversation.{kind}", progress=False)
    assert [(s.start, s.end, s.text) for s in segments] == [(t["start"], t["end"], t["text"]) for t in TRUTH]
    # WebVTT's voice tags name the speakers; SubRip has none, and an RTTM file can name them.
    assert [s.speaker for s in segments] == ([t["speaker"] for t in TRUTH] if kind == "vtt" else [None] * len(TRUTH))
    if kind == "srt":
        named = segment_recording(MONO, subtitles=CONVERSATION / "conversation.srt",
                                  rttm=CONVERSATION / "conversation.rttm", progress=False)
        solo = [s for s, i in zip(named, range(len(TRUTH))) if not overlaps_another(i)]
        assert [s.speaker for s in solo] == [t["speaker"] for t in SOLO]
    assert all(s.note == "" for s in segments if s.seconds >= segmentation.MIN_SECONDS)


def test_broken_subtitles_are_named(tmp_path):
    bad = tmp_path / "bad.vtt"
    bad.write_text("not a webvtt file\n")
    with pytest.raises(SegmentationError, match=r"bad\.vtt: not a readable WebVTT file"):
        segment_recording(MONO, subtitles=bad)
    backwards = tmp_path / "backwards.srt"
    backwards.write_text("1\n00:00:02,000 --> 00:00:01,000\nhello\n")
    with pytest.raises(SegmentationError, match=r"backwards\.srt: cue 1 ends"):
        segment_recording(MONO, subtitles=backwards)
    with pytest.raises(SegmentationError, match=r"notes\.txt: not a subtitle file"):
        segment_recording(MONO, subtitles=tmp_path / "notes.txt")


def test_any_format_and_rate_segments_alike(excerpt, tmp_path):
    """The excerpt as a 44.1 kHz stereo AAC in an m4a, through PyAV: the same segments to a few ms."""
    import av
    wav, segments = excerpt
    samples, _ = sf.read(wav, dtype="float32")
    from scipy.signal import resample_poly
    loud = resample_poly(samples, 441, 160).astype(np.float32)
    m4a = tmp_path / "excerpt.m4a"
    with av.open(str(m4a), "w") as out:
        stream = out.add_stream("aac", rate=44100, layout="stereo")
        for start in range(0, len(loud), 1024):
            block = np.stack([loud[start:start + 1024]] * 2)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout="stereo")
            frame.rate = 44100
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    again = segment_recording(m4a, progress=False)
    assert len(again) == len(segments) >= 5
    # AAC's encoder delay shifts the stream by a few ms.
    assert max(abs(a.start - b.start) + abs(a.end - b.end) for a, b in zip(again, segments)) < 0.15


def test_a_silent_recording_gives_no_segment(tmp_path):
    path = tmp_path / "silence.flac"
    sf.write(path, np.zeros(5 * 16000, dtype=np.float32), 16000)
    assert segment_recording(path, progress=False) == []
    sf.write(path, np.random.default_rng(0).normal(0, 1e-4, 5 * 16000).astype(np.float32), 16000)  # -80 dBFS hiss
    assert segment_recording(path, progress=False) == []


def test_a_corrupt_or_non_audio_file_is_one_named_error(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("these are my notes, not a recording\n" * 50)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(MONO.read_bytes()[:20000])
    for path, message in [(text, "not an audio file ffmpeg can read"), (cut, "corrupt audio after"),
                          (tmp_path / "missing.wav", "no such audio file")]:
        with pytest.raises(AudioError) as error:
            segment_recording(path, progress=False)
        assert str(error.value).startswith(f"{path}: {message}") and "\n" not in str(error.value)


def test_the_audio_stream_reads_what_soundfile_reads_window_by_window():
    stream = AudioStream(STEREO)
    assert (stream.channels, stream.rate) == (2, 16000) and abs(stream.duration - 77.464) < 1e-3
    windows = list(stream.windows(7 * 16000))
    assert {w.shape[1] for w in windows[:-1]} == {7 * 16000} and all(w.dtype == np.float32 for w in windows)
    assert np.array_equal(np.concatenate(windows, axis=1).T, sf.read(STEREO, dtype="float32")[0])


# -- cutting long regions ---------------------------------------------------------------------

def test_join_short_joins_a_word_to_the_nearer_speech_or_drops_it():
    regions = [(0.0, 0.3), (0.6, 3.0), (3.2, 3.5), (6.0, 6.2), (8.0, 10.0)]
    # 0-0.3 joins the next (0.3 s away); 3.2-3.5 joins the previous (0.2 s); 6.0-6.2 is 2.5 s from any: dropped.
    assert join_short(regions, 0.5, 0.5) == [(0.0, 3.5), (8.0, 10.0)]


def test_cut_long_cuts_at_the_last_sentence_end_in_reach():
    probs = np.ones(2000, dtype=np.float32)
    pieces = cut_long(10.0, 40.0, probs, min_seconds=0.5, max_seconds=12.0,
                      sentence_ends=[14.0, 19.0, 23.5, 31.0, 39.8])
    # 22.0 is the reach from 10: the last end before it is 19; then 31 (<= 31); then 40 - 31 = 9 s is left.
    assert pieces == [(10.0, 19.0, ""), (19.0, 31.0, ""), (31.0, 40.0, "")]


def test_cut_long_without_sentence_ends_cuts_where_speech_is_least_likely():
    probs = np.ones(2000, dtype=np.float32)
    probs[200] = 0.2  # 6.4 s
    probs[500] = 0.1  # 16.0 s: beyond the first piece's reach
    pieces = cut_long(0.0, 25.0, probs, min_seconds=0.5, max_seconds=10.0)
    assert [(round(a, 3), round(b, 3)) for a, b, _ in pieces] == [(0.0, 6.4), (6.4, 16.0), (16.0, 25.0)]
    assert pieces[0][2] == "cut where speech was least likely within 10 s (no pause or sentence end in reach)"
    assert all(b - a <= 10.0 for a, b, _ in pieces)


def test_long_regions_are_cut_at_whispers_sentence_ends(excerpt, monkeypatch):
    """The Whisper call replaced by one that says a sentence ends 1.5 s into every window it is given:
    each region longer than max_seconds is cut there, the audio of each region was handed over."""
    path, plain = excerpt
    given = []

    def sentence_ends(wavs, asr, batch_size=None):
        given.extend(len(w) for w in wavs)
        return [[1.5] for _ in wavs]

    monkeypatch.setattr(segmentation, "whisper_sentence_ends", sentence_ends)
    cut = segment_recording(path, max_seconds=2.5, asr=types.SimpleNamespace(batch_size=8), progress=False)
    long = [s for s in plain if s.seconds > 2.5]
    assert long and sorted(given) == sorted(round(s.seconds * 16000) for s in long)
    for region in long:
        pieces = [s for s in cut if region.start <= s.start < region.end]
        assert pieces[0].start == region.start and pieces[-1].end == region.end and len(pieces) >= 2
        assert pieces[0].end == pytest.approx(region.start + 1.5, abs=1e-3)
    assert all(s.seconds <= 2.5 for s in cut)


@pytest.mark.parametrize("backend", ["transformers", "faster-whisper"])
def test_whispers_timestamps_from_the_tiny_whisper_do_not_crash(tmp_path, backend):
    """The real call by each ASR backend, on the tiny random Whisper: its timestamps are garbage (it has
    no timestamp tokens), so only the shape of the answer is checked."""
    from fixtures.tiny_models import write_tiny_whisper
    from mmser.asr import load_asr
    if backend == "faster-whisper":
        pytest.importorskip("ctranslate2")  # requirements-asr.txt
    asr = load_asr(str(write_tiny_whisper(tmp_path / "tiny-whisper")), backend=backend, models_dir=tmp_path)
    samples, _ = sf.read(MONO, dtype="float32", frames=3 * 16000)
    ends = segmentation.whisper_sentence_ends([samples, samples[:16000]], asr)
    assert len(ends) == 2 and all(isinstance(t, float) for e in ends for t in e)


# -- memory -----------------------------------------------------------------------------------

PEAK_RSS = textwrap.dedent("""
    import resource, sys
    from mmser.segmentation import segment_recording
    for path in sys.argv[1:]:
        segments = segment_recording(path, progress=False)
        print(path, len(segments), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
""")


def test_memory_stays_flat_from_one_minute_to_thirty(tmp_path):
    """The peak resident set of a fresh process after segmenting the conversation's first minute, and
    after then segmenting the same minute followed by 29 minutes of digital silence (which the VAD
    skips, so the test stays short; the VAD itself holds no more for a longer recording:
    benchmarks/bench_segmentation.py runs it on 30 minutes of speech). A peak only grows: had the
    second run held the whole recording (115 MB as float32), the second figure would show it."""
    minute, _ = sf.read(MONO, dtype="float32", frames=60 * 16000)
    short, long = tmp_path / "one_minute.flac", tmp_path / "thirty_minutes.flac"
    sf.write(short, minute, 16000)
    with sf.SoundFile(long, "w", 16000, 1, subtype="PCM_16") as f:
        f.write(minute)
        for _ in range(29):
            f.write(np.zeros(60 * 16000, dtype=np.float32))
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(short), str(long)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    (_, short_segments, short_peak), (_, long_segments, long_peak) = [line.split() for line in out.stdout.splitlines()]
    print(f"\npeak RSS after 1 min: {float(short_peak):.1f} MB, after 30 min: {float(long_peak):.1f} MB")
    assert short_segments == long_segments and int(short_segments) > 10
    assert float(long_peak) < float(short_peak) + 20
