"""Evaluation: predictions over a whole split, THE metrics function, and the per-fold reports.

Writes (when asked by main.py, each atomically): predictions.csv, confusion_matrix.png,
training_curves.png, attention.png.

Metrics are always computed over the whole split at once (never averaged over batches), and
under torchrun over the predictions gathered from every rank.
"""
import csv
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (ConfusionMatrixDisplay, accuracy_score, confusion_matrix, f1_score,
                             recall_score)

from mmser.data_contract import CLASSES
from mmser.dataset_loader import map_utterances, model_inputs
from mmser.utils import atomic_path


def compute_metrics(y_true, y_pred, classes=CLASSES):
    """WA (accuracy), UA (mean per-class recall), macro-/weighted-F1, per-class recall, confusion matrix.

    UA averages over the classes present in y_true (a recall is undefined for an absent class,
    which is then reported as None).
    """
    labels = list(range(len(classes)))
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    present = [r for r in recalls if not math.isnan(r)]
    return {
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(np.mean(present)) if present else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "per_class_recall": {c: (None if math.isnan(r) else float(r)) for c, r in zip(classes, recalls)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def one_vs_rest_metrics(y_true, y_pred, classes=CLASSES):
    """Per emotion, the binary task "this emotion or not" scored from the 4-class predictions:
    accuracy and F1 (weighted over the two outcomes), as Siriwardhana et al. report IEMOCAP
    (their emotion_prediction_cri.py scores each emotion's 2-way decision this way). These are
    not comparable with 4-class UA. -> {"ovr_<class>_accuracy": ..., "ovr_<class>_f1": ...}."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {}
    for k, name in enumerate(classes):
        truth, guess = y_true == k, y_pred == k
        out[f"ovr_{name}_accuracy"] = float(accuracy_score(truth, guess))
        out[f"ovr_{name}_f1"] = float(f1_score(truth, guess, average="weighted", zero_division=0))
    return out


@torch.no_grad()
def predict(model, utterances, batch_size, device, amp_dtype=None, rank=0, world_size=1, progress=False):
    """Run the model over utterances (each rank its share, then gathered): -> dict of
    names, labels (N,), logits (N, C), probs (N, C), attention (N, heads, slots) or None,
    in the order of `utterances`."""
    model.eval()

    def run(batch):
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, attention = model(**model_inputs(batch, device))
        logits = logits.float().cpu()
        return zip(logits, attention.float().cpu() if attention is not None else [None] * len(logits))

    rows = map_utterances(run, utterances, batch_size, rank, world_size, "evaluate", progress)
    logits = torch.stack([row[0] for row in rows]) if rows else torch.empty(0, model.num_classes)
    has_attention = bool(rows) and rows[0][1] is not None
    return {
        "names": [item["name"] for item in utterances],
        "labels": np.array([item["label"] for item in utterances], dtype=np.int64),
        "logits": logits.numpy(),
        "probs": torch.softmax(logits, -1).numpy(),
        "attention": torch.stack([row[1] for row in rows]).numpy() if has_attention else None,
    }


def evaluate(model, utterances, batch_size, device, classes, amp_dtype=None, rank=0, world_size=1, progress=False,
             loss_fn=None):
    """-> (metrics, predictions, mean loss) over the whole split: cross-entropy, or loss_fn's (on the CPU)."""
    predictions = predict(model, utterances, batch_size, device, amp_dtype, rank, world_size, progress)
    labels = predictions["labels"]
    logits, targets = torch.from_numpy(predictions["logits"]), torch.from_numpy(labels)
    loss = float(F.cross_entropy(logits, targets) if loss_fn is None else loss_fn(logits, targets))
    return compute_metrics(labels, predictions["probs"].argmax(1), classes), predictions, loss


def write_predictions_csv(path, predictions, classes=CLASSES):
    """name, true, predicted, p_<class>... one row per utterance."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "true", "predicted"] + [f"p_{c}" for c in classes])
        for name, label, probs in zip(predictions["names"], predictions["labels"], predictions["probs"]):
            writer.writerow([name, classes[label], classes[int(np.argmax(probs))]] + [f"{p:.6f}" for p in probs])


def _save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def _figure(**kwargs):
    # Figure without pyplot: no global state and no GUI backend, safe in any process.
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def plot_confusion_matrix(matrix, path, title, classes=CLASSES):
    """The counts, and beside them each row divided by its total (the per-class recall on the
    diagonal), so that a small class's errors show as plainly as a large one's."""
    matrix = np.array(matrix)
    totals = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    fig = _figure(figsize=(9, 4))
    counts, rows = fig.subplots(1, 2)
    ConfusionMatrixDisplay(matrix, display_labels=list(classes)).plot(ax=counts, colorbar=False, cmap="Blues")
    counts.set_title("counts")
    ConfusionMatrixDisplay(normalised, display_labels=list(classes)).plot(ax=rows, colorbar=False, cmap="Blues",
                                                                           values_format=".2f")
    rows.images[-1].set_clim(0, 1)
    rows.set_title("share of each true class (rows sum to 1)")
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_training_curves(history, path, title, num_classes=len(CLASSES), chosen_epoch=None):
    """history: one dict per epoch with train_loss, val_loss, val_wa, val_ua, lr; chosen_epoch, the
    epoch whose weights were tested, is marked on both panels."""
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig = _figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.plot(epochs, [h["val_wa"] for h in history], "o-", label="validation WA")
    right.plot(epochs, [h["val_ua"] for h in history], "o-", label="validation UA")
    right.axhline(1 / num_classes, color="grey", linestyle=":", label="chance UA")
    right.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="validation accuracy")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="black", linestyle="--", linewidth=1, label=f"tested: epoch {chosen_epoch}")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save_figure(fig, path)


def attention_means(attention, labels, num_classes):
    """What the attention figures show, in numbers that pool over folds: the mean attention per head
    (heads x slots) and per true class (classes x slots, heads averaged), with each class's count."""
    per_class = [attention[labels == k].mean((0, 1)).tolist() if (labels == k).any() else None
                 for k in range(num_classes)]
    return {"n": int(len(attention)), "per_head": attention.mean(0).tolist(), "per_class": per_class,
            "per_class_n": [int((labels == k).sum()) for k in range(num_classes)]}


def plot_attention(attention, labels, path, title, classes=CLASSES):
    """Mean attention of the context branch over the context slots -c..+c: per head, and per true class."""
    _plot_attention_means(attention_means(attention, labels, len(classes)), path, title, classes)


def pool_attention_means(means):
    """attention_means of several folds as one: each fold weighted by its utterances (per class, by
    that class's), so the pooled figure is that of all test utterances at once."""
    n = np.array([m["n"] for m in means], dtype=float)
    per_head = np.einsum("f,fhs->hs", n, np.array([m["per_head"] for m in means])) / n.sum()
    per_class = []
    for k in range(len(means[0]["per_class"])):
        rows = [(m["per_class_n"][k], m["per_class"][k]) for m in means if m["per_class"][k] is not None]
        weight = sum(w for w, _ in rows)
        per_class.append((sum(w * np.array(r) for w, r in rows) / weight).tolist() if weight else None)
    return {"n": int(n.sum()), "per_head": per_head.tolist(), "per_class": per_class,
            "per_class_n": [sum(m["per_class_n"][k] for m in means) for k in range(len(per_class))]}


def plot_pooled_attention(means, path, title, classes=CLASSES):
    """attention_means of several folds pooled (pool_attention_means) into one figure."""
    _plot_attention_means(pool_attention_means(means), path, title, classes)


def _plot_attention_means(means, path, title, classes):
    """A diverging colour scale centred on uniform attention (1 / slots): white where a head weighs
    every slot alike, red where it looks more, blue where less. A scale from 0 (as before) coloured
    nearly uniform weights all one shade and hid the differences that matter."""
    from matplotlib.colors import TwoSlopeNorm
    per_head = np.array(means["per_head"])
    slots = per_head.shape[1]
    per_class = np.array([row if row is not None else [np.nan] * slots for row in means["per_class"]])
    c, uniform = slots // 2, 1 / slots
    largest = max(np.nanmax(np.abs(per_head - uniform)), np.nanmax(np.abs(per_class - uniform)), 1e-3)
    norm = TwoSlopeNorm(vcenter=uniform, vmin=max(uniform - largest, 0), vmax=uniform + largest)
    fig = _figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    for ax, matrix, rows, name in ((left, per_head, [f"head {h + 1}" for h in range(len(per_head))], "per head"),
                                   (right, per_class, list(classes), "per true class (heads averaged)")):
        image = ax.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(slots), [f"{j:+d}" if j else "0" for j in range(-c, c + 1)])
        ax.set_yticks(range(len(rows)), rows)
        ax.set(xlabel="context slot (utterances before / after)", title=name)
        fig.colorbar(image, ax=ax, label=f"attention (uniform = {uniform:.3f})")
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_layer_weights(weights, path, title):
    """The speech branch's learned softmax weights over the encoder's layers (0: the embedding output),
    against the equal weights it started from: which layers carry emotion."""
    fig = _figure(figsize=(max(4.0, 0.3 * len(weights) + 2), 3))
    ax = fig.subplots()
    ax.bar(range(len(weights)), weights, color="tab:blue")
    ax.axhline(1 / len(weights), color="grey", linestyle=":", label="start (equal)")
    ax.set(xlabel="layer (0: embedding output)", ylabel="weight", title=title)
    ax.legend()
    _save_figure(fig, path)


def write_fold_reports(fold_dir, predictions, test, history, classes, title, chosen_epoch=None):
    """A fold's test predictions and figures: predictions.csv, confusion_matrix.png,
    training_curves.png (chosen_epoch marked), and attention.png when the context branch is there."""
    fold_dir = Path(fold_dir)
    write_predictions_csv(fold_dir / "predictions.csv", predictions, classes)
    plot_confusion_matrix(test["confusion_matrix"], fold_dir / "confusion_matrix.png",
                          f"{title}  UA {test['ua']:.3f}  WA {test['wa']:.3f}", classes)
    plot_training_curves(history, fold_dir / "training_curves.png", title, len(classes), chosen_epoch)
    if predictions["attention"] is not None:
        plot_attention(predictions["attention"], predictions["labels"], fold_dir / "attention.png",
                       f"{title}: context attention", classes)
