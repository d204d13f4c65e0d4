import os
from pathlib import Path

import pytest

import cl.config.components  # noqa: F401  (registers the built-in components)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The smallest complete experiment file: Split-Digits, a small MLP, fine-tuning, on the CPU.
TINY_EXPERIMENT = """
name: tiny
seed: 0
device: cpu
stream: {dataset: digits, scenario: {name: class_incremental, n_experiences: 5}}
model: {name: mlp, hidden: [16]}
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.05}}
strategies: [naive]
"""


def _data_dir() -> Path | None:
    for candidate in (os.environ.get("CL_DATA_DIR"), SHARED_DATA):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def need_real_data(*relative: str) -> Path:
    """The data root holding `relative`; skips without it, except in CI where it must be there."""
    root = _data_dir()
    if root is None or not all((root / r).exists() for r in relative):
        message = f"real dataset {relative} not found (set CL_DATA_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return root


@pytest.fixture(scope="module")
def stream():
    """Split-Digits, 5 experiences of 2 classes: the stream most behaviour tests train on."""
    from streams import class_incremental, digits

    return class_incremental(digits(), n_experiences=5)


@pytest.fixture(scope="module")
def small_stream():
    """Split-Digits cut to 120 training rows per experience, so a tiny ViT run takes a second."""
    import torch

    from streams import class_incremental, digits

    s = class_incremental(digits(), n_experiences=5)
    for e in s.experiences:
        object.__setattr__(e, "train", e.train.subset(torch.arange(min(120, len(e.train)))))
    return s


def tiny_vit(n_classes=10, depth=5, seed=0):
    """A seeded timm ViT of width 32 (2 heads, patches of 4) on the 8x8 grey digits: what the
    prompt methods' tests run on."""
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, embed_dim=32,
                             depth=depth, num_heads=2, num_classes=n_classes)


@pytest.fixture(scope="session")
def backbone_5_to_9():
    """A tiny ViT trained for a few epochs on digits 5-9 only: a pre-trained backbone whose
    features mean something, and which has never seen the classes of experiences 0-1
    (its weights without the head)."""
    import torch
    import torch.nn.functional as F

    from streams import digits

    vit = tiny_vit()
    data = digits()
    keep = data.train.y >= 5
    x, y = data.transform(data.train.x[keep], train=False), data.train.y[keep]
    opt = torch.optim.Adam(vit.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(vit(x[idx]), y[idx]).backward()
            opt.step()
    return {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}


def trainer_for(stream, strategies, seed=0, batch_size=16, **kw):
    """A seeded LifelongTrainer over an MLP with one hidden layer of 64, SGD lr 0.05 momentum 0.9."""
    import torch

    from cl.models import MLP
    from cl.training.trainer import LifelongTrainer

    torch.manual_seed(seed)
    model = MLP(stream.input_shape, stream.n_classes, hidden=(64,))
    return LifelongTrainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), strategies,
                           seed=seed, batch_size=batch_size, **kw)


def write_experiment(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    """An experiment file in tmp_path holding `text` (dedented)."""
    import textwrap

    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def mnist_root() -> Path:
    return need_real_data("MNIST/raw/train-images-idx3-ubyte")


@pytest.fixture
def cifar_root() -> Path:
    return need_real_data("cifar10-jpeg/cifar10_jpeg.npz")


@pytest.fixture(autouse=True)
def journal_dir(tmp_path, monkeypatch) -> Path:
    """Tracking journals of runs without a checkpoint folder go under the test's folder,
    never the working directory (subprocesses inherit it)."""
    folder = tmp_path / "cl-journal"
    monkeypatch.setenv("CL_JOURNAL_DIR", str(folder))
    return folder


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def two_texts(tmp_path) -> Path:
    """A data root holding two periodic text domains, `abc` and `xyz`, for tiny language-model streams."""
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "abc.txt").write_text("abcdefgh" * 400)
    (tmp_path / "text" / "xyz.txt").write_text("zyxwvuts" * 400)
    return tmp_path
