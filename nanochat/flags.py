"""
Command-line flags from plain dataclass configs: each field declared with `flag(default, help)` becomes
`--field-name` with that help text and default, so `--help` documents every option where it is defined.

    @dataclass
    class TrainConfig(ArgsMixin):
        depth: int = flag(20, "model depth")
        resume: bool = flag(False, "continue from the newest checkpoint")   # --resume / --no-resume

    cfg = TrainConfig.parse(argv, "what this program does")

Extra keywords go to argparse (choices=, required=, action="append", aliases=["-d"]); positional=True makes the
field a positional argument (optional unless required=True).
"""
import argparse
import os
from dataclasses import MISSING, field, fields

TASK_DATA_ENV = "NANOCHAT_TASK_DATA"
AUTO = 0  # what "auto" parses to in a flag declared with type=int_or_auto


def flag(default, help, **argparse_kwargs):
    """A config field with its help text; a list default is copied per instance."""
    meta = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def storage_flag():
    return flag(None, "storage root (local path, NFS mount, or s3:// / gs:// URI); "
                      "default $NANOCHAT_BASE_DIR or ~/.cache/nanochat")


def task_data_flag():
    return flag(None, f"offline task files laid out like the shipped pack nanochat/data/tasks/ "
                      f"(default ${TASK_DATA_ENV}; else the Hugging Face Hub)")


class ArgsMixin:
    """argparse for dataclass configs declared with flag(): one --flag per field (dashes), its help and default."""

    @classmethod
    def add_args(cls, parser):
        for f in fields(cls):
            meta = dict(f.metadata)
            help_ = meta.pop("help", None)
            if help_ is None:
                raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with flag(default, help)")
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            default = None if default is MISSING else default
            shown = help_ if "default" in help_ or default in (None, [], False) else f"{help_} (default: {default})"
            if meta.pop("positional", False):
                optional = {} if meta.pop("required", False) else {"nargs": "?", "default": default}
                parser.add_argument(f.name, help=shown, **optional, **meta)
                continue
            aliases = meta.pop("aliases", [])  # shown as: -n, --num-files, --old-name
            names = [a for a in aliases if not a.startswith("--")] + ["--" + f.name.replace("_", "-")]
            names += [a for a in aliases if a.startswith("--")]
            if f.type in (bool, "bool"):
                parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                    help=help_)
            else:
                kind = meta.pop("type", None) or value_type(f)
                parser.add_argument(*names, dest=f.name, type=kind, default=default, help=shown, **meta)
        return parser

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def parser(cls, description=None):
        """An argparse parser of this config's flags; description is the --help text."""
        parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        return cls.add_args(parser)

    @classmethod
    def parse(cls, argv=None, description=None):
        """The config from a command line (sys.argv when argv is None); description is the --help text."""
        return cls.from_args(cls.parser(description).parse_args(argv))

    def resolved(self):
        """The config with its defaults that depend on other fields or the environment filled in."""
        return self


def value_type(f):
    """int, float or str: what a (non-bool) field's command-line or key=value string converts to, also for
    annotations such as "int | None" or "list[str]"."""
    text = str(f.type)
    return float if "float" in text else int if "int" in text else str


def int_or_auto(text):
    """A flag value that is a number or "auto" (AUTO)."""
    return AUTO if str(text).strip().lower() == "auto" else int(text)


def task_data_dir(explicit=None, shipped_pack=False):
    """Where the offline task files are (a directory laid out like the pack shipped in nanochat/data/tasks/), or ""
    for the Hugging Face Hub: `explicit` (--task-data) when given, else the user's default $NANOCHAT_TASK_DATA, else
    the shipped pack when `shipped_pack` (the demo), else "". The one place this is decided: an entry point calls it
    once and passes the result down (configs, arguments), never through the environment. A directory comes back
    absolute, since workers run in other directories."""
    if explicit is None:
        explicit = os.environ.get(TASK_DATA_ENV, "")
        if not explicit and shipped_pack:
            from nanochat.dataset import PACKAGE_TASK_DATA  # here: nanochat.dataset imports this module
            explicit = PACKAGE_TASK_DATA
    return os.path.abspath(explicit) if explicit else ""
