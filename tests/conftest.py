import os
from pathlib import Path

import pytest

import cl.config.components  # noqa: F401  (registers the built-in components)

# Where test data comes from, the one rule (docs/index.md#testing says it to readers): the
# real datasets (MNIST, CIFAR-10) are read from $CL_DATA_DIR and from nowhere else. Without
# them a test that needs them skips, saying so; where CI is set (.ci/run points CL_DATA_DIR
# at ../shared/data) a missing dataset fails instead, so CI never passes by skipping.
# Tests that need them take one of `REAL_DATA_FIXTURES`, which `need_real_data` stands
# behind; `pytest_collection_modifyitems` marks each such test `real_data`.
REAL_DATA_FIXTURES = ("mnist_root", "cifar_root", "mnist_root_module")


def need_real_data(*relative: str) -> Path:
    """The data root, $CL_DATA_DIR, holding `relative`; skips without it, except in CI where it
    must be there."""
    root = os.environ.get("CL_DATA_DIR")
    if not root:
        message = f"needs the real dataset {'/'.join(relative)}: set CL_DATA_DIR to the folder holding it"
    elif not all((Path(root) / r).exists() for r in relative):
        message = f"needs the real dataset {'/'.join(relative)}, which CL_DATA_DIR={root} does not hold"
    else:
        return Path(root)
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must have it)")
    pytest.skip(message)


def pytest_collection_modifyitems(config, items):
    """Mark every test that takes a real dataset `real_data`, so `-m "not real_data"` leaves them out."""
    for item in items:
        if set(REAL_DATA_FIXTURES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_data)


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


def trainer_for(stream, strategies, seed=0, batch_size=16, *, model=None, hidden=(64,), optimizer=None, lr=0.05,
                momentum=0.9, **kw):
    """A LifelongTrainer over `model`, trained by `optimizer`.

    `model`: a module, used as it is (the global RNG untouched); a factory `stream -> module`; or
    None: an MLP with hidden layers `hidden`. A factory or the MLP is built after
    `torch.manual_seed(seed)`. `optimizer`: an optimizer; a factory `parameters -> optimizer`; or
    None: SGD at `lr` with `momentum`. Keywords that are `training:` settings (epochs,
    eval_every, nonfinite, ...) go into the trainer's TrainingConfig; the rest (device, sinks,
    scheduler, evaluators, checkpoint_path, ...) to the trainer."""
    import torch

    from cl.config.schema import TrainingConfig
    from cl.models import MLP
    from cl.training.trainer import LifelongTrainer

    if not isinstance(model, torch.nn.Module):
        torch.manual_seed(seed)
        model = model(stream) if model is not None else MLP(stream.input_shape, stream.n_classes, hidden=hidden)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    # The config's optimizer and scheduler are specs; here they are built objects, the trainer's own arguments.
    loop = set(TrainingConfig.model_fields) - {"optimizer", "scheduler"}
    settings = {k: kw.pop(k) for k in list(kw) if k in loop}
    return LifelongTrainer(model, optimizer, strategies, TrainingConfig(batch_size=batch_size, **settings),
                           seed=seed, **kw)


def vit_trainer_for(stream, strategies, seed=0, batch_size=32, *, depth=5, weights=None, lr=0.01, optimizer=None,
                    **kw):
    """A LifelongTrainer over `tiny_vit(depth=depth, seed=seed)` (with `weights` loaded over it, the
    head excepted where they have none), trained by Adam at `lr` (or by the factory `optimizer`)."""
    import torch

    vit = tiny_vit(stream.n_classes, depth, seed)
    if weights is not None:
        vit.load_state_dict(weights, strict=False)
    return trainer_for(stream, strategies, seed, batch_size, model=vit,
                       optimizer=optimizer or (lambda params: torch.optim.Adam(params, lr=lr)), **kw)


def write_experiment(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    """An experiment file in tmp_path holding `text` (dedented)."""
    import textwrap

    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def tiny_config(*, name="tiny", seed=0, device="cpu", dataset="digits", n_experiences=5, scenario=None,
                hidden=(16,), model=None, lr=0.05, momentum=None, optimizer=None, strategies=("naive",),
                **settings) -> dict:
    """The smallest complete experiment, as the dict its YAML file holds: Split-Digits in
    `n_experiences` experiences (or `scenario`), an MLP with hidden layers `hidden` (or `model`),
    one epoch in batches of 64 by SGD at `lr` (with `momentum`; or `optimizer`), fine-tuning
    (or `strategies`), on the CPU.

    Keywords that are `training:` settings (epochs, batch_size, eval_every, scheduler, ...) go
    under `training`; any other (runs, seeds, threads, progress, sweep, data_dir, or a key
    the schema does not know) at the top. A value of None leaves its key out (`device=None`:
    the default device; `strategies=None` beside `runs=`)."""
    from cl.config.schema import TrainingConfig

    optimizer = optimizer or {"name": "sgd", "lr": lr, **({"momentum": momentum} if momentum is not None else {})}
    training = {"epochs": 1, "batch_size": 64, "optimizer": optimizer}
    training.update({k: settings.pop(k) for k in list(settings) if k in TrainingConfig.model_fields})
    config = {"name": name, "seed": seed, "device": device,
              "stream": {"dataset": dataset,
                         "scenario": scenario or {"name": "class_incremental", "n_experiences": n_experiences}},
              "model": model or {"name": "mlp", "hidden": list(hidden)},
              "training": training,
              "strategies": list(strategies) if strategies is not None else None, **settings}

    def drop_none(d):
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return drop_none(config)


def tiny_experiment(folder: Path, file: str = "exp.yaml", **settings) -> Path:
    """`tiny_config(**settings)` written as the YAML file `folder/file`."""
    import yaml

    path = folder / file
    path.write_text(yaml.safe_dump(tiny_config(**settings), sort_keys=False, default_flow_style=None))
    return path


@pytest.fixture
def decoded(monkeypatch) -> list:
    """Every image file decoded from here on, in order (a dataset reader's laziness, counted)."""
    import streams.image_files

    files = []
    real = streams.image_files.decode_image
    monkeypatch.setattr(streams.image_files, "decode_image", lambda *a: files.append(a[0]) or real(*a))
    return files


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
