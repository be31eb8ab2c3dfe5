"""What the pipeline's stages hand each other: the label set, the audio rate, the manifest, the features.

The data contract (docs/data-contract.md) in code. Every stage asks this module instead of
spelling a folder name, a column or a label itself:
  CLASSES, SAMPLE_RATE, MANIFEST_COLUMNS     IEMOCAP's 4-class label set, 16 kHz, utterances.csv's columns
  OPTIONAL_COLUMNS                           columns another corpus's manifest may add after them
  read_classes(DATA_DIR) / classes_bytes     DATA_DIR/classes.json: the corpus's label set, beside the manifest
  read_manifest(DATA_DIR)                    the manifest's rows, typed and checked against that label set
  label_set(rows, classes)                   the classes a manifest really has, in the label set's order
  STEPS                                      extraction step -> its folder, rows and pretrained files;
                                             qualified_step names one per model or transcript set; a
                                             speech route (mmser/speech/) adds its own (register_step)
  transcript_set / TEXT_STEPS / WER_FILE      ASR transcript sets (ASR-<tag>/Text/) and what is made from them
  BRANCHES                                   model branch -> the steps whose folders it reads, its
                                             utterance key, its encoder and the option naming it; the
                                             speech branch reads its route's step (models["speech"])
  read_feature / truncate_tokens             a feature file as the model's input reads it
  read_features_record / stale_features      DATA_DIR/features.json: who made each folder, for which manifest
  read_attributes(DATA_DIR)                  classes.json's "attributes": the dimensional attributes the corpus
                                             rates and their scales (mmser/dimensional.py); check_attribute_values
  read_withheld(DATA_DIR), ALL_SPLITS        classes.json's "withheld" partitions (predicted, never scored); the
                                             split column's values (MSP-Podcast's test2, test3 beside train/dev/test)
  carries_audio(row, withheld)               whether a row's Audio/ file is data: labelled, rated or withheld
A new branch, encoder family or extraction step is an entry in these tables plus the code that is
really new (its extraction and its module); nothing else spells its folder or its files. A new way
for the speech branch to hear a recording is a route of mmser/speech/, with its step.
"""
import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
# IEMOCAP's 4-class task (exc merged into hap by the corpus reader), in the order of the
# model's outputs and of every p_<class> column.
CLASSES = ("ang", "hap", "sad", "neu")
MANIFEST = "utterances.csv"
MANIFEST_COLUMNS = ("name", "utterance_id", "session", "dialog", "speaker", "gender", "start",
                    "end", "emotion", "label", "valence", "activation", "dominance", "transcript")
# Another corpus's manifest (MELD, a researcher's CSV) may add these, in this order, after the 14:
# split (train/dev/test of a corpus that ships them: the `official` protocol), group (a grouping
# to hold out fold by fold), sentiment (MELD's other target). IEMOCAP writes none of them.
OPTIONAL_COLUMNS = ("split", "group", "sentiment")
SPLITS = ("train", "dev", "test")
# Partitions beyond train/dev/test that a split column may hold (read_manifest accepts them, the official
# protocol's train/dev/test mean what they meant): MSP-Podcast's Test2 and Test3 (its Test1 is "test"), and
# "unpartitioned" for rows the release puts in no partition (context only, never trained or tested on).
MORE_SPLITS = ("test2", "test3", "unpartitioned")
ALL_SPLITS = SPLITS + MORE_SPLITS
_FLOAT_COLUMNS = ("start", "end", "valence", "activation", "dominance")
# The corpus's label set, written by its collector beside the manifest: {"classes": [...], ...}.
# A DATA_DIR made before it existed is IEMOCAP's: CLASSES.
CLASSES_RECORD = "classes.json"
FEATURES_RECORD = "features.json"
# features.json's key for what each step's files were made for: {step: manifest_fingerprint(rows)}
MANIFEST_KEY = "manifest"


class DataError(ValueError):
    """A DATA_DIR file that is not what the contract says; the message names the file."""


# ------------------------------------------------------------------------------------------------
# the tables

@dataclass(frozen=True)
class Step:
    """An extraction step: DATA_DIR/<folder>/<name>.npy for `rows` ("labelled" or "all") of the
    manifest, made from the pretrained files of `models` (their roles in features.json). A step that
    can be made with other models than the default keeps each model's files in a folder of its own,
    `per_model` with {model} filled by model_tag (folder is None when there is no default model)."""

    folder: str
    rows: str
    models: tuple
    per_model: str = None


# The context step is one per window size c: "context-{c}" writes FullBertEmb{c}/. The speech routes'
# steps (the vq-wav2vec tokens, a transformers encoder's layer means) are their own: register_step.
STEPS = {
    "text-tokens": Step("GPT2Tokens", "all", ("text_tokenizer",), per_model="TextTokens-{model}"),
    "sentence-embeddings": Step("BertEmb", "all", ("sentence_model",), per_model="SentenceEmb-{model}"),
    "context-{c}": Step("FullBertEmb{c}", "all", (), per_model="FullSentenceEmb{c}-{model}"),
    # Speech recognition: one transcript set per ASR model, ASR-<tag>/Text/<name>.txt (ASR_SET).
    "transcripts": Step(None, "all", ("asr_model",), per_model="ASR-{model}/Text"),
}


def register_step(name, entry):
    """Add the step `name` that a module above this one defines (a speech route of mmser/speech/, which
    keeps its step beside its extraction): from then on step_entry, feature_folder and features.json
    know it as they know the steps above. -> entry."""
    if STEPS.get(name, entry) != entry:
        raise ValueError(f"step {name!r} is already {STEPS[name]}")
    STEPS[name] = entry
    return entry

# The models whose outputs live in the original folders (GPT2Tokens/, BertEmb/ and FullBertEmb{c}/), by
# model_tag: a local copy named as the download, or the hub name with or without its organisation.
# Any other model, or another pooling of the sentence model, has folders of its own (instance_tag).
DEFAULT_MODELS = {"text-tokens": ("roberta-large", "FacebookAI--roberta-large"),
                  "sentence-embeddings": ("bert-base-uncased", "google-bert--bert-base-uncased")}
# A step whose files are made from another step's follows that step's model: "context-3@tag" is made
# from "sentence-embeddings@tag".
MADE_FROM = {"context-{c}": "sentence-embeddings"}
# How a sentence vector is read off the sentence model's last layer: the original's [CLS] vector, or
# the mean over the real tokens (attention mask 1, special tokens included, as sentence-transformers).
SENTENCE_POOLINGS = ("cls", "mean")
DEFAULT_SENTENCE_POOLING = SENTENCE_POOLINGS[0]  # the original's [CLS] vector
# The transformers text encoders the text branch and the sentence model take, by config.model_type:
# each is fine-tuned for classification on its first token's last hidden state (RoBERTa's <s>, BERT's,
# ELECTRA's and DeBERTa's [CLS]; DeBERTa-v3 checkpoints are model_type "deberta-v2").
TEXT_ENCODERS = {"roberta": "RoBERTa", "bert": "BERT", "deberta-v2": "DeBERTa-v2/v3", "electra": "ELECTRA"}
# A transcript set is a folder of DATA_DIR holding its own Text/ (the reference set is DATA_DIR
# itself); these steps read a set's Text/ and have an instance per set, under the set's folder.
ASR_SET = "ASR-{model}"
TEXT_STEPS = ("text-tokens", "sentence-embeddings", "context-{c}")
# In an ASR set's folder: the step's word error rates against the reference transcripts.
WER_FILE = "wer.json"


@dataclass(frozen=True)
class Branch:
    """A branch of the model: the steps whose folders it needs (the last one is what it loads),
    the key of its input in an utterance dict, and its pretrained encoder (the role under which
    config.json records it, the option that names it, the option that bounds its tokens)."""

    steps: tuple
    key: str
    encoder: str = None
    encoder_option: str = None
    length_option: str = None


# The speech branch reads the step of its route (mmser/speech/: the vq-wav2vec tokens, or a transformers
# encoder's layer means), which branch_steps finds in `models`; its key is the token routes' (a layers
# route's inputs have keys of their own, the route's).
BRANCHES = {
    "text": Branch(("text-tokens",), "text_ids", "text_model", "--text-model", "MAX_TEXT_TOKENS"),
    "speech": Branch((), "speech_ids", "speech_model", "--speech-model", "MAX_AUDIO_TOKENS"),
    "context": Branch(("sentence-embeddings", "context-{c}"), "context"),
}


def model_tag(model):
    """A folder-safe name for a pretrained model, for the folders that hold one model's outputs beside
    another's (a transformers speech encoder's layer means, an ASR model's transcripts): a hub name
    "org/name" -> "org--name" (as transformers' cache spells it), a local folder -> its own name.
    Two models with one tag cannot mix unseen: features.json records each folder's model sha256."""
    text = str(model).rstrip("/\\")
    path = Path(text)
    tag = path.name if path.exists() or text.startswith((".", "/", "~")) else text.replace("/", "--")
    if not tag or tag in (".", ".."):
        raise ValueError(f"{model!r}: cannot name a folder after this model")
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tag)


def branch_steps(branch, context_window, models=None, transcripts=None):
    """The extraction steps `branch` needs, by name ("context-{c}" filled in): `models` maps a step
    (a STEPS key) to the instance_tag of the run's model for it, when that is not the default; those
    made from text are the instances of the transcript set `transcripts` (None: the reference). The
    speech branch reads the step its route names as models["speech"] (mmser.speech.routes.speech_models),
    none without it."""
    models = models or {}
    if branch == "speech":
        return [models["speech"]] if "speech" in models else []
    return [qualified_step(step.format(c=context_window), models.get(MADE_FROM.get(step, step)),
                           transcripts if step in TEXT_STEPS else None)
            for step in BRANCHES[branch].steps]


def instance_tag(step, model, variant=None):
    """The model tag under which `step`'s files made with `model` (and a non-default `variant` of the
    step, e.g. "mean" pooling) live: None for the step's default model and variant (its original
    folder), else model_tag(model) plus "+variant". None as model means the default model."""
    tag = model_tag(model) if model is not None else DEFAULT_MODELS[step][0]
    if variant is None and tag in DEFAULT_MODELS.get(step, ()):
        return None
    return tag if variant is None else f"{tag}+{variant}"


def sentence_tag(sentence_model, pooling=DEFAULT_SENTENCE_POOLING):
    """instance_tag of the sentence embeddings (and the context vectors made from them)."""
    return instance_tag("sentence-embeddings", sentence_model, None if pooling == "cls" else pooling)


def text_models(text_model=None, sentence_model=None, pooling=DEFAULT_SENTENCE_POOLING):
    """branch_steps' `models` for a run's text model and sentence model (None: the defaults)."""
    tags = {"text-tokens": instance_tag("text-tokens", text_model),
            "sentence-embeddings": sentence_tag(sentence_model, pooling)}
    return {step: tag for step, tag in tags.items() if tag is not None}


def transcript_set(asr_model):
    """The folder of DATA_DIR that holds the transcripts of ASR model `asr_model` and the features made
    from them (None: the reference transcripts, DATA_DIR itself)."""
    return None if asr_model is None else ASR_SET.format(model=model_tag(asr_model))


def transcript_folder(data_dir, transcripts=None):
    """Text/ of a transcript set (transcript_set): <name>.txt, one line, for every utterance."""
    return Path(data_dir) / (transcripts or "") / "Text"


def transcript_sets(data_dir):
    """The ASR transcript sets DATA_DIR holds, by folder name."""
    return sorted(p.parent.name for p in Path(data_dir).glob(ASR_SET.format(model="*") + "/Text") if p.is_dir())


# A step's instance name, which is also its key in features.json: "[<transcripts>/]<step>[@<model>]".
# The default instances keep their plain names ("text-tokens", "context-2"), so existing records and
# folders mean what they meant.
def qualified_step(step, model=None, transcripts=None):
    """The instance of `step` made with the model tagged `model` (model_tag; None: the step's default
    model) from the transcript set `transcripts` (a folder of DATA_DIR holding its own Text/ and the
    folders derived from it; None: the reference transcripts), e.g. "text-tokens@bert-base-cased",
    "ASR-openai--whisper-large-v3/context-2"."""
    name = step if model is None else f"{step}@{model}"
    return name if transcripts is None else f"{transcripts}/{name}"


def split_step(name):
    """qualified_step's inverse: (transcripts or None, step, model or None)."""
    transcripts, _, rest = name.rpartition("/")
    step, _, model = rest.partition("@")
    return transcripts or None, step, model or None


def step_entry(name):
    """STEPS' entry of a step instance, "context-3" and qualified names included, with the folder
    (relative to DATA_DIR) of that instance."""
    transcripts, step, model = split_step(name)
    if step.startswith("context-"):
        c, context = step[len("context-"):], STEPS["context-{c}"]
        entry = Step(context.folder.format(c=c), "all", (), context.per_model.format(c=c, model="{model}"))
    else:
        entry = STEPS[step]
    if model is not None:
        if entry.per_model is None:
            raise ValueError(f"step {step!r} has no per-model folders (asked for {name!r})")
        entry = Step(entry.per_model.format(model=model), entry.rows, entry.models, entry.per_model)
    elif entry.folder is None:
        raise ValueError(f"step {step!r} needs a model (e.g. {qualified_step(step, 'MODEL')!r})")
    if transcripts is not None:
        entry = Step(f"{transcripts}/{entry.folder}", entry.rows, entry.models, entry.per_model)
    return entry


def feature_folder(data_dir, step):
    return Path(data_dir) / step_entry(step).folder


def feature_path(data_dir, branch, name, context_window, models=None, transcripts=None):
    """The file of utterance `name` that `branch` loads (models, transcripts: as branch_steps)."""
    return feature_folder(data_dir, branch_steps(branch, context_window, models, transcripts)[-1]) / f"{name}.npy"


def pretrained_roles(branch, models=None):
    """The pretrained files a branch needs at inference: its encoder, and what made its features (models:
    as branch_steps; the speech route's step among them)."""
    entry = BRANCHES[branch]
    roles = [entry.encoder] if entry.encoder else []
    return roles + [role for step in branch_steps(branch, 0, models) for role in step_entry(step).models]


def read_feature(path, what, ndim=1):
    """A feature file as the model's input reads it: a non-empty, finite `ndim`-D array; DataError naming
    the file otherwise (`what` says what it should hold)."""
    try:
        array = np.load(path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing {what}; run the feature extraction stage first") from None
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: not a readable .npy file ({error})") from None
    if array.ndim != ndim or array.size == 0:
        raise DataError(f"{path}: expected a non-empty {ndim}-D array for {what}, got shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{path}: {what} holds NaN or infinite values; recompute it (--overwrite)")
    return array


def truncate_tokens(ids, max_tokens):
    """A token file's `<s> ... </s>` ids cut to at most max_tokens, keeping `</s>` as the last token (the
    sequence's own last token: another text encoder's `[SEP]`), as fairseq's encoders saw them in
    pre-training: the files keep every token, the limit is the run's."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (<s> and </s>), got {max_tokens}")
    if len(ids) <= max_tokens:
        return ids
    return np.concatenate([ids[: max_tokens - 1], ids[-1:]]).astype(ids.dtype)


# ------------------------------------------------------------------------------------------------
# the manifest

def classes_bytes(classes, **about):
    """DATA_DIR/classes.json's content: the label set in the model's output order, and what else
    the collector says of it (corpus, target)."""
    return (json.dumps({"classes": list(classes), **about}, indent=1) + "\n").encode("utf-8")


def read_classes(data_dir):
    """The corpus's label set, in the order of the model's outputs and every p_<class> column:
    DATA_DIR/classes.json, or IEMOCAP's CLASSES for a DATA_DIR written before that file existed."""
    path = Path(data_dir) / CLASSES_RECORD
    if not path.exists():
        return list(CLASSES)
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))["classes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable label set ({e!r}); rerun the corpus's collection script") from None
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes)
            or not all(isinstance(c, str) and c and c.strip() == c and "," not in c for c in classes)):
        raise DataError(f"{path}: 'classes' must list at least two distinct, non-empty labels, got {classes!r}")
    return classes


def read_manifest(data_dir):
    """The rows of DATA_DIR/utterances.csv in corpus order, typed: session an int,
    start/end/valence/activation/dominance floats (an empty cell: NaN, unknown), the rest strings
    (label is "" for utterances outside the target classes, which are context only). Labels must be
    in the label set (read_classes); optional columns (OPTIONAL_COLUMNS) come after the 14."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; DATA_DIR is the folder mocap_data_collect.py wrote")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    header = tuple(table[0]) if table else None
    extra = header[len(MANIFEST_COLUMNS):] if header else ()
    if (header is None or header[:len(MANIFEST_COLUMNS)] != MANIFEST_COLUMNS
            or extra != tuple(c for c in OPTIONAL_COLUMNS if c in extra)):
        raise DataError(f"{path}: header is {list(header or [])}, expected {list(MANIFEST_COLUMNS)} followed by "
                        f"any of {list(OPTIONAL_COLUMNS)} in that order")
    classes = read_classes(data_dir)
    rows = []
    for lineno, cells in enumerate(table[1:], 2):
        if len(cells) != len(header):
            raise DataError(f"{path}:{lineno}: {len(cells)} fields, expected {len(header)}")
        row = dict(zip(header, cells))
        try:
            row["session"] = int(row["session"])
            for c in _FLOAT_COLUMNS:
                row[c] = float(row[c]) if row[c] else float("nan")
        except ValueError as err:
            raise DataError(f"{path}:{lineno}: {err}") from None
        if row["label"] and row["label"] not in classes:
            raise DataError(f"{path}:{lineno}: label {row['label']!r} is not one of {', '.join(classes)}")
        if "split" in row and row["split"] not in ALL_SPLITS:
            raise DataError(f"{path}:{lineno}: split {row['split']!r} is not one of {', '.join(ALL_SPLITS)}")
        rows.append(row)
    return rows


def label_set(rows, classes=CLASSES):
    """The classes the manifest's labelled rows really have, in the label set's order (`classes`,
    read_classes of its DATA_DIR): a corpus collected with fewer emotions trains a head of that
    many outputs and is scored over those classes only."""
    present = {row["label"] for row in rows if row["label"]}
    return [c for c in classes if c in present]


# ------------------------------------------------------------------------------------------------
# dimensional attributes and withheld partitions: classes.json, beside the label set
#
# classes.json may say, beside "classes":
#   "attributes": {"valence": [low, high], "arousal": [...], "dominance": [...]}
#       the attributes the corpus rates (names: dimensional.ATTRIBUTES; the manifest's columns:
#       dimensional.MANIFEST_COLUMN, arousal in `activation`) and the range of each, e.g. MSP-Podcast's [1, 7]
#   "withheld": ["test3"]
#       partitions whose labels the release withholds: their rows are predicted, never scored
# A DATA_DIR written before these keys existed has no withheld partition, and its attributes follow from
# its manifest (read_attributes).
ATTRIBUTES_KEY = "attributes"
WITHHELD_KEY = "withheld"


def _corpus_record(data_dir):
    """classes.json as a dict ({} when there is none), and its path."""
    path = Path(data_dir) / CLASSES_RECORD
    if not path.exists():
        return {}, path
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable label set ({e!r}); rerun the corpus's collection script") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object with \"classes\", got {type(record).__name__}")
    return record, path


def attributes_record(attributes):
    """classes.json's "attributes" value for {attribute: dimensional.Scale}."""
    return {name: scale.as_list() for name, scale in attributes.items()}


def read_attributes(data_dir, rows=None):
    """The dimensional attributes the corpus rates: {attribute: dimensional.Scale}, in ATTRIBUTES order
    ({} for a corpus without them). From classes.json's "attributes", checked; without that key, from the
    manifest (`rows`, else read): a manifest whose every row has valence, activation and dominance is
    IEMOCAP's, which is what mocap_data_collect.py wrote before the key existed (no other collector filled
    those columns), on IEMOCAP's 1-5; one whose rows have none has no attributes; a mix is refused."""
    from mmser.dimensional import ATTRIBUTES, IEMOCAP_SCALE, MANIFEST_COLUMN, Scale
    record, path = _corpus_record(data_dir)
    if ATTRIBUTES_KEY in record:
        given = record[ATTRIBUTES_KEY]
        if not isinstance(given, dict):
            raise DataError(f"{path}: \"{ATTRIBUTES_KEY}\" must map attribute names to [low, high], got {given!r}")
        unknown = [name for name in given if name not in ATTRIBUTES]
        if unknown:
            raise DataError(f"{path}: unknown attribute(s) {', '.join(map(repr, unknown))} in \"{ATTRIBUTES_KEY}\"; "
                            f"the attributes are {', '.join(ATTRIBUTES)} (IEMOCAP's activation is arousal)")
        attributes = {}
        for name in ATTRIBUTES:
            if name not in given:
                continue
            bounds = given[name]
            try:
                if (not isinstance(bounds, list) or len(bounds) != 2
                        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
                    raise ValueError("not two numbers")
                attributes[name] = Scale(float(bounds[0]), float(bounds[1]))
            except ValueError:
                raise DataError(f"{path}: the scale of {name} must be [low, high], two numbers with low < high, "
                                f"got {bounds!r}") from None
        return attributes
    rows = read_manifest(data_dir) if rows is None else rows
    rated = [sum(math.isfinite(float(row[MANIFEST_COLUMN[a]])) for a in ATTRIBUTES) for row in rows]
    if rows and all(n == len(ATTRIBUTES) for n in rated):
        return {name: IEMOCAP_SCALE for name in ATTRIBUTES}
    if any(rated):
        raise DataError(f"{Path(data_dir) / MANIFEST}: some utterances have valence/activation/dominance values and "
                        f"{path.name} records no \"{ATTRIBUTES_KEY}\"; rerun the corpus's collection script")
    return {}


def check_attribute_values(data_dir, rows, attributes):
    """Every value of a rated attribute in the manifest lies on its scale: DataError naming the manifest's
    line otherwise. (An empty cell, NaN, is an unknown value and allowed.)"""
    from mmser.dimensional import MANIFEST_COLUMN
    for index, row in enumerate(rows):
        for name, scale in attributes.items():
            value = float(row[MANIFEST_COLUMN[name]])
            if math.isfinite(value) and not scale.contains(value):
                raise DataError(f"{Path(data_dir) / MANIFEST}:{index + 2}: {name} ({MANIFEST_COLUMN[name]}) {value:g} "
                                f"lies outside its scale [{scale.low:g}, {scale.high:g}] ({CLASSES_RECORD})")


def read_withheld(data_dir):
    """The partitions whose labels the release withholds (classes.json's "withheld"; [] without it):
    their rows carry no label and no attribute values, and are predicted, never scored."""
    record, path = _corpus_record(data_dir)
    withheld = record.get(WITHHELD_KEY, [])
    if not isinstance(withheld, list) or not all(s in ALL_SPLITS for s in withheld):
        raise DataError(f"{path}: \"{WITHHELD_KEY}\" must list partitions among {', '.join(ALL_SPLITS)}, "
                        f"got {withheld!r}")
    return withheld


def carries_audio(row, withheld=()):
    """Whether a manifest row's Audio/<name>.wav is part of the data: a labelled row (the categorical task),
    a row with an attribute value (the dimensional task: MSP-Podcast's X and O rows), or a row of a withheld
    partition (predicted). msp_podcast_collect.py writes the audio of these rows (write_data_dir's
    wants_audio), and the speech steps ("labelled") extract those whose Audio/ file was written
    (extraction.rows_of): IEMOCAP's and a CSV corpus's unlabelled rows with --all-audio."""
    from mmser.dimensional import ATTRIBUTES, MANIFEST_COLUMN
    return bool(row["label"]) or row.get("split") in withheld or any(
        row[MANIFEST_COLUMN[a]] != "" and math.isfinite(float(row[MANIFEST_COLUMN[a]])) for a in ATTRIBUTES)


# ------------------------------------------------------------------------------------------------
# features.json: which pretrained files made each folder, for which manifest

def read_features_record(data_dir):
    """DATA_DIR/features.json: {step: {role: fingerprint}, "manifest": {step: sha256}}; empty when
    no step has recorded yet."""
    path = Path(data_dir) / FEATURES_RECORD
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable record of the models used ({e}); delete it and rerun "
                        f"the feature extraction with --overwrite") from None


def manifest_fingerprint(rows):
    """What a feature file's name stands for: every row's name (its position in the manifest),
    utterance id and transcript, in order. When it changes, a name may mean another utterance."""
    lines = "".join(f"{row['name']}\t{row['utterance_id']}\t{row['transcript']}\n" for row in rows)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def stale_features(data_dir, steps, rows):
    """The steps among `steps` whose files features.json says were made for another manifest."""
    made_for = read_features_record(data_dir).get(MANIFEST_KEY, {})
    now = manifest_fingerprint(rows)
    return [step for step in steps if made_for.get(step, now) != now]
