"""Reports of recorded results: text tables, CSV/JSON of the matrix, a heatmap."""
from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np


def row_labels(T: int) -> list[str]:
    return ["untrained"] + [f"after_exp{i}" for i in range(1, T + 1)]


def matrix_csv(R) -> str:
    R = np.asarray(R)
    T = R.shape[1]
    lines = ["row," + ",".join(f"task{j}" for j in range(T))]
    for label, row in zip(row_labels(T), R):
        lines.append(label + "," + ",".join(f"{v:.6f}" for v in row))
    return "\n".join(lines) + "\n"


def matrix_json(R) -> str:
    R = np.asarray(R)
    return json.dumps({"rows": row_labels(R.shape[1]), "columns": [f"task{j}" for j in range(R.shape[1])],
                       "accuracy_matrix": R.tolist()}, indent=1)


def heatmap_png(R, title: str = "accuracy matrix") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(R)
    T = R.shape[1]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * T, 1.2 + 0.6 * (T + 1)))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(R.shape[0]):
        for j in range(T):
            ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if R[i, j] < 0.6 else "black")
    ax.set_xticks(range(T), [f"task {j}" for j in range(T)], rotation=45)
    ax.set_yticks(range(T + 1), row_labels(T))
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained through")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def results_table(runs: Sequence[dict]) -> str:
    """One block per run: each task's final accuracy, then ACC/BWT/FWT/forgetting."""
    out = []
    for run in runs:
        R = np.asarray(run["accuracy_matrix"])
        T = R.shape[1]
        head = f"{'run':<14}" + "".join(f"{'task' + str(j):>8}" for j in range(T))
        head += f"{'ACC':>8}{'BWT':>8}{'FWT':>8}{'Forget':>8}{'train_s':>9}"
        if not out:
            out.append(head)
        row = f"{run['name'][:14]:<14}" + "".join(f"{v:>8.3f}" for v in R[-1])
        row += f"{run['acc']:>8.3f}{run['bwt']:>8.3f}{run['fwt']:>8.3f}{run['forgetting']:>8.3f}"
        row += f"{run['train_time_s']:>9.2f}"
        out.append(row)
    return "\n".join(out)
