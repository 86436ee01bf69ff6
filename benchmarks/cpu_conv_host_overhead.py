"""Where the CPU engine's convolution time goes, beside OpenVINO's, in one process.

For each convolution shape of the model it prints three columns, summed over one forward and
averaged over the rounds:

- ``ours wall``: our engine's convolution calls as Python sees them (kernel + torch/ideep host work);
- ``ours kernel``: the same calls' oneDNN execution time (``ONEDNN_VERBOSE``'s ``exec_time``,
  mean of 3 more forwards);
- ``OpenVINO``: OpenVINO's own per-layer time for the same convolution (``PERF_COUNT``).

Both run oneDNN's ``brgconv`` kernels on ``acdb`` (channels_last) tensors, so the difference between
the first two columns is host work per call, and the last two compare the kernels themselves.
In float32 most thin convolutions run in our own kernel (marked; its wall time is its kernel time).
Rounds alternate the two engines with a 50 ms idle gap, 2 threads, same weights (random, random
BatchNorm statistics), 1x3x512x1024.

    python benchmarks/cpu_conv_host_overhead.py w18 bf16      # or f32; needs '.[peers]'
"""
import collections
import os
import re
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hrnet_fast.backends.torch_cpu as torch_cpu  # noqa: E402
from hrnet_fast import HRNetConfig, optimize  # noqa: E402
from hrnet_fast.check import randomize_batchnorm  # noqa: E402
from hrnet_fast.peers import OnnxExport  # noqa: E402
from hrnet_fast.reference import HighResolutionNet  # noqa: E402

ROUNDS = 6
# oneDNN's verbose problem descriptor, e.g. "mb1_ic18oc18_ih128oh128kh3sh1dh0ph1_iw256ow256kw3...".
_DESC = re.compile(r"mb\d+_ic(\d+)oc(\d+)_ih(\d+)oh\d+kh(\d+)sh(\d+)")


def conv_label(key):
    in_ch, out_ch, height, kernel, stride = key
    return f"{in_ch:>3}->{out_ch:<3} k{kernel} s{stride} at H={height}"


def openvino_model(ref, x, precision):
    import openvino as ov
    config = {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    if precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    with OnnxExport(ref, x) as export:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(export.path), "CPU", config)
    shapes = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        if op.get_input_size() >= 2:
            try:
                shapes[op.get_friendly_name()] = (tuple(op.get_input_partial_shape(0).to_shape()),
                                                  tuple(op.get_input_partial_shape(1).to_shape()))
            except Exception:  # dynamic or scalar inputs: not a convolution we compare
                pass
    return compiled.create_infer_request(), shapes


def main(preset, precision):
    torch.set_num_threads(2)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ref = randomize_batchnorm(HighResolutionNet(HRNetConfig.preset(preset))).eval()
    x = torch.randn(1, 3, 512, 1024)
    request, ov_shapes = openvino_model(ref, x, precision)
    engine = optimize(ref, backend="torch", dtype=dtype)
    wall = collections.defaultdict(float)
    plain_conv_fused = torch_cpu.conv_fused

    def timed_conv_fused(inp, weight, bias, stride, padding, *args, **kwargs):
        t0 = time.perf_counter()
        y = plain_conv_fused(inp, weight, bias, stride, padding, *args, **kwargs)
        wall[(inp.shape[1], weight.shape[0], inp.shape[2], weight.shape[2], stride)] += (
            time.perf_counter() - t0)
        return y

    own = set()  # shapes run by our thin-layer kernel (float32): its wall time is its kernel time
    plain_thin_conv = torch_cpu.thin_conv

    def timed_thin_conv(inp, spec, *args, **kwargs):
        t0 = time.perf_counter()
        y = plain_thin_conv(inp, spec, *args, **kwargs)
        w = spec.weight
        key = (inp.shape[1], w.shape[0], inp.shape[2], w.shape[2], spec.stride)
        wall[key] += time.perf_counter() - t0
        own.add(key)
        return y

    ov_time = collections.defaultdict(float)
    totals = {"ours": [], "OpenVINO": []}
    xb = x.to(dtype)
    torch_cpu.conv_fused, torch_cpu.thin_conv = timed_conv_fused, timed_thin_conv
    try:
        with torch.inference_mode():
            for _ in range(2):
                engine(xb)
                request.infer({0: x.numpy()})
            wall.clear()
            for _ in range(ROUNDS):
                time.sleep(0.05)
                t0 = time.perf_counter()
                request.infer({0: x.numpy()})
                totals["OpenVINO"].append(time.perf_counter() - t0)
                for p in request.get_profiling_info():
                    if p.node_type == "Convolution" and p.status == p.status.EXECUTED:
                        (_, c, h, _), (o, _, k, _) = ov_shapes[p.node_name]
                        ov_time[(c, o, h, k)] += p.real_time.total_seconds()
                time.sleep(0.05)
                t0 = time.perf_counter()
                engine(xb)
                totals["ours"].append(time.perf_counter() - t0)
    finally:
        torch_cpu.conv_fused, torch_cpu.thin_conv = plain_conv_fused, plain_thin_conv
    with torch.inference_mode():
        kernel = kernel_times(engine, xb)  # separate forwards: verbose logging adds host time
    print(f"{preset} {precision}, 1x3x512x1024, 2 threads, {ROUNDS} alternating rounds: forward "
          + ", ".join(f"{k} {1e3 * statistics.median(v):.1f} ms" for k, v in totals.items()))
    print(f"{'convolution':28s} {'ours wall':>10s} {'ours kernel':>12s} {'OpenVINO':>9s}   ms per forward")
    sums = [0.0, 0.0, 0.0]
    for key in sorted(wall, key=lambda k: -wall[k]):
        ours_wall = 1e3 * wall[key] / ROUNDS
        ours_kernel = ours_wall if key in own else kernel.get(key, 0.0)
        # OpenVINO fuses batched convolutions differently; match on (in, out, height, kernel).
        ov = 1e3 * ov_time.get(key[:4], 0.0) / ROUNDS
        sums = [sums[0] + ours_wall, sums[1] + ours_kernel, sums[2] + ov]
        print(f"{conv_label(key):28s} {ours_wall:10.2f} {ours_kernel:12.2f} {ov:9.2f}"
              + ("   (own kernel)" if key in own else ""))
    print(f"{'all convolutions':28s} {sums[0]:10.2f} {sums[1]:12.2f} "
          f"{1e3 * sum(ov_time.values()) / ROUNDS:9.2f}")


def kernel_times(engine, xb, forwards=3):
    """Forwards with ONEDNN_VERBOSE on; oneDNN prints to the process's stdout (fd 1), so that fd
    goes to a file meanwhile. ms per convolution shape and forward."""
    out = collections.defaultdict(float)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                for _ in range(forwards):
                    engine(xb)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        for line in log:
            if ",exec,cpu,convolution," not in line:
                continue
            m = _DESC.search(line)
            # (in, out, input height, kernel, stride), the key of main's tables
            out[tuple(int(g) for g in m.groups())] += float(line.rsplit(",", 1)[1]) / forwards
    return out


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) > 2 else ["w18", "bf16"]))
