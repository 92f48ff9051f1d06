"""The command line's parser: defaults shown in --help, a help text for the flags every command shares,
a mistyped flag reported as such (argparse alone reports the required argument it then misses), and
flags generated from a settings dataclass, whose fields declare them once (`setting`, `add_settings`)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from typing import Any

# Flags several commands take, with the same meaning everywhere: their help where a command gives none.
SHARED_HELP = {
    "--debug": "show the traceback of an error",
    "--quiet": "no progress bar (it shows only on a terminal anyway)",
    "--batch-size": "texts per batch",
    "--max-length": "tokens per text, <|endoftext|> included; longer ones are cut (default: the model's)",
    "--attention": "attention kernel (auto: the fastest one checked on this machine)",
    "--seed": "random seed",
}


class DefaultsShown(argparse.HelpFormatter):
    """Help with each flag's default appended, unless it has none (None, False) or its help names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text.lower()):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with DefaultsShown, SHARED_HELP, and unknown flags named before missing ones."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)
        self._given: list[str] = []

    def add_argument(self, *names, **kwargs):
        """add_argument, with the SHARED_HELP text for a shared flag given none."""
        if kwargs.get("help") is None and names and names[0] in SHARED_HELP:
            kwargs["help"] = SHARED_HELP[names[0]]
        return super().add_argument(*names, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        """A missing required argument is reported as the mistyped flag that most likely stood for it."""
        if "required" in message:
            unknown = self.unknown_flags()
            if unknown:
                known = [flag for action in self._actions for flag in action.option_strings]
                close = difflib.get_close_matches(unknown[0], known, n=1)
                message = f"unrecognized argument: {unknown[0]}" + (f" (did you mean {close[0]}?)" if close else "")
        super().error(message)

    def unknown_flags(self) -> list[str]:
        """The --flags given that this parser neither knows nor could read as an abbreviation of one."""
        known = [flag for action in self._actions for flag in action.option_strings]
        names = [word.split("=", 1)[0] for word in self._given if word.startswith("--") and word != "--"]
        return [name for name in names if not any(flag.startswith(name) for flag in known)]


def setting(default: Any = dataclasses.MISSING, *, help: str | None = None,
            flag: str | tuple[str, ...] | None = None, env: str | None = None, exclusive: str | None = None,
            **options) -> Any:
    """A dataclass field that is also a command-line flag (see `add_settings`).

    default: the field's default (none: the flag is required); help: the flag's --help text (None: the
    SHARED_HELP of its flag); flag: its spelling, or several (default: --the-field-name); env: an environment
    variable whose value, when set, is the flag's default (the dataclass's own default stays `default`);
    exclusive: the name of a mutually exclusive group the flag belongs to; options: more of argparse's
    add_argument keywords (choices, metavar, type, action)."""
    flag_of = {"help": help, "flag": flag, "env": env, "exclusive": exclusive, "options": options}
    return dataclasses.field(default=default, metadata={"flag_of": flag_of})


def nested(settings: type, *, prefix: str = "", off: str | None = None, off_help: str | None = None,
           exclusive: str | None = None, **defaults) -> Any:
    """A dataclass field holding another settings dataclass, whose flags the command line takes as well
    (see `add_settings`).

    settings: the nested dataclass; prefix: put before its field names to make its flags' destinations
    (e.g. "lora_": rank -> lora_rank); off: a switch that makes the field None instead (e.g. "--full"),
    with the help `off_help`, in the mutually exclusive group named `exclusive`; defaults: fields whose
    default here differs from the dataclass's own (the field's default is `settings(**defaults)`, its
    flags' defaults the fields' declared ones with `defaults` over them)."""
    nest = {"settings": settings, "prefix": prefix, "off": off, "off_help": off_help, "exclusive": exclusive,
            "defaults": defaults}
    return dataclasses.field(default=settings(**defaults), metadata={"nest": nest})


def _kind(annotation) -> str:
    """The name of a field's type (`annotation`, a string under `from __future__ import annotations`), the
    first of a union: "int | None" -> "int"."""
    name = annotation if isinstance(annotation, str) else annotation.__name__
    return name.replace(" ", "").split("|")[0]


def flags_of(settings: type, prefix: str = "", defaults: dict | None = None):
    """(destination, field, default) for each field of the dataclass `settings` declared with `setting`,
    in order, the fields of a `nested` field in its place; `prefix` goes before each destination, and
    `defaults` (field name -> value) replace the fields' declared defaults."""
    for field in dataclasses.fields(settings):
        if "nest" in field.metadata:
            nest = field.metadata["nest"]
            yield from flags_of(nest["settings"], prefix + nest["prefix"], nest["defaults"])
        elif "flag_of" in field.metadata:
            yield prefix + field.name, field, (defaults or {}).get(field.name, field.default)


def add_settings(parser: argparse.ArgumentParser, settings: type,
                 required: tuple[str, ...] = ()) -> dict[str, argparse._MutuallyExclusiveGroup]:
    """Adds to `parser` a flag for each field of the dataclass `settings` declared with `setting` (other
    fields are no flags) and of its `nested` settings (and their `off` switches), in the fields' order,
    each storing into its destination (see `flags_of`); `required` names the mutually exclusive groups of
    which one flag must be given. A bool field is a switch (store_true unless its options say otherwise),
    an int or float field's value is read as one. Returns the mutually exclusive groups by name, for
    flags that are no field to join them."""
    value_type = {"int": int, "float": float}
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}

    def group(name: str | None):
        if name and name not in groups:
            groups[name] = parser.add_mutually_exclusive_group(required=name in required)
        return groups[name] if name else parser

    for dest, field, default in flags_of(settings):
        declared = field.metadata["flag_of"]
        options = dict(declared["options"])
        flags = declared["flag"] or f"--{dest.replace('_', '-')}"
        flags = (flags,) if isinstance(flags, str) else flags
        kind = _kind(field.type)
        if declared["env"] and os.environ.get(declared["env"]):
            default = value_type.get(kind, str)(os.environ[declared["env"]])
        if kind == "bool":
            options.setdefault("action", "store_true")
        else:
            options.setdefault("type", value_type.get(kind, str))
            if "choices" not in options:
                options.setdefault("metavar", flags[0].lstrip("-").replace("-", "_").upper())
        if default is dataclasses.MISSING:
            options["required"], default = True, None
        group(declared["exclusive"]).add_argument(*flags, dest=dest, default=default,
                                                  help=declared["help"] or SHARED_HELP[flags[0]], **options)
    for field in dataclasses.fields(settings):
        nest = field.metadata.get("nest")
        if nest and nest["off"]:
            group(nest["exclusive"]).add_argument(nest["off"], action="store_true", help=nest["off_help"])
    return groups


def settings_from(settings: type, args: argparse.Namespace, **given):
    """An instance of the dataclass `settings` from the parsed `args` (its flags' destinations, a `nested`
    field's too: None where its `off` switch was given), with `given` (fields that are no flag, or that
    the command computes) taking precedence."""
    return settings(**{**_parsed(settings, args, ""), **given})


def _parsed(settings: type, args: argparse.Namespace, prefix: str) -> dict:
    """The fields of the dataclass `settings` that `args` holds (destinations prefixed with `prefix`)."""
    values = {}
    for field in dataclasses.fields(settings):
        nest = field.metadata.get("nest")
        if nest and nest["off"] and getattr(args, nest["off"].lstrip("-").replace("-", "_"), False):
            values[field.name] = None
        elif nest:
            inner = _parsed(nest["settings"], args, prefix + nest["prefix"])
            values[field.name] = nest["settings"](**{**nest["defaults"], **inner})
        elif "flag_of" in field.metadata and hasattr(args, prefix + field.name):
            values[field.name] = getattr(args, prefix + field.name)
    return values


def debug_parent() -> argparse.ArgumentParser:
    """A parent parser holding --debug, which every command takes (`parents=[debug_parent()]`)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", help=SHARED_HELP["--debug"])
    return parent
