"""Batches, the metrics, the optimizer and schedules, one training step, the frozen-speech cache.

On the small DATA_DIR and tiny encoders of tests/small_runs.py (the data_dir and models_dir fixtures).
"""
import csv
import math

import numpy as np
import pytest
import torch

from mmser import dataset_loader
from mmser import train_function
from mmser import validation_function
from mmser.dataset_loader import EOS, PAD, collate_utterances, load_utterances, pad_tokens, truncate_tokens
from mmser.data_contract import CLASSES, DataError
from mmser.targets import compute_metrics
from small_runs import tiny_model, write_feature_dir


# ------------------------------------------------------------------------------------------------
# data

def test_truncation_keeps_end_of_sentence_last():
    ids = np.array([0, 11, 12, 13, 14, 2], dtype=np.int32)
    assert truncate_tokens(ids, 4).tolist() == [0, 11, 12, EOS]
    assert truncate_tokens(ids, 6) is ids
    with pytest.raises(ValueError):
        truncate_tokens(ids, 1)


def test_batches_pad_to_their_own_longest_with_pad_and_a_mask():
    ids, mask = pad_tokens([torch.tensor([0, 5, 2]), torch.tensor([0, 5, 6, 7, 2])])
    assert ids.tolist() == [[0, 5, 2, PAD, PAD], [0, 5, 6, 7, 2]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_load_utterances_reads_labelled_utterances_and_cuts_tokens(data_dir):
    utterances = load_utterances(data_dir, 1, max_text_tokens=8, max_audio_tokens=12)
    rows = list(csv.DictReader(open(data_dir / "utterances.csv")))
    assert len(utterances) == sum(1 for r in rows if r["label"])
    first = utterances[0]
    assert first["label"] == CLASSES.index(rows[0]["label"])
    assert max(len(u["text_ids"]) for u in utterances) == 8
    assert all(u["text_ids"][-1] == EOS and u["speech_ids"][-1] == EOS for u in utterances)
    assert first["context"].shape == (3, 16) and dataset_loader.context_slice_width(utterances) == 16
    batch = collate_utterances(utterances[:4])
    assert batch["text_ids"].shape[1] == max(len(u["text_ids"]) for u in utterances[:4])
    assert batch["context"].shape == (4, 3, 16) and batch["labels"].tolist() == [u["label"] for u in utterances[:4]]


def test_only_the_chosen_branches_are_loaded(data_dir):
    utterance = load_utterances(data_dir, 1, 8, 8, branches=("context",))[0]
    assert "context" in utterance and "text_ids" not in utterance and "speech_ids" not in utterance


def test_missing_feature_file_is_named(tmp_path):
    data_dir = write_feature_dir(tmp_path / "data", per_dialog=6, sessions=(1,))
    victim = next((data_dir / "vqw2vTokens").iterdir())
    victim.unlink()
    with pytest.raises(DataError, match=victim.name):
        load_utterances(data_dir, 1, 8, 8)
    with pytest.raises(DataError, match="FullBertEmb2"):
        load_utterances(data_dir, 2, 8, 8, branches=("context",))


def test_training_batches_depend_only_on_seed_and_epoch_and_shard_across_ranks(data_dir):
    utterances = load_utterances(data_dir, 1, 100, 100)

    def epoch_batches(epoch, **kw):
        loader = dataset_loader.training_loader(utterances, 8, seed=3, **kw)
        loader.batch_sampler.set_epoch(epoch)
        return [b["index"].tolist() for b in loader]

    assert epoch_batches(1) == epoch_batches(1) != epoch_batches(2)
    assert sorted(i for b in epoch_batches(0) for i in b) == list(range(len(utterances)))
    grouped = epoch_batches(0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(len(utterances)))
    padding = lambda batches: sum(max(len(utterances[i]["text_ids"]) + len(utterances[i]["speech_ids"]) for i in b) * len(b)
                                  for b in batches)
    assert padding(grouped) < padding(epoch_batches(0))
    shards = [set(i for b in epoch_batches(0, rank=r, world_size=2) for i in b) for r in (0, 1)]
    assert shards[0] | shards[1] == set(range(len(utterances)))


# ------------------------------------------------------------------------------------------------
# metrics

def test_metrics_are_computed_over_the_whole_split():
    y_true = [0, 0, 0, 0, 1, 1, 2, 3]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 2]
    m = compute_metrics(y_true, y_pred)
    assert m["wa"] == pytest.approx(5 / 8)
    assert m["ua"] == pytest.approx((3 / 4 + 1 / 2 + 1 + 0) / 4)
    assert m["per_class_recall"] == {"ang": 0.75, "hap": 0.5, "sad": 1.0, "neu": 0.0}
    assert m["confusion_matrix"][0] == [3, 1, 0, 0] and m["confusion_matrix"][3] == [0, 0, 1, 0]
    assert 0 < m["macro_f1"] < m["weighted_f1"] < 1


def test_a_class_absent_from_the_split_has_no_recall_and_does_not_count_in_ua():
    m = compute_metrics([0, 0, 1], [0, 1, 1])
    assert m["per_class_recall"]["sad"] is None
    assert m["ua"] == pytest.approx((0.5 + 1) / 2)


# ------------------------------------------------------------------------------------------------
# optimizer and schedules

def test_pretrained_encoders_and_new_layers_get_their_own_learning_rates(models_dir):
    model = tiny_model(models_dir)
    optimizer = train_function.configure_optimizer(model, lr_encoders=1e-5, lr_head=1e-3)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"encoders": 1e-5, "encoders (no decay)": 1e-5, "head": 1e-3, "head (no decay)": 1e-3}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.speech_encoder.parameters())  # frozen
    assert all(id(p) in in_optimizer for p in model.text_encoder.parameters())


def test_linear_schedule_warms_up_then_decays(models_dir):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = train_function.make_scheduler(optimizer, "linear", total_steps=10, warmup_fraction=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[3] > lrs[4] > lrs[9] > 0


def test_newbob_halves_the_rate_and_restores_a_copy_of_the_best_weights():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    newbob = train_function.make_scheduler(optimizer, "newbob", total_steps=10)
    assert not newbob.step_epoch(0.50, model)
    best = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # training moves on; the kept copy must not follow
    assert not newbob.step_epoch(0.60, model)
    moved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert newbob.step_epoch(0.6005, model)  # improved by less than 0.001
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert torch.equal(model.weight, moved + 1.0)  # 0.6005 was the best: its weights stay
    with torch.no_grad():
        model.weight.add_(1.0)
    assert newbob.step_epoch(0.40, model) and optimizer.param_groups[0]["lr"] == 0.25
    assert torch.equal(model.weight, moved + 1.0) and not torch.equal(model.weight, best)


def test_newbob_restores_the_optimizer_state_of_the_best_epoch_with_its_weights():
    """As the reference implementation does: Adam's moments go back with the weights."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)

    def step():
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    newbob = train_function.make_scheduler(optimizer, "newbob", total_steps=10)
    step()
    assert not newbob.step_epoch(0.50, model)
    moments = optimizer.state[model.weight]["exp_avg"].clone()
    step()
    assert not torch.equal(optimizer.state[model.weight]["exp_avg"], moments)
    assert newbob.step_epoch(0.40, model)
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], moments)
    assert optimizer.state[model.weight]["step"].item() == 1 and optimizer.param_groups[0]["lr"] == 0.5


def test_newbob_keeps_no_copy_of_a_frozen_encoder(models_dir):
    model = tiny_model(models_dir)
    optimizer = train_function.configure_optimizer(model, 1e-3, 1e-3)
    newbob = train_function.make_scheduler(optimizer, "newbob", total_steps=10)
    newbob.step_epoch(0.5, model)
    assert newbob.best_state and not any(k.startswith("speech_encoder.") for k in newbob.best_state)
    best = {k: v.clone() for k, v in newbob.best_state.items()}
    with torch.no_grad():
        model.classifier[0].weight.add_(1.0)
    assert newbob.step_epoch(0.4, model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in best.items())


# ------------------------------------------------------------------------------------------------
# training steps

def test_train_steps_lower_the_loss(data_dir, models_dir):
    torch.manual_seed(0)
    utterances = load_utterances(data_dir, 1, 32, 32)[:16]
    model = tiny_model(models_dir)
    optimizer = train_function.configure_optimizer(model, 1e-3, 3e-3)
    criterion = train_function.make_criterion()
    batch = collate_utterances(utterances)
    model.eval()  # no dropout: the loss is a function of the weights alone
    before = train_function.forward_loss(model, batch, criterion, "cpu")[0].item()
    for _ in range(15):
        train_function.train_step(model, [batch], criterion, optimizer, "cpu", clip_norm=1.0)
    after = train_function.forward_loss(model, batch, criterion, "cpu")[0].item()
    assert after < 0.5 * before


def test_gradient_accumulation_matches_one_big_batch(data_dir, models_dir):
    """One train_step over micro-batches moves the weights as one step over all of them does."""
    utterances = load_utterances(data_dir, 1, 32, 32)[:8]
    criterion = train_function.make_criterion()
    before, after = [], []
    for micro in ([utterances], [utterances[:4], utterances[4:]]):
        torch.manual_seed(0)
        model = tiny_model(models_dir).eval()  # no dropout: the loss is a function of the weights alone
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        before.append(model.classifier[0].weight.detach().clone())
        train_function.train_step(model, [collate_utterances(m) for m in micro], criterion, optimizer, "cpu")
        after.append(model.classifier[0].weight.detach().clone())
    assert torch.equal(before[0], before[1]) and not torch.allclose(after[0], before[0], atol=1e-4)
    assert torch.allclose(after[0], after[1], atol=1e-6)


def test_nonfinite_loss_stops_training(data_dir, models_dir):
    utterances = load_utterances(data_dir, 1, 32, 32)[:4]
    model = tiny_model(models_dir)
    batch = collate_utterances(utterances)
    batch["context"][0, 0, 0] = math.nan
    optimizer = train_function.configure_optimizer(model, 1e-3, 1e-3)
    before = model.classifier[0].weight.detach().clone()
    with pytest.raises(train_function.NonFiniteLossError, match="nan"):
        train_function.train_step(model, [batch], train_function.make_criterion(), optimizer, "cpu")
    assert torch.equal(model.classifier[0].weight, before)


def test_class_weights_balance_the_classes():
    weights = train_function.balanced_class_weights([0, 0, 0, 1, 2, 3], 4)
    assert weights.tolist() == pytest.approx([0.5, 1.5, 1.5, 1.5])
    with pytest.raises(ValueError, match="every class"):
        train_function.balanced_class_weights([0, 1, 2], 4)


def test_frozen_speech_vectors_are_computed_once_and_equal_the_live_encoder(data_dir, models_dir):
    utterances = load_utterances(data_dir, 1, 32, 32)[:10]
    model = tiny_model(models_dir).train()
    assert not model.speech_encoder.training  # frozen: no dropout, so a fixed function of the ids
    live = collate_utterances(utterances)
    train_function.cache_speech_vectors(model, utterances, batch_size=3, device="cpu")
    cached = collate_utterances(utterances)
    assert "speech_ids" not in cached and cached["speech_vectors"].shape == (10, 64)
    with torch.no_grad():
        expected = model.encode_speech(live["speech_ids"], live["speech_mask"])
    assert torch.allclose(cached["speech_vectors"], expected, atol=1e-5)
    model.eval()
    with torch.no_grad():
        a = model(**dataset_loader.model_inputs(live, "cpu"))[0]
        b = model(**dataset_loader.model_inputs(cached, "cpu"))[0]
    assert torch.allclose(a, b, atol=1e-5)
