"""Training: the loss, the optimizer and its schedules, one optimizer step, one epoch, one fold.

Writes a fold's checkpoints (FOLD_DIR/best.pt: the best epoch's weights by --select-by, validation UA
by default; FOLD_DIR/last.pt: the last finished epoch with the optimizer, scheduler and random
generators, to resume from). `train_step` is the unit benchmarks time: forward, backward and update over one
step's micro-batches. A fold is trained in parts that each read on their own: prepare_training
(model, optimizer, batches), resume (last.pt), train_epoch + end_of_epoch (validation,
checkpoints, newbob), and train_fold, which strings them together.
"""
import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from tqdm import tqdm
from transformers import (get_constant_schedule, get_linear_schedule_with_warmup,
                          get_polynomial_decay_schedule_with_warmup)

from mmser import model_structure
from mmser import validation_function
from mmser.dataset_loader import gather_from_ranks, map_utterances, model_inputs, training_loader
from mmser.reporting import METRICS, SELECT_BY, run_metrics, selection_score
from mmser.settings import DEFAULTS
from mmser.targets import NO_LABEL, target_of
from mmser.utils import atomic_path

log = logging.getLogger("main")  # the run's log (RUN_DIR/train.log), set up by main.py


class TrainingError(Exception):
    """A fold that cannot go on for a reason the user can act on; the message says what to do."""


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class RunPaused(Exception):
    """--stop-after-epochs was reached; the run resumes from RUN_DIR."""


class EpochBudget:
    """--stop-after-epochs: the epochs this invocation may run, over all its folds and seeds (0: no limit)."""

    def __init__(self, epochs):
        self.left = epochs or None

    def spend(self):
        """One epoch finished; -> True when that was the last one this invocation may run."""
        if self.left is None:
            return False
        self.left -= 1
        return self.left <= 0


def balanced_class_weights(labels, num_classes):
    """n / (classes * count): every class weighs as much in the loss as if the classes were balanced."""
    present = sorted(set(labels))
    if len(present) != num_classes:
        raise ValueError(f"class weights need every class in the training set; found only {present}")
    return torch.tensor(compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(labels)), dtype=torch.float32)


def make_criterion(class_weights=None, loss=DEFAULTS.loss):
    """cross_entropy, or multi_margin: the original's MultiMarginLoss(p=1, margin=0.4) (recipes.py)."""
    if loss == "cross_entropy":
        return nn.CrossEntropyLoss(weight=class_weights)
    if loss == "multi_margin":
        return nn.MultiMarginLoss(p=1, margin=0.4, weight=class_weights)
    raise ValueError(f"unknown loss {loss!r}: use 'cross_entropy' or 'multi_margin'")


class TargetLoss(nn.Module):
    """The loss of the dimensional and both targets (mmser/targets.py): outputs (batch, classes +
    attributes), labels (batch,) with -1 where there is none, attributes (batch, attributes) on the unit
    scale, NaN where unknown -> the attributes' loss (dimensional.attribute_loss: 1 - CCC per attribute
    over the batch, averaged, or "mse"), plus for both the classes' loss over the labelled utterances
    (class_criterion, make_criterion's) with the attributes' weighted by `weight`. The categorical target
    trains with make_criterion's criterion alone, as it always did."""

    def __init__(self, num_classes, class_criterion=None, attribute_loss=DEFAULTS.attribute_loss,
                 weight=DEFAULTS.attribute_weight):
        super().__init__()
        self.num_classes, self.class_criterion = num_classes, class_criterion
        self.attribute_loss, self.weight = attribute_loss, weight

    def forward(self, outputs, labels, attributes):
        from mmser.dimensional import attribute_loss
        loss = attribute_loss(outputs[:, self.num_classes:], attributes, self.attribute_loss)
        if self.class_criterion is None:
            return loss
        known = labels != NO_LABEL
        logits = outputs[:, :self.num_classes]
        # A batch without a labelled utterance (--attribute-utterances rated) trains the attributes only.
        classes = self.class_criterion(logits[known], labels[known]) if bool(known.any()) else logits.sum() * 0.0
        return classes + self.weight * loss


def make_target_criterion(target, class_weights=None, loss=DEFAULTS.loss, attribute_loss=DEFAULTS.attribute_loss,
                          attribute_weight=DEFAULTS.attribute_weight):
    """The criterion that trains `target` (targets.Target): make_criterion's for the classes alone, else a
    TargetLoss. forward_loss calls it with (outputs, labels), and the attributes where the batch has them."""
    classes = make_criterion(class_weights, loss) if target.num_classes else None
    if not target.num_attributes:
        return classes
    return TargetLoss(target.num_classes, classes, attribute_loss, attribute_weight)


def configure_optimizer(model, lr_encoders, lr_head, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, fused=False):
    """AdamW with the pretrained encoders at their own (small) rate and the new layers at another.

    As in nanoGPT, only matrices decay; biases and LayerNorm weights do not. (fairseq's Adam, which
    Siriwardhana et al. trained with, decays as AdamW does, but every parameter.)
    fused: torch's fused AdamW (one pass per tensor). On a CPU the default is a loop of a dozen
    tensor ops per parameter: 0.50 s per step for RoBERTa-base's 125M parameters against 0.07 s fused
    (one core), a quarter of a bf16 step, which is why bf16 sped the step up so little. It rounds
    differently (4.8e-7 after one step), so fp32 training keeps the loop: its results stay as they were.
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "encoders" if name.startswith(("text_encoder.", "speech_encoder.", "speech_layer_sum.encoder.")) else "head"
        decay = param.dim() >= 2
        group = groups.setdefault((part, decay), {
            "name": f"{part}{'' if decay else ' (no decay)'}", "params": [],
            "lr": lr_encoders if part == "encoders" else lr_head, "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
    return torch.optim.AdamW([groups[k] for k in sorted(groups)], betas=tuple(betas), eps=eps, fused=True if fused else None)


class Newbob:
    """The original's schedule, stepped once per epoch on a validation score.

    When the score improves by less than `threshold` over the best so far, every learning rate is
    multiplied by `factor` and the model and its optimizer go back to their state at the best epoch
    (deep copies taken when that best was reached: a reference to the live state dict would follow
    the weights as they change), as the reference implementation restores both (the original's
    model_structure.py, newbob.step: model.load_state_dict and optimizer.load_state_dict).
    """

    def __init__(self, optimizer, factor=0.5, threshold=0.001):
        self.optimizer, self.factor, self.threshold = optimizer, factor, threshold
        self.best_score, self.best_state, self.best_optimizer = None, None, None

    def step_epoch(self, score, model):
        """Returns True when the rate was lowered and the best weights restored."""
        improved = self.best_score is None or score - self.best_score >= self.threshold
        if self.best_score is None or score > self.best_score:
            # Only what training changes: a frozen encoder's copy would double its memory and
            # the size of every resumable checkpoint, for weights that never move.
            state = model.trained_state_dict() if hasattr(model, "trained_state_dict") else model.state_dict()
            self.best_score, self.best_state = score, copy.deepcopy(state)
            self.best_optimizer = copy.deepcopy(self.optimizer.state_dict())
        if improved:
            return False
        rates = [group["lr"] * self.factor for group in self.optimizer.param_groups]
        # Adam's moments go back with the weights they were estimated for; the rates are lowered.
        if self.best_optimizer is not None:  # None only in a last.pt written before it was kept
            self.optimizer.load_state_dict(self.best_optimizer)
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        if hasattr(model, "load_trained_state_dict"):
            model.load_trained_state_dict(self.best_state)
        else:
            model.load_state_dict(self.best_state)
        return True

    def state_dict(self):
        return {"best_score": self.best_score, "best_state": self.best_state, "best_optimizer": self.best_optimizer}

    def load_state_dict(self, state):
        self.best_score, self.best_state = state["best_score"], state["best_state"]
        self.best_optimizer = state.get("best_optimizer")


def make_scheduler(optimizer, name, total_steps, warmup_fraction=0.1):
    """'linear': warm-up over warmup_fraction of the steps, then linear decay to 0; 'polynomial':
    fairseq's polynomial_decay as Siriwardhana et al. ran it (power 1, to 0, after the warm-up);
    'constant': no change (the original's main.py made newbob but never stepped it). These three
    step per optimizer step. 'newbob': Newbob, stepped per epoch with step_epoch."""
    warmup = math.ceil(warmup_fraction * total_steps)
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if name == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total_steps, lr_end=0.0, power=1.0)
    if name == "constant":
        return get_constant_schedule(optimizer)
    if name == "newbob":
        return Newbob(optimizer)
    raise ValueError(f"unknown scheduler {name!r}: use 'linear', 'polynomial', 'constant' or 'newbob'")


def forward_loss(model, batch, criterion, device, amp_dtype=None):
    """-> (loss, outputs) for one batch; amp_dtype=torch.bfloat16 runs the forward under autocast. The
    criterion takes the outputs and the labels, and the batch's attributes where it has them (a target
    with attributes: make_target_criterion)."""
    with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs, _ = model(**model_inputs(batch, device))
    targets = [batch["labels"].to(device)] + ([batch["attributes"].to(device)] if "attributes" in batch else [])
    return criterion(outputs.float(), *targets), outputs


def _check_finite(value, what, distributed):
    bad = torch.tensor(0.0 if math.isfinite(value) else 1.0)
    if distributed:  # every rank must stop together, or the others wait forever in all-reduce
        dist.all_reduce(bad)
    if bad.item():
        raise NonFiniteLossError(f"the training {what} became {value} (NaN or infinite)")


def train_step(model, micro_batches, criterion, optimizer, device, amp_dtype=None, clip_norm=None,
               scheduler=None, distributed=False, stats=None):
    """One optimizer step over one or more micro-batches (gradient accumulation); -> mean loss.

    Under DDP the gradients are all-reduced once, on the last micro-batch. A `stats` dict receives
    the gradient norm before clipping (for TensorBoard).
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
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if clip_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
        _check_finite(norm.item(), "gradient norm", distributed)
        if stats is not None:
            stats["grad_norm"] = norm.item()
    elif stats is not None:  # the norm alone, the gradients untouched
        grads = [p.grad for p in params if p.grad is not None]
        stats["grad_norm"] = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return total / len(micro_batches)


def train_epoch(model, loader, criterion, optimizer, device, scheduler=None, grad_accum=1, clip_norm=None,
                amp_dtype=None, distributed=False, desc="train", progress=True, on_step=None):
    """One pass over the loader; -> mean training loss (over this rank's batches). on_step(loss,
    stats, samples, seconds) is called after each optimizer step (TensorBoard's per-step curves)."""
    model.train()
    losses, pending = [], []
    bar = tqdm(total=len(loader), desc=desc, unit="batch", leave=False, disable=not progress)
    start = time.time()
    for batch in loader:
        pending.append(batch)
        if len(pending) == grad_accum or len(losses) * grad_accum + len(pending) == len(loader):
            stats = {} if on_step else None
            losses.append(train_step(model, pending, criterion, optimizer, device, amp_dtype, clip_norm,
                                     scheduler, distributed, stats))
            if on_step:
                now = time.time()
                on_step(losses[-1], stats, sum(len(b["labels"]) for b in pending), now - start)
                start = now
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
    for item in utterances:
        item.pop("speech_vector", None)
    model.eval()

    def encode(batch):
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model.encode_speech(batch["speech_ids"].to(device), batch["speech_mask"].to(device))
        return [v.clone() for v in out.float().cpu()]

    vectors = map_utterances(encode, utterances, batch_size, rank, world_size, "speech vectors",
                             rank == 0 and progress)
    for item, vector in zip(utterances, vectors):
        item["speech_vector"] = vector


# ------------------------------------------------------------------------------------------------
# one fold

def save_checkpoint(path, state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, remedy):
    """A checkpoint this run wrote; a damaged one is an error naming the file and what to do."""
    import pickle
    import zipfile
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        # truncated by a full disk, overwritten, not a checkpoint at all: torch's own words about
        # such a file (pages on weights_only) would not help, its kind and the way out do
        raise TrainingError(f"{path}: unreadable checkpoint ({type(e).__name__}): damaged, or not a checkpoint this "
                            f"run wrote; {remedy}") from None


def rng_states(device, world):
    """Every process's random generators, in rank order: the CPU's and its GPU's (dropout draws
    differ between ranks, since their batches differ). Collective: every rank must call it."""
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None}
    return gather_from_ranks(state, world)


def set_rng_state(states, rank, device):
    """Restore this rank's generators from rng_states (a run resumes with the same world size)."""
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def check_lengths(model, utterances):
    """An encoder's learned positions stop at text_features.text_token_limit (RoBERTa's at
    max_position_embeddings - 2, fairseq's padding offset), and its ids at its vocabulary's size
    (ids beyond it: features of another tokenizer)."""
    from mmser.data_contract import BRANCHES
    from mmser.text_features import text_token_limit
    for branch in ("text", "speech"):
        encoder, key = getattr(model, f"{branch}_encoder"), BRANCHES[branch].key
        if encoder is None:
            continue
        largest = max(int(u[key].max()) for u in utterances)
        if largest >= encoder.config.vocab_size:
            raise TrainingError(f"the {branch} token files (config.json's feature_folders: {branch}) hold ids up to {largest}, "
                                f"but the {branch} encoder's vocabulary has "
                                f"{encoder.config.vocab_size}: its features were made for another model "
                                f"(features.json says which); extract them again with this one")
        limit = text_token_limit(encoder.config)
        longest = max(len(u[key]) for u in utterances)
        if longest > limit:
            raise TrainingError(f"{branch} sequences of up to {longest} tokens, but the {branch} encoder has "
                                f"positions for {limit}; set {BRANCHES[branch].length_option} to at most {limit}")


class TensorBoard:
    """A fold's live curves for TensorBoard (`tensorboard --logdir RUN_DIR`), written as training
    goes: per optimizer step the loss, each parameter group's learning rate, the gradient norm and
    samples per second; per epoch the training and validation loss, every validation metric of the run
    (WA/UA/macro-F1/weighted-F1; CCC, Pearson r, MAE per attribute and their means) and utterances per
    second. A resumed fold drops what an interrupted invocation wrote after its
    last finished epoch (purge_step), so the curves show each step once."""

    def __init__(self, folder, step):
        from torch.utils.tensorboard import SummaryWriter
        # Steps up to `step` (the last finished epoch's last step) are kept; later ones were not finished.
        self.writer, self.global_step = SummaryWriter(str(folder), purge_step=step + 1 if step else None), step

    def step_callback(self, optimizer):
        def on_step(loss, stats, samples, seconds):
            self.global_step += 1
            step, add = self.global_step, self.writer.add_scalar
            add("step/train_loss", loss, step)
            for group in optimizer.param_groups:
                add(f"step/lr/{group.get('name', 'group')}", group["lr"], step)
            add("step/grad_norm", stats["grad_norm"], step)
            if seconds > 0:
                add("step/samples_per_s", samples / seconds, step)
        return on_step

    def epoch(self, entry, step, utterances_per_s):
        """entry: the epoch's line of the fold's history (train_loss, val_loss, val_wa, val_ua, ...), at
        the global step that ends the epoch (one x axis for both kinds of curve)."""
        for key in ("train_loss", "val_loss", *(f"val_{m}" for m in METRICS)):
            if key in entry:
                self.writer.add_scalar(f"epoch/{key}", entry[key], step)
        self.writer.add_scalar("epoch/utterances_per_s", utterances_per_s, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


@dataclass
class FoldTraining:
    """What trains one fold: the model (and its DDP wrapper), loss, optimizer, schedule, batches."""

    model: nn.Module
    trained: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object


def prepare_training(settings, fold, utterances, env):
    """A fresh model with the pretrained encoders, its optimizer, schedule and batches for `fold`."""
    device, rank, world = env.device, env.rank, env.world_size
    torch.manual_seed(settings.seed + fold["fold"])
    model = model_structure.build_model(settings)
    if rank:  # the same initial weights on every rank, but each rank its own dropout draws (as nanoGPT)
        torch.manual_seed(settings.seed + fold["fold"] + 1_000_003 * rank)
    check_lengths(model, utterances)
    model.to(device)
    if model.speech_encoder is not None and not model.finetune_speech and "speech_vector" not in utterances[0]:
        log.info("computing the frozen speech encoder's vectors once for the whole run")
        cache_speech_vectors(model, utterances, settings.eval_batch_size, device, env.amp_dtype, rank, world,
                             progress=env.progress)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    weights, target = None, target_of(settings)
    if settings.class_weights == "balanced" and target.num_classes:
        weights = balanced_class_weights([u["label"] for u in fold["train"] if u["label"] != NO_LABEL],
                                         target.num_classes).to(device)
    optimizer = configure_optimizer(model, settings.lr_encoders, settings.lr_head, settings.weight_decay,
                                    settings.adam_betas, settings.adam_eps, fused=env.amp_dtype is not None)
    loader = training_loader(fold["train"], settings.batch_size, settings.seed, settings.group_by_length, rank, world)
    steps_per_epoch = math.ceil(len(loader) / settings.grad_accum)
    scheduler = make_scheduler(optimizer, settings.scheduler, steps_per_epoch * settings.epochs, settings.warmup)
    criterion = make_target_criterion(target, weights, settings.loss, settings.attribute_loss,
                                      settings.attribute_weight)
    return FoldTraining(model, trained, criterion, optimizer, scheduler, loader)


def resume(training, last_path, env, fold_number):
    """The fold's progress: from last.pt (weights, optimizer, schedule, generators) when an earlier
    invocation finished epochs of it, else from the start."""
    state = {"epoch": 0, "history": [], "best_score": -math.inf, "best_epoch": None, "best_val": None}
    if last_path.exists():
        checkpoint = load_checkpoint(last_path, "delete it to train this fold again from its first epoch")
        training.model.load_trained_state_dict(checkpoint["model"])
        training.optimizer.load_state_dict(checkpoint["optimizer"])
        training.scheduler.load_state_dict(checkpoint["scheduler"])
        state = checkpoint["state"]
        set_rng_state(checkpoint["rng"], env.rank, env.device)
        log.info(f"fold {fold_number}: resuming after epoch {state['epoch']} from {last_path}")
    return state


def epoch_figures(select_by, target, val, val_loss, improved):
    """The epoch's validation figures for its log line: the loss, WA and UA (the classes), CCC per attribute
    and their mean (the attributes), and the figure --select-by chooses by when it is none of these (weighted
    F1, the mean of UA and CCC); the star, on the epoch whose weights are kept, follows that figure."""
    metric = SELECT_BY[select_by][0]
    star = " *" if improved else ""
    parts = [("loss", f"val loss {val_loss:.4f}", select_by == "val_loss")]
    if target.num_classes:
        parts += [("wa", f"val WA {val['wa']:.4f}", False), ("ua", f"UA {val['ua']:.4f}", metric == "ua")]
        if metric in ("macro_f1", "weighted_f1"):
            parts.append((metric, f"{METRICS[metric]} {val[metric]:.4f}", True))
    if target.num_attributes:
        parts.append(("ccc", "val CCC " + " ".join(f"{a} {val[f'{a}_ccc']:.4f}" for a in target.attributes)
                      + f" mean {val['ccc']:.4f}", metric == "ccc"))
    if isinstance(metric, tuple):
        parts.append(("chooses", f"(UA + CCC) / 2 {np.mean([val[m] for m in metric]):.4f}", True))
    # the star after the figure that chose; "last" (or a figure not shown) puts it at the end, as before
    chosen = [i for i, part in enumerate(parts) if part[2]]
    at = chosen[0] if chosen else len(parts) - 1
    if select_by == "val_ua" and target.num_classes:  # the default's line, as it always read
        at = [i for i, part in enumerate(parts) if part[0] == "ua"][0]
    return "  ".join(text + (star if i == at else "") for i, (_, text, _) in enumerate(parts))


def end_of_epoch(settings, fold, training, state, epoch, train_loss, fold_dir, env):
    """Validate, keep the best weights (best.pt), step newbob, save last.pt; -> the log line's notes."""
    device, amp, rank, world = env.device, env.amp_dtype, env.rank, env.world_size
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    # The validation loss is the training loss's kind (cross-entropy unless a recipe or the target says otherwise).
    target = target_of(settings)
    loss_fn = None
    if settings.loss != "cross_entropy" or target.num_attributes:
        loss_fn = copy.deepcopy(training.criterion).cpu()
    val, _, val_loss = validation_function.evaluate(model, fold["val"], settings.eval_batch_size, device,
                                                    settings.classes, amp, rank, world, loss_fn=loss_fn, target=target)
    lr = max(g["lr"] for g in optimizer.param_groups)
    metrics = run_metrics(settings.target, list(target.attributes))
    state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                             **{f"val_{metric}": val[metric] for metric in metrics}, "lr": lr})
    # The tested checkpoint: best validation UA (default), lowest validation loss, or the last epoch.
    score = selection_score(settings.select_by, val, val_loss, epoch + 1)
    improved = score > state["best_score"]
    # Early stopping on the validation loss, as the original's main.py (--patience; 0: never).
    if state.get("lowest_val_loss") is None or val_loss < state["lowest_val_loss"]:
        state["lowest_val_loss"], state["epochs_without_lower_loss"] = val_loss, 0
    else:
        state["epochs_without_lower_loss"] = state.get("epochs_without_lower_loss", 0) + 1
    if settings.patience and state["epochs_without_lower_loss"] >= settings.patience:
        state["stopped_early"] = epoch + 1
    if improved:
        state.update(best_score=score, best_epoch=epoch + 1, best_val=dict(val, loss=val_loss))
        if rank == 0:
            save_checkpoint(fold_dir / "best.pt", {"model": model.trained_state_dict(), "epoch": epoch + 1,
                                                   "fold": fold["fold"], "classes": list(settings.classes), "val": val})
    note = f"{epoch_figures(settings.select_by, target, val, val_loss, improved)}  lr {lr:.2e}"
    if state.get("stopped_early"):
        note += f"  early stop: no lower validation loss for {settings.patience} epochs"
    # newbob steps on validation UA, or on mean CCC for a target without classes
    if settings.scheduler == "newbob" and scheduler.step_epoch(val["ua"] if target.num_classes else val["ccc"], model):
        note += f"  newbob: lr halved, back to epoch {state['best_epoch']}'s weights"
    state["epoch"] = epoch + 1
    rng = rng_states(device, world)
    if rank == 0:
        save_checkpoint(fold_dir / "last.pt", {"model": model.trained_state_dict(), "optimizer": optimizer.state_dict(),
                                               "scheduler": scheduler.state_dict(), "state": state, "rng": rng})
    if world > 1:
        dist.barrier()
    return note


def train_fold(settings, fold, utterances, fold_dir, env, budget=None):
    """Train one fold from its first epoch or from where an interrupted run stopped; -> (the model
    with the best epoch's weights loaded, the fold's state: history, best epoch, its validation)."""
    training = prepare_training(settings, fold, utterances, env)
    state = resume(training, fold_dir / "last.pt", env, fold["fold"])
    world = env.world_size
    steps_per_epoch = math.ceil(len(training.loader) / settings.grad_accum)
    board = TensorBoard(fold_dir / "tensorboard", state["epoch"] * steps_per_epoch) if env.rank == 0 else None
    for epoch in range(state["epoch"], settings.epochs):
        if state.get("stopped_early"):
            break
        start = time.time()
        training.loader.batch_sampler.set_epoch(epoch)
        desc = f"fold {fold['fold']} epoch {epoch + 1}/{settings.epochs}"
        try:
            train_loss = train_epoch(
                training.trained, training.loader, training.criterion, training.optimizer, env.device,
                training.scheduler if settings.scheduler != "newbob" else None, settings.grad_accum,
                settings.clip_norm, env.amp_dtype, distributed=world > 1, desc=desc, progress=env.progress,
                on_step=board.step_callback(training.optimizer) if board else None)
        except NonFiniteLossError as error:
            if board:
                board.close()
            last = fold_dir / "last.pt"
            kept = (f"; the last good checkpoint is {last} (epoch {state['epoch']})" if last.exists() else
                    "; no epoch had finished, so there is no checkpoint")
            raise NonFiniteLossError(f"fold {fold['fold']} epoch {epoch + 1}: {error}{kept}. Start a new RUN_DIR "
                                     f"with lower learning rates or --clip-norm") from None
        if world > 1:
            train_loss = sum(gather_from_ranks(train_loss, world)) / world
        note = end_of_epoch(settings, fold, training, state, epoch, train_loss, fold_dir, env)
        seconds = time.time() - start
        if board:
            board.epoch(state["history"][-1], (epoch + 1) * steps_per_epoch, len(fold["train"]) / seconds)
        log.info(f"{desc}: train loss {train_loss:.4f}  {note}  {seconds:.1f}s "
                 f"({len(fold['train']) / seconds:.1f} utt/s)")
        if budget is not None and budget.spend():
            if board:
                board.close()
            raise RunPaused(f"stopped after epoch {epoch + 1} of fold {fold['fold']} (--stop-after-epochs); "
                            f"run the same command again to resume")
    if board:
        board.close()
    best = load_checkpoint(fold_dir / "best.pt", "delete the fold's folder to train it again")
    training.model.load_trained_state_dict(best["model"])
    return training.model, state
