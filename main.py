"""Train and evaluate the fused emotion classifier on extracted features; or run the whole demo.

    python main.py RUN_DIR DATA_DIR MODELS_DIR [CONTEXT_WINDOW MAX_TEXT_TOKENS MAX_AUDIO_TOKENS] [options]
    torchrun --nproc_per_node N main.py ...          (DistributedDataParallel, one process per device)
    python main.py --demo [RUN_DIR]                  (synthetic corpus -> every stage -> results table; demo.py)

Reads DATA_DIR (utterances.csv and the feature folders data_contract.BRANCHES names for each branch;
see dataset_loader.py) and the pretrained encoders in MODELS_DIR (see model_structure.py). RUN_DIR is
a new or empty folder, or a run folder main.py made; writes everything under it:
  config.json                 every resolved setting (and the --recipe they came from), data_dir, the models
                              used, the code's git commit and the library versions
  train.log                   the log of every invocation (appended)
  fold{k}/best.pt             the tested epoch's weights, by --select-by (default: best validation UA, or
                              mean CCC for --target dimensional; torch.load(weights_only=True))
  fold{k}/last.pt             the last finished epoch, to resume from (removed once the fold is done)
  fold{k}/predictions.csv     name, true, predicted, p_ang, p_hap, p_sad, p_neu (test utterances); with
                              --target dimensional or both, true_<attribute> and <attribute> per attribute
                              (attributes.png: predicted against true; docs/dimensional.md)
  fold{k}/confusion_matrix.png, training_curves.png, attention.png (context branch, per slot)
  fold{k}/tensorboard/        the live curves (per step and per epoch) for TensorBoard
  fold{k}/fold_result.json    the fold's test and validation metrics and training history
  attention_pooled.png        the context branch's attention over every fold
  results.json                per-fold test metrics and their summary (mean, sample std, pooled)
  summary.md                  the results table (also printed)
  seed{n}/fold{k}/...         with --seeds: each seed's folds; results.json adds the spread over seeds
Running again with the same RUN_DIR and settings resumes: finished folds are kept, an interrupted
fold restarts from its last epoch checkpoint and ends with the numbers of an uninterrupted run.
The labels are the classes the manifest has (data_contract.label_set): a corpus collected with three
emotions trains a 3-way head and is scored over those three.

Protocols: session5 (train 1-4, test 5), loso (5 folds, one session each), speaker (10 folds, one
speaker each; the test speaker's session partner shares their dialogues, so their context, and is
not trained on); for any corpus, folds (one fold per value of a manifest column, --fold-by: session,
speaker, group, ...; no dialogue of the test fold is trained on) and official (a corpus that ships
train/dev/test splits, the manifest's split column: train on train, choose the checkpoint on dev,
test on test). A corpus whose papers report weighted F1 (MELD: its classes.json says so) has it
first in the log and the summary. Validation comes from the training sessions: 10% stratified by class (default)
or one held-out training speaker; `--val-split original` validates on the test session's other
speaker, as the original's cross-validation script did (for session protocols the session's M
speaker validates and its F speaker is tested; that script also ran the other order, and its
main.py validated on a random 10% of sessions 1-4); `--val-split in-train-session` validates on the
last training session, trained on too, as Siriwardhana et al.'s released lists. The test
utterances never train a model or choose its checkpoint, except under `--val-split original`,
where the test session chooses it (and the summary says so).
A user's mistake (a missing file, a RUN_DIR of other settings, a NaN loss) is one line naming the
file and the way out; anything else stops with its traceback, which train.log also keeps. torch and
the training modules are imported once the options are checked, so --help answers at once.

This script is the command line only: the settings and their defaults are mmser/settings.py's
RunSettings, the run itself mmser/runner.py (protocols, reporting, the run folder: mmser/).
"""
import argparse
import sys
from pathlib import Path

from mmser import options
from mmser.data_contract import BRANCHES, TEXT_STEPS
from mmser.dimensional import LOSSES
from mmser.recipes import RECIPES
from mmser.reporting import SELECT_BY, selects_by
from mmser.settings import (DEFAULT_FOLD_BY, DEFAULTS, SELECT_BY_OF_TARGET, TEST_SPLITS, TOKEN_LIMITS, RunError,
                            parse_branches, parse_seeds)
from mmser.speech.routes import route_of
from mmser.targets import TARGETS


# The usage line an error is printed under: argparse's own lists every option (30 lines), which would
# scroll the one line that matters off the screen.
USAGE = ("%(prog)s RUN_DIR DATA_DIR MODELS_DIR [CONTEXT_WINDOW MAX_TEXT_TOKENS MAX_AUDIO_TOKENS] [options]\n"
         "       %(prog)s --demo [RUN_DIR] [options]                    (--help lists the options)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except the empty ones (None, off) that the help text explains."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    from fixtures.demo import DEMO
    positional = ("context_window", "max_text_tokens", "max_audio_tokens")
    demo = ", ".join(f"{k.upper() if k in positional else '--' + k.replace('_', '-')} {v}" for k, v in DEMO.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=USAGE,
                                epilog=f"--demo changes these defaults: {demo}.", formatter_class=_HelpFormatter)
    add_run_arguments(p)
    add_training_options(p)
    add_target_options(p)
    add_model_options(p)
    add_protocol_options(p)
    add_machine_options(p)
    return p


def add_run_arguments(p, d=DEFAULTS):
    """The folders, the window and token limits (positional, as the original's), and what the run repeats."""
    p.add_argument("run_dir", nargs="?", help="where everything the run produces goes (resumes if it exists)")
    p.add_argument("data_dir", nargs="?", help="the extracted features (DATA_DIR of the data contract)")
    p.add_argument("models_dir", nargs="?", help="pretrained models: roberta-large/, bert_kmeans/bert_kmeans.pt")
    p.add_argument("context_window", nargs="?", type=int, default=d.context_window,
                   help="c: sentences before and after (reads FullBertEmb{c})")
    p.add_argument("max_text_tokens", nargs="?", type=int, default=None,
                   help=f"text RoBERTa tokens kept per utterance, </s> last (default {d.max_text_tokens}, or the "
                        f"recipe's, lowered to what the encoder's positions hold)")
    p.add_argument("max_audio_tokens", nargs="?", type=int, default=None,
                   help=f"speech RoBERTa tokens (vq-wav2vec frames + 2) kept per utterance, </s> last (default "
                        f"{d.max_audio_tokens}, or the recipe's, lowered to what the checkpoint's positions hold)")
    p.add_argument("--demo", action="store_true",
                   help="make the synthetic corpus and tiny models in RUN_DIR (default demo_run) and run every stage")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="every training setting of a named source (mmser/recipes.py; docs/recipes.md's table); options "
                        "given still override it")
    p.add_argument("--seeds", default=None,
                   help="e.g. 1,2,3: the whole protocol once per seed, in RUN_DIR/seed{n}/, with the mean and sample "
                        "std over seeds (instead of --seed)")


def add_training_options(p, d=DEFAULTS):
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs per fold")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process, per micro-batch")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="batch size for validation, test and the frozen-speech cache")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr-encoders", type=float, default=d.lr_encoders, help="learning rate of the pretrained RoBERTas")
    p.add_argument("--lr-head", type=float, default=d.lr_head, help="learning rate of the new layers")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW's, on weight matrices only")
    p.add_argument("--scheduler", choices=("linear", "newbob", "polynomial", "constant"), default=d.scheduler,
                   help="linear: warm-up then linear decay; newbob: halve the rate and restore the best weights "
                        "and optimizer state when validation UA improves by less than 0.001; polynomial: fairseq's "
                        "polynomial_decay (power 1, to 0) after the warm-up; constant: the rate never changes")
    p.add_argument("--warmup", type=float, default=d.warmup, help="share of the steps to warm up (linear)")
    p.add_argument("--clip-norm", type=float, default=d.clip_norm, help="gradient norm clipping (0: off)")
    p.add_argument("--adam-betas", type=float, nargs=2, default=d.adam_betas, metavar=("BETA1", "BETA2"),
                   help="AdamW's betas")
    p.add_argument("--adam-eps", type=float, default=d.adam_eps, help="AdamW's epsilon")
    p.add_argument("--loss", choices=("cross_entropy", "multi_margin"), default=d.loss,
                   help="multi_margin: torch's MultiMarginLoss(p=1, margin=0.4), the original's")
    p.add_argument("--select-by", choices=tuple(SELECT_BY), default=None,
                   help=f"which epoch's weights are tested: best validation UA, best validation weighted F1 (what "
                        f"MELD's papers choose on), best validation mean CCC (the attributes'), the best mean of UA "
                        f"and mean CCC, lowest validation loss, or the last (default: the target's own, "
                        f"{', '.join(f'{t} {v}' for t, v in SELECT_BY_OF_TARGET.items())})")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop a fold after this many epochs without a lower validation loss (0: never)")
    p.add_argument("--one-vs-rest", action=argparse.BooleanOptionalAction, default=d.one_vs_rest,
                   help="also report per-emotion binary accuracy and F1 (Siriwardhana et al.'s metric)")
    p.add_argument("--class-weights", choices=("none", "balanced"), default=d.class_weights,
                   help="balanced: weigh the loss by inverse class frequency in the training set")
    p.add_argument("--fusion-hidden", type=int, default=d.fusion_hidden, help="width of the fusion layer")
    p.add_argument("--head", choices=("mlp", "linear"), default=d.head,
                   help="mlp: Linear -> ReLU -> Linear over the branches' vectors; linear: dropout -> Linear")
    p.add_argument("--head-dropout", type=float, default=d.head_dropout, help="dropout before the head")


def add_target_options(p, d=DEFAULTS):
    """What the model learns (mmser/targets.py): the classes, the attributes, or both."""
    p.add_argument("--target", choices=TARGETS, default=d.target,
                   help="categorical: the emotion classes; dimensional: one value per attribute the corpus rates "
                        "(valence, arousal, dominance; docs/dimensional.md), scored by CCC; both: the classes and "
                        "the attributes from one head")
    p.add_argument("--attribute-loss", choices=LOSSES, default=d.attribute_loss,
                   help="the attributes' loss: 1 - CCC per attribute over the batch, averaged; or the mean "
                        "squared error (on the unit scale the model regresses)")
    p.add_argument("--attribute-weight", type=float, default=d.attribute_weight,
                   help="--target both: the loss is the classes' loss plus this times the attributes'")
    p.add_argument("--attribute-utterances", choices=("labelled", "rated"), default=d.attribute_utterances,
                   help="which utterances train and score the attributes: those of the classes (labelled), or every "
                        "one that has attribute values (rated: IEMOCAP's 10039; MSP-Podcast's X and O rows), the "
                        "folds of the labelled ones unchanged")


def add_model_options(p, d=DEFAULTS):
    options.add_text_model(p, "train")
    options.add_sentence_model(p, "train")
    options.add_speech_model(p, "train")
    options.add_transcripts(p, "train")
    options.add_asr_model(p, "train")
    p.add_argument("--branches", default=",".join(d.branches), help="any subset of text,speech,context")
    p.add_argument("--finetune-speech", action="store_true", default=d.finetune_speech,
                   help="train the speech RoBERTa too (frozen otherwise, and its vectors computed once)")
    p.add_argument("--freeze-text", action="store_true", default=not d.finetune_text,
                   help="keep the text RoBERTa frozen (fine-tuned otherwise)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="with --finetune-speech and a transformers speech encoder: recompute its activations in the "
                        "backward pass: less memory, more time")
    p.add_argument("--test-transcripts", choices=("reference", "asr"), default=None,
                   help="the transcripts the test folds are predicted from (default: --transcripts); "
                        "--transcripts reference --test-transcripts asr trains on the corpus's and tests on "
                        "speech recognition's")


def add_protocol_options(p, d=DEFAULTS):
    p.add_argument("--protocol", choices=("session5", "loso", "speaker", "folds", "official"), default=d.protocol,
                   help="session5: train on sessions 1-4, test on 5; loso: 5 folds, one session each; "
                        "speaker: 10 folds, one speaker each; folds: one fold per value of --fold-by; official: "
                        "the corpus's train/dev/test splits (the manifest's split column)")
    p.add_argument("--test-set", choices=tuple(TEST_SPLITS), default=d.test_set,
                   help="--protocol official: the partition tested: test1 (the split test: MSP-Podcast's Test1, "
                        "any other corpus's test), test2 or test3; a partition whose labels the corpus withholds "
                        "is never scored: every official run predicts it into the challenge's submission format")
    p.add_argument("--fold-by", default=DEFAULT_FOLD_BY,
                   help="--protocol folds: the manifest column whose values are held out one by one (session, "
                        "speaker, group, ...)")
    p.add_argument("--val-split", choices=("stratified", "speaker", "original", "in-train-session"),
                   default=d.val_split,
                   help="validation from the training sessions: stratified share or one held-out speaker; "
                        "original: the test session's other speaker (the original's cross-validation script); "
                        "in-train-session: the last training session, trained on too (Siriwardhana et al.'s lists)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the training utterances that validate (--val-split stratified)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=d.group_by_length,
                   help="batches of similar length (less padding), in random order; --no-group-by-length "
                        "draws every batch at random")
    p.add_argument("--skip-missing", action="store_true",
                   help="train and test without the labelled utterances that lack a feature file (named in "
                        "the log and results.json, counted in summary.md); without it a missing file stops the run")


def add_machine_options(p, d=DEFAULTS):
    options.add_device(p, default=d.device)
    options.add_threads(p)
    p.add_argument("--seed", type=int, default=d.seed, help="weights, dropout, batches and validation split")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto: bf16 autocast on a GPU that has it, fp32 otherwise")
    p.add_argument("--stop-after-epochs", type=int, default=d.stop_after_epochs,
                   help="stop (resumably) after this many epochs in this invocation, e.g. for job time limits; "
                        "0: run to the end")


def parse_args(argv=None, parser=None):
    parser = parser or build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--demo" in argv:  # the demo's own defaults; options given still override them
        from fixtures.demo import DEMO
        parser.set_defaults(**DEMO)
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=sorted(RECIPES))
    name = recipe.parse_known_args(argv)[0].recipe
    settings = {}
    if name:  # the recipe's settings over main.py's (and the demo's); options given still override them
        from mmser.recipes import recipe_settings
        settings = recipe_settings(name)
        # Token limits stay unset here, so that the recipe's are bounded by the encoders' positions.
        parser.set_defaults(**{k: v for k, v in settings.items() if k not in TOKEN_LIMITS},
                            **{k: None for k in TOKEN_LIMITS})
    args = parser.parse_args(argv)
    args.given = options_given(parser, argv)
    args.recipe_overridden = sorted(
        k for k, v in settings.items()
        if getattr(args, k) is not None and (list(getattr(args, k)) if isinstance(v, list) else getattr(args, k)) != v)
    return args


_UNSET = object()


def options_given(parser, argv):
    """The options (by dest) the command line gives, whatever their value: not a default, the demo's or a
    recipe's. (Positional arguments always count as given.)"""
    given = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=given)
    return {dest for dest, value in vars(given).items() if value is not _UNSET}


def check_options(args, parser):
    """Numbers that would crash a run later, or quietly train something else than asked; options that
    contradict each other (check_contradictions); model paths that are not there."""
    at_least = {"--epochs": (args.epochs, 1), "--batch-size": (args.batch_size, 1),
                "--eval-batch-size": (args.eval_batch_size, 1), "--grad-accum": (args.grad_accum, 1),
                "--fusion-hidden": (args.fusion_hidden, 1), "CONTEXT_WINDOW": (args.context_window, 1),
                "MAX_TEXT_TOKENS": (args.max_text_tokens or 2, 2), "MAX_AUDIO_TOKENS": (args.max_audio_tokens or 2, 2),
                "--patience": (args.patience, 0),
                "--seed": (args.seed, 0), "--stop-after-epochs": (args.stop_after_epochs, 0),
                "--clip-norm": (args.clip_norm, 0), "--weight-decay": (args.weight_decay, 0),
                "--threads": (args.threads or 1, 1)}
    for name, (value, least) in at_least.items():
        if value < least:
            parser.error(f"{name} must be at least {least}, got {value}")
    for name, value in (("--lr-encoders", args.lr_encoders), ("--lr-head", args.lr_head)):
        if not value > 0:
            parser.error(f"{name} must be positive, got {value}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be a share above 0 and below 1, got {args.val_fraction}")
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup must be a share from 0 and below 1, got {args.warmup}")
    if not 0 <= args.head_dropout < 1:
        parser.error(f"--head-dropout must be a share from 0 and below 1, got {args.head_dropout}")
    try:
        parse_seeds(args.seeds)
    except RunError as error:
        parser.error(str(error))
    try:
        parse_branches(args.branches)
    except RunError as error:
        parser.error(str(error))
    check_contradictions(args, parser)
    check_target_options(args, parser)
    options.check_model_paths(args, parser, ("text_model", "sentence_model", "speech_model"))


def check_contradictions(args, parser):
    """An option given on the command line that asks for something this run would not do (a mode, a
    model, a seed) is refused, naming what it contradicts: silently ignored, it would still be written
    into config.json as if it had been used. Numbers of a part the run does not have (--lr-encoders
    with nothing fine-tuned, --fusion-hidden with --head linear, --warmup with a constant schedule,
    --val-fraction with a split that takes no share, a token limit without its branch) change nothing
    and are accepted, so that one command line serves every ablation."""
    given = getattr(args, "given", set())  # parse_args' record: what the command line itself gave
    branches = parse_branches(args.branches)
    have = ",".join(branches)
    reads_text = [b for b in branches if any(step in TEXT_STEPS for step in BRANCHES[b].steps)]
    encoders = {BRANCHES[b].encoder_option for b in branches}
    speech = route_of(args.speech_model, args.finetune_speech)
    test_transcripts = args.test_transcripts or args.transcripts
    refused = {  # dest -> why it does not apply to this run (None: it applies)
        "seed": "--seeds runs each of its seeds; drop --seed" if args.seeds else None,
        "freeze_text": f"--branches {have} has no text branch" if "--text-model" not in encoders else None,
        "text_model": f"--branches {have} has no text branch" if "--text-model" not in encoders else None,
        "finetune_speech": f"--branches {have} has no speech branch" if "--speech-model" not in encoders else None,
        "speech_model": f"--branches {have} has no speech branch" if "--speech-model" not in encoders else None,
        "gradient_checkpointing":
            f"--branches {have} has no speech branch" if "--speech-model" not in encoders else
            None if speech.takes_gradient_checkpointing else
            "only a transformers speech encoder fine-tuned on the waveforms recomputes its activations "
            "(--speech-model FOLDER_OR_NAME --finetune-speech)",
        "sentence_model": None if "context" in branches else f"--branches {have} has no context branch",
        "sentence_pooling": None if "context" in branches else f"--branches {have} has no context branch",
        "transcripts": None if reads_text else f"--branches {have} reads no transcripts",
        "test_transcripts": None if reads_text else f"--branches {have} reads no transcripts",
        "asr_model": f"--branches {have} reads no transcripts" if not reads_text else
            None if "asr" in (args.transcripts, test_transcripts) else
            "it names the ASR transcripts a run trains or tests on, and this run reads the reference ones "
            "(add --transcripts asr or --test-transcripts asr)",
        "fold_by": None if args.protocol == "folds" else f"it names the folds of --protocol folds, not of "
                                                          f"--protocol {args.protocol}",
        "val_split": "--protocol official validates on the corpus's dev split" if args.protocol == "official" else None,
    }
    for dest, why in refused.items():
        if dest in given and why:
            value = getattr(args, dest)
            shown = "" if isinstance(value, bool) else f" {value}"
            parser.error(f"--{dest.replace('_', '-')}{shown} does not apply: {why}")


def check_target_options(args, parser):
    """The target's options: each one given only where it applies, and a --select-by the target reports."""
    if args.select_by and not selects_by(args.select_by, args.target):
        parser.error(f"--select-by {args.select_by} chooses by a figure a --target {args.target} run does not "
                     f"report; its own is {SELECT_BY_OF_TARGET[args.target]}")
    if args.target == "categorical":
        given = [f"--{k.replace('_', '-')}" for k in ("attribute_loss", "attribute_weight", "attribute_utterances")
                 if getattr(args, k) != getattr(DEFAULTS, k)]
        if given:
            parser.error(f"{', '.join(given)} apply to the attributes: give --target dimensional or both")
    elif args.target == "dimensional":
        if args.attribute_weight != DEFAULTS.attribute_weight:
            parser.error("--attribute-weight weighs the attributes' loss against the classes': it applies to --target "
                         "both")
        given = [name for name, value, default in (("--loss", args.loss, DEFAULTS.loss),
                                                   ("--class-weights", args.class_weights, DEFAULTS.class_weights),
                                                   ("--one-vs-rest", args.one_vs_rest, DEFAULTS.one_vs_rest))
                 if value != default]
        if given:
            parser.error(f"{', '.join(given)} apply to the classes, which --target dimensional does not learn: give "
                         f"--target both, or leave them out")
    if not args.attribute_weight > 0:
        parser.error(f"--attribute-weight must be positive, got {args.attribute_weight}")
    if args.test_set != DEFAULTS.test_set and args.protocol != "official":
        parser.error("--test-set names a partition of the corpus's own splits: it applies to --protocol official")


def main(argv=None):
    parser = build_parser()
    args = parse_args(argv, parser)
    check_options(args, parser)
    if args.demo and (args.data_dir or args.models_dir):
        parser.error("--demo takes only RUN_DIR: it makes its own data and models")
    if not args.demo and not (args.run_dir and args.data_dir and args.models_dir):
        parser.error("RUN_DIR, DATA_DIR and MODELS_DIR are required (or --demo)")
    # The folders are checked here, before torch loads (seconds): a missing MODELS_DIR would send every
    # model name to the hub, to retry the network for a minute before saying so.
    for what, folder in (("DATA_DIR", args.data_dir), ("MODELS_DIR", args.models_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise SystemExit(f"main.py: error: {what} {folder}: no such folder")
    if args.run_dir and Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise SystemExit(f"main.py: error: RUN_DIR {args.run_dir}: not a folder")
    try:
        if args.demo:
            from fixtures import demo
            return demo.run_demo(args)
        from mmser.runner import train_and_test
        return train_and_test(args)
    except RunError as error:
        raise SystemExit(f"main.py: error: {error}") from None
    except OSError as e:  # a file or folder that can't be read or written (read-only, not a folder, ...)
        if e.filename is None:
            raise
        raise SystemExit(f"main.py: error: {e.filename}: {e.strerror}") from None
    finally:
        if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
            sys.modules["torch.distributed"].destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a traceback would read as a crash; nothing finished is lost
        print("main.py: interrupted: run the same command again to resume from the last finished epoch", file=sys.stderr)
        sys.exit(130)
