"""The speech branch's routes: what every route answers, the interface the stages ask instead of telling
routes apart (SpeechRoute); the routes themselves are this folder's files, chosen in routes.py.

A route is one way the speech branch hears a recording (tokens.py: the original's vq-wav2vec tokens
and fairseq speech RoBERTa; layers.py: a transformers encoder's layer means, or its fine-tuning on
the waveforms). routes.py chooses one per --speech-model (route_of); each stage then asks it:
  extraction    name, step, extract(...)               its step (registered in data_contract.STEPS),
                                                       the folder and pretrained roles it records
  the run       check(), missing(), positions(),       refuse a model it cannot take, name a missing
                encoder_files, step_models(),          file, its token limit; what config.json records
                reads_audio                            (the step's roles in features.json, or its own
                                                       encoder's when it reads the audio); branch_steps'
                                                       `models`, which predict.py's check reads too
  the data      input_file(...), load_input(...)       the file an utterance's input comes from, and
                model_input(features, max_tokens)      the utterance dict's entries made from it
  the model     branch(...)                            EmotionClassifier's speech keyword arguments
  predict.py    load_extractor(paths, device),         the pretrained parts and, per recording, the
                features(extractor, wav, path)         features the extraction step stores (or a note)
features() and the extraction step call one per-utterance function, and load_input() and predict.py
one model_input(): what a recording becomes at prediction is what it became for training.
"""
from pathlib import Path

from mmser.data_contract import feature_folder, qualified_step


class SpeechRoute:
    """The interface (see the module docstring); a route's class fills it in."""

    name = None  # its extraction step (a data_contract.STEPS key) and its name in ROUTES
    wants = None  # what --speech-model names for this route, as a message says it
    kind = None  # what a --speech-model this route takes is, as a message says it
    model_is_file = False  # --speech-model is a file: resolved to an absolute path, present or not
    encoder_files = ()  # utils.fingerprint's patterns of the speech_model role (none: a file)

    def __init__(self, speech_model=None, finetune=False):
        self.speech_model, self.finetune = speech_model, finetune

    @classmethod
    def takes(cls, speech_model):
        """Whether this route carries the speech branch for --speech-model `speech_model` (None: none given)."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.speech_model!r}, finetune={self.finetune})"

    # -- what it extracts

    @property
    def tag(self):
        """The model tag of its step's instance (None: the step's default model, its original folder)."""
        return None

    @property
    def step(self):
        """Its step instance: a features.json key and, through data_contract.step_entry, a folder."""
        return qualified_step(self.name, self.tag)

    def step_models(self):
        """data_contract.branch_steps' `models` entry that names the speech branch's step."""
        return {"speech": self.step}

    def extract(self, data_dir, models_dir, device="cpu", overwrite=False, progress=True):
        """Run its extraction step over DATA_DIR's target utterances -> extraction.StepReport."""
        raise NotImplementedError

    # -- a training run

    def check(self):
        """Refuse, before any data is read, a --speech-model this route cannot take
        (speech_encoders.SpeechModelError, saying what it is)."""

    def missing(self):
        """One line naming the --speech-model file that is not there and where it comes from, or None."""
        return None

    def positions(self):
        """The longest sequence its encoder's learned positions hold, or None (no token limit, or a model
        that cannot be read here: its own error comes where it is loaded)."""
        return None

    @property
    def takes_gradient_checkpointing(self):
        """Whether branch(gradient_checkpointing=True) recomputes activations (main.py refuses
        --gradient-checkpointing where it would do nothing)."""
        return False

    @property
    def reads_audio(self):
        """Whether its input is the waveform (Audio/) rather than its step's files: then its encoder's own
        files make the input, and no extracted features are read."""
        return False

    # -- the data

    def input_file(self, data_dir, name):
        """The file utterance `name`'s input is read from."""
        return Path(data_dir) / "Audio" / f"{name}.wav" if self.reads_audio else \
            feature_folder(data_dir, self.step) / f"{name}.npy"

    def load_input(self, data_dir, name, max_tokens):
        """Utterance `name`'s entries of its utterance dict, as dataset_loader loads them (data_contract.DataError
        naming a file that is missing or not what it should be)."""
        raise NotImplementedError

    def model_input(self, features, max_tokens):
        """The utterance dict's entries made from the features of one utterance (what the step stores, or the
        waveform input): one conversion for training and for predict.py."""
        raise NotImplementedError

    # -- the model

    def branch(self, gradient_checkpointing=False):
        """The speech branch of model_structure.EmotionClassifier, as its keyword arguments."""
        raise NotImplementedError

    # -- predict.py

    def load_extractor(self, paths, device):
        """The pretrained parts that turn a recording into its features ({role: path}: predictor.check_pretrained)."""
        raise NotImplementedError

    def features(self, extractor, wav, path):
        """One recording's features (16 kHz mono `wav`, read from `path`) made by the very function its
        extraction step calls, or a note saying why it has none (too short, silent)."""
        raise NotImplementedError
