"""Small helpers that every stage shares: atomic file writes, the audio reader, model fingerprints.

A stage never leaves a half-written file behind: it writes beside the target under a
temporary name and renames it into place only once the write has succeeded.
"""
import contextlib
import hashlib
import io
import math
import os
import tempfile
import wave
from pathlib import Path

import numpy as np

from mmser.data_contract import SAMPLE_RATE

_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it; put it straight back


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    The temporary name keeps `path`'s suffix, so libraries that pick a format from the
    extension (soundfile, np.save) write the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the mode open() would have given.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def wav_bytes(samples, sample_rate):
    """A 16-bit PCM WAV file's bytes: audio written once, compared byte for byte on reruns."""
    import soundfile as sf
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def cut_off_wav(path, frames_read):
    """A message when a PCM WAV file holds fewer frames than its header promises, else "".

    libsndfile reads such a file (an interrupted copy or extraction) up to where it ends, without
    a word; the header's count, which Python's wave module reports, tells."""
    try:
        with wave.open(str(path)) as w:
            promised, frame_bytes = w.getnframes(), w.getsampwidth() * w.getnchannels()
    except (wave.Error, EOFError, OSError):  # not a PCM WAV: nothing to compare
        return ""
    # A streaming recorder's placeholder size (0xFFFFFFFF) promises nothing.
    if frames_read >= promised or promised >= 0xFFFFFFFF // frame_bytes:
        return ""
    return (f"{path}: cut off: its header promises {promised} samples, the file holds {frames_read} "
            f"(an interrupted copy or extraction?)")


class AudioError(ValueError):
    """An audio file that cannot be used as it is; the message names the file and the problem."""


def read_audio(path, convert=False, dtype="float32"):
    """The one way this tool reads audio: -> (1-D samples at 16 kHz, [notes]).

    Training data (convert=False) must be what the data contract says: a 16 kHz mono file holding
    every sample its header promises; anything else is an AudioError. A user's recording
    (convert=True) may be any rate and channel count soundfile reads: channels are averaged,
    the rate resampled (scipy's polyphase filter) and a cut-off file used as it is, each said in a note.
    """
    import soundfile as sf
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        samples, rate = sf.read(str(path), dtype=dtype, always_2d=True)
    except (OSError, RuntimeError, sf.LibsndfileError) as e:  # libsndfile cannot parse it
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    notes, cut_off = [], cut_off_wav(path, len(samples))
    if not convert:
        if rate != SAMPLE_RATE or samples.shape[1] != 1:
            raise AudioError(f"{path}: {rate} Hz, {samples.shape[1]} channel(s); expected {SAMPLE_RATE} Hz mono")
        if cut_off:
            raise AudioError(cut_off)
        return samples[:, 0], notes
    if cut_off:  # a user's recording is used as it is, with a word; training data is refused
        notes.append("cut off (shorter than its header says), predicted from what it holds")
    if samples.shape[1] > 1:
        notes.append(f"mixed {samples.shape[1]} channels to mono")
    wav = samples.mean(axis=1).astype(samples.dtype) if samples.shape[1] > 1 else samples[:, 0]
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly
        g = math.gcd(rate, SAMPLE_RATE)
        wav = resample_poly(wav, SAMPLE_RATE // g, rate // g).astype(np.float32)
        notes.append(f"resampled {rate} Hz to {SAMPLE_RATE} Hz")
    return wav, notes


# A streamed recording's window: 30 s of 16 kHz float32 is 1.9 MB a channel, so memory stays small
# however long the recording, and per-window costs are nothing beside the work done on a window.
STREAM_WINDOW = 30 * SAMPLE_RATE


class AudioStream:
    """A recording of any length and format, read window by window: the one way this tool streams audio.

        stream = AudioStream(path)           # AudioError if it is not audio ffmpeg can decode
        stream.duration, stream.channels     # seconds (None where the container does not say)
        for window in stream.windows():      # float32 (channels, n) at 16 kHz, n = STREAM_WINDOW
            ...                              # but the last; each windows() reads from the start

    read_audio reads a whole utterance (the data contract's PCM WAV, exactly as stored); a recording
    may be hours long and come as mp3, m4a, ogg, flac or wav at any rate. PyAV decodes every container
    ffmpeg knows packet by packet, and its resampler (ffmpeg's swresample) carries its filter state
    from one packet to the next, so a stream is resampled as one piece: soundfile reads blocks but
    does not resample or read m4a, and scipy's resample_poly takes a whole array. Channels are kept:
    the caller averages them (as read_audio does) or reads each as a speaker. A corrupt file is an
    AudioError naming it, raised where the decoder meets the damage.
    """

    def __init__(self, path):
        import av
        self.path = Path(path)
        with self._open() as container:
            if not container.streams.audio:
                raise AudioError(f"{self.path}: no audio stream in it")
            stream = container.streams.audio[0]
            self.channels, self.rate = stream.codec_context.channels, stream.codec_context.sample_rate
            if stream.duration is not None and stream.time_base is not None:
                self.duration = float(stream.duration * stream.time_base)
            else:
                self.duration = None if container.duration is None else container.duration / av.time_base

    def _open(self):
        import av
        if not self.path.is_file():
            raise AudioError(f"{self.path}: no such audio file")
        try:
            return av.open(str(self.path))
        except av.FFmpegError as e:
            raise AudioError(f"{self.path}: not an audio file ffmpeg can read ({e.strerror})") from None

    def _pieces(self):
        """(channels, n) float32 arrays at SAMPLE_RATE, as the decoder and resampler hand them out."""
        import av
        seconds = 0.0
        with self._open() as container:
            # Planar float, the input's channels, 16 kHz; a fresh resampler per pass (it holds state).
            resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
            try:
                for frame in container.decode(audio=0):
                    for out in resampler.resample(frame):
                        piece = out.to_ndarray()
                        seconds += piece.shape[1] / SAMPLE_RATE
                        yield piece
                for out in resampler.resample(None):  # what the resampler still holds
                    yield out.to_ndarray()
            except av.FFmpegError as e:
                raise AudioError(f"{self.path}: corrupt audio after {seconds:.1f} s, ffmpeg cannot decode it "
                                 f"({e.strerror})") from None

    def windows(self, samples=STREAM_WINDOW):
        """float32 (channels, samples) windows at SAMPLE_RATE from the start, the last one shorter."""
        held, count = [], 0
        for piece in self._pieces():
            held.append(piece)
            count += piece.shape[1]
            if count >= samples:
                block = np.concatenate(held, axis=1)
                for start in range(0, count - samples + 1, samples):
                    yield np.ascontiguousarray(block[:, start:start + samples])
                rest = block[:, count - count % samples:]
                held, count = [rest], rest.shape[1]
        if count:
            yield np.ascontiguousarray(np.concatenate(held, axis=1))


# A recording whose peak is below -60 dBFS holds no speech: predict.py does not classify it, and
# speech recognition gives it an empty transcript (Whisper makes words up on silence).
SILENCE_PEAK = 1e-3


# Whisper reads 30 s at a time: its encoder (layer means) and its decoder (transcripts) both take a
# longer utterance as consecutive windows of this length, the last one shorter.
WHISPER_WINDOW_SECONDS = 30


def audio_seconds(path):
    """A wav's length from its header (0 for a file that cannot be read: it fails when it is read)."""
    import soundfile as sf
    try:
        info = sf.info(str(path))
    except (OSError, RuntimeError):
        return 0.0
    return info.frames / info.samplerate


def audio_windows(samples, seconds=WHISPER_WINDOW_SECONDS, sample_rate=SAMPLE_RATE):
    """`samples` cut into consecutive windows of `seconds` (the last one what is left; an empty
    input gives one empty window, so that every utterance has at least one)."""
    step = int(seconds * sample_rate)
    return [samples[start:start + step] for start in range(0, max(len(samples), 1), step)]


def save_npy_atomic(path, array):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _sha256(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# The files of a transformers model folder that decide what it computes, by role. Top level only:
# a hub snapshot may also hold ONNX or Core ML exports, and gains files as they are downloaded.
TOKENIZER_FILES = ("tokenizer*.json", "vocab*", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "*.model")
WEIGHT_FILES = ("config.json", "*.safetensors", "pytorch_model*.bin")
# The tokenizer files that hold its vocabulary; a tokenizer's folder has at least one of them.
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model")


def local_model_path(name_or_path, patterns=TOKENIZER_FILES + WEIGHT_FILES):
    """A model's files on this machine: the path itself, or a hub name's snapshot in transformers'
    cache, its `patterns` fetched if they are not there yet (as from_pretrained would)."""
    path = Path(name_or_path)
    if path.exists():
        return path.resolve()
    from huggingface_hub import snapshot_download
    try:
        # safetensors where the hub has them: never both copies of the weights.
        wanted = [p for p in patterns if not p.startswith("pytorch_model")]
        return Path(snapshot_download(str(name_or_path), allow_patterns=wanted, ignore_patterns=["*/*"]))
    except Exception as e:  # offline, unknown name, ...: the caller names what it needed
        raise FileNotFoundError(f"{name_or_path}: no such file or folder, and not a model that could be "
                                f"found in transformers' cache or on the hub ({type(e).__name__})") from None


def fingerprint(name_or_path, patterns=TOKENIZER_FILES + WEIGHT_FILES):
    """What identifies a pretrained file, or the `patterns` files of a model folder or hub name:
    {"path", "bytes", "sha256"} (and "files": the patterns, for a folder). A folder's sha256 covers
    each file's name and content; fingerprint(path, files) again tells whether it changed."""
    path = local_model_path(name_or_path, patterns)
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}
    files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{path}: none of the model files {', '.join(patterns)}")
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{_sha256(p)}\n".encode())
    return {"path": str(path), "files": list(patterns), "bytes": sum(p.stat().st_size for p in files),
            "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------------------
# running models: torch and transformers are imported here only when used, so that every script's
# --help and argument errors answer before they load (seconds, or tens of seconds on a busy machine)

def check_device(name):
    """--device as a torch.device, for every script: cpu or cuda[:N], and a GPU only where torch sees one."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: not a device this tool runs on (cpu, cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, "
                         f"built {'without' if torch.version.cuda is None else 'with'} CUDA)")
    return device


def default_threads():
    """torch's CPU threads when --threads is not given: $OMP_NUM_THREADS where set (a job scheduler's
    share of the machine), else half the cores this process may use (its affinity), at least 1.

    torch's own default, every core, makes its threads spin against whatever else runs on the cores:
    on a shared 2-core machine (load 3.5-6.7), predict.py --list of 120 demo rows took 8.1-9.6 s with
    1 thread and 15.8-22.3 s with 2, and even a real-size model (BERT-base, 16 x 128 tokens) 6.5-10.1 s
    a batch with 1 thread against 12.9-13.8 s with 2. Half the logical cores is the physical cores on a
    machine with two threads per core (what torch's MKL default picks there), and leaves the other half
    to the machine's other jobs; the figure depends on the machine only, not on its load, so a rerun
    computes with the same thread count."""
    import os
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:  # unset, or not a number: torch would ignore it too
        pass
    return max(1, len(os.sched_getaffinity(0)) // 2) if hasattr(os, "sched_getaffinity") else \
        max(1, (os.cpu_count() or 2) // 2)


def set_threads(threads=None):
    """--threads: torch's CPU threads, or default_threads() when None. The one place every script
    applies it."""
    import torch
    torch.set_num_threads(threads or default_threads())


@contextlib.contextmanager
def torch_threads(threads):
    """torch's CPU threads set to `threads` for a while, the setting put back afterwards. A thread
    started meanwhile keeps the count it first ran with (torch reads it once per thread)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' per-load "Loading weights" bars and load reports, silenced: on a terminal they
    split this tool's own tables, in a job's log file they pile up (205 updates in one extraction)."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def length_sorted_batches(lengths, batch_size):
    """Indices in batches of similar length, shortest first (stable): each batch pads little, and
    whoever runs them puts the results back by index. Every encoder over many inputs batches so."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def cpu_has_native_bf16():
    """Whether this CPU has bf16 instructions, without which torch's bf16 runs slower than fp32.

    Native means avx512_bf16 or amx_bf16 on x86-64 (Intel since Cooper Lake and Sapphire Rapids,
    AMD since Zen 4) and bf16 on 64-bit ARM. Elsewhere bf16 is emulated: a 2048x2048 bf16 matmul
    ran at about 1 GFLOP/s on an AVX2-only AMD EPYC, and at a fifth of fp32's speed where oneDNN
    widens it on AVX-512 without bf16, so bf16 autocast only slows training down.

    Decided from the CPU's feature flags, not by timing a product, which a busy machine would
    mislead: the flags the kernel lists in /proc/cpuinfo (Linux; "flags" on x86-64, "Features" on
    ARM), else torch.cpu.get_capabilities() where torch has it (any OS), else False. A
    ONEDNN_MAX_CPU_ISA below bf16 (AVX2, AVX512_CORE, ...) caps what oneDNN, which runs torch's
    CPU matmuls, may use, and so also means False. torch.backends.cpu.get_cpu_capability() cannot
    tell: it names the vector width torch's own kernels use, "AVX512" alike on a Sapphire Rapids
    with AMX and on a Skylake without any bf16 instruction.
    """
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa_cap not in ("", "ALL", "DEFAULT") and not any(isa in isa_cap for isa in ("BF16", "FP16", "AMX", "AVX10")):
        return False
    flags = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    if not flags:
        import torch
        get_capabilities = getattr(torch.cpu, "get_capabilities", None)
        flags = {name for name, value in get_capabilities().items() if value is True} if get_capabilities else set()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
