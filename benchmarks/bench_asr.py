"""Speech recognition: speed (audio seconds per wall second) and peak memory of a Whisper-small-sized model.

    python benchmarks/bench_asr.py [--device cpu|cuda] [--utterances 8] [--seconds 5] [--tokens 24]
                                   [--batch-size 8] [--layers 12]

Writes only into a temporary folder (tiny_models.write_tiny_whisper's tokenizer, feature extractor
and generation config). The model is WhisperForConditionalGeneration at openai/whisper-small's sizes
(d_model 768, 12 encoder and 12 decoder layers, 12 heads, FFN 3072, 80 mel bins, a 51865-token
vocabulary: 242M parameters) with random weights, which cost what trained ones cost, run through
asr.transcribe exactly as the transcripts step runs it (English, transcribe, greedy, no
timestamps, 30-s windows, --batch-size windows per generate call).

A random model never ends a transcript by itself, so each window decodes exactly --tokens tokens
(end of text suppressed, max_length = the 4 prompt tokens + --tokens): 24 is about what a 5-s IEMOCAP
utterance (around 12 words) takes, with room to spare; a real model stops where the speech does.
Whisper pads every window to 30 s, so the encoder costs the same for 2 s as for 30 s of audio: short
utterances are the slow case, and the figure is also given in windows per wall second.

Speed: audio seconds per wall second of transcribe() over --utterances synthetic utterances of
--seconds s each (tones in noise), after one untimed warm-up window.
Memory: the process's resident set with the model loaded, and its peak growth during the timed
transcription (common.peak_rss_mb; torch.cuda.max_memory_allocated on a GPU).
"""
import argparse
import tempfile
import time

import numpy as np
import torch

from common import (device_arg, machine_info, peak_rss_mb, print_table, reset_peak_rss, rss_mb, set_threads,
                    synchronize, use_repo_modules)

WHISPER_SMALL = {"d_model": 768, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 12,
                 "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072,
                 "num_mel_bins": 80, "vocab_size": 51865, "max_source_positions": 1500, "max_target_positions": 448}
SAMPLE_RATE = 16000


def synthetic_utterances(n, seconds, seed=0):
    """Tones of different pitch in noise: something to hear, the same for every run."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return [(0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
            for i in range(n)]


def whisper_small(work_dir, tokens, layers=12, device="cpu", seed=0):
    """(feature extractor, tokenizer, model): a random Whisper-small-sized model that decodes exactly
    `tokens` tokens per window, with the tiny Whisper's tokenizer and generation config."""
    use_repo_modules()
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperConfig, WhisperForConditionalGeneration

    from fixtures.tiny_models import write_tiny_whisper
    tiny = write_tiny_whisper(f"{work_dir}/tiny-whisper")
    extractor, tokenizer = AutoFeatureExtractor.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    tiny_model = WhisperForConditionalGeneration.from_pretrained(tiny)
    ids = {k: getattr(tiny_model.config, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                      "decoder_start_token_id")}
    config = WhisperConfig(**{**WHISPER_SMALL, "encoder_layers": layers, "decoder_layers": layers}, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config).to(device).eval()
    generation = tiny_model.generation_config
    generation.max_length = 4 + tokens
    generation.suppress_tokens = [ids["eos_token_id"]]
    generation.begin_suppress_tokens = None
    model.generation_config = generation
    return extractor, tokenizer, model


def bench_asr(device="cpu", utterances=8, seconds=5.0, tokens=24, batch_size=8, layers=12):
    use_repo_modules()
    from mmser.asr import transcribe
    set_threads()
    wavs = synthetic_utterances(utterances, seconds)
    with tempfile.TemporaryDirectory() as work_dir:
        asr = whisper_small(work_dir, tokens, layers, device)
    parameters = sum(p.numel() for p in asr[2].parameters())
    transcribe(wavs[:1], asr, batch_size)  # warm-up: the first call allocates and picks kernels
    synchronize(device)
    rss_loaded = rss_mb()
    reset_peak_rss()
    before = rss_mb()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    texts, empty = transcribe(wavs, asr, batch_size)
    synchronize(device)
    wall = time.perf_counter() - start
    windows = sum(int(np.ceil(len(w) / (30 * SAMPLE_RATE))) for w in wavs)
    result = {
        "device": str(device), "parameters": parameters, "layers": layers, "utterances": utterances,
        "seconds_each": seconds, "tokens_per_window": tokens, "batch_size": batch_size, "wall_s": round(wall, 3),
        "audio_s_per_wall_s": utterances * seconds / wall, "windows_per_wall_s": windows / wall,
        "rss_model_loaded_mb": rss_loaded, "peak_growth_mb": peak_rss_mb() - before,
        "transcribed": sum(1 for t in texts if t), "empty": len(empty),
    }
    if torch.device(device).type == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


def print_asr(result):
    print_table(f"speech recognition, Whisper-small size ({result['parameters'] / 1e6:.0f}M parameters, "
                f"{result['layers']}+{result['layers']} layers, random weights), {result['device']}", [
        {"measure": f"audio s per wall s ({result['utterances']} x {result['seconds_each']:g} s, "
                    f"{result['tokens_per_window']} tokens per window, batch {result['batch_size']})",
         "value": result["audio_s_per_wall_s"]},
        {"measure": "30-s windows per wall s", "value": result["windows_per_wall_s"]},
        {"measure": "resident set with the model loaded, MB", "value": result["rss_model_loaded_mb"]},
        {"measure": "peak growth while transcribing, MB", "value": result["peak_growth_mb"]},
    ], ["measure", "value"])


def main(argv=None):
    parser = device_arg(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each utterance")
    parser.add_argument("--tokens", type=int, default=24, help="tokens decoded per 30-s window")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per generate() call")
    parser.add_argument("--layers", type=int, default=12, help="encoder and decoder layers each (Whisper small: 12)")
    args = parser.parse_args(argv)
    result = bench_asr(args.device, args.utterances, args.seconds, args.tokens, args.batch_size, args.layers)
    print(machine_info(args.device))
    print_asr(result)
    return result


if __name__ == "__main__":
    main()
