"""One command-line style for every console script: ``key=value`` arguments read by
:mod:`transferlab.cli.args`, ``--help`` with examples, and the same exit codes (0, 2 with one
``error:`` line, 130 on Ctrl-C)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from transferlab.cli.args import (
    HelpRequested,
    Key,
    Prefix,
    Spec,
    boolean,
    help_text,
    parse,
    positive_int,
    run_main,
    split_token,
)
from transferlab.errors import UserError

SPEC = Spec(
    prog="tool",
    summary="A tool to test the parser with.",
    keys=(
        Key("run", "a run directory", Path, metavar="<run dir>"),
        Key("checkpoint", "which checkpoint", default="best", choices=("best", "last")),
        Key("batch_size", "images per batch", positive_int, 32),
        Key("ratio", "a fraction", float, 0.5),
        Key("plot", "draw the figure", bool, True),
    ),
    positionals="PATH",
    positional_help="files",
    prefixes=(Prefix("dataset.", "a dataset field"),),
    examples=("tool run=outputs/x photos/", "tool checkpoint=last plot=false a.jpg"),
)
NO_POSITIONALS = Spec(prog="strict", summary="No paths.", keys=SPEC.keys, examples=("strict",))


def error_of(argv: list[str], spec: Spec = SPEC) -> str:
    with pytest.raises(UserError) as info:
        parse(spec, argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- key=value or positional ---------------------------------------------------------------------
@pytest.mark.parametrize("token, expected", [
    ("run=outputs/x", ("run", "outputs/x")),
    ("dataset.root=/data/a=b", ("dataset.root", "/data/a=b")),  # split at the first '='
    ("_x.y_2=", ("_x.y_2", "")),
    ("photos/0_freeze=x/cat.jpg", None),  # a path: '/' is not part of a key
    ("cat.jpg", None),
    ("2x=1", None),  # a key does not start with a digit
    ("+dataset.extra=1", None),
    ("=value", None),
    ("./run=x", None),
])
def test_a_token_is_key_value_only_when_its_key_is_a_name(token, expected):
    assert split_token(token) == expected


def test_keys_positionals_and_prefixed_keys_are_separated():
    parsed = parse(SPEC, ["photos/0_freeze=x/cat.jpg", "run=~/runs/a", "a.jpg",
                          "dataset.root=/data", "batch_size=8"])
    assert parsed.positionals == ["photos/0_freeze=x/cat.jpg", "a.jpg"]
    assert parsed["run"] == Path("~/runs/a").expanduser()
    assert parsed["batch_size"] == 8 and isinstance(parsed["batch_size"], int)
    assert parsed.prefixed == {"dataset.root": "/data"}
    assert parsed.given == {"run", "batch_size"}


def test_defaults_fill_the_keys_not_given():
    parsed = parse(SPEC, [])
    assert parsed.values == {"run": None, "checkpoint": "best", "batch_size": 32, "ratio": 0.5,
                             "plot": True}
    assert parsed.given == set() and parsed.positionals == []


def test_overrides_mode_passes_every_other_argument_through_in_order():
    spec = Spec(prog="f", summary="s", keys=(Key("output", "the file", Path),),
                overrides="a Hydra override", examples=("f",))
    parsed = parse(spec, ["backbone=resnet18", "output=a.npz", "+extra=1", "~trainer.amp",
                          "dataset.root=/d"])
    assert parsed["output"] == Path("a.npz")
    assert parsed.overrides == ["backbone=resnet18", "+extra=1", "~trainer.amp",
                                "dataset.root=/d"]
    assert error_of(["--output", "a.npz"], spec) == ("--output is not an option: write "
                                                     "output=<value>")
    assert "valid keys: output and config overrides" in error_of(["--cfg", "job"], spec)


# -- mistakes: one line each ---------------------------------------------------------------------
def test_unknown_key_names_it_the_nearest_key_and_the_valid_keys():
    message = error_of(["chekpoint=last"])
    assert message.startswith("unknown key 'chekpoint'")
    assert "did you mean 'checkpoint'" in message
    assert "valid keys: run, checkpoint, batch_size, ratio, plot, dataset.<field>" in message


def test_a_positional_where_the_script_takes_none():
    assert "expected key=value, got 'last'" in error_of(["last"], NO_POSITIONALS)


@pytest.mark.parametrize("argv, needles", [
    (["batch_size=many"], ["batch_size", "'many'", "an integer"]),
    (["batch_size=0"], ["batch_size", "'0'", ">= 1"]),
    (["ratio=half"], ["ratio", "'half'", "a number"]),
    (["plot=maybe"], ["plot", "'maybe'", "true/false"]),
    (["run="], ["run", "''", "a path"]),
])
def test_a_wrong_type_names_the_key_the_value_and_what_is_expected(argv, needles):
    message = error_of(argv)
    assert message.startswith("invalid value for ")
    for needle in needles:
        assert needle in message


def test_a_value_not_among_the_choices_lists_them():
    message = error_of(["checkpoint=lats"])
    assert "checkpoint" in message and "'lats'" in message
    assert "did you mean 'last'" in message and message.endswith("choose one of best, last")


def test_a_key_given_twice_is_an_error():
    assert "checkpoint= is given twice" in error_of(["checkpoint=best", "checkpoint=last"])


def test_a_required_key():
    spec = Spec(prog="e", summary="s", keys=(Key("run", "a run", Path, required=True,
                                                 metavar="<run dir>"),), examples=("e",))
    assert error_of([], spec).startswith("run=<run dir> is required")


def test_required_positionals():
    spec = Spec(prog="p", summary="s", keys=(), positionals="PATH", positional_help="images",
                positionals_required=True, examples=("p a.jpg",))
    assert error_of([], spec).startswith("no PATH given: p needs images")
    assert parse(spec, ["a.jpg"]).positionals == ["a.jpg"]


@pytest.mark.parametrize("flag, suggestion", [
    ("--run", "write run=<value>"),
    ("--batch-size", "write batch_size=<value>"),
    ("--batch-size=16", "write batch_size=16"),
    ("--plot", "write plot=true"),
    ("--no-plot", "write plot=false"),
])
def test_old_flag_spellings_say_the_new_one(flag, suggestion):
    message = error_of(["a.jpg", flag, "x"])
    assert message == f"{flag.partition('=')[0]} is not an option: {suggestion}"


def test_an_unknown_flag_lists_the_valid_keys():
    message = error_of(["--chekpoint", "last"])
    assert message.startswith("--chekpoint is not an option")
    assert "did you mean 'checkpoint'" in message and "valid keys: run, checkpoint" in message


@pytest.mark.parametrize("text, value", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("YES", True),
    ("false", False), ("False", False), ("0", False), ("no", False),
])
def test_boolean_forms(text, value):
    assert boolean(text) is value
    assert parse(SPEC, [f"plot={text}"])["plot"] is value


@pytest.mark.parametrize("text", ["", "2", "on", "y", "truee"])
def test_not_a_boolean(text):
    with pytest.raises(ValueError, match="true/false"):
        boolean(text)


# -- --help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_key_with_its_default_and_help_and_the_examples(flag, capsys):
    with pytest.raises(HelpRequested) as info:
        parse(SPEC, ["run=x", flag, "--whatever"])  # --help wins over every mistake
    assert info.value.text == help_text(SPEC)
    assert run_main(lambda argv: parse(SPEC, argv), [flag]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("usage: tool [run=<run dir>] [checkpoint=best|last]")
    rows = {line.strip().split("  ")[0]: line for line in out.splitlines()
            if line.startswith("  ")}
    for key, default in [("run=<run dir>", "none"), ("checkpoint=best|last", "best"),
                         ("batch_size=N", "32"), ("ratio=X", "0.5"),
                         ("plot=true|false", "true")]:
        assert key in rows, out
        assert f"(default: {default})" in rows[key]
        assert SPEC.key(key.partition("=")[0]).help in rows[key]
    assert "dataset.<field>=<value>" in rows and "PATH ..." in rows
    for example in SPEC.examples:
        assert f"  {example}" in out
    assert "exit codes: 0 success, 2 bad input" in out


# -- run_main: the exit codes --------------------------------------------------------------------
def test_run_main_returns_the_functions_code_and_passes_argv():
    seen = []
    assert run_main(lambda argv: seen.append(argv), ["a=1", "b"]) == 0
    assert seen == [["a=1", "b"]]
    assert run_main(lambda argv: 1, []) == 1


def test_run_main_prints_a_user_error_as_one_line_and_returns_2(capsys):
    def fail(argv):
        print("partial output")
        raise UserError("bad   input\nsecond line")

    assert run_main(fail, []) == 2
    out, err = capsys.readouterr()
    assert out == "partial output\n" and err == "error: bad input second line\n"


def test_run_main_on_ctrl_c_prints_one_line_and_returns_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_main(interrupted, []) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_run_main_lets_other_errors_through():
    def broken(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_main(broken, [])


# -- the console scripts, each run as a real command ----------------------------------------
# script module -> (command, argv with an unknown key, that key, argv with an old --flag, the
# error line it gives). Every mistake fails before any model is built or data is read.
SCRIPTS = {
    "evaluate": ("transferlab-eval", ["run=some/run", "chekpoint=last"], "chekpoint",
                 ["--run", "some/run"], "error: --run is not an option: write run=<value>"),
    "predict": ("transferlab-predict", ["backbone=resnet18", "topk=3", "cat.jpg"], "topk",
                ["--backbone", "resnet18", "--top-k", "3", "cat.jpg"],
                "error: --backbone is not an option: write backbone=<value>"),
    "features": ("transferlab-features", ["dataset=digits", "trainer.epoch=3"], "trainer.epoch",
                 ["dataset=digits", "--output", "f.npz"],
                 "error: --output is not an option: write output=<value>"),
    "lr_find": ("transferlab-lr-find", ["dataset=digits", "trainer.epoch=3"], "trainer.epoch",
                ["dataset=digits", "--output", "x"],
                "error: --output is not an option: write output=<value>"),
    "export": ("transferlab-export", ["run=some/run", "fromat=onnx"], "fromat",
               ["--run", "some/run"], "error: --run is not an option: write run=<value>"),
    "compare": ("transferlab-compare", [".", "sort_by=final_val_loss"], "sort_by",
                [".", "--no-plot"], "error: --no-plot is not an option: write plot=false"),
    "blocks": ("transferlab-blocks", ["backbone=resnet18", "backbon_source=timm"],
               "backbon_source", ["--backbone", "resnet18"],
               "error: --backbone is not an option: write backbone=<value>"),
}
CASES = ("help", "unknown", "flag")
# Each run imports torch (about 5-10 s): the subprocess tests are marked slow.
subprocess_test = pytest.mark.slow


def _argv(module: str, case: str) -> list[str]:
    _, unknown, _, flag, _ = SCRIPTS[module]
    return {"help": ["--help"], "unknown": unknown, "flag": flag}[case]


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Every (script, case) run as ``python -m transferlab.<script> ...``: two at a time (each
    start imports torch), from an empty directory."""
    cwd = tmp_path_factory.mktemp("cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFERLAB_SWE")}

    def run(job):
        module, case = job
        return job, subprocess.run([sys.executable, "-m", f"transferlab.cli.{module}",
                                    *_argv(module, case)], cwd=cwd, env=env,
                                   capture_output=True, text=True, timeout=300)

    jobs = [(module, case) for module in SCRIPTS for case in CASES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, jobs))


@subprocess_test
@pytest.mark.parametrize("module", SCRIPTS)
def test_console_script_help_lists_its_keys_and_examples(module, script_runs):
    proc = script_runs[module, "help"]
    command = SCRIPTS[module][0]
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    assert out.startswith(f"usage: {command} ")
    spec = importlib.import_module(f"transferlab.cli.{module}").SPEC
    assert out == help_text(spec) + "\n"
    for key in spec.keys:
        assert f"  {key.name}=" in out
    examples = out.split("\nexamples:\n", 1)[1].splitlines()
    assert 2 <= sum(line.startswith(f"  {command} ") for line in examples) <= 4


@subprocess_test
@pytest.mark.parametrize("module", SCRIPTS)
def test_console_script_unknown_key_is_one_error_line(module, script_runs):
    proc = script_runs[module, "unknown"]
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    key = SCRIPTS[module][2]  # named as itself (quoted or not), not as a longer key
    assert line.startswith("error: ") and re.search(rf"\b{re.escape(key)}\b", line), line


@subprocess_test
@pytest.mark.parametrize("module", SCRIPTS)
def test_console_script_old_flag_names_the_new_spelling(module, script_runs):
    proc = script_runs[module, "flag"]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [SCRIPTS[module][4]]


def test_the_console_scripts_are_these_modules_main():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")
               if ep.name.startswith("transferlab-")}
    for module, (command, *_) in SCRIPTS.items():
        assert scripts[command] == f"transferlab.cli.{module}:main"


@pytest.mark.slow  # a process of its own
def test_every_other_console_script_answers_help_without_torch_scipy_or_matplotlib():
    """``--help`` of every console script but transferlab-train (above) answers before the
    heavy imports: the spec's choices come from :mod:`transferlab.choices`."""
    code = ("import contextlib, io, sys\n"
            "from importlib import import_module\n"
            f"for name in {sorted(m for m in SCRIPTS if m != 'train')!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        assert import_module('transferlab.cli.' + name).main(['--help']) == 0\n"
            "    assert out.getvalue().startswith('usage: transferlab-'), name\n"
            "print(sorted(m for m in ('torch', 'scipy', 'matplotlib') if m in sys.modules))\n")
    assert _python(code).splitlines() == ["[]"]


@pytest.mark.slow  # a process of its own
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_timm_is_imported_without_wandb_and_wandb_still_imports_in_full():
    """timm imports wandb when it is installed (2.3 s of every run's start): transferlab's
    import of timm hides it, and wandb imports as before afterwards."""
    code = ("import sys\n"
            "from transferlab.backbones import build_backbone\n"
            "from transferlab.config import BackboneConfig\n"
            "build_backbone(BackboneConfig(name='test_efficientnet', source='timm', "
            "pretrained=False))\n"
            "print('timm.utils.summary' in sys.modules, 'wandb' in sys.modules)\n"
            "import wandb\n"
            "print(callable(wandb.init))\n")
    assert _python(code).splitlines() == ["True False", "True"]


def _python(code: str) -> str:
    """What ``python -c code`` prints (it must succeed)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_train_help_composes_the_config_and_imports_no_torch():
    """``transferlab-train [overrides] --help``: conf/train.yaml's help text with the config the
    overrides compose, answered without importing torch (it starts faster than torch imports)."""
    code = ("import sys\n"
            "from transferlab.cli.train import _cli\n"
            "assert _cli(['freeze=two_stage', '--help']) == 0\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    out = _python(code)
    assert out.startswith("transferlab-train: compose a run from config groups and train it.")
    assert "== Config groups (group=option) ==" in out and "freeze: discriminative," in out
    assert "name: two_stage" in out and "finetune_epochs: 5" in out  # the composed overrides
    assert out.splitlines()[-1] == "False False"
