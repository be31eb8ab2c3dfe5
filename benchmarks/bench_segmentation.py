"""Segmentation of whole recordings: voice activity's speed (audio seconds per wall second) and memory.

    python benchmarks/bench_segmentation.py [--minutes 1 30] [--stereo]

Builds each recording by repeating tests/data/conversation's 77-s conversation (real synthesized
speech, so Silero VAD runs on every window) up to --minutes, written block by block to a temporary
FLAC, and runs mmser.segmentation.segment_recording on it (the VAD on one thread, as it always runs;
--stereo: the two-channel file with channels_as_speakers, the VAD on both channels). Reports the VAD
model's load time, the wall time and speed of the whole segmentation (decoding, resampling, VAD,
regions), the segments found, the resident set after the load and its peak growth during each run
(common.peak_rss_mb): flat from the shortest to the longest recording if nothing grows with length.
"""
import argparse
import tempfile
import time
from pathlib import Path

import soundfile as sf

from common import REPO, load_average, machine_info, peak_rss_mb, print_table, reset_peak_rss, rss_mb, use_repo_modules

CONVERSATION = REPO / "tests" / "data" / "conversation"


def repeated_recording(path, minutes, stereo=False):
    """The conversation repeated up to `minutes`, written without holding more than one copy."""
    source = CONVERSATION / ("conversation_stereo.flac" if stereo else "conversation.flac")
    samples, rate = sf.read(source, dtype="float32", always_2d=True)
    total = int(minutes * 60 * rate)
    with sf.SoundFile(path, "w", rate, samples.shape[1], subtype="PCM_16") as f:
        for start in range(0, total, len(samples)):
            f.write(samples[:min(len(samples), total - start)])
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 30])
    parser.add_argument("--stereo", action="store_true", help="two channels, one speaker each")
    args = parser.parse_args(argv)
    use_repo_modules()
    from mmser import segmentation

    start = time.perf_counter()
    segmentation.load_vad()
    load_seconds = time.perf_counter() - start
    baseline = rss_mb()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in args.minutes:
            path = repeated_recording(Path(tmp) / f"{minutes:g}min.flac", minutes, args.stereo)
            reset_peak_rss()
            start = time.perf_counter()
            segments = segmentation.segment_recording(path, channels_as_speakers=args.stereo, progress=False)
            wall = time.perf_counter() - start
            rows.append({"minutes": minutes, "channels": 2 if args.stereo else 1, "segments": len(segments),
                         "wall_s": wall, "audio_s_per_wall_s": minutes * 60 / wall,
                         "peak_rss_growth_mb": peak_rss_mb() - baseline})
    print_table(f"segmentation (Silero VAD load {load_seconds:.2f} s; resident after it {baseline:.0f} MB; "
                f"load average {load_average()})", rows)
    print({k: v for k, v in machine_info().items() if k in ("cpu_model", "cpu_cores", "torch", "load_average")})
    return rows


if __name__ == "__main__":
    main()
