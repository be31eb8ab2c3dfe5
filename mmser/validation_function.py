"""Evaluation: predictions over a whole split, scored by the run's target (mmser/targets.py: compute_metrics
for the classes), and the per-fold reports.

Writes (when asked by main.py, each atomically): predictions.csv, confusion_matrix.png,
training_curves.png, attention.png.

Metrics are always computed over the whole split at once (never averaged over batches), and
under torchrun over the predictions gathered from every rank.
"""
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import ConfusionMatrixDisplay

from mmser.data_contract import CLASSES
from mmser.dataset_loader import map_utterances, model_inputs
from mmser.targets import compute_metrics
from mmser.utils import atomic_path


@torch.no_grad()
def predict(model, utterances, batch_size, device, amp_dtype=None, rank=0, world_size=1, progress=False):
    """Run the model over utterances (each rank its share, then gathered): -> dict of
    names, labels (N,) (-1: none), logits (N, C), probs (N, C), attention (N, heads, slots) or None,
    in the order of `utterances`; a model with attribute outputs (model.num_attributes) adds
    attribute_outputs (N, A), its values on the unit scale it regresses, and attributes_true (N, A),
    the utterances' own values on the corpus's scale (NaN where unknown)."""
    model.eval()

    def run(batch):
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs, attention = model(**model_inputs(batch, device))
        outputs = outputs.float().cpu()
        return zip(outputs, attention.float().cpu() if attention is not None else [None] * len(outputs))

    rows = map_utterances(run, utterances, batch_size, rank, world_size, "evaluate", progress)
    num_attributes = getattr(model, "num_attributes", 0)
    outputs = torch.stack([row[0] for row in rows]) if rows else torch.empty(0, model.num_classes + num_attributes)
    logits = outputs[:, :model.num_classes]
    has_attention = bool(rows) and rows[0][1] is not None
    predictions = {
        "names": [item["name"] for item in utterances],
        "labels": np.array([item["label"] for item in utterances], dtype=np.int64),
        "logits": logits.numpy(),
        "probs": torch.softmax(logits, -1).numpy(),
        "attention": torch.stack([row[1] for row in rows]).numpy() if has_attention else None,
    }
    if num_attributes:
        predictions["attribute_outputs"] = outputs[:, model.num_classes:].numpy()
        predictions["attributes_true"] = np.array([item.get("attribute_values", [np.nan] * num_attributes)
                                                   for item in utterances],
                                                  dtype=np.float64).reshape(len(utterances), num_attributes)
    return predictions


def evaluate(model, utterances, batch_size, device, classes, amp_dtype=None, rank=0, world_size=1, progress=False,
             loss_fn=None, target=None):
    """-> (metrics, predictions, mean loss) over the whole split: cross-entropy, or loss_fn's (on the CPU);
    target (targets.Target; None: the classes) says what the model outputs and how it is scored. A
    dimensional target's loss is loss_fn's (train_function.TargetLoss) over the whole split at once."""
    predictions = predict(model, utterances, batch_size, device, amp_dtype, rank, world_size, progress)
    labels = predictions["labels"]
    if target is None or target.name == "categorical":
        logits, targets = torch.from_numpy(predictions["logits"]), torch.from_numpy(labels)
        loss = float(F.cross_entropy(logits, targets) if loss_fn is None else loss_fn(logits, targets))
        return compute_metrics(labels, predictions["probs"].argmax(1), classes), predictions, loss
    outputs = torch.from_numpy(np.concatenate([predictions["logits"], predictions["attribute_outputs"]], axis=1))
    true = torch.from_numpy(target.unit(predictions["attributes_true"]).astype(np.float32))
    loss = float(loss_fn(outputs, torch.from_numpy(labels), true))
    return target.metrics(predictions), predictions, loss


def write_predictions_csv(path, predictions, classes=CLASSES, target=None):
    """name, true, predicted, p_<class>... one row per utterance; with attributes (target: targets.Target),
    true_<attribute>... and <attribute>... (predicted) on the corpus's scale after them (an unknown value,
    or the class of an utterance without one, is an empty cell)."""
    attributes = list(target.attributes) if target is not None else []
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        head = ["name"]
        if classes:
            head += ["true", "predicted"] + [f"p_{c}" for c in classes]
        writer.writerow(head + [f"true_{a}" for a in attributes] + attributes)
        if attributes:
            true, pred = predictions["attributes_true"], target.values(predictions["attribute_outputs"])
        for i, (name, label, probs) in enumerate(zip(predictions["names"], predictions["labels"], predictions["probs"])):
            row = [name]
            if classes:
                row += [classes[label] if label >= 0 else "", classes[int(np.argmax(probs))]] + [f"{p:.6f}" for p in probs]
            if attributes:
                row += ["" if np.isnan(v) else f"{v:.6f}" for v in true[i]] + [f"{v:.6f}" for v in pred[i]]
            writer.writerow(row)


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


def plot_training_curves(history, path, title, num_classes=len(CLASSES), chosen_epoch=None, select_by=None,
                         attributes=()):
    """history: one dict per epoch with train_loss, val_loss, val_wa, val_ua, lr (the classes), val_ccc and
    val_<attribute>_ccc (the attributes); chosen_epoch, the epoch whose weights were tested, is marked on
    every panel. The figure that chose it (--select-by, reporting.SELECT_BY) is drawn too when it is not
    already there (validation weighted F1, say), so the mark can be checked against it."""
    from matplotlib.ticker import MaxNLocator

    from mmser.reporting import METRICS, SELECT_BY
    epochs = [h["epoch"] for h in history]
    chooser = SELECT_BY[select_by][0] if select_by else None
    chooser = [m for m in (chooser if isinstance(chooser, tuple) else (chooser,)) if m]
    panels = (["classes"] if num_classes else []) + (["attributes"] if attributes else [])
    fig = _figure(figsize=(4.5 * (1 + len(panels)), 3.5))
    left, *right = fig.subplots(1, 1 + len(panels))
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    for ax, panel in zip(right, panels):
        if panel == "classes":
            shown = ["wa", "ua"] + [m for m in chooser if m in ("macro_f1", "weighted_f1")]
            ax.axhline(1 / num_classes, color="grey", linestyle=":", label="chance UA")
            ax.set(ylim=(0, 1), ylabel="accuracy, F1", title="validation: classes")
        else:
            shown = [f"{a}_ccc" for a in attributes] + ["ccc"]
            ax.axhline(0, color="grey", linestyle=":", label="no agreement (CCC 0)")
            ax.set(ylim=(min(-0.1, *(h["val_ccc"] for h in history)), 1), ylabel="CCC",
                   title="validation: attributes")
        for m in shown:
            ax.plot(epochs, [h[f"val_{m}"] for h in history], "o-", label=f"validation {METRICS[m]}"
                    + (" (chooses)" if m in chooser else ""), linewidth=2.5 if m in chooser else 1.5)
        ax.set_xlabel("epoch")
    for ax in (left, *right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="black", linestyle="--", linewidth=1, label=f"tested: epoch {chosen_epoch}")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_attributes(true, pred, attributes, path, title):
    """Predicted against true value per attribute (a panel each, on the corpus's scale), with the
    diagonal of perfect agreement and each attribute's CCC: a model that predicts the mean everywhere
    shows a flat band (CCC 0) however small its errors."""
    from mmser.dimensional import ccc
    fig = _figure(figsize=(3.8 * len(attributes), 3.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(attributes)))
    for k, (ax, (name, scale)) in enumerate(zip(axes, attributes.items())):
        known = np.isfinite(true[:, k])
        ax.scatter(true[known, k], pred[known, k], s=12, alpha=0.6)
        ax.plot([scale.low, scale.high], [scale.low, scale.high], color="grey", linestyle=":", label="prediction = truth")
        margin = 0.03 * (scale.high - scale.low)  # predictions beyond the scale stay in sight
        low, high = min(scale.low, pred[known, k].min()) - margin, max(scale.high, pred[known, k].max()) + margin
        ax.set(xlim=(low, high), ylim=(low, high), xlabel=f"true {name}",
               ylabel=f"predicted {name}", title=f"{name}: CCC {ccc(pred[known, k], true[known, k]):.3f}")
        ax.set_aspect("equal")
        ax.legend(fontsize="small", loc="upper left")
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
    per_class = np.array([row if row is not None else [np.nan] * slots for row in means["per_class"]]).reshape(-1, slots)
    c, uniform = slots // 2, 1 / slots
    largest = max(np.nanmax(np.abs(per_head - uniform)),
                  np.nanmax(np.abs(per_class - uniform)) if np.isfinite(per_class).any() else 0, 1e-3)
    norm = TwoSlopeNorm(vcenter=uniform, vmin=max(uniform - largest, 0), vmax=uniform + largest)
    panels = [(per_head, [f"head {h + 1}" for h in range(len(per_head))], "per head")]
    if len(classes):  # a dimensional run has no classes to split the attention by
        panels.append((per_class, list(classes), "per true class (heads averaged)"))
    # One colour bar for both panels (they share the scale), beside the last: a bar between the panels
    # ran its label into the right panel's class names.
    fig = _figure(figsize=(4.5 * len(panels) + 1, 3.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (matrix, rows, name) in zip(axes, panels):
        image = ax.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(slots), [f"{j:+d}" if j else "0" for j in range(-c, c + 1)])
        ax.set_yticks(range(len(rows)), rows)
        ax.set(xlabel="context slot (utterances before / after)", title=name)
    fig.colorbar(image, ax=list(axes), label=f"attention (uniform = {uniform:.3f})")
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_layer_weights(weights, path, title):
    """The speech branch's learned softmax weights over the encoder's layers (0: the embedding output),
    against the equal weights it started from: which layers carry emotion. Whole layers on the axis; the
    legend above the bars, where it hides none."""
    from matplotlib.ticker import MaxNLocator
    fig = _figure(figsize=(max(4.0, 0.3 * len(weights) + 2), 3.3))
    ax = fig.subplots()
    ax.bar(range(len(weights)), weights, color="tab:blue", label="learned weight")
    ax.axhline(1 / len(weights), color="grey", linestyle=":", label="start (equal)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.6, len(weights) - 0.4)
    ax.set(xlabel="layer (0: embedding output)", ylabel="weight")
    ax.set_title(title, pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize="small", frameon=False)
    _save_figure(fig, path)


def write_fold_reports(fold_dir, predictions, test, history, classes, title, chosen_epoch=None, target=None,
                       select_by=None):
    """A fold's test predictions and figures: predictions.csv, confusion_matrix.png (the classes),
    attributes.png (predicted against true per attribute), training_curves.png (chosen_epoch marked, with
    the figure --select-by chose it by), and attention.png when the context branch is there."""
    fold_dir = Path(fold_dir)
    classes = list(classes) if target is None else target.classes
    attributes = target.attributes if target is not None else {}
    write_predictions_csv(fold_dir / "predictions.csv", predictions, classes, target)
    if classes:
        plot_confusion_matrix(test["confusion_matrix"], fold_dir / "confusion_matrix.png",
                              f"{title}  UA {test['ua']:.3f}  WA {test['wa']:.3f}", classes)
    if attributes:
        plot_attributes(predictions["attributes_true"], target.values(predictions["attribute_outputs"]), attributes,
                        fold_dir / "attributes.png", f"{title}: predicted against true (mean CCC {test['ccc']:.3f})")
    plot_training_curves(history, fold_dir / "training_curves.png", title, len(classes), chosen_epoch, select_by,
                         list(attributes))
    if predictions["attention"] is not None:
        plot_attention(predictions["attention"], predictions["labels"], fold_dir / "attention.png",
                       f"{title}: context attention", classes)
