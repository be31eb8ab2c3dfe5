"""The run's target: what the model's head outputs, the loss that trains it and the figures that score it.

  TARGETS           categorical (the emotion classes), dimensional (the attributes: valence, arousal,
                    dominance, as mmser/dimensional.py names them), both (the classes and the attributes
                    from one head: its first outputs are the class logits, the rest the attributes)
  Target            one run's target: its classes and attributes (with their scales), the head's width,
                    split(outputs), values(...) on the corpus's scale, metrics(predictions)
  target_of(settings)  the Target of a run's settings (mmser.settings.RunSettings, config.json)
  compute_metrics(y_true, y_pred, classes)       THE classes' metrics: WA, UA, F1s, recalls, confusion matrix
  one_vs_rest_metrics(y_true, y_pred, classes)   each emotion's binary task, as Siriwardhana et al. report it
The loss that trains a target is train_function's (make_criterion: the classes' loss as it always was,
so categorical runs are byte-identical; TargetLoss: 1 - CCC per attribute, dimensional.attribute_loss, MSE
as the option, plus for both the classes' loss, the attributes' weighted by --attribute-weight).
Nothing here imports torch (compare_runs.py and main.py's --help read reporting, which reads this).

An utterance's label is -1 where it has none (an utterance trained on its attributes only: --attribute-
utterances rated, or a withheld partition's, predicted and never scored); its attribute values are kept on
the corpus's scale (attribute_values, what is scored) and on the unit scale the model regresses
(attributes, what the loss reads), NaN where unknown. The categorical part scores and trains on the labelled
utterances, each attribute on the utterances that have its value.
"""
import math

import numpy as np

from mmser.data_contract import CLASSES
from mmser.dimensional import ATTRIBUTES, Scale, attribute_metrics

TARGETS = ("categorical", "dimensional", "both")
NO_LABEL = -1


class Target:
    """One run's target (module docstring); attributes: {attribute: dimensional.Scale}, in ATTRIBUTES order."""

    def __init__(self, name, classes=(), attributes=None):
        if name not in TARGETS:
            raise ValueError(f"unknown target {name!r}: use one of {', '.join(TARGETS)}")
        self.name = name
        self.classes = list(classes) if name != "dimensional" else []
        self.attributes = {a: s for a, s in (attributes or {}).items()} if name != "categorical" else {}
        if name != "categorical" and not self.attributes:
            raise ValueError(f"target {name}: no attributes to regress")

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def num_attributes(self):
        return len(self.attributes)

    @property
    def width(self):
        """The head's outputs: the class logits first, then one value per attribute."""
        return self.num_classes + self.num_attributes

    def split(self, outputs):
        """The head's outputs (n, width) -> (class logits (n, classes), attribute values (n, attributes)) on
        the unit scale; works on arrays and tensors alike."""
        return outputs[:, :self.num_classes], outputs[:, self.num_classes:]

    def row_values(self, row):
        """A manifest row's attribute values on the corpus's scale, NaN where unknown."""
        from mmser.dimensional import MANIFEST_COLUMN
        return [float(row[MANIFEST_COLUMN[a]]) for a in self.attributes]

    def unit(self, values):
        """(n, attributes) on each attribute's own scale -> the unit scale the model regresses."""
        values = np.asarray(values, dtype=np.float64)
        if not self.num_attributes:
            return values
        values = values.reshape(-1, self.num_attributes)
        return np.stack([scale.to_unit(values[:, k]) for k, scale in enumerate(self.attributes.values())], axis=1)

    def values(self, unit):
        """(n, attributes) on the unit scale -> on each attribute's own scale (NaN stays NaN)."""
        unit = np.asarray(unit, dtype=np.float64)
        if not self.num_attributes:
            return unit
        unit = unit.reshape(-1, self.num_attributes)
        return np.stack([scale.from_unit(unit[:, k]) for k, scale in enumerate(self.attributes.values())], axis=1)

    def metrics(self, predictions):
        """The split's figures from validation_function.predict's dictionary: compute_metrics' on the labelled
        utterances (categorical part), and per attribute CCC, Pearson r and MAE with their means, on the
        corpus's scale (reporting.METRICS names them all)."""
        out = {}
        if self.num_classes:
            labels, guesses = predictions["labels"], predictions["probs"].argmax(1)
            known = labels != NO_LABEL
            if not known.all():
                labels, guesses = labels[known], guesses[known]
            out.update(compute_metrics(labels, guesses, self.classes))
        if self.num_attributes:
            out.update(flat_attribute_metrics(self.values(predictions["attribute_outputs"]),
                                              predictions["attributes_true"], list(self.attributes)))
        return out


def flat_attribute_metrics(pred, true, attributes):
    """dimensional.attribute_metrics as flat keys: ccc, pearson, mae (means over the attributes), then
    <attribute>_ccc, <attribute>_pearson, <attribute>_mae, and "attribute_n" (values scored, per attribute)."""
    from mmser.dimensional import METRICS
    missing = [a for k, a in enumerate(attributes) if not np.isfinite(true[:, k]).any()]
    if missing:
        raise ValueError(f"no true value of {', '.join(missing)} to score against")
    scores = attribute_metrics(pred, true, attributes)
    out = {}
    for metric in METRICS:
        out[metric] = scores["mean"][metric]
        out.update({f"{a}_{metric}": scores[a][metric] for a in attributes})
    out["attribute_n"] = {a: scores[a]["n"] for a in attributes}
    return out


def target_of(settings):
    """The Target of a run's settings: its target, classes and attributes (config.json's {name: [low, high]})."""
    attributes = {a: Scale(*settings.attributes[a]) for a in ATTRIBUTES if a in (settings.attributes or {})}
    return Target(settings.target, settings.classes or (), attributes)


# ------------------------------------------------------------------------------------------------
# scoring the classes

def compute_metrics(y_true, y_pred, classes=CLASSES):
    """WA (accuracy), UA (mean per-class recall), macro-/weighted-F1, per-class recall, confusion matrix.

    UA averages over the classes present in y_true (a recall is undefined for an absent class,
    which is then reported as None).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score
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
    from sklearn.metrics import accuracy_score, f1_score
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {}
    for k, name in enumerate(classes):
        truth, guess = y_true == k, y_pred == k
        out[f"ovr_{name}_accuracy"] = float(accuracy_score(truth, guess))
        out[f"ovr_{name}_f1"] = float(f1_score(truth, guess, average="weighted", zero_division=0))
    return out
