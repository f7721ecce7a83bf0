"""What ``transferlab-rank`` shows and writes: the ranked table (rank, score, gap to the next),
each backbone's scores after every block, a reading of them, ``rank.json``, ``rank.md``,
``rank.png`` and the suggested next command."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict
from pathlib import Path

from transferlab.infra.run_dirs import atomic_write_text
from transferlab.tools.rank import RANK_SCORES, Row

TOP = 2  # the backbones the suggested sweep keeps


def whole_rows(rows: list[Row], primary: str) -> list[Row]:
    """The whole-backbone rows, best first by ``primary``; failed ones last."""
    def key(row: Row) -> float:
        value = row.scores.get(primary)
        return -math.inf if value is None else value

    return sorted((r for r in rows if r.block is None), key=key, reverse=True)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def ranked_table(rows: list[Row], scores: list[str]) -> list[list[str]]:
    """Header and one line per backbone: rank, name, each score, the gap of the first score to
    the next backbone's, feature size, seconds; a failed backbone: its error in one cell."""
    primary = scores[0]
    ordered = whole_rows(rows, primary)
    lines = [["rank", "backbone", *scores, f"gap ({primary})", "dim", "seconds"]]
    ok = [r for r in ordered if r.error is None]
    for i, row in enumerate(ordered):
        if row.error is not None:
            lines.append(["-", row.backbone, f"failed: {row.error}"])
            continue
        after = ok[i + 1].scores.get(primary) if i + 1 < len(ok) else None
        gap = None if after is None or row.scores[primary] is None \
            else row.scores[primary] - after
        lines.append([str(i + 1), row.backbone, *(_fmt(row.scores[s]) for s in scores),
                      _fmt(gap), str(row.dim), f"{row.seconds:.1f}"])
    return lines


def block_table(rows: list[Row], backbone: str, scores: list[str]) -> list[list[str]]:
    """One backbone's blocks, input to output: index, name, scores, rank by the first score."""
    blocks = [r for r in rows if r.backbone == backbone and r.block is not None]
    primary = scores[0]
    order = sorted(blocks, key=lambda r: -(r.scores.get(primary) or -math.inf))
    rank_of = {id(r): i + 1 for i, r in enumerate(order)}
    rgn = any(r.rgn is not None for r in blocks)
    lines = [["block", "name", *scores, "rank", "dim", *(["rgn"] if rgn else [])]]
    for row in blocks:
        lines.append([str(row.block_index), row.block, *(_fmt(row.scores[s]) for s in scores),
                      str(rank_of[id(row)]), str(row.dim),
                      *([f"{row.rgn:.2e}" if row.rgn is not None else "n/a"] if rgn else [])])
    return lines


def reading(rows: list[Row], backbone: str, primary: str) -> str | None:
    """A plain-language reading of one backbone's block scores (a heuristic: linear
    separability after each block, not a fine-tuning result)."""
    blocks = [r for r in rows if r.backbone == backbone and r.block is not None
              and r.scores.get(primary) is not None]
    if len(blocks) < 2:
        return None
    best = max(blocks, key=lambda r: r.scores[primary])
    last = blocks[-1]
    if best is last:
        text = (f"{backbone}: {primary} is highest after its last block ({last.block}): the "
                f"pretrained features suit this data as they are; start with "
                f"freeze=linear_probe, then try freeze=top_k freeze.k=2")
    else:
        after = last.block_index - best.block_index
        text = (f"{backbone}: {primary} peaks after block {best.block_index} ({best.block}, "
                f"{best.scores[primary]:.4f}) and falls to {last.scores[primary]:.4f} by the "
                f"last block: the {after} blocks after it are the ImageNet-specific ones; try "
                f"freeze=top_k freeze.k={after} (they train, the rest stays frozen), or "
                f"drop them: backbone.cut={best.block_index} (the features after block "
                f"{best.block_index})")
    return text + _rgn_reading(blocks)


def _rgn_reading(blocks: list[Row]) -> str:
    """The blocks of the largest relative gradient norm, and the surgical run for the first."""
    measured = sorted((r for r in blocks if r.rgn is not None), key=lambda r: -r.rgn)[:3]
    if not measured:
        return ""
    names = ", ".join(f"{r.block_index} ({r.block}, {r.rgn:.1e})" for r in measured)
    return (f". Auto-RGN: the largest relative gradient norms are in blocks {names}; "
            f"try freeze=surgical freeze.block={measured[0].block_index}")


def next_command(rows: list[Row], primary: str, overrides: list[str]) -> str | None:
    """A plain multirun over the top backbones and two policies."""
    ok = [r.backbone for r in whole_rows(rows, primary)
          if r.error is None and r.scores.get(primary) is not None][:TOP]
    if not ok:
        return None
    args = [a for a in overrides if not a.startswith("backbone=")]
    return " ".join(["transferlab-train", "-m", *(shlex.quote(a) for a in args),
                     f"backbone={','.join(ok)}", "freeze=linear_probe,top_k"])


def text_table(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines if i < len(line))
              for i in range(max(len(line) for line in lines))]
    return "\n".join("  ".join(cell.ljust(widths[i]) if i < len(line) - 1 else cell
                               for i, cell in enumerate(line)) for line in lines)


def md_table(lines: list[list[str]]) -> str:
    width = len(lines[0])
    body = [line + [""] * (width - len(line)) if len(line) < width else line for line in lines]
    rows = ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
    return "\n".join([rows[0], "|" + "---|" * width, *rows[1:]])


def halving_command(plain: str) -> str:
    """The same sweep under successive halving (docs/sweeps.md, Halving sweeps)."""
    return plain.replace("transferlab-train -m ", "transferlab-train -m hydra/sweeper=halving ", 1)


def report(rows: list[Row], scores: list[str], overrides: list[str],
           before: list[str] | None = None) -> dict:
    """Everything the command shows and writes, as data: the tables, readings, command, and
    ``before``: how each score ranked the backbones of the runs trained before
    (:func:`transferlab.tools.rank_history.text`)."""
    primary = scores[0]
    backbones = list(dict.fromkeys(r.backbone for r in rows))
    return {
        "scores": scores,
        "meaning": {s: RANK_SCORES[s].summary for s in scores},
        "table": ranked_table(rows, scores),
        "blocks": {b: block_table(rows, b, scores) for b in backbones
                   if any(r.backbone == b and r.block is not None for r in rows)},
        "readings": [t for b in backbones if (t := reading(rows, b, primary))],
        "next": (plain := next_command(rows, primary, overrides)),
        "next_halving": halving_command(plain) if plain else None,
        "before": before or [],
        "rows": [asdict(r) for r in rows],
    }


def console_text(rep: dict) -> str:
    primary = rep["scores"][0]
    lines = [f"ranked by {primary} on the training split (higher is better; "
             f"{rep['meaning'][primary]})", text_table(rep["table"])]
    if rep["before"]:
        lines += ["", *rep["before"]]
    for backbone, table in rep["blocks"].items():
        lines += ["", f"{backbone}, after each block (input to output):", text_table(table)]
    if rep["readings"]:
        lines += ["", "reading (a heuristic from linear separability, not a fine-tuning "
                  "result):", *(f"  {t}" for t in rep["readings"])]
    if rep["next"]:
        lines += ["", f"next: {rep['next']}",
                  f"  or, stopping the weak ones early: {rep['next_halving']}"]
    return "\n".join(lines)


def markdown(rep: dict, seconds: float) -> str:
    primary = rep["scores"][0]
    parts = ["# transferlab-rank", "",
             f"Ranked by **{primary}** on the training split (higher is better), "
             f"in {seconds:.0f} s.", "",
             *(f"- `{s}`: {m}" for s, m in rep["meaning"].items()), "",
             md_table(rep["table"]), ""]
    if rep["before"]:
        parts += ["## How the scores ranked the runs trained before", "",
                  rep["before"][0], "", *(f"- {t.strip()}" for t in rep["before"][1:]), ""]
    for backbone, table in rep["blocks"].items():
        parts += [f"## {backbone}: after each block", "", md_table(table), ""]
    if rep["readings"]:
        parts += ["## Reading", "", *(f"- {t}" for t in rep["readings"]), ""]
    if rep["next"]:
        parts += ["## Next", "", "```", rep["next"], "```", "",
                  "or, stopping the weak candidates early (successive halving):", "", "```",
                  rep["next_halving"], "```", ""]
    parts += ["![scores](rank.png)", ""]
    return "\n".join(parts)


def figure(rows: list[Row], primary: str, path: Path) -> Path:
    """Left: the backbones' scores; right: each backbone's score after every block, against
    its relative depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whole = [r for r in whole_rows(rows, primary) if r.scores.get(primary) is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh([r.backbone for r in whole][::-1], [r.scores[primary] for r in whole][::-1])
    left.set_xlabel(primary)
    left.set_title("backbones (higher is better)")
    for backbone in dict.fromkeys(r.backbone for r in rows):
        blocks = [r for r in rows if r.backbone == backbone and r.block is not None
                  and r.scores.get(primary) is not None]
        if blocks:
            depth = [r.block_index / max(blocks[-1].block_index, 1) for r in blocks]
            right.plot(depth, [r.scores[primary] for r in blocks], marker=".", label=backbone)
    right.set_xlabel("relative depth (block index / last block)")
    right.set_ylabel(primary)
    right.set_title("after each block")
    if right.lines:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, rows: list[Row], rep: dict, seconds: float) -> list[Path]:
    """rank.json, rank.md, rank.png and the TensorBoard text ``rank`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "rank.json", json.dumps({**rep, "seconds": round(seconds, 1)},
                                                    indent=1))
    md = markdown(rep, seconds)
    atomic_write_text(out / "rank.md", md)
    figure(rows, rep["scores"][0], out / "rank.png")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tb")) as writer:
        writer.add_text("rank", md)
    return [out / "rank.json", out / "rank.md", out / "rank.png", out / "tb"]
