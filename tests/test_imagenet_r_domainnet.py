"""ImageNet-R, ImageNet-A and DomainNet read from the layouts they are distributed in: each test
writes a miniature of the real layout (a few class folders of tiny JPEGs, DomainNet's official
list files) and reads it the way a run does."""
import numpy as np
import pytest
import torch
from PIL import Image

from streams import class_incremental
from streams.domainnet import domainnet, domainnet_domains
from streams.imagenet_r import imagenet_a, imagenet_r
from streams.sources import DatasetNotFoundError
from streams.validation import DataError

WNIDS = ["n01443537", "n01484850", "n01494475", "n01498041"]  # sorted: class k is WNIDS[k]


def jpeg(path, colour, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(path, "JPEG")


def write_renditions(root, folder="imagenet-r", per_class=5):
    """<folder>/README.txt and <folder>/<wnid>/<style>_<k>.jpg, class k's images of grey 50k + 20."""
    base = root / folder
    for k, w in enumerate(reversed(WNIDS)):  # written out of order: the reader sorts
        c = WNIDS.index(w)
        for i in range(per_class):
            jpeg(base / w / f"{['art', 'sketch', 'toy'][i % 3]}_{i}.jpg", 50 * c + 20)
    (base / "README.txt").write_text("ImageNet-R\nheader line\n\n" + "".join(
        f"{w} class_{k}\n" for k, w in enumerate(WNIDS)))
    return base


def members(data):
    return sorted(data.dataset.paths)


# ---- ImageNet-R / ImageNet-A -------------------------------------------------------------------

def test_imagenet_r_builds_without_decoding_and_reads_the_labels_of_the_pixels(tmp_path, decoded):
    write_renditions(tmp_path)
    data = imagenet_r(data_dir=str(tmp_path), size=16, num_workers=0)
    stream = class_incremental(data, n_experiences=2)
    assert not decoded  # dataset, split, labels, class split: no image read
    assert data.n_classes == 4 and data.input_shape == (3, 16, 16)
    assert data.class_names == ["class 0", "class 1", "class 2", "class 3"]  # README.txt's names, sorted wnids
    assert len(data.train) == 16 and len(data.test) == 4  # random:0.8 of 20: int(16) train
    x, y, _ = next(stream.experiences[1].train.batches(64, shuffle=False))
    assert len(decoded) == len(y) == int(((data.train.y == 2) | (data.train.y == 3)).sum())
    for c in (2, 3):  # each image's label is the class folder it came from
        assert (x[y == c].float().mean() - (50 * c + 20)).abs() < 3


def test_random_split_is_disjoint_complete_seeded_and_the_cut_of_random_split(tmp_path):
    base = write_renditions(tmp_path)
    a = imagenet_r(data_dir=str(tmp_path), split="random:0.8", seed=42, size=8, num_workers=0)
    b = imagenet_r(data_dir=str(tmp_path), split="random:0.8", seed=42, size=8, num_workers=0)
    c = imagenet_r(data_dir=str(tmp_path), split="random:0.8", seed=7, size=8, num_workers=0)
    assert members(a.train) == members(b.train) and members(a.test) == members(b.test)
    assert members(a.test) != members(c.test)
    everything = sorted(str(p) for w in WNIDS for p in (base / w).iterdir())
    assert not set(members(a.train)) & set(members(a.test))
    assert sorted(members(a.train) + members(a.test)) == everything
    # The membership torch.utils.data.random_split gives over ImageFolder's order (sorted
    # classes, sorted names) with a generator seeded 42: dualprompt-pytorch's draw.
    order = [str(p) for w in WNIDS for p in sorted((base / w).iterdir(), key=lambda p: p.name)]
    train, test = torch.utils.data.random_split(order, [16, 4], generator=torch.Generator().manual_seed(42))
    assert sorted(train) == members(a.train) and sorted(test) == members(a.test)
    # Labels still follow the folders.
    for path, y in zip(a.test.dataset.paths, a.test.y.tolist()):
        assert WNIDS[y] in path


def test_stratified_split_draws_the_fraction_in_every_class(tmp_path):
    write_renditions(tmp_path)
    data = imagenet_r(data_dir=str(tmp_path), split="stratified:0.6", seed=1, size=8, num_workers=0)
    assert torch.bincount(data.train.y).tolist() == [3] * 4 and torch.bincount(data.test.y).tolist() == [2] * 4
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        imagenet_r(data_dir=str(tmp_path), split="random:1.5")
    with pytest.raises(ValueError, match="'folders', 'lists'"):
        imagenet_r(data_dir=str(tmp_path), split="dualprompt")


def test_folder_split_is_followed_exactly(tmp_path, decoded):
    base = tmp_path / "imagenet-a"
    expected = {"train": [], "test": []}
    for c, w in enumerate(WNIDS[:3]):
        for split, n in (("train", 3 + c), ("test", 1 + c)):  # uneven, as ImageNet-A is
            for i in range(n):
                jpeg(base / split / w / f"{i}.jpg", 60 * c)
                expected[split].append(str(base / split / w / f"{i}.jpg"))
    data = imagenet_a(data_dir=str(tmp_path), split="folders", size=8, num_workers=0)
    assert not decoded and data.name == "imagenet_a" and data.n_classes == 3
    assert members(data.train) == sorted(expected["train"]) and members(data.test) == sorted(expected["test"])
    assert torch.bincount(data.train.y).tolist() == [3, 4, 5] and torch.bincount(data.test.y).tolist() == [1, 2, 3]
    assert data.class_names == WNIDS[:3]  # no README.txt: the wnids
    x, y, _ = next(data.test.batches(2, shuffle=False))
    assert len(decoded) == 2 and y.tolist() == [0, 1] and x[0].float().mean() < x[1].float().mean()
    with pytest.raises(DataError, match="split: folders"):  # pre-split copy read as a flat one
        imagenet_a(data_dir=str(tmp_path), split="random:0.8")
    (base / "test").rename(base / "val")  # SLCA's name for the held-out folder
    assert members(imagenet_a(data_dir=str(tmp_path), split="folders", size=8).test) == \
        sorted(p.replace("/test/", "/val/") for p in expected["test"])
    (base / "val" / WNIDS[0]).rename(base / "val" / "n09999999")
    with pytest.raises(DataError, match="different classes"):
        imagenet_a(data_dir=str(tmp_path), split="folders")


def write_coda_lists(base, train, test, targets):
    """CODA-Prompt's YAML: `data:` then `- data/imagenet-r/<wnid>/<file>`, `targets:` then ints."""
    for name, rows in (("imagenet-r_train.yaml", train), ("imagenet-r_test.yaml", test)):
        text = "data:\n" + "".join(f"- data/imagenet-r/{p}\n" for p in rows)
        text += "targets:\n" + "".join(f"- {targets[p.split('/')[0]]}\n" for p in rows)
        (base / name).write_text(text)


def test_coda_prompt_lists_are_followed_exactly(tmp_path, decoded):
    base = write_renditions(tmp_path)
    files = sorted(f"{w}/{p.name}" for w in WNIDS for p in (base / w).iterdir())
    train, test = files[1::2] + files[:2], files[2::2]  # any membership the lists give
    scrambled = {w: t for w, t in zip(WNIDS, [3, 0, 2, 1])}  # CODA numbers classes its own way
    write_coda_lists(base, train, test, scrambled)
    data = imagenet_r(data_dir=str(tmp_path), split="coda-prompt", size=8, num_workers=0)
    assert not decoded
    assert data.train.dataset.paths == [str(base / p) for p in train]  # the list's order, exactly
    assert data.test.dataset.paths == [str(base / p) for p in test]
    assert data.train.y.tolist() == [WNIDS.index(p.split("/")[0]) for p in train]  # sorted-wnid numbering
    same = imagenet_r(data_dir=str(tmp_path), split="lists", lists=["imagenet-r_train.yaml", "imagenet-r_test.yaml"],
                      size=8, num_workers=0)
    assert same.test.dataset.paths == data.test.dataset.paths
    # Plain text lists, one `<wnid>/<file>` a line.
    (base / "tr.txt").write_text("\n".join(train) + "\n")
    (base / "te.txt").write_text("\n".join(test) + "\n")
    text = imagenet_r(data_dir=str(tmp_path), split="lists", lists=["tr.txt", "te.txt"], size=8, num_workers=0)
    assert text.train.dataset.paths == data.train.dataset.paths
    # Targets that disagree with the folders are refused.
    write_coda_lists(base, train, test, {w: 0 for w in WNIDS})
    with pytest.raises(DataError, match="imagenet-r_train.yaml line 4: target 0"):
        imagenet_r(data_dir=str(tmp_path), split="coda-prompt")


@pytest.mark.parametrize("line", ["../imagenet-a/n01443537/x.jpg", "/etc/n01443537/passwd", "n01443537/../../x.jpg",
                                  "C:/n01443537/x.jpg"])
def test_list_lines_never_reach_outside_the_dataset_folder(tmp_path, line):
    base = write_renditions(tmp_path)
    (base / "tr.txt").write_text(f"{WNIDS[0]}/art_0.jpg\n{line}\n")
    (base / "te.txt").write_text(f"{WNIDS[1]}/art_0.jpg\n")
    with pytest.raises(DataError, match=r"tr.txt line 2 .*outside the dataset folder"):
        imagenet_r(data_dir=str(tmp_path), split="lists", lists=["tr.txt", "te.txt"])


def test_missing_renditions_name_the_layout_and_the_download(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"imagenet-r/<wnid>/\*.jpg.*imagenet-r.tar"):
        imagenet_r(data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="imagenet-a.tar"):
        imagenet_a(data_dir=str(tmp_path))
    write_renditions(tmp_path)
    with pytest.raises(DataError, match="imagenet-r_train.yaml is missing"):
        imagenet_r(data_dir=str(tmp_path), split="coda-prompt")
    with pytest.raises(DataError, match="no train/ and test/"):
        imagenet_r(data_dir=str(tmp_path), split="folders")


# ---- DomainNet ---------------------------------------------------------------------------------

CLASSES = ["aircraft_carrier", "airplane", "alarm_clock"]
SHADE = {"clipart": 0, "painting": 100, "real": 200}


def write_domainnet(root, domains=("clipart", "painting", "real"), train=2, test=1, folder="domainnet"):
    """<domain>/<class>/<domain>_<class k>_<i>.jpg, and the official lists in a shuffled order.
    Grey level: the domain's shade plus 20 * class."""
    base = root / folder
    g = np.random.default_rng(0)
    lists = {}
    for d in domains:
        for split, n in (("train", train), ("test", test)):
            lines = []
            for k, name in enumerate(CLASSES):
                for i in range(n):
                    relative = f"{d}/{name}/{d}_{k:03d}_{split}{i}.jpg"
                    jpeg(base / relative, SHADE[d] + 20 * k)
                    lines.append(f"{relative} {k}")
            lines = [lines[i] for i in g.permutation(len(lines))]
            (base / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
            lists[d, split] = lines
    return base, lists


def listed(base, lines):
    return [str(base / line.split()[0]) for line in lines], [int(line.split()[1]) for line in lines]


def test_domainnet_mixes_the_chosen_domains_following_the_lists_exactly(tmp_path, decoded):
    base, lists = write_domainnet(tmp_path)
    data = domainnet(domains=["real", "clipart"], data_dir=str(tmp_path), size=8, num_workers=0)
    assert not decoded and data.n_classes == 3 and data.input_shape == (3, 8, 8)
    assert data.class_names == ["aircraft carrier", "airplane", "alarm clock"]
    files, labels = listed(base, lists["real", "train"] + lists["clipart", "train"])
    assert data.train.dataset.paths == files and data.train.y.tolist() == labels
    files, labels = listed(base, lists["real", "test"] + lists["clipart", "test"])
    assert data.test.dataset.paths == files and data.test.y.tolist() == labels
    stream = class_incremental(data, n_experiences=3)
    x, y, _ = next(stream.experiences[1].test.batches(8, shuffle=False))
    assert len(decoded) == len(y) == 2 and y.tolist() == [1, 1]
    assert sorted(x.float().mean((1, 2, 3)).round().tolist()) == pytest.approx([20, 220], abs=3)  # clipart, real
    one = domainnet(domains="painting", data_dir=str(tmp_path), size=8, num_workers=0)
    assert one.name == "domainnet-painting" and len(one.train) == 6 and len(one.test) == 3


def test_domainnet_domains_is_one_experience_per_domain_with_every_class(tmp_path, decoded):
    base, lists = write_domainnet(tmp_path, folder="DomainNet")  # CODA-Prompt's and RanPAC's spelling
    stream = domainnet_domains(domains=["painting", "clipart", "real"], data_dir=str(tmp_path), size=8, num_workers=0)
    assert not decoded
    assert len(stream) == 3 and stream.n_tasks == 3 and stream.n_classes == 3 and stream.input_shape == (3, 8, 8)
    assert not stream.class_incremental and stream.one_experience_per_task
    assert stream.schedule["domains"] == ["painting", "clipart", "real"]
    for i, d in enumerate(["painting", "clipart", "real"]):
        e = stream.experiences[i]
        assert e.classes == [0, 1, 2] and e.task_label == 0 and e.task_index == i
        files, labels = listed(base, lists[d, "train"])
        assert e.train.dataset.paths == files and e.train.y.tolist() == labels
        files, labels = listed(base, lists[d, "test"])
        assert stream.test_sets[i].dataset.paths == files and stream.test_sets[i].y.tolist() == labels
        assert stream.task_classes[i] == [0, 1, 2]
    x, y, t = next(stream.test_sets[2].batches(8, shuffle=False))
    assert len(decoded) == 3 and sorted(y.tolist()) == [0, 1, 2] and t.tolist() == [0, 0, 0]
    assert ((x.float().mean((1, 2, 3)) - (200 + 20 * y)).abs() < 3).all()  # real's images, their own classes
    aware = domainnet_domains(domains=["clipart", "real"], data_dir=str(tmp_path), size=8, task_labels=True)
    assert [e.task_label for e in aware] == [0, 1] and aware.test_sets[1].t.tolist() == [1, 1, 1]


@pytest.mark.parametrize("line, match", [
    ("../painting/aircraft_carrier/x.jpg 0", "outside the dataset folder"),
    ("/etc/passwd 0", "outside the dataset folder"),
    ("clipart/airplane/../../../x.jpg 1", "outside the dataset folder"),
    ("real/airplane/real_001_train0.jpg 1", "is not `clipart/<class>/<file> <label>`"),  # another domain's image
    ("clipart/airplane/x.jpg", "is not `clipart/<class>/<file> <label>`"),  # no label
    ("clipart/airplane/x.jpg one", "not a non-negative integer"),
    ("clipart/airplane/x.jpg 2", "gives label 2 to 'airplane'"),  # disagrees with the other lines
])
def test_hostile_or_malformed_list_lines_are_refused_with_file_and_line(tmp_path, line, match):
    base, lists = write_domainnet(tmp_path)
    (base / "clipart_train.txt").write_text("\n".join(lists["clipart", "train"][:2] + [line]) + "\n")
    with pytest.raises(DataError, match=match) as err:
        domainnet(domains=["clipart"], data_dir=str(tmp_path))
    assert "clipart_train.txt line 3" in str(err.value)


def test_missing_domainnet_names_the_layout_and_the_download(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"domainnet/<domain>_train.txt.*ai.bu.edu/M3SDA"):
        domainnet(data_dir=str(tmp_path))
    base, _ = write_domainnet(tmp_path, domains=("clipart",))
    with pytest.raises(DataError, match="real_train.txt is missing"):
        domainnet_domains(domains=["clipart", "real"], data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="distinct names among"):
        domainnet(domains=["clipart", "photos"], data_dir=str(tmp_path))
