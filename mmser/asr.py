"""Speech recognition: a transcript set of its own per ASR model (Whisper), and its word error rate.

The transcripts step writes ASR-<tag>/Text/<name>.txt for every utterance with a Whisper checkpoint
(data_contract.model_tag names the folder): English, the transcribe task, greedy decoding, no
timestamps, an utterance over 30 s in consecutive 30-s windows; silent or too short audio gets an
empty transcript and a word in the summary. ASR-<tag>/wer.json holds its word error rate against
Text/, overall and per session, after WER_NORMALISATION (jiwer). predict.py transcribes recordings
given without text with the same transcribe().

Two backends decode the same windows (load_asr; --asr-backend):
  transformers     WhisperForConditionalGeneration.generate, SDPA attention, transformers' own KV cache
  faster-whisper   CTranslate2's Whisper (the engine of faster-whisper; requirements-asr.txt), the same
                   Hugging Face folder converted once with CTranslate2's converter into MODELS_DIR
Both take the same log-mel features (the checkpoint's WhisperFeatureExtractor), the same prompt and
the same token limit, so with the same precision they write the same words (tests/test_asr.py).
--asr-precision auto means bf16 for transformers where the hardware computes it (a GPU with bf16, a
CPU with bf16 instructions: utils.cpu_has_native_bf16), fp32 elsewhere; int8 on a CPU and fp16 on a
GPU for faster-whisper. fp32 is always there: its transcripts are transformers' greedy generate's.
features.json records the backend and precision with the model files, and a rerun with another one
stops unless --overwrite, as it does for another model.
Windows are decoded longest first, in batches of similar length (a batch ends when its longest text
does) sized to the free memory (window_batch_size). Whisper pads every window to 30 s and
transformers' encoder takes nothing shorter (5.x raises on it): an IEMOCAP utterance (4.5 s on
average) is mostly padding, and no exact shortcut exists, since every position of the encoder
attends to the padding. Packing several utterances into one window would cut it, but whether the
words stay the same can only be shown with a trained Whisper, which no test here has: not offered.
"""
import copy
import json
import math
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmser.data_contract import (SAMPLE_RATE, WER_FILE, feature_folder, model_tag, qualified_step, read_features_record,
                                 read_manifest, transcript_set)
from mmser.distributed import rank_and_world, wait_for_ranks
from mmser.extraction import (FeatureError, StepReport, audio_weight, from_pretrained, load_tokenizer, pending,
                              read_transcript, record_models, run_reported)
from mmser.data_dir_writer import context_audio_advice
from mmser.models_dir import hub_name, resolve_model
from mmser.utils import (SILENCE_PEAK, TOKENIZER_FILES, WEIGHT_FILES, WHISPER_WINDOW_SECONDS, AudioError, audio_windows,
                         check_device, cpu_has_native_bf16, fingerprint, quiet_transformers, read_audio,
                         write_text_atomic)

DEFAULT_ASR_MODEL = hub_name("asr_model")
ASR_BACKENDS = ("transformers", "faster-whisper")  # the first: the default
ASR_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # the first: the default
DEFAULT_BACKEND, DEFAULT_PRECISION = ASR_BACKENDS[0], ASR_PRECISIONS[0]
# How transcripts were decoded before the backends existed (a features.json record without asr_decoding).
LEGACY_DECODING = {"backend": "transformers", "precision": "fp32"}
# Most 30-s windows per generate() call; fewer where memory is short (window_batch_size). On a CPU
# batching helps the decoder only (the encoder's products are large already): a Whisper-small-wide
# model took 1.55, 1.31 and 1.20 s a window in batches of 1, 4 and 8 (2 layers, one core); on a GPU
# a large batch fills the device.
ASR_BATCH_SIZE = {"cpu": 8, "cuda": 64}
ASR_MEMORY_SHARE = 0.5  # of the free memory, for the batch's activations and caches
# Whisper hears nothing in these, and on silence it makes words up ("Thank you."): such a window is
# not transcribed, and an utterance with no other window gets an empty transcript.
ASR_MIN_SECONDS = 0.1
WER_NORMALISATION = ("IEMOCAP's bracketed tags ([LAUGHTER], [BREATHING], [GARBAGE], ...) removed, lower case, "
                     "punctuation removed (apostrophes and hyphens too: don't -> dont), runs of spaces made one; "
                     "the same for the reference and the ASR transcript")
# CTranslate2's conversion of a Hugging Face Whisper folder: MODELS_DIR/<model_tag>-ctranslate2/, with
# the fingerprint of the folder it was made from (a changed source is converted again).
CT2_FOLDER, CT2_SOURCE = "{tag}-ctranslate2", "converted_from.json"
CT2_FILES = ("model.bin", "config.json", "vocabulary.json")
# What decides a Whisper's words, fingerprinted: beside the tokenizer and the weights, the generation
# config (suppressed tokens, the prompt, the length limit) and the feature extractor's (the log-mel).
ASR_FILES = TOKENIZER_FILES + WEIGHT_FILES + ("generation_config.json", "preprocessor_config.json")
CT2_COMPUTE_TYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


def asr_model_name(models_dir=None, asr_model=None):
    """--asr-model, or MODELS_DIR/whisper-large-v3 when that local copy exists, else the hub's."""
    return resolve_model(models_dir, "asr_model", asr_model)


def asr_precision(backend=DEFAULT_BACKEND, device="cpu", precision=DEFAULT_PRECISION):
    """What --asr-precision means for `backend` on `device` (fp32, bf16, fp16 or int8). ValueError,
    with the reason, for a precision the backend does not have there."""
    import torch
    if backend not in ASR_BACKENDS:
        raise ValueError(f"--asr-backend {backend!r}: one of {', '.join(ASR_BACKENDS)}")
    if precision not in ASR_PRECISIONS:
        raise ValueError(f"--asr-precision {precision!r}: one of {', '.join(ASR_PRECISIONS)}")
    gpu = torch.device(device).type == "cuda"
    if precision == "auto":
        if backend == "faster-whisper":
            return "fp16" if gpu else "int8"
        if gpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if backend == "transformers" and precision == "int8":
        raise ValueError("--asr-precision int8 is the faster-whisper backend's (--asr-backend faster-whisper)")
    if backend == "transformers" and precision == "fp16" and not gpu:
        raise ValueError("--asr-precision fp16 runs on a GPU; on a CPU take bf16 (where it has bf16 instructions) "
                         "or fp32")
    return precision


def window_batch_size(config, device, bytes_per_value, cap=None):
    """How many 30-s windows one generate() call takes: ASR_BATCH_SIZE for the device, fewer when
    ASR_MEMORY_SHARE of the free memory cannot hold that many windows' encoder activations and
    decoder caches (from the model's config: the cross-attention keys and values of 1500 frames
    and the self-attention cache of max_target_positions tokens per decoder layer, the largest
    encoder layer's activations), at least 1."""
    import torch
    device = torch.device(device)
    d, frames = config.d_model, config.max_source_positions
    per_window = bytes_per_value * (
        config.decoder_layers * 2 * d * (frames + config.max_target_positions)  # the decoder's caches
        + frames * (4 * d + 2 * config.encoder_ffn_dim)  # one encoder layer's live activations
        + config.encoder_attention_heads * frames * frames)  # attention scores, if not computed blockwise
    cap = cap or ASR_BATCH_SIZE[device.type]
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX: the default
            return cap
    return max(1, min(cap, int(free * ASR_MEMORY_SHARE // per_window)))


def whisper_prompt(generation_config):
    """The decoder's first tokens for English, transcribe, no timestamps, as transformers' generate
    puts them: <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|> (an English-only model
    has no language and task tokens)."""
    prompt = [generation_config.decoder_start_token_id]
    if getattr(generation_config, "is_multilingual", False) and getattr(generation_config, "lang_to_id", None):
        prompt += [generation_config.lang_to_id["<|en|>"], generation_config.task_to_id["transcribe"]]
    return prompt + [generation_config.no_timestamps_token_id]


def max_new_tokens(generation_config, model_config, prompt_length):
    """The most tokens greedy decoding writes after the prompt, as transformers' Whisper generate
    counts them (its max_new_tokens, else max_length beyond the prompt), within the model's positions."""
    positions = model_config.max_target_positions
    if getattr(generation_config, "max_new_tokens", None) is not None:
        return min(generation_config.max_new_tokens, positions - prompt_length)
    return min(generation_config.max_length + prompt_length, positions) - prompt_length


class TransformersWhisper:
    """A Whisper checkpoint through transformers: WhisperForConditionalGeneration.generate, greedy,
    with SDPA attention and transformers' own KV cache (a static cache and torch.compile, measured on
    a CPU, saved under 10% of a window for a minute of compiling: not used)."""
    backend = "transformers"

    def __init__(self, asr_model, device="cpu", precision="fp32"):
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq
        device = check_device(device)
        check_whisper(asr_model)
        model = from_pretrained(AutoModelForSpeechSeq2Seq, asr_model, "ASR model")
        self.precision = precision
        # The dtype is set, not taken from the checkpoint: transformers 5 loads a model in the dtype it
        # was saved in (float16 for openai/whisper-large-v3), which a CPU only emulates.
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.model = model.to(device, self.dtype).eval()
        if precision == "bf16" and device.type == "cpu":
            # The decoder's attention (one query a step) through torch's CPU SDPA takes 9.0 ms a call
            # in bf16 over 1500 frames against 1.6 ms as two products and a softmax (batch 4, 12
            # heads, one core), and as long over a few tokens: the decoder runs transformers' eager
            # attention (and its causal mask), the encoder keeps SDPA. (transformers 4.x picks the
            # attention class when it builds the model: SDPA stays there.)
            eager = copy.copy(model.config)
            eager._attn_implementation = "eager"
            for module in model.model.decoder.modules():
                if getattr(module, "config", None) is model.config:
                    module.config = eager
        self.feature_extractor = from_pretrained(AutoFeatureExtractor, asr_model, "ASR model")
        self.tokenizer = load_tokenizer(asr_model, "ASR model")
        self.batch_size = window_batch_size(model.config, device, self.dtype.itemsize)

    def generate(self, windows, timestamps):
        import torch
        features = self.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.inference_mode(), quiet_transformers():
            return self.model.generate(features.input_features.to(self.model.device, self.dtype), language="en",
                                       task="transcribe", num_beams=1, do_sample=False, return_timestamps=timestamps)

    def decode(self, windows):
        """Texts of up to 30-s 16 kHz windows, one generate() call."""
        return self.tokenizer.batch_decode(self.generate(windows, False), skip_special_tokens=True)

    def sentence_ends(self, windows):
        """The ends of Whisper's timestamped segments in each window (seconds from its start), one call."""
        return [segment_ends(self.tokenizer, ids) for ids in self.generate(windows, True)]


class FasterWhisper:
    """The same checkpoint through CTranslate2 (faster-whisper's engine): converted once into
    MODELS_DIR (ctranslate2_model), fed the same log-mel features and prompt as TransformersWhisper,
    greedy, up to the same number of tokens. faster-whisper's own transcribe() is not used: its
    feature extractor, voice detection, temperature fallback and conditioning on the previous
    window's text would decode other windows in another way."""
    backend = "faster-whisper"

    def __init__(self, asr_model, models_dir=None, device="cpu", precision="int8"):
        import torch
        from transformers import AutoFeatureExtractor, GenerationConfig
        try:
            import ctranslate2
        except ImportError:
            raise FeatureError("--asr-backend faster-whisper needs CTranslate2: pip install -r requirements-asr.txt") \
                from None
        device = check_device(device)
        self.precision, self.ctranslate2 = precision, ctranslate2
        compute_type = CT2_COMPUTE_TYPES[precision]
        supported = ctranslate2.get_supported_compute_types(device.type, device.index or 0)
        if compute_type not in supported:
            raise FeatureError(f"--asr-precision {precision}: CTranslate2 cannot compute in {compute_type} on this "
                               f"{device.type} (it can in {', '.join(sorted(supported))})")
        config = check_whisper(asr_model)
        generation = from_pretrained(GenerationConfig, asr_model, "ASR model")
        self.prompt = whisper_prompt(generation)
        self.max_new_tokens = max_new_tokens(generation, config, len(self.prompt))
        self.feature_extractor = from_pretrained(AutoFeatureExtractor, asr_model, "ASR model")
        self.tokenizer = load_tokenizer(asr_model, "ASR model")
        self.folder = ctranslate2_model(asr_model, models_dir)
        self.model = ctranslate2.models.Whisper(str(self.folder), device=device.type, device_index=device.index or 0,
                                                compute_type=compute_type, intra_threads=torch.get_num_threads())
        # int8 holds the weights in 8 bits, not the activations and caches.
        self.batch_size = window_batch_size(config, device, 2 if precision in ("bf16", "fp16") else 4)

    def generate(self, windows, prompt):
        features = self.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        # CTranslate2 decodes at most min(max_length / 2, max_length - prompt) tokens (openai's
        # sample_len): twice transformers' limit gives the same limit.
        results = self.model.generate(self.ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
                                      [prompt] * len(windows), beam_size=1,
                                      max_length=2 * max(self.max_new_tokens, len(prompt)))
        return [r.sequences_ids[0] for r in results]

    def decode(self, windows):
        """Texts of up to 30-s 16 kHz windows, one generate() call."""
        return self.tokenizer.batch_decode(self.generate(windows, self.prompt), skip_special_tokens=True)

    def sentence_ends(self, windows):
        """The ends of Whisper's timestamped segments in each window (seconds from its start), one call:
        the prompt without <|notimestamps|>, CTranslate2 then applies Whisper's timestamp rules."""
        return [segment_ends(self.tokenizer, ids) for ids in self.generate(windows, self.prompt[:-1])]


def check_whisper(asr_model):
    """-> the model's config; FeatureError in one line where it is not a Whisper's (transformers' own error
    for a WavLM or a RoBERTa given as the ASR model would list every speech-to-text config class)."""
    from transformers import AutoConfig
    config = from_pretrained(AutoConfig, asr_model, "ASR model")
    if config.model_type != "whisper":
        raise FeatureError(f"--asr-model {asr_model}: not a Whisper model (its config.json says {config.model_type}); "
                           f"speech recognition takes a Whisper checkpoint")
    return config


def segment_ends(tokenizer, ids):
    """The ends (seconds) of the timestamped segments in one window's generated token ids."""
    offsets = tokenizer.decode(ids, output_offsets=True)["offsets"]
    return [float(o["timestamp"][1]) for o in offsets if o["timestamp"][1] is not None]


def converter_for_installed_transformers(converter_class):
    """CTranslate2's TransformersConverter, loading the model as the installed transformers takes it:
    CTranslate2 4.8 passes `dtype=`, which transformers before 4.56 calls `torch_dtype=` (requirements.txt's
    floor is older)."""
    class Converter(converter_class):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            try:
                return super().load_model(model_class, model_name_or_path, **kwargs)
            except TypeError as e:
                if "dtype" not in kwargs or "'dtype'" not in str(e):
                    raise
                kwargs["torch_dtype"] = kwargs.pop("dtype")
                return super().load_model(model_class, model_name_or_path, **kwargs)
    return Converter


def ctranslate2_model(asr_model, models_dir=None):
    """MODELS_DIR/<tag>-ctranslate2 (beside the folder itself without MODELS_DIR): `asr_model` converted
    by CTranslate2's own converter, once, with its weights as saved (the compute type is chosen when
    it loads); again when the source's fingerprint differs from the one the folder records. Written
    under a temporary name and renamed, so an interrupted conversion leaves nothing half-written.
    The tokenizer and features stay the Hugging Face folder's (FasterWhisper)."""
    import shutil
    import tempfile
    from ctranslate2.converters import TransformersConverter
    if models_dir is None and not Path(asr_model).is_dir():
        raise FeatureError(f"--asr-backend faster-whisper converts {asr_model} into MODELS_DIR: give one")
    source = fingerprint(asr_model)
    parent = Path(models_dir) if models_dir is not None else Path(asr_model).parent
    folder = parent / CT2_FOLDER.format(tag=model_tag(asr_model))

    def converted():
        try:
            return json.loads((folder / CT2_SOURCE).read_text(encoding="utf-8"))["sha256"] == source["sha256"] and \
                all((folder / name).is_file() for name in CT2_FILES)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    if converted():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        with quiet_transformers():
            converter_for_installed_transformers(TransformersConverter)(str(asr_model)).convert(
                str(tmp / "model"), quantization=None)
        write_text_atomic(tmp / "model" / CT2_SOURCE, json.dumps(source, indent=2) + "\n")
        if converted():  # by another process meanwhile (a rank of the same torchrun): keep it, it may be in use
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp / "model", folder)
        except OSError:  # another process's conversion took its place first
            if not converted():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_asr(asr_model, device="cpu", precision=DEFAULT_PRECISION, backend=DEFAULT_BACKEND, models_dir=None):
    """The backend (TransformersWhisper or FasterWhisper) that transcribes with `asr_model` (a hub
    name or folder) at `precision` (asr_precision)."""
    try:
        precision = asr_precision(backend, device, precision)
    except ValueError as e:
        raise FeatureError(str(e)) from None
    if backend == "faster-whisper":
        return FasterWhisper(asr_model, models_dir, device, precision)
    return TransformersWhisper(asr_model, device, precision)


def recorded_decoding(record):
    """load_asr's backend, precision and models_dir as a transcripts step's record in features.json
    (and so a run's config.json "pretrained") holds them: predict.py hears a recording as the
    training transcripts were heard. A record from before the backends: transformers in fp32."""
    decoding = record.get("asr_decoding", LEGACY_DECODING)
    converted = record.get("asr_ctranslate2_model")
    return {"backend": decoding["backend"], "precision": decoding["precision"],
            "models_dir": str(Path(converted["path"]).parent) if converted else None}


def transcribe(wavs, asr, batch_size=None, progress_bar=None):
    """Whisper's transcripts of 16 kHz waveforms: English, the transcribe task, greedy decoding, no
    timestamps; a waveform over 30 s is transcribed in consecutive 30-s windows (utils.audio_windows)
    and their texts joined with a space. The windows are decoded longest first, `batch_size` (default:
    the backend's, sized to memory) per call. -> (texts, {index: why it is empty}) for silent or too
    short audio, which gets an empty transcript."""
    windows, empty = [], {}
    for i, wav in enumerate(wavs):
        usable = [w for w in audio_windows(np.asarray(wav, dtype=np.float32))
                  if len(w) >= ASR_MIN_SECONDS * SAMPLE_RATE and np.abs(w).max() >= SILENCE_PEAK]
        windows += [(i, k, w) for k, w in enumerate(usable)]
        if not usable:
            empty[i] = ("too short" if len(wav) < ASR_MIN_SECONDS * SAMPLE_RATE else "silent") + \
                f" ({len(wav) / SAMPLE_RATE:.2f} s, peak {float(np.abs(wav).max()) if len(wav) else 0:.1e})"
    parts = [{} for _ in wavs]
    left = [0] * len(wavs)  # windows not yet decoded, per utterance: done at 0
    for i, _, _ in windows:
        left[i] += 1
    if progress_bar is not None:
        progress_bar.update(len(empty))
    # Longest first: a batch's windows then decode texts of similar length (the batch runs until its
    # longest ends), and the batch that needs the most memory comes first.
    windows.sort(key=lambda window: -len(window[2]))
    batch_size = batch_size or asr.batch_size
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        for (i, k, _), text in zip(batch, asr.decode([w for _, _, w in batch])):
            parts[i][k] = text
            left[i] -= 1
        if progress_bar is not None:
            progress_bar.update(len({i for i, _, _ in batch if not left[i]}))
    # One line per transcript, as the data contract says of Text/.
    return [" ".join(" ".join(p[k] for k in sorted(p)).split()) for p in parts], empty


def normalise_for_wer(text):
    """WER_NORMALISATION, through jiwer's transforms."""
    import jiwer
    return jiwer.Compose([jiwer.SubstituteRegexes({r"\[[^\]]*\]": " "}), jiwer.ToLowerCase(), jiwer.RemovePunctuation(),
                          jiwer.RemoveMultipleSpaces(), jiwer.Strip()])(text)


def word_errors(references, hypotheses):
    """jiwer's alignment of the normalised transcripts, summed over utterances: {"wer", "words"
    (of the references), "substitutions", "deletions", "insertions", "utterances"}; wer is None when
    the references have no word."""
    import jiwer
    references = [normalise_for_wer(t) for t in references]
    hypotheses = [normalise_for_wer(t) for t in hypotheses]
    counts = {"wer": None, "words": 0, "substitutions": 0, "deletions": 0, "insertions": 0,
              "utterances": len(references)}
    if references:
        out = jiwer.process_words(references, hypotheses)
        counts.update(words=out.hits + out.substitutions + out.deletions, substitutions=out.substitutions,
                      deletions=out.deletions, insertions=out.insertions)
        counts["wer"] = (out.substitutions + out.deletions + out.insertions) / counts["words"] if counts["words"] else None
    return counts


def wer_report(rows, references, hypotheses, asr_model):
    """The WER file's content: overall and per session, after WER_NORMALISATION."""
    sessions = sorted({row["session"] for row in rows})
    by_session = {str(s): word_errors([r for row, r in zip(rows, references) if row["session"] == s],
                                      [h for row, h in zip(rows, hypotheses) if row["session"] == s]) for s in sessions}
    return {"asr_model": str(asr_model), "normalisation": WER_NORMALISATION,
            "overall": word_errors(references, hypotheses), "sessions": by_session}


def format_wer(counts):
    return "-" if counts["wer"] is None else f"{counts['wer']:.3f}"


def transcribe_utterances(data_dir, models_dir=None, asr_model=None, device="cpu", overwrite=False, progress=True,
                          batch_size=None, backend=DEFAULT_BACKEND, precision=DEFAULT_PRECISION):
    """ASR-<tag>/Text/<name>.txt: Whisper's transcript (transcribe()) of every utterance of the manifest,
    from Audio/<name>.wav (the context branch needs every utterance: mocap_data_collect.py --all-audio
    writes their audio), and ASR-<tag>/wer.json: the word error rates against the reference Text/,
    overall and per session, also in the step's summary. `backend` and `precision`: load_asr's."""
    data_dir = Path(data_dir)
    asr_model = asr_model_name(models_dir, asr_model)
    step = qualified_step("transcripts", model_tag(asr_model))
    out_dir, report = feature_folder(data_dir, step), StepReport(step)

    def valid(path):
        try:
            return "\n" not in path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return False

    def work():
        manifest = read_manifest(data_dir)
        # Loaded first: a hub name is in the local cache (to be fingerprinted) only after a load.
        asr = load_asr(asr_model, device, precision, backend, models_dir)
        models = {"asr_model": fingerprint(asr_model, ASR_FILES)}
        if asr.backend == "faster-whisper":
            models["asr_ctranslate2_model"] = fingerprint(asr.folder, CT2_FILES)
        # Transcripts that predate this record were made by transformers in fp32 (on the tiny and
        # fp32 checkpoints the tests use; a float16 checkpoint loaded as float16).
        old = read_features_record(data_dir).get(step)
        models["asr_decoding"] = {"backend": asr.backend, "precision": asr.precision}
        if old is not None and "asr_decoding" not in old:
            old["asr_decoding"] = dict(LEGACY_DECODING)
            if old["asr_decoding"] != models["asr_decoding"] and not overwrite and any(out_dir.glob("*.txt")):
                raise FeatureError(f"{out_dir} was transcribed by transformers in fp32; rerun with --asr-backend "
                                   f"transformers --asr-precision fp32 to finish it, or with --overwrite to "
                                   f"transcribe it all again with {asr.backend} in {asr.precision}")
        record_models(data_dir, step, models, overwrite, manifest, report, "*.txt")
        # Under torchrun each rank takes an equal share of the decoding: of 30-s windows (each padded to 30 s).
        seconds = audio_weight(data_dir)
        todo = pending(manifest, out_dir, valid, overwrite, report, suffix=".txt",
                       weigh=lambda row: max(1, math.ceil(seconds(row) / WHISPER_WINDOW_SECONDS)))
        # Longest first, over the whole manifest (this rank's share): each slice below then holds utterances
        # of similar length, whose windows batch with little wasted decoding.
        todo.sort(key=lambda row: -seconds(row))
        empty = []
        slice_size = 4 * (batch_size or asr.batch_size)
        with tqdm(total=len(todo), desc=step, unit="utt", disable=not progress) as bar:
            # In slices, so that an interrupted run keeps what it finished.
            for start in range(0, len(todo), slice_size):
                part, wavs = [], []
                for row in todo[start:start + slice_size]:
                    wav_path = data_dir / "Audio" / f"{row['name']}.wav"
                    if not wav_path.is_file():
                        report.fail(row["name"], f"{wav_path}: missing audio ({context_audio_advice(data_dir)})", bar)
                        continue
                    try:
                        wavs.append(read_audio(wav_path)[0])
                        part.append(row)
                    except AudioError as e:
                        report.fail(row["name"], e, bar)
                texts, why_empty = transcribe(wavs, asr, batch_size, bar)
                for k, (row, text) in enumerate(zip(part, texts)):
                    write_text_atomic(out_dir / f"{row['name']}.txt", text)
                    report.written += 1
                    if k in why_empty:
                        empty.append(f"{row['name']} ({why_empty[k]})")
        if empty:
            report.notes.append(f"{len(empty)} utterance(s) silent or too short for speech recognition, given an "
                                f"empty transcript: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        report.notes.append(f"decoded by {asr.backend} in {asr.precision}")
        wait_for_ranks()  # under torchrun, rank 0 scores every rank's transcripts
        if rank_and_world()[0] == 0:
            write_wer(data_dir, manifest, asr_model, report)

    return run_reported(report, work)


def write_wer(data_dir, manifest, asr_model, report):
    """ASR-<tag>/wer.json over the utterances that have both transcripts; its figures into the summary."""
    transcripts = transcript_set(asr_model)
    rows, references, hypotheses = [], [], []
    for row in manifest:
        try:
            hypothesis = read_transcript(data_dir, row["name"], transcripts)
            reference = read_transcript(data_dir, row["name"])
        except FeatureError:  # not transcribed (failed above), or no reference: not scored
            continue
        rows.append(row)
        references.append(reference)
        hypotheses.append(hypothesis)
    wer = wer_report(rows, references, hypotheses, asr_model)
    path = Path(data_dir) / transcripts / WER_FILE
    write_text_atomic(path, json.dumps(wer, indent=2) + "\n")
    overall = wer["overall"]
    report.notes.append(f"WER {format_wer(overall)} over {overall['utterances']} utterances ({overall['words']} "
                        f"reference words; per session " +
                        ", ".join(f"{s}: {format_wer(c)}" for s, c in wer["sessions"].items()) +
                        f"), after normalisation: {WER_NORMALISATION}; written to {path}")
    return wer
