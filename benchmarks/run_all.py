"""Run every benchmark, print their tables and write benchmarks/results.json.

    python benchmarks/run_all.py [--device cpu|cuda] [--out benchmarks/results.json] [--quick]

Runs, each in a process of its own (so that each memory figure is its own): bench_vq.py
(vq-wav2vec tokenization against the compute-bound limit), bench_extraction.py (sentence-embedding
and text-token throughput; peak memory of the extraction on 100 and 1000 synthetic utterances),
bench_train.py (training MFU, the frozen-speech cache, data wait), bench_asr.py (speech recognition
with a Whisper-small-sized model: each backend and precision against the compute-bound limit, audio
s per wall s, peak memory), bench_timeline.py (a recording's whole timeline, with the tiny models and
a Whisper-small-sized ASR), bench_speech.py (a WavLM-base's frozen extraction against the
compute-bound limit, its peak memory on a 34-s utterance, an epoch on its cached layer means against
one on vq-wav2vec tokens) and bench_shard.py (the speech-tokens step as one process and as two ranks
under torchrun, one thread each).
The full run took 5.6 minutes on 2 idle cores of an AMD EPYC Zen 4 (bf16 rows included) and
12-24 minutes on 2 cores of an Intel Xeon shared with other work (load average 3-5); a CPU without
bf16 instructions leaves the bf16 rows out (utils.cpu_has_native_bf16), since it would emulate
them for over half an hour. results.json holds the machine (CPU, cores, versions, bf16 flag,
date, load average before and after), each benchmark's raw figures, and the headline figures
with their targets:
  vq_limit_ratio            codes() audio s per wall s / (matmul peak / conv FLOPs per audio s)  >= 0.6
  train_mfu_fp32_text_base  text branch at RoBERTa-base, fp32, the project's default batches    >= 0.3
  cache_epoch_speedup       epoch time without / with the frozen-speech cache, original settings >= 1.5
  data_wait_share           loader next() / (next() + train_step), the largest of all runs       < 0.05
  extraction_peak_mb        peak RSS of the whole extraction, {"100": ..., "1000": ...}
  asr_audio_s_per_wall_s    Whisper-small-sized transcription in fp32 (transformers), audio s per wall s
  asr_limit_share           its windows' FLOPs per second / the fp32 matmul peak (bench_asr.py)
  asr_best_audio_s_per_wall_s, asr_best_run   the fastest backend and precision of bench_asr.py's runs
  asr_peak_mb               its resident set with the model loaded plus the peak growth while transcribing
  speech_limit_ratio        WavLM-base layer means, audio s per wall s / (peak / FLOPs per audio s)  >= 0.7
  timeline_audio_s_per_wall_s  a recording's whole timeline, {"tiny": ..., "whisper-small": ...}
  shard_speedup             the speech-tokens step (real-size vq-wav2vec): one process's time / two ranks'  >= 1.7
--quick runs every benchmark at a small size, 1-2 minutes on those busy 2 cores (a smoke run: its
figures are not the targets', and it writes results.json only where --out says); bench_shard.py's
part, which starts torch in four processes and makes its corpus, adds about 30 s (load average 1.4-1.8).
"""
import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import time
from pathlib import Path

from common import REPO, load_average, machine_info, use_repo_modules

TARGETS = {"vq_limit_ratio": (">=", 0.6), "train_mfu_fp32_text_base": (">=", 0.3),
           "cache_epoch_speedup": (">=", 1.5), "data_wait_share": ("<", 0.05), "shard_speedup": (">=", 1.7),
           "speech_limit_ratio": (">=", 0.7)}
# What each benchmark is given: the measurement, and --quick's smoke run, which takes every code
# path once (every configuration at the real widths, one layer per encoder, one timed step without
# warm-up, one timed product per peak, one corpus size) and answers in about 2 minutes on 2 cores.
FULL = {"vq": dict(seconds=10.0, repeat=3, memory_seconds=(2.0, 10.0, 34.0)),
        "extraction": dict(sentences=128, sizes=(100, 1000)),
        "train": dict(steps=3, full_steps=2, warmup=1, text_sizes=("base", "large")),
        "asr": dict(utterances=8, seconds=5.0, tokens=24),
        "timeline": dict(minutes=2.0, tokens=24),
        "speech": dict(seconds=10.0, repeat=3, memory_seconds=(34.0,), steps=40),
        "shard": dict(utterances=100, vq_size="real", repeat=3)}
QUICK = {"vq": dict(seconds=2.0, repeat=1, memory_seconds=(1.0, 2.0), peak_seconds=0.0),
         "extraction": dict(sentences=16, sizes=(100,), layers=1, peak_seconds=0.0, fit_wavs=20),
         "train": dict(steps=1, full_steps=1, warmup=0, text_sizes=("base",), epoch_utterances=200, layers=1,
                       peak_seconds=0.0),
         "asr": dict(utterances=2, seconds=2.0, tokens=4, layers=1, peak_seconds=0.0),
         "timeline": dict(minutes=0.5, tokens=4, layers=1),
         "speech": dict(seconds=2.0, repeat=1, memory_seconds=(2.0,), steps=2, layers=1, peak_seconds=0.0,
                        batch_utterances=3),
         "shard": dict(utterances=100, vq_size="tiny", repeat=1)}


BENCHES = ("vq", "extraction", "train", "asr", "timeline", "speech", "shard")


def _bench_in_child(name, device, settings):
    """bench_<name>.bench_<name>(device, **settings), in the process run_in_own_process started."""
    module = importlib.import_module(f"bench_{name}")
    return getattr(module, f"bench_{name}")(device, **settings)


def run_in_own_process(name, device, settings):
    """One benchmark in a fresh process (spawned, not forked: nothing of this one's memory comes
    along), so that its memory figures count only what it allocated itself: in one process,
    bench_asr's resident set once held 9 GB the training benchmark had left behind."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_bench_in_child, name, str(device), settings).result()


def run_all(device="cpu", quick=False):
    use_repo_modules()
    settings = QUICK if quick else FULL
    machine = machine_info(device)
    started = time.perf_counter()
    seconds = {}

    # Each benchmark in turn, each in a process of its own: its figures, its printed table, the
    # seconds it took (the new process's imports included: a few seconds).
    figures = {}
    for name in BENCHES:
        start = time.perf_counter()
        figures[name] = run_in_own_process(name, device, settings[name])
        seconds[name] = time.perf_counter() - start
        getattr(importlib.import_module(f"bench_{name}"), f"print_{name}")(figures[name])
    vq, extraction, train, asr, timeline, speech, shard = (figures[name] for name in BENCHES)

    machine["load_average_after"] = load_average()
    machine["run_all_seconds"] = round(time.perf_counter() - started, 1)
    headline = {
        "vq_limit_ratio": vq["vq_limit_ratio"],
        "train_mfu_fp32_text_base": train["train_mfu_fp32_text_base"],
        "cache_epoch_speedup": train["cache_epoch_speedup"],
        "data_wait_share": train["data_wait_share"],
        "extraction_peak_mb": extraction["extraction_peak_mb"],
        "bf16_skipped": train["bf16_skipped"],
        "asr_audio_s_per_wall_s": asr["audio_s_per_wall_s"],
        "asr_limit_share": asr["runs"][0]["limit_share"],
        "asr_best_audio_s_per_wall_s": asr["best_audio_s_per_wall_s"],
        "asr_best_run": max(asr["runs"], key=lambda r: r["audio_s_per_wall_s"])["backend"] + " " +
        max(asr["runs"], key=lambda r: r["audio_s_per_wall_s"])["precision"],
        "asr_peak_mb": asr["rss_model_loaded_mb"] + asr["peak_growth_mb"],
        "speech_limit_ratio": speech["speech_limit_ratio"],
        "timeline_audio_s_per_wall_s": timeline["audio_s_per_wall_s"],
        "shard_speedup": shard["shard_speedup"],
    }
    met = {}
    for key, (op, target) in TARGETS.items():
        met[key] = {"value": headline[key], "target": f"{op} {target}",
                    "met": headline[key] >= target if op == ">=" else headline[key] < target}
    return {**headline, "targets": met, "quick": quick, "machine": machine, "seconds": seconds,
            "vq": vq, "extraction": extraction, "train": train, "asr": asr, "timeline": timeline,
            "speech": speech, "shard": shard}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--out", help="where the results go (default: benchmarks/results.json; --quick writes "
                        "nowhere unless told, so that its figures never replace the measured ones)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, about 2 minutes: checks the scripts run, measures nothing")
    args = parser.parse_args(argv)
    out = args.out or (None if args.quick else str(REPO / "benchmarks" / "results.json"))
    results = run_all(args.device, args.quick)
    if out:
        use_repo_modules()
        from mmser.utils import write_text_atomic
        write_text_atomic(Path(out), json.dumps(results, indent=2, default=str) + "\n")
    print("\ntargets")
    for key, m in results["targets"].items():
        print(f"  {key:<26} {m['value']:.3g}  (target {m['target']}: {'met' if m['met'] else 'MISSED'})")
    print(f"  extraction_peak_mb         {results['extraction_peak_mb']}")
    print(f"  asr_audio_s_per_wall_s     {results['asr_audio_s_per_wall_s']:.3g}  (transformers fp32: "
          f"{results['asr_limit_share']:.3g} of the limit, peak {results['asr_peak_mb']:.0f} MB; fastest "
          f"{results['asr_best_run']}: {results['asr_best_audio_s_per_wall_s']:.3g})")
    print(f"  timeline_audio_s_per_wall_s  {results['timeline_audio_s_per_wall_s']}  (tiny models; Whisper-small-sized ASR)")
    if results["quick"]:
        print("--quick: a smoke run at small sizes; its figures are not the targets'")
    print(f"machine: {results['machine']}")
    print(f"wrote {out}" if out else "wrote nothing (--quick without --out)")
    return results


if __name__ == "__main__":
    main()
