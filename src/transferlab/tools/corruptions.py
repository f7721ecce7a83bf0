"""ImageNet-C-style corruptions of a split (Hendrycks & Dietterich 2019): 15 corruptions (noise,
blur, weather, digital) at 5 severities, from the ``imagecorruptions`` module (the
``imagecorruptions-imaug`` distribution: the original ``imagecorruptions`` 1.1.2 breaks
``glass_blur`` and ``fog`` on NumPy 2 / scikit-image >= 0.19 and needs ``pkg_resources``).
It is an optional extra: ``pip install 'transferlab[robust]'``; imported only when asked for.

Each image goes through the run's eval transform up to its centre crop (an 8-bit RGB image at
the model's input size), is corrupted there, then scaled and normalised as usual: the
corruption applies to what the model sees, before normalisation. Everything random in a
corruption (its noise, glass blur's pixel shuffle, frost's crop) is seeded by ``seed``, the
corruption, the severity and the image's index, so that a rerun sees the same images, whatever
the loader's workers; NumPy's global random state is left as it was.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from statistics import fmean
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from transferlab.data import derived_seed
from transferlab.errors import UserError, did_you_mean

MIN_SIZE = 32  # imagecorruptions' smallest image side
INSTALL = "pip install 'transferlab[robust]'"


def corruption_module():
    """The ``imagecorruptions`` module; its absence is one line naming the extra."""
    try:
        import imagecorruptions
    except ImportError:
        raise UserError(f"corruptions= needs the imagecorruptions package: {INSTALL}") from None
    return imagecorruptions


def corruption_names(text: str) -> tuple[str, ...]:
    """``all`` (the 15 ImageNet-C corruptions) or a comma-separated list of names (those, or
    the package's 4 held-out ones: speckle_noise, gaussian_blur, spatter, saturate)."""
    module = corruption_module()
    if text == "all":
        return tuple(module.get_corruption_names("common"))
    known = module.get_corruption_names("all")
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        if name not in known:
            raise ValueError(f"no corruption {name!r}{did_you_mean(name, known)}; choose from "
                             f"{', '.join(known)}, or all")
    if len(set(names)) != len(names):
        raise ValueError("a corruption is named twice")
    return names


def corrupt_image(image: torch.Tensor, name: str, severity: int, seed: int) -> tv_tensors.Image:
    """``image`` (3, H, W) uint8 corrupted by ``name`` at ``severity``, its randomness drawn from
    ``seed`` (NumPy's global state is restored afterwards)."""
    module = corruption_module()
    array = image.permute(1, 2, 0).contiguous().numpy()
    seed32 = seed % 2**32
    takes_seed = "seed" in inspect.signature(module.corruption_dict[name]).parameters
    state = np.random.get_state()
    np.random.seed(seed32)
    try:
        out = module.corrupt(array, severity=severity, corruption_name=name,
                             **({"seed": seed32} if takes_seed else {}))
    finally:
        np.random.set_state(state)
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1))


class CorruptedImages(Dataset):
    """A split whose transform stops at the model's input size (uint8 images), each image
    corrupted (seeded by its index), then ``tail`` (scaling and normalisation)."""

    def __init__(self, base: Dataset, name: str, severity: int, seed: int, tail: Callable):
        self.base, self.name, self.severity, self.seed, self.tail = base, name, severity, seed, tail

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        seed = derived_seed(f"corruption {self.name}", self.seed, self.severity, i)
        return self.tail(corrupt_image(image, self.name, self.severity, seed)), label


def check_size(image_size: int) -> None:
    if image_size < MIN_SIZE:
        raise UserError(f"corruptions= needs images of at least {MIN_SIZE} px (imagecorruptions' "
                        f"smallest), this run's input is {image_size} px: evaluate a run trained "
                        f"at dataset.image_size >= {MIN_SIZE}")


def corruption_grid(score: Callable[[Dataset], Any], base: Dataset, tail: Callable,
                    names: tuple[str, ...], levels: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Accuracy and loss for every corruption at every severity (``score(dataset)``: the
    predictions of the model under evaluation); their means per corruption and overall."""
    accuracy: dict[str, dict[str, float]] = {}
    loss: dict[str, dict[str, float]] = {}
    for name in names:
        for level in levels:
            pred = score(CorruptedImages(base, name, level, seed, tail))
            accuracy.setdefault(name, {})[str(level)] = pred.accuracy
            loss.setdefault(name, {})[str(level)] = pred.loss
    cells = [acc for row in accuracy.values() for acc in row.values()]
    return {"names": list(names), "severities": list(levels), "seed": seed,
            "accuracy": accuracy, "loss": loss,
            "per_corruption": {name: fmean(row.values()) for name, row in accuracy.items()},
            "mean_accuracy": fmean(cells)}


def corruption_table(grid: dict[str, Any], clean: float, split: str) -> str:
    """Accuracy per corruption (rows) and severity (columns), each row's mean, the means of
    the columns, and the mean corruption accuracy beside the clean one."""
    levels = [str(s) for s in grid["severities"]]
    width = max(len("mean"), *(len(n) for n in grid["names"]))
    head = f"{'corruption':<{width}}" + "".join(f"  {'sev ' + s:>7}" for s in levels)
    lines = [f"corruptions of {split} (seed {grid['seed']}): accuracy", head + f"  {'mean':>7}"]
    for name in grid["names"]:
        row = grid["accuracy"][name]
        lines.append(f"{name:<{width}}" + "".join(f"  {row[s]:7.4f}" for s in levels)
                     + f"  {grid['per_corruption'][name]:7.4f}")
    columns = [fmean(grid["accuracy"][n][s] for n in grid["names"]) for s in levels]
    lines.append(f"{'mean':<{width}}" + "".join(f"  {c:7.4f}" for c in columns)
                 + f"  {grid['mean_accuracy']:7.4f}")
    lines.append(f"mean corruption accuracy {grid['mean_accuracy']:.4f} "
                 f"({len(grid['names'])} corruption(s) x {len(levels)} severit"
                 f"{'y' if len(levels) == 1 else 'ies'}), clean {clean:.4f}")
    return "\n".join(lines)


def corruption_figure(grid: dict[str, Any], clean: float, title: str):
    """Accuracy against severity, a line per corruption (a bar per corruption when one
    severity was asked for), the clean accuracy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, levels = grid["names"], grid["severities"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 3.0), 4.5))
    if len(levels) > 1:
        for i, name in enumerate(names):
            ax.plot(levels, [grid["accuracy"][name][str(s)] for s in levels], marker="o",
                    color=plt.get_cmap("tab20")(i % 20), label=name)
        ax.set_xticks(levels)
        ax.set_xlabel("severity")
    else:
        ax.bar(range(len(names)), [grid["accuracy"][n][str(levels[0])] for n in names],
               color="C0")
        ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
        ax.set_xlabel(f"corruption (severity {levels[0]})")
    ax.axhline(clean, color="0.3", linestyle="--", linewidth=1, label="clean")
    ax.axhline(grid["mean_accuracy"], color="C3", linestyle=":", linewidth=1,
               label="mean corrupted")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: clean {clean:.3f}, mean corrupted {grid['mean_accuracy']:.3f}",
                 fontsize=9)
    fig.tight_layout()
    return fig
