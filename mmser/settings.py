"""One run's settings: every default once, the recipe and the options over them, written out as config.json.

  RunSettings        the typed, frozen settings of a run; its field defaults are THE defaults (the
                     command line, the recipes' table and every module read them from here), and
                     config.json is one written out (to_json / from_json: a config.json of an older
                     run, without the settings added since, reads with the values those runs had)
  DEFAULTS           RunSettings() itself: the defaults, for main.py's parser
  RunEnv             where this process runs: rank, world size, device, autocast dtype, progress bars
  RunError           a run that cannot start or go on for a reason the user can fix; the message
                     names the file or option and the way out (main.py prints it as one line)
Nothing here imports torch at import time (main.py's --help reads the defaults).
"""
import dataclasses
import json
from dataclasses import dataclass, field

from mmser.data_contract import BRANCHES, DEFAULT_SENTENCE_POOLING


class RunError(Exception):
    """A run that cannot start or go on for a reason the user can fix; the message names the file
    or option and the way out. main() prints it as one line."""


# Shares of IEMOCAP's labelled utterances cut by a token limit, from the per-utterance token counts of
# Siriwardhana et al.'s released lists (T_data/iemocap/*_size.tsv, 5499 utterances): text > 100 tokens
# 0.09%, > 512 none (the longest has 129); speech > 310 tokens 58%, > 512 31%, > 1024 6.2%, > 2048 0.27%.
# A limit left at its default (or a recipe's) is lowered to what the encoder's learned positions hold
# (the speech RoBERTa's come from its checkpoint), with a line in the log.
@dataclass(frozen=True)
class RunSettings:
    """Everything a run used, in the order config.json has always had: the files first (resolved when
    the run starts), then the options. The settings added since come at the end, so that the lines
    above still compare with older runs' files; the last few are written only where they apply."""

    data_dir: str = None
    models_dir: str = None
    text_model: str = None
    speech_model: str = None
    pretrained: dict = None  # {role: utils.fingerprint}: every pretrained file, checked by predict.py
    classes: list = None  # the labels the manifest has, in the order of DATA_DIR's label set
    branches: list = field(default_factory=lambda: ["text", "speech", "context"])
    context_window: int = 3  # sentences before and after: FullBertEmb3, the widest window the extraction makes
    max_text_tokens: int = 512  # cuts no IEMOCAP utterance; batches pad to their longest, so a high limit is free
    max_audio_tokens: int = 2048  # cuts 0.27%: the frozen speech encoder runs once per run (cached), so length is cheap
    context_width: int = None  # H of the context vectors, read from the data
    skip_missing: bool = False
    left_out: list = field(default_factory=list)  # names --skip-missing left out for lack of a feature file
    protocol: str = "session5"
    val_split: str = "stratified"
    val_fraction: float = 0.1
    val_split_description: str = None
    epochs: int = 10
    batch_size: int = 16
    eval_batch_size: int = 32
    grad_accum: int = 1
    lr_encoders: float = 1e-5  # the pretrained RoBERTas: small steps, or fine-tuning forgets
    lr_head: float = 1e-3  # the new layers: fusion and context branch
    weight_decay: float = 0.01
    scheduler: str = "linear"
    warmup: float = 0.1  # share of all optimizer steps spent warming up (linear scheduler)
    clip_norm: float = 1.0
    class_weights: str = "none"
    fusion_hidden: int = 256
    finetune_text: bool = True
    finetune_speech: bool = False
    # Batches of similar length, in random order, as fairseq batches: on a CPU a RoBERTa-base step
    # ran 2x faster than on randomly mixed lengths (benchmarks/bench_train.py).
    group_by_length: bool = True
    seed: int = 2022
    device: str = "auto"  # config.json: the device it ran on
    precision: str = "auto"  # bf16 autocast on a GPU that has it, fp32 otherwise (config.json: the one used)
    world_size: int = 1
    stop_after_epochs: int = 0
    versions: dict = None
    # -- added since: older config.json files lack these, and had these values --
    sentence_model: str = None
    sentence_pooling: str = DEFAULT_SENTENCE_POOLING
    feature_folders: dict = None
    recipe: str = None
    recipe_overridden: list = field(default_factory=list)
    seeds: list = None
    loss: str = "cross_entropy"
    head: str = "mlp"  # Linear -> ReLU -> Linear; "linear": dropout -> Linear (Siriwardhana et al.'s)
    head_dropout: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    select_by: str = "val_ua"  # the validation score that chooses the tested checkpoint
    patience: int = 0  # epochs without a lower validation loss before stopping (0: never stop early)
    one_vs_rest: bool = False  # also report per-emotion binary accuracy and F1 (Siriwardhana et al.'s metric)
    code: dict = None
    # -- written only where they apply, so that a run without them keeps the config.json it always had --
    transcripts: dict = None  # {"train", "test"}: which transcripts trained and tested it, where ASR ones are used
    asr_model: str = None
    asr_wer: float = None
    gradient_checkpointing: bool = False
    fold_by: str = None  # --protocol folds
    first_metric: str = None  # the metric the corpus's papers report first (classes.json), if not UA/WA
    # The target (mmser/targets.py): the emotion classes, the dimensional attributes, or both at once
    target: str = "categorical"
    attributes: dict = None  # {attribute: [low, high]}: the corpus's attributes trained, on its scale (classes.json)
    attribute_loss: str = "ccc"  # 1 - CCC per attribute over the batch, averaged; "mse": the squared error
    attribute_weight: float = 1.0  # --target both: the loss is the classes' loss + this x the attributes'
    attribute_utterances: str = "labelled"  # "rated": every utterance with attribute values trains them
    test_set: str = "test1"  # --protocol official: the partition tested (test1: the split "test")

    def to_json(self):
        """config.json's content: every setting, in field order; those of OPTIONAL_KEYS only where they apply."""
        out = dataclasses.asdict(self)
        for keys, absent in OPTIONAL_KEYS:
            absent = absent if isinstance(absent, tuple) else (absent,) * len(keys)
            if all(out[key] == value for key, value in zip(keys, absent)):
                for key in keys:
                    del out[key]
        return out

    @classmethod
    def from_json(cls, values, source="config.json"):
        """The settings a config.json holds; the settings it lacks (added since it was written) take
        the values the runs of that time had, which are the defaults."""
        unknown = sorted(set(values) - FIELDS)
        if unknown:
            raise RunError(f"{source}: unknown setting(s) {', '.join(unknown)}; was it written by a newer version?")
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


FIELDS = {f.name for f in dataclasses.fields(RunSettings)}
DEFAULTS = RunSettings()
# Groups of settings written to config.json only when they differ from these values.
# A group whose keys all have their absent values is left out (one absent value for all, or one per key).
OPTIONAL_KEYS = ((("transcripts", "asr_model", "asr_wer"), None), (("gradient_checkpointing",), False),
                 (("fold_by",), None), (("first_metric",), None),
                 (("target", "attributes", "attribute_loss", "attribute_weight", "attribute_utterances"),
                  ("categorical", None, "ccc", 1.0, "labelled")),
                 (("test_set",), "test1"))
# Settings that may differ when a run is resumed: they do not change the numbers. (feature_folders
# follows from settings that are compared: the models, the pooling, the window.)
NOT_COMPARED_ON_RESUME = ("device", "versions", "stop_after_epochs", "code", "val_split_description",
                          "feature_folders")
# --select-by without a value: the target's own (mmser/reporting.SELECT_BY): the classes' validation UA, the
# attributes' mean CCC (the MSP-Podcast challenge's choice), or for both at once the mean of the two.
SELECT_BY_OF_TARGET = {"categorical": DEFAULTS.select_by, "dimensional": "val_ccc", "both": "val_ua_ccc"}
# --test-set: the manifest's split each name tests (MSP-Podcast's Test1 is the split "test").
TEST_SPLITS = {"test1": "test", "test2": "test2", "test3": "test3"}
# --protocol folds without --fold-by holds out one session at a time.
DEFAULT_FOLD_BY = "session"
# The token limits: config.json's key -> the name the command line and the log give it.
TOKEN_LIMITS = {"max_text_tokens": "MAX_TEXT_TOKENS", "max_audio_tokens": "MAX_AUDIO_TOKENS"}


def read_settings(path):
    """A run folder's config.json as RunSettings; RunError naming the file when it does not read."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not a readable config.json ({e}); use a new RUN_DIR") from None
    if not isinstance(values, dict):
        raise RunError(f"{path}: not a config.json of main.py (not a JSON object)")
    return RunSettings.from_json(values, path)


@dataclass(frozen=True)
class RunEnv:
    """Where and how this process runs (not settings of the run: they do not change its numbers)."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    progress: bool = False  # progress bars: on a terminal only
    amp_dtype: object = None  # torch.bfloat16 under bf16 autocast
    notes: tuple = ()  # lines for the run's log (a token limit lowered, ...)


def parse_branches(text):
    """--branches "text,context" -> ["text", "context"], in the model's order."""
    branches = [b.strip() for b in text.split(",") if b.strip()]
    if not branches or set(branches) - set(BRANCHES) or len(set(branches)) != len(branches):
        raise RunError(f"--branches must be a comma-separated subset of {','.join(BRANCHES)}, got {text!r}")
    return [b for b in BRANCHES if b in branches]


def parse_seeds(text):
    """--seeds 1,2,3 -> [1, 2, 3]; None without it (one run with --seed)."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise RunError(f"--seeds must be distinct non-negative integers separated by commas, got {text!r}")
    return seeds


def val_split(options):
    """--val-split, except under the official protocol, where the corpus's dev split validates."""
    return "dev" if options.protocol == "official" else options.val_split


def describe_val_split(val_split, val_fraction):
    return {
        "dev": "the corpus's official dev split",
        "stratified": f"{val_fraction:.0%} of the training utterances, stratified by class",
        "speaker": "one training speaker held out (chosen by the seed)",
        "original": "the test session's other speaker, as the original's cross-validation script (its F speaker "
                    "tested; the test session also chooses the checkpoint)",
        "in-train-session": "the last training session, which also stays in training (Siriwardhana et al.'s "
                            "released lists: validation overlaps training)",
    }[val_split]


def option_settings(options, precision):
    """The settings the command line's options decide (everything but the files and what the data
    decides), by RunSettings field; `options` is main.py's parsed command line, which holds the
    defaults, the recipe's values and the options given, in that order of precedence."""
    split = val_split(options)
    return {
        "branches": parse_branches(options.branches),
        "context_window": options.context_window, "max_text_tokens": options.max_text_tokens,
        "max_audio_tokens": options.max_audio_tokens, "skip_missing": options.skip_missing,
        "protocol": options.protocol, "val_split": split, "val_fraction": options.val_fraction,
        "val_split_description": describe_val_split(split, options.val_fraction),
        "epochs": options.epochs, "batch_size": options.batch_size, "eval_batch_size": options.eval_batch_size,
        "grad_accum": options.grad_accum, "lr_encoders": options.lr_encoders, "lr_head": options.lr_head,
        "weight_decay": options.weight_decay, "scheduler": options.scheduler, "warmup": options.warmup,
        "clip_norm": options.clip_norm, "class_weights": options.class_weights, "fusion_hidden": options.fusion_hidden,
        "finetune_text": not options.freeze_text, "finetune_speech": options.finetune_speech,
        "group_by_length": options.group_by_length, "seed": options.seed, "precision": precision,
        "gradient_checkpointing": options.gradient_checkpointing,
        "sentence_pooling": options.sentence_pooling,
        "loss": options.loss, "head": options.head, "head_dropout": options.head_dropout,
        "adam_betas": list(options.adam_betas), "adam_eps": options.adam_eps, "select_by": options.select_by or SELECT_BY_OF_TARGET[options.target],
        "patience": options.patience, "one_vs_rest": options.one_vs_rest, "seeds": parse_seeds(options.seeds),
        "recipe": options.recipe, "recipe_overridden": list(getattr(options, "recipe_overridden", [])),
        "stop_after_epochs": options.stop_after_epochs,
        "fold_by": options.fold_by if options.protocol == "folds" else None,
        "target": options.target, "attribute_loss": options.attribute_loss,
        "attribute_weight": options.attribute_weight, "attribute_utterances": options.attribute_utterances,
        "test_set": options.test_set,
    }
