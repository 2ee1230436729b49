#!/usr/bin/env python3
"""cnnc vs PyTorch (eager): one training step of the study notes' nets, CPU, side by side.

A step is what the notes' loops do per batch: ``optimizer.zero_grad()``, forward, loss,
``loss.backward()``, ``optimizer.step()`` (SGD, lr 0.01, momentum 0.9), the model in
``train()`` mode (BatchNorm on batch statistics, running statistics updated).

For every row (net, batch) and thread count both engines start from the same seeded
``state_dict`` and train on the same fixed batch:

- PyTorch eager: this script run as a subprocess in ``--torch-serve`` mode
  (``torch.set_num_threads(t)``), so each engine is its own process and its peak resident
  memory (``VmHWM``) is its own;
- cnnc: the ``train_engine`` example (``cargo build --release --example train_engine``),
  ``Trainer`` with the JIT, one process per thread count.

Both answer ``WARMUP ITERS`` requests with the step times. The engines are interleaved: each
row runs ``--rounds`` rounds, and in each round every (threads, engine) pair runs one burst
of about ``--burst`` seconds of steps; the reported time is the median of all timed steps.
Correctness: the first step's loss and every parameter and buffer after it (cnnc's
``--save-weights``) are compared with PyTorch's.

Needs ``pip install torch safetensors`` and a Rust toolchain; installs nothing.

    python bench/compare_train.py                         # every row, 1 and 2 threads
    python bench/compare_train.py --quick --rows lenet64 --threads 1
    python bench/compare_train.py --out bench/results/train.json --markdown table.md

Rows: ``edge1 lenet64 cifar10_64 resnet96_32 resnet224_8`` (the issue's table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (shared nets, machine description, load monitor, formatting)

ROOT = compare.ROOT

# --------------------------------------------------------------------------------------------
# The nets (state_dict keys = the .cnn files' parameter names)
# --------------------------------------------------------------------------------------------


def edge(nn):
    """Seed 004's single 1×2 convolution (examples/nets/conv1x2.cnn)."""
    return nn.Sequential(nn.Conv2d(1, 1, kernel_size=(1, 2), bias=False))


def seed_resnet(nn):
    """Seed 000's d2l ResNet with a Linear(512, 1) head (examples/nets/seed_resnet.cnn)."""
    import torch.nn.functional as F

    class Residual(nn.Module):
        def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
            super().__init__()
            self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, stride=strides)
            self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides) if use_1x1conv else None
            self.bn1 = nn.BatchNorm2d(num_channels)
            self.bn2 = nn.BatchNorm2d(num_channels)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            if self.conv3:
                x = self.conv3(x)
            return F.relu(y + x)

    def resnet_block(cin, cout, n, first_block=False):
        return [Residual(cin, cout, use_1x1conv=True, strides=2) if i == 0 and not first_block
                else Residual(cout, cout) for i in range(n)]

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        nn.Sequential(*resnet_block(64, 64, 2, first_block=True)),
        nn.Sequential(*resnet_block(64, 128, 2)),
        nn.Sequential(*resnet_block(128, 256, 2)),
        nn.Sequential(*resnet_block(256, 512, 2)),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, 1),
    )


# name: (builder, .cnn file, input size per sample, loss, label)
NETS = {
    "edge": (edge, "conv1x2.cnn", (1, 6, 8), "mse_sum", "Conv2d(1, 1, (1, 2)) (seed 004)"),
    "lenet": (compare.lenet, "lenet.cnn", (1, 28, 28), "cross_entropy", "LeNet"),
    "cifar10": (compare.cifar10, "cifar10.cnn", (3, 32, 32), "cross_entropy", "CIFAR-10 net"),
    "resnet96": (seed_resnet, "seed_resnet.cnn", (1, 96, 96), "bce_with_logits", "seed ResNet 1×96×96"),
    "resnet224": (seed_resnet, "seed_resnet.cnn", (1, 224, 224), "bce_with_logits", "seed ResNet 1×224×224"),
}

# The issue's rows and its anchors (PyTorch eager, ms median; 1 thread, 2 threads; Zen 4).
ROWS = {
    "edge1": ("edge", 1, (0.249, 0.218)),
    "lenet64": ("lenet", 64, (12.2, 5.42)),
    "cifar10_64": ("cifar10", 64, (77.2, 44.5)),
    "resnet96_32": ("resnet96", 32, (851, 525)),
    "resnet224_8": ("resnet224", 8, (1190, 647)),
}

LR, MOMENTUM = 0.01, 0.9


def parse_row(spec):
    spec = spec.strip()
    if spec in ROWS:
        net, batch, anchors = ROWS[spec]
        return spec, net, batch, anchors
    net, _, b = spec.rpartition("_")
    if net not in NETS or not b.isdigit():
        raise SystemExit(f"unknown row `{spec}`; rows: {' '.join(ROWS)} or NET_BATCH of {' '.join(NETS)}")
    return spec, net, int(b), None


# --------------------------------------------------------------------------------------------
# Data, weights and the PyTorch step
# --------------------------------------------------------------------------------------------


def prepare(torch, nn, net, batch, workdir, seed):
    """The seeded initial state_dict, the batch (x, y) and the net's .cnn file, on disk."""
    from safetensors.torch import save_file

    builder, cnn_file, shape, loss, _ = NETS[net]
    torch.manual_seed(seed)
    model = builder(nn)
    weights = workdir / f"{net}_init.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    g = torch.Generator().manual_seed(seed + 2)
    if net == "edge":  # seed 004: X ones with columns 2..6 zero, Y = corr2d(X, [[1, -1]])
        x = torch.ones(batch, 1, 6, 8)
        x[:, :, :, 2:6] = 0
        y = x[:, :, :, :-1] - x[:, :, :, 1:]
    else:
        x = torch.randn((batch, *shape), generator=g)
        if loss == "cross_entropy":
            y = torch.randint(0, 10, (batch,), generator=g).float()
        else:
            y = torch.randint(0, 2, (batch, 1), generator=g).float()
    data = workdir / f"{net}_b{batch}_data.safetensors"
    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(data))
    cnn = ROOT / "examples" / "nets" / cnn_file
    if shape != (1, 224, 224) and net.startswith("resnet"):  # the same net at another size
        text = cnn.read_text().replace("[N, 1, 224, 224]", f"[N, {', '.join(map(str, shape))}]")
        cnn = workdir / f"{net}.cnn"
        cnn.write_text(text)
    return weights, data, cnn


def torch_serve(args):
    """`--torch-serve`: the PyTorch engine, speaking train_engine's protocol."""
    import torch
    import torch.nn as nn
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads[0])
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    builder, _, _, loss_name, _ = NETS[args.torch_serve]
    model = builder(nn)
    model.load_state_dict(load_file(args.init), strict=True)
    model.train()
    d = load_file(args.data)
    x, y = d["x"], d["y"]
    if loss_name == "cross_entropy":
        crit, y = nn.CrossEntropyLoss(), y.long()
    elif loss_name == "mse_sum":
        crit = nn.MSELoss(reduction="sum")
    else:
        crit = nn.BCEWithLogitsLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step():
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    t = time.perf_counter()
    first = step()
    first_ms = (time.perf_counter() - t) * 1e3
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.save_weights)
    print(json.dumps({"ready": True, "threads": args.threads[0], "first_step_ms": first_ms, "loss": first}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        warm, n = (0, int(words[0])) if len(words) == 1 else (int(words[0]), int(words[1]))
        for _ in range(warm):
            step()
        times, loss = [], float("nan")
        for _ in range(n):
            t = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"times_ms": times, "loss": loss}), flush=True)


class Engine:
    """One serving subprocess per thread count (train_engine, or this script for PyTorch)."""

    def __init__(self, name, commands):
        self.name, self.procs, self.ready = name, {}, {}
        for t, cmd in commands.items():
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, bufsize=1, cwd=ROOT)
            line = p.stdout.readline()
            if not line:
                err = p.stderr.read()
                p.wait()
                raise RuntimeError(f"{name} engine failed to start ({' '.join(map(str, cmd))}):\n{err.strip()}")
            self.procs[t], self.ready[t] = p, json.loads(line)

    def times(self, t, n):
        return compare.request_times(self.procs[t], n, f"the {self.name} engine")

    def peak_rss_mb(self, t):
        try:
            for line in Path(f"/proc/{self.procs[t].pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def pids(self):
        return [p.pid for p in self.procs.values()]

    def close(self):
        compare.close_servers(self.procs.values())


def state_diff(a_path, b_path):
    """Largest |a − b| / (1 + |b|) over every tensor of two state_dicts (float tensors)."""
    from safetensors.numpy import load_file

    a, b = load_file(a_path), load_file(b_path)
    if set(a) != set(b):
        return float("nan"), f"keys differ: {sorted(set(a) ^ set(b))[:4]}"
    worst, where = 0.0, ""
    for k in b:
        x, y = a[k].astype("float64"), b[k].astype("float64")
        if x.shape != y.shape:
            return float("nan"), f"{k}: shape {x.shape} vs {y.shape}"
        if x.size:
            d = float(abs(x - y).max() / (1 + abs(y).max()))
            if d > worst:
                worst, where = d, k
    return worst, where


def measure_row(args, torch, nn, binary, row, workdir):
    rid, net, batch, anchors = row
    label = NETS[net][4]
    loss = NETS[net][3]
    print(f"== {label}, batch {batch} ({rid})", flush=True)
    t0 = time.perf_counter()
    weights, data, cnn = prepare(torch, nn, net, batch, workdir, args.seed)
    torch_cmds = {t: [sys.executable, str(Path(__file__).resolve()), "--torch-serve", net, "--threads", str(t),
                      "--init", str(weights), "--data", str(data),
                      "--save-weights", str(workdir / f"{net}_b{batch}_torch_{t}t.safetensors")]
                  for t in args.threads}
    cnnc_cmds = {t: [str(binary), "--net", str(cnn), "--weights", str(weights), "--data", str(data),
                     "--loss", loss, "--lr", str(LR), "--momentum", str(MOMENTUM), "--threads", str(t), "--serve",
                     "--save-weights", str(workdir / f"{net}_b{batch}_cnnc_{t}t.safetensors")]
                 for t in args.threads}
    engines = {"pytorch": Engine("pytorch", torch_cmds), "cnnc": Engine("cnnc", cnnc_cmds)}
    result = {"row": rid, "net": net, "label": label, "batch": batch, "anchors": anchors, "engines": {},
              "first_step_ms": {}, "first_loss": {}, "state_diff": {}, "peak_rss_mb": {}, "background_cores": []}
    try:
        for e, eng in engines.items():
            for t in args.threads:
                result["first_step_ms"][f"{e}_{t}"] = eng.ready[t]["first_step_ms"]
                result["first_loss"][f"{e}_{t}"] = eng.ready[t]["loss"]
        for t in args.threads:
            d, where = state_diff(workdir / f"{net}_b{batch}_cnnc_{t}t.safetensors",
                                  workdir / f"{net}_b{batch}_torch_{t}t.safetensors")
            result["state_diff"][str(t)] = {"max_rel": d, "where": where}
        # Per-step estimate, to size the bursts.
        est = {}
        for e, eng in engines.items():
            for t in args.threads:
                est[(e, t)] = statistics.median(eng.times(t, 3))
        samples = {(e, t): [] for e in engines for t in args.threads}
        rounds = []
        pids = [p for eng in engines.values() for p in eng.pids()]
        for r in range(args.rounds):
            compare.wait_quiet(args, pids)
            bg = compare.Background(pids).start()
            per_round = {}
            for t in args.threads:
                for e, eng in engines.items():
                    n = max(1, min(2000, int(args.burst * 1e3 / max(est[(e, t)], 1e-3))))
                    ts = eng.times(t, n)
                    samples[(e, t)] += ts
                    per_round[f"{e}_{t}"] = statistics.median(ts)
            result["background_cores"].append(bg.stop())
            rounds.append(per_round)
        for (e, t), ts in samples.items():
            s = sorted(ts)
            result["engines"].setdefault(e, {})[str(t)] = {
                "median_ms": compare.quantile(s, 0.5), "p10_ms": compare.quantile(s, 0.1),
                "p90_ms": compare.quantile(s, 0.9), "runs": len(s),
                "round_medians_ms": [rd[f"{e}_{t}"] for rd in rounds],
            }
        for e, eng in engines.items():
            for t in args.threads:
                result["peak_rss_mb"][f"{e}_{t}"] = eng.peak_rss_mb(t)
    finally:
        for eng in engines.values():
            eng.close()
    for t in args.threads:
        pt, cn = med(result, "pytorch", t), med(result, "cnnc", t)
        print(f"   {t}t: PyTorch {compare.fmt_ms(pt)} ms, cnnc {compare.fmt_ms(cn)} ms "
              f"({compare.fmt_ratio(pt / cn)}); state after step 1 differs by {result['state_diff'][str(t)]['max_rel']:.1e}",
              flush=True)
    print(f"   row done in {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def med(r, e, t):
    return r["engines"].get(e, {}).get(str(t), {}).get("median_ms", float("nan"))


def table(results, threads):
    tl = " / ".join(f"{t}t" for t in threads)
    lines = [f"| Net | Batch | PyTorch ms ({tl}) | cnnc ms ({tl}) | PyTorch/cnnc ({tl}) "
             f"| peak RSS MB PyTorch / cnnc ({threads[0]}t) | state after step 1, max rel. diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['label']} | {r['batch']} | – | – | – | – | {r['skipped']} |")
            continue

        def col(f):
            return " / ".join(f(t) for t in threads)

        rss = r.get("peak_rss_mb", {})
        t0 = threads[0]
        rss_s = f"{rss.get(f'pytorch_{t0}') or 0:.0f} / {rss.get(f'cnnc_{t0}') or 0:.0f}"
        diff = max(v["max_rel"] for v in r["state_diff"].values())
        lines.append(
            f"| {r['label']} | {r['batch']} "
            f"| {col(lambda t: compare.fmt_ms(med(r, 'pytorch', t)))} "
            f"| {col(lambda t: compare.fmt_ms(med(r, 'cnnc', t)))} "
            f"| {col(lambda t: compare.fmt_ratio(med(r, 'pytorch', t) / med(r, 'cnnc', t)))} "
            f"| {rss_s} | {diff:.1e} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: the issue's table)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of short bursts instead of 5")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--burst", type=float, help="seconds per engine burst (default 1.0, --quick 0.3)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S")
    ap.add_argument("--quiet", type=float, default=0.3, metavar="CORES")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write every measurement as JSON")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: print the table of a saved --out file")
    ap.add_argument("--cnnc-bin", help="a prebuilt train_engine binary (skips cargo build)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--workdir", help="keep weights and data here (default: a temp dir)")
    # The PyTorch engine (internal): run as a subprocess by the benchmark itself.
    ap.add_argument("--torch-serve", metavar="NET", help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--save-weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not args.threads or min(args.threads) < 1:
        raise SystemExit("--threads: give positive thread counts, e.g. 1,2")
    if args.torch_serve:
        return torch_serve(args)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.burst = args.burst or (0.3 if args.quick else 1.0)
    rows = [parse_row(r) for r in args.rows.split(",") if r.strip()]
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        print(table(doc["results"], doc["threads"]))
        return
    try:
        import safetensors  # noqa: F401
        import torch
        import torch.nn as nn
    except ImportError as e:
        raise SystemExit(f"{e}\nneeds: pip install torch safetensors")
    binary = compare.build_cnnc(args, "train_engine")
    info = compare.machine()
    info.update(torch=torch.__version__)
    started = datetime.datetime.now().astimezone()
    print(f"training step, cnnc vs PyTorch eager — {info.get('cpu', '?')}, {info.get('cpus', '?')} CPUs, "
          f"flags {' '.join(info.get('flags', []))}; torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory(prefix="cnnc-train-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for row in rows:
            try:
                results.append(measure_row(args, torch, nn, binary, row, workdir))
            except Exception as e:  # keep the other rows
                print(f"   FAILED: {e}", flush=True)
                results.append({"row": row[0], "net": row[1], "label": NETS[row[1]][4], "batch": row[2],
                                "engines": {}, "skipped": f"failed: {str(e).splitlines()[0]}"})
            if args.out:
                write_json(args, info, started, results)
    tab = table(results, args.threads)
    print("\nmedian ms per training step; ratios > 1 mean cnnc is faster\n")
    print(tab)
    if args.markdown:
        Path(args.markdown).write_text(tab + "\n")
    if args.out:
        write_json(args, info, started, results)
        print(f"results: {args.out}")


def write_json(args, info, started, results):
    doc = {"date": started.isoformat(timespec="seconds"), "command": "python bench/compare_train.py " +
           " ".join(sys.argv[1:]), "machine": info, "threads": args.threads, "rounds": args.rounds,
           "burst_s": args.burst, "lr": LR, "momentum": MOMENTUM, "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
