"""The documentation still describes transferlab as it is: every command in README.md and
docs/*.md runs as written (as far as a test without training can tell), README.md stays a
front page, and every relative link points to a file and heading that exist.

Which lines are commands. Every line of a fenced code block (```) that starts, after an
optional ``$ `` prompt, with ``transferlab-``, ``python -m transferlab``, ``torchrun ... -m
transferlab.<module>``, ``python <file>.py`` or ``pip install -e ".[extra]"``. A line ending in
``\\`` goes on on the next line; ``# ...`` comments are dropped; the words are split as a POSIX
shell splits them (quotes removed).

What is checked, per command:

* the console script is in pyproject's ``[project.scripts]`` (torchrun / ``python -m``: the
  module is one of theirs); ``python <file>.py``: the file exists; ``pip install -e
  ".[extra]"``: the extras exist in ``[project.optional-dependencies]``.
* ``transferlab-train``: the overrides are composed with Hydra's compose API
  (:func:`transferlab.config.compose_config`) and validated by
  :func:`transferlab.config.load_config`, as the script does before it builds anything, so a
  group, option or field that no longer exists fails. Flags are left out: ``-m`` /
  ``--multirun``, ``-h`` / ``--help``, and ``--cfg X`` / ``-p X`` with their argument; any
  other flag fails. (To stay fast, each set of group choices is composed once and the field
  overrides are applied to a copy by Hydra's own function, which is what compose does after
  building the defaults tree: :func:`compose`; a test checks it against ``compose_config``.)
* Sweeps (``-m``): a swept override is expanded with Hydra's own parser. The config is composed
  with every swept key at its first value, and once more for each other value of a choice
  sweep (``freeze=linear_probe,two_stage``), the other swept keys at their first value. A range
  sweep (``range(0,18)``) is composed at its first and its last value; an interval sweep (an
  Optuna search space) is not expected on a command line and fails.
* Placeholders: ``<...>`` inside a word (``run=outputs/runs/<date>/<time>_<name>``,
  ``<sweep>``) is replaced by the word ``placeholder``: the key must still exist and take a
  string or a path. ``key.*=...`` (``[dataset.*=...]``) stands for any field of that prefix:
  the script must take that prefix (or, for config overrides, ``key`` must be a group or
  section of the run config). ``[...]`` around a word (an optional argument in a usage line) is
  dropped, and a value written ``a|b`` lists alternatives: the line is checked once with each.
* Files the user brings: validation refuses a ``backbone.weights_path`` or
  ``backbone.init.path`` that is not a file, and the pages' example paths
  (``/data/weights/resnet18-f37072fd.pth``, a checkpoint of an earlier run) are not here; their
  value is replaced by this test file (:data:`USER_FILES`). Data folders (``dataset.root``)
  are only read when the run starts, so they stay as written.
* ``resume=<run dir>`` (anything but ``auto``): a resume runs on the run's saved config and
  composes nothing, so the rule is the one ``transferlab-train`` applies: every other override
  must be one a resume accepts (:data:`transferlab.run.resume.RESUME_OVERRIDES`).
  ``resume=auto`` is a field of the run config and composes as any override.
* The other scripts (``transferlab-eval``, ``-predict``, ``-compare``, ``-export``,
  ``-lr-find``, ``-features``): the words are read by the script's own parser
  (:func:`transferlab.cli.args.parse` with the script's ``SPEC``), so an unknown key or a value the
  key refuses (``checkpoint=bset``) fails; the config overrides of the scripts that take them
  (``-lr-find``, ``-features``) are then composed and validated as for ``transferlab-train``.
* A ``$ command`` line followed, in its block, by an ``error: ...`` line documents a mistake:
  the check must fail with exactly that line.

Nothing is skipped: the rules above cover every command in the pages.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from transferlab.cli.args import parse
from transferlab.config import compose_config, load_config
from transferlab.config.sweep_keys import drop_unused, optional_keys, relaxed
from transferlab.config.typed import composition_error
from transferlab.config.validate import override_key
from transferlab.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which pytest depends on there
    import tomli as tomllib
try:  # how Hydra's compose applies the field overrides to the composed tree (Hydra 1.3)
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    APPLY_OVERRIDES = ConfigLoaderImpl._apply_overrides_to_config
except (ImportError, AttributeError):  # another Hydra: compose every command in full
    APPLY_OVERRIDES = None

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
LINKED_PAGES = sorted([*PAGES, *(ROOT / "experiments").glob("*/README.md")])
README_MAX_LINES = 300
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]  # "transferlab-eval" -> "transferlab.tools.evaluate:main"
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

FLAGS = {"-m", "--multirun", "-h", "--help"}
FLAGS_WITH_VALUE = {"--cfg", "-p", "--package"}
USER_FILES = ("backbone.weights_path", "backbone.init.path")
PLACEHOLDER = re.compile(r"<[^<>]*>")
COMMAND_START = re.compile(r"^(transferlab-|python |torchrun |pip install )")


@dataclass(frozen=True)
class Command:
    """One command line of a page: where it is, its text, and the error it documents."""

    page: str  # relative to the repository root
    line: int  # 1-based, of its first line
    text: str  # continuation lines joined, comment and prompt removed
    error: str | None = None  # the documented "error: ..." line that follows it

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


# -- reading the pages ---------------------------------------------------------------------------
def fenced_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The fenced code blocks of a Markdown text: (line number of its first line, its lines)."""
    blocks, current, start, fence = [], None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None:
            if stripped.startswith(("```", "~~~")):
                current, start, fence = [], number + 1, stripped[:3]
        elif stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            blocks.append((start, current))
            current = None
        else:
            current.append(line)
    return blocks


def _strip_comment(line: str) -> str:
    """The line without its ``# comment``: from a ``#`` that starts a word, outside quotes, as
    a shell reads it."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def commands_in(text: str, page: str) -> list[Command]:
    """Every command line in the fenced blocks of ``text`` (see the module docstring)."""
    found = []
    for start, lines in fenced_blocks(text):
        i = 0
        while i < len(lines):
            first, raw = i, lines[i].strip()
            prompt = raw.startswith("$ ")
            raw = raw[2:] if prompt else raw
            if not COMMAND_START.match(raw):
                i += 1
                continue
            parts = [raw]
            while parts[-1].endswith("\\") and i + 1 < len(lines):
                parts[-1] = parts[-1][:-1]
                i += 1
                parts.append(lines[i].strip())
            i += 1
            text_ = " ".join(_strip_comment(p).strip() for p in parts).strip()
            error = None
            if prompt and i < len(lines) and lines[i].startswith("error: "):
                error = lines[i].strip()
            found.append(Command(page, start + first, text_, error))
    return found


def all_commands() -> list[Command]:
    return [cmd for page in PAGES
            for cmd in commands_in(page.read_text(), str(page.relative_to(ROOT)))]


# -- checking one command ------------------------------------------------------------------------
CONFIG_GROUPS = {p.relative_to(ROOT / "conf").as_posix()
                 for p in (ROOT / "conf").rglob("*") if p.is_dir()}


def _shapes_the_tree(override: str) -> bool:
    """Whether Hydra needs ``override`` while it builds the defaults tree: a group choice
    (``freeze=two_stage``, ``hydra/launcher=slurm``), an addition or deletion, or a field of
    the ``hydra`` node (which the composed run config no longer has)."""
    key = override.lstrip("+~").partition("=")[0]
    return override[0] in "+~" or "/" in key or key in CONFIG_GROUPS or key.startswith("hydra")


@functools.cache
def _composed(tree_overrides: tuple[str, ...]) -> DictConfig:
    return compose_config(list(tree_overrides))


def compose(overrides: list[str]) -> DictConfig:
    """What ``compose_config(overrides)`` returns, faster: the commands share a few sets of
    group choices, so each set is composed once (Hydra's compose API) and the field overrides
    (``optimizer.lr=0.01``) are applied to a copy by Hydra's own code, as compose applies
    them after building the tree (the full composition where Hydra lacks that function)."""
    if APPLY_OVERRIDES is None:
        return compose_config(overrides)
    tree = tuple(o for o in overrides if _shapes_the_tree(o))
    fields = [o for o in overrides if not _shapes_the_tree(o)]
    cfg = copy.deepcopy(_composed(tree))
    try:
        APPLY_OVERRIDES(OverridesParser.create().parse_overrides(fields), cfg)
    except Exception as exc:  # as compose_config reports Hydra's errors
        raise composition_error(exc) from None
    return cfg


@functools.cache
def _load(overrides: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Compose and validate, as transferlab-train does before building anything (cached:
    README repeats commands of the pages). ``optional``: the keys a sweep's job drops when its
    options do not have them (:mod:`transferlab.config.sweep_keys`)."""
    cfg, kept = drop_unused(compose(list(overrides)), list(overrides), list(optional))
    load_config(cfg, kept)


def _fill(word: str) -> str:
    return PLACEHOLDER.sub("placeholder", word)


def _alternatives(words: list[str]) -> list[list[str]]:
    """A usage line's words as command lines: ``[...]`` dropped around a word, and a value
    ``a|b`` taken apart: the i-th line has each word's i-th alternative (its last when it has
    fewer)."""
    options = []
    for word in words:
        word = word[1:-1] if word.startswith("[") and word.endswith("]") else word
        key, eq, value = word.partition("=")
        options.append([f"{key}={v}" for v in value.split("|")] if eq else [word])
    count = max(len(o) for o in options)
    return [[o[min(n, len(o) - 1)] for o in options] for n in range(count)]


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The override lists a ``-m`` line is composed with (see the module docstring)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    parsed = OverridesParser.create().parse_overrides(overrides)
    values: list[list[str]] = []
    for word, override in zip(overrides, parsed, strict=True):
        if not override.is_sweep_override():
            values.append([word])
            continue
        head = word.partition("=")[0]
        if isinstance(override.value(), IntervalSweep):
            if "hydra/sweeper=halving" not in overrides:
                raise UserError(f"{word}: an interval sweep belongs in an hparams_search config "
                                "or a halving sweep (hydra/sweeper=halving), not on a plain "
                                "command line")
            values.append([f"{head}={v}" for v in (override.value().start,
                                                   override.value().end)])
            continue
        swept = [f"{head}={v}" for v in override.sweep_string_iterator()]
        if isinstance(override.value(), RangeSweep):
            swept = [swept[0], swept[-1]] if len(swept) > 1 else swept
        elif not isinstance(override.value(), ChoiceSweep):
            raise UserError(f"{word}: a sweep of a kind this test does not know")
        values.append(swept)
    first = [v[0] for v in values]
    variants = [first]
    for index, options in enumerate(values):
        variants += [[*first[:index], other, *first[index + 1:]] for other in options[1:]]
    return variants


def _check_prefix_words(words: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """Drop ``key.*=...`` words after checking that ``key.`` is one of ``prefixes``."""
    kept = []
    for word in words:
        key = word.partition("=")[0]
        if key.endswith(".*"):
            if key[:-1] not in prefixes:
                raise UserError(f"unknown key {key!r}: no argument starts with {key[:-1]!r}")
            continue
        kept.append(word)
    return kept


def _run_sections() -> tuple[str, ...]:
    """``backbone.``, ``trainer.``, ...: the prefixes of the run config's fields."""
    from transferlab.config.schema import RunConfig

    return tuple(f"{name}." for name in RunConfig.__dataclass_fields__)


def _check_overrides(overrides: list[str], multirun: bool) -> None:
    from transferlab.run.resume import RESUME_OVERRIDES

    overrides = [f"{o.partition('=')[0]}={__file__}" if override_key(o) in USER_FILES else o
                 for o in _check_prefix_words(overrides, _run_sections())]
    resume = next((o.partition("=")[2] for o in overrides if o.startswith("resume=")), None)
    if resume not in (None, "auto", "null"):
        for item in overrides:
            if not item.startswith("resume=") and override_key(item) not in RESUME_OVERRIDES:
                raise UserError(f"resume takes the run's saved config: {item!r} would change "
                                f"it (a resume takes only {', '.join(RESUME_OVERRIDES)})")
        return
    if not multirun:
        _load(tuple(overrides))
        return
    optional = optional_keys(["-m", *overrides])  # as transferlab-train reads a sweep
    for variant in _sweep_variants(relaxed(overrides, optional)):
        _load(tuple(variant), tuple(k.key for k in optional))


def _train_words(words: list[str]) -> tuple[list[str], bool]:
    """The overrides of a transferlab-train command line and whether it is a sweep."""
    overrides, multirun, skip = [], False, False
    for word in words:
        if skip:
            skip = False
        elif word in FLAGS:
            multirun = multirun or word in ("-m", "--multirun")
        elif word in FLAGS_WITH_VALUE:
            skip = True
        elif word.startswith("-"):
            raise UserError(f"{word}: not a flag transferlab-train takes in this test's rules")
        else:
            overrides.append(word)
    return overrides, multirun


def _module_of(script: str) -> str:
    return SCRIPTS[script].partition(":")[0]


def _script_of_module(module: str) -> str | None:
    """The console script that ``python -m module`` runs: the script whose module it is, or
    whose ``main`` it runs (``transferlab.train`` runs ``transferlab.cli.train``'s)."""
    scripts = {_module_of(s): s for s in SCRIPTS}
    if module in scripts:
        return scripts[module]
    try:
        main = importlib.import_module(module).main
    except (ImportError, AttributeError):
        return None
    return next((s for m, s in scripts.items() if importlib.import_module(m).main is main), None)


def check_command(text: str) -> None:
    """Raise :class:`UserError` (or AssertionError) when ``text`` would not run as written
    (see the module docstring for what that means)."""
    words = shlex.split(_fill(text))
    program, args = words[0], words[1:]
    if program == "pip":
        extras = re.findall(r"\.\[([^\]]+)\]", text)
        for name in ",".join(extras).split(","):
            assert not name or name in EXTRAS, f"pip extra [{name}] not in pyproject ({EXTRAS})"
        return
    if program in ("python", "torchrun"):
        if "-m" not in args:
            script = next((a for a in args if a.endswith(".py")), None)
            assert script and (ROOT / script).is_file(), f"{script}: no such file"
            return
        module = args[args.index("-m") + 1]
        program = _script_of_module(module)
        assert program, f"-m {module}: not the module of a console script ({SCRIPTS})"
        args = args[args.index("-m") + 2:]
    assert program in SCRIPTS, f"{program}: not in pyproject's [project.scripts]"
    if program == "transferlab-train":
        overrides, multirun = _train_words(args)
        _check_overrides(overrides, multirun)
        return
    spec = importlib.import_module(_module_of(program)).SPEC
    prefixes = tuple(p.prefix for p in spec.prefixes)
    if spec.overrides is not None:  # config overrides: any section of the run config
        prefixes += _run_sections()
    for line in _alternatives(args):
        parsed = parse(spec, _check_prefix_words(line, prefixes))
        if parsed.overrides:
            _check_overrides(parsed.overrides, multirun=False)


COMMANDS = all_commands()


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_runs_as_written(cmd: Command):
    try:
        check_command(cmd.text)
        message = None
    except (UserError, AssertionError) as exc:
        message = f"error: {exc}"
    if message and "needs a Hydra plugin that is not installed" in message:
        pytest.skip(f"{cmd.where}: {message}")  # an optional extra (checked where installed)
    if cmd.error is None and message is not None:
        pytest.fail(f"{cmd.where}: `{cmd.text}` no longer runs as written:\n  {message}",
                    pytrace=False)
    if cmd.error is not None and message != cmd.error:
        pytest.fail(f"{cmd.where}: `{cmd.text}` is documented as failing with\n  {cmd.error}\n"
                    f"but {'now fails with' if message else 'it passes'}\n  {message or ''}",
                    pytrace=False)


def test_the_pages_have_commands_of_every_script():
    """The extraction finds the commands (an empty list would pass every check above)."""
    programs = {c.text.split()[0] for c in COMMANDS}
    assert set(SCRIPTS) <= programs, f"no documented command of {set(SCRIPTS) - programs}"
    assert len(COMMANDS) > 80
    assert any(c.error for c in COMMANDS) and any(c.text.startswith("torchrun") for c in COMMANDS)


# -- the checker catches what it should ------------------------------------------------------------
@pytest.mark.parametrize("text, error", [
    ("transferlab-train freeze=nonexistent", "unknown freeze option 'nonexistent'"),
    ("transferlab-train trainer.epoch=3", "unknown key trainer.epoch"),
    ("transferlab-train -m freeze=linear_probe,tw_stage", "unknown freeze option 'tw_stage'"),
    ("transferlab-train -m 'trainer.epochs=range(1,3)' trainer.epochz=1", "trainer.epochz"),
    ("transferlab-train resume=outputs/runs/<date>/<time>_<name> optimizer.lr=0.5",
     "resume takes the run's saved config"),
    ("transferlab-train backbone.init.pth=outputs/runs/<date>/last.pt", "backbone.init.pth"),
    ("transferlab-eval run=<run dir> chekpoint=last", "unknown key 'chekpoint'"),
    ("transferlab-eval run=<run dir> [checkpoint=best|lats]", "invalid value for checkpoint"),
    ("transferlab-eval run=<run dir> [model.*=...]", "unknown key 'model.*'"),
    ("transferlab-lr-find stage=1 freeze=two_stag", "unknown freeze option 'two_stag'"),
    ("transferlab-predict --top-k 3 photos/", "--top-k is not an option"),
])
def test_the_checker_catches_a_broken_command(text, error):
    with pytest.raises(UserError, match=re.escape(error)):
        check_command(text)


@pytest.mark.parametrize("text", [
    "transferlab-evaluate run=x",
    "torchrun --nproc_per_node=2 -m transferlab.training seed=0",
    "python experiments/no_such_study.py",
    'pip install -e ".[gpu]"',
])
def test_the_checker_catches_a_missing_script(text):
    with pytest.raises(AssertionError):
        check_command(text)


def test_commands_are_found_with_their_continuations_prompts_and_errors():
    page = "\n".join([
        "Some text, `transferlab-train inline=1` is not a command.",
        "```",
        "transferlab-train dataset=csv \\",
        "    dataset.x_col=id      # a comment with transferlab-eval in it",
        "$ transferlab-train freeze=bogus",
        "error: unknown freeze option 'bogus'; choose one of a, b",
        "tensorboard --logdir outputs",
        "```",
    ])
    assert commands_in(page, "x.md") == [
        Command("x.md", 3, "transferlab-train dataset=csv dataset.x_col=id"),
        Command("x.md", 5, "transferlab-train freeze=bogus",
                "error: unknown freeze option 'bogus'; choose one of a, b"),
    ]


@pytest.mark.parametrize("overrides", [
    ["freeze=two_stage", "freeze.head_epochs=3", "optimizer.lr=0.01", "seed=4"],
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "dataset=hymenoptera",
     "dataset.train_fraction=0.2"],
    ["freeze=two_stage", "+freeze.finetune_epoch=1"],
    ["optimizer.momentum=0.9"],
    ["trainer.epochs=abc"],
])
def test_the_shortcut_composes_as_compose_config(overrides):
    def outcome(fn):
        try:
            return OmegaConf.to_yaml(fn(overrides))
        except UserError as exc:
            return f"error: {exc}"

    assert outcome(compose) == outcome(compose_config)


def test_sweeps_are_composed_value_by_value():
    assert _sweep_variants(["freeze=linear_probe,two_stage", "seed=0,1", "x.y=range(0,18)",
                            "optimizer=sgd"]) == [
        ["freeze=linear_probe", "seed=0", "x.y=0", "optimizer=sgd"],
        ["freeze=two_stage", "seed=0", "x.y=0", "optimizer=sgd"],
        ["freeze=linear_probe", "seed=1", "x.y=0", "optimizer=sgd"],
        ["freeze=linear_probe", "seed=0", "x.y=17", "optimizer=sgd"],
    ]


# -- README's size, links and anchors ------------------------------------------------------------
def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference text "
        "to docs/")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (outside code blocks), duplicates numbered."""
    found: dict[str, int] = {}
    result = set()
    for line in _prose(text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = found.get(base, 0)
            result.add(base if count == 0 else f"{base}-{count}")
            found[base] = count + 1
    return result


def _prose(text: str) -> str:
    """The text without its fenced code blocks (their lines left empty)."""
    lines, inside, fence = [], False, ""
    for line in text.splitlines():
        stripped = line.strip()
        if not inside and stripped.startswith(("```", "~~~")):
            inside, fence = True, stripped[:3]
            lines.append("")
        elif inside and stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            inside = False
            lines.append("")
        else:
            lines.append("" if inside else line)
    return "\n".join(lines)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file or ``#anchor`` does not exist."""
    text = re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))  # not links in code
    broken = []
    for number, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}:{number}"
            if not file.exists():
                broken.append(f"{where}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                broken.append(f"{where}: {target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", LINKED_PAGES, ids=[str(p.relative_to(ROOT)) for p in LINKED_PAGES])
def test_relative_links_and_anchors_exist(page):
    broken = broken_links(page)
    assert not broken, "\n".join(broken)


def test_the_link_check_catches_a_missing_file_or_anchor(tmp_path):
    (tmp_path / "other.md").write_text(
        "# Other\n\n## MixUp / CutMix\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#mixup--cutmix) [file](missing.md) [anchor](other.md#nope)\n"
                    "[code](other.md#not-a-heading) `[in code](missing.md)` [self](#page)\n"
                    "# Page\n")
    assert broken_links(page) == [
        f"{page}:1: missing.md: no such file",
        f"{page}:1: other.md#nope: no heading #nope in other.md",
        f"{page}:2: other.md#not-a-heading: no heading #not-a-heading in other.md",
    ]


def test_slugs_are_githubs():
    assert slug("MixUp / CutMix") == "mixup--cutmix"
    assert slug("Mixed precision (trainer.amp)") == "mixed-precision-traineramp"
    assert slug("Interrupted? Resume") == "interrupted-resume"
    assert slug("Early stopping, MixUp and EMA on `two_stage`: what they do") == \
        "early-stopping-mixup-and-ema-on-two_stage-what-they-do"
    assert slug("Freeze policy × training-data fraction") == "freeze-policy--training-data-fraction"


# -- custom freeze policies shown as YAML -----------------------------------------------------
def policy_blocks() -> list[tuple[str, str, str]]:
    """(page, policy name, YAML) of every ```yaml block of the pages that is a freeze policy
    file (its first line ``# conf/freeze/<name>.yaml``)."""
    found = []
    for page in PAGES:
        for match in re.finditer(r"```yaml\n# conf/freeze/(\w+)\.yaml\n(.*?)```",
                                 page.read_text(), re.S):
            found.append((page.name, match.group(1), match.group(2)))
    return found


@pytest.mark.parametrize(("page", "name", "text"), policy_blocks(),
                         ids=[f"{p}:{n}" for p, n, _ in policy_blocks()])
def test_a_custom_policy_in_the_docs_plans_on_the_default_backbone(page, name, text):
    """The policy, as a user would save it, is typed by the schema and its stages planned on
    the default backbone (its architecture; the weights do not matter): every selector picks
    parameters, and no parameter is picked twice in a stage."""
    import yaml

    from transferlab.backbones import build_backbone, probe_features
    from transferlab.config import HeadConfig
    from transferlab.heads import build_head
    from transferlab.model import TransferModel
    from transferlab.staging.policy import plan_stages

    raw = OmegaConf.to_container(compose_config([]), resolve=True)
    raw["freeze"] = yaml.safe_load(text)
    run = load_config(raw)
    backbone = build_backbone(type(run.backbone)(**{**vars(run.backbone), "pretrained": False}))
    model = TransferModel(backbone.module, build_head(HeadConfig(name="linear"),
                                                      probe_features(backbone, 64), 10))
    plans = plan_stages(model, backbone, run.freeze, run.optimizer.lr)
    assert [p.name for p in plans] == [s["name"] for s in yaml.safe_load(text)["stages"]]


def test_the_docs_show_a_custom_policy():
    assert [n for _, n, _ in policy_blocks()] == ["my_policy"]


# -- the README's measured figure of the default run --------------------------------------------
@pytest.mark.slow
def test_the_default_run_reaches_the_accuracy_the_readme_gives(tmp_path):
    """``transferlab-train`` as the README's first lines run it: the validation accuracy it
    quotes is the one this version reaches (timings cannot be checked; accuracy can)."""
    import json
    import subprocess
    import sys

    quoted = re.search(r"accuracy \((0\.\d{4}), measured on this version\)",
                       (ROOT / "README.md").read_text().replace("\n", " "))
    assert quoted, "the README no longer quotes the default run's accuracy"
    proc = subprocess.run([sys.executable, "-m", "transferlab.train",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = json.loads((tmp_path / "run" / "metrics.json").read_text())["best"]["val_acc"]
    assert f"{best:.4f}" == quoted.group(1)
