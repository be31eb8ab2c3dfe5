"""What the tests of training, the model, main.py and predict.py share: a small DATA_DIR of
features written per the data contract, a MODELS_DIR of tiny encoders, and main.py runs on them
or on the demo's data (tests/conftest.py makes the fixtures from these).
"""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch

import main
from mmser.data_contract import CLASSES, MANIFEST_COLUMNS
from mmser.model_structure import EmotionClassifier, load_text_encoder
from mmser.speech.tokens import load_speech_roberta

SPEECH_CHECKPOINT = Path(__file__).parent / "data" / "fairseq_reference" / "bert_kmeans"
TEXT_VOCAB = 64
SPEECH_VOCAB = 597  # the fixture bert_kmeans.pt's dictionary
# Small enough for a fold to train in a fraction of a second on one CPU thread.
SMALL = ["1", "32", "64", "--epochs", "3", "--batch-size", "8", "--fusion-hidden", "32",
         "--lr-encoders", "1e-3", "--lr-head", "3e-3", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------
# a DATA_DIR and a MODELS_DIR

def write_feature_dir(data_dir, per_dialog=12, sessions=(1, 2, 3, 4, 5), context_window=1, width=16, seed=0):
    """A DATA_DIR as the extraction stages write it: manifest, GPT2Tokens, vqw2vTokens, FullBertEmb{c}.

    Two dialogues per session, speakers alternating; every 6th utterance is 'xxx' (no label, but
    context). Each branch's input carries the label: a class token in the text and speech ids, a
    one-hot in the sentence embedding. With the defaults: 120 rows, 100 labelled, 20 a session.
    """
    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    rows, sentence = [], {}
    for session in sessions:
        for d in (1, 2):
            dialog = f"Ses0{session}F_impro0{d}"
            for u in range(per_dialog):
                index = len(rows)
                emotion = "xxx" if u % 6 == 5 else ("ang", "hap", "exc", "sad", "neu")[rng.integers(5)]
                label = {"exc": "hap", "xxx": ""}.get(emotion, emotion)
                letter = "FM"[u % 2]
                row = {"name": f"{index}_s_{session}_{emotion}", "utterance_id": f"{dialog}_{letter}{u:03d}",
                       "session": session, "dialog": dialog, "speaker": f"Ses0{session}{letter}", "gender": letter,
                       "start": float(u), "end": u + 0.9, "emotion": emotion, "label": label, "valence": 2.5,
                       "activation": 2.5, "dominance": 2.5, "transcript": f"utterance {index}"}
                rows.append(row)
                k = CLASSES.index(label) if label else None
                vector = rng.normal(size=width).astype(np.float32)
                if k is not None:
                    vector[k] += 3.0
                sentence[row["name"]] = vector
                (data_dir / "GPT2Tokens").mkdir(parents=True, exist_ok=True)
                (data_dir / "vqw2vTokens").mkdir(parents=True, exist_ok=True)
                text = rng.integers(10, TEXT_VOCAB - 8, size=rng.integers(3, 20))
                speech = rng.integers(10, SPEECH_VOCAB, size=rng.integers(5, 40))
                if k is not None:  # every other token names the class
                    text[::2] = TEXT_VOCAB - 4 + k
                    speech[::2] = 4 + k
                np.save(data_dir / "GPT2Tokens" / f"{row['name']}.npy", np.r_[0, text, 2].astype(np.int32))
                if label:
                    np.save(data_dir / "vqw2vTokens" / f"{row['name']}.npy", np.r_[0, speech, 2].astype(np.int32))
    out = data_dir / f"FullBertEmb{context_window}"
    out.mkdir(parents=True, exist_ok=True)
    for dialog in dict.fromkeys(r["dialog"] for r in rows):
        names = [r["name"] for r in rows if r["dialog"] == dialog]
        for i, name in enumerate(names):
            slots = [sentence[names[i + j]] if 0 <= i + j < len(names) else np.zeros(width, np.float32)
                     for j in range(-context_window, context_window + 1)]
            np.save(out / f"{name}.npy", np.concatenate(slots))
    with open(data_dir / "utterances.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return data_dir


def write_tiny_models(models_dir, seed=0):
    """MODELS_DIR with a tiny text RoBERTa (2 layers, 32 wide) and the fixture speech RoBERTa."""
    from transformers import RobertaConfig, RobertaModel
    models_dir = Path(models_dir)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=TEXT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    RobertaModel(config).save_pretrained(models_dir / "roberta-large")
    shutil.copytree(SPEECH_CHECKPOINT, models_dir / "bert_kmeans")
    return models_dir


def tiny_model(models_dir, context_window=1, width=16, finetune_speech=False):
    return EmotionClassifier(load_text_encoder(models_dir / "roberta-large"),
                             load_speech_roberta(models_dir / "bert_kmeans" / "bert_kmeans.pt"),
                             context_window, width, finetune_speech=finetune_speech, fusion_hidden=32)


# ------------------------------------------------------------------------------------------------
# the files a run reads and writes, as a user reads them

def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def manifest(data_dir):
    """utterances.csv's rows, with the session as a number."""
    return [dict(row, session=int(row["session"])) for row in read_csv(Path(data_dir) / "utterances.csv")]


def fold_result(run_dir, k=1):
    return json.loads((Path(run_dir) / f"fold{k}" / "fold_result.json").read_text())


def checkpoint_weights(path):
    return torch.load(path, weights_only=True)["model"]


# ------------------------------------------------------------------------------------------------
# runs

def run_main(run_dir, data_dir, models_dir, *options):
    """main.py RUN_DIR DATA_DIR MODELS_DIR with the SMALL settings; later options override them."""
    return main.main([str(run_dir), str(data_dir), str(models_dir), *SMALL, *options])


def run_like_the_demo(demo_dir, run_dir, *options):
    """main.py on the demo's data and tiny models with the demo's settings (read from its
    config.json); later options override them."""
    config = json.loads((Path(demo_dir) / "config.json").read_text())
    settings = [config[k] for k in ("context_window", "max_text_tokens", "max_audio_tokens")]
    for key in ("epochs", "batch_size", "lr_encoders", "lr_head", "seed"):
        settings += ["--" + key.replace("_", "-"), config[key]]
    return main.main([run_dir, Path(demo_dir) / "data", Path(demo_dir) / "models", *settings, "--device", "cpu",
                      *options])


def interrupting(function, at_call):
    """`function`, except that its call number `at_call` raises KeyboardInterrupt: a Ctrl-C mid-run."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapper
