"""The demo: every stage of the pipeline, for real, on a synthetic corpus with tiny models.

    python main.py --demo [RUN_DIR] [main.py's options]      (RUN_DIR defaults to demo_run/)

With --speech-model wavlm (or hubert, wav2vec2, data2vec-audio, whisper) the speech branch runs over a
tiny random transformers encoder of that family (RUN_DIR/models/tiny-<family>, tiny_models.py) instead
of the vq-wav2vec tokens.

Writes RUN_DIR/corpus (an IEMOCAP_full_release-shaped tree, synthetic_iemocap.py), RUN_DIR/data
(DATA_DIR: mocap_data_collect.py, then feature_extraction_main.py), RUN_DIR/models (tiny models in
the real files' formats, tiny_models.py), then the run's own outputs in RUN_DIR as for any run of
main.py, and prints the results table. Stages whose outputs exist are not redone, so a rerun
resumes like any run. RUN_DIR must be new, empty or a demo folder, and a demo folder resumes only
under the same settings: both are checked before anything is written.
"""
import json
import time
from pathlib import Path

# Small enough for 2 CPU cores in well under a minute, on the synthetic corpus and tiny models.
DEMO = {"context_window": 2, "max_text_tokens": 64, "max_audio_tokens": 310, "epochs": 15, "batch_size": 16,
        "lr_encoders": 1e-3, "lr_head": 2e-3, "seed": 0}
DEMO_CORPUS_SEED = 0
DIALOGUES_PER_SESSION, UTTERANCES_PER_DIALOGUE = 4, 20


def check_demo_folder(run_dir, args, precision):
    """RUN_DIR is new, empty, or a demo folder (its run reads RUN_DIR/data) with the same settings."""
    import main
    config_path = run_dir / "config.json"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        try:
            data_dir = json.loads(config_path.read_text(encoding="utf-8")).get("data_dir")
        except (OSError, ValueError):
            data_dir = None
        if not (run_dir / "corpus").is_dir() and data_dir != str((run_dir / "data").resolve()):
            raise main.RunError(f"RUN_DIR {run_dir} holds files and is not a demo folder; give the demo a new or "
                                f"empty folder (or the folder of an earlier demo, to resume it)")
    main.check_resumable(run_dir, main.option_settings(args, precision))


def run_demo(args):
    """Every stage of the pipeline on the synthetic corpus, with tiny models, into args.run_dir."""
    import torch

    import feature_extraction_main
    import main
    import mocap_data_collect
    import synthetic_iemocap
    import tiny_models
    from feature_ext import format_summary

    start = time.time()
    run_dir = Path(args.run_dir or "demo_run")
    args.run_dir = str(run_dir)
    check_demo_folder(run_dir, args, main.resolve_device(args)[1])
    # The demo's models are tiny: one thread is as fast as two, while two threads per process
    # contending with other work on a shared 2-core machine ran 10-20x slower (measured).
    torch.set_num_threads(args.threads or 1)
    corpus, data_dir, models_dir = run_dir / "corpus", run_dir / "data", run_dir / "models"
    print(f"[1/5] synthetic IEMOCAP-shaped corpus -> {corpus}")
    if not (corpus / synthetic_iemocap.TRUTH_FILE).is_file():
        synthetic_iemocap.make_corpus(corpus, DEMO_CORPUS_SEED, DIALOGUES_PER_SESSION, UTTERANCES_PER_DIALOGUE)
    print(f"[2/5] manifest, transcripts and audio (mocap_data_collect) -> {data_dir}")
    rows = mocap_data_collect.collect(corpus, data_dir, progress=False)
    print(f"[3/5] tiny stand-ins for the pretrained models -> {models_dir}")
    wanted = ("bert-base-uncased", "roberta-large", "vq-wav2vec_kmeans.pt", "bert_kmeans/bert_kmeans.pt")
    if not all((models_dir / name).exists() for name in wanted):
        wavs = [p for p in (data_dir / "Audio" / f"{row['name']}.wav" for row in rows) if p.is_file()]
        tiny_models.make_tiny_models(models_dir, [row["transcript"] for row in rows], wavs, seed=DEMO_CORPUS_SEED)
    if args.speech_model in tiny_models.TINY_SPEECH_FAMILIES:  # --speech-model wavlm: a tiny one of that family
        family_dir = models_dir / f"tiny-{args.speech_model}"
        if not family_dir.is_dir():
            tiny_models.make_tiny_speech_encoder(family_dir, args.speech_model, seed=DEMO_CORPUS_SEED)
        args.speech_model = str(family_dir)
    print("[4/5] features: speech tokens, text tokens, sentence embeddings, "
          f"context vectors c={args.context_window} (feature_extraction_main)")
    reports = feature_extraction_main.extract_features(data_dir, models_dir, contexts=[args.context_window],
                                                       progress=False, speech_model=args.speech_model)
    print(format_summary(reports))
    if not all(report.ok for report in reports):
        raise main.RunError("feature extraction failed for the demo corpus (see above)")
    print("[5/5] training and evaluation")
    args.data_dir, args.models_dir = str(data_dir), str(models_dir)
    results = main.train_and_test(args, run_dir_checked=True)
    if results is not None:
        s, chance = results["summary"], 1 / len(results["summary"]["pooled"]["per_class_recall"])
        print(f"demo finished in {time.time() - start:.0f} s: test UA {s['ua_mean']:.3f}, WA {s['wa_mean']:.3f} "
              f"(chance UA {chance:.2f}); everything is in {run_dir}")
    return results
