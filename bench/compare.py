#!/usr/bin/env python3
"""cnnc vs PyTorch (eager) vs ONNX Runtime on the seed nets, CPU, batch latency.

For every row (net, batch) of the table and every thread count, the three engines run the
same net with the same seeded random weights on the same input:

- PyTorch eager: ``torch.inference_mode()``, ``torch.set_num_threads(t)``;
- ONNX Runtime: the model exported with ``torch.onnx.export(..., dynamo=False,
  opset_version=17)``, CPU provider, ``intra_op_num_threads = t``, ``inter_op_num_threads = 1``,
  sequential execution, all graph optimisations;
- cnnc: the ``bench_engine`` example (``cargo build --release --example bench_engine``),
  compiling the matching ``examples/nets/*.cnn`` with the JIT and loading the PyTorch
  ``state_dict`` saved with ``safetensors.torch.save_file``. It runs as a subprocess in
  ``--serve`` mode, so it compiles once and is then driven burst by burst.

The engines are interleaved: each row runs ``--rounds`` rounds, and in each round every
(threads, engine) pair runs one short timed burst (about ``--burst`` seconds). The reported
time is the median of all timed runs of an engine, so slow phases of a shared, noisy machine
hit every engine alike. cnnc's and ONNX Runtime's outputs are checked against PyTorch's
(max abs difference).

Needs: ``pip install torch torchvision onnx onnxruntime safetensors`` (matplotlib optional;
without it the plot is written as hand-made SVG) and a Rust toolchain. Installs nothing.

    python bench/compare.py                       # every row, 1 and 2 threads
    python bench/compare.py --quick --rows lenet1,resnet18_1 --threads 1
    python bench/compare.py --out results.json --plot docs/performance_ratios.svg

Row names: ``lenet1 lenet64 cifar10_1 cifar10_64 alexnet1 vgg11_8 resnet18_1 resnet18_64``;
any ``NET_BATCH`` (or ``NETBATCH``) of the five nets works too, e.g. ``resnet18_8``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# The nets, as PyTorch modules whose state_dict keys match the .cnn files' parameter names.
# --------------------------------------------------------------------------------------------


def lenet(nn):
    """d2l's LeNet (examples/nets/lenet.cnn)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def cifar10(nn):
    """The study notes' CIFAR-10 model: one child `model1` (examples/nets/cifar10.cnn)."""

    class Cifar10(nn.Module):
        def __init__(self):
            super().__init__()
            self.model1 = nn.Sequential(
                nn.Conv2d(3, 32, 5, padding=2),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 5, padding=2),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 5, padding=2),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(1024, 64),
                nn.Linear(64, 10),
            )

        def forward(self, x):
            return self.model1(x)

    return Cifar10()


def alexnet(nn):
    """d2l's AlexNet, 1 channel, 10 classes (examples/nets/alexnet.cnn)."""
    return nn.Sequential(
        nn.Conv2d(1, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(6400, 4096), nn.ReLU(), nn.Dropout(p=0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(p=0.5),
        nn.Linear(4096, 10),
    )


def vgg11(nn):
    """d2l's vgg(conv_arch), 1 channel (examples/nets/vgg11.cnn)."""

    def vgg_block(num_convs, in_channels, out_channels):
        layers = []
        for _ in range(num_convs):
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            layers.append(nn.ReLU())
            in_channels = out_channels
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        return nn.Sequential(*layers)

    conv_arch = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
    conv_blks = []
    in_channels = 1
    for num_convs, out_channels in conv_arch:
        conv_blks.append(vgg_block(num_convs, in_channels, out_channels))
        in_channels = out_channels
    return nn.Sequential(
        *conv_blks, nn.Flatten(),
        nn.Linear(out_channels * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 10),
    )


def resnet18(nn):
    """torchvision's ResNet-18 (examples/nets/resnet18.cnn)."""
    import torchvision

    return torchvision.models.resnet18()


# name: (builder, .cnn file, per-sample input shape, label)
NETS = {
    "lenet": (lenet, "lenet.cnn", (1, 28, 28), "LeNet"),
    "cifar10": (cifar10, "cifar10.cnn", (3, 32, 32), "CIFAR-10 net"),
    "alexnet": (alexnet, "alexnet.cnn", (1, 224, 224), "AlexNet (1×224×224)"),
    "vgg11": (vgg11, "vgg11.cnn", (1, 224, 224), "VGG-11 (1×224×224)"),
    "resnet18": (resnet18, "resnet18.cnn", (3, 224, 224), "ResNet-18"),
}

# The rows and the anchors measured there (ms median; PyTorch 1t, 2t; ORT 1t, 2t).
ROWS = {
    "lenet1": ("lenet", 1, (0.202, 0.212, 0.031, 0.031)),
    "lenet64": ("lenet", 64, (2.53, 1.64, 1.41, 0.86)),
    "cifar10_1": ("cifar10", 1, (0.92, 0.81, 0.30, 0.175)),
    "cifar10_64": ("cifar10", 64, (42.6, 26.3, 17.2, 9.3)),
    "alexnet1": ("alexnet", 1, (36.1, 25.0, 27.8, 16.3)),
    "vgg11_8": ("vgg11", 8, (1761, 942, 1145, 574)),
    "resnet18_1": ("resnet18", 1, (50.6, 29.8, 34.5, 18.3)),
    "resnet18_64": ("resnet18", 64, (3796, 2244, 2204, 1134)),
}

ENGINES = ("pytorch", "ort", "cnnc")  # plus "cnnc_fused" with --fused
ENGINE_LABEL = {"pytorch": "PyTorch", "ort": "ORT", "cnnc": "cnnc", "cnnc_fused": "cnnc fused",
                "cnnc_onnx": "cnnc on the .onnx"}


def parse_row(spec: str):
    """`lenet1`, `cifar10_64`, `resnet18_8` → (row id, net, batch, anchors or None)."""
    spec = spec.strip().lower()
    m = re.fullmatch(r"(lenet|cifar10|alexnet|vgg11|resnet18)_?(\d+)", spec)
    if not m:
        raise SystemExit(f"unknown row `{spec}`; expected e.g. {', '.join(ROWS)}")
    net, batch = m.group(1), int(m.group(2))
    if batch < 1:
        raise SystemExit(f"row `{spec}`: batch must be at least 1")
    for rid, (n, b, anchors) in ROWS.items():
        if n == net and b == batch:
            return rid, net, batch, anchors
    return f"{net}_{batch}", net, batch, None


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


class TorchEngine:
    def __init__(self, torch, model, x):
        self.torch, self.model, self.x = torch, model, x

    def output(self, threads):
        self.torch.set_num_threads(threads)
        with self.torch.inference_mode():
            return self.model(self.x).numpy()

    def times(self, threads, n):
        torch, model, x = self.torch, self.model, self.x
        torch.set_num_threads(threads)
        out = []
        with torch.inference_mode():
            for _ in range(n):
                t = time.perf_counter()
                model(x)
                out.append((time.perf_counter() - t) * 1e3)
        return out

    def close(self):
        pass


def ort_session_options(ort, threads):
    """The ONNX Runtime settings of every measurement: `threads` intra-op threads, one
    inter-op thread, sequential execution, all graph optimisations."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


class OrtEngine:
    def __init__(self, ort, path, x_np, threads):
        self.sessions = {}
        for t in threads:
            so = ort_session_options(ort, t)
            self.sessions[t] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.name = self.sessions[threads[0]].get_inputs()[0].name
        self.feed = {self.name: x_np}

    def output(self, threads):
        return self.sessions[threads].run(None, self.feed)[0]

    def times(self, threads, n):
        s, feed = self.sessions[threads], self.feed
        out = []
        for _ in range(n):
            t = time.perf_counter()
            s.run(None, feed)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    def close(self):
        self.sessions.clear()


class CnncEngine:
    """One `bench_engine --serve` process per thread count."""

    def __init__(self, binary, cnn, weights, inp, out_prefix, threads, fused=False):
        self.procs, self.ready = {}, {}
        for t in threads:
            cmd = [
                str(binary), "--net", str(cnn), "--input", str(inp),
                "--threads", str(t), "--serve", "--save-output", f"{out_prefix}_{t}t.safetensors",
            ] + (["--weights", str(weights)] if weights else []) + (["--fused"] if fused else [])
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, bufsize=1, cwd=ROOT)
            line = p.stdout.readline()
            if not line:
                err = p.stderr.read()
                p.wait()
                raise RuntimeError(f"bench_engine failed to start ({' '.join(cmd)}):\n{err.strip()}")
            self.procs[t] = p
            self.ready[t] = json.loads(line)
        self.out_prefix = out_prefix

    def output(self, threads):
        from safetensors.numpy import load_file

        return load_file(f"{self.out_prefix}_{threads}t.safetensors")["output"]

    def times(self, threads, n):
        return request_times(self.procs[threads], n, "bench_engine")

    def close(self):
        close_servers(self.procs.values())
        self.procs.clear()


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def build_cnnc(args, example="bench_engine"):
    """The release binary of the cnnc engine `example` (built unless --no-build or --cnnc-bin)."""
    if args.cnnc_bin:
        return Path(args.cnnc_bin)
    binary = ROOT / "target" / "release" / "examples" / example
    if not args.no_build:
        print(f"building: cargo build --release --example {example}", flush=True)
        subprocess.run(["cargo", "build", "--release", "--example", example], cwd=ROOT, check=True)
    if not binary.exists():
        raise SystemExit(f"{binary} not found; build it with `cargo build --release --example {example}`")
    return binary


def request_times(p, n, name):
    """Asks a serving subprocess for `n` timed runs (`0 N` on stdin) and returns their times."""
    p.stdin.write(f"0 {n}\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"{name} exited: {p.stderr.read().strip()}")
    return json.loads(line)["times_ms"]


def close_servers(procs):
    """Asks each serving subprocess to quit, then waits for it (kills it after 30 s)."""
    for p in procs:
        try:
            p.stdin.write("quit\n")
            p.stdin.flush()
            p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def max_abs_diff(a, b):
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def prepare(torch, nn, net, batch, workdir, seed):
    """Builds the PyTorch model with seeded weights, its safetensors, input and ONNX files."""
    from safetensors.torch import save_file

    builder, cnn_file, shape, _ = NETS[net]
    torch.manual_seed(seed)
    model = builder(nn)
    # Non-trivial BatchNorm statistics, so the folded affine maps are exercised.
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    model.eval()
    weights = workdir / f"{net}.safetensors"
    if not weights.exists():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed + 2))
    inp = workdir / f"{net}_b{batch}_input.safetensors"
    save_file({"input": x.contiguous()}, str(inp))
    onnx_path = workdir / f"{net}_b{batch}.onnx"
    if not onnx_path.exists():
        with torch.inference_mode():
            torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"])
    return model, x, weights, inp, onnx_path, ROOT / "examples" / "nets" / cnn_file


def measure_row(args, torch, nn, ort, binary, row, workdir):
    rid, net, batch, anchors = row
    label = NETS[net][3]
    threads = args.threads
    print(f"\n== {label}, batch {batch} ({rid}) ==", flush=True)
    t0 = time.perf_counter()
    model, x, weights, inp, onnx_path, cnn = prepare(torch, nn, net, batch, workdir, args.seed)
    print(f"   prepared weights/input/ONNX in {time.perf_counter() - t0:.1f} s", flush=True)
    engines = {}
    result = {"row": rid, "net": net, "label": label, "batch": batch, "anchors": anchors, "engines": {},
              "loadavg_before": loadavg()}
    try:
        engines["pytorch"] = TorchEngine(torch, model, x)
        engines["ort"] = OrtEngine(ort, onnx_path, x.numpy(), threads)
        t = time.perf_counter()
        engines["cnnc"] = CnncEngine(binary, cnn, weights, inp, workdir / f"{rid}_cnnc_out", threads)
        if "cnnc_fused" in args.engines:
            engines["cnnc_fused"] = CnncEngine(binary, cnn, weights, inp, workdir / f"{rid}_cnnc_fused_out", threads,
                                               fused=True)
        if "cnnc_onnx" in args.engines:
            # The very file ORT runs, imported by cnnc with the weights inside it, fused.
            engines["cnnc_onnx"] = CnncEngine(binary, onnx_path, None, inp, workdir / f"{rid}_cnnc_onnx_out", threads,
                                              fused=True)
        for e in args.engines[2:]:
            result[f"{e}_compile_ms"] = {t_: r["compile_ms"] for t_, r in engines[e].ready.items()}
            result[f"{e}_kernels"] = next(iter(engines[e].ready.values()))["kernels"]
            print(f"   {ENGINE_LABEL[e]} compiled in "
                  f"{', '.join(f'{v:.0f} ms ({k}t)' for k, v in result[f'{e}_compile_ms'].items())}, "
                  f"{result[f'{e}_kernels']} kernels", flush=True)
        print(f"   cnnc processes up after {time.perf_counter() - t:.1f} s", flush=True)

        # Correctness: every engine's output against PyTorch's (1 thread) on the same input.
        ref = engines["pytorch"].output(threads[0])
        scale = float(abs(ref).max()) if ref.size else 0.0
        result["max_abs_output"] = scale
        result["max_abs_diff"] = {
            f"{e}_{t}t": max_abs_diff(engines[e].output(t), ref) for e in args.engines[1:] for t in threads
        }
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in result["max_abs_diff"].items())
        print(f"   max |output − PyTorch|: {diffs} (max |PyTorch output| {scale:.3g})", flush=True)

        # Warm-up and calibration: a few untimed-for-the-result runs per (engine, threads).
        est = {}
        for t in threads:
            for e in args.engines:
                runs = []
                start = time.perf_counter()
                while True:
                    runs += engines[e].times(t, 1)
                    elapsed = time.perf_counter() - start
                    if len(runs) >= 50 or (len(runs) >= 2 and elapsed >= args.warm) or runs[-1] > 2e3:
                        break
                est[(e, t)] = statistics.median(runs[1:] if len(runs) > 1 else runs)
        # Runs per burst, and rounds that fit the row's time limit.
        burst_n = {k: max(args.min_iters, min(args.max_iters, round(args.burst * 1e3 / v))) for k, v in est.items()}
        per_round = sum(burst_n[k] * est[k] for k in est) / 1e3
        rounds = args.rounds
        if per_round * rounds > args.row_limit:
            burst_n = {k: args.min_iters for k in est}
            per_round = sum(burst_n[k] * est[k] for k in est) / 1e3
            rounds = max(1, min(rounds, int(args.row_limit // per_round)))
            if per_round * rounds > args.row_limit * 1.5:
                note = (f"skipped: one round takes ~{per_round:.0f} s, over the {args.row_limit:g} s limit "
                        "(raise --row-limit)")
                print(f"   {note}", flush=True)
                result["skipped"] = note
                result["estimate_ms"] = {f"{e}_{t}t": v for (e, t), v in est.items()}
                return result
        result["rounds"] = rounds
        print(f"   {rounds} rounds × ~{per_round:.1f} s; runs per burst: "
              + ", ".join(f"{ENGINE_LABEL[e]} {t}t {burst_n[(e, t)]}" for t in threads for e in args.engines), flush=True)

        samples = {k: [] for k in est}
        per_round_medians = {k: [] for k in est}
        pids = [p.pid for e in args.engines[2:] for p in engines[e].procs.values()]
        result["background_cores"] = []
        for r in range(rounds):
            wait_quiet(args, pids)
            bg = Background(pids).start()
            # Rotate the order every round so no engine always runs first after a pause.
            order = [(e, t) for t in threads for e in args.engines]
            shift = r % len(order)
            order = order[shift:] + order[:shift]
            for k in order:
                ts = engines[k[0]].times(k[1], burst_n[k])
                samples[k] += ts
                per_round_medians[k].append(statistics.median(ts))
            busy = bg.stop()
            result["background_cores"].append(busy)
            line = "  ".join(f"{ENGINE_LABEL[e]} {t}t {per_round_medians[(e, t)][-1]:.3f}"
                             for t in threads for e in args.engines)
            print(f"   round {r + 1}/{rounds}: {line} ms (other processes: {busy} cores)", flush=True)

        for (e, t), ts in samples.items():
            s = sorted(ts)
            result["engines"][f"{e}_{t}t"] = {
                "median_ms": statistics.median(s),
                "p10_ms": quantile(s, 0.1),
                "p90_ms": quantile(s, 0.9),
                "runs": len(s),
                "round_medians_ms": per_round_medians[(e, t)],
            }
    finally:
        for e in engines.values():
            e.close()
    result["loadavg_after"] = loadavg()
    print(f"   row done in {time.perf_counter() - t0:.0f} s (load average {result['loadavg_after']})", flush=True)
    return result


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_ticks():
    """(busy, total) jiffies of the whole machine, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = v[0] + v[1] + v[2] + sum(v[5:8])
    return busy, busy + v[3] + v[4]


def own_ticks(pids):
    """CPU jiffies used so far by this process and the given child processes."""
    t = os.times()
    total = (t.user + t.system) * CLK_TCK
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total


class Background:
    """Cores kept busy by other processes between `start` and `stop`."""

    def __init__(self, pids=()):
        self.pids = list(pids)

    def start(self):
        self.m0, self.o0 = cpu_ticks(), own_ticks(self.pids)
        return self

    def stop(self):
        m1, o1 = cpu_ticks(), own_ticks(self.pids)
        if not self.m0 or not m1 or m1[1] == self.m0[1]:
            return None
        ncpu = os.cpu_count() or 1
        elapsed = (m1[1] - self.m0[1]) / ncpu  # jiffies of wall time
        others = (m1[0] - self.m0[0]) - (o1 - self.o0)
        return round(max(0.0, others / elapsed), 2)


def wait_quiet(args, pids):
    """Waits (at most --wait-quiet seconds) until other processes use under --quiet cores."""
    if args.wait_quiet <= 0:
        return None
    deadline = time.monotonic() + args.wait_quiet
    told = False
    while True:
        b = Background(pids).start()
        time.sleep(1.0)
        busy = b.stop()
        if busy is None or busy < args.quiet or time.monotonic() >= deadline:
            return busy
        if not told:
            print(f"   waiting for a quieter machine (others use {busy} cores)", flush=True)
            told = True


def quantile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def fmt_ms(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(v):
    if v is None or math.isnan(v):
        return "–"
    return f"{v:.2f}×" if v < 10 else f"{v:.1f}×"


def med(res, e, t):
    m = res["engines"].get(f"{e}_{t}t")
    return m["median_ms"] if m else None


def ratio(a, b):
    return a / b if a is not None and b else float("nan")


def best_cnnc(results):
    """The cnnc variant the ratios use: the fused one when it was measured."""
    fused = any(k.startswith("cnnc_fused") for r in results for k in r["engines"])
    return "cnnc_fused" if fused else "cnnc"


def table(results, threads):
    tl = " / ".join(f"{t}t" for t in threads)
    best = best_cnnc(results)
    cn = ENGINE_LABEL[best]
    fused_col = f"| cnnc fused ms ({tl}) " if best == "cnnc_fused" else ""
    onnx = any(k.startswith("cnnc_onnx") for r in results for k in r["engines"])
    onnx_col = f"| cnnc on the .onnx ms ({tl}) | ORT/cnnc on the .onnx ({tl}) " if onnx else ""
    head = (f"| Net | Batch | PyTorch ms ({tl}) | ORT ms ({tl}) | cnnc ms ({tl}) {fused_col}| ORT/{cn} ({tl}) "
            f"| PyTorch/{cn} ({tl}) {onnx_col}| max abs diff cnnc vs PyTorch |")
    ncols = 6 + (best == "cnnc_fused") + 2 * onnx
    lines = [head, "|" + "---|" * 2 + "---:|" * ncols]
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['label']} | {r['batch']} |" + " – |" * (ncols - 1) + f" {r['skipped']} |")
            continue

        def col(f):
            return " / ".join(f(t) for t in threads)

        diff = max((v for k, v in r["max_abs_diff"].items() if k.startswith("cnnc")), default=float("nan"))
        lines.append(
            f"| {r['label']} | {r['batch']} "
            f"| {col(lambda t: fmt_ms(med(r, 'pytorch', t)))} "
            f"| {col(lambda t: fmt_ms(med(r, 'ort', t)))} "
            f"| {col(lambda t: fmt_ms(med(r, 'cnnc', t)))} "
            + (f"| {col(lambda t: fmt_ms(med(r, 'cnnc_fused', t)))} " if best == "cnnc_fused" else "")
            + f"| {col(lambda t: fmt_ratio(ratio(med(r, 'ort', t), med(r, best, t))))} "
            f"| {col(lambda t: fmt_ratio(ratio(med(r, 'pytorch', t), med(r, best, t))))} "
            + (f"| {col(lambda t: fmt_ms(med(r, 'cnnc_onnx', t)))} "
               f"| {col(lambda t: fmt_ratio(ratio(med(r, 'ort', t), med(r, 'cnnc_onnx', t))))} " if onnx else "")
            + f"| {diff:.1e} (of max {r['max_abs_output']:.2g}) |"
        )
    return "\n".join(lines)


def anchor_table(results, threads):
    """This run's PyTorch/ORT medians next to the issue's anchors (how comparable the machine is)."""
    idx = {1: 0, 2: 1}
    shown = [t for t in threads if t in idx]
    if not shown:
        return ""
    tl = " / ".join(f"{t}t" for t in shown)
    lines = [f"| Net | Batch | PyTorch now ({tl}) | PyTorch issue | ORT now ({tl}) | ORT issue "
             "| other processes (cores, median of rounds) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        a = r.get("anchors")
        if not a or r.get("skipped"):
            continue
        lines.append(
            f"| {r['label']} | {r['batch']} "
            f"| {' / '.join(fmt_ms(med(r, 'pytorch', t)) for t in shown)} "
            f"| {' / '.join(fmt_ms(a[idx[t]]) for t in shown)} "
            f"| {' / '.join(fmt_ms(med(r, 'ort', t)) for t in shown)} "
            f"| {' / '.join(fmt_ms(a[2 + idx[t]]) for t in shown)} "
            f"| {background(r)} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def background(r):
    b = [v for v in r.get("background_cores") or [] if v is not None]
    return f"{statistics.median(b):.2f}" if b else "–"


def ratio_series(results, threads):
    """[(row label, {series name: ratio})] for the plot."""
    best = best_cnnc(results)
    out = []
    for r in results:
        if r.get("skipped"):
            continue
        vals = {}
        for e in ("ort", "pytorch"):
            for t in threads:
                vals[f"{ENGINE_LABEL[e]}/{ENGINE_LABEL[best]} {t}t"] = ratio(med(r, e, t), med(r, best, t))
        short = r["label"].split(" (")[0]
        out.append((f"{short} b{r['batch']}", vals))
    return out


COLORS = ["#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a"]


def plot(results, threads, path: Path, title: str):
    series = ratio_series(results, threads)
    if not series:
        return None
    names = list(series[0][1])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    path.parent.mkdir(parents=True, exist_ok=True)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(series)), 4.2))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(series))]
            ys = [s[1][n] if not math.isnan(s[1][n]) else 0 for s in series]
            ax.bar(xs, ys, width, label=n, color=COLORS[i % len(COLORS)])
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xticks(range(len(series)), [s[0] for s in series], rotation=20)
        ax.set_ylabel("time ratio (> 1: cnnc faster)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        return path
    path.write_text(svg_bars(series, names, title))
    return path


def svg_bars(series, names, title):
    """A grouped bar chart on a log axis, as plain SVG."""
    vals = [v for _, d in series for v in d.values() if v and not math.isnan(v) and v > 0]
    lo = 10 ** math.floor(math.log10(min(vals + [1.0])))
    hi = 10 ** math.ceil(math.log10(max(vals + [1.0])))
    if hi <= lo:
        hi = lo * 10
    legend_w = 12 + 7 * max(len(n) for n in names)
    left, right, top, bottom = 70, 70 + legend_w, 40, 70
    W, H = max(720, 110 * len(series) + left + right), 420
    pw, ph = W - left - right, H - top - bottom

    def y(v):
        return top + ph * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{esc(title)}</text>']
    # Gridlines at every power of ten (and 2×, 5× in between, unlabelled).
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= v <= hi * 1.0001:
                yy = y(v)
                out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                           f'stroke="{"#bbb" if m == 1 else "#eee"}"/>')
                if m == 1 or (hi / lo) <= 100:
                    out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{v:g}×</text>')
        e += 1
    y1 = y(1.0)
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y1:.1f}" y2="{y1:.1f}" stroke="black" stroke-width="1.5"/>')
    out.append(f'<text x="{left + pw + 4}" y="{y1 + 4:.1f}" font-size="11">parity</text>')
    group = pw / len(series)
    bw = group * 0.8 / len(names)
    for j, (label, d) in enumerate(series):
        x0 = left + j * group + group * 0.1
        for i, n in enumerate(names):
            v = d[n]
            if not v or math.isnan(v):
                continue
            yy = y(v)
            top_y, h = min(yy, y1), abs(y1 - yy)
            out.append(f'<rect x="{x0 + i * bw:.1f}" y="{top_y:.1f}" width="{bw * 0.92:.1f}" height="{max(h, 0.5):.1f}" '
                       f'fill="{COLORS[i % len(COLORS)]}"><title>{esc(label)} {esc(n)}: {v:.3g}×</title></rect>')
        out.append(f'<text x="{x0 + group * 0.4:.1f}" y="{top + ph + 18}" text-anchor="middle">{esc(label)}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="black"/>')
    out.append(f'<text transform="translate(16,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
               'time ratio, log scale (&gt; 1: cnnc faster)</text>')
    for i, n in enumerate(names):
        ly = top + 10 + 20 * i
        out.append(f'<rect x="{left + pw + 45}" y="{ly - 10}" width="14" height="14" fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<text x="{left + pw + 65}" y="{ly + 1}">{esc(n)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine():
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "compiler", "runtime", "src"], cwd=ROOT,
                               capture_output=True, text=True)
        if head.returncode == 0:
            info["cnnc_commit"] = head.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                info["cpu"] = v.strip()
            if k.strip() == "CPU(s)":
                info["cpus"] = int(v.strip())
            if k.strip() == "Flags":
                flags = set(v.split())
                info["flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags]
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: the issue's table)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of short bursts instead of 5")
    ap.add_argument("--rounds", type=int, help="rounds per row (default 5, --quick 3)")
    ap.add_argument("--burst", type=float, help="seconds per engine burst (default 1.0, --quick 0.3)")
    ap.add_argument("--row-limit", type=float, default=300.0,
                    help="seconds one row may take; slower rows are cut to 1 run per burst, then skipped")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each round, wait up to S seconds until other processes use < --quiet cores")
    ap.add_argument("--quiet", type=float, default=0.3, metavar="CORES",
                    help="CPU use of other processes that counts as quiet (default 0.3 cores)")
    ap.add_argument("--fused", action="store_true",
                    help="also run cnnc with the fusion passes (bench_engine --fused); the ratios then use it")
    ap.add_argument("--onnx", action="store_true",
                    help="also run cnnc on the very .onnx file ORT runs (imported with its weights, fused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write every measurement as JSON")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "performance_ratios.svg"),
                    help="ratio chart (.svg or .png; default docs/performance_ratios.svg); '' for none")
    ap.add_argument("--markdown", help="also write the tables as Markdown to this file")
    ap.add_argument("--from-json", metavar="FILE",
                    help="measure nothing: print the tables and draw the plot of a saved --out file")
    ap.add_argument("--cnnc-bin", help="a prebuilt bench_engine binary (skips cargo build)")
    ap.add_argument("--no-build", action="store_true", help="use target/release/examples/bench_engine as is")
    ap.add_argument("--workdir", help="keep weights, inputs and ONNX files here (default: a temp dir)")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not args.threads or min(args.threads) < 1:
        raise SystemExit("--threads: give positive thread counts, e.g. 1,2")
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.burst = args.burst or (0.3 if args.quick else 1.0)
    args.warm = 0.3 if args.quick else 1.0
    args.min_iters, args.max_iters = 1, 2000
    args.engines = list(ENGINES) + (["cnnc_fused"] if args.fused else []) + (["cnnc_onnx"] if args.onnx else [])
    rows = [parse_row(r) for r in args.rows.split(",") if r.strip()]
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        report(args, doc["results"], doc["threads"])
        return

    try:
        import numpy  # noqa: F401
        import onnxruntime as ort
        import safetensors  # noqa: F401
        import torch
        import torch.nn as nn
    except ImportError as e:
        raise SystemExit(f"{e}\nneeds: pip install torch torchvision onnx onnxruntime safetensors")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    ort.set_default_logger_severity(3)

    binary = build_cnnc(args)
    info = machine()
    info.update(torch=torch.__version__, onnxruntime=ort.__version__)
    started = datetime.datetime.now().astimezone()
    command = "python bench/compare.py " + " ".join(sys.argv[1:])
    print(f"cnnc vs PyTorch vs ONNX Runtime — {info.get('cpu', '?')}, {info.get('cpus', '?')} CPUs, "
          f"flags {' '.join(info.get('flags', []))}; torch {torch.__version__}, onnxruntime {ort.__version__}")

    results = []
    with tempfile.TemporaryDirectory(prefix="cnnc-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for row in rows:
            try:
                results.append(measure_row(args, torch, nn, ort, binary, row, workdir))
            except Exception as e:  # keep the other rows
                _, net, batch, anchors = row
                print(f"   FAILED: {e}", flush=True)
                results.append({"row": row[0], "net": net, "label": NETS[net][3], "batch": batch,
                                "anchors": anchors, "engines": {}, "skipped": f"failed: {str(e).splitlines()[0]}"})
            if args.out:  # after every row, so a long run leaves partial results
                write_json(args, info, started, command, results)

    report(args, results, args.threads)
    if args.out:
        write_json(args, info, started, command, results)
        print(f"results: {args.out}")


def report(args, results, threads):
    """Prints the tables, writes --markdown and the plot."""
    tab = table(results, threads)
    anchors = anchor_table(results, threads)
    print("\nmedian ms per batch; ratios > 1 mean cnnc is faster\n")
    print(tab)
    if anchors:
        print("\nPyTorch and ONNX Runtime now vs the issue's anchors (machine noise check)\n")
        print(anchors)
    if args.plot:
        p = plot(results, threads, Path(args.plot),
                 "cnnc speed vs ONNX Runtime and PyTorch (time ratio, > 1: cnnc faster)")
        if p:
            print(f"\nplot: {p}")
    if args.markdown:
        Path(args.markdown).write_text(tab + "\n\n" + anchors + "\n")


def write_json(args, info, started, command, results):
    doc = {"date": started.isoformat(timespec="seconds"), "command": command, "machine": info,
           "threads": args.threads, "rounds": args.rounds, "burst_s": args.burst, "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
