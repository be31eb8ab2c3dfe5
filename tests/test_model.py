"""The fused model: the Time-Asynchronous Branch, branch subsets, frozen speech, checkpoints."""
import json

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from mmser.dataset_loader import collate_utterances, load_utterances
from mmser.model_structure import EmotionClassifier, TimeAsynchronousBranch, build_model, load_trained_model
from small_runs import tiny_model
from mmser.dataset_loader import model_inputs
from mmser.settings import RunSettings



def test_time_asynchronous_branch_is_structured_self_attention_over_context_slots():
    torch.manual_seed(0)
    branch = TimeAsynchronousBranch(slices=7, width=768)  # c = 3 with bert-base sentence vectors
    assert branch.project.weight.shape == (64, 768)
    assert branch.attention_hidden.weight.shape == (64, 64) and branch.attention_hidden.bias is None
    assert branch.attention_heads.weight.shape == (5, 64) and branch.attention_heads.bias is None
    for layer in (branch.attention_hidden, branch.attention_heads):
        assert layer.weight.abs().max() <= 0.1
    branch.eval()
    vector, attention = branch(torch.randn(3, 7 * 768))
    assert vector.shape == (3, 320) and branch.out_features == 320
    assert attention.shape == (3, 5, 7)
    assert torch.allclose(attention.sum(-1), torch.ones(3, 5))  # a distribution over slots per head


def test_fused_model_sizes_come_from_the_loaded_encoders(models_dir):
    model = tiny_model(models_dir)  # text 32 wide, speech 64 wide, context 3 x 16
    assert model.classifier[0].in_features == 32 + 64 + 320
    assert model.branches == ("text", "speech", "context")
    logits, attention = model(text_ids=torch.tensor([[0, 20, 2]]), text_mask=torch.ones(1, 3, dtype=torch.long),
                              speech_ids=torch.tensor([[0, 30, 31, 2]]), speech_mask=torch.ones(1, 4, dtype=torch.long),
                              context=torch.randn(1, 3, 16))
    assert logits.shape == (1, 4) and attention.shape == (1, 5, 3)


@pytest.mark.parametrize("branches,width", [(("text",), 32), (("speech",), 64), (("context",), 320),
                                            (("text", "context"), 352)])
def test_any_subset_of_branches(data_dir, models_dir, branches, width):
    config = {"branches": branches, "text_model": str(models_dir / "roberta-large"),
              "speech_model": str(models_dir / "bert_kmeans" / "bert_kmeans.pt"), "context_window": 1,
              "context_width": 16, "fusion_hidden": 8, "classes": ["ang", "hap", "sad", "neu"]}
    model = build_model(RunSettings(**config))
    assert model.branches == branches and model.classifier[0].in_features == width
    assert ("text" in branches) == (model.text_encoder is not None)
    batch = collate_utterances(load_utterances(data_dir, 1, 32, 32, branches)[:3])
    logits, attention = model(**model_inputs(batch, "cpu"))
    assert logits.shape == (3, 4) and (attention is not None) == ("context" in branches)


def test_frozen_speech_encoder_gets_no_gradient_and_finetuning_it_does(models_dir):
    for finetune in (False, True):
        model = tiny_model(models_dir, finetune_speech=finetune).train()
        logits, _ = model(text_ids=torch.tensor([[0, 20, 2]]), text_mask=torch.ones(1, 3, dtype=torch.long),
                          speech_ids=torch.tensor([[0, 30, 2]]), speech_mask=torch.ones(1, 3, dtype=torch.long),
                          context=torch.randn(1, 3, 16))
        logits.sum().backward()
        speech_grads = [p.grad for p in model.speech_encoder.parameters()]
        assert all(g is None for g in speech_grads) != finetune
        assert model.speech_encoder.training == finetune
        assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None


def test_padding_does_not_change_an_utterances_prediction(data_dir, models_dir):
    utterances = load_utterances(data_dir, 1, 64, 64)
    short, long = sorted(utterances[:6], key=lambda u: len(u["text_ids"]) + len(u["speech_ids"]))[::5]
    model = tiny_model(models_dir).eval()
    with torch.no_grad():
        alone = model(**model_inputs(collate_utterances([short]), "cpu"))[0]
        padded = model(**model_inputs(collate_utterances([short, long]), "cpu"))[0][:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_checkpoint_without_frozen_encoder_rebuilds_the_same_model(tmp_path, data_dir, models_dir):
    config = {"branches": ["text", "speech", "context"], "text_model": str(models_dir / "roberta-large"),
              "speech_model": str(models_dir / "bert_kmeans" / "bert_kmeans.pt"), "context_window": 1,
              "context_width": 16, "fusion_hidden": 16, "finetune_text": True, "finetune_speech": False,
              "classes": ["ang", "hap", "sad", "neu"]}
    json.loads(json.dumps(config))  # config.json material
    torch.manual_seed(1)
    model = build_model(RunSettings(**config)).eval()
    state = model.trained_state_dict()
    assert not any(k.startswith("speech_encoder.") for k in state)  # it lives in MODELS_DIR
    assert any(k.startswith("text_encoder.") for k in state)  # fine-tuned: part of the result
    torch.save({"model": state}, tmp_path / "best.pt")
    torch.manual_seed(2)  # other fresh weights, replaced by the checkpoint's
    rebuilt = load_trained_model(RunSettings(**config), tmp_path / "best.pt")
    batch = collate_utterances(load_utterances(data_dir, 1, 32, 32)[:5])
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(batch, "cpu"))[0], rebuilt(**model_inputs(batch, "cpu"))[0])
    with pytest.raises(RuntimeError, match="does not fit"):
        rebuilt.load_trained_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})


def test_a_model_needs_a_branch():
    with pytest.raises(ValueError, match="at least one branch"):
        EmotionClassifier()


def test_pooler_is_dropped_so_ddp_sees_no_unused_weights():
    encoder = RobertaModel(RobertaConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=20))
    model = EmotionClassifier(text_encoder=encoder)
    assert model.text_encoder.pooler is None
    logits, _ = model(text_ids=torch.tensor([[0, 5, 2]]), text_mask=torch.ones(1, 3, dtype=torch.long))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
