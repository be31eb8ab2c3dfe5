"""Training recipes: every training setting of a named source at once, each value with its source.

    python main.py RUN_DIR DATA_DIR MODELS_DIR --recipe siriwardhana2020   (options given still override)
    python -m mmser.recipes               prints README's recipe table (Markdown) from the table below

A recipe is a dict of main.py's settings (the keys of its config.json). `default` is main.py's own
defaults; `original` is the code this project rebuilds (github nataschalemos/UCL-MSC-Project-Code
at ORIGINAL_COMMIT); `siriwardhana2020` the released code of Siriwardhana et al., Interspeech 2020
(github shamanez/BERT-like-is-All-You-Need at SIRIWARDHANA_COMMIT), whose training command is
README.md:80 there. SOURCES gives, for each recipe and setting, the file and line the value comes
from, or what the released code leaves open; nothing here is copied from either repository.

Token limits of a recipe (and main.py's defaults) are bounded by the encoder's own learned
positions: main.py lowers a limit the checkpoint cannot hold to the checkpoint's, and says so.
"""

ORIGINAL_COMMIT = "363381d0087f57c6ecbbfe23ed90b786f8ed66ba"
SIRIWARDHANA_COMMIT = "a6ba1f656da40103b3b5398961d18e5fc78e1efb"

# The settings a recipe decides, in the order the table shows them.
SETTINGS = ("branches", "finetune_text", "finetune_speech", "max_text_tokens", "max_audio_tokens", "loss", "head",
            "fusion_hidden", "head_dropout", "adam_betas", "adam_eps", "weight_decay", "lr_encoders",
            "lr_head", "scheduler", "warmup", "clip_norm", "epochs", "batch_size", "grad_accum", "select_by",
            "patience", "protocol", "val_split", "val_fraction", "one_vs_rest", "seed")

RECIPES = {
    "original": {
        "branches": "text,speech,context", "finetune_text": False, "finetune_speech": False,
        "max_text_tokens": 512, "max_audio_tokens": 2048, "loss": "multi_margin", "head": "mlp",
        "fusion_hidden": 128, "head_dropout": 0.0, "adam_betas": [0.9, 0.999],
        "adam_eps": 1e-8, "weight_decay": 0.0, "lr_encoders": 5e-5, "lr_head": 5e-5, "scheduler": "constant",
        "warmup": 0.0, "clip_norm": 0.0, "epochs": 100, "batch_size": 16, "grad_accum": 1, "select_by": "last",
        "patience": 10, "protocol": "session5", "val_split": "stratified", "val_fraction": 0.1,
        "one_vs_rest": False, "seed": 2022,
    },
    "siriwardhana2020": {
        "branches": "text,speech", "finetune_text": True, "finetune_speech": True,
        "max_text_tokens": 512, "max_audio_tokens": 2048, "loss": "cross_entropy", "head": "linear",
        "fusion_hidden": 256, "head_dropout": 0.1, "adam_betas": [0.9, 0.98],
        "adam_eps": 1e-6, "weight_decay": 0.1, "lr_encoders": 1e-5, "lr_head": 1e-5, "scheduler": "polynomial",
        "warmup": round(165 / 2760, 4), "clip_norm": 0.0, "epochs": 10, "batch_size": 16, "grad_accum": 1,
        "select_by": "val_loss", "patience": 0, "protocol": "session5", "val_split": "in-train-session",
        "val_fraction": 0.1, "one_vs_rest": True, "seed": 1,
    },
}

# Paths are inside each recipe's own repository (the table's columns say which).
_CMD = "README.md:80"
SOURCES = {
    "original": {
        "branches": "model_structure.py:70-73, 86-90 (Fusion: text, speech, Time_async)",
        "finetune_text": "main.py:110, 198, 211 (freeze_models=True in the final stage)",
        "finetune_speech": "main.py:110, 198, 211 (freeze_models=True in the final stage)",
        "max_text_tokens": "dataset_loader.py:22 (loader default; main.py:51 takes it from the command line)",
        "max_audio_tokens": "dataset_loader.py:22 (loader default; main.py:53 takes it from the command line)",
        "loss": "main.py:95, 108 (MultiMarginLoss p=1, margin 0.4)",
        "head": "model_structure.py:73-74, 92-93 (Linear, ReLU, Linear; its last Linear has no bias)",
        "fusion_hidden": "model_structure.py:65, 73 (fuse_dim=128)",
        "head_dropout": "model_structure.py:75 (dropout commented out)",
        "adam_betas": "main.py:105, 214 (optim.Adam, torch's default betas; with no decay the same as AdamW)",
        "adam_eps": "main.py:214 (torch's default)",
        "weight_decay": "main.py:214 (none given: 0)",
        "lr_encoders": "main.py:104 (one rate for all)",
        "lr_head": "main.py:104 (one rate for all)",
        "scheduler": "main.py:106, 216, 270 (newbob made, its step commented out: the rate stays)",
        "warmup": "main.py:106, 270 (no warm-up)",
        "clip_norm": "train_function.py:88-90 (backward, step: no clipping)",
        "epochs": "main.py:102 (at most; early stopping below)",
        "batch_size": "main.py:101",
        "grad_accum": "train_function.py:88-90 (one step per batch)",
        "select_by": "main.py:259-267, 298 (the last epoch's model is tested)",
        "patience": "main.py:103, 259-264 (on validation loss)",
        "protocol": "main.py:139, 144 (train sessions 1-4, test session 5)",
        "val_split": "main.py:141 (a random 10%: ours is stratified by class)",
        "val_fraction": "main.py:141",
        "one_vs_rest": "test_function.py:20-27 (UA, WA and per-class accuracy only)",
        "seed": "main.py:35",
    },
    "siriwardhana2020": {
        "branches": f"{_CMD} (--a-only --t-only); fairseq/models/mult_emo.py:56-69",
        "finetune_text": "fairseq/models/mult_emo.py:70-71 (freezing commented out)",
        "finetune_speech": "fairseq/models/mult_emo.py:60-61 (freezing commented out)",
        "max_text_tokens": "fairseq/data/raw_audio_text_dataset.py:336",
        "max_audio_tokens": "fairseq/data/raw_audio_text_dataset.py:348",
        "loss": "fairseq/criterions/emotion_prediction_cri.py:181-203 (theirs: a 2-way softmax per emotion; "
                "not reproduced, ours stays 4-class)",
        "head": "fairseq/models/mult_emo.py:367-370, 382-388 (dropout, Linear over the two <s> vectors)",
        "fusion_hidden": "not used by a linear head",
        "head_dropout": f"{_CMD} (--pooler-dropout 0.1); fairseq/models/mult_emo.py:369",
        "adam_betas": f"{_CMD} (--optimizer adam --adam-betas); fairseq/optim/adam.py:193-194 (decoupled decay, "
                      f"as AdamW)",
        "adam_eps": f"{_CMD} (--adam-eps)",
        "weight_decay": f"{_CMD} (--weight-decay 0.1; on every parameter there, matrices only here)",
        "lr_encoders": f"{_CMD} (--lr, one rate for all)",
        "lr_head": f"{_CMD} (--lr, one rate for all)",
        "scheduler": f"{_CMD} (--lr-scheduler polynomial_decay); fairseq/optim/lr_scheduler/"
                     f"polynomial_decay_schedule.py:36-37 (power 1, to 0)",
        "warmup": f"{_CMD} (--warmup-updates 165 of --total-num-update 2760)",
        "clip_norm": f"{_CMD} (--clip-norm 0.0)",
        "epochs": f"{_CMD} (--max-epoch 10)",
        "batch_size": f"{_CMD} (--batch-size 1 --update-freq 8 on two GPUs: 16 a step)",
        "grad_accum": f"{_CMD} (16 a step, here in one batch)",
        "select_by": f"{_CMD} (--best-checkpoint-metric loss)",
        "patience": f"{_CMD} (no --patience)",
        "protocol": "T_data/iemocap/test_t.tsv (session 5 only)",
        "val_split": "T_data/iemocap/valid_t.tsv, train_t.tsv (session 4 validates and also trains)",
        "val_fraction": "not used by this split",
        "one_vs_rest": "fairseq/criterions/emotion_prediction_cri.py:228-242 (per emotion, binary accuracy "
                       "and weighted F1)",
        "seed": "fairseq/options.py:208 (no --seed in the command: fairseq's default)",
    },
}


def recipe_settings(name):
    """The settings a recipe sets, as main.py's option values (argparse dests)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    settings = dict(RECIPES[name])
    # main.py's options: --freeze-text is the negation of finetune_text
    settings["freeze_text"] = not settings.pop("finetune_text")
    return settings


def markdown_table(defaults):
    """README's table: each setting, our default and each recipe's value with its source."""
    names = list(RECIPES)
    lines = ["| setting | default | " + " | ".join(names) + " | " + " | ".join(f"{n}: source" for n in names) + " |",
             "| " + " | ".join(["---"] * (2 + 2 * len(names))) + " |"]
    for key in SETTINGS:
        row = [key, _show(defaults.get(key))] + [_show(RECIPES[n][key]) for n in names]
        row += [SOURCES[n][key] for n in names]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _show(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):  # the branches as --branches takes them, Adam's betas as BETA1/BETA2
        return ",".join(value) if all(isinstance(v, str) for v in value) else "/".join(map(str, value))
    return "-" if value is None else str(value)


def main():
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    import dataclasses

    from mmser.settings import DEFAULTS
    print(markdown_table(dataclasses.asdict(DEFAULTS)), end="")


if __name__ == "__main__":
    main()
