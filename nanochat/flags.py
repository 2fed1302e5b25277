"""
Command-line flags from plain dataclass configs: each field declared with `flag(default, help)` becomes
`--field-name` with that help text and default, so `--help` documents every option where it is defined.

    @dataclass
    class TrainConfig(ArgsMixin):
        depth: int = flag(20, "model depth")
        resume: bool = flag(False, "continue from the newest checkpoint")   # --resume / --no-resume

    TrainConfig.add_args(parser); cfg = TrainConfig.from_args(parser.parse_args())
"""
import argparse
import os
from dataclasses import MISSING, field, fields

TASK_DATA_ENV = "NANOCHAT_TASK_DATA"


def flag(default, help, **argparse_kwargs):
    """A config field with its help text; extra keywords (choices=, aliases=[...]) go to argparse."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


class ArgsMixin:
    """argparse for dataclass configs declared with flag(): one --flag per field (dashes), its help and default."""

    @classmethod
    def add_args(cls, parser):
        for f in fields(cls):
            meta = dict(f.metadata)
            help_ = meta.pop("help", None)
            if help_ is None:
                raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with flag(default, help)")
            names = [*meta.pop("aliases", []), "--" + f.name.replace("_", "-")]
            default = f.default if f.default is not MISSING else None
            if f.type in (bool, "bool"):
                parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                    help=help_)
            else:
                kind = value_type(f)
                shown = help_ if "default" in help_ else f"{help_} (default: {default})"
                parser.add_argument(*names, dest=f.name, type=kind, default=default, help=shown, **meta)
        return parser

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def resolved(self):
        """The config with its defaults that depend on other fields or the environment filled in."""
        return self


def value_type(f):
    """int, float or str: what a (non-bool) field's command-line or key=value string converts to, also for
    annotations such as "int | None"."""
    text = str(f.type)
    return float if "float" in text else int if "int" in text else str


def task_data_dir(explicit=""):
    """Where the offline task files are (laid out like nanochat's data directory): the explicit value, else
    $NANOCHAT_TASK_DATA, else "" (load from the Hugging Face Hub)."""
    return explicit or os.environ.get(TASK_DATA_ENV, "")
