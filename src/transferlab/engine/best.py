"""Which epoch is the best: one rule for the run's best epoch (``metrics.json["best"]``,
``best.pt``) and for the epoch whose weights early stopping restores.

An epoch beats another when its monitored value is better; on a tie, when the other metric
is. With ``val_acc`` (the run's best, and early stopping's ``monitor=val_acc``): the higher
accuracy, and between equal accuracies the lower val_loss. With ``val_loss``: the lower loss,
then the higher accuracy. A later epoch takes the place of the best only when it is strictly
better, so of two epochs equal in both the earlier one stays the best.
"""

from __future__ import annotations


def epoch_rank(record: dict, monitor: str = "val_acc") -> tuple[float, float]:
    """Larger is better (a record without accuracy counts it as 0)."""
    acc = record.get("val_acc")
    acc = acc if acc is not None else 0.0
    loss = float(record["val_loss"])
    return (acc, -loss) if monitor == "val_acc" else (-loss, acc)
