"""`cl pretrain`, weights files (safetensors and torch), and the frozen-feature cache: a
frozen backbone's features computed once per invocation and kept on disk."""
import copy
import json
import os
import signal
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import cl.runner.invocation
import cl.runner.one_run
from cl.cli.main import main
from cl.config.components import build_model_from
from cl.config.files import experiment_from_dict, load_experiment
from cl.training.feature_cache import FeatureCache, backbone_fingerprint, data_fingerprint, feature_key, transform_fingerprint
from cl.models import MLP
from cl.config.models import build_model, create_timm_model
from cl.runner.pretrain import load_pretrain, pretrain, read_metadata
from cl.runner.invocation import run_experiment
from conftest import tiny_config, trainer_for
from strategies import NearestMean
from strategies.context import eval_mode, pooled_features
from streams import class_incremental, digits
from streams.experience import BatchTransform

# A ViT small enough for digits' 8x8 images: 4 patches of 4x4, two blocks of width 32.
TINY_VIT = {"img_size": 8, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
VIT = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def lab_dirs(tmp_path, monkeypatch):
    """Weights and feature files under the test's folder, never the user's cache."""
    monkeypatch.setenv("CL_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("CL_CACHE_DIR", str(tmp_path / "features"))
    return tmp_path


def write(tmp_path, text: str, name: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


PRETRAIN = """
name: pretrain-test
seed: 0
device: cpu
threads: 1
dataset: digits
classes: [3, 1, 4, 0]
model: {name: mlp, hidden: [32]}
training:
  epochs: 3
  batch_size: 32
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
output: mlp_digits.safetensors
"""


def test_pretrain_writes_safetensors_with_metadata_accuracy_and_an_mlflow_run(tmp_path, tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    file = write(tmp_path, PRETRAIN, "pretrain.yaml")
    assert main(["pretrain", str(file), "--tracking-uri", tracking_uri, "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = tmp_path / "weights" / "mlp_digits.safetensors"  # a relative output goes under CL_WEIGHTS_DIR
    assert out["output"] == str(path) and path.is_file()

    meta = read_metadata(path)
    assert json.loads(meta["architecture"]) == {"name": "mlp", "kwargs": {"hidden": [32]}}
    assert json.loads(meta["classes"]) == [3, 1, 4, 0]  # the head's output order
    assert json.loads(meta["dataset"]) == {"name": "digits"}
    assert (meta["epochs"], meta["seed"]) == ("3", "0")
    assert meta["lab_version"] and meta["format"].startswith("cl-lab-pretrained")

    # The stored accuracy is the saved model's on the held-out digits of those classes,
    # output i standing for classes[i].
    model = MLP((1, 8, 8), 4, hidden=[32])
    model.load_state_dict(load_file(str(path)))
    data = digits()
    keep = torch.isin(data.test.y, torch.tensor([3, 1, 4, 0]))
    x, y = data.test.x[keep], data.test.y[keep]
    with torch.no_grad():
        predicted = torch.tensor([3, 1, 4, 0])[model(data.transform(x)).argmax(1)]
    accuracy = (predicted == y).float().mean().item()
    assert float(meta["test_accuracy"]) == pytest.approx(accuracy) == pytest.approx(out["test_accuracy"])
    assert out["test_samples"] == len(y) and accuracy > 0.9

    # A run of the lab like any other: the held-out accuracy after every epoch (17 iterations of
    # 32 of the 543 training digits) as the continual-evaluation curve, the final one as `acc`.
    client = MlflowClient(tracking_uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["cl.role"] == "pretrain"
    assert run.data.params["training.epochs"] == "3" and run.data.tags["classes"] == "[3, 1, 4, 0]"
    assert run.data.metrics["acc"] == pytest.approx(accuracy)
    history = client.get_metric_history(run.info.run_id, "curve_acc_task0")
    assert sorted(m.step for m in history) == [17, 34, 51]
    assert [e["test_acc"] for e in out["epochs"]] == [m.value for m in sorted(history, key=lambda m: m.step)]
    assert "train_loss" in run.data.metrics
    logged = client.download_artifacts(run.info.run_id, "model/mlp_digits.safetensors", str(tmp_path / "dl"))
    assert open(logged, "rb").read() == path.read_bytes()

    # A lab model loads the file too, all but its head, by the same relative name.
    fresh = build_model("mlp", (1, 8, 8), 10, hidden=[32], weights="mlp_digits.safetensors")
    with torch.no_grad():
        assert torch.equal(pooled_features(fresh, data.transform(x)), pooled_features(model, data.transform(x)))
    assert fresh.head.out_features == 10


def test_a_pretrained_vit_loads_into_a_fresh_model_with_identical_features(tmp_path):
    file = write(tmp_path, PRETRAIN.replace("{name: mlp, hidden: [32]}", "{name: %s, %s}" % (
        VIT, ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()))).replace("epochs: 3", "epochs: 1"), "vit.yaml")
    cfg, source = load_pretrain(file, ["output=vit.safetensors"])
    out = pretrain(cfg, source, track=False, progress=False)
    trained = create_timm_model(VIT, 4, (1, 8, 8), **TINY_VIT)
    trained.load_state_dict(load_file(out["output"]))

    # As an experiment file names it: a relative path found in CL_WEIGHTS_DIR, head sized to the stream.
    exp = experiment_from_dict({"name": "t", "stream": {"dataset": "digits", "scenario": {
        "name": "class_incremental", "n_experiences": 5}}, "model": {"name": VIT, **TINY_VIT,
                                                                   "weights": "vit.safetensors"}, "strategies": []})
    stream = class_incremental(digits(), n_experiences=5)
    fresh = build_model_from(exp, stream)
    x = stream.transform(stream.test_sets[0].x)
    with torch.no_grad(), eval_mode(trained), eval_mode(fresh):
        assert torch.equal(pooled_features(fresh, x), pooled_features(trained, x))
        assert fresh(x).shape == (len(x), 10)
        unloaded = create_timm_model(VIT, 10, (1, 8, 8), **TINY_VIT)
        assert not torch.allclose(pooled_features(unloaded, x), pooled_features(trained, x))


def test_missing_corrupt_and_mismatched_weights_files_are_refused_naming_the_file(tmp_path, monkeypatch):
    source = MLP((1, 8, 8), 4, hidden=[32])
    from cl.runner.pretrain import save_weights

    good = tmp_path / "good.safetensors"
    save_weights(source, good, {"architecture": json.dumps({"name": "mlp", "kwargs": {"hidden": [32]}})})
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        build_model("mlp", (1, 8, 8), 10, hidden=[32], weights=str(tmp_path / "none.safetensors"))
    with pytest.raises(FileNotFoundError, match="CL_WEIGHTS_DIR"):
        build_model("mlp", (1, 8, 8), 10, hidden=[32], weights="relative_and_nowhere.safetensors")
    # An experiment names a missing file before its data is loaded.
    cfg = experiment_from_dict(nearest_mean_file({"name": "mlp", "hidden": [32], "weights": "nowhere.safetensors"}))
    monkeypatch.setattr(cl.runner.invocation.Invocation, "run", lambda self: pytest.fail("the run started"))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        run_experiment(cfg, track=False)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors file"):
        build_model("mlp", (1, 8, 8), 10, hidden=[32], weights=str(cut))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        create_timm_model(VIT, 10, (1, 8, 8), weights=str(garbage), **TINY_VIT)
    # Weights of another architecture: the message says what the file holds.
    with pytest.raises(ValueError, match=r"good\.safetensors does not fit model 'mlp'.*hidden.*32"):
        build_model("mlp", (1, 8, 8), 10, hidden=[64], weights=str(good))
    with pytest.raises(ValueError, match=r"good\.safetensors does not fit model 'vit_tiny"):
        create_timm_model(VIT, 10, (1, 8, 8), weights=str(good), **TINY_VIT)
    # A torch state dict still loads, head excluded.
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build_model("mlp", (1, 8, 8), 7, hidden=[32], weights=str(tmp_path / "w.pt"))
    assert torch.equal(loaded.features[1].weight, source.features[1].weight)


@pytest.mark.parametrize("key, line, message", [
    ("epochs", "  epochz: 3", "training.epochz: unknown key"),
    ("dataset", "", "dataset: required key is missing"),
    ("classes", "classes: [0, 12]", "classes: [12] not in dataset 'digits'"),
    ("model", "model: {name: %s, img_size: 8, patch_size: 4, no_such_arg: 1}" % VIT, "model: "),
    ("model", "model: {name: mlp, hidden: [32], depth: 3}", "model.depth: unknown key"),
    ("output", "output: {tmp}/a_file/w.safetensors", "output: cannot write"),
    ("output", "output: w.pt", "output: Value error, expected a file name ending in .safetensors"),
])
def test_bad_pretrain_files_name_the_problem(tmp_path, capsys, key, line, message):
    (tmp_path / "a_file").write_text("a file, not a folder")
    lines = PRETRAIN.splitlines()
    at = next(i for i, text in enumerate(lines) if text.lstrip().startswith(key + ":"))
    lines[at] = line.replace("{tmp}", str(tmp_path))  # the key replaced (or removed)
    file = write(tmp_path, "\n".join(lines), "bad.yaml")
    assert main(["pretrain", str(file), "--no-track", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.yaml" in err


def test_a_dataset_that_is_not_there_is_named(tmp_path, capsys):
    file = write(tmp_path, PRETRAIN.replace("dataset: digits", "dataset: {name: mnist, download: false}") +
                 f"data_dir: {tmp_path / 'empty'}\n", "mnist.yaml")
    assert main(["pretrain", str(file), "--no-track", "--no-progress"]) == 2
    assert "dataset 'mnist' not found" in capsys.readouterr().err


# ------------------------------------------------------------------ the feature cache
def nearest_mean_file(model: dict, epochs: int = 3, **changes) -> dict:
    """Nearest-mean on `model`'s frozen features, twice (runs a and b), on Split-Digits."""
    return tiny_config(name="nm-cache", threads=1, progress=False, model=model, epochs=epochs, strategies=None,
                       runs={run: [{"name": "nearest_mean", "freeze_backbone": True}] for run in ("a", "b")}, **changes)


def count_backbone_rows(monkeypatch, layer: str) -> list[int]:
    """Rows that pass through `layer` (the backbone's first) of every model the runner builds."""
    rows = [0]
    build = cl.runner.one_run.build_model_from

    def counting(cfg, stream):
        model = build(cfg, stream)
        model.get_submodule(layer).register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + len(i[0])))
        return model

    monkeypatch.setattr(cl.runner.one_run, "build_model_from", counting)
    return rows


@pytest.mark.parametrize("model, layer", [({"name": "mlp", "hidden": [16]}, "features"),
                                          ({"name": VIT, **TINY_VIT}, "patch_embed")])
def test_each_image_passes_through_the_frozen_backbone_once_per_invocation(monkeypatch, caplog, model, layer):
    caplog.set_level("INFO", logger="cl")  # what the run says, as `cl run` would print it
    rows = count_backbone_rows(monkeypatch, layer)
    cfg = experiment_from_dict(nearest_mean_file(model))
    n = 1797  # digits: every training image once, every test image once, over 3 epochs and two runs
    first = run_experiment(cfg, track=False)
    assert rows[0] == n
    assert [r["feature_cache"] for r in first] == ["used", "used"]
    assert [r["feature_rows_computed"] for r in first] == [n, 0]
    assert first[1]["feature_rows_from_memory"] == n
    assert first[0]["accuracy_matrix"] == first[1]["accuracy_matrix"]
    err = caplog.text
    assert f"a: frozen backbone, trained on cached features" in err and f"{n} rows through the backbone" in err

    rows[0] = 0
    caplog.clear()
    second = run_experiment(cfg, track=False)  # another invocation: the features come from disk
    assert rows[0] == 0
    assert second[0]["feature_rows_from_disk"] == n and second[0]["feature_rows_computed"] == 0
    assert second[0]["accuracy_matrix"] == first[0]["accuracy_matrix"]
    assert f"0 rows through the backbone, {n} read from disk" in caplog.text


def test_the_cache_key_changes_with_weights_data_and_transform():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=[16])
    data = digits()
    x, transform = data.train.x, data.transform

    def key(m=model, xs=x, t=transform, architecture="mlp"):
        return feature_key(backbone_fingerprint(m, architecture), data_fingerprint(xs), transform_fingerprint(t))

    base = key()
    assert key() == base
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.weight.add_(1.0)  # a head changes no feature: same key
    assert key(other) == base
    with torch.no_grad():
        other.features[1].weight[0, 0] += 1e-3
    assert key(other) != base
    pixel = x.clone()
    pixel[5, 0, 3, 3] ^= 1
    assert key(xs=pixel) != base
    assert key(xs=x[:-1]) != base
    mean, std = transform.describe()["mean"], transform.describe()["std"]
    assert key(t=BatchTransform(mean, std)) == base
    assert key(t=BatchTransform([mean[0] + 0.01], std)) != base
    assert key(architecture="mlp global_pool=avg") != base


def test_changed_weights_miss_the_disk_cache_and_a_corrupt_file_is_recomputed(tmp_path, capsys):
    stream = class_incremental(digits(), n_experiences=5)
    torch.manual_seed(0)
    model = MLP(stream.input_shape, stream.n_classes, hidden=[16])
    _, _, stats = FeatureCache(tmp_path / "f").featurize(stream, model, torch.device("cpu"))
    assert stats.rows_computed == 1797
    _, _, stats = FeatureCache(tmp_path / "f").featurize(stream, model, torch.device("cpu"))
    assert (stats.rows_computed, stats.rows_from_disk) == (0, 1797)
    with torch.no_grad():
        model.features[1].bias.add_(0.1)
    before = set((tmp_path / "f").rglob("*.safetensors"))
    _, _, stats = FeatureCache(tmp_path / "f").featurize(stream, model, torch.device("cpu"))
    assert (stats.rows_computed, stats.rows_from_disk) == (1797, 0)
    files = sorted(set((tmp_path / "f").rglob("*.safetensors")) - before)
    assert len(files) == 10  # each experience's training data and each test set
    files[0].write_bytes(b"cut short")
    _, _, stats = FeatureCache(tmp_path / "f").featurize(stream, model, torch.device("cpu"))
    assert 0 < stats.rows_computed < 1797 and stats.rows_computed + stats.rows_from_disk == 1797
    assert "unreadable" in capsys.readouterr().err


AUGMENTED_DIGITS = '''
from streams import digits
from streams.experience import BatchTransform, Dataset


def augmented_digits(data_dir=None):
    """Digits whose training batches are flipped at random."""
    d = digits()
    t = d.transform.describe()
    return Dataset("digits-flipped", d.train, d.test, BatchTransform(t["mean"], t["std"], flip=True), d.class_names)
'''


def test_augmentation_bypasses_the_cache_and_says_so(tmp_path, monkeypatch, capsys, tracking_uri):
    import yaml
    from mlflow.tracking import MlflowClient

    (tmp_path / "augmented.py").write_text(AUGMENTED_DIGITS)
    monkeypatch.delitem(__import__("sys").modules, "augmented", raising=False)
    raw = nearest_mean_file({"name": "mlp", "hidden": [16]}, epochs=2, dataset="augmented:augmented_digits")
    raw["runs"] = {"a": raw["runs"]["a"]}
    file = tmp_path / "aug.yaml"
    file.write_text(yaml.safe_dump(raw))
    rows = count_backbone_rows(monkeypatch, "features")
    assert main(["run", str(file), "--tracking-uri", tracking_uri, "--json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["feature_cache"].startswith("bypassed") and "augments" in result["feature_cache"]
    assert "a: frozen backbone, but no feature cache: the stream augments" in captured.err
    assert rows[0] > 2 * 1347  # two epochs of training images, each through the backbone, and evaluations
    assert not (tmp_path / "features").exists()
    run = MlflowClient(tracking_uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["feature_cache"] == result["feature_cache"]


@pytest.mark.parametrize("name, args", [(VIT, TINY_VIT), ("reduced_resnet18", {"nf": 4})])
def test_nearest_mean_on_cached_features_equals_nearest_mean_without_and_by_hand(name, args):
    """The reduced ResNet has BatchNorm: a frozen extractor is used in eval mode in either path."""
    stream = class_incremental(digits(), n_experiences=5)
    torch.manual_seed(0)
    model = build_model(name, stream.input_shape, stream.n_classes, **args)
    plain_model = copy.deepcopy(model)

    def trained(m, s):
        nm = NearestMean(freeze_backbone=True)
        trainer = trainer_for(s, [nm], batch_size=64, model=m, lr=0.1, momentum=0, epochs=2)
        return trainer, nm, trainer.fit(s)

    featured, head, _ = FeatureCache(None).featurize(stream, model, torch.device("cpu"))
    cached_trainer, cached, cached_record = trained(head, featured)
    plain_trainer, plain, plain_record = trained(plain_model, stream)

    test, test_f = stream.test_all, featured.test_all
    with torch.no_grad():
        cached_pred = cached.predict(cached_trainer.ctx, test_f.x, test_f.t).argmax(1)
        with eval_mode(plain_model):
            plain_pred = plain.predict(plain_trainer.ctx, stream.transform(test.x), test.t).argmax(1)
        # By hand: unit-length features of the frozen model, class means over the training
        # images, the nearest mean of each test image.
        with eval_mode(model):
            def phi(x):
                return F.normalize(pooled_features(model, stream.transform(x)), dim=1)
            train_x = torch.cat([e.train.x for e in stream.experiences])
            train_y = torch.cat([e.train.y for e in stream.experiences])
            f = phi(train_x)
            means = torch.stack([f[train_y == c].mean(0) for c in range(10)])
            hand = torch.cdist(phi(test.x), means).argmin(1)
    torch.testing.assert_close(cached.means, means, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain.means, means, atol=1e-5, rtol=1e-4)
    assert torch.equal(cached_pred, hand) and torch.equal(plain_pred, hand)
    assert cached_record.accuracy_matrix.tolist() == plain_record.accuracy_matrix.tolist()
    assert cached_record.accuracy_matrix[-1].mean() > 0.3  # features worth classifying, even random ones


# Runs `cl pretrain` and SIGKILLs it at its 40th training step (mid-epoch: 17 steps an epoch).
PRETRAIN_KILLER = textwrap.dedent("""
    import os, signal, sys
    kill, argv = sys.argv[1] == "kill", sys.argv[2:]
    if kill:
        import cl.training.trainer as trainer
        original, calls = trainer.LifelongTrainer._train_batch, [0]

        def train_batch(self, *args):
            calls[0] += 1
            if calls[0] == 40:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args)
        trainer.LifelongTrainer._train_batch = train_batch
    from cl.cli.main import main
    sys.exit(main(argv))
""")


def test_a_killed_pretraining_resumes_to_the_same_weights_with_every_metric_once(tmp_path):
    """`cl pretrain` runs through the lab's trainer and journal: killed mid-epoch and resumed
    from its checkpoint, it writes the weights an uninterrupted pre-training writes, and its
    MLflow run holds every metric once."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    file = write(tmp_path, PRETRAIN.replace("  optimizer:", "  checkpoint_every: 5\n  optimizer:"), "pretrain.yaml")

    def pretrain_cli(kill: bool, *args):
        command = [sys.executable, "-c", PRETRAIN_KILLER, "kill" if kill else "run", "pretrain", str(file),
                   "--no-progress", "--json", *args]
        env = {**os.environ, "CL_WEIGHTS_DIR": str(tmp_path / "weights"), "CL_JOURNAL_DIR": str(tmp_path / "j")}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    whole_uri = f"sqlite:///{tmp_path / 'whole.db'}"
    whole = pretrain_cli(False, "--tracking-uri", whole_uri, "--set", "output=whole.safetensors")
    assert whole.returncode == 0, whole.stderr
    uri, ckpt = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "ckpt"
    killed = pretrain_cli(True, "--tracking-uri", uri, "--checkpoint-dir", str(ckpt))
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "weights" / "mlp_digits.safetensors").exists()
    resumed = pretrain_cli(False, "--tracking-uri", uri, "--checkpoint-dir", str(ckpt), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout.strip().splitlines()[-1])

    a, b = load_file(str(tmp_path / "weights" / "whole.safetensors")), load_file(out["output"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stable = ("architecture", "classes", "dataset", "epochs", "seed", "test_accuracy", "test_samples")
    meta_whole, meta = read_metadata(tmp_path / "weights" / "whole.safetensors"), read_metadata(out["output"])
    assert {k: meta[k] for k in stable} == {k: meta_whole[k] for k in stable}

    def runs(store):
        client = MlflowClient(store)
        found = client.search_runs([client.get_experiment_by_name("pretrain-test").experiment_id],
                                   "tags.`cl.role` = 'pretrain'")
        return client, found

    client, found = runs(uri)
    assert [r.info.status for r in found] == ["FINISHED"]
    steps = {key: sorted(m.step for m in client.get_metric_history(found[0].info.run_id, key))
             for key in found[0].data.metrics}
    whole_client, whole_found = runs(whole_uri)
    whole_steps = {key: sorted(m.step for m in whole_client.get_metric_history(whole_found[0].info.run_id, key))
                   for key in whole_found[0].data.metrics}
    assert steps.keys() == whole_steps.keys() and steps == whole_steps  # every metric once, at its steps
    assert steps["curve_acc_task0"] == [17, 34, 51]
