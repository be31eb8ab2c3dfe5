"""Training recipes: every training setting of a named source at once, each value with its source.

    python main.py RUN_DIR DATA_DIR MODELS_DIR --recipe siriwardhana2020   (options given still override)
    python -m mmser.recipes               prints docs/recipes.md's recipe table (Markdown) from the table below

A recipe is a dict of main.py's settings (the keys of its config.json). `default` is main.py's own
defaults; `original` is the code this project rebuilds (github nataschalemos/UCL-MSC-Project-Code
at ORIGINAL_COMMIT); `siriwardhana2020` the released code of Siriwardhana et al., Interspeech 2020
(github shamanez/BERT-like-is-All-You-Need at SIRIWARDHANA_COMMIT), whose training command is
README.md:80 there; `msp-podcast-baseline` the MSP-Podcast challenge's attribute baseline
(github msplabresearch/MSP-Podcast_Challenge at MSP_CHALLENGE_COMMIT; what it does that is not
reproduced: MSP_PODCAST_NOT_REPRODUCED). SOURCES gives, for each recipe and setting, the file and line
the value comes from, or what the released code leaves open; nothing here is copied from any of these
repositories. A value None is a setting the recipe leaves alone (main.py's default or the option given:
a categorical recipe has no attribute loss).

Token limits of a recipe (and main.py's defaults) are bounded by the encoder's own learned
positions: main.py lowers a limit the checkpoint cannot hold to the checkpoint's, and says so.
"""

ORIGINAL_COMMIT = "363381d0087f57c6ecbbfe23ed90b786f8ed66ba"
SIRIWARDHANA_COMMIT = "a6ba1f656da40103b3b5398961d18e5fc78e1efb"

# The settings a recipe decides, in the order the table shows them.
SETTINGS = ("target", "branches", "speech_model", "finetune_text", "finetune_speech", "max_text_tokens",
            "max_audio_tokens", "loss", "attribute_loss", "attribute_utterances", "head", "fusion_hidden",
            "head_dropout", "adam_betas", "adam_eps", "weight_decay", "lr_encoders", "lr_head", "scheduler", "warmup",
            "clip_norm", "epochs", "batch_size", "grad_accum", "select_by", "patience", "protocol", "test_set",
            "val_split", "val_fraction", "one_vs_rest", "seed")
# The settings of a categorical recipe that only a target with attributes, or the official protocol, reads.
_NOT_USED = {"speech_model": None, "attribute_loss": None, "attribute_utterances": None, "test_set": None}

RECIPES = {
    "original": {
        "target": "categorical", **_NOT_USED, "branches": "text,speech,context", "finetune_text": False, "finetune_speech": False,
        "max_text_tokens": 512, "max_audio_tokens": 2048, "loss": "multi_margin", "head": "mlp",
        "fusion_hidden": 128, "head_dropout": 0.0, "adam_betas": [0.9, 0.999],
        "adam_eps": 1e-8, "weight_decay": 0.0, "lr_encoders": 5e-5, "lr_head": 5e-5, "scheduler": "constant",
        "warmup": 0.0, "clip_norm": 0.0, "epochs": 100, "batch_size": 16, "grad_accum": 1, "select_by": "last",
        "patience": 10, "protocol": "session5", "val_split": "stratified", "val_fraction": 0.1,
        "one_vs_rest": False, "seed": 2022,
    },
    "siriwardhana2020": {
        "target": "categorical", **_NOT_USED, "branches": "text,speech", "finetune_text": True, "finetune_speech": True,
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
        "target": "main.py:95, 108 (a loss over the four emotion classes)",
        "speech_model": "left alone: the default, the fairseq speech RoBERTa of bert_kmeans.pt",
        "attribute_loss": "not used: no attributes",
        "attribute_utterances": "not used: no attributes",
        "test_set": "not used: session 5 tests",
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
        "target": "fairseq/criterions/emotion_prediction_cri.py:181-203 (the four emotions)",
        "speech_model": "left alone: the default, the fairseq speech RoBERTa of bert_kmeans.pt",
        "attribute_loss": "not used: no attributes",
        "attribute_utterances": "not used: no attributes",
        "test_set": "not used: session 5 tests",
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


# msp-podcast-baseline: the multi-task attribute baseline of the MSP-Podcast challenge (Odyssey 2024;
# Interspeech 2025 reuses it), github msplabresearch/MSP-Podcast_Challenge at MSP_CHALLENGE_COMMIT:
# run_dim.sh, train_ft_dim_ser.py, net/, utils/. Its categorical twin (run_cat.sh,
# train_ft_cat_ser_weighted.py) differs in target, loss and class weights (noted in the sources). What is
# not reproduced is MSP_PODCAST_NOT_REPRODUCED.
MSP_CHALLENGE_COMMIT = "3f60a423b1d3d16c907f1b52e195cbbe32d21976"
_DIM = "train_ft_dim_ser.py"
RECIPES["msp-podcast-baseline"] = {
    "target": "dimensional", "branches": "speech", "speech_model": "microsoft/wavlm-large", "finetune_text": None,
    "finetune_speech": True, "max_text_tokens": None, "max_audio_tokens": None, "loss": None, "attribute_loss": "ccc",
    "attribute_utterances": "rated", "head": "mlp", "fusion_hidden": 1024, "head_dropout": 0.5,
    "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "weight_decay": 0.01, "lr_encoders": 1e-5, "lr_head": 1e-5,
    "scheduler": "constant", "warmup": 0.0, "clip_norm": 0.0, "epochs": 20, "batch_size": 8, "grad_accum": 4,
    "select_by": "val_ccc", "patience": 0, "protocol": "official", "test_set": "test1", "val_split": None,
    "val_fraction": None, "one_vs_rest": False, "seed": 7,
}
SOURCES["msp-podcast-baseline"] = {
    "target": f"run_dim.sh:7; {_DIM}:114 (three outputs: arousal, dominance, valence)",
    "branches": f"{_DIM}:92-114 (WavLM, pooling and head: audio only)",
    "speech_model": "run_dim.sh:2; utils/etc.py:10-15 (wavlm-large: microsoft/wavlm-large)",
    "finetune_text": "no text branch",
    "finetune_speech": f"{_DIM}:93, 118 (the CNN feature encoder frozen, the transformer trained), as ours",
    "max_text_tokens": "no text branch",
    "max_audio_tokens": "not used by a transformers encoder's waveform (the baseline's 12-s crop is not reproduced)",
    "loss": "no classes; the categorical twin's: run_cat.sh:7, train_ft_cat_ser_weighted.py:187 (class-weighted "
            "cross-entropy: --target categorical --class-weights balanced)",
    "attribute_loss": f"{_DIM}:154-156; utils/loss_manager.py:51-75 (1 - CCC per attribute over the batch; summed "
                      f"there, averaged here)",
    "attribute_utterances": f"{_DIM}:64-66; utils/data/podcast.py:20-26 (every row of Train and Development with "
                            f"its three attributes, X and O rows included)",
    "head": "net/ser.py:14-29 (dropout, Linear, LayerNorm, ReLU, dropout, Linear: ours has no LayerNorm and one "
            "dropout)",
    "fusion_hidden": f"{_DIM}:39, 114 (head_dim 1024)",
    "head_dropout": f"{_DIM}:114 (dropout=0.5); net/ser.py:12, 16, 29",
    "adam_betas": f"{_DIM}:118-119, 126 (torch.optim.AdamW, its defaults)",
    "adam_eps": f"{_DIM}:118-119, 126 (AdamW's default)",
    "weight_decay": f"{_DIM}:118-119, 126 (AdamW's default 0.01, on every parameter there, matrices only here)",
    "lr_encoders": "run_dim.sh:12 (--lr=1e-5, one rate for all)",
    "lr_head": "run_dim.sh:12 (--lr=1e-5, one rate for all)",
    "scheduler": f"{_DIM}:118-168 (no scheduler)",
    "warmup": f"{_DIM}:118-168 (no warm-up)",
    "clip_norm": f"{_DIM}:157-163 (GradScaler steps, no clipping)",
    "epochs": "run_dim.sh:13 (--epochs=20)",
    "batch_size": f"run_dim.sh:10-11; {_DIM}:79 (--batch_size=32 // --accumulation_steps=4: 8 a forward pass, so "
                  f"CCC is taken over 8)",
    "grad_accum": f"run_dim.sh:11; {_DIM}:156-158 (a step every 4 batches)",
    "select_by": f"{_DIM}:193-222 (the epoch of the highest sum of dev CCCs: the mean chooses the same epoch)",
    "patience": f"{_DIM}:136 (every epoch runs)",
    "protocol": f"{_DIM}:65; utils/data/podcast.py:4-26 (Train trains, Development chooses)",
    "test_set": "eval_dim_ser.py (the labelled test sets); Test3, withheld, is written by every official run as "
                "eval_dim_ser_test3.py:136, 144 write it (FileName,EmoAct,EmoVal,EmoDom clipped to 1-7)",
    "val_split": "not used: the official protocol validates on Development (dev)",
    "val_fraction": "not used by this split",
    "one_vs_rest": "eval_dim_ser.py (CCC per attribute only)",
    "seed": "run_dim.sh:6 (seed 7)",
}
MSP_PODCAST_NOT_REPRODUCED = (
    "attentive statistics pooling over the last layer (ours: a softmax-weighted sum of every layer, mean-pooled); "
    "the head's LayerNorm and second dropout; the 12-s crop; waveforms standardised by the training set's global "
    "mean and std (utils/dataset/dataset.py:58; ours: the encoder's own feature extractor); the sum rather than "
    "the mean of the three 1 - CCC terms (a factor Adam's step largely absorbs); fp16 autocast with a GradScaler "
    "(ours: precision auto, bf16 where the GPU has it); one AdamW per module (the same rate for all: one optimizer "
    "here)")
# The rows of the recipe table that a recipe's code sets and main.py has no setting for; each recipe names its
# own (docs/recipes.md's table lists them under it).
NOT_REPRODUCED = {"msp-podcast-baseline": MSP_PODCAST_NOT_REPRODUCED}


def recipe_settings(name):
    """The settings a recipe sets, as main.py's option values (argparse dests); those it leaves alone (None)
    are left out."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    settings = {k: v for k, v in RECIPES[name].items() if v is not None}
    # main.py's options: --freeze-text is the negation of finetune_text
    if "finetune_text" in settings:
        settings["freeze_text"] = not settings.pop("finetune_text")
    return settings


def markdown_table(defaults):
    """The recipe table (docs): each setting, our default and each recipe's value with its source ("-": left
    alone), then what each recipe does that is not reproduced."""
    names = list(RECIPES)
    lines = ["| setting | default | " + " | ".join(names) + " | " + " | ".join(f"{n}: source" for n in names) + " |",
             "| " + " | ".join(["---"] * (2 + 2 * len(names))) + " |"]
    for key in SETTINGS:
        row = [key, _show(defaults.get(key))] + [_show(RECIPES[n][key]) for n in names]
        row += [SOURCES[n][key] for n in names]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *(f"Not reproduced by {n}: {text}." for n, text in NOT_REPRODUCED.items())]
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
