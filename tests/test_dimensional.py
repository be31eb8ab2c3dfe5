"""Dimensional attributes: the scores (CCC, Pearson r, MAE), the loss that trains CCC, the scales, and
where a DATA_DIR records which attributes its corpus rates (classes.json)."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from mmser.data_contract import (CLASSES_RECORD, DataError, attributes_record, check_attribute_values, classes_bytes,
                                 read_attributes, read_manifest, read_withheld)
from mmser.dimensional import (IEMOCAP_SCALE, MSP_PODCAST_SCALE, Scale, attribute_loss, attribute_metrics, ccc, mae,
                               pearson)


def lin_ccc(x, y):
    """Lin's CCC in its other form, 1 - mean squared deviation / its value under independence, written out."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx, vy = sum((a - mx) ** 2 for a in x) / n, sum((b - my) ** 2 for b in y) / n
    msd = sum((a - b) ** 2 for a, b in zip(x, y)) / n
    return 1 - msd / (vx + vy + (mx - my) ** 2)


# ------------------------------------------------------------------------------------------------
# the scores

def test_ccc_on_hand_made_vectors():
    x = [1.0, 2.0, 3.0]
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc([3.0, 2.0, 1.0], x) == pytest.approx(-1.0)  # cov -2/3 over variances 2/3 + 2/3
    assert ccc([2.0, 3.0, 4.0], x) == pytest.approx(4 / 7)  # perfectly correlated, shifted by 1: 4/3 / (4/3 + 1)
    assert ccc([2.0, 4.0, 6.0], x) == pytest.approx(lin_ccc([2.0, 4.0, 6.0], x))
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, t = rng.normal(3, 1, 40), rng.normal(3.5, 0.7, 40)
        assert ccc(p, t) == pytest.approx(lin_ccc(list(p), list(t)), abs=1e-12)


def test_ccc_of_constant_predictions_is_zero_and_of_exact_constants_one():
    # A constant shows no agreement with how the truth varies: 0, however close its level.
    assert ccc([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert ccc([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0  # constant truth, varying predictions
    assert ccc([2.0, 2.0], [3.0, 3.0]) == 0.0  # both constant, apart
    assert ccc([2.5, 2.5], [2.5, 2.5]) == 1.0  # every prediction is its true value: perfect agreement
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0  # undefined; reported as no relation


def test_pearson_and_mae_agree_with_scipy_and_numpy_and_unknown_truth_is_left_out():
    rng = np.random.default_rng(1)
    p, t = rng.normal(0, 1, 50), rng.normal(0, 1, 50) + 0.5 * np.arange(50) / 50
    assert pearson(p, t) == pytest.approx(pearsonr(p, t)[0], abs=1e-12)
    assert mae(p, t) == pytest.approx(np.mean(np.abs(p - t)))
    t_unknown = t.copy()
    t_unknown[[3, 7]] = np.nan
    keep = np.isfinite(t_unknown)
    assert ccc(p, t_unknown) == pytest.approx(ccc(p[keep], t[keep]))
    with pytest.raises(ValueError, match="NaN"):
        ccc(np.full(3, np.nan), [1.0, 2.0, 3.0])


def test_attribute_metrics_per_attribute_and_their_mean():
    rng = np.random.default_rng(2)
    true = rng.uniform(1, 7, (30, 3))
    pred = true + rng.normal(0, [0.3, 1.0, 2.0], (30, 3))
    scores = attribute_metrics(pred, true)
    assert list(scores) == ["valence", "arousal", "dominance", "mean"]
    assert scores["arousal"]["ccc"] == pytest.approx(ccc(pred[:, 1], true[:, 1]))
    # less noise, more agreement
    assert scores["valence"]["ccc"] > scores["arousal"]["ccc"] > scores["dominance"]["ccc"]
    assert scores["mean"]["mae"] == pytest.approx(np.mean(np.abs(pred - true)))
    assert scores["dominance"]["n"] == 30
    with pytest.raises(ValueError, match=r"expected \(n, 3\)"):
        attribute_metrics(pred[:, :2], true[:, :2])


# ------------------------------------------------------------------------------------------------
# the loss

def test_a_step_against_the_loss_gradient_raises_ccc():
    torch.manual_seed(0)
    target = torch.rand(16, 3, dtype=torch.float64)
    pred = (0.3 * target + 0.2 * torch.rand(16, 3, dtype=torch.float64)).requires_grad_()
    loss = attribute_loss(pred, target)
    assert loss.item() == pytest.approx(1 - np.mean([ccc(pred.detach()[:, k], target[:, k]) for k in range(3)]))
    loss.backward()
    stepped = (pred - 0.5 * pred.grad).detach()
    for k in range(3):
        assert ccc(stepped[:, k], target[:, k]) > ccc(pred.detach()[:, k], target[:, k])


def test_loss_on_a_batch_of_one_and_on_unknown_targets_and_as_mse():
    # A batch of one has no spread to agree with: its squared error teaches the level, never NaN.
    pred = torch.tensor([[0.2, 0.9, 0.5]], requires_grad=True)
    target = torch.tensor([[0.6, 0.1, 0.5]])
    loss = attribute_loss(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert loss.item() == pytest.approx(((0.2 - 0.6) ** 2 + (0.9 - 0.1) ** 2 + 0.0) / 3)
    assert ((pred - 0.5 * pred.grad - target).abs() <= (pred - target).abs()).all()
    # Unknown targets (NaN) leave their attribute's term out; none known at all gives 0 with a graph.
    pred = torch.tensor([[0.1, 0.2], [0.4, 0.3], [0.8, 0.9]], requires_grad=True)
    target = torch.tensor([[0.0, float("nan")], [0.5, float("nan")], [1.0, float("nan")]])
    assert attribute_loss(pred, target).item() == pytest.approx(1 - ccc([0.1, 0.4, 0.8], [0.0, 0.5, 1.0]))
    empty = attribute_loss(pred, torch.full((3, 2), float("nan")))
    empty.backward()
    assert empty.item() == 0.0
    p, t = torch.rand(8, 3), torch.rand(8, 3)
    assert attribute_loss(p, t, "mse").item() == pytest.approx(torch.nn.functional.mse_loss(p, t).item())
    with pytest.raises(ValueError, match="unknown attribute loss"):
        attribute_loss(p, t, "l1")


# ------------------------------------------------------------------------------------------------
# scales

def test_scales_round_trip_and_ccc_is_the_same_on_either_scale():
    values = np.array([1.0, 2.5, 4.0, 7.0])
    unit = MSP_PODCAST_SCALE.to_unit(values)
    assert unit[0] == 0.0 and unit[-1] == 1.0
    assert MSP_PODCAST_SCALE.from_unit(unit) == pytest.approx(values)
    assert IEMOCAP_SCALE.from_unit(IEMOCAP_SCALE.to_unit(torch.tensor([1.0, 3.0, 5.0]))).tolist() == [1.0, 3.0, 5.0]
    pred = np.array([2.0, 3.0, 3.5, 6.0])
    assert ccc(MSP_PODCAST_SCALE.to_unit(pred), unit) == pytest.approx(ccc(pred, values))
    assert mae(MSP_PODCAST_SCALE.to_unit(pred), unit) * 6 == pytest.approx(mae(pred, values))
    assert Scale(1, 5).as_list() == [1, 5] and Scale(-1, 0.5).as_list() == [-1, 0.5]
    with pytest.raises(ValueError):
        Scale(5, 1)


# ------------------------------------------------------------------------------------------------
# where a DATA_DIR records its attributes

MANIFEST_HEADER = ("name,utterance_id,session,dialog,speaker,gender,start,end,emotion,label,valence,activation,"
                   "dominance,transcript\n")


def write_data_dir(folder, values, record=None):
    """A minimal DATA_DIR: one manifest row per (valence, activation, dominance) cell triple."""
    folder.mkdir()
    lines = [f"{i}_s_1_neu,u{i},1,d,s,F,0,1,neu,neu,{v},{a},{d},hello\n" for i, (v, a, d) in enumerate(values)]
    (folder / "utterances.csv").write_text(MANIFEST_HEADER + "".join(lines))
    if record is not None:
        (folder / CLASSES_RECORD).write_text(json.dumps(record))
    return folder


def test_a_data_dir_written_before_the_record_reads_its_attributes_from_the_manifest(tmp_path):
    # IEMOCAP's (mocap_data_collect.py): every row rated, no "attributes" key: IEMOCAP's 1-5.
    iemocap = write_data_dir(tmp_path / "iemocap", [(2.5, 3, 3.5), (4, 2, 1)], {"classes": ["neu", "sad"]})
    assert read_attributes(iemocap) == {"valence": IEMOCAP_SCALE, "arousal": IEMOCAP_SCALE, "dominance": IEMOCAP_SCALE}
    (iemocap / CLASSES_RECORD).unlink()  # older still: no classes.json at all
    assert list(read_attributes(iemocap)) == ["valence", "arousal", "dominance"]
    # MELD's or a CSV corpus's: no values, no attributes; a partly rated manifest without a record is refused.
    meld = write_data_dir(tmp_path / "meld", [("", "", ""), ("", "", "")], {"classes": ["neu", "sad"]})
    assert read_attributes(meld) == {}
    mixed = write_data_dir(tmp_path / "mixed", [(2, 3, 3), ("", "", "")], {"classes": ["neu", "sad"]})
    with pytest.raises(DataError, match="utterances.csv: some utterances have valence"):
        read_attributes(mixed)
    assert read_withheld(iemocap) == []


def test_the_attributes_record_is_read_checked_and_names_its_file(tmp_path):
    scales = {"valence": MSP_PODCAST_SCALE, "arousal": MSP_PODCAST_SCALE}
    record = json.loads(classes_bytes(["neu", "sad"], attributes=attributes_record(scales), withheld=["test3"]))
    assert record["attributes"] == {"valence": [1, 7], "arousal": [1, 7]}
    folder = write_data_dir(tmp_path / "msp", [(1, 7, ""), (6.5, 2, "")], record)
    assert read_attributes(folder) == scales and read_withheld(folder) == ["test3"]
    check_attribute_values(folder, read_manifest(folder), scales)
    bad_value = write_data_dir(tmp_path / "outside", [(1, 7, ""), (7.5, 2, "")], record)
    with pytest.raises(DataError, match=r"utterances.csv:3: valence \(valence\) 7.5 lies outside its scale \[1, 7\]"):
        check_attribute_values(bad_value, read_manifest(bad_value), scales)
    for attributes, problem in (({"activation": [1, 5]}, "unknown attribute.*'activation'.*activation is arousal"),
                                ({"valence": [5, 1]}, "scale of valence must be"),
                                ({"valence": "1-7"}, "scale of valence must be"),
                                ([1, 7], "must map attribute names")):
        (folder / CLASSES_RECORD).write_text(json.dumps({"classes": ["neu", "sad"], "attributes": attributes}))
        with pytest.raises(DataError, match=problem) as err:
            read_attributes(folder)
        assert str(err.value).startswith(str(folder / CLASSES_RECORD))
    (folder / CLASSES_RECORD).write_text(json.dumps({"classes": ["neu", "sad"], "withheld": ["test9"]}))
    with pytest.raises(DataError, match="withheld"):
        read_withheld(folder)
    assert math.isnan(read_manifest(folder)[0]["dominance"])


# ------------------------------------------------------------------------------------------------
# the synthetic corpus's attributes follow what its audio and words carry

def test_synthetic_iemocap_attributes_follow_loudness_and_words_not_only_the_emotion(tmp_path):
    from fixtures.synthetic_iemocap import make_corpus, word_shares
    from mmser.utils import read_audio
    truth = make_corpus(tmp_path / "corpus", seed=5, dialogues_per_session=2, utterances_per_dialogue=10)
    utts = truth["utterances"]
    loudness = np.array([20 * np.log10(np.sqrt(np.mean(read_audio(tmp_path / "corpus" / u["wav"])[0] ** 2)))
                         for u in utts])
    words = [word_shares(u["transcript"]) for u in utts]
    tone = np.array([w["positive"] - w["negative"] for w in words])
    arousal, valence = np.array([u["activation"] for u in utts]), np.array([u["valence"] for u in utts])
    assert pearson(arousal, loudness) > 0.85 and pearson(valence, tone) > 0.85
    # Within one emotion the values still follow the signal: a model must hear and read them.
    neutral = [i for i, u in enumerate(utts) if u["emotion"] == "neu"]
    assert len(neutral) > 10 and pearson(arousal[neutral], loudness[neutral]) > 0.3
    assert pearson(valence[neutral], tone[neutral]) > 0.3
    assert all(1 <= u[c] <= 5 for u in utts for c in ("valence", "activation", "dominance"))
