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

from data_contract import CLASSES
from dataset_loader import map_utterances, model_inputs
from utils import atomic_path


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


def evaluate(model, utterances, batch_size, device, classes, amp_dtype=None, rank=0, world_size=1, progress=False):
    """-> (metrics, predictions, mean cross-entropy) over the whole split."""
    predictions = predict(model, utterances, batch_size, device, amp_dtype, rank, world_size, progress)
    labels = predictions["labels"]
    loss = float(F.cross_entropy(torch.from_numpy(predictions["logits"]), torch.from_numpy(labels)))
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
    fig = _figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.array(matrix), display_labels=list(classes)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title)
    _save_figure(fig, path)


def plot_training_curves(history, path, title, num_classes=len(CLASSES)):
    """history: one dict per epoch with train_loss, val_loss, val_wa, val_ua, lr."""
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig = _figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    left.legend()
    right.plot(epochs, [h["val_wa"] for h in history], "o-", label="validation WA")
    right.plot(epochs, [h["val_ua"] for h in history], "o-", label="validation UA")
    right.axhline(1 / num_classes, color="grey", linestyle=":", label="chance UA")
    right.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="validation accuracy")
    right.legend()
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_attention(attention, labels, path, title, classes=CLASSES):
    """Mean attention of the context branch over the context slots -c..+c: per head, and per true class."""
    heads, slots = attention.shape[1:]
    c = slots // 2
    fig = _figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    for ax, matrix, rows, name in (
            (left, attention.mean(0), [f"head {h + 1}" for h in range(heads)], "per head"),
            (right, np.stack([attention[labels == k].mean((0, 1)) if (labels == k).any() else np.zeros(slots)
                              for k in range(len(classes))]), list(classes), "per true class (heads averaged)")):
        image = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xticks(range(slots), [f"{j:+d}" if j else "0" for j in range(-c, c + 1)])
        ax.set_yticks(range(len(rows)), rows)
        ax.set(xlabel="context slot (utterances before / after)", title=name)
        fig.colorbar(image, ax=ax)
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


def write_fold_reports(fold_dir, predictions, test, history, classes, title):
    """A fold's test predictions and figures: predictions.csv, confusion_matrix.png,
    training_curves.png, and attention.png when the context branch is there."""
    fold_dir = Path(fold_dir)
    write_predictions_csv(fold_dir / "predictions.csv", predictions, classes)
    plot_confusion_matrix(test["confusion_matrix"], fold_dir / "confusion_matrix.png",
                          f"{title}  UA {test['ua']:.3f}  WA {test['wa']:.3f}", classes)
    plot_training_curves(history, fold_dir / "training_curves.png", title, len(classes))
    if predictions["attention"] is not None:
        plot_attention(predictions["attention"], predictions["labels"], fold_dir / "attention.png",
                       f"{title}: context attention", classes)
