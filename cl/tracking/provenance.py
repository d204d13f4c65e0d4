"""Where a run's results come from, in the form MLflow shows: the source (experiment file and
git commits) and the datasets each experience trained and was tested on."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import cl

MAX_INPUTS = 20  # per split: a stream of a thousand experiences logs its data as one input


def git_commit(path: Path) -> tuple[str, bool] | None:
    """(commit, dirty) of the git work tree holding `path`, or None outside one (or without git).
    Dirty: `path` itself has uncommitted changes."""
    folder = path if path.is_dir() else path.parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", str(path)],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip(), bool(status.stdout.strip())


def source_tags(source_file: Path | None) -> dict[str, str]:
    """MLflow's Source column (the experiment file, its commit) and the lab's own commit."""
    tags = {"lab_version": cl.__version__}
    lab = git_commit(Path(cl.__file__).resolve().parent)
    if lab is not None:
        tags["lab_git_commit"] = lab[0] + ("-dirty" if lab[1] else "")
    if source_file is not None:
        tags["mlflow.source.name"] = str(source_file)
        tags["mlflow.source.type"] = "LOCAL"
        experiment = git_commit(source_file)
        if experiment is not None:
            tags["mlflow.source.git.commit"] = experiment[0]
            tags["experiment_git_commit"] = experiment[0] + ("-dirty" if experiment[1] else "")
    return tags


def digest(data) -> str:
    """A short fingerprint of a TensorData: its shape, every label, and up to 256 evenly
    spaced inputs (hashing every pixel of MNIST would cost a tenth of a second per run).
    Inputs read lazily from disk are left out: reading them is what the run avoids."""
    import torch

    h = hashlib.blake2b(digest_size=8)
    h.update(str(tuple(data.x.shape) if data.x is not None else len(data)).encode())
    if isinstance(data.y, torch.Tensor):
        h.update(data.y.cpu().numpy().tobytes())
    else:  # targets read on demand (token windows over shards): the data names its own fingerprint
        h.update(str(getattr(data, "fingerprint", len(data))).encode())
    if isinstance(data.x, torch.Tensor):
        h.update(data.x[::max(1, len(data) // 256)].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _listed(classes: list[int]) -> list[int] | str:
    """Classes as a profile holds them: a language model's vocabulary (tens of thousands of
    token ids) as its size, not as a list MLflow would store for every input."""
    return classes if len(classes) <= 1000 else f"{len(classes)} classes"


def dataset_inputs(stream, dataset: str, data_dir: str | None) -> list[dict]:
    """What a run trained on (each experience's training data, context "train") and was
    tested on (each task's test set, context "test"), for `MLflowSink.log_inputs`."""
    from streams.experience import concat_data

    from streams.sources import data_root

    # digits is the embedded default, bundled with scikit-learn; the others come from the data folder
    source = "sklearn.datasets.load_digits" if dataset == "digits" else str(data_root(data_dir).resolve())
    inputs = []
    experiences = list(stream.experiences)
    if len(experiences) <= MAX_INPUTS:
        for e in experiences:
            inputs.append({"name": f"{dataset}-exp{e.index + 1}-train", "digest": digest(e.train), "source": source,
                           "context": "train", "profile": {"classes": _listed(e.classes), "n": e.n_train,
                                                           "experience": e.index + 1, "task_label": e.task_label}})
    else:
        train = concat_data([e.train for e in experiences])
        inputs.append({"name": f"{dataset}-train", "digest": digest(train), "source": source, "context": "train",
                       "profile": {"n": len(train), "experiences": len(experiences)}})
    tests = list(stream.test_sets)
    if len(tests) <= MAX_INPUTS:
        for j, data in enumerate(tests):
            inputs.append({"name": f"{dataset}-task{j}-test", "digest": digest(data), "source": source,
                           "context": "test", "profile": {"classes": _listed(stream.task_classes[j] if stream.task_classes
                                                                  else data.classes), "n": len(data), "task": j}})
    else:
        test = concat_data(tests)
        inputs.append({"name": f"{dataset}-test", "digest": digest(test), "source": source, "context": "test",
                       "profile": {"n": len(test), "tasks": len(tests)}})
    return inputs
