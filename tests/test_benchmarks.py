"""The benchmark functions run at toy sizes and return the figures run_all.py reports (no timing asserted)."""
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_extraction  # noqa: E402
import bench_train  # noqa: E402
import bench_vq  # noqa: E402
import common  # noqa: E402

TOY_CONV = [(16, 10, 5), (16, 8, 4)] + [(16, 4, 2)] * 3 + [(16, 1, 1)] * 3


def test_conv_flops_of_the_real_stack_are_about_5_gflop_per_audio_second():
    assert 4.9e9 < bench_vq.conv_flops_per_audio_second() < 5.1e9


def test_vq_benchmark_reports_the_ratio_to_the_compute_limit():
    result = bench_vq.bench_vq(seconds=0.5, repeat=1, memory_seconds=(0.5,), conv_layers=TOY_CONV)
    assert result["vq_limit_ratio"] > 0 and result["limit_audio_s_per_wall_s"] > 0
    assert [m["audio_s"] for m in result["peak_memory_by_length"]] == [0.5]


def test_training_steps_report_mfu_inputs_and_data_wait(monkeypatch):
    # A toy RoBERTa stands in for base: the step, loader and FLOP count are the real ones.
    monkeypatch.setitem(bench_train.TEXT_SIZES, "base", {"hidden_size": 32, "num_hidden_layers": 1,
                                                        "num_attention_heads": 2, "intermediate_size": 64})
    model = bench_train.build_classifier("base", speech=True, context=True)
    utterances = bench_train.synthetic_utterances(40)
    assert max(len(u["text_ids"]) for u in utterances) <= bench_train.MAX_TEXT_TOKENS
    assert max(len(u["speech_ids"]) for u in utterances) <= bench_train.MAX_AUDIO_TOKENS
    for cache in (False, True):
        result = bench_train.train_steps(model, utterances, steps=1, warmup=0, group_by_length=True,
                                         cache_speech=cache, batch_size=8)
        assert result["model_tflop_per_step"] > 0 and 0 <= result["data_wait_share"] < 1
        assert (result["cache_s_per_utterance"] is not None) == cache
    assert "speech_vector" not in utterances[0]  # the benchmark works on copies


def test_encoder_flops_follow_6nt_plus_attention():
    encoder = bench_train.roberta("base", vocab_size=100)
    n = sum(p.numel() for p in encoder.encoder.parameters())
    assert 84e6 < n < 86e6
    assert bench_train.encoder_forward_flops(encoder, [10]) == 2 * n * 10 + 4 * 12 * 768 * 100


def test_extraction_memory_runs_in_a_fresh_process(tmp_path):
    data_dir, rows = bench_extraction.make_data_dir(tmp_path, 100)
    models_dir = bench_extraction.make_models_dir(tmp_path, data_dir, rows)
    result = bench_extraction.extraction_peak_memory(data_dir, models_dir)
    assert result["utterances"] == len(rows) and result["peak_rss_mb"] >= result["rss_before_mb"] > 0


def test_table_prints_aligned_columns(capsys):
    common.print_table("t", [{"a": 1.23456, "b": "x"}, {"a": 2e6, "b": None}])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["a", "b"] and lines[4].split() == ["1.23", "x"]
