"""``transferlab-eval``'s figure: the confusion matrix and, beside it, each class's accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from transferlab.tools.evaluate import confusion_figure, per_class_accuracy

MATRIX = [[50, 2, 0], [5, 40, 5], [0, 0, 0]]  # wasps: no image


def test_per_class_accuracy_is_each_rows_recall():
    acc = per_class_accuracy(np.asarray(MATRIX))
    assert acc[:2] == pytest.approx([50 / 52, 40 / 50])
    assert np.isnan(acc[2])


def test_the_bars_beside_the_matrix_are_the_classes_accuracies_in_its_row_order():
    fig = confusion_figure(MATRIX, ["ants", "bees", "wasps"], "t")
    matrix_ax = next(a for a in fig.axes if a.get_xlabel() == "predicted class")
    bars_ax = next(a for a in fig.axes if a.get_title() == "per class")
    bars = [p for p in bars_ax.patches if isinstance(p, Rectangle)]
    assert [b.get_width() for b in bars] == pytest.approx([50 / 52, 40 / 50, 0.0])
    assert [b.get_y() + b.get_height() / 2 for b in bars] == pytest.approx([0, 1, 2])
    assert bars_ax.get_ylim() == matrix_ax.get_ylim()  # row k of both at the same height
    assert [t.get_text() for t in bars_ax.get_yticklabels()] == ["ants", "bees", "wasps"]
    assert " no images" in [t.get_text() for t in bars_ax.texts]
    (overall,) = bars_ax.get_lines()
    assert overall.get_xdata()[0] == pytest.approx(90 / 102)
