"""One typed configuration: dataclasses, loadable from YAML/JSON, overridable on the command line.

Keys are flat (``--learning_rate 1e-4``) except nested dataclasses, which use dots (``--student.layers 6``).
A method's own options (its ``Options`` dataclass) live in the same flat namespace (``--temperature 2``).
Unknown keys are errors that name the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError
from .io import load_mapping


@dataclass
class StudentConfig:
    """Which student to train: an existing model, or one built from the teacher."""

    name_or_path: Optional[str] = None  # existing student (path or hub id); None = build from the teacher
    layers: Optional[int] = None  # depth of a student built from the teacher (encoder / decoder-only stack)
    decoder_layers: Optional[int] = None  # decoder depth for encoder-decoder teachers
    hidden: Optional[int] = None  # width; a different width forces random init
    heads: Optional[int] = None  # attention heads of a student built at a new width
    intermediate: Optional[int] = None  # feed-forward size; defaults to 4 x hidden when hidden changes
    init: str = "auto"  # "teacher_layers" (copy alternating teacher layers), "random", or auto: the method's default


@dataclass
class TrainConfig:
    method: str = "kd"  # distillation method (see 'methods' above)
    # models
    teacher: Optional[str] = None  # teacher model: local folder, hub id, or offline:<name>
    student: StudentConfig = field(default_factory=StudentConfig)
    tokenizer: Optional[str] = None  # default: the student's, else the teacher's
    trust_remote_code: bool = False  # allow model code shipped with a hub model
    teacher_dtype: str = "auto"  # auto (student's training dtype) | fp32 | bf16 | fp16
    teacher_tp: int = 1  # split the teacher over N ranks (tensor parallel); each N consecutive ranks hold one copy
    teacher_ranks: int = 0  # the first N ranks serve the teacher (sparse top-k rows) to the others, which train
    teacher_prefetch: int = 2  # with teacher_ranks: micro-batches requested ahead of the one trained on
    attn_implementation: Optional[str] = None  # sdpa | eager | flash_attention_2, both models (default: transformers')
    gradient_checkpointing: bool = False  # recompute the student's layer activations in backward (less memory)
    # data
    train_file: Optional[str] = None  # training data file (jsonl/csv/tsv/txt) or dataset id
    eval_file: Optional[str] = None  # held-out data file (jsonl/csv/tsv/txt)
    text_column: str = "text"  # column holding the input text
    text_pair_column: Optional[str] = None  # second text of sentence pairs (NLI)
    label_column: Optional[str] = None  # class label column (classification)
    target_column: Optional[str] = None  # response (causal LM, loss on it only) or target text (seq2seq)
    messages_column: Optional[str] = None  # chat rows (list of {role, content}) rendered with the chat template
    packing: bool = False  # causal LM kd/sft/seqkd: several examples per row, no attention across them
    max_length: int = 128  # tokens per example (longer ones are cut)
    max_train_samples: Optional[int] = None  # use at most this many training examples
    max_eval_samples: Optional[int] = None  # use at most this many evaluation examples
    eval_split: float = 0.0  # fraction of the training file held out for evaluation when no eval_file
    split_seed: Optional[int] = None  # seed of the --eval_split hold-out (default --seed): one dev set across seeds
    group_by_length: bool = True  # batch examples of similar length together
    # run
    output_dir: str = "outputs/run"  # run folder: checkpoints, TensorBoard, train_log.jsonl, final/
    overwrite_output_dir: bool = False  # replace a previous run there (only what kd_engine wrote)
    resume: str = "false"  # false | true (bare --resume: continue the newest complete checkpoint) | auto
    stop_signals: list[str] = field(default_factory=lambda: ["USR1", "TERM"])  # checkpoint + stop (+ requeue)
    requeue_on_stop: bool = True  # after a stop signal under a requeueable SLURM batch job: scontrol requeue
    deepspeed: Optional[str] = None  # DeepSpeed JSON (ds_configs/zero*.json); default ds_configs/zero0.json
    per_device_train_batch_size: int = 8  # micro-batch per rank
    per_device_eval_batch_size: int = 16  # evaluation batch per rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 5e-5  # peak learning rate of the student
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_epsilon: float = 1e-8  # AdamW epsilon
    lr_scheduler_type: str = "linear"  # linear | constant | cosine
    warmup_steps: int = 0  # linear warm-up steps
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0  # epochs when max_steps is -1
    max_grad_norm: float = 1.0  # gradient clipping norm (0 = off)
    seed: int = 42  # seed of data order, init and sampling
    logging_steps: int = 10  # log every N optimizer steps
    save_steps: int = 0  # 0: save only at the end
    save_total_limit: int = 2  # keep the newest N checkpoints
    eval_steps: int = 0  # 0: evaluate only at the end
    eval_on_start: bool = False  # evaluate once before the first step (e.g. perplexity before distillation)
    report_to: str = "tensorboard"  # tensorboard | none
    export: bool = True  # write the final student as a Hugging Face folder to output_dir/final
    disable_tqdm: bool = False  # no progress bar
    verbose: bool = False  # show third-party (DeepSpeed, transformers, datasets) info output and progress bars
    max_nonfinite_steps: int = 10  # stop (with a checkpoint of the last good state) after this many skipped steps
    dist_timeout: float = 600.0  # seconds a collective waits for a lost rank before every rank exits with an error


# ----------------------------------------------------------------------------------------------------------
# field introspection


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def flat_fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Map every settable key (dotted for nested dataclasses) to its type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(flat_fields(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = tp
    return out


def _convert(key: str, tp: Any, value: Any) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and optional and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            f = float(value)
            if f != f or f in (float("inf"), float("-inf")):
                raise ConfigError(f"config key '{key}' must be a finite number; got {value!r}")
            return f
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            return [_convert(key, item, v) for v in value]
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"config key '{key}' expects {getattr(base, '__name__', base)}, got {value!r}")


def _set(obj: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def _flatten_mapping(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_mapping(v, prefix + str(k) + "."))
        else:
            out[prefix + str(k)] = v
    return out


def unknown_key_error(key: str, known: list[str], where: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


# ----------------------------------------------------------------------------------------------------------
# file + command line


def load_config_file(path: str) -> dict[str, Any]:
    return _flatten_mapping(load_mapping(path, "config file"))


# flags the launchers add that are not ours to configure
_LAUNCHER_KEYS = {"local_rank", "local-rank"}


def parse_argv(argv: list[str], bool_keys: set[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` for booleans -> {key: raw string}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument '{tok}' (options look like --key value)")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key in bool_keys and (nxt is None or nxt.startswith("--")):
                val = "true"
            elif nxt is None or (nxt.startswith("--") and key not in _LAUNCHER_KEYS):
                raise ConfigError(f"option --{key} needs a value")
            else:
                val = nxt
                i += 1
        if key in _LAUNCHER_KEYS:
            i += 1
            continue
        out[key] = val
        i += 1
    return out


@dataclass
class ParsedConfig:
    train: TrainConfig
    method_options: Any  # the method's Options dataclass instance
    method_cls: type
    # engine keys the user set, mapped to where ("the command line" or the --config file): the batch geometry
    # lets an explicit DeepSpeed JSON value override defaults, never a value the user set to something else
    explicit: dict[str, str] = field(default_factory=dict)


def build_config(argv: list[str]) -> ParsedConfig:
    """Parse ``argv`` (without the program name) into the train config and the chosen method's options."""
    from .methods import get_method, method_names

    train_keys = flat_fields(TrainConfig)
    # first pass: find --config and --method without knowing the method's options yet
    all_bool = {k for k, t in train_keys.items() if _unwrap_optional(t)[0] is bool} | {"resume"}
    for name in method_names():
        opts_cls = get_method(name).Options
        all_bool |= {k for k, t in flat_fields(opts_cls).items() if _unwrap_optional(t)[0] is bool}
    cli = parse_argv(argv, all_bool | {"eval_before_training"})
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    if "config" in cli:
        path = cli.pop("config")
        values.update(load_config_file(path))
        source.update({k: path for k in values})
    values.update(cli)
    source.update({k: "the command line" for k in cli})
    # "--student PATH" is shorthand for --student.name_or_path PATH; eval_before_training is eval_on_start's old name
    for old, new in (("student", "student.name_or_path"), ("eval_before_training", "eval_on_start")):
        if old in values:
            values[new] = values.pop(old)
            source[new] = source.pop(old)

    method_name = str(values.get("method", TrainConfig.method))
    method_cls = get_method(method_name)
    opt_keys = flat_fields(method_cls.Options)
    for key in [k for k in values if k not in train_keys and f"{k}.name_or_path" in opt_keys]:
        values[f"{key}.name_or_path"] = values.pop(key)  # "--generator PATH" = --generator.name_or_path PATH
        if key in source:
            source[f"{key}.name_or_path"] = source.pop(key)
    clash = set(opt_keys) & set(train_keys)
    if clash:  # a plugin bug, not a user error
        raise RuntimeError(f"method '{method_name}' options shadow engine keys: {sorted(clash)}")

    train = TrainConfig()
    opts = method_cls.Options()
    for key, raw in values.items():
        if key in train_keys:
            _set(train, key, _convert(key, train_keys[key], raw))
        elif key in opt_keys:
            _set(opts, key, _convert(key, opt_keys[key], raw))
        else:
            raise unknown_key_error(key, sorted(train_keys) + sorted(opt_keys) + ["config"],
                                    f" for method '{method_name}'")
    if train.student.init == "auto":
        train.student.init = method_cls.default_student_init
    validate_train_config(train)
    from .methods.base import check_capabilities

    check_capabilities(train, method_cls)
    from .data.split import check_data_options

    check_data_options(train, method_name, method_cls.data_options)
    if hasattr(opts, "validate"):
        opts.validate()
    if hasattr(opts, "check_against"):  # option checks that need the engine config (e.g. files it names)
        opts.check_against(train)
    return ParsedConfig(train=train, method_options=opts, method_cls=method_cls,
                        explicit={k: v for k, v in source.items() if k in train_keys})


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got '{value}'")


def validate_train_config(c: TrainConfig) -> None:
    _check_choice("teacher_dtype", c.teacher_dtype, ("auto", "fp32", "bf16", "fp16"))
    _check_choice("lr_scheduler_type", c.lr_scheduler_type, ("linear", "constant", "cosine"))
    _check_choice("report_to", c.report_to, ("tensorboard", "none"))
    _check_choice("student.init", c.student.init, ("teacher_layers", "random"))
    if not str(c.output_dir).strip():
        raise ConfigError("output_dir must not be empty (the run folder: checkpoints, logs, final/)")
    if c.attn_implementation is not None:
        from .models.attention import check_attn_implementation

        check_attn_implementation(c.attn_implementation)
    if c.messages_column is not None and (c.text_pair_column or c.target_column or c.label_column):
        raise ConfigError("--messages_column holds whole conversations: it excludes --target_column, "
                          "--text_pair_column and --label_column")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_length", "save_total_limit", "logging_steps", "max_nonfinite_steps", "teacher_tp"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{key} must be >= 1; got {getattr(c, key)}")
    for key in ("save_steps", "eval_steps", "warmup_steps"):
        if getattr(c, key) < 0:
            raise ConfigError(f"{key} must be >= 0; got {getattr(c, key)}")
    for key in ("max_train_samples", "max_eval_samples"):
        if getattr(c, key) is not None and getattr(c, key) < 1:
            raise ConfigError(f"{key} must be >= 1 (or unset); got {getattr(c, key)}")
    if not 0.0 <= c.eval_split < 1.0:
        raise ConfigError(f"eval_split must be in [0, 1); got {c.eval_split}")
    if c.max_steps == 0 or c.max_steps < -1:
        raise ConfigError(f"max_steps must be >= 1, or -1 to train num_train_epochs; got {c.max_steps}")
    if c.max_steps == -1 and c.num_train_epochs <= 0:
        raise ConfigError(f"num_train_epochs must be > 0 when max_steps is -1; got {c.num_train_epochs}")
    if not 0.0 <= c.learning_rate <= 1.0:  # 0 freezes the student (used to check a method's zero point)
        raise ConfigError(f"learning_rate must be in [0, 1]; got {c.learning_rate}")
    if not 0.0 <= c.weight_decay <= 1.0:
        raise ConfigError(f"weight_decay must be in [0, 1]; got {c.weight_decay}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(c, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1); got {getattr(c, key)}")
    if not 0.0 < c.adam_epsilon <= 1.0:
        raise ConfigError(f"adam_epsilon must be in (0, 1]; got {c.adam_epsilon}")
    if c.max_grad_norm < 0:
        raise ConfigError(f"max_grad_norm must be >= 0 (0: no clipping); got {c.max_grad_norm}")
    if not 0 <= c.seed < 2 ** 32:
        raise ConfigError(f"seed must be in [0, 2**32); got {c.seed}")
    if c.split_seed is not None and not 0 <= c.split_seed < 2 ** 32:
        raise ConfigError(f"split_seed must be in [0, 2**32); got {c.split_seed}")
    if c.teacher_ranks < 0:
        raise ConfigError(f"teacher_ranks must be >= 0 (0: no teacher group); got {c.teacher_ranks}")
    if not 0 <= c.teacher_prefetch <= 64:
        raise ConfigError(f"teacher_prefetch must be in [0, 64]; got {c.teacher_prefetch}")
    if not c.dist_timeout > 0:
        raise ConfigError(f"dist_timeout must be > 0 seconds; got {c.dist_timeout}")
    flag = str(c.resume).lower()
    c.resume = "true" if flag in ("1", "true", "yes", "on") else "false" if flag in ("0", "false", "no", "off") \
        else flag
    _check_choice("resume", c.resume, ("false", "true", "auto"))
    from .signal_names import parse_signals

    parse_signals(c.stop_signals)
    if c.resume != "false" and c.overwrite_output_dir:
        raise ConfigError("resume and overwrite_output_dir exclude each other: pick one")


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def help_text(method_name: Optional[str] = None) -> str:
    """The --help text: engine options, then the options of one method (or all of them)."""
    from .methods import get_method, method_names

    lines = ["usage: train.py --method NAME [--config FILE.yaml] [--key value ...]", "",
             "methods: " + ", ".join(method_names()), "", "engine options:"]

    def describe(cls: type, prefix: str = "") -> None:
        from .option_help import option_help

        inst, helps = cls(), option_help(cls)
        for key, tp in flat_fields(cls).items():
            obj = inst
            for part in key.split("."):
                obj = getattr(obj, part)
            base, _ = _unwrap_optional(tp)
            hint = helps.get(key)
            lines.append(f"  --{prefix}{key:<34} {getattr(base, '__name__', str(base)):<6} default: {obj!r}"
                         + (f"  ({hint})" if hint else ""))

    describe(TrainConfig)
    names = [method_name] if method_name else method_names()
    for name in names:
        m = get_method(name)
        doc = (m.__doc__ or "").strip().splitlines()
        lines += ["", f"method '{name}' options: {doc[0] if doc else ''}"]
        if dataclasses.fields(m.Options):
            describe(m.Options)
        else:
            lines.append("  (none)")
    return "\n".join(lines)
