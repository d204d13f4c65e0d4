"""One command checks a GPU: every model family through the lab's trainer on the visible CUDA
devices, then data-parallel training over all of them, then the `cuda` tests.

    python benchmarks/gpu_check.py [--steps 300] [--families mlp,resnet,vit_prompt,gpt]
                                   [--skip-ddp] [--skip-tests]
    python benchmarks/gpu_check.py --dry-run-cpu    # the same checks on the CPU, tiny: checks this script

On the first GPU, each family -- the MLP with Replay, the reduced ResNet-18 with Replay, a small
timm ViT with L2P (a prompt method), the byte-level GPT with Replay -- trains a synthetic
stream of 5 experiences (4 text domains for the GPT) (about --steps steps) at `training.precision` 32 and bf16-mixed, eager and
compiled (`training.compile: true`), built from an experiment dict by the lab's own components
(`cl.config.components`) and trained by `LifelongTrainer`. Each run checks that

  - the model's parameters and buffers, the optimizer's state, every training batch (inputs,
    labels, logits) and the strategy's state (the replay memory, the prompts and keys) are on the GPU;
  - every training loss is finite and no step was skipped;

and prints the lab's training samples/s (rows per second, replayed rows included, over the last
three experiences: after any compilation, with replay's batches at full size) against a bare loop
of the same model object and optimizer type (forward, loss, backward, step on batches of as many
rows, already on the GPU, at the same precision and compilation). Every further GPU trains each
family once, at 32 and eager. Then `cl run FILE --devices N` over the N visible GPUs (with one GPU,
the trainer's data-parallel step over an NCCL group of one: benchmarks/scale.py --ddp-of-one),
its losses checked, and `pytest -m cuda tests/test_cuda.py`.

The data are synthetic (class patterns plus noise; text of a few hundred words), written to a
temporary folder, so the check needs no data set on the GPU machine. Each failed check prints one
`FAIL` line. Exit status: 0 every check passed, 1 one failed, 3 no CUDA device here (one line says
so, nothing ran).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_CUDA_EXIT = 3
FAMILIES = ("mlp", "resnet", "vit_prompt", "gpt")
CONFIGS = (("32", False), ("bf16-mixed", False), ("32", True), ("bf16-mixed", True))


# ------------------------------------------------------------------ sizes and data
def sizes(steps: int, tiny: bool) -> dict:
    """Rows per experience as whole batches (no short last batch, so no recompilation for one),
    and the families' widths: on the GPU the lab's own, on the CPU dry run tiny ones."""
    batch = 16 if tiny else 64
    per_experience = max(1, steps // 5) * batch  # 5 experiences
    return {"batch": batch, "per_class": per_experience // 2, "test_per_class": 8 if tiny else 128,
            "mlp_hidden": [32] if tiny else [400, 400], "resnet_nf": 4 if tiny else 20,
            "vit": dict(depth=1, embed_dim=32, num_heads=2) if tiny else dict(depth=6, embed_dim=192, num_heads=3),
            "gpt": dict(n_layer=1, n_head=2, d_model=32) if tiny else dict(n_layer=4, n_head=4, d_model=256),
            "block": 32 if tiny else 128, "memory": 64 if tiny else 1000}


def gpt_rows_per_domain(size: dict) -> int:
    steps = 5 * size["per_class"] * 2 // size["batch"]
    return max(1, steps // 4) * size["batch"]


def synthetic_images(path: Path, per_class: int, test_per_class: int) -> None:
    """10 classes of 3x32x32 uint8 images: a fixed random pattern per class plus noise (learnable)."""
    import numpy as np

    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (10, 3, 32, 32)).astype(np.float32)

    def split(n):
        y = np.repeat(np.arange(10), n)
        x = 0.6 * patterns[y] + 0.4 * rng.integers(0, 256, (len(y), 3, 32, 32))
        return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)

    (xtr, ytr), (xte, yte) = split(per_class), split(test_per_class)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)


def synthetic_text(folder: Path, n_bytes: int) -> list[str]:
    """Four text domains of `n_bytes` each (words drawn from small vocabularies), as token_stream reads them."""
    import numpy as np

    (folder / "text").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for name, words in (("gpu-check-en", "the cat sat on a mat while one dog ran far away".split()),
                        ("gpu-check-fr", "le chat dort sur un tapis et le chien court loin".split()),
                        ("gpu-check-de", "die katze schlaeft auf der matte und der hund rennt weit".split()),
                        ("gpu-check-abc", "abc abd acd bcd aab bba cca dda".split())):
        text = " ".join(rng.choice(words, size=n_bytes // 3))
        (folder / "text" / f"{name}.txt").write_text((text * (1 + n_bytes // max(len(text), 1)))[:n_bytes])
        names.append(name)
    return names


def experiment(family: str, size: dict, tmp: Path, device: str, precision: str, compiled, domains: list[str]) -> dict:
    """The family's experiment, as a file's keys (the data: tmp's synthetic images or texts)."""
    images = {"dataset": {"name": "numpy", "path": str(tmp / "images.npz")},
              "scenario": {"name": "class_incremental", "n_experiences": 5}}
    training = {"epochs": 1, "batch_size": size["batch"], "eval_batch_size": 2 * size["test_per_class"],
                "precision": precision, "compile": compiled, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}
    replay = {"name": "replay", "memory_size": size["memory"], "replay_batch_size": size["batch"]}
    cfg = {"name": f"gpu-check-{family}", "seed": 0, "device": device, "data_dir": str(tmp), "stream": images,
           "training": training, "strategies": [replay]}
    if family == "mlp":
        cfg["model"] = {"name": "mlp", "hidden": size["mlp_hidden"]}
    elif family == "resnet":
        cfg["model"] = {"name": "reduced_resnet18", "nf": size["resnet_nf"]}
    elif family == "vit_prompt":
        cfg["model"] = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, **size["vit"]}
        training["optimizer"] = {"name": "adam", "lr": 0.001}
        cfg["strategies"] = [{"name": "l2p", "pool_size": 10, "prompt_length": 5, "top_k": 5}]
    else:
        # Four domains, as many steps in all as the image streams take.
        block, rows = size["block"], gpt_rows_per_domain(size)
        cfg["stream"] = {"scenario": {"name": "token_stream", "domains": domains, "block_size": block,
                                      "max_train_bytes": rows * block + 1, "max_val_bytes": 8 * block}}
        cfg["model"] = {"name": "byte_gpt", **size["gpt"]}
        training["optimizer"] = {"name": "adamw", "lr": 0.002, "weight_decay": 0.1, "betas": [0.9, 0.95]}
        training["eval_batch_size"] = 8
    return cfg


# ------------------------------------------------------------------ what one run checks
def on_device(tensors, device) -> list[str]:
    """The names of the tensors in a (nested) state that are not on `device`'s type."""
    import torch

    wrong = []

    def walk(tree, name):
        if isinstance(tree, torch.Tensor):
            if tree.device.type != device.type:
                wrong.append(f"{name} ({tree.device})")
        elif isinstance(tree, dict):
            for k, v in tree.items():
                # generator states are CPU byte tensors, and Adam's step counts CPU scalars, by design
                if "rng" not in str(k) and "generator" not in str(k) and k != "step":
                    walk(v, f"{name}.{k}")
        elif isinstance(tree, (list, tuple)):
            for k, v in enumerate(tree):
                walk(v, f"{name}[{k}]")

    walk(tensors, "")
    return wrong


def make_probe():
    """A strategy that watches the training step without synchronising the GPU: the devices of
    each batch's tensors, a running count of non-finite loss terms (kept on the device), the
    rows of each step, and, once per experience (one synchronisation), its training seconds.
    From the first hook of a step (`before_iteration`) to the last (`after_step`, this probe
    being the last strategy) CUDA's sync debug mode is on: `host_syncs` counts the operations
    that made the host wait for the GPU inside the training step (the issue asks for none)."""
    import warnings

    import torch

    from strategies.base import Strategy

    class DeviceProbe(Strategy):
        def __init__(self):
            self.devices, self.nonfinite, self.rows, self.seconds, self._t0 = set(), None, [], [], 0.0
            self.host_syncs, self.sync_sites, self._watch = 0, set(), None

        def before_iteration(self, ctx):
            self._stop_watching()  # a step skipped for a non-finite loss never reached after_step
            if ctx.device.type == "cuda":
                self._watch = warnings.catch_warnings(record=True)
                self._seen = self._watch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def _stop_watching(self):
            if self._watch is None:
                return
            torch.cuda.set_sync_debug_mode(0)
            self._watch.__exit__(None, None, None)
            syncs = [w for w in self._seen if "synchroniz" in str(w.message)]
            self.host_syncs += len(syncs)
            self.sync_sites |= {f"{Path(w.filename).name}:{w.lineno}" for w in syncs}
            self._watch = None

        def _sync(self, ctx):
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)

        def before_experience(self, ctx):
            self._sync(ctx)
            self._t0 = time.perf_counter()
            self.rows.append(0)

        def after_step(self, ctx, batch):
            self.devices |= {f"{k}:{v.device.type}" for k, v in
                             (("x", batch.x), ("y", batch.y), ("logits", batch.logits), ("x_raw", batch.x_raw))}
            bad = sum((~torch.isfinite(v.detach())).sum() for v in batch.losses.values())
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
            self.rows[-1] += len(batch.y)
            self._stop_watching()

        def after_experience(self, ctx, data):
            self._stop_watching()
            self._sync(ctx)
            self.seconds.append(time.perf_counter() - self._t0)

    return DeviceProbe()


def bare_loop(model, cfg, stream, rows: int, steps: int, device, precision: str, warmup: int = 5) -> float:
    """Samples/s of forward, loss, backward and step on `rows`-row batches of the stream's training
    data, already on the device, normalised as the lab's transform does, at `precision`. `model`
    is the lab's trained model itself (compiled in place where the run compiled it: no second
    compilation); the optimizer is a fresh one of the experiment's type."""
    import torch
    import torch.nn.functional as F

    from cl.config.components import build_optimizer

    optimizer, _ = build_optimizer(cfg, model)
    data = stream.experiences[-1].train
    x, y = data.x.to(device), data.y.to(device)
    sequence = stream.is_sequence
    if not sequence:
        t = stream.transform
        mean = torch.as_tensor(t.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.as_tensor(t.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else torch.autocast(device.type, enabled=False))
    g = torch.Generator(device="cpu").manual_seed(0)
    model.train()

    def step():
        idx = torch.randint(0, len(y), (rows,), generator=g).to(device)
        xb, yb = x[idx], y[idx]
        xb = xb.long() if sequence else (xb.float() / 255.0 - mean) / std
        with autocast:
            out = model(xb)
            loss = F.cross_entropy(out.flatten(0, -2), yb.flatten()) if out.dim() > 2 else F.cross_entropy(out, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return rows * steps / (time.perf_counter() - start)


def check_run(family: str, cfg_dict: dict, device, bare_steps: int, report: "Report") -> None:
    """Train one family at one setting through the lab, check where everything is, time it against a bare loop."""
    import torch

    from cl.api import load
    from cl.config.components import build_model_from, build_optimizer, build_stream, build_strategies
    from cl.training.seeds import seed_everything
    from cl.training.trainer import LifelongTrainer

    t = cfg_dict["training"]
    label = f"{device} {family:<10} {t['precision']:<10} {'compiled' if t['compile'] else 'eager':<8}"
    cfg = load(cfg_dict)
    seed_everything(cfg.seed)
    stream = build_stream(cfg)
    model = build_model_from(cfg, stream).to(device)
    optimizer, scheduler = build_optimizer(cfg, model)
    strategies = build_strategies(cfg.run_specs()[next(iter(cfg.run_specs()))])
    probe = make_probe()
    trainer = LifelongTrainer(model, optimizer, [*strategies, probe], cfg.training, device=device, seed=cfg.seed,
                              scheduler=scheduler)
    start = time.perf_counter()
    try:
        record = trainer.fit(stream)
    except Exception as err:  # one line per failed check; the next run goes on
        report.fail(label, f"training failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return
    wall = time.perf_counter() - start
    problems = []
    wrong = sorted(d for d in probe.devices if not d.endswith(f":{device.type}"))
    if wrong:
        problems.append(f"batch tensors off the device: {', '.join(wrong)}")
    for what, state in (("model", {**dict(model.named_parameters()), **dict(model.named_buffers())}),
                        ("optimizer", optimizer.state_dict()["state"]),
                        *((type(s).__name__, s.state_dict()) for s in strategies)):
        off = on_device(state, device)
        if off:
            problems.append(f"{what} state off the device: {', '.join(off[:4])}{' ...' if len(off) > 4 else ''}")
    if any(type(s).__name__ == "Replay" for s in strategies):
        memory = next(s for s in strategies if type(s).__name__ == "Replay").buffer
        if memory.x is None or memory.x.device.type != device.type:
            problems.append(f"replay memory not on the device ({getattr(memory.x, 'device', None)})")
    nonfinite = int(probe.nonfinite) if probe.nonfinite is not None else 0
    losses = [v for v in record.train_loss]
    if nonfinite or not all(math.isfinite(v) for v in losses):
        problems.append(f"non-finite losses: {nonfinite} step terms; experience means {losses}")
    if record.skipped_steps:
        problems.append(f"{record.skipped_steps} steps skipped")
    if probe.host_syncs:
        problems.append(f"{probe.host_syncs} host synchronisations inside training steps, at "
                        f"{', '.join(sorted(probe.sync_sites)[:6])}")
    # Experiences 3 on: compiled (and recompiled once replay's rows join the batch) by then.
    steady = slice(2, None) if len(probe.seconds) > 2 else slice(-1, None)
    steady_rows, steady_s = sum(probe.rows[steady]), sum(probe.seconds[steady])
    lab_rate = steady_rows / steady_s if steady_s > 0 else float("nan")
    ends = [0, *record.experience_ends]
    rows_per_step = max(1, probe.rows[-1] // max(1, ends[-1] - ends[-2]))  # the last experience's batches
    bare = bare_loop(model, cfg, stream, rows_per_step, bare_steps, device, t["precision"])
    like = "" if family != "vit_prompt" else "  (bare: the plain ViT; L2P adds its query pass)"
    score = (f"perplexity {record.matrices['loss'][-1].mean():.3g}" if "loss" in record.matrices
             else f"acc {record.accuracy_matrix[-1].mean():.3f}")
    line = (f"{label} {record.iteration:4d} steps, {wall:6.1f} s (train {record.train_time_s:6.1f} s), {score}; "
            f"samples/s lab {lab_rate:10,.0f}  bare {bare:10,.0f}  bare/lab {bare / lab_rate:5.2f}; "
            f"host syncs in steps {probe.host_syncs}{like}")
    report.result(label, line, problems, {"family": family, "device": str(device), "precision": t["precision"],
                                          "compiled": bool(t["compile"]), "steps": record.iteration,
                                          "train_time_s": record.train_time_s, "lab_samples_per_s": lab_rate,
                                          "bare_samples_per_s": bare, "rows_per_step": rows_per_step,
                                          "host_syncs_in_steps": probe.host_syncs,
                                          "problems": problems})
    del trainer, model, optimizer, strategies
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Report:
    """Every run's line and numbers; each failed check is one `FAIL` line and one failure."""

    def __init__(self):
        self.failures, self.results = [], []

    def fail(self, label: str, why: str) -> None:
        self.failures.append(f"{label}: {why}")
        print(f"FAIL {label}: {why}", flush=True)

    def result(self, label: str, line: str, problems: list[str], numbers: dict) -> None:
        self.results.append(numbers)
        print(("ok   " if not problems else "bad  ") + line, flush=True)
        for p in problems:
            self.fail(label, p)


# ------------------------------------------------------------------ data parallel and the tests
def data_parallel(tmp: Path, size: dict, device: str, n: int, report: Report, domains: list[str]) -> None:
    """`cl run FILE --devices n` on the MLP with Replay (n = 1: DDP over a group of one), its losses checked."""
    import yaml

    cfg = experiment("mlp", size, tmp, device, "32", False, domains)
    cfg["strategies"] = [{"name": "replay", "memory_size": size["memory"], "replay_batch_size": size["batch"]}]
    file = tmp / "gpu_check_ddp.yaml"
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if n > 1:
        cmd = [sys.executable, "-m", "cl", "run", str(file), "--json", "--no-track", "--no-progress", "--devices", str(n)]
        how = f"cl run --devices {n}"
    else:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--ddp-of-one", str(file)]
        how = "DDP over a process group of one (scale.py --ddp-of-one)"
    label = f"data parallel, {how}"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        report.fail(label, f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        return
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    losses = res.get("train_loss", [])
    problems = [] if losses and all(math.isfinite(v) for v in losses) else [f"losses {losses}"]
    if res.get("status") != "FINISHED":
        problems.append(f"status {res.get('status')}")
    report.result(label, f"{label}: {res['iterations']} steps, train {res['train_time_s']:.1f} s, "
                         f"{res['samples_per_s']:,.0f} samples/s, acc {res['acc']:.3f}", problems,
                  {"family": "mlp", "data_parallel": n, "train_time_s": res["train_time_s"],
                   "lab_samples_per_s": res["samples_per_s"], "problems": problems})


def cuda_tests(report: Report, cpu: bool) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=ROOT)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    label = "pytest -m cuda tests/test_cuda.py"
    if proc.returncode != 0:
        report.fail(label, f"exit {proc.returncode}: {summary}")
        return
    skipped_all = "passed" not in summary
    if skipped_all and not cpu:
        report.fail(label, f"nothing ran on the GPU: {summary}")
        return
    report.result(label, f"{label}: {summary}" + (" (no CUDA on the dry run: skipped, as they should be)"
                                                  if skipped_all else ""), [], {"tests": summary})


# ------------------------------------------------------------------ the command
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 300; 10 on the dry run)")
    p.add_argument("--bare-steps", type=int, default=None, help="timed steps of the bare loop (default 100; 5 dry)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--dry-run-cpu", action="store_true", help="the same checks on the CPU at tiny sizes, compiled "
                   "with the aot_eager backend (checks the script, measures nothing)")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    import torch

    cpu = args.dry_run_cpu
    if not cpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
              f"nothing checked; --dry-run-cpu runs the same checks on the CPU", file=sys.stderr)
        return NO_CUDA_EXIT
    families = [f for f in args.families.split(",") if f]
    if set(families) - set(FAMILIES):
        p.error(f"unknown families {sorted(set(families) - set(FAMILIES))}; known: {', '.join(FAMILIES)}")
    size = sizes(args.steps or (10 if cpu else 300), tiny=cpu)
    bare_steps = args.bare_steps or (5 if cpu else 100)
    compiled_as = {"backend": "aot_eager"} if cpu else True
    devices = [torch.device("cpu")] if cpu else [torch.device(f"cuda:{k}") for k in range(torch.cuda.device_count())]
    names = ", ".join(str(d) if cpu else f"{d} {torch.cuda.get_device_name(d)}" for d in devices)
    print(f"gpu_check on {names}; torch {torch.__version__}; {size['batch']} rows a batch, "
          f"{5 * size['per_class'] * 2 // size['batch']} steps a run", flush=True)
    report, start = Report(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cl-gpu-check-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp / "inductor"))
        synthetic_images(tmp / "images.npz", size["per_class"], size["test_per_class"])
        domains = synthetic_text(tmp, 2 * (gpt_rows_per_domain(size) + 8) * size["block"])  # 10% held out
        for k, device in enumerate(devices):
            # The whole matrix on the first device; each further one trains every family once.
            for precision, compiled in (CONFIGS if k == 0 else CONFIGS[:1]):
                for family in families:
                    cfg = experiment(family, size, tmp, str(device), precision, compiled_as if compiled else False,
                                     domains)
                    check_run(family, cfg, device, bare_steps, report)
        if not args.skip_ddp:
            n = len(devices) if not cpu else min(2, len(os.sched_getaffinity(0)))
            data_parallel(tmp, size, "cpu" if cpu else "cuda", n, report, domains)
        if not args.skip_tests:
            cuda_tests(report, cpu)
    took = time.perf_counter() - start
    if args.out:
        args.out.write_text(json.dumps({"devices": names, "results": report.results, "failures": report.failures,
                                        "seconds": took}, indent=1))
    if report.failures:
        print(f"gpu_check: {len(report.failures)} check(s) FAILED in {took:.0f} s", flush=True)
        return 1
    print(f"gpu_check: every check passed in {took:.0f} s" + (" (dry run on the CPU: nothing about a GPU)" if cpu else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
