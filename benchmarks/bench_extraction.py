"""Feature extraction: sentence-embedding and text-token throughput, and peak memory vs corpus size.

    python benchmarks/bench_extraction.py [--device cpu|cuda] [--sentences 128] [--sizes 100 1000]
                                          [--vq-size tiny|real] [--work-dir DIR] [--layers N]

Writes only into a temporary folder (or --work-dir): synthetic corpora made by
synthetic_iemocap.make_corpus, their DATA_DIRs by mocap_data_collect.collect, and a MODELS_DIR by
tiny_models.make_tiny_models.

Throughput: text_features.sentence_embeddings (the batched, length-sorted step) with a randomly
initialised BERT-base-sized model (12 layers, 768 wide) on the corpus's transcripts, in
utterances per second and GFLOP/s (forward FLOPs 2*N*T + 4*L*d*T^2 per sequence on its real
tokens, N the transformer-layer parameters) against a dense fp32 matmul measured in the same run;
and text_features.extract_text_tokens (tokenizer, files written atomically) in utterances per second.

Peak memory: each corpus size runs steps.extract_features (every step: speech
tokens, text tokens, sentence embeddings, context vectors) in a fresh Python process, which
reports its resident set before the steps and its peak during them. The steps work one
utterance (or one batch) at a time, so the peak should follow the longest utterance, not the
number of utterances. With --vq-size real the speech step uses the real-size vq-wav2vec (slow on
a CPU: about a tenth of a second per audio second or more); by default the tiny models are used,
and benchmarks/bench_vq.py gives the real model's peak per utterance length.
"""
import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import (device_arg, machine_info, measure_peak_flops, peak_rss_mb, print_table, reset_peak_rss, rss_mb,
                    set_threads, synchronize, use_repo_modules)

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
# make_corpus sizes: (dialogues per session, utterances per dialogue) -> 5 sessions' worth
CORPUS_SHAPES = {100: (2, 10), 1000: (10, 20)}


def corpus_shape(n):
    if n in CORPUS_SHAPES:
        return CORPUS_SHAPES[n]
    per_session = max(20, n // 5)
    dialogues = max(2, per_session // 20)
    return dialogues, max(10, per_session // dialogues)


def make_data_dir(work_dir, n_utterances, seed=0):
    """A synthetic corpus of about n_utterances and its DATA_DIR; -> (data_dir, rows, audio seconds)."""
    use_repo_modules()
    from mmser.data_contract import read_manifest
    from mocap_data_collect import collect
    from fixtures.synthetic_iemocap import make_corpus
    root, data_dir = Path(work_dir) / f"corpus{n_utterances}", Path(work_dir) / f"data{n_utterances}"
    if not (data_dir / "utterances.csv").is_file():
        dialogues, per_dialogue = corpus_shape(n_utterances)
        make_corpus(root, seed=seed, dialogues_per_session=dialogues, utterances_per_dialogue=per_dialogue)
        collect(root, data_dir, progress=False, out=io.StringIO())
    rows = read_manifest(data_dir)
    return data_dir, rows


def make_models_dir(work_dir, data_dir, rows, vq_size="tiny", seed=0, fit_wavs=60):
    """tiny_models' MODELS_DIR, its codebook fitted on `fit_wavs` recordings; with vq_size='real'
    its vq-wav2vec is replaced by the real-size one."""
    use_repo_modules()
    from fixtures.tiny_models import make_tiny_models
    models_dir = Path(work_dir) / f"models_{vq_size}"
    if not (models_dir / "vq-wav2vec_kmeans.pt").is_file():
        wavs = [p for p in (Path(data_dir) / "Audio" / f"{r['name']}.wav" for r in rows) if p.is_file()][:fit_wavs]
        make_tiny_models(models_dir, [r["transcript"] for r in rows], wavs, seed)
        if vq_size == "real":
            from bench_vq import build_vq, real_vq_args
            model = build_vq(seed=seed)
            # fairseq's own layout, loaded back by fairseq_checkpoints.load_vq_wav2vec like the real download
            torch.save({"args": real_vq_args(), "model": model.state_dict()}, models_dir / "vq-wav2vec_kmeans.pt")
    return models_dir


def bert_base(vocab_size=30522, seed=0, layers=None):
    """A random BERT-base; layers: fewer layers of the same width (a smoke run)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    shape = dict(BERT_BASE, **({"num_hidden_layers": layers} if layers else {}))
    return BertModel(BertConfig(vocab_size=vocab_size, **shape), add_pooling_layer=False).eval()


def bench_sentence_embeddings(texts, tokenizer, device="cpu", repeat=2, layers=None, peak_seconds=1.5):
    """Utterances/s and GFLOP/s of text_features.sentence_embeddings with a BERT-base-sized model."""
    use_repo_modules()
    from mmser.text_features import sentence_embeddings
    model = bert_base(layers=layers).to(device)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    n = sum(p.numel() for p in model.encoder.parameters())
    flops = sum(2 * n * t + 4 * model.config.num_hidden_layers * model.config.hidden_size * t * t for t in lengths)
    sentence_embeddings(texts[:32], tokenizer, model)  # warm-up
    peak = measure_peak_flops(device, seconds=peak_seconds)
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        sentence_embeddings(texts, tokenizer, model)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = max(peak, measure_peak_flops(device, seconds=peak_seconds))
    best = min(times)
    return {"utterances": len(texts), "mean_tokens": float(np.mean(lengths)), "wall_s": [round(t, 3) for t in times],
            "utterances_per_s": len(texts) / best, "achieved_gflops": flops / best / 1e9,
            "peak_gflops_fp32": peak / 1e9, "mfu": flops / best / peak, "layers": model.config.num_hidden_layers}


def bench_text_tokens(data_dir, models_dir):
    """Utterances/s of the real text-token step (tokenize, write one .npy per utterance)."""
    use_repo_modules()
    from mmser.text_features import extract_text_tokens
    start = time.perf_counter()
    report = extract_text_tokens(data_dir, models_dir, overwrite=True, progress=False)
    elapsed = time.perf_counter() - start
    if not report.ok:
        raise RuntimeError(f"text-token step failed: {report.error or report.failed[:3]}")
    return {"utterances": report.written, "wall_s": round(elapsed, 3), "utterances_per_s": report.written / elapsed}


def _memory_child(data_dir, models_dir, device):
    """Runs in a fresh process: every extraction step; prints the RSS before and the peak during.

    One thread: the figure is memory, and on a shared machine the tiny models' many small ops run
    faster without waiting for a second, busy core.
    """
    torch.set_num_threads(1)
    use_repo_modules()
    import transformers  # noqa: F401  (imported before the baseline is measured: the steps import it)
    from mmser import steps
    from mmser.data_contract import read_manifest
    from mmser.utils import read_audio
    rows = read_manifest(data_dir)
    seconds = [len(read_audio(p)[0]) / 16000 for p in (Path(data_dir) / "Audio" / f"{r['name']}.wav" for r in rows)
               if p.is_file()]
    reset_peak_rss()
    before = rss_mb()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        reports = steps.extract_features(data_dir, models_dir, device=device, overwrite=True,
                                                           progress=False)
    failed = [f"{r.step}: {r.error or r.failed[:2]}" for r in reports if not r.ok]
    print(json.dumps({"utterances": len(rows), "with_audio": len(seconds), "audio_s_total": sum(seconds),
                      "longest_utterance_s": max(seconds), "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
                      "wall_s": time.perf_counter() - start, "failed": failed}))


def extraction_peak_memory(data_dir, models_dir, device="cpu"):
    """Peak memory of the whole extraction over one DATA_DIR, in a fresh process."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", str(data_dir),
                          str(models_dir), "--device", str(device)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"extraction over {data_dir} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["failed"]:
        raise RuntimeError(f"extraction over {data_dir} failed: {result['failed']}")
    result["peak_growth_mb"] = result["peak_rss_mb"] - result["rss_before_mb"]
    return result


def bench_extraction(device="cpu", sentences=128, sizes=(100, 1000), vq_size="tiny", work_dir=None, seed=0,
                     layers=None, peak_seconds=1.5, fit_wavs=60):
    """Throughput and peak memory (see the module docstring); layers, peak_seconds and fit_wavs
    shrink a smoke run: the sentence model's layers, each peak measurement's seconds, and the
    recordings the tiny codebook is fitted on."""
    set_threads()
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_extraction_"))
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        data_dirs = {n: make_data_dir(work_dir, n, seed) for n in sizes}
        small_dir, small_rows = data_dirs[min(sizes)]
        models_dir = make_models_dir(work_dir, small_dir, small_rows, vq_size, seed, fit_wavs)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(models_dir / "bert-base-uncased")
        texts = [r["transcript"] for r in data_dirs[max(sizes)][1]][:sentences]
        result = {"device": str(device), "vq_size": vq_size,
                  "sentence_embeddings_bert_base": bench_sentence_embeddings(texts, tokenizer, device, layers=layers,
                                                                             peak_seconds=peak_seconds),
                  "text_tokens": bench_text_tokens(*data_dirs[max(sizes)][:1], models_dir)}
        memory = {}
        for n in sizes:
            memory[str(n)] = extraction_peak_memory(data_dirs[n][0], models_dir, device)
        result["peak_memory"] = memory
        result["extraction_peak_mb"] = {n: m["peak_rss_mb"] for n, m in memory.items()}
        result["extraction_peak_growth_mb"] = {n: m["peak_growth_mb"] for n, m in memory.items()}
    return result


def print_extraction(result):
    s, t = result["sentence_embeddings_bert_base"], result["text_tokens"]
    print_table(f"feature extraction throughput, {result['device']}", [
        {"step": "sentence embeddings, BERT-base size", "utterances": s["utterances"], "utt/s": s["utterances_per_s"],
         "GFLOP/s": s["achieved_gflops"], "of peak": s["mfu"]},
        {"step": "text tokens (tokenize + write)", "utterances": t["utterances"], "utt/s": t["utterances_per_s"]},
    ])
    print_table(f"peak memory of the whole extraction (vq-wav2vec: {result['vq_size']})", [
        {"utterances": n, "with audio": m["with_audio"], "audio s": m["audio_s_total"],
         "longest s": m["longest_utterance_s"], "RSS before MB": m["rss_before_mb"], "peak MB": m["peak_rss_mb"],
         "growth MB": m["peak_growth_mb"], "wall s": m["wall_s"]} for n, m in result["peak_memory"].items()])


def main(argv=None):
    parser = device_arg(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--sentences", type=int, default=128, help="transcripts embedded for the throughput")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="corpus sizes (utterances)")
    parser.add_argument("--vq-size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--work-dir", help="keep the corpora and models here (default: a temporary folder)")
    parser.add_argument("--layers", type=int, help="fewer layers in the sentence model, BERT-base width (a smoke run)")
    parser.add_argument("--memory-child", nargs=2, metavar=("DATA_DIR", "MODELS_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return _memory_child(*args.memory_child, args.device)
    result = bench_extraction(args.device, args.sentences, args.sizes, args.vq_size, args.work_dir, layers=args.layers)
    print(machine_info(args.device))
    print_extraction(result)
    return result


if __name__ == "__main__":
    main()
