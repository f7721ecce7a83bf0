"""The words the console scripts' keys accept, and their parsers: importable without torch, so
that ``--help`` and a mistyped key answer at once. Each tool module takes its own from here
(:mod:`transferlab.run.saved`, :mod:`transferlab.tools.tta`, ``.export``, ``.lr_find``,
``.soup``, ``.corruptions``, ``.wise``)."""

from __future__ import annotations

# a saved run (transferlab.run.saved): its checkpoints, and which of its weights
CHECKPOINTS = ("best", "last", "best_ema")  # best_ema.pt: runs with trainer.ema.decay
WEIGHTS = ("raw", "ema")

# test-time augmentation (transferlab.tools.tta)
TTA_MODES = ("none", "flip", "five_crop", "ten_crop")
TTA_HELP = ("average the softmax probabilities over views of each image: none (the eval crop), "
            "flip (+ its mirror), five_crop (4 corners + centre of the eval resize), ten_crop "
            "(five_crop + their mirrors)")

# transferlab-eval's splits (transferlab.tools.evaluate)
EVAL_SPLITS = ("val", "test")

# transferlab-export (transferlab.tools.export)
EXPORT_FORMATS = ("onnx", "torchscript", "both")
EXPORT_NAMES = {"onnx": "ONNX", "torchscript": "TorchScript"}
DEFAULT_OPSET = 17  # read by onnxruntime >= 1.12 and every current runtime
EXPORT_INSTALL = "pip install 'transferlab[export]'"

# transferlab-lr-find's rules (transferlab.tools.lr_find)
LR_RULES = ("steepest", "min10")
LR_RULE_TEXT = {
    "steepest": "steepest descent of the smoothed loss against log lr, before its minimum",
    "min10": "a tenth of the lr at the smoothed loss's minimum",
}

# transferlab-soup (transferlab.tools.soup)
SOUP_METHODS = ("uniform", "greedy")
SOUP_HELD_OUT = ("test",)  # the splits a greedy soup may choose its members by
SOUP_JSON = "soup.json"


def held_out_split(text: str) -> str:
    """A ``held_out=`` value: a split the members did not train on and that is not reported
    (ValueError with the reason otherwise)."""
    if text == "val":
        raise ValueError("val is the split the soup's accuracy is reported on: choosing the "
                         "members by it would make that accuracy optimistic; use held_out=test "
                         "(train the sweep with dataset.test_fraction=0.1 where the data has "
                         "no test split)")
    if text == "train":
        raise ValueError("the members trained on the train split, so it cannot tell a better "
                         "soup from a more memorising one; use held_out=test")
    if text.startswith("fold"):
        raise ValueError("a fold of the training split is not held out from a sweep's runs: "
                         "each trained on every fold; use held_out=test (dataset.test_fraction "
                         "carves a test split the runs never see)")
    if text not in SOUP_HELD_OUT:
        raise ValueError(f"expected one of {', '.join(SOUP_HELD_OUT)}")
    return text


# corruptions (transferlab.tools.corruptions)
SEVERITIES = (1, 2, 3, 4, 5)


def severities(text: str) -> tuple[int, ...]:
    """``all`` (1 to 5) or a comma-separated list of severities from 1 to 5."""
    if text == "all":
        return SEVERITIES
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError("expected all, or severities from 1 to 5 (e.g. 3 or 1,3,5)") from None
    if any(level not in SEVERITIES for level in levels) or len(set(levels)) != len(levels):
        raise ValueError("expected all, or distinct severities from 1 to 5 (e.g. 3 or 1,3,5)")
    return levels


# WiSE-FT's mixing coefficients (transferlab.tools.wise)
def alpha(text: str) -> float:
    """One mixing coefficient in [0, 1] (0: the start weights, 1: the final ones)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number from 0 to 1") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a number from 0 to 1 (0: the start weights, 1: the final)")
    return value


def alphas(text: str) -> tuple[float, ...]:
    """``start:stop:step`` (stop included, e.g. ``0:1:0.1``: 11 points) or a comma-separated
    list (``0,0.5,1``) of coefficients in [0, 1]."""
    if ":" not in text:
        points = tuple(alpha(part) for part in text.split(","))
    else:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError("expected start:stop:step (e.g. 0:1:0.1) or a list (0,0.5,1)")
        start, stop = alpha(parts[0]), alpha(parts[1])
        try:
            step = float(parts[2])
        except ValueError:
            raise ValueError("expected a step > 0 (e.g. 0:1:0.1)") from None
        count = (stop - start) / step if step > 0 else -1.0
        if count < 0 or abs(count - round(count)) > 1e-6:
            raise ValueError(f"the step {parts[2]} does not go from {parts[0]} to {parts[1]} in "
                             "whole steps (e.g. 0:1:0.1)")
        points = tuple(round(start + i * step, 10) for i in range(round(count) + 1))
    if len(set(points)) != len(points):
        raise ValueError("an alpha is given twice")
    return points
