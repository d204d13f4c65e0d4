"""Models: shapes, the feature API, timm names and local weights files."""
import pytest
import torch

from cl.models import MLP, ReducedResNet18
from cl.config.models import build_model


def test_mlp_shapes_and_feature_api():
    model = build_model("mlp", (1, 28, 28), 10, hidden=[400, 400])
    x = torch.randn(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    assert torch.allclose(model.forward_head(model.forward_features(x)), model(x))
    # 784-400-400-10, the reference workload's network.
    assert sum(p.numel() for p in model.parameters()) == 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10


def test_reduced_resnet18_is_the_gem_size():
    model = ReducedResNet18((3, 32, 32), 10)
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e6 < n < 1.2e6  # GEM's reduced ResNet-18 (nf=20) has about 1.1M parameters
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    # timm's meaning of the feature API: unpooled features, then pooled pre-logits.
    assert model.forward_features(x).shape == (2, 160, 4, 4)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 160)


def test_module_class_path_and_timm_name():
    m = build_model("cl.models:MLP", (1, 8, 8), 4, hidden=[16])
    assert isinstance(m, MLP) and m(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    t = build_model("test_resnet", (3, 32, 32), 7)
    assert t(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_timm_local_weights_file_loads_all_but_the_head(tmp_path):
    source = build_model("test_resnet", (3, 32, 32), 1000)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    model = build_model("test_resnet", (3, 32, 32), 5, weights=str(path))
    src, dst = source.state_dict(), model.state_dict()
    head = {n for n in dst if n.startswith(model.default_cfg.get("classifier", "fc"))}
    assert head and all(torch.equal(src[k], dst[k]) for k in dst if k not in head)
    assert model.get_classifier().out_features == 5


def test_bad_model_inputs(tmp_path):
    with pytest.raises(ValueError, match="neither a lab model"):
        build_model("no_such_net", (3, 32, 32), 10)
    with pytest.raises(FileNotFoundError, match="weights file"):
        build_model("test_resnet", (3, 32, 32), 10, weights=str(tmp_path / "none.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable torch state dict"):
        build_model("test_resnet", (3, 32, 32), 10, weights=str(corrupt))
