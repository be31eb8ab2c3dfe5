"""Dimensional emotion: the attributes, each corpus's scale, CCC and the loss that trains it.

  ATTRIBUTES            the one name of each attribute, in the order of every model output, table and
                        column this tool writes: valence, arousal, dominance
  MANIFEST_COLUMN       attribute -> utterances.csv's column; arousal is IEMOCAP's `activation`, a column
                        the data contract keeps under its old name (its meaning never changes)
  Scale                 a corpus's range (IEMOCAP_SCALE 1-5, MSP_PODCAST_SCALE 1-7, a CSV corpus's own);
                        to_unit / from_unit: a model regresses [0, 1], reports are on the corpus's scale
  ccc, pearson, mae     one attribute's predictions against its true values (NumPy)
  attribute_metrics     CCC (the headline), Pearson r and MAE per attribute, and their mean
  attribute_loss        torch: 1 - CCC per attribute over the batch, averaged over attributes ("ccc"),
                        or the mean squared error ("mse"), on the unit scale

Names. "Arousal" is the field's word today (the MSP-Podcast challenges, audEERING's models); IEMOCAP
and MSP-Podcast's label file call the same attribute activation (EmoAct). Valence runs from negative
to positive, arousal from calm to active, dominance from weak to strong.

Scales. IEMOCAP gives each utterance the mean of its annotators' 1-5 ratings, MSP-Podcast the mean of
1-7 ratings (EmoVal, EmoAct, EmoDom). A model regresses (value - low) / (high - low), as the MSP-Podcast
challenge baseline does (utils/dataset/dataset.py:63-77 at msplabresearch/MSP-Podcast_Challenge
3f60a42), and its outputs are mapped back before anything is reported. CCC and Pearson r are the same
on either scale (one increasing affine map applied to both sides); MAE is reported on the corpus's own.

CCC (Lin 1989) = 2 cov(p, t) / (var(p) + var(t) + (mean(p) - mean(t))^2), population moments, as the
challenge's scorer and baseline compute it (utils/loss_manager.py:51-75 there). Two edge cases:
- constant predictions (or constant truth) against values that differ from them: cov is 0, so CCC is
  0, not undefined: a constant shows no agreement with how the truth varies, which is what CCC
  measures; it is why predicting every utterance's mean scores 0 while its MAE can look good;
- predictions equal to the truth everywhere and both constant: the formula is 0/0; CCC is 1, the limit
  of Lin's definition 1 - E[(p - t)^2] / (var(p) + var(t) + (mean(p) - mean(t))^2) when every
  deviation is 0: the agreement is perfect.
Pearson r is undefined when either side is constant; it is reported as 0 then (no linear relation
shown), as CCC is. Rows whose true value is unknown (NaN) are left out of that attribute's scores.

The loss. 1 - CCC is computed over the batch, per attribute, and averaged over the attributes that
have true values in the batch. CCC is a property of a set, not of one utterance: where an attribute's
true values in a batch do not vary (a batch of one above all, or a last batch of equal ratings), CCC's
gradient is exactly 0 and, on equal values, the ratio is 0/0; that attribute's term is then the squared
error on the unit scale (at most 1, within 1 - CCC's range of 0 to 2), so a lone batch still teaches the
level and never yields NaN. A batch with no true value for any attribute gives 0 (with a graph, so
backward() works). torch is imported inside the function that uses it.
"""
from dataclasses import dataclass

import numpy as np

ATTRIBUTES = ("valence", "arousal", "dominance")
MANIFEST_COLUMN = {"valence": "valence", "arousal": "activation", "dominance": "dominance"}
LOSSES = ("ccc", "mse")
METRICS = ("ccc", "pearson", "mae")


@dataclass(frozen=True)
class Scale:
    """A corpus's range for an attribute, [low, high]."""

    low: float
    high: float

    def __post_init__(self):
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"a scale runs from a lower to a higher finite number, got [{self.low}, {self.high}]")

    def to_unit(self, values):
        """The corpus's values -> what a model regresses, 0 at low and 1 at high (arrays or tensors)."""
        return (_array(values) - self.low) / (self.high - self.low)

    def from_unit(self, values):
        """A model's outputs -> the corpus's scale."""
        return self.low + _array(values) * (self.high - self.low)

    def contains(self, value):
        return self.low <= value <= self.high

    def as_list(self):
        """As classes.json records it: [low, high]."""
        return [_plain(self.low), _plain(self.high)]


IEMOCAP_SCALE = Scale(1.0, 5.0)
MSP_PODCAST_SCALE = Scale(1.0, 7.0)


def _array(values):
    return np.asarray(values, dtype=np.float64) if isinstance(values, (list, tuple, int, float)) else values


def _plain(x):
    """1.0 -> 1, 2.5 -> 2.5: a scale as a person wrote it."""
    return int(x) if float(x).is_integer() else float(x)


# ------------------------------------------------------------------------------------------------
# metrics (NumPy)

def _pair(pred, true):
    pred, true = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions for {true.size} true values")
    if not np.isfinite(pred).all():
        raise ValueError("a prediction is NaN or infinite")
    known = np.isfinite(true)
    pred, true = pred[known], true[known]
    if pred.size == 0:
        raise ValueError("no true values to score against")
    return pred, true


def ccc(pred, true):
    """Lin's concordance correlation coefficient (module docstring: the constant cases)."""
    p, t = _pair(pred, true)
    dp, dt = p - p.mean(), t - t.mean()
    denominator = np.mean(dp * dp) + np.mean(dt * dt) + (p.mean() - t.mean()) ** 2
    if denominator == 0:  # both constant and equal: every prediction is its true value
        return 1.0
    return float(2 * np.mean(dp * dt) / denominator)


def pearson(pred, true):
    """Pearson's r; 0 when either side is constant (undefined there)."""
    p, t = _pair(pred, true)
    dp, dt = p - p.mean(), t - t.mean()
    spread = np.sqrt(np.sum(dp * dp) * np.sum(dt * dt))
    return float(np.sum(dp * dt) / spread) if spread > 0 else 0.0


def mae(pred, true):
    """Mean absolute error, on the scale the values are given on."""
    p, t = _pair(pred, true)
    return float(np.mean(np.abs(p - t)))


def attribute_metrics(pred, true, attributes=ATTRIBUTES):
    """pred, true: (n, len(attributes)) on the corpus's scale (true NaN: unknown, left out).
    -> {attribute: {"ccc", "pearson", "mae", "n"}, ..., "mean": {"ccc", "pearson", "mae"}}."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != true.shape or pred.shape[1] != len(attributes):
        raise ValueError(f"predictions {pred.shape} and true values {true.shape}: expected (n, {len(attributes)}) "
                         f"for {', '.join(attributes)}")
    scores = {}
    for k, name in enumerate(attributes):
        p, t = pred[:, k], true[:, k]
        scores[name] = {"ccc": ccc(p, t), "pearson": pearson(p, t), "mae": mae(p, t),
                        "n": int(np.isfinite(t).sum())}
    scores["mean"] = {m: float(np.mean([scores[a][m] for a in attributes])) for m in METRICS}
    return scores


# ------------------------------------------------------------------------------------------------
# the loss (torch)

def attribute_loss(pred, target, kind="ccc"):
    """pred, target: (batch, attributes) tensors on the unit scale; target NaN where unknown.
    -> a scalar: the mean over attributes of 1 - CCC over the batch ("ccc") or of the squared error
    ("mse"); an attribute whose true values in the batch do not vary contributes its squared error."""
    import torch
    if kind not in LOSSES:
        raise ValueError(f"unknown attribute loss {kind!r}: use one of {', '.join(LOSSES)}")
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)}: expected (batch, "
                         f"attributes) both")
    terms = []
    for k in range(pred.shape[1]):
        known = torch.isfinite(target[:, k])
        p, t = pred[known, k], target[known, k]
        if p.numel() == 0:
            continue
        if kind == "mse" or bool((t == t[0]).all()):
            terms.append(torch.mean((p - t) ** 2))
            continue
        dp, dt = p - p.mean(), t - t.mean()
        denominator = dp.pow(2).mean() + dt.pow(2).mean() + (p.mean() - t.mean()) ** 2
        terms.append(1 - 2 * (dp * dt).mean() / denominator)  # denominator >= var(t) > 0
    if not terms:
        return pred.sum() * 0.0
    return torch.stack(terms).mean()
