"""`stream.preprocessing: model`: the image size and normalisation come from the timm
pretrained config of the model a run fine-tunes (issue 27), read without its weights."""
import pytest
import torch

from cl import api
from cl.config.components import build_stream
from cl.config.errors import ConfigError
from streams.experience import BatchTransform
from test_standard_datasets import write_tiny_imagenet

VIT = {"name": "vit_tiny_patch16_224.augreg_in21k", "depth": 1}


def experiment(model, **stream):
    return {"name": "prep", "stream": {"dataset": {"name": "digits"},
                                       "scenario": {"name": "class_incremental", "n_experiences": 5}, **stream},
            "model": model, "training": {"epochs": 1, "batch_size": 64}, "runs": {"naive": ["naive"]}}


def test_the_batch_transform_resizes_then_normalises_by_hand_worked_values():
    t = BatchTransform([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], size=6)
    x = torch.full((2, 1, 3, 3), 255, dtype=torch.uint8)
    x[1] = 0
    out = t(x)
    # Grey repeated over the three channels, 3 -> 6 pixels a side; (1 - 0.5) / 0.25 = 2, (0 - 0.5) / 0.25 = -2.
    assert out.shape == (2, 3, 6, 6)
    assert torch.allclose(out[0], torch.full((3, 6, 6), 2.0)) and torch.allclose(out[1], torch.full((3, 6, 6), -2.0))
    # A left-to-right ramp stays one after a bicubic resize: the resize is of the image, not noise.
    ramp = torch.arange(4, dtype=torch.uint8).mul(60).expand(1, 3, 4, 4).contiguous()
    row = BatchTransform(size=8, interpolation="bicubic")(ramp)[0, 0, 0]
    assert torch.all(row[1:] >= row[:-1]) and row[0] < 0.1 and row[-1] > 0.6
    assert BatchTransform(size=3)(x).shape == (2, 1, 3, 3)  # already that size: untouched


def test_the_model_s_pretrained_config_sets_size_and_normalisation():
    stream = build_stream(api.load(experiment(VIT, preprocessing="model")))
    assert stream.input_shape == (3, 224, 224)
    prep = stream.describe()["preprocessing"]
    assert prep["mean"] == pytest.approx([0.5] * 3) and prep["std"] == pytest.approx([0.5] * 3) and prep["size"] == 224
    x, _, _ = next(stream.experiences[0].train.batches(4, shuffle=False))
    assert stream.transform(x).shape == (4, 3, 224, 224)
    # The model's own img_size wins over the config's 224; a ResNet's config brings ImageNet's statistics.
    small = build_stream(api.load(experiment({**VIT, "img_size": 32}, preprocessing="model")))
    assert small.input_shape == (3, 32, 32)
    resnet = build_stream(api.load(experiment({"name": "resnet18"}, preprocessing="model")))
    assert resnet.describe()["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # model_size: the model's size, the dataset's own normalisation (SLCA and PyCIL keep ImageNet's or
    # CIFAR's statistics in front of a ViT); digits stays grey.
    sized = build_stream(api.load(experiment(VIT, preprocessing="model_size")))
    own = build_stream(api.load(experiment(VIT))).describe()["preprocessing"]
    assert sized.input_shape == (1, 224, 224)
    assert sized.describe()["preprocessing"] == {**own, "size": 224, "interpolation": "bicubic"}
    # Without the option the dataset's own transform stays.
    assert build_stream(api.load(experiment(VIT))).input_shape == (1, 8, 8)


def test_a_lazy_dataset_is_decoded_at_the_model_s_size(tmp_path, decoded):
    write_tiny_imagenet(tmp_path)
    cfg = experiment({**VIT, "img_size": 32}, preprocessing="model")
    cfg["stream"]["dataset"] = {"name": "tiny_imagenet", "num_workers": 0}
    cfg["stream"]["scenario"]["n_experiences"] = 2
    cfg["data_dir"] = str(tmp_path)
    stream = build_stream(api.load(cfg))
    assert not decoded and stream.input_shape == (3, 32, 32)
    x, _, _ = next(stream.experiences[0].train.batches(2, shuffle=False))
    assert x.shape == (2, 3, 32, 32) and len(decoded) == 2  # decoded at 32, not at 64 and then resized


def test_a_run_trains_a_vit_at_its_pretrained_input():
    cfg = experiment({**VIT, "img_size": 16, "patch_size": 8, "embed_dim": 24, "num_heads": 2},
                     preprocessing="model")
    cfg["stream"]["first_experiences"] = 2
    [result] = api.run(cfg)
    assert result["status"] == "FINISHED" and 0.0 <= result["acc"] <= 1.0


def test_a_model_without_a_pretrained_config_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="'mlp' has none"):
        build_stream(api.load(experiment({"name": "mlp"}, preprocessing="model")))
    with pytest.raises(Exception, match="preprocessing"):
        api.load(experiment(VIT, preprocessing="imagenet"))
