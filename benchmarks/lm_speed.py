"""Language-model training speed: the lab's tokens/s against a bare PyTorch loop, in one sitting.

Both train the byte-level GPT of experiments/lm/rewarming.yaml (or, with `--model hf`, the
GPT-NeoX of experiments/lm/hf_neox_tiny.yaml, which the bare loop builds and calls through
transformers itself) with the same optimizer, batch size and sequence length on the same
domains' training sequences, one pass each, alternating rounds; the lab through `cl run`
(training time only, as it reports it), the bare loop with nothing but the model, AdamW and
a shuffled index. Prints the median and fastest tokens/s of each and their ratio (the
target: the lab within 1.10x of the bare loop).

    python benchmarks/lm_speed.py [--rounds 5] [--domains 2] [--model hf]

Needs the text corpora: CL_DATA_DIR (default ../shared/data).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"byte_gpt": ROOT / "experiments" / "lm" / "rewarming.yaml",
               "hf": ROOT / "experiments" / "lm" / "hf_neox_tiny.yaml"}


def settings(domains: int, model: str = "byte_gpt") -> dict:
    """The experiment's stream, model and training settings, cut to `domains` domains and one
    pass (no periodic evaluation, which is not training)."""
    cfg = yaml.safe_load(EXPERIMENTS[model].read_text())
    cfg["stream"]["scenario"]["domains"] = cfg["stream"]["scenario"]["domains"][:domains]
    cfg["training"].update(epochs=1, eval_every=None)
    cfg.pop("runs")
    cfg["strategies"] = ["naive"]
    cfg["name"] = "lm-speed"
    return cfg


def bare(cfg: dict) -> tuple[float, int]:
    """The same training with a bare loop: seconds of training and tokens trained on."""
    import torch

    from cl.models import ByteGPT
    from streams.text import token_stream

    torch.manual_seed(0)
    scenario = {k: v for k, v in cfg["stream"]["scenario"].items() if k != "name"}
    stream = token_stream(**scenario)
    m, t = cfg["model"], cfg["training"]
    if m["name"] == "hf":  # transformers' own model, called as its users call it
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**m["config"]))

        def model(xb):
            return hf(input_ids=xb, use_cache=False).logits

        parameters = hf.parameters()
    else:
        net = ByteGPT(stream.input_shape, stream.n_classes, n_layer=m["n_layer"], n_head=m["n_head"],
                      d_model=m["d_model"])
        model, parameters = net, net.parameters()
    opt_args = {k: v for k, v in t["optimizer"].items() if k != "name"}
    opt = torch.optim.AdamW(parameters, **opt_args)
    g, seconds, tokens = torch.Generator().manual_seed(0), 0.0, 0
    for experience in stream.experiences:
        x, y = experience.train.x, experience.train.y
        start = time.perf_counter()
        order = torch.randperm(len(y), generator=g)
        for b in range(0, len(y), t["batch_size"]):
            idx = order[b:b + t["batch_size"]]
            xb, yb = x[idx].long(), y[idx]
            loss = torch.nn.functional.cross_entropy(model(xb).flatten(0, 1), yb.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tokens += yb.numel()
        seconds += time.perf_counter() - start
    return seconds, tokens


def lab(cfg_path: Path, env: dict) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-m", "cl", "run", str(cfg_path), "--json", "--no-progress", "--no-track"],
                         capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout
    res = json.loads(out.strip().splitlines()[-1])
    cfg = yaml.safe_load(cfg_path.read_text())
    tokens = res["iterations"] * cfg["training"]["batch_size"] * cfg["stream"]["scenario"]["block_size"]
    return res["train_time_s"], tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--domains", type=int, default=2, help="domains trained on (one pass each)")
    p.add_argument("--model", choices=sorted(EXPERIMENTS), default="byte_gpt",
                   help="the lab's byte GPT, or a GPT-NeoX of its size from transformers (hf_neox_tiny.yaml)")
    p.add_argument("--bare", default=None, help=argparse.SUPPRESS)  # internal: run the bare loop on this file
    args = p.parse_args()
    if args.bare:
        seconds, tokens = bare(yaml.safe_load(Path(args.bare).read_text()))
        print(json.dumps({"seconds": seconds, "tokens": tokens}))
        return
    env = {**os.environ, "CL_DATA_DIR": os.environ.get("CL_DATA_DIR", str(ROOT.parent / "shared" / "data"))}
    rates: dict[str, list[float]] = {"bare": [], "lab": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lm_speed.yaml"
        path.write_text(yaml.safe_dump(settings(args.domains, args.model)))

        def run_bare():
            out = subprocess.run([sys.executable, __file__, "--bare", str(path)], capture_output=True, text=True,
                                 check=True, env=env, cwd=ROOT).stdout
            res = json.loads(out.strip().splitlines()[-1])
            rates["bare"].append(res["tokens"] / res["seconds"])

        def run_lab():
            seconds, tokens = lab(path, env)
            rates["lab"].append(tokens / seconds)

        for r in range(args.rounds):
            for run_one in ([run_bare, run_lab] if r % 2 == 0 else [run_lab, run_bare]):
                run_one()
            print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:,.0f} tokens/s" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    what = "byte-level GPT" if args.model == "byte_gpt" else "GPT-NeoX from transformers (hf_neox_tiny.yaml)"
    print(f"\n{what}, {args.domains} domains, {args.rounds} rounds, median training tokens/s:")
    for k, v in med.items():
        print(f"  {k:<5} {v:10,.0f}")
    print(f"  bare / lab = {med['bare'] / med['lab']:.3f}  (target <= 1.10); fastest rounds: "
          f"{max(rates['bare']) / max(rates['lab']):.3f}")


if __name__ == "__main__":
    main()
