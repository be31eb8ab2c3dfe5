"""Training speed of the fused model at real sizes: samples/s, MFU, the frozen-speech cache, data wait.

    python benchmarks/bench_train.py [--device cpu|cuda] [--steps 3] [--full-steps 2] [--warmup 1]
                                     [--text-sizes base large] [--no-bf16] [--layers N]

Reads and writes nothing. The model is model_structure.EmotionClassifier with randomly initialised
transformers RoBERTa encoders at the real configurations (text: RoBERTa-base or -large; speech:
a RoBERTa-base-shaped encoder over the speech codes; context: the Time-Asynchronous Branch on
7 x 768 BERT-base slots), trained with train_function.train_step on batches from
dataset_loader.training_loader, as main.py trains. The utterances are synthetic, with IEMOCAP-like
lengths (about 4.5 s of speech on average, ~100 speech tokens per second, ~2.5 words per second),
cut at the original's 100 text / 310 audio tokens, batch 16.

Model FLOPs per step, counted on the real (non-pad) tokens, as nanoGPT's estimate_mfu does:
  an encoder's forward on a sequence of T tokens: 2*N*T + 4*L*d*T^2
      (N: parameters of its transformer layers, embeddings excluded; L layers of width d; the
      second term is Q K^T and A V, which nanoGPT writes as 12*L*H*Q*T per token for fwd+bwd)
  trained encoder (text): 3x its forward (backward = 2x forward); frozen speech encoder: 1x
      (it runs under no_grad), 0 when its vectors come from the cache
  context branch + fusion head: 2 * multiply-adds of their Linear layers per utterance, x3
MFU = model FLOPs per step / step time / peak, where the peak is a dense square matmul of the
same dtype measured in this run (benchmarks/common.measure_peak_flops) before every configuration
and at the end, the highest of these kept (on a shared machine, the least disturbed one). "MFU"
uses the timed steps' total FLOPs over their total time (data wait included); "MFU best" the
fastest single step. Padding, the optimizer update and the embedding gradients are work the
model FLOPs do not count, so they lower MFU.

The bf16 rows (autocast) run only where bf16 is computed natively: on a CPU without bf16
instructions (utils.cpu_has_native_bf16) they are left out with a word, as with --no-bf16.

Epoch times are extrapolated: the mean measured step (data wait included) times the batches of
one epoch at the original's settings (IEMOCAP sessions 1-4 less 10% validation = 3861
utterances, 242 batches of 16). The frozen-speech cache is computed once per run over every
utterance (5531); its per-utterance cost is measured on the utterances the timed steps use.
"""
import argparse
import math
import time

import numpy as np
import torch

from common import (device_arg, machine_info, measure_peak_flops, print_table, set_threads, synchronize,
                    use_repo_modules)

TEXT_SIZES = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}
TEXT_VOCAB = 50265  # RoBERTa's BPE vocabulary
SPEECH_VOCAB = 20000  # of the order of bert_kmeans' code dictionary; only the embedding table's size
CONTEXT_WINDOW, SENTENCE_WIDTH = 3, 768
MAX_TEXT_TOKENS, MAX_AUDIO_TOKENS, BATCH_SIZE = 100, 310, 16
EPOCH_UTTERANCES, RUN_UTTERANCES = 3861, 5531


def roberta(size, vocab_size, dropout=0.1, layers=None):
    """A randomly initialised transformers RobertaModel at a real size (no download).

    layers: fewer transformer layers of the same width (run_all.py --quick), None for the real count.
    """
    from transformers import RobertaConfig, RobertaModel
    shape = dict(TEXT_SIZES[size], **({"num_hidden_layers": layers} if layers else {}))
    config = RobertaConfig(vocab_size=vocab_size, max_position_embeddings=514, type_vocab_size=1,
                           layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **shape)
    return RobertaModel(config, add_pooling_layer=False)


def build_classifier(text_size="base", speech=False, context=False, seed=0, layers=None):
    """The project's fused model with real-size random encoders; speech frozen, text fine-tuned."""
    use_repo_modules()
    from mmser.model_structure import EmotionClassifier
    torch.manual_seed(seed)
    return EmotionClassifier(
        text_encoder=roberta(text_size, TEXT_VOCAB, layers=layers) if text_size else None,
        speech_encoder=roberta("base", SPEECH_VOCAB, layers=layers) if speech else None,
        context_window=CONTEXT_WINDOW if context else None, context_width=SENTENCE_WIDTH,
        finetune_text=True, finetune_speech=False)


def synthetic_utterances(n, branches=("text", "speech", "context"), seed=0):
    """Utterance dicts shaped as dataset_loader.load_utterances makes them, with IEMOCAP-like lengths."""
    use_repo_modules()
    from mmser.dataset_loader import truncate_tokens
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(math.log(3.6), 0.6, n), 0.6, 34.0)
    words = np.maximum(1, np.round(seconds * 2.5 * rng.lognormal(0.0, 0.3, n))).astype(int)
    utterances = []
    for i in range(n):
        item = {"index": i, "name": f"Ses0{1 + i % 4}F_bench_{i:05d}", "session": 1 + i % 4,
                "speaker": f"Ses0{1 + i % 4}{'FM'[i % 2]}", "dialog": f"bench{i // 20}", "label": int(rng.integers(4))}
        if "text" in branches:
            tokens = int(round(words[i] * 1.3))
            ids = np.concatenate([[0], rng.integers(4, TEXT_VOCAB, tokens), [2]])
            item["text_ids"] = torch.from_numpy(truncate_tokens(ids, MAX_TEXT_TOKENS).astype(np.int64))
        if "speech" in branches:
            frames = max(0, (int(seconds[i] * 16000) - 465) // 160 + 1)
            ids = np.concatenate([[0], rng.integers(4, SPEECH_VOCAB, frames), [2]])
            item["speech_ids"] = torch.from_numpy(truncate_tokens(ids, MAX_AUDIO_TOKENS).astype(np.int64))
        if "context" in branches:
            item["context"] = torch.from_numpy(
                rng.standard_normal((2 * CONTEXT_WINDOW + 1, SENTENCE_WIDTH)).astype(np.float32))
        utterances.append(item)
    return utterances


def encoder_forward_flops(encoder, lengths):
    """2*N*T + 4*L*d*T^2 summed over the sequences (N: transformer-layer parameters)."""
    config = encoder.config
    n = sum(p.numel() for p in encoder.encoder.parameters())
    return sum(2 * n * t + 4 * config.num_hidden_layers * config.hidden_size * t * t for t in lengths)


def head_forward_flops(model, batch_size):
    """Context branch and fusion head: 2 FLOPs per multiply-add of their Linear layers."""
    flops = 0
    branch = model.context_branch
    if branch is not None:
        hidden = branch.project.out_features
        flops += 2 * branch.slices * (branch.width * hidden + hidden * hidden + hidden * branch.heads)
        flops += 2 * branch.heads * branch.slices * hidden
    flops += sum(2 * m.in_features * m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear))
    return flops * batch_size


def step_model_flops(model, batch):
    """Model FLOPs of one training step on `batch` (see the module docstring)."""
    flops = 3 * head_forward_flops(model, len(batch["labels"]))
    if model.text_encoder is not None:
        lengths = batch["text_mask"].sum(1).tolist()
        flops += (3 if model.finetune_text else 1) * encoder_forward_flops(model.text_encoder, lengths)
    if model.speech_encoder is not None and "speech_ids" in batch:
        lengths = batch["speech_mask"].sum(1).tolist()
        flops += (3 if model.finetune_speech else 1) * encoder_forward_flops(model.speech_encoder, lengths)
    return flops


def _padding_efficiency(batch):
    real = padded = 0
    for key in ("text_mask", "speech_mask"):
        if key in batch:
            real += int(batch[key].sum())
            padded += batch[key].numel()
    return real / padded if padded else 1.0


def time_speech_cache(model, utterances, device="cpu", amp_dtype=None, sample=32):
    """Seconds per utterance of train_function.cache_speech_vectors over the run's utterances.

    Measured on the `sample` utterances around the median speech length (one evaluation batch of
    near-equal lengths, as the length-sorted cache pass makes them) and scaled by mean / median
    length: the encoder's cost is close to linear in the tokens at <= 310 of them.
    """
    use_repo_modules()
    from mmser import train_function
    by_length = sorted(utterances, key=lambda u: len(u["speech_ids"]))
    middle = len(by_length) // 2
    chosen = [dict(u) for u in by_length[max(0, middle - sample // 2):middle + sample - sample // 2]]
    lengths = [len(u["speech_ids"]) for u in utterances]
    scale = float(np.mean(lengths)) / float(np.mean([len(u["speech_ids"]) for u in chosen]))
    synchronize(device)
    start = time.perf_counter()
    train_function.cache_speech_vectors(model.to(device), chosen, sample, device, amp_dtype)
    synchronize(device)
    return (time.perf_counter() - start) / len(chosen) * scale


def project_default_grouping():
    """main.py's default batching (length-grouped or random), which the headline figures use."""
    use_repo_modules()
    from mmser.settings import DEFAULTS
    return DEFAULTS.group_by_length


def train_steps(model, utterances, device="cpu", amp_dtype=None, group_by_length=False, cache_speech=False,
                steps=3, warmup=1, batch_size=BATCH_SIZE, seed=0):
    """Time `steps` optimizer steps of main.py's loop (after `warmup`): the loader's next() and train_step.

    -> dict with per-step data wait and step seconds, model FLOPs, samples, padding efficiency and,
    with cache_speech, the measured seconds per utterance of the one-time speech cache.
    """
    use_repo_modules()
    from mmser import dataset_loader
    from mmser import train_function
    utterances = [dict(u) for u in utterances]  # the cache writes into the dicts
    cache_s_per_utterance = None
    if cache_speech:
        cache_s_per_utterance = time_speech_cache(model, utterances, device, amp_dtype)
        # The step's cost does not depend on the vectors' values: every utterance gets a
        # placeholder, so that the loader (whose length grouping treats cached speech as free,
        # as in main.py) and the batches are those of a cached run.
        for u in utterances:
            u["speech_vector"] = torch.zeros(model.speech_encoder.config.hidden_size)
    loader = dataset_loader.training_loader(utterances, batch_size, seed, group_by_length)
    loader.batch_sampler.set_epoch(0)
    model.to(device).train()
    criterion = train_function.make_criterion()
    optimizer = train_function.configure_optimizer(model, 1e-5, 1e-3, fused=amp_dtype is not None)  # as main.py
    records = []
    iterator = iter(loader)
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        batch = next(iterator)
        fetched = time.perf_counter()
        train_function.train_step(model, [batch], criterion, optimizer, device, amp_dtype, clip_norm=1.0)
        synchronize(device)
        done = time.perf_counter()
        if i >= warmup:
            records.append({"wait_s": fetched - start, "step_s": done - fetched, "flops": step_model_flops(model, batch),
                            "samples": len(batch["labels"]), "padding_efficiency": _padding_efficiency(batch)})
    del optimizer
    total = sum(r["wait_s"] + r["step_s"] for r in records)
    return {
        "steps": steps, "warmup": warmup, "batch_size": batch_size,
        "wait_s": [round(r["wait_s"], 5) for r in records],
        "step_s": [round(r["step_s"], 4) for r in records],
        "mean_step_s": total / steps,  # data wait included: what an epoch costs per batch
        "samples_per_s": sum(r["samples"] for r in records) / total,
        "model_tflop_per_step": sum(r["flops"] for r in records) / steps / 1e12,
        "achieved_gflops": sum(r["flops"] for r in records) / total / 1e9,
        "best_step_gflops": max(r["flops"] / (r["wait_s"] + r["step_s"]) for r in records) / 1e9,
        "data_wait_share": sum(r["wait_s"] for r in records) / total,
        "padding_efficiency": float(np.mean([r["padding_efficiency"] for r in records])),
        "cache_s_per_utterance": cache_s_per_utterance,
    }


def bf16_unavailable(device):
    """Why bf16 is not measured on `device` (a sentence), or None when it is.

    A CPU without bf16 instructions (utils.cpu_has_native_bf16) emulates it, on an AVX2-only one a
    hundred times slower than fp32: there run_all.py did not finish in 30 minutes with the bf16
    rows, which measure a precision nobody should train in on that CPU.
    """
    use_repo_modules()
    from mmser import utils
    if torch.device(device).type == "cpu" and not utils.cpu_has_native_bf16():
        return "this CPU has no bf16 instructions (avx512_bf16, amx_bf16): emulated bf16 runs slower than fp32"
    # Asked, not probed with a product: a probe's RuntimeError could as well be the GPU out of memory.
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16 matmuls"
    return None


def bench_train(device="cpu", steps=3, full_steps=2, warmup=1, text_sizes=("base", "large"), bf16=True, seed=0,
                epoch_utterances=EPOCH_UTTERANCES, run_utterances=RUN_UTTERANCES, layers=None, peak_seconds=1.0):
    """Every configuration of the table; -> {"peak_gflops": ..., "runs": [...], headline figures}.

    steps: timed steps of the text-branch runs (the MFU target); full_steps: of the full model's
    runs (a recomputed speech encoder makes those steps long on a CPU). bf16=False, or a device
    without native bf16 (bf16_unavailable), leaves the bf16 rows out, with a word; the result's
    "bf16_skipped" says why (None when they ran). layers: every encoder at its real width with
    this many layers (a smoke run), None for the real sizes.
    """
    set_threads()
    device = str(device)
    dtypes = {"fp32": torch.float32}
    bf16_skipped = bf16_unavailable(device) if bf16 else "not asked for (--no-bf16)"
    if bf16_skipped is None:
        dtypes["bf16"] = torch.bfloat16
    elif bf16:
        print(f"bf16 skipped: {bf16_skipped}")
    peaks = {name: [] for name in dtypes}

    def measure_peaks():
        for name, dtype in dtypes.items():
            peaks[name].append(measure_peak_flops(device, dtype, seconds=peak_seconds))

    utterances = synthetic_utterances(epoch_utterances, seed=seed)
    batches_per_epoch = math.ceil(epoch_utterances / BATCH_SIZE)
    runs = []

    def run(name, model, precision, group, cache, n_steps):
        measure_peaks()
        amp = None if precision == "fp32" else dtypes[precision]
        result = train_steps(model, utterances, device, amp, group, cache, n_steps, warmup, seed=seed)
        result.update(config=name, precision=precision, group_by_length=group, speech_cache=cache,
                      epoch_s=result["mean_step_s"] * batches_per_epoch)
        if cache:
            result["cache_once_s"] = result["cache_s_per_utterance"] * run_utterances
        runs.append(result)

    # The text branch alone at RoBERTa-base: the MFU target.
    text_base = build_classifier("base", layers=layers).to(device)
    for precision in dtypes:
        for group in (False, True):
            run("text base", text_base, precision, group, False, steps)
    del text_base
    # The original's settings: text RoBERTa-large (or base), frozen speech RoBERTa-base, context
    # branch; the project's default batching, and the largest model also with random batches.
    default_group = project_default_grouping()
    for size in text_sizes:
        model = build_classifier(size, speech=True, context=True, layers=layers).to(device)
        for group in (default_group, not default_group) if size == text_sizes[-1] else (default_group,):
            for cache in (False, True):
                run(f"text {size} + speech + context", model, "fp32", group, cache, full_steps)
        if "bf16" in dtypes and size == text_sizes[-1]:
            run(f"text {size} + speech + context", model, "bf16", default_group, True, full_steps)
        del model
    measure_peaks()
    # The least disturbed measurement of the run is the ceiling: a conservative MFU.
    peak = {name: max(values) for name, values in peaks.items()}
    for r in runs:
        r["mfu"] = r["achieved_gflops"] * 1e9 / peak[r["precision"]]
        r["mfu_best_step"] = r["best_step_gflops"] * 1e9 / peak[r["precision"]]

    def find(config, precision="fp32", group=default_group, cache=False):
        return next(r for r in runs if (r["config"], r["precision"], r["group_by_length"], r["speech_cache"])
                    == (config, precision, group, cache))

    original = f"text {text_sizes[-1]} + speech + context"
    off, on = find(original), find(original, cache=True)
    off_random, on_random = find(original, group=not default_group), find(original, group=not default_group, cache=True)
    return {
        "device": device,
        "layers": layers,
        "bf16_skipped": bf16_skipped,
        "peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "peak_gflops_all_measurements": {k: [round(v / 1e9, 1) for v in vs] for k, vs in peaks.items()},
        "batches_per_epoch": batches_per_epoch,
        "runs": runs,
        "default_group_by_length": default_group,
        "train_mfu_fp32_text_base": find("text base")["mfu"],
        "train_mfu_fp32_text_base_grouped": find("text base", group=True)["mfu"],
        "train_mfu_fp32_text_base_random_batches": find("text base", group=False)["mfu"],
        "train_mfu_bf16_text_base": find("text base", "bf16")["mfu"] if "bf16" in dtypes else None,
        "cache_epoch_speedup": off["epoch_s"] / on["epoch_s"],
        "cache_epoch_speedup_other_batching": off_random["epoch_s"] / on_random["epoch_s"],
        "cache_speedup_incl_cache_10_epochs": 10 * off["epoch_s"] / (10 * on["epoch_s"] + on["cache_once_s"]),
        "cache_speedup_config": original,
        "data_wait_share": max(r["data_wait_share"] for r in runs),
    }


def print_train(result):
    rows = [{"config": r["config"], "prec": r["precision"], "grouped": r["group_by_length"],
             "cache": r["speech_cache"], "step_s": r["mean_step_s"], "samples/s": r["samples_per_s"],
             "TFLOP/step": r["model_tflop_per_step"], "GFLOP/s": r["achieved_gflops"], "MFU": r["mfu"],
             "MFU best": r["mfu_best_step"],
             "pad_eff": r["padding_efficiency"], "wait": r["data_wait_share"], "epoch_s": r["epoch_s"],
             "cache_once_s": r.get("cache_once_s")} for r in result["runs"]]
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in result["peak_gflops"].items())
    print_table(f"training step, batch {BATCH_SIZE}, <= {MAX_TEXT_TOKENS} text / {MAX_AUDIO_TOKENS} audio tokens, "
                f"{result['device']} (peak GFLOP/s: {peaks})", rows)
    print_table("headline", [{"measure": k, "value": result[k]} for k in (
        "train_mfu_fp32_text_base", "train_mfu_fp32_text_base_grouped", "train_mfu_fp32_text_base_random_batches",
        "train_mfu_bf16_text_base", "cache_epoch_speedup", "cache_epoch_speedup_other_batching",
        "cache_speedup_incl_cache_10_epochs", "data_wait_share")])
    if result["bf16_skipped"]:
        print(f"bf16 rows skipped: {result['bf16_skipped']}")


def main(argv=None):
    parser = device_arg(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps of the text-branch runs")
    parser.add_argument("--full-steps", type=int, default=2, help="timed optimizer steps of the full model's runs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--text-sizes", nargs="+", default=["base", "large"], choices=sorted(TEXT_SIZES),
                        help="text encoder sizes for the full model; the last is the cache comparison's")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip the bf16 autocast runs (skipped anyway on a CPU without bf16 instructions)")
    parser.add_argument("--layers", type=int, help="fewer layers per encoder, real widths (a smoke run)")
    args = parser.parse_args(argv)
    result = bench_train(args.device, args.steps, args.full_steps, args.warmup, tuple(args.text_sizes),
                         not args.no_bf16, layers=args.layers)
    print(machine_info(args.device))
    print_train(result)
    return result


if __name__ == "__main__":
    main()
