"""A recording's whole timeline: audio seconds per wall second, with the tiny models and with a
Whisper-small-sized speech recognizer.

    python benchmarks/bench_timeline.py [--device cpu|cuda] [--minutes 2] [--tokens 24] [--layers 12]
                                        [--run-dir DEMO_RUN]

The run is the demo's (`python main.py --demo`, built into a temporary folder unless --run-dir names
one): tiny text, sentence and speech models, the context branch with its window. The recording is
tests/data/conversation's 77-s conversation (espeak-ng speech, two voices) repeated up to --minutes,
so Silero VAD finds real segments all along. Each configuration runs api.Recognizer.timeline on it
from the file to the last prediction (voice activity, cutting each segment from the stream, speech
recognition, speech tokens, text tokens, sentence embeddings and context, the model), after the
run, the VAD and the ASR model are loaded and one warm-up timeline of the first 10 s:
  tiny            the demo's run with tiny_models.write_tiny_whisper as the ASR model
  whisper-small   the same run with a random Whisper at openai/whisper-small's sizes (242M
                  parameters at 12+12 layers; bench_asr.WHISPER_SMALL) as the ASR model
Both recognizers are random, so neither ends a transcript by itself: each segment decodes exactly
--tokens tokens (end of text suppressed), about what a real model writes for a 5-s sentence.
Whisper pads every segment to a 30-s window, so its cost per segment hardly depends on the segment's
length. Also measured: the voice activity alone (segmentation.segment_recording) on the same file,
and each run's peak resident-set growth (flat in the recording's length: tests/test_timeline.py).
--device cuda runs the run's models and Whisper on the GPU (the VAD stays on the CPU, one thread).
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from common import (REPO, device_arg, load_average, machine_info, peak_rss_mb, print_table, reset_peak_rss, rss_mb,
                    set_threads, synchronize, use_repo_modules)

CONVERSATION = REPO / "tests" / "data" / "conversation" / "conversation.flac"


def repeated_conversation(path, minutes):
    """The conversation repeated up to `minutes`, written block by block."""
    samples, rate = sf.read(CONVERSATION, dtype="float32")
    total = int(minutes * 60 * rate)
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for start in range(0, total, len(samples)):
            f.write(samples[:min(len(samples), total - start)])
    return path


def demo_run(folder):
    """`python main.py --demo FOLDER`, in a process of its own (about 20 s on 2 cores)."""
    subprocess.run([sys.executable, str(REPO / "main.py"), "--demo", str(folder), "--device", "cpu"], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    return folder


def limit_tokens(folder, tokens):
    """A random Whisper folder's generation config set to decode exactly `tokens` tokens a window."""
    from transformers import GenerationConfig
    generation = GenerationConfig.from_pretrained(folder)
    generation.max_length = 4 + tokens  # <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
    generation.suppress_tokens = [generation.eos_token_id]
    generation.begin_suppress_tokens = None
    generation.save_pretrained(folder)
    return folder


def whisper_small_folder(folder, tokens, layers=12, seed=0):
    """A random Whisper at whisper-small's sizes (bench_asr.WHISPER_SMALL; `layers` encoder and decoder
    layers) saved as a model folder, with the tiny Whisper's tokenizer and feature extractor."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from bench_asr import WHISPER_SMALL
    from fixtures.tiny_models import write_tiny_whisper
    from mmser.utils import quiet_transformers
    write_tiny_whisper(folder)  # tokenizer, feature extractor, generation config; its model is replaced
    tiny, generation = WhisperConfig.from_pretrained(folder), GenerationConfig.from_pretrained(folder)
    ids = {k: getattr(tiny, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")}
    config = WhisperConfig(**{**WHISPER_SMALL, "encoder_layers": layers, "decoder_layers": layers}, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    model.generation_config = generation  # the languages and tasks generate() is asked for
    with quiet_transformers():
        model.save_pretrained(folder)
    return limit_tokens(folder, tokens)


def parameter_count(folder):
    """Parameters of a saved model folder's weights (model.safetensors)."""
    from safetensors import safe_open
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as weights:
        return sum(int(np.prod(weights.get_slice(k).get_shape())) for k in weights.keys())


def timed_timeline(recognizer, recording, device):
    """(seconds, the timeline, peak resident-set growth in MB) of one whole timeline."""
    reset_peak_rss()
    before = rss_mb()
    synchronize(device)
    start = time.perf_counter()
    result = recognizer.timeline(recording)
    synchronize(device)
    return time.perf_counter() - start, result, peak_rss_mb() - before


def bench_timeline(device="cpu", minutes=2.0, tokens=24, layers=12, run_dir=None):
    use_repo_modules()
    from fixtures.tiny_models import write_tiny_whisper
    from mmser.api import Recognizer
    from mmser.segmentation import load_vad, segment_recording
    set_threads()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        run_dir = Path(run_dir) if run_dir else demo_run(work / "demo_run")
        recording = repeated_conversation(work / f"{minutes:g}min.flac", minutes)
        warm = repeated_conversation(work / "warm.flac", 10 / 60)
        seconds = sf.info(str(recording)).duration
        load_vad()
        start = time.perf_counter()
        vad_segments = segment_recording(recording, progress=False)
        vad_wall = time.perf_counter() - start
        asr_models = {"tiny": limit_tokens(write_tiny_whisper(work / "tiny-whisper"), tokens),
                      "whisper-small": whisper_small_folder(work / "whisper-small", tokens, layers)}
        for name, asr_model in asr_models.items():
            recognizer = Recognizer(run_dir, device=device, asr_model=asr_model)
            recognizer.run.asr()  # loaded before the clock starts, as the run's models are
            recognizer.timeline(warm)  # warm-up: first calls allocate and pick kernels
            wall, result, growth = timed_timeline(recognizer, recording, device)
            parameters = parameter_count(asr_model)
            predicted = sum(s["prediction"] is not None for s in result["segments"])
            rows.append({"asr": name, "asr_parameters_m": round(parameters / 1e6, 1),
                         "segments": len(result["segments"]), "predicted": predicted, "wall_s": round(wall, 2), "audio_s_per_wall_s": seconds / wall,
                         "peak_rss_growth_mb": growth, "rss_mb": rss_mb()})
            del recognizer
    return {"device": str(device), "minutes": minutes, "audio_s": seconds, "tokens_per_segment": tokens,
            "layers": layers, "vad_segments": len(vad_segments), "vad_wall_s": round(vad_wall, 2),
            "vad_audio_s_per_wall_s": seconds / vad_wall, "runs": rows, "load_average": load_average(),
            "audio_s_per_wall_s": {row["asr"]: row["audio_s_per_wall_s"] for row in rows}}


def print_timeline(result):
    print_table(f"a recording's whole timeline ({result['audio_s']:.0f} s of the repeated conversation, "
                f"{result['tokens_per_segment']} tokens per segment), {result['device']}; voice activity alone: "
                f"{result['vad_audio_s_per_wall_s']:.3g} audio s per wall s ({result['vad_segments']} segments); "
                f"load average {result['load_average']}", result["runs"])


def main(argv=None):
    parser = device_arg(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--minutes", type=float, default=2.0, help="length of the recording")
    parser.add_argument("--tokens", type=int, default=24, help="tokens decoded per segment")
    parser.add_argument("--layers", type=int, default=12, help="Whisper's encoder and decoder layers (small: 12)")
    parser.add_argument("--run-dir", help="a demo run to use (default: python main.py --demo into a temporary folder)")
    args = parser.parse_args(argv)
    result = bench_timeline(args.device, args.minutes, args.tokens, args.layers, args.run_dir)
    print(machine_info(args.device))
    print_timeline(result)
    return result


if __name__ == "__main__":
    main()
