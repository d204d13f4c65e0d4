"""The lab on a GPU, unchanged: one short stream per model family, data and memories on the device.

Skipped where CUDA is not available."""
import pytest
import torch

from cl.models import MLP, ByteGPT, ReducedResNet18
from cl.config.models import build_model
from conftest import trainer_for
from strategies import Replay, Strategy
from streams import class_incremental, digits, token_stream
from streams.experience import BatchTransform, Dataset, TensorData

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class WhereIsEverything(Strategy):
    """Records the devices of what the trainer hands over."""

    def __init__(self):
        self.devices = set()

    def after_step(self, ctx, batch):
        self.devices |= {batch.x.device.type, batch.y.device.type, batch.logits.device.type,
                         batch.x_raw.device.type}


def images(shape, n_classes=4, n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (n,) + shape, dtype=torch.uint8, generator=g)
    y = torch.arange(n) % n_classes
    data = TensorData(x, y)
    return Dataset("random", data, data, BatchTransform([0.5] * shape[0], [0.25] * shape[0], crop_padding=2,
                                                        flip=True))


@pytest.mark.parametrize("family", ["mlp", "reduced_resnet18", "timm"])
def test_image_models_train_on_the_gpu(family):
    if family == "mlp":
        stream = class_incremental(digits(), n_experiences=2)
        model = MLP(stream.input_shape, stream.n_classes, hidden=(32,))
    else:
        stream = class_incremental(images((3, 32, 32)), n_experiences=2)
        model = (ReducedResNet18(stream.input_shape, stream.n_classes) if family == "reduced_resnet18"
                 else build_model("test_vit", stream.input_shape, stream.n_classes, img_size=32))
    replay, probe = Replay(32, 8, "reservoir"), WhereIsEverything()
    trainer = trainer_for(stream, [replay, probe], batch_size=16, model=model, lr=0.01, momentum=0, device="cuda",
                          eval_every=3)
    record = trainer.fit(stream)
    assert probe.devices == {"cuda"}  # the training data was moved to the device once
    assert replay.buffer.device.type == "cuda" and replay.buffer.x.device.type == "cuda"
    assert torch.isfinite(torch.tensor(record.accuracy_matrix)).all()


def test_language_model_trains_on_the_gpu(two_texts):
    stream = token_stream(["abc", "xyz"], block_size=16, stride=8, data_dir=str(two_texts))
    model = ByteGPT(stream.input_shape, stream.n_classes, n_layer=1, d_model=32)
    replay = Replay(16, 4, "reservoir")
    record = trainer_for(stream, [replay], batch_size=8, model=model,
                         optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3), device="cuda").fit(stream)
    assert replay.buffer.device.type == "cuda"
    assert record.matrices["loss"][-1].max() < record.matrices["loss"][0].min()


@pytest.mark.parametrize("on_device", [True, False])
def test_data_on_device_decides_where_the_batches_are_gathered(on_device):
    """`training.data_on_device`: true holds the experience on the GPU (x_raw arrives there);
    false leaves it in pinned host memory, each batch copied without blocking."""
    from cl.training.scoring import place_data

    stream = class_incremental(digits(), n_experiences=2)
    placed = place_data(stream.experiences[0].train, torch.device("cuda"), on_device)
    assert placed.x.is_cuda == on_device and (on_device or placed.x.is_pinned())

    class RawWhere(Strategy):
        def after_step(self, ctx, batch):
            self.raw, self.ready = batch.x_raw.device.type, batch.x.device.type

    probe = RawWhere()
    model = MLP(stream.input_shape, stream.n_classes, hidden=(32,))
    trainer_for(stream, [probe], batch_size=16, model=model, device="cuda", data_on_device=on_device).fit(stream)
    assert probe.ready == "cuda" and probe.raw == ("cuda" if on_device else "cpu")
