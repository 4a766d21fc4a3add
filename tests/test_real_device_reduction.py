"""Rows reduced where llama.cpp computed them (``engine/device_reduction``), on the bundled Gemma:
on the CPU here (ggml's CPU backend runs the same graph) and on the GPU by ``scripts/gpu-run.sh
device``. The logits gathered at the ids are the host's to the bit (the same micro-batches, so the
same forward pass), the argmax is the same, the log-normalizer is the host's to float32 rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality import synthetic
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import ModelLoad

pytestmark = pytest.mark.real_model

#: one decode's rows against the host's: llama_cpp imported before numpy (engine/llama.py says why)
CHECK = r'''
import json, sys
import llama_cpp
from pytest_kvquality.engine.llama import LlamaBackend, init_backend
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.normalizer import normalize_rows
import numpy as np

path, gpu, configs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
init_backend()
model = LlamaBackend().load(ModelLoad(path, gpu))
tokens = model.tokenize(builtin_corpus().texts["coding"])

def collect(views):
    out = {}
    for v in views:
        out.setdefault(v.member, []).append(np.array(v.logits))
    return {m: np.concatenate(parts) for m, parts in out.items()}

reports = []
for n_ctx, n_seq, n_ubatch, width in configs:
    chunks = chunk_tokens(tokens, n_ctx, n_seq, "coding")
    want = np.zeros(n_ctx, bool)
    want[n_ctx // 2 :] = True
    group = [(c, want) for c in chunks]
    rng = np.random.default_rng(3)
    ids = [rng.integers(0, model.n_vocab, (int(want.sum()), width)).astype(np.int32) for _ in group]
    ctx = model.context(CacheConfig.parse("q4_0"), n_ctx, n_seq, n_ubatch)
    full = collect(ctx.scored_logits(group))
    reused = llama_cpp.llama_perf_context(ctx.ctx).n_reused
    reduced = collect(ctx.reduced_rows(group, ids))
    reused = llama_cpp.llama_perf_context(ctx.ctx).n_reused - reused
    again = collect(ctx.scored_logits(group))  # the samplers detached: raw logits again
    report = {"members": len(reduced), "rows": [], "gathered_same_bits": True, "argmax_same": True,
              "raw_again_same_bits": True, "norm_max_abs_diff": 0.0,
              "graphs_reused": int(reused)}
    for m, rows in reduced.items():
        host = normalize_rows(full[m], ids[m])
        report["rows"].append(int(rows.shape[0]))
        report["gathered_same_bits"] &= bool(np.array_equal(rows[:, 2:], host.gathered))
        report["argmax_same"] &= bool(np.array_equal(rows[:, 0].astype(np.int32), host.imax))
        report["raw_again_same_bits"] &= bool(np.array_equal(again[m], full[m]))
        report["norm_max_abs_diff"] = max(report["norm_max_abs_diff"], float(np.abs(rows[:, 1] - host.norm).max()))
    ctx.close()
    reports.append(report)
print(json.dumps(reports))
'''


#: (n_ctx, sequences, micro-batch, ids per row): a long chunk's micro-batches, one per decode, of
#: which llama.cpp reuses the graph (same shapes: the rows a graph writes are its input, not its
#: structure), at the evaluation's 49 ids a row; two sequences in each micro-batch, 3,000 ids a row
CONFIGS = [(256, 1, 64, 49), (128, 2, 128, 3000)]


def test_reduced_rows_are_the_host_s_rows(tmp_path: Path, gemma: ModelLoad) -> None:
    """Each row's logits at its ids, argmax and normalizer read on the device are the host's; the
    same context then gives raw logits again, to the bit."""
    script = tmp_path / "check.py"
    script.write_text(CHECK, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), gemma.path, str(gemma.gpu_layers), json.dumps(CONFIGS)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    for (n_ctx, n_seq, _, _), report in zip(CONFIGS, reports, strict=True):
        assert report["members"] == n_seq and report["rows"] == [n_ctx // 2] * n_seq
        assert report["gathered_same_bits"] and report["argmax_same"] and report["raw_again_same_bits"], report
        assert report["norm_max_abs_diff"] < 2e-5, report  # |normalizer| ~ 10-30: float32 rounding
    assert reports[0]["graphs_reused"] > 0, reports[0]  # a reused graph wrote the rows of its own decode


#: a decode whose rows are not the ones announced before it: the group is refused, nothing read
MISMATCH = r'''
import sys
import llama_cpp
from pytest_kvquality.engine import device_reduction
from pytest_kvquality.engine.llama import LlamaBackend, init_backend
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
import numpy as np

init_backend()
model = LlamaBackend().load(ModelLoad(sys.argv[1], int(sys.argv[2])))
chunks = chunk_tokens(model.tokenize(builtin_corpus().texts["coding"]), 128, 1, "coding")
want = np.zeros(128, bool)
want[64:] = True
ids = [np.zeros((64, 8), np.int32)]
ctx = model.context(CacheConfig.parse("q8_0"), 128, 1, 32)
announce = device_reduction.DeviceReduction.next
device_reduction.DeviceReduction.next = lambda self, first, rows: announce(self, first, max(0, rows - 1))
try:
    list(ctx.reduced_rows([(chunks[0], want)], ids))
except RuntimeError as exc:
    print("refused:", exc)
device_reduction.DeviceReduction.next = announce
ids[0][5, 3] = model.n_vocab  # one past the vocabulary: a GPU would read another row's logits
try:
    list(ctx.reduced_rows([(chunks[0], want)], ids))
except ValueError as exc:
    print("refused:", exc)
ids[0][5, 3] = 7
print("then:", len(list(ctx.reduced_rows([(chunks[0], want)], ids))), "views")
'''


def test_rows_not_the_announced_ones_are_refused(tmp_path: Path, gemma: ModelLoad) -> None:
    """A decode with one row more than announced before it (a bug between the engine and the library)
    fails the group with the reason instead of reading rows written elsewhere; so does an id outside
    the vocabulary, before any decode; the context then reduces rows again."""
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), gemma.path, str(gemma.gpu_layers)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: the reduced rows of a group were not the rows its decodes announced" in done.stdout
    assert "refused: ids outside the vocabulary [0, 262144): 0 .. 262144" in done.stdout
    assert "then: 2 views" in done.stdout, done.stdout  # two scored micro-batches of 32 rows


def test_an_evaluation_reduced_on_the_device_agrees_with_the_host(
    tmp_path: Path, gemma: ModelLoad, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole evaluation (``KVQ_DEVICE_REDUCTION=1``) against the host's (0): the same top token at
    every position, per-token KL, NLL and Δp within float32 rounding of the normalizer."""
    two_per_decode = ModelLoad(gemma.path, gemma.gpu_layers, n_batch=256)
    runs = {}
    ref = None
    for flag in ("0", "1"):
        monkeypatch.setenv("KVQ_DEVICE_REDUCTION", flag)
        e = WorkerEngine(tmp_path / flag)
        try:
            chunks = chunk_tokens(e.tokenize(two_per_decode, builtin_corpus().texts["science"]), 128, 3, "science")
            if ref is None:  # the reference reads whole rows on either path: built once
                ref = e.reference(two_per_decode, CacheConfig.parse("f16"), chunks, seed=0).rows
            runs[flag] = e.evaluate(two_per_decode, CacheConfig.parse("q4_0"), chunks, ref)
        finally:
            e.close()
    host, device = runs["0"], runs["1"]
    assert (host.context.device_reduction, device.context.device_reduction) == (False, True)
    assert np.array_equal(host.stats.same_top, device.stats.same_top)
    for name in ("kld", "nll", "p_diff"):
        assert np.abs(getattr(host.stats, name) - getattr(device.stats, name)).max() < 2e-5, name
    assert np.array_equal(host.stats.nll_base, device.stats.nll_base)  # the reference's, untouched


#: which decodes see GGML_CUDA_NO_PINNED: llama_decode wrapped to record it with the call's output rows
PINNING = r'''
import json, sys
import llama_cpp
from pytest_kvquality.engine import host_pinning
from pytest_kvquality.engine.llama import LlamaBackend, init_backend
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
import numpy as np

calls = []
decode = llama_cpp.llama_decode
def recorded(ctx, batch):
    calls.append((batch.n_tokens, sum(batch.logits[i] != 0 for i in range(batch.n_tokens)), host_pinning.visible()))
    return decode(ctx, batch)
llama_cpp.llama_decode = recorded

init_backend()
model = LlamaBackend().load(ModelLoad(sys.argv[1], int(sys.argv[2])))
chunk = chunk_tokens(model.tokenize(builtin_corpus().texts["coding"]), 128, 1, "coding")[0]
for first_scored in (80, 16):  # micro-batches of 32: 0, 0, 16, 32 rows; then 16, 32, 32, 32
    want = np.zeros(128, bool)
    want[first_scored:] = True
    ids = [np.zeros((int(want.sum()), 8), np.int32)]
    ctx = model.context(CacheConfig.parse("q8_0"), 128, 1, 32)  # a new context grows its own buffers
    for _ in range(2):
        list(ctx.reduced_rows([(chunk, want)], ids))
    list(ctx.scored_logits([(chunk, want)]))  # the host path: pinned
    ctx.close()
print(json.dumps(calls), host_pinning.visible())
'''


def test_only_the_decodes_that_grow_the_output_buffers_see_them_unpinned(tmp_path: Path, gemma: ModelLoad) -> None:
    """Reduced on the device, a context's decodes that ask for more output rows than any before it
    run with ``GGML_CUDA_NO_PINNED`` visible (llama.cpp grows its output buffers there, into plain
    memory); every other decode, the host path's included, sees it hidden. Before the first decode
    after the samplers are attached, a one-token decode with one output row comes first, so
    llama.cpp's new reservation of its scheduler (input buffers) is made pinned. A micro-batch
    without scored rows decodes one row (its last token's) into the trash row. (Without the device
    reduction the switch is not installed: ``tests/test_device_reduction.py``.)"""
    script = tmp_path / "pinning.py"
    script.write_text(PINNING, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("GGML_CUDA_NO_PINNED", "KVQ_UNPINNED_OUTPUTS")}
    done = subprocess.run([sys.executable, str(script), gemma.path, str(gemma.gpu_layers)],
                          env={**env, "KVQ_DEVICE_REDUCTION": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    calls, after = json.loads(line.rsplit(" ", 1)[0]), line.rsplit(" ", 1)[1]
    late = [[32, 1, False], [32, 1, False], [32, 16, False], [32, 32, False]]  # rows from token 80
    host_late = [[32, 0, False], [32, 0, False], [32, 16, False], [32, 32, False]]  # no trash row there
    early = [[32, 16, False], [32, 32, False], [32, 32, False], [32, 32, False]]  # from token 16
    assert calls == [
        [1, 1, False], [32, 1, False], [32, 1, False], [32, 16, True], [32, 32, True], *late, *host_late,
        [1, 1, False], [32, 16, True], [32, 32, True], [32, 32, False], [32, 32, False], *early, *early,
    ]
    assert after == "False"


#: a group decoded twice on the device and twice on the host, on a model whose graph llama.cpp builds
#: anew for every decode (qwen35moe: its recurrent state keeps it from reusing one), with all layers on
#: a ggml-rpc-server, so that the scheduler holds two buffer types as with a GPU (its device's and the
#: host's); GGML_SCHED_DEBUG_REALLOC=2 makes ggml abort at any reservation of its compute buffers
#: after llama.cpp's own
REALLOC = r'''
import sys
import llama_cpp
from pytest_kvquality.engine.llama import LlamaBackend, init_backend
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
import numpy as np

init_backend()
model = LlamaBackend().load(ModelLoad(sys.argv[1], -1, rpc=sys.argv[2]))
chunk = chunk_tokens(model.tokenize(builtin_corpus().texts["coding"] * 2), 1024, 1, "coding")[0]
want = np.zeros(1024, bool)
want[512:] = True
ids = [np.zeros((512, 8), np.int32)]
ctx = model.context(CacheConfig.parse("q8_0"), 1024, 1, 256)
for path in ("device", "device", "host", "host"):
    views = ctx.reduced_rows([(chunk, want)], ids) if path == "device" else ctx.scored_logits([(chunk, want)])
    print(path, sum(v.logits.shape[0] for v in views), "rows", flush=True)
'''


def test_no_decode_of_a_group_reserves_the_compute_buffers_again(tmp_path: Path, gemma: ModelLoad) -> None:
    """llama.cpp reserves its compute buffers for a graph that holds the reduction; a decode whose
    graph lacks it (a micro-batch without scored rows) made ggml reserve them again, waiting for the
    GPU, and again at every later micro-batch, whose attention spans more of the cache (7-10 ms of
    each 32,768-token chunk's decodes on an H200, benchmarks/README §10). Such micro-batches now
    reduce one row into the trash row, and no decode reserves again."""
    from rpc_servers import rpc_server, rpc_server_binary

    rpc_server_binary()  # skips where no ggml-rpc-server is built (the GPU hosts' staging builds none)
    model = synthetic.write(tmp_path / "qwen35moe.gguf", synthetic.TINY["qwen35moe"], Path(gemma.path), seed=1)
    script = tmp_path / "realloc.py"
    script.write_text(REALLOC, encoding="utf-8")
    with rpc_server() as (port, _):
        done = subprocess.run([sys.executable, str(script), str(model), f"127.0.0.1:{port}"],
                              env={**os.environ, "GGML_SCHED_DEBUG_REALLOC": "2", "CUDA_VISIBLE_DEVICES": ""},
                              capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:4] == ["device 512 rows"] * 2 + ["host 512 rows"] * 2, done.stdout
