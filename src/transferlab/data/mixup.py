"""MixUp and CutMix of training batches (``augment.mixup_alpha``, ``augment.cutmix_alpha``,
``augment.mix_prob``), through torchvision's ``transforms.v2.MixUp`` / ``CutMix`` (one of the
two drawn per batch when both are on).

They run in the training loader's collate function, so in its worker processes. Each batch's
draw (whether it mixes, which of the two, the mixing weight, the CutMix box) comes from an RNG
seeded by (seed, epoch, the batch's sample indices) alone, as each sample's augmentation is:
the same batches whatever the number of loader processes, and again after a resume.

The targets become class probabilities (rows summing to 1; a batch left unmixed gets one-hot
rows), which ``nn.CrossEntropyLoss`` takes as they are (label smoothing and class weights
included). The training accuracy is measured against each image's dominant label: the label
of the image with the larger weight in the mix (the argmax of its target row).
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from transferlab.config.schema import AugmentConfig

TRAIN_ACC = ("the label with the larger weight in each mixed image (the argmax of its "
             "MixUp/CutMix target)")


def mixing(augment: AugmentConfig) -> bool:
    """Whether MixUp or CutMix is on."""
    return augment.mix_prob > 0 and (augment.mixup_alpha > 0 or augment.cutmix_alpha > 0)


def mixing_reason(augment: AugmentConfig) -> str | None:
    """Why the training inputs are random because of mixing (for the feature cache), or None."""
    if not mixing(augment):
        return None
    on = [f"augment.{k}={getattr(augment, k):g}" for k in ("mixup_alpha", "cutmix_alpha")
          if getattr(augment, k) > 0]
    return f"{' and '.join(on)} mix the training images (MixUp/CutMix)"


def mix_record(augment: AugmentConfig) -> dict:
    """What metrics.json says about mixing (``mix``)."""
    return {"mixup_alpha": augment.mixup_alpha, "cutmix_alpha": augment.cutmix_alpha,
            "mix_prob": augment.mix_prob, "train_acc": TRAIN_ACC}


class MixCollate:
    """The training loader's collate function: ``default_collate``, then MixUp / CutMix with
    probability ``mix_prob``."""

    def __init__(self, augment: AugmentConfig, num_classes: int, seed: int):
        from torchvision.transforms import v2

        choices = []
        if augment.mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
        if augment.cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.num_classes, self.prob, self.seed = num_classes, augment.mix_prob, seed

    def __call__(self, samples):  # a SeededBatch (transferlab.data.SeededSamples)
        from transferlab.data import derived_seed

        x, y = default_collate(samples)
        epoch, indices = getattr(samples, "epoch", 0), getattr(samples, "indices", [])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed("mix", self.seed, epoch, *indices))
            if float(torch.rand(())) < self.prob:
                return self.transform(x, y)
        return x, torch.nn.functional.one_hot(y, self.num_classes).float()


def batch_mixer(augment: AugmentConfig, num_classes: int, seed: int) -> MixCollate | None:
    """The collate function of the training loader, or None (the default) without mixing."""
    return MixCollate(augment, num_classes, seed) if mixing(augment) else None
