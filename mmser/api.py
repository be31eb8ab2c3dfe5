"""The Python API: a trained run loaded once, then the emotion of an utterance or of a whole recording,
as plain Python (dicts, lists, str, float), for notebooks and other programs. predict.py and app.py are
its command line and its page.

    from mmser.api import Recognizer
    recognizer = Recognizer("demo_run")                     # the run's models, loaded once
    recognizer.predict("clip.wav", text="I can't believe it!")
    # {'transcript': "I can't believe it!", 'prediction': 'ang', 'p_ang': 0.71, ..., 'note': ''}
    timeline = recognizer.timeline("meeting.flac")          # or subtitles=, rttm=, channels_as_speakers=
    for segment in timeline["segments"]:                    # start, end, speaker, transcript, prediction,
        ...                                                 # p_<class>..., note

Everything goes through mmser.predictor (LoadedRun): the run's settings and checkpoints (all folds'
mean, or one fold's; every seed's for a --seeds run), its pretrained files checked against their
sha256, and features made by the extraction steps' own per-utterance functions. A problem with the
run or the input is a predictor.PredictError, whose message names the file and the problem.
"""
from pathlib import Path

import numpy as np

from mmser.predictor import LoadedRun, PredictError, prediction_values, row_transcript
from mmser.segmentation import MAX_SECONDS, MIN_PAUSE_SECONDS, MIN_SECONDS
from mmser.timeline import DIALOG, make_timeline

__all__ = ["Recognizer", "PredictError"]


class Recognizer:
    """A trained run (a RUN_DIR main.py wrote), loaded once: its models stay in memory between calls.

    fold: one fold's model (of every seed) instead of the mean of all; device: "cpu" or "cuda";
    models_dir: where the run's MODELS_DIR is now, if it moved; asr_model: the Whisper checkpoint that
    transcribes audio given without text (default: the one the run's transcripts came from, if any).
    """

    def __init__(self, run_dir, fold=None, device="cpu", models_dir=None, asr_model=None):
        self.run = LoadedRun(run_dir, fold, device, models_dir, asr_model)

    @property
    def classes(self):
        """The run's classes, in the order of its probabilities."""
        return list(self.run.classes)

    @property
    def attributes(self):
        """The run's attributes (valence, arousal, dominance; a run with --target dimensional or both), in
        the order of its values; [] for a categorical run."""
        return list(self.run.attributes)

    @property
    def branches(self):
        """What the run reads: "text", "speech", "context"."""
        return list(self.run.settings.branches)

    def predict(self, wav=None, text=None, context=None):
        """One utterance's emotion -> {"transcript", "prediction", "p_<class>"..., "<attribute>"..., "note"}
        (the class and its probabilities where the run has classes, each attribute's value on the corpus's
        scale where it has attributes).

        wav: a file (any rate and channels soundfile reads) or 16 kHz mono samples (a 1-D array);
        none for a run without the speech branch. text: its transcript; None: transcribed by the ASR
        model where the run reads words. context: {"before": [transcripts], "after": [transcripts]}, the
        utterances around it in its conversation, in order (the run reads its context window of
        them); none: an utterance alone, as a dialogue of one. "prediction" and the probabilities are
        None, and "note" says why, where none could be made; "note" also says what the run's token
        limits cut from a long utterance."""
        context = context or {}
        unknown = set(context) - {"before", "after"}
        if unknown:
            raise ValueError(f"context: the keys are 'before' and 'after', not {', '.join(sorted(unknown))}")
        row = {"text": text or "", "dialog": DIALOG}
        if isinstance(wav, (str, Path)):
            row["_wav_path"] = Path(wav)
        elif wav is not None:
            row["_wav"] = np.asarray(wav, dtype=np.float32)
            if row["_wav"].ndim != 1:
                raise ValueError(f"wav: 16 kHz mono samples are one-dimensional, not of shape {row['_wav'].shape}")
            row["_name"] = "the samples given"
        elif "speech" in self.run.settings.branches:
            raise PredictError(f"{self.run.run_dir} has a speech branch: give the recording (wav=)")
        if wav is None and not (text or "").strip():
            raise PredictError("give the utterance's text (text=): without the recording there is nothing else "
                               "to read")

        def neighbour(transcript):
            return {"text": "", "_transcript": transcript, "dialog": DIALOG, "_context_only": True}

        before = [neighbour(t) for t in context.get("before", [])]
        rows = before + [row] + [neighbour(t) for t in context.get("after", [])]
        outputs, notes = self.run.predict(rows)
        return {"transcript": row_transcript(row),
                **prediction_values(outputs[len(before)], self.classes, self.attributes),
                "note": notes.get(len(before), "")}

    def timeline(self, recording, subtitles=None, rttm=None, channels_as_speakers=False, min_seconds=MIN_SECONDS,
                 max_seconds=MAX_SECONDS, min_pause=MIN_PAUSE_SECONDS, progress=False):
        """A whole recording's emotion over time -> {"recording", "duration", "classes", "attributes",
        "segmenter", "speakers", "transcripts", "notes", "segments": [{"start", "end", "speaker",
        "transcript", "prediction", "p_<class>"..., "<attribute>"..., "note"}]} (mmser.timeline.make_timeline;
        timeline.write_timeline writes it as CSV, JSON and PNG). subtitles: an SRT or WebVTT file whose cues are the segments
        and their text; rttm: a diarizer's speakers; channels_as_speakers: one speaker a channel;
        min_seconds, max_seconds, min_pause: segmentation's (mmser.segmentation). An empty
        "segments" where the recording holds no speech, with a note saying so."""
        return make_timeline(self.run, recording, subtitles, rttm, channels_as_speakers, min_seconds, max_seconds,
                             min_pause, progress)
