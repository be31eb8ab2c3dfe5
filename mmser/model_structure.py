"""The fused emotion classifier: text RoBERTa + speech RoBERTa + Time-Asynchronous Branch.

Reads the pretrained encoders (nothing is written):
  text:   a transformers RoBERTa folder or hub name (MODELS_DIR/roberta-large by default), or another
          text encoder (BERT, DeBERTa-v2/v3, ELECTRA), each pooled at its first token
  speech: what the speech route builds (mmser.speech): MODELS_DIR/bert_kmeans/bert_kmeans.pt through
          fairseq_checkpoints.load_fairseq_roberta by default, or a transformers speech encoder's
          weighted layer sum (speech_encoders.SpeechLayerSum)

  text ids    -> text RoBERTa   -> last layer at <s>  (fine-tuned by default)   -> Ht
  speech ids  -> speech RoBERTa -> last layer at <s>  (frozen by default)       -> Hs
  context     -> Time-Asynchronous Branch (2c+1 sentence vectors -> 5 x 64)     -> 320
  concat(branches) -> Linear -> ReLU -> Linear -> 4 emotion logits (order: CLASSES)
                     (or dropout -> Linear: the head of Siriwardhana et al.'s recipe)
The head is the one part the target changes (mmser/targets.py): its last layer gives the class logits,
or one value per attribute (valence, arousal, dominance on the unit scale: --target dimensional), or
both, the logits first (--target both); every branch and speech route is the same for every target.
"""
import torch
from torch import nn

from mmser.settings import DEFAULTS
from mmser.speech.routes import route_of
from mmser.utils import quiet_transformers


class CheckpointMismatchError(RuntimeError):
    """Weights of another model: keys missing, unexpected, or of another shape."""


class TimeAsynchronousBranch(nn.Module):
    """Structured self-attention (Lin et al. 2017) over the 2c+1 context slots.

    Every slot (one sentence embedding of width H) goes through one shared Linear(H, 64) + ReLU;
    `heads` attention distributions over the slots, A = softmax_slots(W2 tanh(W1 h)), each pick
    a weighted sum of the slots, so each head can look at a different utterance of the
    conversation (hence time-asynchronous).
    """

    def __init__(self, slices, width, hidden=64, heads=5, dropout=0.5):
        super().__init__()
        self.slices, self.width, self.heads = slices, width, heads
        self.project = nn.Linear(width, hidden)
        self.attention_hidden = nn.Linear(hidden, hidden, bias=False)  # W1
        self.attention_heads = nn.Linear(hidden, heads, bias=False)  # W2
        # Lin et al. initialise the attention matrices uniformly in [-0.1, 0.1].
        nn.init.uniform_(self.attention_hidden.weight, -0.1, 0.1)
        nn.init.uniform_(self.attention_heads.weight, -0.1, 0.1)
        self.dropout = nn.Dropout(dropout)
        self.out_features = heads * hidden

    def forward(self, context):
        """context (B, slices, width) or (B, slices*width) -> ((B, heads*hidden), attention (B, heads, slices))."""
        h = torch.relu(self.project(context.reshape(len(context), self.slices, self.width)))
        scores = self.attention_heads(torch.tanh(self.attention_hidden(h)))  # (B, slices, heads)
        attention = torch.softmax(scores, dim=1).transpose(1, 2)  # each head sums to 1 over slots
        return self.dropout(attention @ h).flatten(1), attention


class EmotionClassifier(nn.Module):
    """Late fusion of any subset of the three branches; the absent ones are not built at all."""

    def __init__(self, text_encoder=None, speech_encoder=None, context_window=None, context_width=None,
                 finetune_text=DEFAULTS.finetune_text, finetune_speech=DEFAULTS.finetune_speech,
                 fusion_hidden=DEFAULTS.fusion_hidden, num_classes=4, head=DEFAULTS.head,
                 head_dropout=DEFAULTS.head_dropout, speech_layer_sum=None, num_attributes=0):
        super().__init__()
        self.text_encoder, self.speech_encoder = text_encoder, speech_encoder
        self.finetune_text, self.finetune_speech = finetune_text, finetune_speech
        # the head's outputs: num_classes logits, then num_attributes values (mmser/targets.py)
        self.num_classes, self.num_attributes = num_classes, num_attributes
        outputs = num_classes + num_attributes
        self.context_branch = None
        if context_window is not None:
            self.context_branch = TimeAsynchronousBranch(2 * context_window + 1, context_width)
        sizes = []
        for encoder, finetune in ((text_encoder, finetune_text), (speech_encoder, finetune_speech)):
            if encoder is not None:
                # A pooler is never used (the <s> vector is); under DDP unused weights are an error.
                if getattr(encoder, "pooler", None) is not None:
                    encoder.pooler = None
                encoder.requires_grad_(finetune)
                sizes.append(encoder.config.hidden_size)
        # The speech branch over a transformers encoder's layers (instead of the speech RoBERTa).
        self.speech_layer_sum = speech_layer_sum
        if speech_layer_sum is not None:
            sizes.append(speech_layer_sum.hidden_size)
        if self.context_branch is not None:
            sizes.append(self.context_branch.out_features)
        if not sizes:
            raise ValueError("the model needs at least one branch (text, speech or context)")
        # head "mlp": Linear -> ReLU -> Linear (this project's); "linear": one Linear over the
        # concatenated vectors, as Siriwardhana et al.'s classification head (recipes.py)
        layers = [nn.Dropout(head_dropout)] if head_dropout else []
        if head == "mlp":
            layers += [nn.Linear(sum(sizes), fusion_hidden), nn.ReLU(), nn.Linear(fusion_hidden, outputs)]
        elif head == "linear":
            layers += [nn.Linear(sum(sizes), outputs)]
        else:
            raise ValueError(f"unknown head {head!r}: use 'mlp' or 'linear'")
        self.classifier = nn.Sequential(*layers)

    @property
    def branches(self):
        present = (self.text_encoder, self.speech_encoder or self.speech_layer_sum, self.context_branch)
        return tuple(b for b, module in zip(("text", "speech", "context"), present) if module is not None)

    def train(self, mode=True):
        super().train(mode)
        # A frozen encoder stays in eval mode (no dropout), so its output is a fixed function of
        # the input and can be computed once per run.
        for encoder, finetune in ((self.text_encoder, self.finetune_text), (self.speech_encoder, self.finetune_speech)):
            if encoder is not None and not finetune:
                encoder.eval()
        return self

    def encode_speech(self, speech_ids, speech_mask):
        """The speech branch's vector: last layer at <s>; no graph is kept when the encoder is frozen."""
        with torch.set_grad_enabled(self.finetune_speech and torch.is_grad_enabled()):
            return self.speech_encoder(input_ids=speech_ids, attention_mask=speech_mask).last_hidden_state[:, 0]

    def forward(self, text_ids=None, text_mask=None, speech_ids=None, speech_mask=None,
                speech_vectors=None, context=None, speech_layers=None, speech_wave=None, speech_wave_mask=None):
        """-> (outputs (B, classes + attributes): the class logits, then the attributes' values; context
        attention (B, heads, slots) or None).

        speech_vectors, when given, replace running the (frozen) speech encoder on speech_ids. A
        transformers speech encoder's branch takes its cached layer means (speech_layers) or, when
        fine-tuned, the waveforms (speech_wave, speech_wave_mask).
        """
        parts, attention = [], None
        if self.text_encoder is not None:
            with torch.set_grad_enabled(self.finetune_text and torch.is_grad_enabled()):
                parts.append(self.text_encoder(input_ids=text_ids, attention_mask=text_mask).last_hidden_state[:, 0])
        if self.speech_encoder is not None:
            if speech_vectors is None:
                speech_vectors = self.encode_speech(speech_ids, speech_mask)
            parts.append(speech_vectors)
        if self.speech_layer_sum is not None:
            parts.append(self.speech_layer_sum(speech_layers, speech_wave, speech_wave_mask))
        if self.context_branch is not None:
            vector, attention = self.context_branch(context)
            parts.append(vector)
        # Under autocast the branches come in bf16 while cached speech vectors are fp32.
        fused = torch.cat([p.float() for p in parts], dim=-1)
        return self.classifier(fused), attention

    def frozen_prefixes(self):
        """State-dict prefixes of the frozen pretrained encoders: their weights live in MODELS_DIR."""
        return [f"{name}." for name, encoder, finetune in (("text_encoder", self.text_encoder, self.finetune_text),
                                                         ("speech_encoder", self.speech_encoder, self.finetune_speech))
                if encoder is not None and not finetune]

    def trained_state_dict(self):
        """Everything training changed (frozen encoders left out, to keep checkpoints small)."""
        prefixes = tuple(self.frozen_prefixes())
        return {k: v for k, v in self.state_dict().items() if not (prefixes and k.startswith(prefixes))}

    def load_trained_state_dict(self, state):
        """Inverse of trained_state_dict: every key not under a frozen encoder must be present, in
        its shape; otherwise CheckpointMismatchError."""
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # torch's word for a tensor of another shape
            raise CheckpointMismatchError(f"checkpoint does not fit this model: {e}") from None
        prefixes = tuple(self.frozen_prefixes())
        missing = [k for k in missing if not (prefixes and k.startswith(prefixes))]
        if missing or unexpected:
            raise CheckpointMismatchError(f"checkpoint does not fit this model: missing {missing[:5]}, "
                                          f"unexpected {unexpected[:5]}")


def load_text_encoder(name_or_path):
    """The text encoder from a local folder (or, outside tests, a hub name), without its pooler: the
    RoBERTa of the original, or any of data_contract.TEXT_ENCODERS (AutoModel; a pooler that comes
    with it is dropped by EmotionClassifier, which takes the first token's last hidden state)."""
    from transformers import AutoConfig, AutoModel, RobertaModel

    from mmser.data_contract import TEXT_ENCODERS
    # The checkpoint's pooler / lm_head weights are not wanted here; a load report listing them
    # as unexpected would only alarm the reader.
    with quiet_transformers():
        model_type = AutoConfig.from_pretrained(str(name_or_path)).model_type
        if model_type == "roberta":
            return RobertaModel.from_pretrained(str(name_or_path), add_pooling_layer=False)
        if model_type not in TEXT_ENCODERS:
            raise ValueError(f"{name_or_path}: a {model_type!r} model, not one of the text encoders "
                             f"{', '.join(TEXT_ENCODERS)}")
        return AutoModel.from_pretrained(str(name_or_path))


def build_model(settings):
    """The classifier a run's settings (mmser.settings.RunSettings, config.json) describe, with
    pretrained encoders and fresh new layers; its head as wide as the run's target (mmser/targets.py)."""
    from mmser.targets import target_of
    target = target_of(settings)
    branches = settings.branches
    text_encoder = load_text_encoder(settings.text_model) if "text" in branches else None
    speech = {}  # the speech route's branch: the speech RoBERTa (speech_encoder), or speech_layer_sum
    if "speech" in branches:
        speech = route_of(settings.speech_model, settings.finetune_speech).branch(
            settings.gradient_checkpointing)
    return EmotionClassifier(
        text_encoder=text_encoder,
        context_window=settings.context_window if "context" in branches else None,
        context_width=settings.context_width,
        finetune_text=settings.finetune_text,
        finetune_speech=settings.finetune_speech,
        fusion_hidden=settings.fusion_hidden,
        num_classes=target.num_classes,
        num_attributes=target.num_attributes,
        head=settings.head,
        head_dropout=settings.head_dropout,
        **speech,
    )


def load_trained_model(settings, checkpoint_path, device="cpu"):
    """A fold's best model, ready for inference: build_model(settings) + the checkpoint's weights."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model = build_model(settings)
    model.load_trained_state_dict(checkpoint["model"])
    return model.to(device).eval()
