"""Labelled utterances of DATA_DIR as model inputs: loaded into memory once, batched with padding.

Reads (nothing is written), the files data_contract.BRANCHES names for each branch:
  DATA_DIR/utterances.csv                 through data_contract.read_manifest
  DATA_DIR/GPT2Tokens/<name>.npy          text RoBERTa ids  <s> ... </s>   (text branch)
  the speech route's input                (speech branch; mmser.speech: vqw2vTokens/<name>.npy,
                                          speech RoBERTa ids <s> codes </s>, by default)
  DATA_DIR/FullBertEmb{c}/<name>.npy      (2c+1)*H context vector           (context branch)

Each utterance becomes a dict: index, name, utterance_id, session, speaker, dialog, the manifest's optional
columns it has (split, group, sentiment), label (index into the run's classes; -1 for an utterance
without one: trained on its attributes only, or a withheld partition's), with a target that has
attributes (mmser/targets.py) attribute_values (on the corpus's scale) and attributes (float32 on the
unit scale the model regresses; NaN where unknown), and, per branch,
text_ids (1-D int64 tensor), the speech route's entries (speech_ids; or speech_layers, speech_wave)
and context ((2c+1, H) float32).
Token sequences are cut to the maximum length keeping `</s>` last (data_contract.truncate_tokens);
a batch is padded only to its own longest sequence with `<pad>` = 1.
"""
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from mmser.data_contract import (BRANCHES, OPTIONAL_COLUMNS, DataError, branch_steps, feature_folder, feature_path,
                                 label_set, read_classes, read_feature, read_manifest, truncate_tokens)
from mmser.distributed import gather_from_ranks
from mmser.speech.routes import route_of
from mmser.targets import NO_LABEL
from mmser.utils import length_sorted_batches

BOS, PAD, EOS = 0, 1, 2  # fairseq dictionary specials, shared by both RoBERTa vocabularies


def text_input(ids, max_tokens):
    """The text branch's input from a text token file's ids: for training and for predict.py alike."""
    return torch.from_numpy(truncate_tokens(ids, max_tokens).astype(np.int64))


def missing_features(data_dir, rows, context_window, branches, models=None, transcripts=None, speech_route=None):
    """[(name, path)] of the manifest rows `rows` (those a run reads) with a feature file missing, the first
    one named (models: the run's non-default models; transcripts: the transcript set of its text features;
    both as data_contract.branch_steps; speech_route: the speech branch's, mmser.speech.routes.route_of,
    None: the original's)."""
    speech_route = speech_route or route_of()
    missing = []
    for row in rows:
        paths = [speech_route.input_file(data_dir, row["name"]) if branch == "speech" else
                 feature_path(data_dir, branch, row["name"], context_window, models, transcripts)
                 for branch in branches]
        absent = [p for p in paths if not p.is_file()]
        if absent:
            missing.append((row["name"], absent[0]))
    return missing


def load_utterances(data_dir, context_window, max_text_tokens, max_audio_tokens, branches=tuple(BRANCHES),
                    progress=True, rows=None, classes=None, models=None, transcripts=None, speech_route=None,
                    target=None):
    """The labelled utterances of DATA_DIR (or the manifest rows `rows`) with the features the given
    branches need; labels are indices into `classes` (default: the classes the rows have, in the
    order of DATA_DIR's label set); models: the run's non-default models, transcripts: the
    transcript set of the features made from text (None: the reference), both as
    data_contract.branch_steps. The speech branch's input is what its route loads (speech_route,
    mmser.speech.routes.route_of; None: the original's speech tokens, cut to max_audio_tokens). A target with
    attributes (targets.Target) adds each utterance's attribute values."""
    data_dir = Path(data_dir)
    unknown = set(branches) - set(BRANCHES)
    if unknown or not branches:
        raise ValueError(f"branches must be a non-empty subset of {tuple(BRANCHES)}, got {tuple(branches)}")
    if rows is None:
        rows = [row for row in read_manifest(data_dir) if row["label"]]
    classes = list(classes or label_set(rows, read_classes(data_dir)))
    slices = 2 * context_window + 1
    speech_route = speech_route or route_of()
    utterances = []
    for row in tqdm(rows, desc="loading features", unit="utt", leave=False, disable=not progress):
        item = {"index": len(utterances), "name": row["name"], "utterance_id": row["utterance_id"],
                "session": row["session"], "speaker": row["speaker"], "dialog": row["dialog"],
                "label": classes.index(row["label"]) if row["label"] else NO_LABEL}
        item.update({c: row[c] for c in OPTIONAL_COLUMNS if c in row})
        if target is not None and target.num_attributes:
            item["attribute_values"] = target.row_values(row)
            item["attributes"] = torch.from_numpy(target.unit([item["attribute_values"]])[0].astype(np.float32))
        for branch in branches:
            if branch == "speech":
                item.update(speech_route.load_input(data_dir, row["name"], max_audio_tokens))
                continue
            path = feature_path(data_dir, branch, row["name"], context_window, models, transcripts)
            if branch == "context":
                vector = read_feature(path, f"context vector (window {context_window})")
                if vector.size % slices:
                    raise DataError(f"{path}: length {vector.size} is not a multiple of 2*{context_window}+1 = "
                                    f"{slices} context slots; was it made with another context window?")
                item[BRANCHES[branch].key] = context_input(vector, context_window)
            else:
                item[BRANCHES[branch].key] = text_input(read_feature(path, "text tokens"), max_text_tokens)
        utterances.append(item)
    if "context" in branches:
        widths = {item["context"].shape[1] for item in utterances}
        if len(widths) > 1:
            folder = feature_folder(data_dir, branch_steps("context", context_window, models, transcripts)[-1])
            raise DataError(f"{folder}: context vectors of different widths {sorted(widths)}")
    return utterances


def context_input(vector, context_window):
    """The context branch's input from a context vector ((2c+1)*H): (2c+1, H) float32, for training
    and for predict.py alike."""
    return torch.from_numpy(vector.astype(np.float32).reshape(2 * context_window + 1, -1))


def context_slice_width(utterances):
    """H, the sentence model's width, read from the data rather than assumed to be 768."""
    return int(utterances[0]["context"].shape[1])


def pad_tokens(sequences):
    """Right-pad 1-D id tensors to the longest with <pad>; returns (ids, attention_mask)."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=PAD)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids, mask


def collate_utterances(items):
    """A list of utterance dicts -> one batch dict of tensors (the model's keyword arguments + labels)."""
    batch = {
        "index": torch.tensor([it["index"] for it in items]),
        "names": [it["name"] for it in items],
        "labels": torch.tensor([it["label"] for it in items]),
    }
    if "attributes" in items[0]:  # the target's attributes, on the unit scale (NaN: unknown)
        batch["attributes"] = torch.stack([it["attributes"] for it in items])
    if "text_ids" in items[0]:
        batch["text_ids"], batch["text_mask"] = pad_tokens([it["text_ids"] for it in items])
    if "speech_vector" in items[0]:  # a frozen speech encoder's output, computed once per run
        batch["speech_vectors"] = torch.stack([it["speech_vector"] for it in items])
    elif "speech_ids" in items[0]:
        batch["speech_ids"], batch["speech_mask"] = pad_tokens([it["speech_ids"] for it in items])
    if "context" in items[0]:
        batch["context"] = torch.stack([it["context"] for it in items])
    if "speech_layers" in items[0]:  # a transformers speech encoder's cached layer means
        batch["speech_layers"] = torch.stack([it["speech_layers"] for it in items])
    elif "speech_wave" in items[0]:  # zero-padded (the feature extractors' padding value), 1 on real samples
        waves = [it["speech_wave"] for it in items]
        batch["speech_wave"] = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        batch["speech_wave_mask"] = (torch.arange(batch["speech_wave"].shape[1])[None] <
                                     torch.tensor([len(w) for w in waves])[:, None]).long()
    return batch


def utterance_length(item):
    """Tokens the encoders will run on for this utterance (cached speech costs nothing)."""
    n = len(item["text_ids"]) if "text_ids" in item else 0
    if "speech_ids" in item and "speech_vector" not in item:
        n += len(item["speech_ids"])
    if "speech_wave" in item:  # a speech encoder's frames: one per 320 samples
        n += len(item["speech_wave"]) // 320
    return n


class UtteranceDataset(Dataset):
    def __init__(self, utterances):
        self.utterances = list(utterances)

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, i):
        return self.utterances[i]


class EpochBatchSampler(Sampler):
    """Batches from a DistributedSampler (one replica unless under torchrun), reshuffled per epoch.

    The order depends only on (seed, epoch), never on the global RNG, so a resumed run sees the
    same batches as an uninterrupted one. With group_by_length, the shuffled indices are cut into
    mega-batches of 50 batches and sorted by length inside each, so a batch pads little while the
    batch order stays random.
    """

    def __init__(self, sampler, batch_size, lengths=None, seed=0):
        self.sampler, self.batch_size, self.lengths, self.seed = sampler, batch_size, lengths, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        order = list(self.sampler)
        if self.lengths is not None:
            mega = self.batch_size * 50
            order = [i for s in range(0, len(order), mega)
                     for i in sorted(order[s:s + mega], key=lambda i: -self.lengths[i])]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.lengths is not None:
            g = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return iter(batches)


def training_loader(utterances, batch_size, seed, group_by_length=False, rank=0, world_size=1, num_workers=0):
    """Shuffled training batches; this rank's share when distributed. Call .batch_sampler.set_epoch(e)."""
    dataset = UtteranceDataset(utterances)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    lengths = [utterance_length(u) for u in utterances] if group_by_length else None
    batches = EpochBatchSampler(sampler, batch_size, lengths, seed)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_utterances, num_workers=num_workers)


def evaluation_loader(utterances, batch_size, rank=0, world_size=1):
    """This rank's share of the utterances (each exactly once), in batches of similar length."""
    share = utterances[rank::world_size]
    batches = [[share[i] for i in batch] for batch in
               length_sorted_batches([utterance_length(u) for u in share], batch_size)]
    return DataLoader(batches, batch_size=None, collate_fn=collate_utterances)


MODEL_INPUTS = ("text_ids", "text_mask", "speech_ids", "speech_mask", "speech_vectors", "context", "speech_layers",
                "speech_wave", "speech_wave_mask")


def model_inputs(batch, device):
    """A batch's tensors that the model takes, on `device`."""
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}


def map_utterances(fn, utterances, batch_size, rank=0, world_size=1, desc="evaluate", progress=False):
    """fn(batch) -> one output per utterance of the batch, over every utterance in length-sorted
    batches (each rank its share, then gathered): -> the outputs in the order of `utterances`."""
    outputs = {}
    for batch in tqdm(evaluation_loader(utterances, batch_size, rank, world_size), desc=desc, unit="batch",
                      leave=False, disable=not progress):
        outputs.update(zip(batch["index"].tolist(), fn(batch)))
    shares = gather_from_ranks(outputs, world_size)
    merged = {k: v for share in shares for k, v in share.items()}
    return [merged[item["index"]] for item in utterances]
