"""MODELS_DIR: the pretrained files a user downloads, by role, and the one rule that finds a model.

  MODELS_DIR_FILES   role -> (its place under MODELS_DIR, the hub name a missing local copy stands for)
  models_dir_path    MODELS_DIR/<the role's place>
  resolve_model      the option's value as given; else MODELS_DIR's copy when it is there; else the
                     hub name (through transformers' own cache), or, for a file only MODELS_DIR holds
                     (the fairseq checkpoints), its path there, to be named by the step that reads it
  missing_path       "NAME: no such folder" for a model option's value that can only be a local path
                     and is not there (transformers would call it a malformed hub name)
The roles are the keys that features.json and config.json record the files under.
"""
import re
from pathlib import Path

MODELS_DIR_FILES = {
    # the text branch's encoder and its tokens (GPT2Tokens/)
    "text_model": ("roberta-large", "roberta-large"),
    # the sentence model of the context vectors (BertEmb/, FullBertEmb{c}/)
    "sentence_model": ("bert-base-uncased", "bert-base-uncased"),
    # the transcripts step's Whisper (ASR-<tag>/)
    "asr_model": ("whisper-large-v3", "openai/whisper-large-v3"),
    # the original speech route: fairseq's vq-wav2vec k-means, and bert_kmeans.tar unpacked
    "vq_wav2vec": ("vq-wav2vec_kmeans.pt", None),
    "speech_roberta": ("bert_kmeans/bert_kmeans.pt", None),
    "speech_dictionary": ("bert_kmeans/dict.txt", None),
}


def models_dir_path(models_dir, role):
    """MODELS_DIR/<the role's file or folder>, whether or not it is there."""
    return Path(models_dir) / MODELS_DIR_FILES[role][0]


def hub_name(role):
    """The hub name a role falls back to (None for a file only MODELS_DIR holds)."""
    return MODELS_DIR_FILES[role][1]


def resolve_model(models_dir, role, given=None):
    """`given` (an option's value: a name or a path) as it is; else MODELS_DIR's copy of the role's model
    when that folder is there, else its hub name; a file only MODELS_DIR holds is its path there."""
    if given:
        return str(given)
    hub = hub_name(role)
    if hub is None:
        return str(models_dir_path(models_dir, role))
    local = models_dir_path(models_dir, role) if models_dir is not None else None
    return str(local) if local is not None and local.is_dir() else hub


# What the hub takes as a name (huggingface_hub's repo ids): NAME or ORG/NAME of letters, digits, "_", "-"
# and ".", without "--" or "..".
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def missing_path(name):
    """"NAME: no such folder" ("file" for a *.pt checkpoint) when the model option's value `name` can only
    be a local path (not a hub name: absolute, ./ or ~/, a *.pt file, two slashes, "--", or under a folder
    that is here) and nothing is there; None when it is there or may be a hub name."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return None
    parts = Path(text).parts
    local = (not _HUB_NAME.fullmatch(text) or text.endswith(".pt") or "--" in text or ".." in text
             or (len(parts) > 1 and Path(parts[0]).is_dir()))
    if not local:
        return None
    return f"{text}: no such {'file' if text.endswith('.pt') else 'folder'}"
