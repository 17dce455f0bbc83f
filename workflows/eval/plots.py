"""What an eval run shows beyond numbers: a per-class accuracy table and a confusion-matrix image."""

from __future__ import annotations

import numpy as np

from workflows.data.eval_sets import DatasetResult

# Above this many classes (ImageNet's 1000) a confusion image is unreadable and huge: the matrix goes as JSON.
MAX_FIGURE_CLASSES = 60


def log_dataset(client, run_id: str, name: str, result: DatasetResult) -> None:
    """Per-class accuracy table and confusion matrix (an image, or JSON for many classes) of a classification set."""
    if not result.per_class:
        return
    import pandas as pd

    table = pd.DataFrame(result.per_class, columns=["class", "recall", "support"])
    client.log_table(run_id, data=table, artifact_file=f"{name}/per_class_accuracy.json")
    if len(result.classnames) > MAX_FIGURE_CLASSES:
        client.log_dict(run_id, {"classes": result.classnames, "rows_true_columns_predicted": result.confusion},
                        f"{name}/confusion_matrix.json")
        return
    client.log_figure(run_id, confusion_figure(result.confusion, result.classnames, name),
                      f"{name}/confusion_matrix.png")


def confusion_figure(confusion: list[list[int]], classnames: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classnames)
    fig, ax = plt.subplots(figsize=(2 + 0.5 * n, 2 + 0.5 * n))
    ax.imshow(np.asarray(confusion), cmap="Blues")
    ax.set_xticks(range(n), classnames, rotation=90)
    ax.set_yticks(range(n), classnames)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}: confusion matrix")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig
