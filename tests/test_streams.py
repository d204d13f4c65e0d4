"""Sources and the class-incremental scenario."""
import pytest
import torch

from streams import BatchTransform, DatasetNotFoundError, class_incremental, cifar10, digits, mnist
from streams.experience import reshape_images


def test_digits_is_uint8_images_with_fixed_split():
    data = digits()
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape[1:] == (1, 8, 8)
    assert len(data.train) + len(data.test) == 1797
    assert data.n_classes == 10
    assert torch.equal(digits().test.y, data.test.y)  # the split does not move between runs


def test_class_incremental_partitions_classes_and_samples():
    data = digits()
    stream = class_incremental(data, n_experiences=5)
    assert [e.classes for e in stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sum(e.n_train for e in stream) == len(data.train)
    assert sum(e.n_test for e in stream) == len(data.test)
    for e in stream:
        assert set(e.train.y.tolist()) == set(e.classes) == set(e.test.y.tolist())
        assert e.task_label == 0


def test_shuffled_class_order_is_fixed_by_seed():
    data = digits()
    a = class_incremental(data, classes_per_experience=2, shuffle_classes=True, seed=1)
    b = class_incremental(data, classes_per_experience=2, shuffle_classes=True, seed=1)
    c = class_incremental(data, classes_per_experience=2, shuffle_classes=True, seed=2)
    assert a.class_order == b.class_order != c.class_order
    assert sorted(a.class_order) == list(range(10))
    assert a[0].classes == sorted(a.class_order[:2])


def test_given_class_order_and_task_labels():
    stream = class_incremental(digits(), n_experiences=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], task_labels=True)
    assert stream[0].classes == [5, 6, 7, 8, 9]
    assert [e.task_label for e in stream] == [0, 1]
    assert stream[1].train.t.unique().tolist() == [1]


def test_uneven_experience_sizes():
    stream = class_incremental(digits(), classes_per_experience=[4, 3, 3])
    assert [len(e.classes) for e in stream] == [4, 3, 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"n_experiences": 3}, "do not split evenly"),
    ({"n_experiences": 5, "classes_per_experience": 2}, "exactly one"),
    ({"n_experiences": 5, "class_order": [0, 1, 2]}, "permutation"),
    ({"classes_per_experience": [5, 4]}, "add up"),
])
def test_bad_split_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        class_incremental(digits(), **kwargs)


def test_batch_transform_normalises_and_augments_whole_batches():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    t = BatchTransform(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    expected = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    assert torch.allclose(t(x), expected, atol=1e-5)
    aug = BatchTransform(mean=[0.0] * 3, std=[1.0] * 3, crop_padding=4, flip=True)
    out = aug(x, train=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32)
    assert not torch.allclose(out, x.float() / 255)  # something moved
    assert torch.allclose(aug(x), x.float() / 255)  # but evaluation is never augmented


def test_missing_mnist_names_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        mnist(data_dir=str(tmp_path), download=False)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value) and "CL_DATA_DIR" in str(err.value)


def test_missing_cifar_names_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        cifar10(data_dir=str(tmp_path), download=False)
    assert "cifar10_jpeg.npz" in str(err.value) and "cifar-10-batches-py" in str(err.value)


def test_real_mnist_split(mnist_root):
    data = mnist(data_dir=str(mnist_root), download=False)
    assert len(data.train) == 60_000 and len(data.test) == 10_000
    assert data.train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    stream = class_incremental(data, n_experiences=5, class_order=list(range(10)))
    assert [e.n_train for e in stream] == [12665, 12089, 11263, 12183, 11800]
    assert [e.n_test for e in stream] == [2115, 2042, 1874, 1986, 1983]


def test_reshape_images_repeats_grey_and_resizes():
    grey = torch.tensor([[[[0, 255], [100, 50]]]], dtype=torch.uint8)
    rgb = reshape_images(grey, size=2, channels=3)
    assert rgb.shape == (1, 3, 2, 2) and all(torch.equal(rgb[0, c], grey[0, 0]) for c in range(3))
    flat = torch.full((2, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(reshape_images(flat, size=32, channels=1), torch.full((2, 1, 32, 32), 77, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 channels to 2"):
        reshape_images(torch.zeros((1, 3, 4, 4), dtype=torch.uint8), size=4, channels=2)


def test_mnist_for_a_colour_backbone(mnist_root):
    plain = mnist(data_dir=str(mnist_root), download=False)
    data = mnist(data_dir=str(mnist_root), download=False, size=32, channels=3)
    assert data.train.x.shape == (60_000, 3, 32, 32) and data.test.x.shape == (10_000, 3, 32, 32)
    assert torch.equal(data.train.y, plain.train.y) and torch.equal(data.train.x[:, 0], data.train.x[:, 2])
    # Bilinear resizing keeps the ink where it was: the mean intensity barely moves.
    assert abs(data.train.x[:2000].float().mean() - plain.train.x[:2000].float().mean()) < 1.0
    x = data.transform(data.train.x[:2000])
    assert x.shape[1] == 3 and abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.1
    with pytest.raises(ValueError, match="size and channels"):
        mnist(data_dir=str(mnist_root), download=False, channels=0)


def test_real_cifar10_jpeg_pack(cifar_root):
    data = cifar10(data_dir=str(cifar_root), download=False)
    assert data.train.x.shape == (50_000, 3, 32, 32) and data.test.x.shape == (10_000, 3, 32, 32)
    assert torch.bincount(data.train.y).tolist() == [5000] * 10
    # Real photographs: far from constant, roughly the published channel means.
    means = data.train.x[:5000].float().mean(dim=(0, 2, 3)) / 255
    assert means.min() > 0.3 and means.max() < 0.6
