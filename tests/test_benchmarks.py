"""The benchmark functions at toy sizes: their figures follow the documented formulas from what
they measured, memory grows where the docstrings say, bf16 is left out on a CPU without it.

No timing is asserted: the clocks and the matmul peak are replaced by fixed figures where a
formula is checked, so the checks hold on a busy machine.
"""
import inspect
import io
import math
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_asr  # noqa: E402
import bench_extraction  # noqa: E402
import bench_shard  # noqa: E402
import bench_speech  # noqa: E402
import bench_train  # noqa: E402
import bench_vq  # noqa: E402
import common  # noqa: E402
import run_all  # noqa: E402
from mmser import utils  # noqa: E402

TOY_CONV = [(16, 10, 5), (16, 8, 4)] + [(16, 4, 2)] * 3 + [(16, 1, 1)] * 3
TOY_ROBERTA = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture
def toy_training(monkeypatch):
    """bench_train at toy sizes: RoBERTa-base shrunk to one narrow layer, small vocabularies, and the
    suite's one thread (the benchmark would take every core, which tiny models only slow down)."""
    monkeypatch.setitem(bench_train.TEXT_SIZES, "base", TOY_ROBERTA)
    monkeypatch.setattr(bench_train, "TEXT_VOCAB", 1000)
    monkeypatch.setattr(bench_train, "SPEECH_VOCAB", 1000)
    monkeypatch.setattr(bench_train, "set_threads", lambda: None)


def fixed_clock(times):
    """A stand-in for common.timed: runs fn once (the code path is real) and reports the next of `times`."""
    times = iter(times)

    def timed(fn, device="cpu", repeat=3, warmup=1):
        fn()
        return next(times)
    return timed


def fixed_peaks(values, calls=None):
    """A stand-in for common.measure_peak_flops: the next of `values`, per dtype; records each call's dtype."""
    values = {dtype: iter(v) for dtype, v in values.items()}

    def measure_peak_flops(device="cpu", dtype=torch.float32, n=None, seconds=1.5):
        if calls is not None:
            calls.append(dtype)
        return next(values[dtype])
    return measure_peak_flops


def test_conv_flops_of_the_real_stack_are_about_5_gflop_per_audio_second():
    assert 4.9e9 < bench_vq.conv_flops_per_audio_second() < 5.1e9


def test_vq_ratio_is_measured_throughput_over_the_limit_of_the_measured_peak(monkeypatch):
    monkeypatch.setattr(bench_vq, "set_threads", lambda: None)
    monkeypatch.setattr(bench_vq, "timed", fixed_clock([[0.5, 0.25], [0.2, 0.3], [0.05, 0.1]]))
    monkeypatch.setattr(bench_vq, "measure_peak_flops", fixed_peaks({torch.float32: [2e11, 1e11]}))
    result = bench_vq.bench_vq(seconds=2.0, repeat=2, memory_seconds=(0.5,), conv_layers=TOY_CONV)
    flops = bench_vq.conv_flops_per_audio_second(TOY_CONV)
    limit = 2e11 / flops  # the higher peak of before and after, audio s per wall s
    assert result["audio_s_per_wall_s"] == pytest.approx(2.0 / 0.25)  # the fastest codes() call
    assert result["limit_audio_s_per_wall_s"] == pytest.approx(limit)
    assert result["vq_limit_ratio"] == pytest.approx(2.0 / 0.25 / limit)
    assert result["conv_only_limit_ratio"] == pytest.approx(2.0 / 0.2 / limit)
    assert result["quantizer_share"] == pytest.approx(0.05 / 0.25)
    assert result["peak_gflops_fp32_before_after"] == [200.0, 100.0]


def test_vq_peak_memory_grows_with_the_utterance_length(monkeypatch):
    monkeypatch.setattr(bench_vq, "set_threads", lambda: None)
    monkeypatch.setattr(bench_vq, "measure_peak_flops", fixed_peaks({torch.float32: [1e11, 1e11]}))
    result = bench_vq.bench_vq(seconds=0.2, repeat=1, memory_seconds=(0.5, 4.0))  # the real conv stack
    short, long = result["peak_memory_by_length"]
    assert (short["audio_s"], long["audio_s"]) == (0.5, 4.0)
    # The 512-wide activations add about 15 MB per audio second to a fixed part: 8x the audio, over 3x the peak.
    assert long["peak_growth_mb"] > 2 * short["peak_growth_mb"] > 0


def test_extraction_memory_runs_in_a_fresh_process_over_the_whole_corpus(tmp_path):
    data_dir, rows = bench_extraction.make_data_dir(tmp_path, 100)
    models_dir = bench_extraction.make_models_dir(tmp_path, data_dir, rows, fit_wavs=20)
    result = bench_extraction.extraction_peak_memory(data_dir, models_dir)
    seconds = [sf.info(str(p)).frames / 16000 for p in sorted((data_dir / "Audio").glob("*.wav"))]
    assert result["utterances"] == len(rows) and result["with_audio"] == len(seconds) > 0
    assert result["audio_s_total"] == pytest.approx(sum(seconds))
    assert result["longest_utterance_s"] == pytest.approx(max(seconds))
    assert result["peak_rss_mb"] >= result["rss_before_mb"] > 0
    assert result["peak_growth_mb"] == pytest.approx(result["peak_rss_mb"] - result["rss_before_mb"])
    assert not result["failed"]


def test_training_steps_report_mfu_inputs_and_data_wait(toy_training):
    # A toy RoBERTa stands in for base: the step, loader and FLOP count are the real ones.
    model = bench_train.build_classifier("base", speech=True, context=True)
    utterances = bench_train.synthetic_utterances(40)
    assert max(len(u["text_ids"]) for u in utterances) <= bench_train.MAX_TEXT_TOKENS
    assert max(len(u["speech_ids"]) for u in utterances) <= bench_train.MAX_AUDIO_TOKENS
    for cache in (False, True):
        result = bench_train.train_steps(model, utterances, steps=2, warmup=0, group_by_length=True,
                                         cache_speech=cache, batch_size=8)
        total = sum(result["wait_s"]) + sum(result["step_s"])
        # The per-step figures are rounded to 0.01 and 0.1 ms: the share is their ratio within that.
        assert result["data_wait_share"] == pytest.approx(sum(result["wait_s"]) / total, abs=2 * 5.5e-5 / total)
        assert result["achieved_gflops"] == pytest.approx(result["model_tflop_per_step"] * 1e3 / result["mean_step_s"])
        assert (result["cache_s_per_utterance"] is not None) == cache
    assert "speech_vector" not in utterances[0]  # the benchmark works on copies


def test_a_cached_step_counts_no_speech_encoder_flops(toy_training):
    model = bench_train.build_classifier("base", speech=True, context=True)
    batch = {"labels": torch.zeros(2), "text_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "speech_ids": torch.ones(2, 5, dtype=torch.long), "speech_mask": torch.ones(2, 5, dtype=torch.long)}
    text = 3 * bench_train.encoder_forward_flops(model.text_encoder, [3, 4])  # fine-tuned: fwd + 2x bwd
    head = 3 * bench_train.head_forward_flops(model, 2)
    speech = bench_train.encoder_forward_flops(model.speech_encoder, [5, 5])  # frozen: forward only
    assert bench_train.step_model_flops(model, batch) == text + head + speech
    cached = {"labels": batch["labels"], "text_mask": batch["text_mask"], "speech_vector": torch.zeros(2, 32)}
    assert bench_train.step_model_flops(model, cached) == text + head


@pytest.mark.parametrize("native", [False, True])
def test_bf16_rows_only_on_a_cpu_with_bf16_instructions(monkeypatch, capsys, toy_training, native):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: native)
    dtypes = []
    peaks = {torch.float32: [1e11, 3e11] + [2e11] * 20, torch.bfloat16: [5e11, 8e11] + [6e11] * 20}
    monkeypatch.setattr(bench_train, "measure_peak_flops", fixed_peaks(peaks, dtypes))
    result = bench_train.bench_train(steps=1, full_steps=1, warmup=0, text_sizes=("base",), epoch_utterances=48,
                                     run_utterances=100)
    printed = capsys.readouterr().out
    precisions = {r["precision"] for r in result["runs"]}
    if native:
        assert result["bf16_skipped"] is None and "bf16 skipped" not in printed
        assert precisions == {"fp32", "bf16"} and result["train_mfu_bf16_text_base"] is not None
    else:
        assert "bf16 skipped: this CPU has no bf16 instructions" in printed
        assert "no bf16 instructions" in result["bf16_skipped"]
        assert precisions == {"fp32"} and set(result["peak_gflops"]) == {"fp32"}
        assert result["train_mfu_bf16_text_base"] is None and torch.bfloat16 not in dtypes

    # MFU divides by the highest peak measured in the run, of the run's own precision.
    assert result["peak_gflops"]["fp32"] == pytest.approx(300.0)
    for r in result["runs"]:
        peak = {"fp32": 3e11, "bf16": 8e11}[r["precision"]]
        assert r["mfu"] == pytest.approx(r["achieved_gflops"] * 1e9 / peak)
        assert r["epoch_s"] == pytest.approx(r["mean_step_s"] * math.ceil(48 / bench_train.BATCH_SIZE))
        if r["speech_cache"]:
            assert r["cache_once_s"] == pytest.approx(r["cache_s_per_utterance"] * 100)
    grouped = result["default_group_by_length"]
    off, on = (next(r for r in result["runs"] if r["config"] == "text base + speech + context"
                    and r["precision"] == "fp32" and r["group_by_length"] == grouped and r["speech_cache"] == cache)
               for cache in (False, True))
    assert result["cache_epoch_speedup"] == pytest.approx(off["epoch_s"] / on["epoch_s"])
    assert result["data_wait_share"] == max(r["data_wait_share"] for r in result["runs"])


CPUINFO_X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma{}\n\nprocessor\t: 1\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes{}\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("cpuinfo, native", [
    (CPUINFO_X86.format(""), False),  # AVX2 only (AMD EPYC before Zen 4)
    (CPUINFO_X86.format(" avx512f avx512bw avx512vl"), False),  # AVX-512 without bf16 (Skylake)
    (CPUINFO_X86.format(" avx512f avx512_bf16"), True),  # Zen 4, Cooper Lake
    (CPUINFO_X86.format(" avx512f amx_tile amx_bf16"), True),  # Sapphire Rapids
    (CPUINFO_ARM.format(""), False),
    (CPUINFO_ARM.format(" i8mm bf16"), True),  # Graviton 3
])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, cpuinfo, native):
    def open_cpuinfo(path, *args, **kwargs):
        if path != "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return io.StringIO(cpuinfo)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(utils, "open", open_cpuinfo, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {}, raising=False)  # not asked: the flags decide
    assert utils.cpu_has_native_bf16() is native


def test_native_bf16_without_proc_cpuinfo_asks_torch_and_a_capped_onednn_has_none(monkeypatch):
    def no_cpuinfo(path, *args, **kwargs):
        raise FileNotFoundError(path)
    monkeypatch.setattr(utils, "open", no_cpuinfo, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for capabilities, native in (({"avx2": True, "avx512_bf16": False}, False), ({"amx_bf16": True}, True)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
        assert utils.cpu_has_native_bf16() is native
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN may not use the CPU's bf16 instructions
    assert utils.cpu_has_native_bf16() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert utils.cpu_has_native_bf16() is True


@pytest.mark.parametrize("settings", [run_all.QUICK, run_all.FULL], ids=["quick", "full"])
def test_run_all_settings_are_the_benchmarks_own_arguments(settings):
    for name, function in (("vq", bench_vq.bench_vq), ("extraction", bench_extraction.bench_extraction),
                           ("train", bench_train.bench_train), ("asr", bench_asr.bench_asr),
                           ("speech", bench_speech.bench_speech), ("shard", bench_shard.bench_shard)):
        inspect.signature(function).bind("cpu", **settings[name])  # raises on a misspelt or missing argument


def test_encoder_flops_follow_6nt_plus_attention():
    encoder = bench_train.roberta("base", vocab_size=100)
    n = sum(p.numel() for p in encoder.encoder.parameters())
    assert 84e6 < n < 86e6
    assert bench_train.encoder_forward_flops(encoder, [10]) == 2 * n * 10 + 4 * 12 * 768 * 100
    fewer = bench_train.roberta("base", vocab_size=100, layers=1)  # --quick: real width, one layer
    assert bench_train.encoder_forward_flops(fewer, [10]) == 2 * n // 12 * 10 + 4 * 1 * 768 * 100


def test_table_prints_aligned_columns(capsys):
    common.print_table("t", [{"a": 1.23456, "b": "x"}, {"a": 2e6, "b": None}])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["a", "b"] and lines[4].split() == ["1.23", "x"]


def test_speech_encoder_flops_count_the_conv_stack_as_bench_vq_and_each_layer_once():
    from transformers import WavLMConfig
    base, deeper = WavLMConfig(), WavLMConfig(num_hidden_layers=13)
    stack = list(zip(base.conv_dim, base.conv_kernel, base.conv_stride))
    frames = 49  # 1 s at 320 samples a frame, less the receptive field
    conv = bench_vq.conv_flops_per_audio_second(stack)
    per_frame = 2 * 512 * 768 + 2 * 768 * 48 * 128  # feature projection, positional convolution
    layer = 2 * (4 * 768 ** 2 + 2 * 768 * 3072) * frames + 4 * 768 * frames ** 2
    assert bench_speech.speech_flops_per_audio_second(base, 1.0) == conv + per_frame * frames + 12 * layer
    assert bench_speech.speech_flops_per_audio_second(deeper, 1.0) == conv + per_frame * frames + 13 * layer


TOY_WHISPER = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_attention_heads": 2,
               "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 48, "num_mel_bins": 80,
               "vocab_size": 1000, "max_source_positions": 1500, "max_target_positions": 448}


def test_whisper_flops_per_window_are_torchs_own_count_plus_attention(tmp_path, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import WhisperForConditionalGeneration
    monkeypatch.setitem(bench_asr.WHISPER_SIZES, "small", TOY_WHISPER)
    folder = bench_asr.write_random_whisper(tmp_path / "whisper", tokens=5)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    flops = bench_asr.whisper_flops_per_window(model.config, 5)
    features = torch.randn(1, 80, 3000)
    # FlopCounterMode counts the products and convolutions, not SDPA's attention: the formula's rest.
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        ids = model.generate(features, language="en", task="transcribe", num_beams=1, do_sample=False)
    from mmser.asr import whisper_prompt
    # every token decoded, none ended early (transformers before 5 returns the prompt too)
    assert ids.shape[-1] in (5, 5 + len(whisper_prompt(model.generation_config)))
    assert counter.get_total_flops() == flops["total"] - flops["attention"]
    small = bench_asr.whisper_flops_per_window(transformers_config(bench_asr.WHISPER_SMALL), 24)
    assert 340e9 < small["encoder"] < 350e9 and 45e9 < small["decoder"] < 55e9  # issue 23's estimate


def transformers_config(shape):
    from transformers import WhisperConfig
    return WhisperConfig(**shape)


def test_asr_runs_report_their_share_of_the_limit_of_their_own_precision(monkeypatch):
    monkeypatch.setitem(bench_asr.WHISPER_SIZES, "small", TOY_WHISPER)
    monkeypatch.setattr(bench_asr, "set_threads", lambda: None)
    peaks = {torch.float32: [2e11, 1e11], torch.bfloat16: [4e11, 5e11]}
    monkeypatch.setattr(bench_asr, "measure_peak_flops", fixed_peaks(peaks))
    result = bench_asr.bench_asr(utterances=3, seconds=2.0, tokens=4, runs=["transformers:fp32", "transformers:bf16"],
                                 corpus_dialogues=0)
    assert result["windows"] == 3 and result["padding_share"] == pytest.approx(1 - 6 / 90)
    flops = result["gflop_per_window"] * 1e9
    fp32, bf16 = result["runs"]
    for run, peak in ((fp32, 2e11), (bf16, 5e11)):  # the higher of before and after, of the run's precision
        assert run["windows_per_wall_s"] == pytest.approx(3 / run["wall_s"])
        assert run["audio_s_per_wall_s"] == pytest.approx(6 / run["wall_s"])
        assert run["tokens_per_wall_s"] == pytest.approx(12 / run["wall_s"])
        assert run["limit_share"] == pytest.approx(3 * flops / run["wall_s"] / peak)
        assert run["useful_share"] == pytest.approx(run["limit_share"] * 6 / 90)
    assert fp32["same_text_as_fp32"] == 1 and fp32["speedup_vs_fp32"] == 1
    assert bf16["speedup_vs_fp32"] == pytest.approx(fp32["wall_s"] / bf16["wall_s"])
    assert result["audio_s_per_wall_s"] == fp32["audio_s_per_wall_s"]


def test_run_all_runs_each_benchmark_in_a_fresh_process_of_its_own(tmp_path, monkeypatch):
    # A benchmark that says where it ran and what it was given: another process each time, which
    # holds none of this one's memory (spawned, not forked).
    (tmp_path / "bench_where.py").write_text(
        "import os, sys\n"
        "def bench_where(device, **settings):\n"
        "    return {'pid': os.getpid(), 'device': device, 'settings': settings,\n"
        "            'ballast_here': 'test_benchmarks' in sys.modules}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import os
    first = run_all.run_in_own_process("where", "cpu", {"size": 3})
    second = run_all.run_in_own_process("where", "cpu", {})
    assert first["pid"] != os.getpid() and second["pid"] not in (os.getpid(), first["pid"])
    assert first["settings"] == {"size": 3} and first["device"] == "cpu"
    assert not first["ballast_here"]


def test_the_gpu_dry_run_runs_every_part_at_a_tiny_size_on_the_cpu(monkeypatch, capsys):
    import gpu_dry_run
    monkeypatch.setattr(gpu_dry_run, "set_threads", lambda: None)
    result = gpu_dry_run.main(["--tiny", "--device", "cpu"])
    parts = {row["part"].split(" ")[0] + " " + row["part"].split(" ")[1]: row for row in result["parts"]}
    assert not [row for row in result["parts"] if "error" in row], result["parts"]
    assert {"asr transformers", "layer means", "training text"} <= set(parts)
    for row in result["parts"]:
        assert 0 < row["peak_share"] < 1
    assert parts["asr transformers"]["windows_per_s"] > 0 and parts["layer means"]["audio_s_per_s"] > 0
    assert parts["training text"]["epoch_s"] == pytest.approx(parts["training text"]["step_s"] * 242)
    assert "GPU dry run" in capsys.readouterr().out
