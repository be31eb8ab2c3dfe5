"""Training: the loss, the optimizer and its schedules, one optimizer step, one epoch.

Writes nothing (main.py owns checkpoints). `train_step` is the unit benchmarks time: forward,
backward and update over one step's micro-batches.
"""
import contextlib
import copy
import math

import numpy as np
import torch
import torch.distributed as dist
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

MODEL_INPUTS = ("text_ids", "text_mask", "speech_ids", "speech_mask", "speech_vectors", "context")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the caller keeps the last good checkpoint."""


def balanced_class_weights(labels, num_classes):
    """n / (classes * count): every class weighs as much in the loss as if the classes were balanced."""
    present = sorted(set(labels))
    if len(present) != num_classes:
        raise ValueError(f"class weights need every class in the training set; found only {present}")
    return torch.tensor(compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(labels)), dtype=torch.float32)


def make_criterion(class_weights=None):
    return nn.CrossEntropyLoss(weight=class_weights)


def configure_optimizer(model, lr_encoders, lr_head, weight_decay=0.01):
    """AdamW with the pretrained encoders at their own (small) rate and the new layers at another.

    As in nanoGPT, only matrices decay; biases and LayerNorm weights do not.
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "encoders" if name.startswith(("text_encoder.", "speech_encoder.")) else "head"
        decay = param.dim() >= 2
        group = groups.setdefault((part, decay), {
            "name": f"{part}{'' if decay else ' (no decay)'}", "params": [],
            "lr": lr_encoders if part == "encoders" else lr_head, "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
    return torch.optim.AdamW([groups[k] for k in sorted(groups)])


class Newbob:
    """The original's schedule, stepped once per epoch on a validation score.

    When the score improves by less than `threshold` over the best so far, every learning rate is
    multiplied by `factor` and the model goes back to its best weights (a deep copy taken when that
    best was reached: a reference to the live state dict would follow the weights as they change).
    """

    def __init__(self, optimizer, factor=0.5, threshold=0.001):
        self.optimizer, self.factor, self.threshold = optimizer, factor, threshold
        self.best_score, self.best_state = None, None

    def step_epoch(self, score, model):
        """Returns True when the rate was lowered and the best weights restored."""
        improved = self.best_score is None or score - self.best_score >= self.threshold
        if self.best_score is None or score > self.best_score:
            # Only what training changes: a frozen encoder's copy would double its memory and
            # the size of every resumable checkpoint, for weights that never move.
            state = model.trained_state_dict() if hasattr(model, "trained_state_dict") else model.state_dict()
            self.best_score, self.best_state = score, copy.deepcopy(state)
        if improved:
            return False
        for group in self.optimizer.param_groups:
            group["lr"] *= self.factor
        if hasattr(model, "load_trained_state_dict"):
            model.load_trained_state_dict(self.best_state)
        else:
            model.load_state_dict(self.best_state)
        return True

    def state_dict(self):
        return {"best_score": self.best_score, "best_state": self.best_state}

    def load_state_dict(self, state):
        self.best_score, self.best_state = state["best_score"], state["best_state"]


def make_scheduler(optimizer, name, total_steps, warmup_fraction=0.1):
    """'linear': warm-up over warmup_fraction of the steps, then linear decay to 0 (stepped per
    optimizer step). 'newbob': Newbob, stepped per epoch with step_epoch."""
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_fraction * total_steps), total_steps)
    if name == "newbob":
        return Newbob(optimizer)
    raise ValueError(f"unknown scheduler {name!r}: use 'linear' or 'newbob'")


def model_inputs(batch, device):
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}


def forward_loss(model, batch, criterion, device, amp_dtype=None):
    """-> (loss, logits) for one batch; amp_dtype=torch.bfloat16 runs the forward under autocast."""
    with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits, _ = model(**model_inputs(batch, device))
    return criterion(logits.float(), batch["labels"].to(device)), logits


def _check_finite(value, what, distributed):
    bad = torch.tensor(0.0 if math.isfinite(value) else 1.0)
    if distributed:  # every rank must stop together, or the others wait forever in all-reduce
        dist.all_reduce(bad)
    if bad.item():
        raise NonFiniteLossError(f"the training {what} became {value} (NaN or infinite)")


def train_step(model, micro_batches, criterion, optimizer, device, amp_dtype=None, clip_norm=None,
               scheduler=None, distributed=False):
    """One optimizer step over one or more micro-batches (gradient accumulation); -> mean loss.

    Under DDP the gradients are all-reduced once, on the last micro-batch.
    """
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss, _ = forward_loss(model, batch, criterion, device, amp_dtype)
            _check_finite(loss.item(), "loss", distributed)
            (loss / len(micro_batches)).backward()
        total += loss.item()
    if clip_norm:
        norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_norm)
        _check_finite(norm.item(), "gradient norm", distributed)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return total / len(micro_batches)


def train_epoch(model, loader, criterion, optimizer, device, scheduler=None, grad_accum=1, clip_norm=None,
                amp_dtype=None, distributed=False, desc="train", progress=True):
    """One pass over the loader; -> mean training loss (over this rank's batches)."""
    model.train()
    losses, pending = [], []
    bar = tqdm(total=len(loader), desc=desc, unit="batch", leave=False, disable=not progress)
    for batch in loader:
        pending.append(batch)
        if len(pending) == grad_accum or len(losses) * grad_accum + len(pending) == len(loader):
            losses.append(train_step(model, pending, criterion, optimizer, device, amp_dtype, clip_norm,
                                     scheduler, distributed))
            bar.update(len(pending))
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            pending = []
    bar.close()
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def cache_speech_vectors(model, utterances, batch_size, device, amp_dtype=None, rank=0, world_size=1,
                         progress=True):
    """Run the frozen speech encoder once over every utterance and keep its <s> vector in the
    utterance dict ('speech_vector'); batches then carry these instead of speech tokens.

    In eval mode a frozen encoder's output never changes, so recomputing it every batch of every
    epoch would only cost time. Under torchrun each rank encodes its share and they exchange them.
    """
    from dataset_loader import evaluation_loader  # the same length-sorted batching as evaluation

    for item in utterances:
        item.pop("speech_vector", None)
    model.eval()
    vectors = {}
    for batch in tqdm(evaluation_loader(utterances, batch_size, rank, world_size), desc="speech vectors",
                      unit="batch", leave=False, disable=rank != 0 or not progress):
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model.encode_speech(batch["speech_ids"].to(device), batch["speech_mask"].to(device))
        vectors.update(zip(batch["index"].tolist(), [v.clone() for v in out.float().cpu()]))
    if world_size > 1:
        shares = [None] * world_size
        dist.all_gather_object(shares, vectors)
        vectors = {k: v for share in shares for k, v in share.items()}
    for item in utterances:
        item["speech_vector"] = vectors[item["index"]]
