"""Where the GPU's time goes in one micro-batch (issue 17, benchmarks/README §8): the duration of every
CUDA kernel llama.cpp launches in chosen ``llama_decode`` calls, measured by Nsight Compute (``ncu``,
installed on the GPU hosts). torch's CUPTI cannot share a process with llama.cpp's CUDA build there:
torch imported after llama_cpp aborts (free(): invalid pointer), imported before it the model load
segfaults (the numpy crash of shared/gpu/README.md).

    python benchmarks/kernel_trace.py --model PATH [--ctx 32768] [--variant 11] [--ncu ncu]

The script runs itself under ncu once per traced call, profiling only around that call
(cuProfilerStart/Stop) and collecting one metric, the kernel's duration, so no kernel is replayed.
The calls, of the profile's variant (default 11: the second half's rows reduced on the device): in
a steady chunk, the last call without output rows and the first with them; then (unless
``--steady-only``) the context's first call with output rows (tokens 1,024-1,535 of its first
2,048). Per call: the kernels' summed time and the kernels by time; then what the scored call adds,
kernel by kernel. ncu serializes the kernels, so the sums are the GPU's work, not the wall time.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import llama_cpp  # before numpy (engine/llama.py says why)

sys.path.insert(0, str(Path(__file__).parent))
from forward_pass_profile import Run, model_and_chunk, variants

UNITS = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3, "second": 1.0, "s": 1.0}


def short_name(kernel: str) -> str:
    """The kernel's demangled name without its parameter list (template arguments kept: they name the
    quantization type of a matrix product)."""
    depth = 0
    for i, c in enumerate(kernel):
        depth += (c == "<") - (c == ">")
        if c == "(" and depth == 0 and i > 0:
            return kernel[:i].removeprefix("void ")
    return kernel.removeprefix("void ")


def kernel_seconds(log: str) -> list[tuple[str, float]]:
    """(kernel, seconds) in launch order, from ncu's ``--csv`` report (one row per kernel and metric)."""
    rows = list(csv.reader(line for line in log.splitlines() if line.startswith('"')))
    if not rows:
        return []
    head = rows[0]
    name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
    metric = head.index("Metric Name")
    out = []
    for r in rows[1:]:
        if len(r) == len(head) and r[metric] == "gpu__time_duration.sum":
            try:
                out.append((short_name(r[name]), float(r[value].replace(",", "")) * UNITS[r[unit]]))
            except (ValueError, KeyError):  # a kernel ncu could not time: shown, not summed
                print(f"  (not timed: {short_name(r[name])[:80]}: {r[value]!r} {r[unit]!r})", flush=True)
    return out


def traced(ncu: str, args: argparse.Namespace, call: str) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ncu.csv"
        cmd = [ncu, "--profile-from-start", "off", "--metrics", "gpu__time_duration.sum", "--cache-control", "none",
               "--clock-control", "none", "--csv", "--log-file", str(log),
               sys.executable, __file__, "--model", args.model, "--ctx", str(args.ctx), "--variant",
               str(args.variant), "--inner", call]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"ncu on call {call}: no answer within {args.timeout} s", flush=True)
            return []
        if done.returncode != 0 or not log.exists():
            print(f"ncu on call {call} failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}", flush=True)
            return []
        return kernel_seconds(log.read_text())


def show(kernels: list[tuple[str, float]], rows: int) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for name, s in kernels:
        total[name] += s
        count[name] += 1
    for name, s in sorted(total.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"  {s * 1e3:9.3f} ms  {count[name]:5d}x  {name[:120]}", flush=True)
    return total


def inner(args: argparse.Namespace) -> None:
    """Under ncu: decode as the profile does, profiling only the call named by ``args.inner``."""
    cuda = ctypes.CDLL("libcuda.so.1")
    model, chunk = model_and_chunk(args.model, args.ctx)
    run = Run(model, variants()[args.variant], args.ctx, chunk)
    kind, _, at = args.inner.partition(":")
    wanted = 2 if kind == "first" else int(at)  # 512 tokens a call: call 2 holds tokens 1,024-1,535

    def around(call: int, before: bool) -> None:
        if call == wanted:
            llama_cpp.llama_synchronize(run.ctx)
            rc = (cuda.cuProfilerStart if before else cuda.cuProfilerStop)()
            assert rc == 0, f"cuProfiler{'Start' if before else 'Stop'}: CUresult {rc}"

    run.decode(2048, around if kind == "first" else None)
    if kind == "steady":
        run.decode(args.ctx, around)
    run.close()
    model.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--variant", type=int, default=11, help="a variant number of forward_pass_profile.py")
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--rows", type=int, default=25, help="kernels shown per call")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per traced call")
    ap.add_argument("--steady-only", action="store_true", help="not the context's first call with output rows")
    ap.add_argument("--inner", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.model:
        from pytest_kvquality.resolve import bundled_gguf

        args.model = str(bundled_gguf())
    if args.inner:
        return inner(args)
    half = args.ctx // 512 // 2
    calls = {f"steady:{half - 1}": "a steady chunk's last call without output rows",
             f"steady:{half}": "the same chunk's first call with output rows",
             "first": "the context's first call with output rows (tokens 1,024-1,535)"}
    print(f"# {args.model}, n_ctx {args.ctx}, variant {args.variant}: {variants()[args.variant].name}; "
          f"kernel durations by ncu ({os.path.basename(args.ncu)}), one process per call", flush=True)
    if args.steady_only:
        calls.pop("first")
    totals: dict[str, dict[str, float]] = {}
    for call, what in calls.items():
        kernels = traced(args.ncu, args, call)
        print(f"\n## {call}: {what}: {len(kernels)} kernels, {sum(s for _, s in kernels) * 1e3:.2f} ms of GPU work",
              flush=True)
        totals[call] = show(kernels, args.rows)
    (a, ta), (b, tb) = list(totals.items())[:2]
    print(f"\n## what {b} adds to {a}, kernel by kernel", flush=True)
    diff = {n: tb.get(n, 0.0) - ta.get(n, 0.0) for n in set(ta) | set(tb)}
    for name, s in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.rows]:
        print(f"  {s * 1e3:+9.3f} ms  {name[:120]}", flush=True)


if __name__ == "__main__":
    main()
