"""The one place that chooses the speech branch's route for a --speech-model: ROUTES, in the order asked.

  SpeechTokens   (tokens.py)  the original's: vq-wav2vec tokens into the fairseq speech RoBERTa, for
                              no --speech-model (MODELS_DIR's bert_kmeans.pt) or a checkpoint file
  SpeechLayers   (layers.py)  a transformers speech encoder (a folder or hub name): its cached layer
                              means, or the encoder fine-tuned on the waveforms (--finetune-speech)
A new route is a file of this folder (a mmser.speech.SpeechRoute), its line in ROUTES and its tiny
model (fixtures/tiny_models.py); no stage tells routes apart.
"""
from mmser.speech.layers import SpeechLayers
from mmser.speech.tokens import SpeechTokens

# In the order they are asked: the first that takes --speech-model carries the speech branch. The
# first is the original's, the default route.
ROUTES = {route.name: route for route in (SpeechTokens, SpeechLayers)}
DEFAULT_ROUTE = next(iter(ROUTES.values()))


def route_of(speech_model=None, finetune=False):
    """The route of --speech-model `speech_model` (None: none given), fine-tuned with --finetune-speech."""
    return next(route for route in ROUTES.values() if route.takes(speech_model))(speech_model, finetune)


def speech_models(speech_model=None):
    """data_contract.branch_steps' `models` entry for the speech branch of --speech-model `speech_model`."""
    return route_of(speech_model).step_models()


def step_route(step, speech_model=None):
    """The route that runs the speech step `step` (a name in ROUTES, feature_ext.py's) for `speech_model`:
    the default route's name stands for the speech step of whichever route the model takes; another
    route's name must be that route (ValueError saying what it needs)."""
    route = route_of(speech_model)
    if step not in (route.name, DEFAULT_ROUTE.name):
        given = (f"--speech-model {speech_model} is {route.kind}" if speech_model is not None else
                 "no --speech-model was given")
        raise ValueError(f"the {step} step needs {ROUTES[step].wants}; {given}")
    return route
