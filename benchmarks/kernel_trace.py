"""Where the GPU's time goes in one long chunk (issue 17, benchmarks/README §8): every CUDA kernel
llama.cpp launches, traced by CUPTI through torch.profiler (the GPU hosts have torch; CUPTI records
the kernels of every CUDA context in the process, ggml's included), for the forward pass alone and
for the same chunk with the second half's rows reduced on the device.

    python benchmarks/kernel_trace.py --model PATH [--ctx 32768] [--only 0,11] [--rows 30]

Per variant: the chunk's wall time, the kernels' summed time (one stream: the GPU's busy time),
the gap between the two (the GPU waiting for the host), and the kernels by summed time. The
difference between the variants is what producing and reducing the scored rows costs, kernel by
kernel. A context's first use (its first 2,048 tokens, where llama.cpp sizes its output buffers) is
traced apart, so that the time the GPU waits for the host there shows.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import llama_cpp  # noqa: F401  (before numpy and torch: engine/llama.py says why)

sys.path.insert(0, str(Path(__file__).parent))
from forward_pass_profile import Run, variants

from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine import llama
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.resolve import bundled_gguf


def kernel_times(prof: object, on_device: bool = True) -> tuple[dict[str, float], dict[str, int]]:
    """Summed microseconds and count per name, from the profiler's events: the kernels and copies
    on the device, or (``on_device`` False) the host's CUDA runtime calls (cudaMallocHost,
    cudaStreamSynchronize, cudaGraphInstantiate, ...), where a context's first use waits."""
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():  # type: ignore[attr-defined]
        device = str(getattr(e, "device_type", "")).endswith("CUDA")
        if device if on_device else e.name.startswith("cuda"):
            total[e.name] += e.time_range.elapsed_us()
            count[e.name] += 1
    return total, count


def show(total: dict[str, float], count: dict[str, int], rows: int) -> None:
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"  {us / 1e3:10.1f} ms  {count[name]:6d}x  {name[:110]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--only", default="0,11", help="variant numbers of forward_pass_profile.py")
    ap.add_argument("--rows", type=int, default=30, help="kernels shown per variant")
    args = ap.parse_args()
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    path = args.model or str(bundled_gguf())
    llama.init_backend()
    model = llama.LlamaBackend().load(ModelLoad(path, -1))
    tokens = model.tokenize("\n\n".join(builtin_corpus().texts.values()))
    chunk = chunk_tokens(np.tile(tokens, 1 + args.ctx // tokens.size), args.ctx, 1, "all")[0].copy()
    print(f"# {path}, n_ctx {args.ctx}, torch {torch.__version__}", flush=True)
    seen: dict[int, dict[str, float]] = {}
    for i, v in enumerate(variants()):
        if str(i) not in args.only.split(","):
            continue
        run = Run(model, v, args.ctx, chunk)
        with profile(activities=[ProfilerActivity.CUDA]) as first:
            warm = run.decode(min(2048, args.ctx))[0]  # the context's first use: what is not the GPU's
        busy = sum(kernel_times(first)[0].values()) / 1e6
        print(f"\n## {i}: {v.name}: first {min(2048, args.ctx)} tokens of the context {warm:.3f} s, kernels "
              f"{busy:.3f} s, GPU waiting {warm - busy:.3f} s (its first call with output rows "
              f"{run.first_scored or 0:.3f} s); the CUDA runtime calls it made:", flush=True)
        show(*kernel_times(first, on_device=False), args.rows)
        run.decode(args.ctx)  # once more untraced, so the traced chunk is a steady one
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            wall = run.decode(args.ctx)[0]
            traced = time.perf_counter() - t0
        run.close()
        total, count = kernel_times(prof)
        busy = sum(total.values()) / 1e6
        seen[i] = total
        print(f"\n## {i}: {v.name}: chunk {wall:.3f} s ({traced:.3f} s with the trace), kernels {busy:.3f} s, "
              f"GPU waiting {wall - busy:.3f} s, {sum(count.values())} launches", flush=True)
        show(total, count, args.rows)
        print("  the CUDA runtime calls of the chunk:", flush=True)
        show(*kernel_times(prof, on_device=False), 8)
    if len(seen) == 2:
        (a, ta), (b, tb) = sorted(seen.items())
        print(f"\n## kernels that take longer in {b} than in {a}", flush=True)
        diff = {n: tb.get(n, 0.0) - ta.get(n, 0.0) for n in set(ta) | set(tb)}
        for name, us in sorted(diff.items(), key=lambda kv: -kv[1])[: args.rows]:
            if us > 0:
                print(f"  {us / 1e3:+10.1f} ms  {name[:110]}", flush=True)
    model.close()


if __name__ == "__main__":
    main()
