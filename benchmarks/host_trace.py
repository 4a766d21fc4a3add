"""What the host does inside each ``llama_decode`` of a long chunk (issue 17, benchmarks/README §10):
the CUDA runtime and ggml scheduler calls of every call, timed by ``host_trace.c`` (an LD_PRELOAD
library: Nsight Systems is not installed on the GPU hosts), for the forward pass alone and for the
second half's rows reduced on the device (the profile's variants 0 and 11).

    python benchmarks/host_trace.py --model PATH [--ctx 32768] [--variants 0,11] [--cc gcc]

Per call: seconds inside llama_decode, before the scheduler's compute, inside it and after it; the
waits for the GPU's stream (ggml_backend_synchronize) and how long the GPU then had nothing queued
until the next launch (the GPU was idle then, since the wait had just returned); kernel launches,
CUDA-graph replays and captures; copies. Medians of the steady chunk's calls without and with output
rows, then one call of each, event by event (consecutive launches merged).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
KINDS = ["mark", "launch", "graph launch", "capture begin", "capture end", "instantiate", "exec update",
         "stream sync", "event sync", "device sync", "memcpy async", "memcpy", "memcpy2d", "memset", "malloc",
         "free", "host alloc", "host free", "host register", "sched reset", "sched alloc", "sched compute",
         "sched sync", "tensor set", "tensor get", "stream wait", "event record"]
K = {name: i for i, name in enumerate(KINDS)}
PER_THREAD_STREAM = 2  # cudaStreamPerThread: ggml_backend_tensor_set's copies wait on it, not on the GPU's work


def build(cc: str, out: Path) -> Path:
    lib = out / "libhosttrace.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(HERE / "host_trace.c"), "-ldl"], check=True)
    return lib


@dataclass
class Call:
    """One llama_decode call's events (main thread), times in seconds from the call's start."""

    index: int
    rows: bool
    inside: float
    events: list[tuple[str, float, float, int]]

    def total(self, kind: str) -> float:
        return sum(t1 - t0 for k, t0, t1, _ in self.events if k == kind)

    def count(self, kind: str) -> int:
        return sum(1 for k, *_ in self.events if k == kind)

    def gpu_syncs(self) -> list[tuple[str, float, float, int]]:
        return [e for e in self.events if e[0] == "stream sync" and e[3] != PER_THREAD_STREAM]

    def idle_after_waits(self) -> float:
        """After each wait for the GPU's stream that lasted > 20 us (so the GPU had just finished its
        work), the time until the next launch: the GPU had nothing to do then."""
        idle = 0.0
        for i, (kind, _t0, t1, arg) in enumerate(self.events):
            if kind != "stream sync" or arg == PER_THREAD_STREAM or t1 - _t0 < 20e-6:
                continue
            nxt = next((e[1] for e in self.events[i + 1 :] if e[0] in ("launch", "graph launch")), self.inside)
            idle += nxt - t1
        return idle

    def phases(self) -> dict[str, float]:
        compute = [e for e in self.events if e[0] == "sched compute"]
        first = compute[0][1] if compute else self.inside
        last = compute[-1][2] if compute else self.inside
        inside = sum(e[2] - e[1] for e in compute)
        return {"before compute": first, "compute": inside, "after compute": self.inside - last}


def calls_of(raw: bytes, variant: int) -> list[Call]:
    import numpy as np  # after llama_cpp in the inner process; here no llama_cpp is loaded

    ev = np.frombuffer(raw, dtype=[("kind", "<u4"), ("thread", "<u4"), ("t0", "<u8"), ("t1", "<u8"), ("arg", "<u8")])
    marks = np.flatnonzero(ev["kind"] == 0)
    calls = []
    for a, b in zip(marks[::2], marks[1::2], strict=False):
        label = int(ev["arg"][a])
        if label >> 32 != variant:
            continue
        thread = ev["thread"][a]
        start = int(ev["t0"][a])
        seg = ev[a + 1 : b]
        seg = seg[seg["thread"] == thread]
        events = [(KINDS[int(e["kind"])], (int(e["t0"]) - start) * 1e-9, (int(e["t1"]) - start) * 1e-9,
                   int(e["arg"])) for e in seg]
        calls.append(Call((label >> 1) & 0xFFFF, bool((label >> 17) & 1), (int(ev["t0"][b]) - start) * 1e-9, events))
    return calls


def timeline(call: Call) -> None:
    merged: list[tuple[str, float, float, int]] = []
    for kind, t0, t1, arg in call.events:
        if merged and merged[-1][0] == kind == "launch":
            merged[-1] = (kind, merged[-1][1], t1, merged[-1][3] + 1)
        else:
            merged.append((kind, t0, t1, 1 if kind == "launch" else arg))
    for kind, t0, t1, arg in merged:
        what = ""
        if kind == "launch":
            what = f"{arg} launches"
        elif "memcpy" in kind or "tensor" in kind:
            what = f"{arg & ((1 << 63) - 1):,} B{' to host' if arg >> 63 else ''}"
        print(f"    {1e3 * t0:9.3f} .. {1e3 * t1:9.3f} ms  {kind:<14} {what}", flush=True)
    print(f"    {1e3 * call.inside:9.3f} ms  llama_decode returns", flush=True)


def summary(group: list[Call]) -> str:
    """Medians over the calls of one kind."""
    import numpy as np

    def ms(f: Callable[[Call], float]) -> float:
        return 1e3 * float(np.median([f(c) for c in group]))

    def n(f: Callable[[Call], int]) -> int:
        return round(float(np.median([f(c) for c in group])))

    ph = {k: 1e3 * float(np.median([c.phases()[k] for c in group]))
          for k in ("before compute", "compute", "after compute")}
    waits = ms(lambda c: sum(e[2] - e[1] for e in c.gpu_syncs()))
    return (f"inside {ms(lambda c: c.inside):.2f} ms = before compute {ph['before compute']:.2f} + compute "
            f"{ph['compute']:.2f} + after {ph['after compute']:.2f}; waits for the GPU "
            f"{n(lambda c: len(c.gpu_syncs()))} taking {waits:.2f} ms; GPU idle after them "
            f"{ms(Call.idle_after_waits):.2f} ms; launches {n(lambda c: c.count('launch'))} "
            f"({ms(lambda c: c.total('launch')):.2f} ms), graph replays {n(lambda c: c.count('graph launch'))}, "
            f"captures {n(lambda c: c.count('capture begin'))}, instantiate/update "
            f"{n(lambda c: c.count('instantiate') + c.count('exec update'))} "
            f"({ms(lambda c: c.total('instantiate') + c.total('exec update')):.2f} ms); sched alloc "
            f"{ms(lambda c: c.total('sched alloc')):.2f} ms, reset {n(lambda c: c.count('sched reset'))}; "
            f"tensor set {n(lambda c: c.count('tensor set'))} ({ms(lambda c: c.total('tensor set')):.2f} ms); "
            f"memcpy async {n(lambda c: c.count('memcpy async'))} ({ms(lambda c: c.total('memcpy async')):.2f} ms)")


def report(calls: list[Call], name: str) -> None:
    print(f"\n## {name}: {len(calls)} calls of the steady chunk", flush=True)
    for rows in (False, True):
        group = [c for c in calls if c.rows == rows]
        if group:
            print(f"  calls {'with' if rows else 'without'} output rows ({len(group)}), medians: {summary(group)}",
                  flush=True)
    for rows in (False, True):
        group = [c for c in calls if c.rows == rows]
        if group:
            c = group[len(group) // 2]
            print(f"  call {c.index} ({'with' if rows else 'without'} output rows), event by event:", flush=True)
            timeline(c)


def inner(args: argparse.Namespace) -> None:
    import llama_cpp  # before numpy (engine/llama.py says why)

    sys.path.insert(0, str(HERE))
    from forward_pass_profile import Run, model_and_chunk, variants

    trace = ctypes.CDLL(args.lib)
    trace.kvq_trace_mark.argtypes = [ctypes.c_uint64]
    trace.kvq_trace_dump.argtypes = [ctypes.c_char_p]
    model, chunk = model_and_chunk(args.model, args.ctx)
    for number in (int(v) for v in args.variants.split(",")):
        run = Run(model, variants()[number], args.ctx, chunk)
        run.decode(min(2048, args.ctx))  # the context's first use, outside the traced chunk
        scored = bool(run.v.scored)

        def mark(call: int, before: bool, number: int = number, scored: bool = scored) -> None:
            rows = scored and call * 512 >= args.ctx // 2
            trace.kvq_trace_mark((number << 32) | (int(rows) << 17) | (call << 1) | int(not before))

        trace.kvq_trace_enable(1)
        run.decode(args.ctx, mark)
        trace.kvq_trace_enable(0)
        llama_cpp.llama_synchronize(run.ctx)
        run.close()
    model.close()
    assert trace.kvq_trace_dump(args.inner.encode()) == 0, "could not write the trace"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--variants", default="0,11", help="variant numbers of forward_pass_profile.py")
    ap.add_argument("--cc", default=os.environ.get("CC", "gcc"))
    ap.add_argument("--lib", default="", help=argparse.SUPPRESS)
    ap.add_argument("--inner", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.model:
        from pytest_kvquality.resolve import bundled_gguf

        args.model = str(bundled_gguf())
    if args.inner:
        return inner(args)
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(args.cc, Path(tmp))
        dump = Path(tmp) / "events.bin"
        env = dict(os.environ, LD_PRELOAD=str(lib))
        done = subprocess.run([sys.executable, __file__, "--model", args.model, "--ctx", str(args.ctx), "--variants",
                               args.variants, "--lib", str(lib), "--inner", str(dump)], env=env, text=True,
                              capture_output=True)
        if done.returncode != 0:
            print(f"the traced run failed ({done.returncode}): {done.stderr[-3000:]}", flush=True)
            sys.exit(1)
        raw = dump.read_bytes()
    from forward_pass_profile import variants

    print(f"# {args.model}, n_ctx {args.ctx}: host calls inside each llama_decode ({len(raw) // 32:,} events)",
          flush=True)
    for number in (int(v) for v in args.variants.split(",")):
        report(calls_of(raw, number), f"variant {number}: {variants()[number].name}")


if __name__ == "__main__":
    main()
