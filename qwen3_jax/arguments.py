"""The command line's parser: defaults shown in --help, a help text for the flags every command shares,
and a mistyped flag reported as such (argparse alone reports the required argument it then misses)."""

from __future__ import annotations

import argparse
import difflib
import sys

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
