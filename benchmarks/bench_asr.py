"""Speech recognition against the compute-bound limit: each backend and precision side by side.

    python benchmarks/bench_asr.py [--device cpu|cuda] [--utterances 8] [--seconds 5] [--tokens 24]
                                   [--batch-size N] [--layers 12] [--size small|large-v3]
                                   [--runs transformers:fp32 transformers:bf16 faster-whisper:int8 ...]

Writes only into a temporary folder. The model is WhisperForConditionalGeneration at openai/whisper-small's
sizes (d_model 768, 12 encoder and 12 decoder layers, 12 heads, FFN 3072, 80 mel bins, a 51865-token
vocabulary: 242M parameters; --size large-v3: 1280, 32 + 32 layers, 20 heads, 5120, 128 mel bins,
51866 tokens, 1.55G) with random weights, which cost what trained ones cost, saved as a Hugging Face
folder (tiny_models.write_tiny_whisper's tokenizer, feature extractor and generation config) and run
through asr.load_asr and asr.transcribe exactly as the transcripts step runs them (English,
transcribe, greedy, no timestamps, 30-s windows, longest first, batches sized to memory unless
--batch-size), once per run of --runs: backend:precision, by default transformers in fp32 (the
transcripts of before, unchanged), transformers in bf16 where the hardware computes it (a GPU; a
CPU with bf16 instructions, utils.cpu_has_native_bf16), and faster-whisper (CTranslate2, where
requirements-asr.txt is installed) at its default (int8 on a CPU, fp16 on a GPU); its one-time
conversion into MODELS_DIR is timed apart.

A random model never ends a transcript by itself, so each window decodes exactly --tokens tokens
(end of text suppressed, max_new_tokens = --tokens): 24 is about what a 5-s IEMOCAP utterance
(around 12 words) takes, with room to spare; a real model stops where the speech does. The ids the
tiny tokenizer has no word for are suppressed too (the output projection keeps the real vocabulary).

Figures per run, over --utterances synthetic utterances of --seconds s each (tones in noise), timed
after an untimed warm-up batch of the same shape:
  audio s per wall s, 30-s windows per wall s, decoded tokens per wall s;
  padding share      1 - audio seconds / (windows x 30 s): the part of every window's encoder
                     work spent on Whisper's padding (5/6 for a 5-s utterance);
  limit share        windows x FLOPs per window / wall / peak: the FLOPs per window from the config
                     (whisper_flops_per_window), the peak a dense matmul of the run's precision
                     measured in the same run (common.measure_peak_flops; int8: torch._int_mm), the
                     higher of before and after;
  useful share       limit share x (1 - padding share): the part of the limit that hears audio;
  same text as fp32 the share of utterances whose text is the transformers fp32 run's;
  memory             the resident set with the model loaded and its peak growth while transcribing
                     (common.peak_rss_mb; torch.cuda.max_memory_allocated on a GPU).
The random Whisper-small says every window alike (its encoder output is mostly its position
embeddings), so the words are compared on a corpus too (--corpus-dialogues, 0: not): the same runs
over fixtures.synthetic_iemocap's corpus with the tests' tiny random Whisper (its words are the
corpus's, in random order), each scored by asr.word_errors against the reference transcripts and
against the transformers fp32 run's texts, with the share of identical texts and the mean share of
each text's words before its first difference from fp32's. With random weights the WER against fp32
is no accuracy: a random model's next-token scores are near ties everywhere, so a rounding change
flips a token and, greedy decoding feeding on itself, every token after it. It bounds how much a
precision moves the decoding, not what it costs a trained Whisper, which no test here has.
"""
import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import (device_arg, machine_info, measure_peak_flops, peak_rss_mb, print_table, reset_peak_rss, rss_mb,
                    set_threads, synchronize, use_repo_modules)

WHISPER_SIZES = {
    "small": {"d_model": 768, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 12,
              "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072,
              "num_mel_bins": 80, "vocab_size": 51865, "max_source_positions": 1500, "max_target_positions": 448},
    "large-v3": {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "encoder_attention_heads": 20,
                 "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120,
                 "num_mel_bins": 128, "vocab_size": 51866, "max_source_positions": 1500, "max_target_positions": 448},
}
WHISPER_SMALL = WHISPER_SIZES["small"]
SAMPLE_RATE, WINDOW_S, PROMPT_TOKENS = 16000, 30, 4
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def synthetic_utterances(n, seconds, seed=0):
    """Tones of different pitch in noise: something to hear, the same for every run."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return [(0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
            for i in range(n)]


def write_random_whisper(out_dir, tokens, layers=None, size="small", seed=0, init_device="cpu"):
    """A Hugging Face Whisper folder at `size` (WHISPER_SIZES, or a dict of WhisperConfig sizes;
    layers: fewer encoder and decoder layers of the same width) with random weights (drawn on
    `init_device`: a GPU draws large-v3's 1.5G in a moment) and the tiny Whisper's tokenizer,
    feature extractor (with the size's mel bins) and generation config, decoding exactly `tokens`
    tokens per window. -> path."""
    use_repo_modules()
    from transformers import (AutoTokenizer, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration)

    from fixtures.tiny_models import write_tiny_whisper
    from mmser.utils import quiet_transformers
    out_dir = Path(out_dir)
    tiny = write_tiny_whisper(out_dir.parent / f".{out_dir.name}-tiny")
    with quiet_transformers():
        tiny_model = WhisperForConditionalGeneration.from_pretrained(tiny)
        ids = {k: getattr(tiny_model.config, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                          "decoder_start_token_id")}
        shape = dict(WHISPER_SIZES[size] if isinstance(size, str) else size)
        if layers:
            shape.update(encoder_layers=layers, decoder_layers=layers)
        config = WhisperConfig(**shape, **ids)
        with torch.random.fork_rng(), torch.device(init_device):
            torch.manual_seed(seed)
            model = WhisperForConditionalGeneration(config).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        generation = tiny_model.generation_config
        generation.max_new_tokens = tokens
        # Never the end of text, nor an id the tiny tokenizer has no word for (the output projection
        # keeps its real size): every token decoded is a word piece, so the texts can be compared.
        generation.suppress_tokens = [ids["eos_token_id"]] + list(range(len(tokenizer), config.vocab_size))
        generation.begin_suppress_tokens = None
        model.generation_config = generation
        # As openai's folders hold them: float16 for large-v3 (3 GB instead of 6), float32 for small.
        model.to(torch.float16 if size == "large-v3" else torch.float32).save_pretrained(out_dir)
        del model
        tokenizer.save_pretrained(out_dir)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    return out_dir


def whisper_flops_per_window(config, new_tokens, prompt_tokens=PROMPT_TOKENS):
    """Forward FLOPs of one 30-s window (2 per multiply-add), from the model's config:
      encoder  conv1 2*mels*d*3*3000 + conv2 2*d*d*3*1500
               + per layer 2*(4d^2 + 2dF)*T + 4*d*T^2               (T = 1500 frames)
      decoder  the cross-attention keys and values once: per layer 2*2d^2*T
               per token fed (the prompt and every generated token but the last), per layer
               2*(4d^2 + 2d^2 + 2dF) (self-attention, cross-attention's query and output, FFN)
               + 4*d*(position + 1) (self-attention) + 4*d*T (cross-attention),
               and the output projection 2*d*V (transformers scores the prompt's positions too)
    -> {"encoder", "decoder", "total", "attention"}: the 4*d*... terms are "attention" (torch's
    FlopCounterMode counts everything else, tests/test_benchmarks.py)."""
    d, frames, mels = config.d_model, config.max_source_positions, config.num_mel_bins
    encoder_attention = config.encoder_layers * 4 * d * frames * frames
    encoder = 2 * mels * d * 3 * 2 * frames + 2 * d * d * 3 * frames + encoder_attention
    encoder += config.encoder_layers * 2 * (4 * d * d + 2 * d * config.encoder_ffn_dim) * frames
    decoder, decoder_attention = config.decoder_layers * 2 * 2 * d * d * frames, 0
    for position in range(prompt_tokens + new_tokens - 1):
        decoder += config.decoder_layers * 2 * (6 * d * d + 2 * d * config.decoder_ffn_dim) + 2 * d * config.vocab_size
        decoder_attention += config.decoder_layers * (4 * d * (position + 1) + 4 * d * frames)
    decoder += decoder_attention
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder,
            "attention": encoder_attention + decoder_attention}


def default_runs(device="cpu"):
    """backend:precision pairs the benchmark compares (module docstring)."""
    use_repo_modules()
    from mmser import asr
    runs = ["transformers:fp32"]
    if asr.asr_precision("transformers", device, "auto") != "fp32":
        runs.append(f"transformers:{asr.asr_precision('transformers', device, 'auto')}")
    try:
        import ctranslate2  # noqa: F401
        runs.append(f"faster-whisper:{asr.asr_precision('faster-whisper', device, 'auto')}")
    except ImportError:
        pass
    return runs


def _measure(asr, wavs, device):
    """(texts, wall seconds, resident set loaded MB, peak growth MB, cuda peak MB or None)."""
    from mmser.asr import transcribe
    # Warm-up with a whole batch: oneDNN builds its bf16 kernels for each new shape (a batch of 1
    # first made the batch of 8 after it run at a third of its speed).
    transcribe(wavs[:asr.batch_size], asr)
    synchronize(device)
    gc.collect()
    rss_loaded = rss_mb()
    reset_peak_rss()
    before = rss_mb()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    texts, _ = transcribe(wavs, asr)
    synchronize(device)
    wall = time.perf_counter() - start
    return (texts, wall, rss_loaded, peak_rss_mb() - before,
            torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None)


def bench_asr(device="cpu", utterances=8, seconds=5.0, tokens=24, batch_size=None, layers=None, size="small",
              runs=None, peak_seconds=1.5, seed=0, corpus_dialogues=2):
    """-> {"runs": [one dict of figures per backend:precision], the shared figures} (module docstring)."""
    use_repo_modules()
    from transformers import WhisperConfig

    from mmser import asr as asr_module
    set_threads()
    device = str(device)
    runs = list(runs or default_runs(device))
    wavs = synthetic_utterances(utterances, seconds, seed)
    windows = sum(int(np.ceil(len(w) / (WINDOW_S * SAMPLE_RATE))) for w in wavs)
    audio_s = sum(len(w) for w in wavs) / SAMPLE_RATE
    padding_share = 1 - audio_s / (windows * WINDOW_S)
    results, reference = [], None
    with tempfile.TemporaryDirectory(prefix="bench_asr_") as work:
        folder = write_random_whisper(Path(work) / f"whisper-{size}", tokens, layers, size, seed)
        config = WhisperConfig.from_pretrained(folder)
        flops = whisper_flops_per_window(config, tokens)
        parameters = None
        peaks = {}
        for run in runs:
            backend, precision = run.split(":")
            dtype = PEAK_DTYPES[precision]
            peak_before = measure_peak_flops(device, dtype, seconds=peak_seconds)
            start = time.perf_counter()
            asr = asr_module.load_asr(str(folder), device, precision, backend, models_dir=work)
            load_s = time.perf_counter() - start
            asr.batch_size = batch_size or asr.batch_size
            if backend == "transformers" and parameters is None:
                parameters = sum(p.numel() for p in asr.model.parameters())
            texts, wall, rss_loaded, growth, cuda_peak = _measure(asr, wavs, device)
            batch = asr.batch_size
            del asr
            gc.collect()
            peak = max(peak_before, measure_peak_flops(device, dtype, seconds=peak_seconds))
            peaks[precision] = max(peak, peaks.get(precision, 0.0))
            if reference is None and run == "transformers:fp32":
                reference = texts
            limit_share = windows * flops["total"] / wall / peak
            results.append({
                "backend": backend, "precision": precision, "batch_size": batch, "wall_s": wall,
                "load_s": round(load_s, 2),  # faster-whisper: its one-time conversion included
                "audio_s_per_wall_s": audio_s / wall, "windows_per_wall_s": windows / wall,
                "tokens_per_wall_s": windows * tokens / wall,
                "peak_gflops": peak / 1e9, "limit_share": limit_share, "useful_share": limit_share * (1 - padding_share),
                "same_text_as_fp32": (float(np.mean([a == b for a, b in zip(texts, reference)]))
                                      if reference is not None else None),
                "rss_model_loaded_mb": rss_loaded, "peak_growth_mb": growth, "cuda_peak_allocated_mb": cuda_peak,
                "transcribed": sum(1 for t in texts if t)})
    base = next((r for r in results if (r["backend"], r["precision"]) == ("transformers", "fp32")), results[0])
    for r in results:
        r["speedup_vs_fp32"] = r["audio_s_per_wall_s"] / base["audio_s_per_wall_s"]
    return {
        "device": device, "size": size, "parameters": parameters, "layers": layers or WHISPER_SIZES[size]["encoder_layers"],
        "utterances": utterances, "seconds_each": seconds, "tokens_per_window": tokens, "windows": windows,
        "padding_share": padding_share, "gflop_per_window": flops["total"] / 1e9,
        "gflop_per_window_encoder": flops["encoder"] / 1e9, "gflop_per_window_decoder": flops["decoder"] / 1e9,
        "peak_gflops": {k: v / 1e9 for k, v in peaks.items()}, "runs": results,
        # The headline figures of before (run_all.py): transformers in fp32, the same computation.
        "audio_s_per_wall_s": base["audio_s_per_wall_s"], "windows_per_wall_s": base["windows_per_wall_s"],
        "rss_model_loaded_mb": base["rss_model_loaded_mb"], "peak_growth_mb": base["peak_growth_mb"],
        "best_audio_s_per_wall_s": max(r["audio_s_per_wall_s"] for r in results),
        "corpus": corpus_words(runs, device, corpus_dialogues, seed) if corpus_dialogues else None,
    }


def corpus_words(runs, device="cpu", dialogues=2, seed=0):
    """The runs' texts of fixtures.synthetic_iemocap's corpus (`dialogues` of 10 utterances per
    session) by the tests' tiny Whisper, scored against the references and the fp32 run (docstring)."""
    use_repo_modules()
    import soundfile as sf

    from fixtures import synthetic_iemocap
    from fixtures.tiny_models import write_tiny_whisper
    from mmser import asr as asr_module
    with tempfile.TemporaryDirectory(prefix="bench_asr_corpus_") as work:
        root = Path(work) / "IEMOCAP"
        truth = synthetic_iemocap.make_corpus(root, seed=seed, dialogues_per_session=dialogues,
                                              utterances_per_dialogue=10)["utterances"]
        references = [u["transcript"] for u in truth]
        wavs = [sf.read(str(root / u["wav"]), dtype="float32")[0] for u in truth]
        whisper = write_tiny_whisper(Path(work) / "tiny-whisper", references, seed=seed)
        texts = {}
        for run in runs:
            backend, precision = run.split(":")
            texts[run] = asr_module.transcribe(wavs, asr_module.load_asr(str(whisper), device, precision, backend,
                                                                          models_dir=work))[0]
    fp32 = texts.get("transformers:fp32")

    def agreeing_prefix(text, reference):
        a, b = text.split(), reference.split()
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return same / max(len(b), 1)

    rows = []
    for run, heard in texts.items():
        backend, precision = run.split(":")
        rows.append({"backend": backend, "precision": precision,
                     "wer_vs_reference": asr_module.word_errors(references, heard)["wer"],
                     "wer_vs_fp32": asr_module.word_errors(fp32, heard)["wer"] if fp32 else None,
                     "same_text_as_fp32": float(np.mean([a == b for a, b in zip(heard, fp32)])) if fp32 else None,
                     "agreeing_prefix_share": (float(np.mean([agreeing_prefix(a, b) for a, b in zip(heard, fp32)]))
                                               if fp32 else None)})
    return {"utterances": len(references), "words": asr_module.word_errors(references, references)["words"],
            "runs": rows}


def print_asr(result):
    print_table(f"speech recognition, Whisper-{result['size']} size ({(result['parameters'] or 0) / 1e6:.0f}M "
                f"parameters, {result['layers']}+{result['layers']} layers, random weights), {result['device']}: "
                f"{result['utterances']} x {result['seconds_each']:g} s, {result['tokens_per_window']} tokens per "
                f"window, {result['gflop_per_window']:.0f} GFLOP per window (encoder "
                f"{result['gflop_per_window_encoder']:.0f}, decoder {result['gflop_per_window_decoder']:.0f}), "
                f"padding {result['padding_share']:.2f} of each window", [
        {"run": f"{r['backend']} {r['precision']}", "batch": r["batch_size"], "audio s/s": r["audio_s_per_wall_s"],
         "windows/s": r["windows_per_wall_s"], "tokens/s": r["tokens_per_wall_s"], "x fp32": r["speedup_vs_fp32"],
         "peak GFLOP/s": r["peak_gflops"], "limit share": r["limit_share"], "useful share": r["useful_share"],
         "same text as fp32": r["same_text_as_fp32"], "load s": r["load_s"], "RSS MB": r["rss_model_loaded_mb"],
         "growth MB": r["peak_growth_mb"]} for r in result["runs"]])
    if result.get("corpus"):
        corpus = result["corpus"]
        print_table(f"the same runs on the synthetic IEMOCAP corpus ({corpus['utterances']} utterances, "
                    f"{corpus['words']} reference words) with the tiny random Whisper of the tests", [
            {"run": f"{r['backend']} {r['precision']}", "WER vs reference": r["wer_vs_reference"],
             "WER vs fp32": r["wer_vs_fp32"], "same text as fp32": r["same_text_as_fp32"],
             "words before the first difference": r["agreeing_prefix_share"]} for r in corpus["runs"]])
        print("random weights: WER vs fp32 bounds how far a precision moves greedy decoding (one flipped near-tie "
              "changes every word after it), not what it costs a trained Whisper (bench_asr.py's docstring)")


def main(argv=None):
    parser = device_arg(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each utterance")
    parser.add_argument("--tokens", type=int, default=24, help="tokens decoded per 30-s window")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per generate() call (default: the "
                        "transcripts step's, sized to memory)")
    parser.add_argument("--layers", type=int, default=None, help="encoder and decoder layers each (default: the size's)")
    parser.add_argument("--size", choices=sorted(WHISPER_SIZES), default="small")
    parser.add_argument("--runs", nargs="+", default=None, metavar="BACKEND:PRECISION",
                        help="default: transformers:fp32, transformers:bf16 where the hardware has it, faster-whisper "
                             "at its default where CTranslate2 is installed")
    parser.add_argument("--corpus-dialogues", type=int, default=2,
                        help="dialogues of 10 utterances per session (at least 2) of the synthetic corpus whose words the runs "
                             "are compared on (0: none)")
    args = parser.parse_args(argv)
    result = bench_asr(args.device, args.utterances, args.seconds, args.tokens, args.batch_size, args.layers,
                       args.size, args.runs, corpus_dialogues=args.corpus_dialogues)
    print(machine_info(args.device))
    print_asr(result)
    return result


if __name__ == "__main__":
    main()
