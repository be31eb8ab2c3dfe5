"""A full-scale dry run on a GPU with random weights of the real sizes: transcription, layer means, training.

    python benchmarks/gpu_dry_run.py [--device cuda] [--quick] [--tiny] [--seconds-per-part 40]
                                     [--out gpu_dry_run.json]

Downloads nothing: the configurations of openai/whisper-large-v3, microsoft/wavlm-large and roberta-large
are built in code (REAL), with random weights, which cost what trained ones cost. The corpus is an
IEMOCAP-sized synthetic one held in memory: 5531 labelled utterances (--quick: 1000) whose lengths
follow IEMOCAP's (log-normal, mean about 4.5 s, 0.6 to 34 s; iemocap_lengths), tones in noise.
Parts, each timed on its own and each reported even when another fails (its traceback printed):
  peaks          dense matmul FLOP/s of fp32 (TF32 off, as layer means run), bf16, fp16 and int8
                 (common.measure_peak_flops), against which every share below is taken
  asr            asr.transcribe over the corpus, longest first in the step's batches, for at most
                 --seconds-per-part per backend: transformers in bf16, faster-whisper (CTranslate2,
                 where requirements-asr.txt is installed) in fp16; windows and audio seconds per
                 second, and the windows' FLOPs (bench_asr.whisper_flops_per_window, 24 tokens each)
                 over the peak of the precision
  layer_means    speech_encoders.layer_means of a WavLM-large, one utterance at a time in fp32 as the
                 speech-layers step runs it, for at most --seconds-per-part: audio seconds per
                 second and FLOPs (bench_speech.speech_flops_per_audio_second) over the fp32 peak
  training       one LOSO fold's training epoch under bf16 autocast (sessions 1-4 less 10%
                 validation: 3861 utterances, 242 batches of 16; --quick: 40 batches, the epoch
                 extrapolated): text RoBERTa-large fine-tuned, WavLM-large's cached (25, 1024) layer
                 means through the weighted layer sum, the context branch, by train_function's own
                 step (bench_train.train_steps); the epoch's seconds and MFU over the bf16 peak
It prints one table (and --out: a JSON file) with the GPU's name, the date and the load. About
5 minutes on one H200 (the Whisper folder is written once and converted once); --tiny runs every
part at toy sizes on a CPU in seconds (tests/test_benchmarks.py), to know the script runs.
"""
import argparse
import datetime
import json
import math
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from common import load_average, measure_peak_flops, print_table, set_threads, synchronize, use_repo_modules

SAMPLE_RATE, IEMOCAP_UTTERANCES, FOLD_UTTERANCES, BATCH_SIZE, ASR_TOKENS = 16000, 5531, 3861, 16, 24
REAL = {
    "whisper": "large-v3",  # bench_asr.WHISPER_SIZES
    "wavlm": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
              "feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": False},
    "roberta": "large",  # bench_train.TEXT_SIZES
}
TINY = {
    "whisper": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_mel_bins": 80,
                "vocab_size": 1000, "max_source_positions": 1500, "max_target_positions": 448},
    "wavlm": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "conv_dim": (32,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4},
    "roberta": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
}


def iemocap_lengths(n, seed=0):
    """Utterance lengths in seconds like IEMOCAP's: log-normal around 3.75 s (mean about 4.5 s),
    within IEMOCAP's 0.6 to 34 s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(math.log(3.75), 0.6, n), 0.6, 34.0)


def utterance(seconds, index, seed=0):
    """One synthetic utterance: a tone of its own pitch in noise."""
    rng = np.random.default_rng(seed + index)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * (110 + index % 200) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def measure_peaks(device, seconds=1.5):
    """{precision: FLOP/s} of a dense matmul; fp32 with TF32 off (vq_wav2vec.full_fp32_precision)."""
    use_repo_modules()
    from mmser.vq_wav2vec import full_fp32_precision
    with full_fp32_precision():
        peaks = {"fp32": measure_peak_flops(device, torch.float32, seconds=seconds)}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("int8", torch.int8)):
        if torch.device(device).type == "cpu" and name == "fp16":
            continue
        peaks[name] = measure_peak_flops(device, dtype, seconds=seconds)
    return peaks


def part_asr(device, lengths, sizes, work, budget_s, peaks):
    """Transcription by each backend over the corpus until `budget_s` (module docstring)."""
    use_repo_modules()
    import bench_asr
    from transformers import WhisperConfig

    from mmser import asr
    start = time.perf_counter()
    folder = bench_asr.write_random_whisper(Path(work) / "whisper", ASR_TOKENS, size=sizes["whisper"],
                                            init_device=device)
    written_s = time.perf_counter() - start
    flops = bench_asr.whisper_flops_per_window(WhisperConfig.from_pretrained(folder), ASR_TOKENS)["total"]
    gpu = torch.device(device).type == "cuda"
    runs = [("transformers", "bf16")]
    try:
        import ctranslate2  # noqa: F401
        runs.append(("faster-whisper", "fp16" if gpu else "int8"))
    except ImportError:
        print("asr: CTranslate2 not installed (pip install -r requirements-asr.txt): faster-whisper left out")
    rows = []
    for backend, precision in runs:
        row = {"part": f"asr {backend} {precision}", "model_written_s": round(written_s, 1)}
        try:
            start = time.perf_counter()
            model = asr.load_asr(str(folder), device, precision, backend, models_dir=work)
            row["load_s"] = round(time.perf_counter() - start, 1)  # faster-whisper: its conversion included
            asr.transcribe([utterance(2.0, 0)], model)  # warm-up
            synchronize(device)
            windows = audio = 0
            start = time.perf_counter()
            order = np.argsort(-lengths)  # as the transcripts step sorts the manifest
            chunk = 4 * model.batch_size
            for first in range(0, len(order), chunk):
                wavs = [utterance(lengths[i], int(i)) for i in order[first:first + chunk]]
                asr.transcribe(wavs, model)
                windows += sum(math.ceil(len(w) / (30 * SAMPLE_RATE)) for w in wavs)
                audio += sum(len(w) for w in wavs) / SAMPLE_RATE
                if time.perf_counter() - start > budget_s:
                    break
            synchronize(device)
            wall = time.perf_counter() - start
            peak = peaks.get(precision) or peaks["fp32"]
            row.update(utterances=min(first + chunk, len(order)), batch=model.batch_size, wall_s=round(wall, 1),
                       windows_per_s=windows / wall, audio_s_per_s=audio / wall,
                       gflop_per_window=flops / 1e9, peak_share=windows * flops / wall / peak,
                       corpus_hours_at_this_rate=lengths.sum() / (audio / wall) / 3600)
            del model
        except Exception:  # the dry run goes on: every part is reported, a failed one with its traceback
            row["error"] = traceback.format_exc(limit=3).strip().splitlines()[-1]
            traceback.print_exc()
        rows.append(row)
        if gpu:
            torch.cuda.empty_cache()
    return rows


def part_layer_means(device, lengths, sizes, budget_s, peaks):
    """WavLM-large layer means, one utterance at a time, until `budget_s` (module docstring)."""
    use_repo_modules()
    import bench_speech
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    from mmser import speech_encoders
    config = WavLMConfig(**sizes["wavlm"])
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(0)
        encoder = WavLMModel(config).eval()
    speech = speech_encoders.SpeechModel(encoder, Wav2Vec2FeatureExtractor(do_normalize=True,
                                                                          return_attention_mask=True), "wavlm")
    speech_encoders.layer_means(speech, utterance(2.0, 0))  # warm-up
    synchronize(device)
    done = audio = flops = 0
    start = time.perf_counter()
    for i in np.random.default_rng(1).permutation(len(lengths)):
        speech_encoders.layer_means(speech, utterance(lengths[i], int(i)))
        done, audio = done + 1, audio + lengths[i]
        flops += bench_speech.speech_flops_per_audio_second(config, lengths[i]) * lengths[i]
        if time.perf_counter() - start > budget_s:
            break
    synchronize(device)
    wall = time.perf_counter() - start
    return [{"part": f"layer means WavLM {config.num_hidden_layers}x{config.hidden_size} fp32", "utterances": done, "wall_s": round(wall, 1),
             "audio_s_per_s": audio / wall, "peak_share": flops / wall / peaks["fp32"],
             "corpus_hours_at_this_rate": lengths.sum() / (audio / wall) / 3600}]


def part_training(device, sizes, steps, peaks):
    """One LOSO fold's epoch under bf16 autocast (module docstring)."""
    use_repo_modules()
    import bench_speech
    import bench_train
    from mmser.model_structure import EmotionClassifier
    from mmser.speech_encoders import SpeechLayerSum
    text = sizes["roberta"]
    if isinstance(text, dict):  # a toy size
        bench_train.TEXT_SIZES["toy"], text = text, "toy"
    layers, hidden = sizes["wavlm"]["num_hidden_layers"] + 1, sizes["wavlm"]["hidden_size"]
    torch.manual_seed(0)
    model = EmotionClassifier(text_encoder=bench_train.roberta(text, bench_train.TEXT_VOCAB),
                              speech_layer_sum=SpeechLayerSum(layers, hidden),
                              context_window=bench_train.CONTEXT_WINDOW, context_width=bench_train.SENTENCE_WIDTH,
                              finetune_text=True)
    n = BATCH_SIZE * (steps + 2) * 2
    utterances = bench_train.synthetic_utterances(n, ("text", "context"))
    for u, cached in zip(utterances, bench_speech.layer_utterances(n, layers, hidden)):
        u["speech_layers"] = cached["speech_layers"]
    result = bench_train.train_steps(model, utterances, device, torch.bfloat16, group_by_length=True,
                                     steps=steps, warmup=2)
    batches = math.ceil(FOLD_UTTERANCES / BATCH_SIZE)
    return [{"part": f"training text RoBERTa-{text} + WavLM layer means + context, bf16", "steps": steps,
             "step_s": result["mean_step_s"], "epoch_s": result["mean_step_s"] * batches,
             "samples_per_s": result["samples_per_s"], "peak_share": result["achieved_gflops"] * 1e9 / peaks["bf16"],
             "data_wait_share": result["data_wait_share"]}]


def dry_run(device="cuda", quick=False, tiny=False, seconds_per_part=40.0, seed=0):
    """-> {"machine": ..., "peaks_tflops": ..., "parts": [rows]} (module docstring)."""
    use_repo_modules()
    set_threads()
    sizes = TINY if tiny else REAL
    lengths = iemocap_lengths(40 if tiny else 1000 if quick else IEMOCAP_UTTERANCES, seed)
    gpu = torch.device(device).type == "cuda"
    machine = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "device": str(device), "gpu": torch.cuda.get_device_name(device) if gpu else None,
               "torch": torch.__version__, "cuda": torch.version.cuda, "load_average": load_average(),
               "corpus_utterances": len(lengths), "corpus_hours": float(lengths.sum() / 3600),
               "mean_utterance_s": float(lengths.mean())}
    started = time.perf_counter()
    parts, peaks = [], {}
    try:
        peaks = measure_peaks(device, seconds=0.2 if tiny else 1.5)
    except Exception:
        traceback.print_exc()
        parts.append({"part": "peaks", "error": traceback.format_exc(limit=3).strip().splitlines()[-1]})
    budget = 2.0 if tiny else seconds_per_part
    steps = 2 if tiny else 40 if quick else math.ceil(FOLD_UTTERANCES / BATCH_SIZE)
    with tempfile.TemporaryDirectory(prefix="gpu_dry_run_") as work:
        for name, run in (("asr", lambda: part_asr(device, lengths, sizes, work, budget, peaks)),
                          ("layer means", lambda: part_layer_means(device, lengths, sizes, budget, peaks)),
                          ("training", lambda: part_training(device, sizes, steps, peaks))):
            start = time.perf_counter()
            try:
                rows = run()
            except Exception:  # the dry run goes on: every part is reported, a failed one with its traceback
                traceback.print_exc()
                rows = [{"part": name, "error": traceback.format_exc(limit=3).strip().splitlines()[-1]}]
            for row in rows:
                row["part_s"] = round(time.perf_counter() - start, 1)
            parts += rows
            if gpu:
                torch.cuda.empty_cache()
    machine["seconds"] = round(time.perf_counter() - started, 1)
    machine["load_average_after"] = load_average()
    return {"machine": machine, "peaks_tflops": {k: v / 1e12 for k, v in peaks.items()}, "parts": parts}


def print_dry_run(result):
    machine = result["machine"]
    print(f"\n{machine['gpu'] or machine['device']}, {machine['date']}, torch {machine['torch']} (CUDA "
          f"{machine['cuda']}), load {machine['load_average']}; corpus {machine['corpus_utterances']} utterances, "
          f"{machine['corpus_hours']:.2f} h, mean {machine['mean_utterance_s']:.2f} s; {machine['seconds']} s in all")
    print("peak TFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in result["peaks_tflops"].items()))
    columns = ["part", "utterances", "steps", "batch", "windows_per_s", "audio_s_per_s", "step_s", "epoch_s",
               "peak_share", "corpus_hours_at_this_rate", "load_s", "part_s", "error"]
    print_table("GPU dry run (random weights, real sizes)", result["parts"], columns)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="1000 utterances, 40 training steps")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, 40 utterances: checks the script runs")
    parser.add_argument("--seconds-per-part", type=float, default=40.0,
                        help="the most seconds each transcription backend and the layer means run")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = dry_run(args.device, args.quick, args.tiny, args.seconds_per_part)
    print_dry_run(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
