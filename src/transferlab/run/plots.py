"""Learning-curve figures: accuracy and loss, train vs val, stage boundaries marked."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # (not pyplot: no GUI backend, no global figure state)


def stage_starts(history: list[dict]) -> list[tuple[int, str]]:
    """(epoch, stage) where each stage begins, the first one included."""
    starts, previous = [], None
    for rec in history:
        if rec["stage"] != previous:
            starts.append((rec["epoch"], rec["stage"]))
        previous = rec["stage"]
    return starts


def learning_curves(history: list[dict], title: str = "",
                    stops: list[dict] | None = None) -> Figure:
    """Two panels (accuracy, loss), train vs val; a dashed line at every stage boundary,
    each stage labelled with its name where it starts. Records without accuracy (an
    autoencoder's) get the loss panel alone; a run with an EMA of its weights gets their val
    curve too. ``stops``: the stages that stopped early
    (``metrics.json["stopped_early"]``): a red dotted line after the last epoch, the planned
    epochs left out shaded, the stage's best epoch ringed on the val curve."""
    epochs = [r["epoch"] for r in history]
    starts = stage_starts(history)
    panels = [("loss", "loss")]
    if any(r.get("val_acc") is not None for r in history):
        panels.insert(0, ("acc", "accuracy"))
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels, strict=True):
        ax.plot(epochs, [r.get(f"train_{metric}") for r in history], "o-",
                label=f"train {label}")
        ax.plot(epochs, [r.get(f"val_{metric}") for r in history], "s-", label=f"val {label}")
        if any(r.get(f"val_{metric}_ema") is not None for r in history):  # trainer.ema
            ax.plot(epochs, [r.get(f"val_{metric}_ema") for r in history], "^--",
                    label=f"val {label} (EMA weights)")
        for i, (epoch, stage) in enumerate(starts):
            if i > 0:
                ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=1)
            if len(starts) > 1:
                ax.text(epoch - 0.45 if i else epoch, 0.02, stage, fontsize=8, color="dimgrey",
                        transform=ax.get_xaxis_transform(), va="bottom")
        _mark_stops(ax, history, metric, stops or [])
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _mark_stops(ax, history: list[dict], metric: str, stops: list[dict]) -> None:
    val = {r["epoch"]: r.get(f"val_{metric}") for r in history}
    for i, stop in enumerate(stops):
        end = stop["epoch"] + 0.5
        ax.axvline(end, color="tab:red", linestyle=":", linewidth=1.2,
                   label="early stop" if i == 0 else None)
        if stop["planned_last_epoch"] > stop["epoch"]:
            ax.axvspan(end, stop["planned_last_epoch"] + 0.5, color="grey", alpha=0.12,
                       label="epochs left out" if i == 0 else None)
        best = val.get(stop["best_epoch"])
        if best is not None:
            ax.plot([stop["best_epoch"]], [best], "o", markersize=11, markerfacecolor="none",
                    markeredgecolor="tab:red",
                    label=f"stage best ({stop['monitor']})" if i == 0 else None)


def save_learning_curves(history: list[dict], path: Path, title: str = "",
                         stops: list[dict] | None = None) -> None:
    fig = learning_curves(history, title, stops)
    fig.savefig(path, dpi=110)
