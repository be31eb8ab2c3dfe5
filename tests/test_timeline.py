"""A recording's timeline (mmser/timeline.py, predict.py --recording) on the demo's run and the
synthetic conversation (tests/data/conversation): each segment's prediction is exactly the API's
predict() of its samples with the same neighbours, the outputs agree with each other, a silent
recording gives an empty timeline and one line, a file that is not audio one line and exit 2, and
memory stays flat from a 77-s to a 30-minute recording."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import predict
from mmser.api import Recognizer
from mmser.timeline import output_paths, timeline_csv, timeline_figure
from small_runs import read_csv

REPO = Path(__file__).resolve().parent.parent
CONVERSATION = REPO / "tests" / "data" / "conversation"
MONO, STEREO = CONVERSATION / "conversation.flac", CONVERSATION / "conversation_stereo.flac"
VTT, SRT = CONVERSATION / "conversation.vtt", CONVERSATION / "conversation.srt"
TRUTH = json.loads((CONVERSATION / "conversation.json").read_text(encoding="utf-8"))["sentences"]


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    from fixtures.tiny_models import write_tiny_whisper
    return write_tiny_whisper(tmp_path_factory.mktemp("asr") / "tiny-whisper")


@pytest.fixture(scope="module")
def recognizer(demo, whisper):
    """The demo's run (text, speech, context; no ASR model of its own) with the tiny random Whisper."""
    return Recognizer(demo["run_dir"], asr_model=whisper)


@pytest.fixture(scope="module")
def by_subtitles(recognizer):
    return recognizer.timeline(MONO, subtitles=VTT)


def assert_each_segment_is_predict_of_its_samples(recognizer, timeline, samples, text_given):
    """samples: the recording at 16 kHz, (n,) or (n, channels) for one speaker a channel."""
    transcripts = [s["transcript"] for s in timeline["segments"]]
    for i, segment in enumerate(timeline["segments"]):
        cut = samples[int(segment["start"] * 16000):int(segment["end"] * 16000)]
        if cut.ndim == 2:
            cut = cut[:, int(segment["speaker"].split()[-1]) - 1]
        alone = recognizer.predict(cut, text=segment["transcript"] if text_given else None,
                                   context={"before": transcripts[:i], "after": transcripts[i + 1:]})
        assert alone == {k: segment[k] for k in alone}, (i, alone, segment)


def test_each_segment_is_predict_of_its_samples_with_its_neighbours(recognizer, by_subtitles, tmp_path):
    segments = by_subtitles["segments"]
    assert [(s["start"], s["end"], s["speaker"], s["transcript"]) for s in segments] == \
        [(t["start"], t["end"], t["speaker"], t["text"]) for t in TRUTH]
    assert all(s["prediction"] in recognizer.classes for s in segments)
    samples, _ = sf.read(MONO, dtype="float32")
    assert_each_segment_is_predict_of_its_samples(recognizer, by_subtitles, samples, text_given=True)
    # A segment's samples written to a file and predicted from it: the same again.
    first = segments[4]
    sf.write(tmp_path / "segment.wav", samples[int(first["start"] * 16000):int(first["end"] * 16000)], 16000,
             subtype="FLOAT")
    transcripts = [s["transcript"] for s in segments]
    from_file = recognizer.predict(tmp_path / "segment.wav", text=first["transcript"],
                                   context={"before": transcripts[:4], "after": transcripts[5:]})
    assert from_file == {k: first[k] for k in from_file}
    # The demo's run reads 3.1 s of speech: a longer sentence says how much of it was read.
    long = [s for s in segments if s["end"] - s["start"] > 3.2]
    assert long and all(f"speech cut: about the first 3.1 s of {s['end'] - s['start']:.1f} s read" in s["note"]
                        for s in long)


def test_voice_activity_speech_recognition_and_a_speaker_a_channel(recognizer, tmp_path):
    """The VAD on each channel of the two-channel file's first 25 s, the tiny Whisper's transcripts:
    each segment is predict() of its channel's samples, transcribed alone and with the same neighbours."""
    samples, _ = sf.read(STEREO, dtype="float32", frames=25 * 16000)
    sf.write(tmp_path / "excerpt.flac", samples, 16000)
    timeline = recognizer.timeline(tmp_path / "excerpt.flac", channels_as_speakers=True)
    assert timeline["segmenter"].startswith("Silero VAD") and timeline["speakers"] == "one a channel"
    assert {s["speaker"] for s in timeline["segments"]} == {"channel 1", "channel 2"}
    assert len(timeline["segments"]) >= 8 and all(s["transcript"] for s in timeline["segments"])
    assert [s["start"] for s in timeline["segments"]] == sorted(s["start"] for s in timeline["segments"])
    assert_each_segment_is_predict_of_its_samples(recognizer, timeline, samples, text_given=False)


def test_predict_py_writes_the_timeline_as_csv_json_and_a_figure(demo, tmp_path, capsys, by_subtitles):
    out = tmp_path / "out" / "timeline.csv"
    assert predict.main([str(demo["run_dir"]), "--recording", str(MONO), "--subtitles", str(SRT),
                         "--rttm", str(CONVERSATION / "conversation.rttm"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Did you get the report I sent l" in printed and f"wrote {out}" in printed
    paths = output_paths(out)
    rows, written = read_csv(paths["csv"]), json.loads(paths["json"].read_text(encoding="utf-8"))
    assert list(rows[0]) == ["start", "end", "speaker", "transcript", "prediction", "p_ang", "p_hap", "p_sad",
                             "p_neu", "note"]
    assert len(rows) == len(written["segments"]) == len(TRUTH)
    assert written["segmenter"] == "subtitles (conversation.srt)" and written["speakers"] == "RTTM (conversation.rttm)"
    for row, segment in zip(rows, written["segments"]):
        assert float(row["start"]) == segment["start"] and row["prediction"] == segment["prediction"]
        assert float(row["p_sad"]) == pytest.approx(segment["p_sad"], abs=1e-6)
    # The SRT's cues with the RTTM's speakers predict as the WebVTT's cues with their voice tags.
    assert [s["prediction"] for s in written["segments"]] == [s["prediction"] for s in by_subtitles["segments"]]
    from matplotlib.image import imread
    assert imread(paths["png"]).shape[:2] == (380, 1100)


def test_the_figure_marks_every_class_and_speaker(by_subtitles):
    figure = timeline_figure(by_subtitles)
    top, bottom = figure.axes
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["ang", "hap", "sad", "neu"]
    assert [t.get_text() for t in bottom.get_yticklabels()] == ["Adam", "Beth"]
    assert len(bottom.collections) == 2 and sum(len(c.get_paths()) for c in bottom.collections) == len(TRUTH)


def test_a_silent_recording_gives_an_empty_timeline_and_one_line(demo, whisper, tmp_path, capsys):
    sf.write(tmp_path / "silence.flac", np.zeros(5 * 16000, dtype=np.float32), 16000)
    assert predict.main([str(demo["run_dir"]), "--recording", str(tmp_path / "silence.flac"), "--asr-model",
                         str(whisper), "--output", str(tmp_path / "silence.csv")]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == \
        f"{tmp_path / 'silence.flac'}: no speech found in 5.0 s of audio: an empty timeline"
    assert (tmp_path / "silence.csv").read_text() == "start,end,speaker,transcript,prediction,p_ang,p_hap,p_sad," \
                                                     "p_neu,note\n"
    assert json.loads((tmp_path / "silence.json").read_text())["segments"] == []


def test_a_corrupt_or_non_audio_file_is_one_line_and_exit_2(demo, tmp_path, capsys):
    notes = tmp_path / "notes.wav"
    notes.write_text("these are my notes, not a recording\n" * 50)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(MONO.read_bytes()[:60000])  # damaged a few seconds in, found as the stream is read
    for path, message in [(notes, "not an audio file ffmpeg can read"), (cut, "corrupt audio after")]:
        out = tmp_path / f"{path.stem}_timeline.csv"
        assert predict.main([str(demo["run_dir"]), "--recording", str(path), "--subtitles", str(VTT),
                             "--output", str(out)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside progress bars
        assert len(errors) == 1 and errors[0].startswith(f"predict.py: error: {path}: {message}")
        assert not any(p.exists() for p in output_paths(out).values())


def test_a_run_that_reads_words_needs_a_way_to_hear_them(demo, capsys):
    assert predict.main([str(demo["run_dir"]), "--recording", str(MONO)]) == 2
    assert "has a text branch, which reads each segment's words: give an ASR model to transcribe them " \
           "(--asr-model) or the recording's subtitles (--subtitles)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main([str(demo["run_dir"]), "--wav", str(MONO), "--text", "hi", "--rttm", "x.rttm"])
    assert "--rttm: options of --recording" in capsys.readouterr().err


PEAK_RSS = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    from mmser.api import Recognizer
    recognizer = Recognizer(sys.argv[1])
    for recording, subtitles in zip(sys.argv[2::2], sys.argv[3::2]):
        timeline = recognizer.timeline(recording, subtitles=subtitles)
        predicted = sum(s["prediction"] is not None for s in timeline["segments"])
        print(len(timeline["segments"]), predicted, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
""")


def srt_time(seconds):
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def test_memory_stays_flat_from_one_conversation_to_thirty_minutes(demo, tmp_path):
    """The peak resident set of a fresh process after the whole timeline of the 77-s conversation,
    and after then the timeline of 30 minutes that hold it four times (at 0, 10, 20 and 28 minutes,
    digital silence between): every segment cut from the stream, transcribed (the subtitles'),
    featurized and predicted. A peak only grows: had the second run held the whole recording
    (115 MB as float32) or its segments' features, the second figure would show it. The subtitles
    stand in for the voice activity, which tests/test_segmentation.py measures the same way."""
    conversation, _ = sf.read(MONO, dtype="float32")
    places = [0, 600, 1200, 1680]
    long, long_srt = tmp_path / "thirty_minutes.flac", tmp_path / "thirty_minutes.srt"
    with sf.SoundFile(long, "w", 16000, 1, subtype="PCM_16") as f:
        at = 0
        for start in [place * 16000 for place in places] + [1800 * 16000]:
            for block in range(at, start, 60 * 16000):  # silence up to the next place, a minute at a time
                f.write(np.zeros(min(60 * 16000, start - block), dtype=np.float32))
            if start < 1800 * 16000:
                f.write(conversation)
                at = start + len(conversation)
    cues = [(place + t["start"], place + t["end"], t["text"]) for place in places for t in TRUTH]
    long_srt.write_text("".join(f"{k}\n{srt_time(a)} --> {srt_time(b)}\n{text}\n\n"
                                for k, (a, b, text) in enumerate(cues, 1)), encoding="utf-8")
    assert abs(sf.info(str(long)).duration - 1800) < 1
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(demo["run_dir"]), str(MONO), str(SRT), str(long),
                          str(long_srt)], capture_output=True, text=True, check=True, cwd=REPO)
    (short_segments, short_predicted, short_peak), (long_segments, long_predicted, long_peak) = \
        [line.split() for line in out.stdout.splitlines()]
    print(f"\npeak RSS after 77 s: {float(short_peak):.1f} MB, after 30 min: {float(long_peak):.1f} MB")
    assert (int(short_segments), int(long_segments)) == (len(TRUTH), 4 * len(TRUTH))
    assert int(long_predicted) == 4 * int(short_predicted) == 4 * len(TRUTH)
    assert float(long_peak) < float(short_peak) + 20


def test_the_csv_text_writes_what_is_missing_as_empty_cells():
    result = {"classes": ["a", "b"], "segments": [
        {"start": 1.0, "end": 2.5, "speaker": None, "transcript": None, "prediction": None, "p_a": None, "p_b": None,
         "note": "silent"}]}
    assert timeline_csv(result) == "start,end,speaker,transcript,prediction,p_a,p_b,note\n1.000,2.500,,,,,,silent\n"
