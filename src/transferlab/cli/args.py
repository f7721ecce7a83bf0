"""The command line shared by the console scripts: ``key=value`` arguments, as Hydra takes them.

Every script (``transferlab-eval``, ``-predict``, ``-features``, ``-compare``) describes its
arguments with a :class:`Spec` and reads them with :func:`parse`; its ``main`` goes through
:func:`run_main`, which gives every script the same exit codes:

* 0: success (``-h`` / ``--help`` included);
* 1: a sweep job failed (``transferlab-train -m``);
* 2: bad input: one line ``error: <message>`` on stderr, no traceback;
* 130: interrupted (Ctrl-C): one line ``interrupted`` on stderr, no traceback.

A token is a ``key=value`` argument iff the text before its first ``=`` is a key name
(``^[A-Za-z_][A-Za-z0-9_.]*$``); any other token is a positional argument, so paths such as
``photos/0_freeze=x/cat.jpg`` stay paths. Options in the ``--flag`` style are not accepted:
the error says the ``key=value`` spelling to write instead.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UserError,
    did_you_mean,
)

KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
EXIT_CODES = ("exit codes: 0 success, 2 bad input (one line 'error: ...' on stderr), "
              "130 interrupted")
HELP_WIDTH = 100
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class HelpRequested(Exception):
    """``-h`` / ``--help`` was given: :func:`run_main` prints ``text`` and exits 0."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


# -- value converters: text -> value, ValueError("expected ...") when it is not one -------------
def boolean(text: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no`` (any case)."""
    lowered = text.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError("expected true/false (or 1/0, yes/no)")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise ValueError("expected an integer >= 1")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number") from None


def path(text: str) -> Path:
    if not text:
        raise ValueError("expected a path")
    return Path(text).expanduser()


def nonempty(value: str) -> str:
    if not value:
        raise ValueError("expected a non-empty value")
    return value


CONVERTERS: dict[Any, Callable[[str], Any]] = {
    bool: boolean, int: integer, float: number, Path: path, str: nonempty,
}


@dataclass(frozen=True)
class Key:
    """One ``key=value`` argument of a script."""

    name: str
    help: str
    type: Callable[[str], Any] = str  # a converter (or bool / int / float / Path / str)
    default: Any = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None  # the <value> in the usage line
    default_text: str | None = None  # how --help shows the default (else the default itself)
    required: bool = False

    def convert(self, value: str) -> Any:
        if self.choices is not None and value not in self.choices:
            raise UserError(f"invalid value for {self.name}: {value!r}"
                            f"{did_you_mean(value, self.choices)}; choose one of "
                            f"{', '.join(self.choices)}")
        try:
            return CONVERTERS.get(self.type, self.type)(value)
        except ValueError as exc:
            raise UserError(f"invalid value for {self.name}: {value!r}: {exc}") from None

    @property
    def placeholder(self) -> str:
        if self.metavar:
            return self.metavar
        if self.choices:
            return "|".join(self.choices)
        if self.type in (bool, boolean):
            return "true|false"
        if self.type in (int, integer, positive_int):
            return "N"
        if self.type in (float, number):
            return "X"
        return "<value>"

    @property
    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.required:
            return "required"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return "none" if self.default is None else str(self.default)


@dataclass(frozen=True)
class Prefix:
    """A family of pass-through keys, e.g. ``dataset.<field>=<value>``: the script checks them."""

    prefix: str  # "dataset."
    help: str
    metavar: str = "<field>"

    @property
    def pattern(self) -> str:
        return f"{self.prefix}{self.metavar}"


@dataclass(frozen=True)
class Spec:
    """A script's command line: its keys, positionals, help text and examples."""

    prog: str
    summary: str  # one paragraph: what the script does
    keys: tuple[Key, ...]
    examples: tuple[str, ...]  # 2-4 command lines, shown by --help
    positionals: str | None = None  # e.g. "PATH": the script takes positional arguments
    positional_help: str = ""
    positionals_required: bool = False  # at least one
    prefixes: tuple[Prefix, ...] = ()
    overrides: str | None = None  # help of Hydra overrides: every other argument is one
    usage: str | None = None  # the usage line (default: made from the keys)
    notes: tuple[str, ...] = ()  # extra lines after the keys in --help

    def key(self, name: str) -> Key:
        return next(k for k in self.keys if k.name == name)

    @property
    def key_names(self) -> list[str]:
        return [k.name for k in self.keys]

    def valid_keys_text(self) -> str:
        text = ", ".join([*self.key_names, *(p.pattern for p in self.prefixes)])
        return text + (" and config overrides" if self.overrides is not None else "")


@dataclass
class Parsed:
    """The parsed command line."""

    values: dict[str, Any]  # every key: its value, or its default when not given
    given: set[str] = field(default_factory=set)  # the keys given on the command line
    positionals: list[str] = field(default_factory=list)
    prefixed: dict[str, str] = field(default_factory=dict)  # "dataset.root" -> raw value
    overrides: list[str] = field(default_factory=list)  # Hydra overrides, in order

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


# -- parsing ---------------------------------------------------------------------------------
def split_token(token: str) -> tuple[str, str] | None:
    """``(key, value)`` when ``token`` is a ``key=value`` argument, else None (a positional)."""
    key, eq, value = token.partition("=")
    return (key, value) if eq and KEY.match(key) else None


def _flag_error(spec: Spec, token: str) -> UserError:
    """The error for an ``--option`` (or ``-o``): the key=value spelling to write instead."""
    flag, eq, value = token.partition("=")
    name = flag.lstrip("-").replace("-", "_")
    negated = name.startswith("no_") and name[3:] in spec.key_names
    if negated:
        name = name[3:]
    if name in spec.key_names:
        key = spec.key(name)
        if negated:
            suggestion = f"{name}=false"
        elif eq:
            suggestion = f"{name}={value}"
        elif key.type in (bool, boolean):
            suggestion = f"{name}=true"
        else:
            suggestion = f"{name}=<value>"
        return UserError(f"{flag} is not an option: write {suggestion}")
    hint = did_you_mean(name, spec.key_names) if len(name) > 2 else ""
    return UserError(f"{flag} is not an option: {spec.prog} takes key=value arguments{hint}; "
                     f"valid keys: {spec.valid_keys_text()} (see {spec.prog} --help)")


def parse(spec: Spec, argv: Sequence[str]) -> Parsed:
    """Read ``argv`` by ``spec``; every mistake is a one-line :class:`UserError`, and
    ``-h`` / ``--help`` raises :class:`HelpRequested` with the help text."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        raise HelpRequested(help_text(spec))
    keys = {k.name: k for k in spec.keys}
    parsed = Parsed(values={k.name: k.default for k in spec.keys})
    for token in argv:
        pair = split_token(token)
        if pair is None:
            if token.startswith("-") and len(token) > 1:
                raise _flag_error(spec, token)
            if spec.overrides is not None:
                parsed.overrides.append(token)  # +key=value, ~key, ...: Hydra reads them
            elif spec.positionals is None:
                raise UserError(f"expected key=value, got {token!r}: {spec.prog} takes no "
                                f"positional arguments (see {spec.prog} --help)")
            else:
                parsed.positionals.append(token)
            continue
        name, value = pair
        if name in keys:
            if name in parsed.given:
                raise UserError(f"{name}= is given twice: give each key once")
            parsed.values[name] = keys[name].convert(value)
            parsed.given.add(name)
        elif any(name.startswith(p.prefix) and len(name) > len(p.prefix)
                 for p in spec.prefixes):
            parsed.prefixed[name] = value
        elif spec.overrides is not None:
            parsed.overrides.append(token)
        else:
            raise UserError(f"unknown key {name!r}{did_you_mean(name, spec.key_names)}; "
                            f"valid keys: {spec.valid_keys_text()}")
    missing = [k.name for k in spec.keys if k.required and k.name not in parsed.given]
    if missing:
        key = keys[missing[0]]
        raise UserError(f"{key.name}={key.placeholder} is required (see {spec.prog} --help)")
    if spec.positionals_required and not parsed.positionals:
        raise UserError(f"no {spec.positionals} given: {spec.prog} needs "
                        f"{spec.positional_help}; see {spec.prog} --help")
    return parsed


def yaml_value(text: str) -> Any:
    """A command-line value as YAML reads it (numbers, true/false, null), else the string."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, str | int | float | bool) or value is None else text


# -- help ------------------------------------------------------------------------------------
def usage_line(spec: Spec) -> str:
    if spec.usage:
        return f"usage: {spec.usage}"
    parts = [spec.prog]
    parts += [f"{k.name}={k.placeholder}" if k.required else f"[{k.name}={k.placeholder}]"
              for k in spec.keys]
    parts += [f"[{p.pattern}=<value> ...]" for p in spec.prefixes]
    if spec.overrides is not None:
        parts.append("[<override> ...]")
    if spec.positionals:
        if spec.positionals_required:
            parts.append(f"{spec.positionals} [{spec.positionals} ...]")
        else:
            parts.append(f"[{spec.positionals} ...]")
    return "usage: " + " ".join(parts)


def help_text(spec: Spec) -> str:
    """Usage, summary, every key with its default and help, the examples, the exit codes."""
    rows = [(f"{k.name}={k.placeholder}", f"{k.help} (default: {k.shown_default})")
            for k in spec.keys]
    rows += [(f"{p.pattern}=<value>", p.help) for p in spec.prefixes]
    if spec.overrides is not None:
        rows.append(("<override>", spec.overrides))
    if spec.positionals:
        rows.append((f"{spec.positionals} ...", spec.positional_help))
    width = min(max(len(r[0]) for r in rows), 28)
    lines = [usage_line(spec), "", *textwrap.wrap(spec.summary, HELP_WIDTH), "",
             "arguments (key=value, as for Hydra):"]
    indent = " " * (width + 4)
    for left, right in rows:
        first = f"  {left:<{width}}  " if len(left) <= width else f"  {left}\n{indent}"
        lines.append(textwrap.fill(right, HELP_WIDTH, initial_indent=indent,
                                   subsequent_indent=indent).replace(indent, first, 1))
    if spec.notes:
        lines += ["", *(textwrap.fill(note, HELP_WIDTH) for note in spec.notes)]
    lines += ["", "examples:"]
    lines += [f"  {example}" for example in spec.examples]
    lines += ["", EXIT_CODES]
    return "\n".join(lines)


# -- the entry point ---------------------------------------------------------------------------
def run_main(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``fn(argv)`` (``sys.argv[1:]`` by default) and return the exit code: its return
    value (None: 0); 0 after printing the help; 2 after one ``error: <message>`` line for a
    :class:`UserError`; 130 after one ``interrupted`` line for Ctrl-C."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = fn(args)
    except HelpRequested as request:
        try:
            print(request.text, flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except UserError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OSError as exc:  # the machine's, not a bug: an unwritable folder, a full disk...
        sys.stdout.flush()
        print(f"error: {os_error_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return EXIT_OK if code is None else int(code)


def os_error_line(exc: OSError) -> str:
    """An error of the file system as one line: what failed, on which path, what to check."""
    what = exc.strerror or str(exc) or type(exc).__name__
    target = exc.filename2 or exc.filename
    if target is not None:  # a temporary file (.<name>.<pid>.tmp): the file asked for
        folder, name = os.path.split(str(target))
        asked = re.fullmatch(r"\.(.+)\.\d+\.tmp", name)
        target = os.path.join(folder, asked.group(1)) if asked else target
    where = f": {target}" if target is not None else ""
    return (f"{what}{where}: check that its folder exists and can be written, that it is not "
            "a file where a folder is needed (or a folder where a file is), and the free disk "
            "space")
