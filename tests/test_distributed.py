"""One run on several processes (DDP): real 2-process runs on the CPU (gloo), through
``torch.multiprocessing.spawn`` and through ``torchrun``, checked per rank and against a run of
one process with the same global batch; and the parts that need no process group."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import RandomSampler

from transferlab.config import load_config
from transferlab.data import ResumableSampler
from transferlab.errors import UserError
from transferlab.infra.distributed import World, pick_device_for
from transferlab.run import resume_run, train
from transferlab.run.build import build_run
from transferlab.run.predictions import load_predictions
from transferlab.run.resume import ResumePoint

from .conftest import TINY, compose_train

# The tiny timm model (BatchNorm) on 100 digits (10 a class) at 32 px, two stages.
DIGITS = [*(o for o in TINY if o != "trainer.epochs=1"), "dataset.samples_per_class=10",
          "freeze=two_stage", "freeze.head_epochs=1", "freeze.finetune_epochs=1"]
# Weights of a 2-process run and of a 1-process run with the same global batch differ only
# by the order of float sums (measured: 2e-7 after the 3 epochs below; val losses 1e-7 apart).
ATOL = 1e-5


# --- without a process group ------------------------------------------------------------------


def batches(world: World, n: int, batch: int, epoch: int = 1) -> list[list[int]]:
    generator = torch.Generator()  # the order's, seeded by (seed, epoch)
    sampler = ResumableSampler(RandomSampler(range(n), generator=generator), batch, generator,
                               seed=0, world=world)
    sampler.set_epoch(epoch)
    order = [int(i) for i in sampler]
    assert len(order) == len(sampler)
    return [order[k:k + batch] for k in range(0, len(order), batch)]


def test_shards_of_each_batch_make_the_one_process_batch():
    one = batches(World(), 12, 4)
    ranks = [batches(World(r, 2), 12, 2) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(b) for b in one]
    assert batches(World(0, 2), 12, 2, epoch=2) != ranks[0]  # set_epoch: another order


def test_shards_pad_the_order_and_val_shards_do_not():
    ranks = [batches(World(r, 3), 10, 2) for r in range(3)]
    drawn = [i for rank in ranks for b in rank for i in b]
    assert len(drawn) == 12 and set(drawn) == set(range(10))  # 2 padded, as DistributedSampler
    assert [len(r) for r in ranks] == [2, 2, 2]  # the same number of batches on every rank
    val = [World(r, 3).shard(10) for r in range(3)]
    assert sorted(i for s in val for i in s) == list(range(10))  # each image once


def test_ddp_build_scales_lrs_and_converts_batchnorm():
    overrides = [*DIGITS, "freeze.finetune_bn=eval", "trainer.distributed.scale_lr=true",
                 "trainer.distributed.sync_bn=true"]
    two = build_run(load_config(compose_train(overrides), overrides), World(0, 2))
    # optimizer.lr 1e-3; two_stage's finetune stage trains at 1/10 of it
    assert [[g.lr for g in p.groups] for p in two.plans] == [[2e-3], [2e-4, 2e-4]]
    norms = [m for m in two.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)


def test_sync_bn_for_a_stage_that_trains_batchnorm_on_cpu_is_an_error():
    overrides = [*DIGITS, "freeze.finetune_bn=frozen", "trainer.distributed.sync_bn=true"]
    run = load_config(compose_train(overrides), overrides)
    with pytest.raises(UserError, match="stage 'finetune' trains BatchNorm .* CUDA only"):
        build_run(run, World(0, 2))


def test_device_of_a_ddp_process():
    cpu = torch.device("cpu")
    assert pick_device_for(cpu, "cpu", World(1, 2, 1)) == cpu
    with pytest.raises(UserError, match="LOCAL_RANK; use trainer.device=auto or cuda"):
        pick_device_for(torch.device("cuda", 1), "cuda:1", World(0, 2))
    with pytest.raises(UserError, match="does not run on MPS"):
        pick_device_for(torch.device("mps"), "mps", World(0, 2))


def test_resume_takes_as_many_processes_as_the_run_had():
    point = ResumePoint(epoch=1, stage_index=0, step=1, schedule_step=1, model={},
                        optimizer={}, rng={}, history=[], best=None, data={}, world_size=2)
    point.check_world(2)
    with pytest.raises(UserError, match="trained on 2 process.*nproc_per_node=2"):
        point.check_world(1)


def test_a_sweep_under_torchrun_is_refused(monkeypatch):
    from transferlab.cli.train import _cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="-m under torchrun"):
        _cli(["-m", "seed=0,1"])


# --- two processes -------------------------------------------------------------------------------


def _writes_under(root: Path, found: list[str]):
    """An audit hook that notes every file written, created, renamed or removed under
    ``root`` (the run directory), ``root`` itself aside."""
    prefix = str(root.resolve())
    events = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.copyfile",
              "os.truncate", "os.symlink", "os.link"}

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        elif event in events:
            paths = [a for a in args[:2] if isinstance(a, str | bytes | os.PathLike)]
        else:
            return
        for path in paths:
            try:
                text = os.path.abspath(os.fsdecode(path))
            except (TypeError, ValueError):
                continue
            if text.startswith(prefix) and text != prefix:
                found.append(f"{event} {text}")

    return hook


# The run's 6th optimizer step (epoch 2 of 4 steps an epoch): rank 1 alone gets a SIGTERM.
STOP_AT = 6


def _ddp_worker(rank: int, pg_file: str, run_dir: str, overrides: list[str],
                more: list[str], out: str) -> None:
    """One of the 2 processes: the run, stopped part-way through epoch 2 by a SIGTERM to rank
    1 alone, then a resume that goes on and extends it; what every stage did to the weights on
    this rank goes to ``out/rank<r>.pt``."""
    import transferlab.engine.stages as engine
    from transferlab.engine.early_stopping import EarlyStopping
    from transferlab.errors import Interrupted

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=2)
    writes: list[str] = []
    if rank > 0:
        sys.addaudithook(_writes_under(Path(run_dir), writes))
    stages: list[dict] = []

    def snapshot(model) -> dict:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    apply_stage, end = engine.apply_stage, EarlyStopping.end

    def starting(model, plan):
        stages.append({"index": plan.index, "trainable": sorted(plan.trainable()),
                       "start": snapshot(model)})
        apply_stage(model, plan)

    def ending(self, model, next_plan):
        end(self, model, next_plan)
        stages[-1]["end"] = snapshot(model)

    step = engine.Loop.before_step
    fired: list[int] = []

    def before_step(self, optimizer):
        step(self, optimizer)
        if rank == 1 and self.step == STOP_AT and not fired:
            fired.append(self.step)
            os.kill(os.getpid(), signal.SIGTERM)

    engine.apply_stage, EarlyStopping.end = starting, ending
    engine.Loop.before_step = before_step
    world = World(rank, 2)
    try:
        try:
            train(compose_train(overrides), run_dir, overrides=overrides)
            stopped = None
        except Interrupted as stop:
            stopped = stop.signum
        result = resume_run(run_dir, more)
        # the collectives the loop relies on, checked on the same group
        bn_train, bn_eval = nn.BatchNorm1d(2), nn.BatchNorm1d(2).eval()
        for bn in (bn_train, bn_eval):
            bn.running_mean.fill_(float(rank))
        world.average_batchnorm_stats(nn.Sequential(bn_train, bn_eval))
        checks = {"sum": world.sum([rank + 1.0, 1.0]),
                  "rows": world.gather_rows(torch.tensor(world.shard(5)), 5).tolist(),
                  "first": world.first(None if rank == 0 else "r1"),
                  "bn": [bn_train.running_mean.tolist(), bn_eval.running_mean.tolist()],
                  "stopped": stopped}
        final = snapshot(result.built.model)
    finally:
        dist.destroy_process_group()
    torch.save({"stages": stages, "final": final, "writes": writes, "checks": checks},
               Path(out) / f"rank{rank}.pt")


def _differ(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_process_run_matches_one_process_with_the_same_global_batch(tmp_path, one_thread):
    """2 processes x batch 8 x 2 accumulated: two stages on cached features (sharded
    extraction), stopped mid-epoch by a signal to one rank, resumed and extended under DDP;
    against 1 process x batch 16 x 2 accumulated that never stopped."""
    # a store of its own: the session's shared one may hold these features from another test
    common = [*DIGITS, "freeze.finetune_bn=eval", "trainer.accumulate_grad_batches=2",
              f"trainer.feature_cache.dir={tmp_path / 'cache'}"]
    ddp, run_dir = [*common, "trainer.batch_size=8"], tmp_path / "ddp"
    more = ["freeze.finetune_epochs=2"]
    mp.spawn(_ddp_worker, args=(str(tmp_path / "pg"), str(run_dir), ddp, more, str(tmp_path)),
             nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # per stage, on every rank: frozen weights and the BatchNorm statistics (eval mode: those
    # of the trained blocks too) unchanged, the trained weights moved; after it, every rank
    # holds the same weights
    # the run: stage 0, stage 1 stopped; the resume: stage 1 to its end
    assert [(s["index"], "end" in s) for s in ranks[0]["stages"]] == [(0, True), (1, False),
                                                                       (1, True)]
    for stages in (r["stages"] for r in ranks):
        for stage in (s for s in stages if "end" in s):
            trained = set(stage["trainable"])
            frozen = [k for k in stage["start"] if k not in trained]
            assert frozen and all(torch.equal(stage["start"][k], stage["end"][k])
                                  for k in frozen)
            assert any(not torch.equal(stage["start"][k], stage["end"][k]) for k in trained)
    for s0, s1 in zip(ranks[0]["stages"], ranks[1]["stages"], strict=True):
        assert all(torch.equal(s0[at][k], s1[at][k]) for at in ("start", "end") if at in s0
                   for k in s0[at])

    # rank 0 alone wrote the run; rank 1 wrote nothing there
    assert ranks[1]["writes"] == []
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["history"]) == 3
    assert metrics["distributed"] == {
        "world_size": 2, "backend": "gloo", "batch_size_per_process": 8,
        "global_batch_size": 32, "lr_scale": 1, "sync_bn": False}
    assert [r["mid_epoch"] for r in metrics["resumes"]] == [True]
    cache = metrics["feature_cache"]  # stage 1: extracted (sharded); the resumed stage 2
    assert (cache["head"]["misses"], cache["finetune"]["hits"]) == (2, 2)  # read the store
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["loop"]["world_size"] == 2 and len(ckpt["loop"]["rng_ranks"]) == 1
    events = [re.search(r"\.(\d+)\.\d+(\.resumed)?$", e.name)  # <time>.<host>.<pid>.<n>
              for e in (run_dir / "tb").glob("events.out.tfevents.*")]
    assert len({e.group(1) for e in events}) == 1  # one process wrote them

    # the collectives: sums, the gathered shards, the BatchNorm average (train mode only)
    for r, rank in enumerate(ranks):  # both stopped on rank 1's signal
        assert rank["checks"] == {"sum": [3.0, 2.0], "rows": [0, 1, 2, 3, 4], "first": "r1",
                                  "bn": [[0.5, 0.5], [float(r), float(r)]],
                                  "stopped": signal.SIGTERM}

    # one process, the same global batch, 3 epochs without a stop
    one = [*common, "trainer.batch_size=16", *more]
    single = train(compose_train(one), tmp_path / "one", overrides=one)
    assert _differ(ranks[0]["final"], single.built.model.state_dict()) < ATOL
    for a, b in zip(metrics["history"], single.metrics["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)  # the whole val set
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert abs(a["val_acc"] - b["val_acc"]) <= 1 / 360  # at most one of 360 images


@pytest.mark.slow
def test_torchrun_trains_one_run_and_only_rank_0_writes(tmp_path):
    """``torchrun --nproc_per_node=2 -m transferlab.train``: one run directory (rank 0's
    claim), Hydra's files and the log once, the other rank silent; the whole backbone trains
    its BatchNorm in stage 2 (statistics averaged over the ranks), the LRs scaled x 2."""
    args = [*DIGITS, "freeze.fine_tune_at=0", "trainer.batch_size=8",
            "trainer.distributed.scale_lr=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "transferlab.train", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1, runs
    run_dir = runs[0]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    log = (run_dir / "train.log").read_text()
    for text in (log, proc.stdout):
        assert text.count("epoch 1/2 [head]") == 1 and text.count("epoch 2/2 [finetune]") == 1
    assert proc.stdout.count("Run saved to:") == 1
    assert "epoch 1/2" not in proc.stderr and "[rank 1]" not in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["distributed"]["global_batch_size"] == 16
    assert metrics["distributed"]["lr_scale"] == 2
    assert metrics["history"][0]["lr"] == {"head": 2e-3}  # optimizer.lr 1e-3 x 2 processes
    assert metrics["feature_cache"]["finetune"]["cut"] is None  # the whole model trains
    # rank 0 alone scores every val image (not its shard) with best.pt's weights
    own = load_predictions(run_dir / "predictions_val.npz")
    assert own.header["epoch"] == metrics["best"]["epoch"]
    assert len(own.targets) == metrics["data"]["val"]
    assert own.accuracy == pytest.approx(metrics["best"]["val_acc"], abs=2 / len(own.targets))
