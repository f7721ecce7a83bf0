"""Bad overrides fail at composition or in the config's validation, before anything is built,
as one line that names the key; and the registries behind the options."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass

import pytest
import torch
import yaml

from transferlab.config import compose_config, load_config, schema
from transferlab.config.schema import StrEnum
from transferlab.errors import UserError
from transferlab.registry import BY_GROUP, OPTIMIZERS, Registry
from transferlab.run import train

from .conftest import CONF_DIR, cli
from .test_docs import compose as fast_compose

# (overrides, text the one-line message must hold: the key, and what is wrong)
BAD_OVERRIDES = [
    # the cases of the issue
    (["freeze=two_stage", "+freeze.finetune_epoch=1"], "freeze.finetune_epoch",
     "'finetune_epochs'"),
    (["+freeze.finetune_epoch=1"], "freeze.finetune_epoch", "no such key"),
    (["optimizer.name=lion"], "optimizer.name", "'lion'"),
    (["head.name=attention"], "head.name", "'attention'"),
    (["augment.name=bogus"], "augment.name", "'bogus'"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps", ">= 1"),
    (["augment=flip", "augment.hflip=3"], "augment.hflip", "[0, 1]"),
    (["augment.hflip=3"], "augment.hflip", "augment=flip"),  # none has no flip
    (["trainer.epochs=abc"], "trainer.epochs", "must be an int"),
    (["+optimizer.momentum=0.9"], "optimizer.momentum", "optimizer=sgd, rmsprop"),
    (["task=logreg", "freeze=two_stage", "optimizer=sgd"], "freeze", "task=logreg"),
    (["trainer.epoch=3"], "trainer.epoch", "'epochs'"),
    # unknown options and keys
    (["freeze=bogus"], "freeze", "two_stage"),
    (["backbone=resnet1"], "backbone", "'resnet18'"),
    (["+foo=1"], "foo", "no such key"),
    (["+dataset.rooot=/data"], "dataset.rooot", "no such key"),
    (["optimizer=sgd", "optimizer.betas=[0.9,0.99]"], "optimizer.betas", "optimizer=adam"),
    (["task.name=autoencodr"], "task.name", "'autoencoder'"),
    (["scheduler.name=cosin"], "scheduler.name", "'cosine'"),
    # wrong types
    (["optimizer.lr=abc"], "optimizer.lr", "must be a number"),
    (["seed=abc"], "seed", "must be an int"),
    (["backbone.pretrained=maybe"], "backbone.pretrained", "true or false"),
    (["dataset.image_size=big"], "dataset.image_size", "an int or null"),
    # out of range
    (["optimizer.lr=-1"], "optimizer.lr", "> 0"),
    (["optimizer.lr=1e300"], "optimizer.lr", "must be a float32 (<= 3.4e38), got 1e+300"),
    (["seed=-5"], "seed", "in 0 .. 4294967295, got -5"),
    # keys the run would not use
    (["trainer.ema.warmup=true"], "trainer.ema.warmup", "no EMA is kept"),
    (["trainer.feature_cache.mode=off", "trainer.feature_cache.dtype=float32"],
     "trainer.feature_cache.dtype", "mode=off caches no features"),
    (["dataset.subset_seed=3"], "dataset.subset_seed", "whole training split"),
    (["seed=99999999999999999999"], "seed", "got 99999999999999999999"),
    (["name=../../x"], "name=../../x", "outside its folder"),
    (["trainer.batch_size=0"], "trainer.batch_size", ">= 1"),
    (["trainer.device=gpu"], "trainer.device", "cuda"),
    (["trainer.label_smoothing=1.5"], "trainer.label_smoothing", "[0, 1)"),
    (["trainer.sampler=random"], "trainer.sampler", "shuffle, balanced"),
    (["dataset.val_fraction=1.2"], "dataset.val_fraction", "(0, 1)"),
    (["dataset.train_fraction=0"], "dataset.train_fraction", "(0, 1]"),
    (["dataset.samples_per_class=0"], "dataset.samples_per_class", ">= 1"),
    (["dataset=fake", "dataset.num_classes=1"], "dataset.num_classes", ">= 2"),
    (["scheduler=cosine", "scheduler.min_lr_mult=2"], "scheduler.min_lr_mult", "[0, 1]"),
    (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma", "> 0"),
    (["freeze=two_stage", "freeze.finetune_bn=sometimes"], "freeze.finetune_bn", "eval"),
    (["freeze=top_k", "freeze.k=0"], "freeze.k", ">= 1"),
    (["freeze=gradual", "freeze.gradual.every=0"], "freeze.gradual.every", ">= 1"),
    (["freeze.stages.0.bn=maybe"], "freeze.stages[0].bn", "frozen, train, eval"),
    (["freeze.stages.0.epochs=-1"], "freeze.stages[0].epochs", ">= 0"),
    (["head.dropout=1.0"], "head.dropout", "[0, 1)"),
    (["task=logreg", "task.C=0"], "task.C", "> 0"),
    (["task=logreg", "task.max_iter=0"], "task.max_iter", ">= 1"),
    (["head=logreg"], "head=logreg is now task=logreg", "task.C"),  # the option moved
    (["augment=randaugment", "augment.magnitude=31"], "augment.magnitude", "[0, 30]"),
    # fields that depend on each other
    (["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true"], "optimizer.nesterov",
     "momentum > 0"),
    (["backbone.weights_path=/no/such/weights.pth"], "backbone.weights_path", "does not exist"),
    (["backbone.init.path=/no/such/checkpoint.pt"], "backbone.init.path", "does not exist"),
    (["task=autoencoder"], "task=autoencoder", "backbone=conv_encoder"),
    (["optimizer.name=sgd"], "optimizer.name=sgd", "optimizer=sgd"),  # the option, not its name
    # options the run would not use
    (["task=logreg", "trainer.epochs=3"], "trainer.epochs", "task=logreg"),
    (["task=logreg", "head=mlp"], "head", "task=logreg"),
    (["experiment=ae_pretrain", "head=mlp"], "head", "task=autoencoder"),
    (["experiment=mobilenet_v2_two_stage", "freeze=linear_probe"], "freeze.head_epochs",
     "freeze=two_stage"),
]


@pytest.mark.parametrize(("overrides", "key", "says"), BAD_OVERRIDES,
                         ids=[" ".join(o) for o, _, _ in BAD_OVERRIDES])
def test_a_bad_override_is_one_line_naming_the_key(overrides, key, says, monkeypatch, tmp_path):
    # Through the run's own entry point, with its build steps replaced by a tripwire: a mistake
    # the checks let through would reach them (AssertionError, not a UserError).
    _tripwire(monkeypatch)
    with pytest.raises(UserError) as exc:  # (composed as test_docs composes: checked equal there)
        train(fast_compose(overrides), tmp_path, overrides)
    message = str(exc.value)
    assert "\n" not in message
    assert key in message, message
    assert says in message, message


def _tripwire(monkeypatch) -> None:
    """Nothing may be built: no backbone, no data."""
    for target in ("transferlab.run.build.build_backbone", "transferlab.run.build.build_splits"):
        monkeypatch.setattr(target, _must_not_run)


def _must_not_run(*args, **kwargs):
    raise AssertionError("built something before the config was checked")


def test_the_tripwire_is_reached_by_a_valid_config(monkeypatch, tmp_path):
    """The check above can fail: a config the checks accept goes on to the build."""
    _tripwire(monkeypatch)
    with pytest.raises(AssertionError, match="built something"):
        train(compose_config(["trainer.epochs=1"]), tmp_path, ["trainer.epochs=1"])


def test_there_are_at_least_30_cases_across_every_group():
    assert len(BAD_OVERRIDES) >= 30
    groups = {o.lstrip("+").split("=")[0].split(".")[0] for c in BAD_OVERRIDES for o in c[0]}
    assert set(BY_GROUP) | {"trainer"} <= groups


# Through the installed console script: exit code 2, one stderr line, no run built.
CLI_CASES = [
    (["trainer.epoch=3"], "trainer.epoch"),  # Hydra's own override error
    (["freeze=bogus"], "freeze"),  # an unknown option (Hydra's MissingConfigException)
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["freeze=two_stage", "+freeze.finetune_epoch=1"], "freeze.finetune_epoch"),
    (["optimizer.name=lion"], "optimizer.name"),
    (["task=logreg", "freeze=two_stage", "optimizer=sgd"], "freeze"),
    (["head=bogus"], "head"),  # an unknown option the CLI once took for a disk error
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    (["seed=99999999999999999999"], "seed"),  # once an overflow traceback
    (["optimizer.lr=1e300"], "optimizer.lr"),  # once a float32 overflow traceback
    (["name=../../escaped"], "name=../../escaped"),  # once a run outside outputs/
    (["trainer.distributed.scale_lr=true"], "trainer.distributed.scale_lr"),  # once ignored
]


@pytest.mark.slow  # a process each: imports torch
@pytest.mark.parametrize(("overrides", "key"), CLI_CASES,
                         ids=[" ".join(o) for o, _ in CLI_CASES])
def test_console_script_bad_override_exits_2_with_one_line(overrides, key, tmp_path):
    proc = cli(overrides, tmp_path)
    assert_one_line(proc, key)
    # nothing was trained, and a run refused before it built anything leaves no files behind
    # (no run directory that `transferlab-compare` would count as a failed run)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], list(tmp_path.rglob("*"))


def assert_one_line(proc: subprocess.CompletedProcess, key: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and key in lines[0], lines[0]


# A config error of each kind: composition (an unknown option, a wrong type: before Hydra
# makes a run directory), a value's range, a task's own rule, a key the run would not use
# (after: Hydra's directory is removed again). None of them needs torch.
NO_TORCH_CASES = [
    (["freeze=bogus"], "freeze"),
    (["trainer.distributed.scale_lr=true"], "torchrun --nproc_per_node=N"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["task=autoencoder"], "backbone=conv_encoder"),
    (["task=logreg", "trainer.epochs=3"], "trainer.epochs"),
]


@pytest.mark.slow  # a process each (the console script, as a user runs it)
@pytest.mark.parametrize(("overrides", "key"), NO_TORCH_CASES,
                         ids=[" ".join(o) for o, _ in NO_TORCH_CASES])
def test_a_config_error_is_one_line_before_torch_is_imported(overrides, key, tmp_path):
    """``transferlab-train <bad override>``: exit 2 and one line, torch was never imported
    (the error comes faster than ``import torch``), and no run directory is left."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr))\n"
            "from transferlab.cli.train import main\n"
            f"sys.argv = ['transferlab-train', *{overrides!r}, 'hydra.run.dir={tmp_path}/run']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    *lines, imported = proc.stderr.splitlines()
    assert imported == "False", proc.stderr
    assert_one_line(subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout,
                                                "\n".join(lines)), key)
    assert not (tmp_path / "run").exists(), list((tmp_path / "run").rglob("*"))


def test_an_unknown_option_is_the_promised_line(tmp_path):
    """The whole line the docs promise (configuration.md), through the console script's main,
    not Hydra's text with an output-folder hint (its MissingConfigException is an OSError)."""
    code = ("import sys\nfrom transferlab.cli.train import main\n"
            f"sys.argv = ['transferlab-train', 'freeze=bogus', 'hydra.run.dir={tmp_path}/run']\n"
            "sys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: unknown freeze option 'bogus'; choose one of discriminative, freeze_first_n, "
        "gradual, linear_probe, lora, lp_ft, none, scratch, surgical, top_k, two_stage"]


@pytest.mark.slow
def test_sweep_with_a_bad_override_exits_2_before_any_job(tmp_path):
    proc = cli(["-m", "optimizer.lr=1e-3,1e-2", "trainer.epoch=3"], tmp_path)
    assert_one_line(proc, "trainer.epoch")


# --- closed sets: Enums in the schema -----------------------------------------------------------

# every StrEnum field of the schema: (the option that has it, the key, the dataclass holding it)
CLOSED_SETS = [
    (None, "trainer.amp", schema.TrainerConfig),
    (None, "trainer.class_weights", schema.TrainerConfig),
    (None, "trainer.sampler", schema.TrainerConfig),
    (None, "trainer.keep_checkpoints", schema.TrainerConfig),
    (None, "trainer.checkpoint_weights", schema.TrainerConfig),
    (None, "trainer.gradient_clip_algorithm", schema.TrainerConfig),
    (None, "trainer.feature_cache.mode", schema.FeatureCacheConfig),
    (None, "trainer.feature_cache.dtype", schema.FeatureCacheConfig),
    (None, "trainer.feature_cache.identity", schema.FeatureCacheConfig),
    (None, "trainer.early_stopping.monitor", schema.EarlyStoppingConfig),
    (None, "trainer.regularize.name", schema.RegularizeConfig),
    (None, "trainer.wandb.mode", schema.WandbConfig),
    (None, "freeze.stages.0.bn", schema.StageSpec),
    ("freeze=gradual", "freeze.gradual.bn", schema.GradualSpec),
    ("freeze=two_stage", "freeze.finetune_bn", schema.TwoStageConfig),
    ("freeze=lp_ft", "freeze.finetune_bn", schema.LpFtConfig),
    ("freeze=lora", "freeze.layers", schema.LoraConfig),
]


def test_the_closed_set_cases_cover_every_enum_field_of_the_schema():
    found = set()
    for cls in vars(schema).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            for name, tp in typing.get_type_hints(cls).items():
                if isinstance(tp, type) and issubclass(tp, StrEnum):
                    found.add((cls, name))
    assert {(owner, key.rsplit(".", 1)[1]) for _, key, owner in CLOSED_SETS} == found


@pytest.mark.parametrize(("option", "key", "owner"), CLOSED_SETS,
                         ids=[k if o is None else f"{o} {k}" for o, k, _ in CLOSED_SETS])
def test_a_bad_closed_set_value_fails_at_composition_as_one_line(option, key, owner):
    enum = typing.get_type_hints(owner)[key.rsplit(".", 1)[1]]
    bad = f"{enum.values()[0]}x"
    overrides = [*([option] if option else []), f"{key}={bad}"]
    with pytest.raises(UserError) as exc:
        compose_config(overrides)  # Hydra's composition itself, not the later validation
    where = key.replace(".0.", "[0].")
    assert str(exc.value).startswith(f"{where} must be one of {', '.join(enum.values())}, got "
                                     f"{bad!r} (did you mean {enum.values()[0]!r}")


def test_closed_set_values_are_str_and_their_plain_data_holds_plain_strings(tmp_path):
    run = load_config(compose_config(["freeze=lp_ft", "trainer.sampler=balanced"]))
    stage = run.freeze.stages[1]
    assert stage.bn == "eval" and stage.bn is schema.BnMode.eval  # via ${freeze.finetune_bn}
    assert run.trainer.sampler == "balanced" and run.trainer.sampler in ("balanced",)
    assert f"{stage.bn}|{stage.bn:>5}|{str(run.trainer.amp)}" == "eval| eval|auto"
    data = run.as_dict()

    def leaves(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from leaves(v)
        elif isinstance(value, list | tuple):
            for v in value:
                yield from leaves(v)
        else:
            yield value

    assert not [v for v in leaves(data) if isinstance(v, StrEnum)]
    assert data["freeze"]["stages"][1]["bn"] == "eval"
    assert type(data["trainer"]["feature_cache"]["mode"]) is str
    # what a checkpoint, TensorBoard's text and metrics.json do with it
    torch.save({"config": data}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["config"] == data
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_an_old_saved_config_of_plain_strings_loads_and_resumes_as_the_same():
    from transferlab.run.resume import same_config

    overrides = ["freeze=two_stage", "freeze.finetune_bn=eval", "trainer.sampler=balanced"]
    saved = load_config(compose_config(overrides)).as_dict()  # strings, as checkpoints hold
    again = load_config(saved)
    assert again.freeze.finetune_bn is schema.BnMode.eval
    assert again.trainer.sampler is schema.Sampler.balanced
    assert again.as_dict() == saved
    assert same_config(saved, load_config(compose_config(overrides)).as_dict()) == []


# --- registries -----------------------------------------------------------------------------------


@dataclass
class _Schema:
    name: str = "a"


def test_registering_a_name_twice_raises():
    registry = Registry("thing")
    registry.register("a", _Schema, object())
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        registry.register("a", _Schema, object())

    with pytest.raises(ValueError, match="registered twice"):
        @registry.register("a", _Schema)
        def _again():
            pass

    with pytest.raises(ValueError, match="optimizer 'adam' is registered twice"):
        OPTIMIZERS.register("adam", _Schema, object())
    assert OPTIMIZERS.schema_of("adam").__name__ == "AdamConfig"  # the original stays


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(UserError) as exc:
        OPTIMIZERS.get("adamm")
    assert str(exc.value) == ("unknown optimizer.name 'adamm' (did you mean 'adam', 'adamw'?); "
                              "choose one of adam, adamw, sgd, rmsprop")


@pytest.mark.parametrize("group", sorted(g for g in BY_GROUP if g not in ("backbone", "dataset")))
def test_every_option_file_is_registered(group):
    """An option is its YAML file plus one registration (and nothing else)."""
    files = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    assert files == set(BY_GROUP[group].names())


# values these options leave to the command line
REQUIRED = {"dataset=image_folder": ["dataset.root=/d"],
            "dataset=csv": ["dataset.root=/d", "dataset.csv_file=labels.csv"],
            "dataset=hf": ["dataset.path=/d"],
            "dataset=webdataset": ["dataset.urls=/d/train-000000.tar"]}


@pytest.mark.slow  # composes every preset
@pytest.mark.parametrize(("group", "key"), [("backbone", "source"), ("dataset", "kind")])
def test_every_backbone_and_dataset_file_names_a_registered_source_or_kind(group, key):
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        option = f"{group}={path.stem}"
        run = load_config(compose_config([option, *REQUIRED.get(option, [])]))
        assert getattr(getattr(run, group), key) in BY_GROUP[group], option
