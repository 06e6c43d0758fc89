"""How the `pathways` command reads its arguments: one clean error with close matches (exit 2) for
whatever is misspelt, in every subcommand, and help that shows each option's default.

Subcommands come from several packages (runtime/cli/, model/, benchmarks/); `finish` applies
these rules to the whole tree once it is built, so no package has to remember them.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Iterator, Sequence


def close_matches(word: str, candidates: Iterable[str]) -> str:
    """"; did you mean A or B?" for the candidates close to `word`, or ""."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def palm_preset(name: str) -> str:
    """An argparse type: `name` if it names a PaLM preset, else an error listing close ones."""
    from model.config import list_configs

    known = list_configs()
    if name in known:
        return name
    raise argparse.ArgumentTypeError(f"unknown PaLM config {name!r}{close_matches(name, known)} "
                                     f"(known: {', '.join(known)})")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option with a default shows it ("(default: 4)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or not action.option_strings or action.required
                or default is None or default is False or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest close matches: for a misspelt subcommand or choice,
    and for an unknown option (among the options of the subcommand it was given to)."""

    def _check_value(self, action: argparse.Action, value) -> None:
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{close_matches(str(value), choices)} "
                        f"(choose from {', '.join(choices)})")

    def error(self, message: str):
        """One line naming the subcommand and what was wrong (no usage dump), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            leaf = _leaf(self, parsed)
            hints = [close_matches(e.split("=", 1)[0], leaf._option_string_actions)
                     for e in extras if e.startswith("-")]
            leaf.error(f"unrecognized arguments: {' '.join(extras)}"
                       f"{''.join(h for h in hints if h)}")
        return parsed


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse._SubParsersAction]:
    return (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _leaf(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the subcommand `parsed` ran."""
    for action in _subparsers(parser):
        chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
        if chosen is not None:
            return _leaf(chosen, parsed)
    return parser


def _tree(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in _subparsers(parser):
        for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
            yield from _tree(child)


def finish(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Applies the command's rules to every (sub)parser: help with defaults, and `--config`
    checked against the PaLM presets wherever a subcommand takes one."""
    for each in _tree(parser):
        each.formatter_class = HelpFormatter
        for action in each._actions:
            if "--config" in action.option_strings and action.type is None:
                action.type = palm_preset
    return parser
