"""Hugging Face causal LMs as lab models (`model: {name: hf}`, cl/models/hf.py): a tiny GPT-NeoX
built from a config trains through the lab with rewarming and replay, resumes mid-experience
to the same weights, and its checkpoint loads into transformers with the same logits; a tiny
Llama builds and steps; bad vocabularies, paths, hub ids and config keys fail in one line."""
import copy
import sys
import time

import pytest
import torch

pytest.importorskip("transformers", reason='the hf model needs the optional extra: pip install "cl-lab[lm]"')

import cl  # noqa: E402
from cl.cli.main import main  # noqa: E402
from cl.config.models import build_model  # noqa: E402
from cl.config.registry import MODELS  # noqa: E402
from cl.models.hf import HFCausalLM, HFModelError, export_hf, hf_state_dict  # noqa: E402
from cl.training.checkpoint import load_checkpoint  # noqa: E402
from cl.training.trainer import LifelongTrainer, classification_loss  # noqa: E402

NEOX = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 32}
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}
BLOCK = 16


def test_hf_is_a_model_by_name():
    assert MODELS.get("hf") is HFCausalLM


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A data root with two small text domains of different vocabularies (English-ish, French-ish words)."""
    import random

    root = tmp_path_factory.mktemp("hf_data")
    (root / "text").mkdir()
    rng = random.Random(0)
    for name, words in (("en", "the king queen castle sword river night love death crown"),
                        ("fr", "le roi reine chateau epee riviere nuit amour mort couronne")):
        words = words.split()
        (root / "text" / f"{name}.txt").write_text(" ".join(rng.choice(words) for _ in range(700)))
    return root


def experiment(data_dir, **training):
    """Two domains of 40 training sequences of 16 bytes, a 2-layer GPT-NeoX of width 32, rewarm +
    25% mixed replay as experiments/lm/rewarming.yaml: 2 epochs of batches of 8, 20 iterations per domain."""
    return {"name": "hf-test", "seed": 0, "device": "cpu", "data_dir": str(data_dir), "threads": 1,
            "stream": {"scenario": {"name": "token_stream", "domains": ["en", "fr"], "block_size": BLOCK,
                                    "max_train_bytes": 40 * BLOCK + 1, "max_val_bytes": 4 * BLOCK + 1}},
            "model": {"name": "hf", "config": dict(NEOX)},
            "training": {"epochs": 2, "batch_size": 8, "eval_batch_size": 64,
                         "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "betas": [0.9, 0.95]},
                         **training},
            "strategies": [{"name": "rewarm", "max_lr": 0.01, "warmup_steps": 2},
                           {"name": "mixed_replay", "fraction": 0.25, "memory_size": 24}]}


@pytest.fixture(scope="module")
def full_run(texts, tmp_path_factory):
    """The uninterrupted run, checkpointed every 7 iterations: its result and its final checkpoint."""
    ckpt = tmp_path_factory.mktemp("full_ckpt")
    [run] = cl.run(experiment(texts, checkpoint_every=7), checkpoint_dir=str(ckpt))
    [path] = ckpt.glob("*.pt")
    return run, path


# ------------------------------------------------------------------ training through the lab
def test_a_gpt_neox_from_a_config_trains_through_the_lab_and_its_loss_falls(full_run):
    run, _ = full_run
    loss = run["matrices"]["loss"]  # rows: before training, after each domain; columns: domains
    assert run["status"] == "FINISHED" and run["iterations"] == 2 * 2 * 5
    assert loss[1][0] < loss[0][0] - 1.0 and loss[2][1] < loss[0][1] - 1.0  # each domain learned
    assert run["train_loss"][-1] < run["train_loss"][0]
    assert run["tokens_trained"] == run["rows_trained"] * BLOCK and run["tokens_per_s"] > 0


def test_a_run_interrupted_mid_experience_resumes_to_the_uninterrupted_one(full_run, texts, tmp_path, monkeypatch):
    full, full_path = full_run
    original, calls = LifelongTrainer._train_batch, [0]

    def train_batch(self, *args):
        calls[0] += 1
        if calls[0] == 16:  # in the second domain, after the checkpoint at iteration 14
            raise KeyboardInterrupt
        return original(self, *args)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(LifelongTrainer, "_train_batch", train_batch)
    with pytest.raises(KeyboardInterrupt):
        cl.run(experiment(texts, checkpoint_every=7), checkpoint_dir=str(ckpt))
    calls[0] = -1000  # no more interrupts: count the iterations the resumed run trains
    [resumed] = cl.run(experiment(texts, checkpoint_every=7), checkpoint_dir=str(ckpt), resume=True)
    assert calls[0] == -1000 + full["iterations"] - 14  # it went on from the checkpoint at iteration 14
    for key in ("accuracy_matrix", "matrices", "train_loss", "lr_curve", "iterations"):
        assert resumed[key] == full[key], key
    [path] = ckpt.glob("*.pt")
    mine, theirs = load_checkpoint(path)[0]["model"], load_checkpoint(full_path)[0]["model"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_lab_checkpoint_loads_into_transformers_with_identical_logits(full_run, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, path = full_run
    state = load_checkpoint(path)[0]["model"]
    lab = build_model("hf", (BLOCK,), 256, config=dict(NEOX))
    lab.load_state_dict(state)
    config = dict(NEOX)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), vocab_size=256, **config))
    hf.load_state_dict(hf_state_dict(state))  # strict: the keys map one to one, "model." stripped
    lab.eval(), hf.eval()
    x = torch.randint(0, 256, (3, BLOCK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = lab(x)
        assert torch.equal(logits, hf(x).logits)
        assert torch.allclose(lab.forward_head(lab.forward_features(x)), logits, atol=1e-5)
        export_hf(lab, tmp_path / "export")  # save_pretrained: a folder transformers (and `path:`) reads
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "export")(x).logits, logits)
        again = build_model("hf", (BLOCK,), 256, path=str(tmp_path / "export"))
        assert torch.equal(again(x), logits)


def test_export_puts_the_streams_tokenizer_beside_the_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    vocab = {w: i for i, w in enumerate(["<unk>", "the", "king", "queen", "castle"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "shards").mkdir()
    tok.save(str(tmp_path / "shards" / "tokenizer.json"))
    (tmp_path / "shards" / "manifest.json").write_text("{}")  # a shard folder: its tokenizer is exported
    model = build_model("hf", (BLOCK,), len(vocab), config=dict(NEOX))
    folder = export_hf(model, tmp_path / "export", tokenizer=tmp_path / "shards")
    assert AutoTokenizer.from_pretrained(folder)("the queen")["input_ids"] == [1, 3]
    with pytest.raises(HFModelError, match="not an hf model"):
        export_hf(torch.nn.Linear(2, 2), tmp_path / "no")


# ------------------------------------------------------------------ the interface
@pytest.mark.parametrize("config", [NEOX, LLAMA], ids=["gpt_neox", "llama"])
def test_a_tiny_model_builds_and_takes_a_step_in_float32_and_under_bf16_autocast(config):
    torch.manual_seed(0)
    model = build_model("hf", (BLOCK,), 256, config=dict(config))
    assert model.num_features == 32 and model.get_classifier() is model.model.get_output_embeddings()
    x = torch.randint(0, 256, (4, BLOCK))
    y = torch.roll(x, -1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    loss = classification_loss(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    features = model.forward_features(x)
    assert features.shape == (4, BLOCK, 32) and model.forward_head(features, pre_logits=True) is features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    # bf16 logits (transformers < 4.45 casts Llama's to float32 itself)
    assert logits.shape == (4, BLOCK, 256) and logits.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(logits).all()
    eager = build_model("hf", (BLOCK,), 256, config=dict(config), attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(eager(x), model(x), atol=1e-4)  # sdpa and eager agree


def test_the_same_seed_builds_the_same_weights_and_a_larger_vocabulary_is_cut_to_the_streams():
    torch.manual_seed(3)
    a = build_model("hf", (BLOCK,), 200, config={**NEOX, "vocab_size": 256})
    torch.manual_seed(3)
    b = build_model("hf", (BLOCK,), 200, config={**NEOX, "vocab_size": 256})
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    x = torch.randint(0, 200, (2, BLOCK))
    assert a(x).shape == (2, BLOCK, 200) and a.get_classifier().out_features == 256


def test_the_experiment_file_builds(texts):
    cfg = cl.load("experiments/lm/hf_neox_tiny.yaml")
    assert cfg.model.name == "hf" and cfg.model.args["config"]["model_type"] == "gpt_neox"
    model = build_model("hf", (cfg.stream.scenario.args["block_size"],), 256, **cfg.model.args)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


# ------------------------------------------------------------------ errors, one line each
@pytest.mark.parametrize("args, match", [
    ({"config": {**NEOX, "vocab_size": 100}}, "vocab_size 100 is smaller than the stream's vocabulary of 256"),
    ({"config": {**NEOX, "hidden_sise": 64}}, "config.hidden_sise: unknown key for GPTNeoXConfig"),
    ({"config": {**NEOX, "model_type": "gpt_nox"}}, "model_type 'gpt_nox' is not a model type"),
    ({"config": {**NEOX, "max_position_embeddings": 8}}, "max_position_embeddings 8 is shorter than the stream's"),
    ({"config": {"hidden_size": 32}}, "config needs model_type"),
    ({}, "give either path .* or config"),
    ({"path": "/no/such/model/folder"}, "path /no/such/model/folder: no such folder"),
])
def test_bad_settings_are_refused_in_one_line(args, match):
    with pytest.raises((HFModelError, FileNotFoundError), match=match) as err:
        build_model("hf", (BLOCK,), 256, **args)
    assert "\n" not in str(err.value)


def test_a_pretrained_model_with_a_smaller_vocabulary_than_the_streams_is_refused(tmp_path):
    build_model("hf", (BLOCK,), 128, config={**NEOX, "vocab_size": 128}).save_pretrained(tmp_path / "small")
    assert build_model("hf", (BLOCK,), 100, path=str(tmp_path / "small"))(torch.zeros(1, BLOCK).long()).shape[-1] == 100
    with pytest.raises(HFModelError, match="vocabulary of 128 tokens, smaller than the stream's 256"):
        build_model("hf", (BLOCK,), 256, path=str(tmp_path / "small"))
    with pytest.raises(HFModelError, match="block_size 64 is longer than .* max_position_embeddings 32"):
        build_model("hf", (64,), 128, path=str(tmp_path / "small"))


def test_a_hub_id_offline_fails_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
    started = time.monotonic()
    with pytest.raises(HFModelError, match="EleutherAI/pythia-14m.* offline .*not in the hub cache") as err:
        build_model("hf", (BLOCK,), 256, path="EleutherAI/pythia-14m")
    assert time.monotonic() - started < 10 and "\n" not in str(err.value)


def test_without_transformers_the_model_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(HFModelError, match='pip install "cl-lab\\[lm\\]"'):
        build_model("hf", (BLOCK,), 256, config=dict(NEOX))


def test_cl_run_says_a_vocabulary_mismatch_in_one_line(texts, tmp_path, capsys):
    import yaml

    exp = copy.deepcopy(experiment(texts))
    exp["model"]["config"]["vocab_size"] = 64
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    assert main(["run", str(path), "--no-track", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cl: error: model hf: config.vocab_size 64 is smaller than the stream's vocabulary")
