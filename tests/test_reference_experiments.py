"""experiments/reference/: one file per published protocol (issue 27). Each header names the
paper, its table and number, where the number was read and what the run needs; REFERENCE.md
lists every run beside its published figure; and `cl describe` builds every file's stream
from a miniature of each dataset in its real on-disk layout, at its full class count."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cl.cli.main import main
from test_standard_datasets import write_cifar100, write_tiny_imagenet

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments" / "reference").glob("*.yaml"))
FIELDS = ("Reference", "Paper", "Table", "Published", "Source", "Needs", "Differs")


def header(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(": ")
        if sep and key in FIELDS + ("Reduced",):
            fields[key] = value
    return fields


def published(path: Path) -> dict[str, str]:
    """Run label -> the published figure, from `# Published: label value; label value`."""
    return dict(part.strip().split(" ", 1) for part in header(path)["Published"].split(";"))


def test_there_is_a_file_for_each_protocol_the_issue_names():
    names = {p.stem for p in FILES}
    assert {"xder_split_cifar100", "xder_split_cifar100_er", "xder_split_cifar100_icarl"} <= names  # ER, DER++, iCaRL
    for method in ("l2p", "dualprompt", "coda", "slca", "apg", "ovor"):  # on CIFAR-100 and ImageNet-R
        assert any(n.startswith(method) and "cifar100" in n for n in names), method
    assert {"coda_imagenet_r", "slca_imagenet_r", "apg_imagenet_r", "ovor_imagenet_r"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_header_names_paper_table_number_source_and_needs(path):
    fields = header(path)
    assert set(FIELDS) <= set(fields), f"{path.name} lacks {set(FIELDS) - set(fields)}"
    assert re.search(r"(19|20)\d\d", fields["Paper"]) and "table" in fields["Table"].lower()
    runs = yaml.safe_load(path.read_text())["runs"]
    figures = published(path)
    assert set(figures) <= set(runs) and figures, "every published figure names a run of the file"
    for figure in figures.values():
        assert re.match(r"\d+\.\d\d\b", figure), figure
    assert "GPU" in fields["Needs"]


def test_reference_md_lists_every_run_with_its_published_figure():
    table = (ROOT / "experiments" / "REFERENCE.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `") and ".yaml` |" in line]
    for path in FILES:
        for run, figure in published(path).items():
            value = figure.split()[0]
            assert any(f"`{path.name}`" in row and f"`{run}`" in row and value in row for row in rows), \
                f"REFERENCE.md has no row for {path.name} {run} {value}"
    assert len(rows) == sum(len(published(p)) for p in FILES)


# ---- miniatures of every dataset the files read, at full class count ---------------------------

def tiny_jpeg(path: Path, shade: int, edge: int = 4, fmt: str = "JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((edge, edge, 3), shade % 256, dtype=np.uint8)).save(path, fmt)


WNIDS = [f"n{1440000 + 37 * k:08d}" for k in range(200)]


def write_cifar10_pack(root: Path):
    import io

    def blob(n):
        parts = []
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 20 * (i % 10), dtype=np.uint8)).save(buffer, "JPEG")
            parts.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return np.concatenate(parts), offsets, (np.arange(n) % 10).astype(np.uint8)

    (root / "cifar10-jpeg").mkdir(parents=True)
    tj, to, ty = blob(20)
    ej, eo, ey = blob(10)
    np.savez(root / "cifar10-jpeg" / "cifar10_jpeg.npz", train_jpeg=tj, train_off=to, train_y=ty, test_jpeg=ej,
             test_off=eo, test_y=ey, classes=np.array([f"c{i}" for i in range(10)]))


def write_renditions(root: Path, per_class: int = 5):
    base = root / "imagenet-r"
    files = []
    for c, w in enumerate(WNIDS):
        for i in range(per_class):
            tiny_jpeg(base / w / f"art_{i}.jpg", c)
            files.append(f"{w}/art_{i}.jpg")
    for name, rows in (("imagenet-r_train.yaml", [f for f in files if not f.endswith("_0.jpg")]),
                       ("imagenet-r_test.yaml", [f for f in files if f.endswith("_0.jpg")])):
        text = "data:\n" + "".join(f"- data/imagenet-r/{p}\n" for p in rows)
        text += "targets:\n" + "".join(f"- {WNIDS.index(p.split('/')[0])}\n" for p in rows)
        (base / name).write_text(text)


def write_presplit_renditions(root: Path):
    for c, w in enumerate(WNIDS):
        tiny_jpeg(root / "imagenet-r" / "train" / w / "a.jpg", c)
        tiny_jpeg(root / "imagenet-r" / "val" / w / "b.jpg", c)


def write_cub(root: Path, classes: int = 200):
    base = root / "CUB_200_2011"
    images, labels, split = [], [], []
    for c in range(1, classes + 1):
        for i in range(2):
            k = 2 * c - 1 + i
            relative = f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
            tiny_jpeg(base / "images" / relative, c)
            images.append(f"{k} {relative}")
            labels.append(f"{k} {c}")
            split.append(f"{k} {1 - i}")
    for name, lines in (("images", images), ("image_class_labels", labels), ("train_test_split", split),
                        ("classes", [f"{c} {c:03d}.Bird_{c}" for c in range(1, classes + 1)])):
        (base / f"{name}.txt").write_text("\n".join(lines) + "\n")


def write_core50(root: Path):
    for s in range(1, 12):
        for o in range(1, 51):
            tiny_jpeg(root / "core50" / "core50_128x128" / f"s{s}" / f"o{o}" / f"C_{s:02d}_{o:02d}_000.png", o, fmt="PNG")


def write_domainnet(root: Path, domains=("clipart", "infograph", "painting", "real", "sketch")):
    base = root / "domainnet"
    for d in domains:
        for split in ("train", "test"):
            lines = []
            for k in range(345):
                relative = f"{d}/class_{k:03d}/{d}_{k:03d}_{split}.jpg"
                tiny_jpeg(base / relative, k)
                lines.append(f"{relative} {k}")
            (base / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    """Two data roots: every dataset in its distributed layout, and ImageNet-R as the pre-split
    copy SLCA reads (train/ and val/ folders), which cannot sit beside the flat one."""
    flat = tmp_path_factory.mktemp("data")
    write_cifar10_pack(flat)
    write_cifar100(flat, per_class=1, test_per_class=1)
    write_tiny_imagenet(flat, wnids=WNIDS, train=1, val=1)
    write_cub(flat)
    write_renditions(flat)
    write_core50(flat)
    write_domainnet(flat)
    presplit = tmp_path_factory.mktemp("presplit")
    write_presplit_renditions(presplit)
    return {"flat": flat, "presplit": presplit}


def expected_experiences(cfg: dict) -> int:
    scenario = cfg["stream"]["scenario"]
    if scenario["name"] == "core50":
        return {"ni": 8, "nc": 9}[scenario["protocol"]]
    return scenario["n_experiences"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_cl_describe_builds_every_reference_stream_from_its_real_layout(path, data_roots, capsys):
    cfg = yaml.safe_load(path.read_text())
    presplit = cfg["stream"].get("dataset", {}).get("split") == "folders"
    root = data_roots["presplit" if presplit else "flat"]
    assert main(["describe", str(path), "--json", "--set", f"data_dir={root}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_experiences"] == expected_experiences(cfg)
    classes = {"cifar10": 10, "cifar100": 100, "tiny_imagenet": 200, "imagenet_r": 200, "cub200": 200,
               "domainnet": 345}
    dataset = cfg["stream"].get("dataset", {}).get("name", "core50")
    assert info["n_classes"] == classes.get(dataset, 50)
    if cfg["stream"].get("preprocessing") in ("model", "model_size"):
        assert info["input_shape"] == [3, 224, 224] and info["preprocessing"]["size"] == 224
