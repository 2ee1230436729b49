#!/usr/bin/env python3
"""Per-node times of ONNX Runtime on one model, to set beside cnnc's per-kernel times.

    python bench/ort_profile.py WORKDIR/resnet18_b1.onnx 1,3,224,224 [--threads 1] [--runs 20]
    target/release/examples/bench_engine --net examples/nets/resnet18.cnn --fused --profile

The ONNX files are the ones `bench/compare.py --workdir DIR` exports. ONNX Runtime runs with
the settings of compare.py (CPU provider, sequential, all graph optimisations, which turn the
convolutions into its NCHWc kernels); its built-in profiler records every node of every run,
and this prints each node's median and minimum over `--runs` runs, in execution order, and
their sum. Requires `pip install onnxruntime numpy`.
"""

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort

from compare import ort_session_options  # the session settings of the comparison


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an .onnx file")
    ap.add_argument("shape", help="input shape, e.g. 1,3,224,224")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))

    so = ort_session_options(ort, args.threads)
    so.enable_profiling = True
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        # The first `--warmup` runs are profiled too, and left out below.
        for _ in range(args.warmup + args.runs):
            sess.run(None, feed)
        events = json.load(open(sess.end_profiling()))

    times = collections.defaultdict(list)
    ops = {}
    order = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            if node not in times:
                order.append(node)
            times[node].append(e["dur"])
            ops[node] = e.get("args", {}).get("op_name", "")
    total_med = total_min = 0
    print(f"{'node':60s} {'op':18s} {'median µs':>10s} {'min µs':>8s}")
    for node in order:
        v = sorted(times[node][args.warmup:] or times[node])
        med, low = v[len(v) // 2], v[0]
        total_med += med
        total_min += low
        print(f"{node[-60:]:60s} {ops[node]:18s} {med:10d} {low:8d}")
    print(f"{'total':79s} {total_med:10d} {total_min:8d}")


if __name__ == "__main__":
    main()
