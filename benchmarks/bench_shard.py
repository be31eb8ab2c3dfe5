"""Sharded extraction: one process against two ranks under torchrun, one torch thread each.

    python benchmarks/bench_shard.py [--utterances 100] [--vq-size real|tiny] [--repeat 3] [--ranks 2]
                                     [--device cpu] [--work-dir DIR]

Writes only into a temporary folder (or --work-dir): a synthetic corpus (bench_extraction.make_data_dir)
and a MODELS_DIR of tiny models whose vq-wav2vec is, with --vq-size real (the default), the real-size
conv stack with random weights (bench_vq.build_vq), so that the step's time is compute, as on a real
corpus. The speech-tokens step (feature_ext.py speech-tokens --overwrite) runs `repeat` times as one
process and as `ranks` ranks (torchrun --standalone --nproc_per_node RANKS, gloo on the CPU), in turn,
each process with one torch thread (OMP_NUM_THREADS=1).

Timed: from the moment every rank has started and joined the process group (imports done, as in a
long run where they are a rounding error) to the step's end on every rank, which includes loading
the model in each rank, checking what is done, the ranks' agreement and the gathered reports; and,
apart, the whole command (process starts and imports included). speedup = the one process's median
over the ranks' median; the issue's target on 2 cores: >= 1.7x. The load average before and after
says how much else ran on the cores.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, load_average, machine_info, print_table, use_repo_modules

# Runs in each process (each rank): the step timed between two points every rank passes together.
TIMED_STEP = """import contextlib, io, json, sys, time
import transformers, mmser.fairseq_checkpoints, feature_ext  # noqa: F401 (imported before the clock starts)
from mmser.distributed import rank_and_world, setup_distributed, wait_for_ranks
data_dir, models_dir, device = sys.argv[1:]
setup_distributed(device)
rank, world = rank_and_world()
wait_for_ranks()
start = time.perf_counter()
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    code = feature_ext.main(["speech-tokens", data_dir, models_dir, "--overwrite", "--device", device])
seconds = time.perf_counter() - start  # the step ends on every rank together (its gathered report)
if rank == 0:
    print(json.dumps({"seconds": seconds, "code": code, "summary": printed.getvalue()}))
"""


def run_step(data_dir, models_dir, ranks, device="cpu"):
    """One timed run of the step: {"seconds", "wall_s" (the whole command), "summary"}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    program = [sys.executable, "-c", TIMED_STEP, str(data_dir), str(models_dir), device]
    if ranks > 1:
        program = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   "--no-python", *program]
    start = time.perf_counter()
    done = subprocess.run(program, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"the speech-tokens step on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"]:
        raise RuntimeError(f"the speech-tokens step on {ranks} rank(s) failed:\n{result['summary']}")
    return {"seconds": result["seconds"], "wall_s": wall, "summary": result["summary"]}


def bench_shard(device="cpu", utterances=100, vq_size="real", repeat=3, ranks=2, work_dir=None, seed=0):
    """One process against `ranks` ranks on the speech-tokens step (see the module docstring)."""
    use_repo_modules()
    import torch
    from bench_extraction import make_data_dir, make_models_dir
    from mmser.utils import audio_seconds
    note = None
    if str(device).startswith("cuda") and torch.cuda.device_count() < ranks:  # each rank needs a GPU of its own
        note = f"{ranks} ranks need {ranks} GPUs, torch sees {torch.cuda.device_count()}: measured on the CPU"
        device = "cpu"
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_shard_"))
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        data_dir, rows = make_data_dir(work_dir, utterances, seed)
        models_dir = make_models_dir(work_dir, data_dir, rows, vq_size, seed)
        audio = sum(audio_seconds(data_dir / "Audio" / f"{row['name']}.wav") for row in rows if row["label"])
        load_before = load_average()
        runs = {1: [], ranks: []}
        for _ in range(repeat):  # in turn, so that a busy spell slows both alike
            for n in runs:
                runs[n].append(run_step(data_dir, models_dir, n, device))
        load_after = load_average()
    one, many = (statistics.median(r["seconds"] for r in runs[n]) for n in (1, ranks))
    return {"device": device, "vq_size": vq_size, "utterances": len(rows),
            "labelled": sum(bool(row["label"]) for row in rows), "audio_s": round(audio, 1), "ranks": ranks,
            "repeat": repeat, "threads_per_rank": 1,
            "seconds": {str(n): [round(r["seconds"], 2) for r in runs[n]] for n in runs},
            "wall_s": {str(n): [round(r["wall_s"], 2) for r in runs[n]] for n in runs},
            "audio_s_per_wall_s": {"1": audio / one, str(ranks): audio / many},
            "shard_speedup": one / many,
            "wall_speedup": statistics.median(r["wall_s"] for r in runs[1]) /
            statistics.median(r["wall_s"] for r in runs[ranks]),
            "load_average_before": load_before, "load_average_after": load_after,
            "summary": runs[ranks][-1]["summary"], "note": note}


def print_shard(result):
    r, n = result, str(result["ranks"])
    print_table(f"sharded extraction: speech tokens (vq-wav2vec {r['vq_size']}), {r['labelled']} utterances, "
                f"{r['audio_s']} audio s, one torch thread per process, median of {r['repeat']}", [
                    {"processes": "1", "step s": statistics.median(r["seconds"]["1"]),
                     "audio s / s": r["audio_s_per_wall_s"]["1"], "command s": statistics.median(r["wall_s"]["1"])},
                    {"processes": f"{n} (torchrun)", "step s": statistics.median(r["seconds"][n]),
                     "audio s / s": r["audio_s_per_wall_s"][n], "command s": statistics.median(r["wall_s"][n])}])
    print(f"speed-up of {n} ranks: {r['shard_speedup']:.2f}x on the step ({r['wall_speedup']:.2f}x on the whole "
          f"command); load average {r['load_average_before']} before, {r['load_average_after']} after")
    if r["note"]:
        print(r["note"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (gloo), or cuda with a GPU per rank")
    parser.add_argument("--utterances", type=int, default=100, help="corpus size (about 70%% are labelled)")
    parser.add_argument("--vq-size", choices=["tiny", "real"], default="real")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--work-dir", help="keep the corpus and models here (default: a temporary folder)")
    args = parser.parse_args(argv)
    result = bench_shard(args.device, args.utterances, args.vq_size, args.repeat, args.ranks, args.work_dir)
    print(machine_info(args.device))
    print_shard(result)
    return result


if __name__ == "__main__":
    main()
