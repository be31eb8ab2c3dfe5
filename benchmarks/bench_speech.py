"""A transformers speech encoder's frozen extraction at WavLM-base size, and training on its cached layers.

    python benchmarks/bench_speech.py [--device cpu|cuda] [--seconds 10] [--repeat 3] [--memory-seconds 34]
                                      [--steps 40] [--layers N] [--batch-utterances 24]

Reads and writes nothing. The encoder is transformers' WavLMModel at WavLMConfig's defaults (WavLM-base:
the 512-wide 7-layer convolutional feature encoder, 12 transformer layers of 768, 3072 feed-forward),
with random weights, which cost what the pretrained ones do, run as the speech-layers extraction step
runs it (speech_encoders.layer_means_of_batches: fp32, inference mode, on a CPU one batch per torch
thread at once, each on one thread; WavLM-base batches only equal lengths, so each utterance is a
batch of its own): 2 x workers utterances of --seconds, timed together. Beside it, one utterance on
every thread (speech_encoders.layer_means, as predict.py computes a recording's).

Compute-bound limit: the model's FLOPs per audio second on an utterance of --seconds, from its config,
    conv     sum over conv layers of 2 * C_in * C_out * kernel * frames_out
    frames   T = the feature encoder's output length (50 a second)
    per frame: feature projection 2 * C_last * H, positional convolution 2 * H * (H / groups) * K,
               per transformer layer 2 * (4 H^2 + 2 H F) + 4 * H * T (Q K^T and A V)
(WavLM's gated relative position bias is a few multiply-adds per frame pair and head, not counted)
against the FLOP/s of a dense fp32 matmul measured in the same run (every thread on one product):
limit = peak / FLOPs per audio second; speech_limit_ratio = the extraction's audio seconds per wall
second / limit.
Front end: transformers' own convolutional feature encoder against the time-major one the extraction
runs on a CPU (encoder_speedups.time_major_front_end), milliseconds on the timed utterance.
Batches: --batch-utterances utterances of IEMOCAP-like lengths (log-normal, 4.5 s on average, 1 to 20 s)
through a WavLM-base-sized encoder with WavLM-large's layer-norm front end (which batches any lengths),
one at a time on every thread and as the extraction step runs them (speech.layers.length_batches of
BATCH_SECONDS / workers, workers at once), audio s per wall s and each against the limit (the FLOPs of
every utterance at its own length over the peak).
Peak memory: the resident set's growth while one utterance of --memory-seconds (IEMOCAP's longest is
34 s) is encoded (torch.cuda.max_memory_allocated on a GPU).
Training: one epoch of the speech branch alone at the original's settings (242 batches of 16), by
train_function.train_step as main.py trains: on the cached (13, 768) layer means (the weighted layer
sum and the fusion head), against the original route on vq-wav2vec tokens (a RoBERTa-base-shaped
speech encoder, frozen, its <s> vectors cached once per run, as main.py does by default). Each
route's one-time cost over IEMOCAP's 5531 utterances is given beside it: the extraction of the layer
means (at the measured audio s per wall s, 4.5 s of speech per utterance on average) and the
vq-wav2vec route's speech-vector cache (bench_train.time_speech_cache; its tokenization, measured by
bench_vq.py, is not included).
"""
import argparse
import time

import numpy as np
import torch

from common import (device_arg, machine_info, measure_peak_flops, peak_rss_mb, print_table, reset_peak_rss,
                    rss_mb, set_threads, synchronize, timed, use_repo_modules)

SAMPLE_RATE = 16000
MEAN_UTTERANCE_S, RUN_UTTERANCES, EPOCH_BATCHES = 4.5, 5531, 242


def wavlm_base(layers=None, seed=0, device="cpu", layer_norm=False):
    """speech_encoders.SpeechModel over a random WavLM-base (layers: fewer transformer layers, --quick;
    layer_norm: WavLM-large's front end, whose hidden states do not change with padding)."""
    use_repo_modules()
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    from mmser import speech_encoders
    torch.manual_seed(seed)
    config = WavLMConfig(**({"num_hidden_layers": layers} if layers else {}),
                         **({"feat_extract_norm": "layer", "do_stable_layer_norm": True} if layer_norm else {}))
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    return speech_encoders.SpeechModel(WavLMModel(config).to(device).eval(), extractor, "wavlm")


def speech_flops_per_audio_second(config, seconds):
    """The encoder's forward FLOPs on one utterance of `seconds`, per audio second (module docstring)."""
    flops, length, channels_in = 0, int(seconds * SAMPLE_RATE), 1
    for channels, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
        flops += 2 * channels_in * channels * kernel * length
        channels_in = channels
    h, f, t = config.hidden_size, config.intermediate_size, length
    flops += 2 * channels_in * h * t
    flops += 2 * h * (h // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings * t
    flops += config.num_hidden_layers * (2 * (4 * h * h + 2 * h * f) * t + 4 * h * t * t)
    return flops / seconds


def _peak_memory(speech, wav, device):
    from mmser import speech_encoders
    if torch.device(device).type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        speech_encoders.layer_means(speech, wav)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    reset_peak_rss()
    before = rss_mb()
    speech_encoders.layer_means(speech, wav)
    return peak_rss_mb() - before


def layer_utterances(n, layers, hidden, seed=0):
    """Utterance dicts as dataset_loader gives a frozen transformers speech branch: cached layer means."""
    rng = np.random.default_rng(seed)
    return [{"index": i, "name": f"bench_{i:05d}", "session": 1, "speaker": "Ses01F", "dialog": "bench",
             "label": int(rng.integers(4)),
             "speech_layers": torch.from_numpy(rng.standard_normal((layers, hidden)).astype(np.float32))}
            for i in range(n)]


def bench_epochs(device="cpu", steps=40, warmup=2, layers=None, seed=0):
    """Epoch seconds of the speech branch alone: on cached layer means, and on vq-wav2vec tokens (cached)."""
    use_repo_modules()
    import bench_train
    from mmser.model_structure import EmotionClassifier
    from mmser.speech_encoders import SpeechLayerSum
    n_layers = (layers or 12) + 1
    torch.manual_seed(seed)
    model = EmotionClassifier(speech_layer_sum=SpeechLayerSum(n_layers, 768))
    on_layers = bench_train.train_steps(model, layer_utterances(16 * (steps + warmup) * 2, n_layers, 768, seed),
                                        device, steps=steps, warmup=warmup)
    tokens_model = bench_train.build_classifier(text_size=None, speech=True, seed=seed, layers=layers)
    utterances = bench_train.synthetic_utterances(16 * (steps + warmup) * 2, ("speech",), seed)
    on_tokens = bench_train.train_steps(tokens_model, utterances, device, group_by_length=True, cache_speech=True,
                                        steps=steps, warmup=warmup)
    return {"layers_step_s": on_layers["mean_step_s"], "tokens_step_s": on_tokens["mean_step_s"],
            "layers_epoch_s": on_layers["mean_step_s"] * EPOCH_BATCHES,
            "tokens_epoch_s": on_tokens["mean_step_s"] * EPOCH_BATCHES,
            "tokens_cache_once_s": on_tokens["cache_s_per_utterance"] * RUN_UTTERANCES}


def iemocap_like_lengths(n, seed=0):
    """n utterance lengths in samples: log-normal around IEMOCAP's 4.5-s mean, between 1 and 20 s."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(MEAN_UTTERANCE_S) - 0.5 * 0.6 ** 2, 0.6, n), 1.0, 20.0)
    return [int(s * SAMPLE_RATE) for s in seconds]


def bench_batches(utterances, device="cpu", layers=None, seed=0, peak=None):
    """Audio s per wall s of layer means over IEMOCAP-like lengths, one at a time and in length batches."""
    use_repo_modules()
    from mmser import speech_encoders
    from mmser.speech.layers import BATCH_SECONDS, length_batches
    speech = wavlm_base(layers, seed, device, layer_norm=True)
    rng = np.random.default_rng(seed)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in iemocap_like_lengths(utterances, seed)]
    workers = speech_encoders.extraction_workers(speech)
    batches = [(k, [wavs[i] for i, _ in batch]) for k, batch in
               enumerate(length_batches(list(enumerate(map(len, wavs))), speech, BATCH_SECONDS / workers))]
    audio = sum(map(len, wavs)) / SAMPLE_RATE

    def extraction():  # as the speech-layers step runs them
        for _ in speech_encoders.layer_means_of_batches(speech, batches, workers):
            pass

    alone = min(timed(lambda: [speech_encoders.layer_means(speech, w) for w in wavs], device, repeat=1))
    batched = min(timed(extraction, device, repeat=1))
    flops = sum(speech_flops_per_audio_second(speech.encoder.config, len(w) / SAMPLE_RATE) * len(w) / SAMPLE_RATE
                for w in wavs)
    figures = {"batch_utterances": utterances, "batch_audio_s": audio, "batches": len(batches),
               "alone_audio_s_per_wall_s": audio / alone, "batched_audio_s_per_wall_s": audio / batched}
    if peak:
        figures.update(alone_limit_ratio=flops / alone / peak, batched_limit_ratio=flops / batched / peak)
    return figures


def front_end_ms(speech, wav, device):
    """Milliseconds of transformers' own feature encoder and of the time-major one, on `wav`."""
    from mmser import encoder_speedups
    encoder, samples = speech.encoder, torch.from_numpy(wav).to(device)
    with torch.inference_mode():
        own = min(timed(lambda: encoder.feature_extractor(samples[None]), device, repeat=3))
        if torch.device(device).type != "cpu":
            return {"front_end_ms_transformers": own * 1e3}
        fast = min(timed(lambda: encoder_speedups.time_major_front_end(encoder.feature_extractor, samples), device, 3))
    return {"front_end_ms_transformers": own * 1e3, "front_end_ms_time_major": fast * 1e3}


def bench_speech(device="cpu", seconds=10.0, repeat=3, memory_seconds=(34.0,), steps=40, layers=None, seed=0,
                 peak_seconds=1.5, batch_utterances=24):
    """-> dict of figures (see the module docstring)."""
    set_threads()
    use_repo_modules()
    from mmser import speech_encoders
    rng = np.random.default_rng(seed)
    speech = wavlm_base(layers, seed, device)
    workers = speech_encoders.extraction_workers(speech)
    wavs = [(0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32) for _ in range(2 * workers)]
    wav = wavs[0]

    def extraction():  # the extraction step's way: each utterance a batch of its own (equal lengths only)
        for _ in speech_encoders.layer_means_of_batches(speech, ((i, [w]) for i, w in enumerate(wavs)), workers):
            pass

    peak_before = measure_peak_flops(device, seconds=peak_seconds)
    times = timed(extraction, device, repeat)
    alone = timed(lambda: speech_encoders.layer_means(speech, wav), device, repeat)
    peak_after = measure_peak_flops(device, seconds=peak_seconds)
    peak = max(peak_before, peak_after)
    front_end = front_end_ms(speech, wav, device)
    flops = speech_flops_per_audio_second(speech.encoder.config, seconds)
    throughput = seconds * len(wavs) / min(times)
    limit = peak / flops
    memory = []
    for length in memory_seconds:
        long_wav = (0.1 * rng.standard_normal(int(length * SAMPLE_RATE))).astype(np.float32)
        start = time.perf_counter()
        grown = _peak_memory(speech, long_wav, device)
        memory.append({"audio_s": length, "peak_growth_mb": round(grown, 1),
                       "wall_s": round(time.perf_counter() - start, 2)})
    del speech
    batches = bench_batches(batch_utterances, device, layers, seed, peak)
    epochs = bench_epochs(device, steps, layers=layers, seed=seed)
    extraction_once = RUN_UTTERANCES * MEAN_UTTERANCE_S / throughput
    return {
        "device": str(device), "layers": layers or 12, "utterance_s": seconds, "repeat": repeat,
        "workers": workers, "utterances": len(wavs),
        "wall_s": [round(t, 3) for t in times],
        "audio_s_per_wall_s": throughput,
        "one_utterance_audio_s_per_wall_s": seconds / min(alone),
        "one_utterance_limit_ratio": seconds / min(alone) / limit,
        "gflop_per_audio_s": flops / 1e9,
        "peak_gflops_fp32": peak / 1e9,
        "peak_gflops_fp32_before_after": [round(peak_before / 1e9, 2), round(peak_after / 1e9, 2)],
        "limit_audio_s_per_wall_s": limit,
        "speech_limit_ratio": throughput / limit,
        "peak_memory_by_length": memory,
        **front_end,
        **batches,
        **epochs,
        "layers_extraction_once_s": extraction_once,
    }


def print_speech(result):
    print_table(f"WavLM-base frozen extraction (random weights, {result['layers']} layers), " + result["device"], [
        {"measure": f"audio s per wall s (extraction: {result['utterances']} utterances, "
                    f"{result['workers']} at once)", "value": result["audio_s_per_wall_s"]},
        {"measure": "compute-bound limit, audio s per wall s", "value": result["limit_audio_s_per_wall_s"]},
        {"measure": "speech_limit_ratio (measured / limit)", "value": result["speech_limit_ratio"]},
        {"measure": "GFLOP per audio s", "value": result["gflop_per_audio_s"]},
        {"measure": "dense fp32 matmul peak GFLOP/s", "value": result["peak_gflops_fp32"]},
        {"measure": "one utterance on every thread (layer_means), audio s per wall s",
         "value": result["one_utterance_audio_s_per_wall_s"]},
        {"measure": "  its share of the limit", "value": result["one_utterance_limit_ratio"]},
    ], ["measure", "value"])
    print_table("convolutional front end on the timed utterance", [
        {"front end": name, "ms": result[key]} for name, key in
        [("transformers' own", "front_end_ms_transformers"), ("time-major (the extraction's on a CPU)",
                                                                "front_end_ms_time_major")] if key in result],
        ["front end", "ms"])
    print_table(f"layer means of {result['batch_utterances']} IEMOCAP-like utterances ({result['batch_audio_s']:.0f} s), "
                "layer-norm front end", [
        {"way": "one at a time, every thread on each", "audio_s_per_wall_s": result["alone_audio_s_per_wall_s"],
         "limit_ratio": result.get("alone_limit_ratio")},
        {"way": f"the extraction's: length batches ({result['batches']}), {result['workers']} at once",
         "audio_s_per_wall_s": result["batched_audio_s_per_wall_s"],
         "limit_ratio": result.get("batched_limit_ratio")},
    ], ["way", "audio_s_per_wall_s", "limit_ratio"])
    print_table("WavLM-base peak memory growth per utterance", result["peak_memory_by_length"])
    print_table("speech branch alone, one epoch (242 batches of 16)", [
        {"route": "cached layer means (weighted sum)", "epoch_s": result["layers_epoch_s"],
         "once_s": result["layers_extraction_once_s"]},
        {"route": "vq-wav2vec tokens, frozen speech RoBERTa (cached)", "epoch_s": result["tokens_epoch_s"],
         "once_s": result["tokens_cache_once_s"]},
    ], ["route", "epoch_s", "once_s"])


def main(argv=None):
    parser = device_arg(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the timed utterance")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-seconds", type=float, nargs="+", default=[34.0],
                        help="utterance lengths whose peak memory is measured (IEMOCAP's longest is 34 s)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per route")
    parser.add_argument("--layers", type=int, default=None, help="fewer transformer layers (a smoke run)")
    parser.add_argument("--batch-utterances", type=int, default=24,
                        help="IEMOCAP-like utterances timed one at a time and in length batches")
    args = parser.parse_args(argv)
    result = bench_speech(args.device, args.seconds, args.repeat, args.memory_seconds, args.steps, args.layers,
                          batch_utterances=args.batch_utterances)
    print(machine_info(args.device))
    print_speech(result)
    return result


if __name__ == "__main__":
    main()
