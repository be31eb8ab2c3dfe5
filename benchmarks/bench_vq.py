"""vq-wav2vec tokenization at the real model size: speed, peak memory, distance from the compute limit.

    python benchmarks/bench_vq.py [--device cpu|cuda] [--seconds 10] [--repeat 3] [--memory-seconds 2 10 34]

Reads and writes nothing: the model is vq_wav2vec.VqWav2Vec built from the real vq-wav2vec
k-means args (conv stack (512,10,5),(512,8,4),(512,4,2)x3,(512,1,1)x3, gelu, 320 codes x 2
groups, shared codebook) with random weights, which cost exactly what the pretrained ones do.

Compute-bound limit: the conv stack's multiply-adds per audio second,
    conv_flops = sum over layers of 2 * C_in * C_out * kernel * frames_out(16000 samples)
(about 5.0 GFLOP per audio second), against the FLOP/s of a dense fp32 matmul measured in the
same run: limit = peak / conv_flops audio seconds per wall second; vq_limit_ratio = measured
audio seconds per wall second of `codes()` / limit. The quantizer (projection and nearest-codeword
search) is work the limit does not count, so its time counts against the ratio.
Peak memory: the resident set's growth while one utterance of each length is tokenized
(torch.cuda.max_memory_allocated on a GPU).
"""
import argparse
import time

import numpy as np
import torch

from common import (device_arg, machine_info, measure_peak_flops, peak_rss_mb, print_table, reset_peak_rss,
                    rss_mb, set_threads, synchronize, timed, use_repo_modules)

SAMPLE_RATE = 16000
REAL_CONV_LAYERS = [(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)] * 3


def real_vq_args(conv_layers=REAL_CONV_LAYERS):
    """The args of fairseq's vq-wav2vec_kmeans.pt that matter for tokens (as fairseq 0.9 stored them)."""
    return argparse.Namespace(
        arch="wav2vec", conv_feature_layers=repr(conv_layers), activation="gelu", log_compression=False,
        skip_connections_feat=False, residual_scale=0.5, non_affine_group_norm=False, vq_type="kmeans",
        vq_vars=320, vq_groups=2, combine_groups=True, vq_dim=0)


def build_vq(conv_layers=REAL_CONV_LAYERS, device="cpu", seed=0):
    """The project's own vq-wav2vec module at the given size, random weights and codebook."""
    use_repo_modules()
    from mmser.vq_wav2vec import VqWav2Vec
    torch.manual_seed(seed)
    model = VqWav2Vec(real_vq_args(conv_layers)).eval()
    with torch.no_grad():
        model.vector_quantizer.embedding.normal_()  # zeros would make every distance tie
    return model.to(device)


def conv_flops_per_audio_second(conv_layers=REAL_CONV_LAYERS):
    """Multiply-add FLOPs of the conv stack on one second of 16 kHz audio."""
    flops, length, in_channels = 0, SAMPLE_RATE, 1
    for channels, kernel, stride in conv_layers:
        length = (length - kernel) // stride + 1
        flops += 2 * in_channels * channels * kernel * length
        in_channels = channels
    return flops


def _peak_memory(model, wav, device):
    """(peak growth in MB over the memory in use before, wall seconds) for one utterance."""
    if torch.device(device).type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        model.codes(wav)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, time.perf_counter() - start
    reset_peak_rss()
    before = rss_mb()
    start = time.perf_counter()
    model.codes(wav)
    elapsed = time.perf_counter() - start
    return peak_rss_mb() - before, elapsed


def bench_vq(device="cpu", seconds=10.0, repeat=3, memory_seconds=(2.0, 10.0, 34.0),
             conv_layers=REAL_CONV_LAYERS, seed=0, peak_seconds=1.5):
    """Tokenize synthetic audio with the real-size model; -> dict of figures (see module docstring)."""
    set_threads()
    rng = np.random.default_rng(seed)
    model = build_vq(conv_layers, device, seed)
    wav = torch.from_numpy((0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32))

    from mmser.vq_wav2vec import full_fp32_precision, plain_cpu_convolutions
    # Every part in full fp32, as codes() runs it: TF32 convolutions (cuDNN's default) would time
    # a cheaper computation than the fp32 peak they are compared with.
    with full_fp32_precision():
        peak_before = measure_peak_flops(device, seconds=peak_seconds)
    codes_times = timed(lambda: model.codes(wav), device, repeat)
    with torch.inference_mode(), full_fp32_precision(), plain_cpu_convolutions(torch.device(device)):
        batch = wav.to(device)[None]
        conv_times = timed(lambda: model.feature_extractor(batch), device, repeat)
        z = model.feature_extractor(batch)
        quantizer_times = timed(lambda: model.vector_quantizer.forward_idx(z), device, repeat)
    with full_fp32_precision():
        peak_after = measure_peak_flops(device, seconds=peak_seconds)
    peak = max(peak_before, peak_after)  # the less disturbed of the two: a conservative ratio

    flops = conv_flops_per_audio_second(conv_layers)
    limit = peak / flops
    best = min(codes_times)
    throughput = seconds / best
    memory = []
    for length in memory_seconds:
        long_wav = torch.from_numpy((0.1 * rng.standard_normal(int(length * SAMPLE_RATE))).astype(np.float32))
        grown, elapsed = _peak_memory(model, long_wav, device)
        memory.append({"audio_s": length, "peak_growth_mb": round(grown, 1), "wall_s": round(elapsed, 3)})
        del long_wav
    return {
        "device": str(device),
        "conv_layers": repr(conv_layers),
        "utterance_s": seconds,
        "repeat": repeat,
        "codes_wall_s": [round(t, 4) for t in codes_times],
        "conv_stack_wall_s": [round(t, 4) for t in conv_times],
        "quantizer_wall_s": [round(t, 4) for t in quantizer_times],
        "quantizer_share": min(quantizer_times) / best,
        "audio_s_per_wall_s": throughput,
        "conv_gflop_per_audio_s": flops / 1e9,
        "conv_achieved_gflops": flops * seconds / min(conv_times) / 1e9,
        "peak_gflops_fp32": peak / 1e9,
        "peak_gflops_fp32_before_after": [round(peak_before / 1e9, 2), round(peak_after / 1e9, 2)],
        "limit_audio_s_per_wall_s": limit,
        "vq_limit_ratio": throughput / limit,
        "conv_only_limit_ratio": seconds / min(conv_times) / limit,
        "peak_memory_by_length": memory,
    }


def print_vq(result):
    print_table("vq-wav2vec tokenization (real size, random weights), " + result["device"], [
        {"measure": "audio s per wall s (codes)", "value": result["audio_s_per_wall_s"]},
        {"measure": "compute-bound limit, audio s per wall s", "value": result["limit_audio_s_per_wall_s"]},
        {"measure": "vq_limit_ratio (codes / limit)", "value": result["vq_limit_ratio"]},
        {"measure": "conv stack alone / limit", "value": result["conv_only_limit_ratio"]},
        {"measure": "quantizer share of codes() time", "value": result["quantizer_share"]},
        {"measure": "conv GFLOP per audio s", "value": result["conv_gflop_per_audio_s"]},
        {"measure": "conv stack achieved GFLOP/s", "value": result["conv_achieved_gflops"]},
        {"measure": "dense fp32 matmul peak GFLOP/s", "value": result["peak_gflops_fp32"]},
    ], ["measure", "value"])
    print_table("vq-wav2vec peak memory growth per utterance", result["peak_memory_by_length"])


def main(argv=None):
    parser = device_arg(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the timed utterance")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-seconds", type=float, nargs="+", default=[2.0, 10.0, 34.0],
                        help="utterance lengths whose peak memory is measured (IEMOCAP's longest is 34 s)")
    args = parser.parse_args(argv)
    result = bench_vq(args.device, args.seconds, args.repeat, args.memory_seconds)
    print(machine_info(args.device))
    print_vq(result)
    return result


if __name__ == "__main__":
    main()
