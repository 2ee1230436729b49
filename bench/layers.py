#!/usr/bin/env python3
"""Per-layer breakdown: each distinct layer of a net, alone, in PyTorch eager and in cnnc.

Every leaf layer of the PyTorch model (Conv2d, Linear, pools, BatchNorm2d, activations) is
recorded with its input shape during one forward pass; identical (layer, input shape) pairs
are merged and counted. Each distinct layer is then timed on its own:

- PyTorch: the module itself, ``torch.inference_mode()``, ``torch.set_num_threads(t)``;
- cnnc: a one-layer ``.cnn`` net (``net L(x: [N, …]) = Sequential(<layer>);``) run by
  ``bench_engine`` (random weights; timing does not depend on them),

interleaved over ``--rounds`` rounds, medians reported. The "share" columns multiply by the
layer's count and divide by the sum over layers, which tells which layers dominate the
whole net. Layers alone are not the whole story: inside a net cnnc may fuse an activation or
a BatchNorm into the preceding convolution, and both engines keep data in cache between
layers. The sums are a guide, not the net's latency.

    python bench/layers.py --net resnet18 --batch 1
    python bench/layers.py --net vgg11 --batch 8 --threads 2 --rounds 2

Needs what compare.py needs (torch, torchvision, safetensors) and a built bench_engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

ROOT = compare.ROOT


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def dsl_of(m, nn):
    """The cnnc DSL constructor of a PyTorch leaf module, or None if not timed."""
    if isinstance(m, nn.Conv2d):
        k, s, p, d = pair(m.kernel_size), pair(m.stride), pair(m.padding), pair(m.dilation)
        text = f"Conv2d({m.in_channels}, {m.out_channels}, kernel_size = ({k[0]}, {k[1]}), stride = ({s[0]}, {s[1]})"
        text += f", padding = ({p[0]}, {p[1]})"
        if d != (1, 1):
            text += f", dilation = ({d[0]}, {d[1]})"
        if m.groups != 1:
            text += f", groups = {m.groups}"
        return text + ("" if m.bias is not None else ", bias = False") + ")"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}, {m.out_features}" + ("" if m.bias is not None else ", bias = False") + ")"
    if isinstance(m, nn.MaxPool2d):
        k, s, p = pair(m.kernel_size), pair(m.stride), pair(m.padding)
        return f"MaxPool2d(kernel_size = ({k[0]}, {k[1]}), stride = ({s[0]}, {s[1]}), padding = ({p[0]}, {p[1]}))"
    if isinstance(m, nn.AvgPool2d):
        k, s, p = pair(m.kernel_size), pair(m.stride), pair(m.padding)
        return f"AvgPool2d(kernel_size = ({k[0]}, {k[1]}), stride = ({s[0]}, {s[1]}), padding = ({p[0]}, {p[1]}))"
    if isinstance(m, nn.AdaptiveAvgPool2d):
        o = pair(m.output_size)
        return f"AdaptiveAvgPool2d(({o[0]}, {o[1]}))"
    if isinstance(m, nn.BatchNorm2d):
        return f"BatchNorm2d({m.num_features})"
    if isinstance(m, nn.ReLU):
        return "ReLU()"
    if isinstance(m, nn.Sigmoid):
        return "Sigmoid()"
    return None


def macs(m, nn, in_shape, out_shape):
    """Multiply-accumulates per batch of a conv or linear layer (0 for the others)."""
    import math

    if isinstance(m, nn.Conv2d):
        k = pair(m.kernel_size)
        return math.prod(out_shape) * (m.in_channels // m.groups) * k[0] * k[1]
    if isinstance(m, nn.Linear):
        return math.prod(out_shape) * m.in_features
    return 0


def record(torch, nn, model, x):
    """[(dsl, input shape, count, module, macs)] in first-seen order."""
    seen = {}
    hooks = []

    def hook(m, inputs, output):
        text = dsl_of(m, nn)
        if text is None:
            return
        shape = tuple(inputs[0].shape)
        key = (text, shape)
        if key not in seen:
            seen[key] = [text, shape, 0, m, macs(m, nn, shape, tuple(output.shape))]
        seen[key][2] += 1

    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return [tuple(v) for v in seen.values()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="resnet18", choices=list(compare.NETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burst", type=float, default=0.3, help="seconds per engine burst")
    ap.add_argument("--cnnc-bin", default=str(ROOT / "target" / "release" / "examples" / "bench_engine"))
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args()

    import torch
    import torch.nn as nn

    torch.set_num_threads(args.threads)
    builder, _, shape, label = compare.NETS[args.net]
    torch.manual_seed(0)
    model = builder(nn).eval()
    x = torch.randn((args.batch, *shape))
    layers = record(torch, nn, model, x)
    print(f"{label}, batch {args.batch}, {args.threads} thread(s): {len(layers)} distinct layers", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnc-layers-") as tmp:
        for i, (text, in_shape, count, module, mac) in enumerate(layers):
            dims = ", ".join(str(d) for d in in_shape[1:])
            cnn = Path(tmp) / f"l{i}.cnn"
            cnn.write_text(f"net L(x: [N, {dims}]) = Sequential({text});\n")
            xin = torch.randn(in_shape)

            def torch_burst(n):
                out = []
                with torch.inference_mode():
                    for _ in range(n):
                        t = time.perf_counter()
                        module(xin)
                        out.append((time.perf_counter() - t) * 1e3)
                return out

            proc = subprocess.Popen(
                [args.cnnc_bin, "--net", str(cnn), "--batch", str(args.batch), "--threads", str(args.threads),
                 "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                bufsize=1)
            ready = proc.stdout.readline()
            if not ready:
                print(f"  {text} on {list(in_shape)}: cnnc failed: {proc.stderr.read().strip()}", flush=True)
                proc.wait()
                continue

            def cnnc_burst(n):
                proc.stdin.write(f"0 {n}\n")
                proc.stdin.flush()
                return json.loads(proc.stdout.readline())["times_ms"]

            est_t = statistics.median(torch_burst(3))
            est_c = statistics.median(cnnc_burst(3))
            nt = max(1, min(1000, round(args.burst * 1e3 / max(est_t, 1e-3))))
            nc = max(1, min(1000, round(args.burst * 1e3 / max(est_c, 1e-3))))
            ts, cs = [], []
            for _ in range(args.rounds):
                ts += torch_burst(nt)
                cs += cnnc_burst(nc)
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait()
            tm, cm = statistics.median(ts), statistics.median(cs)
            rows.append({"layer": text, "input": list(in_shape), "count": count, "macs": mac,
                         "pytorch_ms": tm, "cnnc_ms": cm})
            print(f"  {count}× {text} on {list(in_shape)}: PyTorch {tm:.3f} ms, cnnc {cm:.3f} ms", flush=True)

    tot_t = sum(r["count"] * r["pytorch_ms"] for r in rows)
    tot_c = sum(r["count"] * r["cnnc_ms"] for r in rows)
    print("\n| Layer | Input | × | MMAC | PyTorch ms | cnnc ms | cnnc GFLOP/s | PyTorch share | cnnc share |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: -r["count"] * r["cnnc_ms"]):
        gf = 2 * r["macs"] / (r["cnnc_ms"] * 1e6) if r["macs"] else None
        print(f"| `{r['layer']}` | {'×'.join(map(str, r['input']))} | {r['count']} | {r['macs'] / 1e6:.1f} "
              f"| {r['pytorch_ms']:.3f} | {r['cnnc_ms']:.3f} | {f'{gf:.1f}' if gf else '–'} "
              f"| {100 * r['count'] * r['pytorch_ms'] / tot_t:.0f}% | {100 * r['count'] * r['cnnc_ms'] / tot_c:.0f}% |")
    print(f"\nsum over layers: PyTorch {tot_t:.2f} ms, cnnc {tot_c:.2f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"net": args.net, "batch": args.batch, "threads": args.threads,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
