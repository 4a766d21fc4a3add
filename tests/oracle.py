"""llama-perplexity, the oracle our metrics are checked against, run on a model and a text.

Built from the same llama-cpp-python sdist by scripts/install-llama.sh (same llama.cpp, same
flags): across builds llama.cpp's own numbers move by up to ~2.5 %, so only that build compares.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.environment import cpu_threads
from pytest_kvquality.metrics import KLSummary

ROOT = Path(__file__).resolve().parent.parent


def llama_perplexity_binary() -> Path:
    """The llama-perplexity of this build (or $KVQ_LLAMA_PERPLEXITY); skips the test without one."""
    env = os.environ.get("KVQ_LLAMA_PERPLEXITY")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT / ".build" / "llama-perplexity")
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        pytest.skip("llama-perplexity is not built: run scripts/install-llama.sh (it builds it from "
                    "the same llama-cpp-python sdist), or set KVQ_LLAMA_PERPLEXITY")
    return found


def parse_llama_perplexity(log: str) -> dict[str, float]:
    def grab(label: str) -> float:
        m = re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)", log)
        assert m, f"{label!r} not found in llama-perplexity output:\n{log[-3000:]}"
        return float(m.group(1))

    return {
        "kl_mean": grab("Mean    KLD"), "kl_max": grab("Maximum KLD"), "kl_p99": grab("99.0%   KLD"),
        "kl_median": grab("Median  KLD"), "ppl": grab("Mean PPL(Q)"), "ppl_base": grab("Mean PPL(base)"),
        "dp_rms": grab("RMS Δp") / 100, "top1": grab("Same top p") / 100,
    }


def llama_perplexity_kld(workdir: Path, model: str, text: str, n_ctx: int, chunks: int,
                         candidate: CacheConfig, batch: int = 2048, ubatch: int = 512) -> dict[str, float]:
    """llama-perplexity --kl-divergence of ``candidate`` against an f16 cache, as our engine runs by
    default: llama-perplexity's own batch geometry (n_batch / n_ctx chunks per decode, one sequence
    each), flash attention as the cache says, no weight repacking."""
    exe = llama_perplexity_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "text.txt"
    path.write_text(text, encoding="utf-8")
    common = [str(exe), "-m", model, "-c", str(n_ctx), "-b", str(batch), "-ub", str(min(batch, ubatch)),
              "--chunks", str(chunks), "-t", str(cpu_threads()), "-fa", "on" if candidate.flash_attn else "off",
              "-nr", "-np", "1",
              "--kl-divergence-base", str(workdir / "base.bin")]
    base = subprocess.run([*common, "-f", str(path), "-ctk", "f16", "-ctv", "f16"], capture_output=True, text=True)
    assert base.returncode == 0, base.stderr[-3000:]
    cand = subprocess.run([*common, "--kl-divergence", "-ctk", candidate.type_k, "-ctv", candidate.type_v],
                          capture_output=True, text=True)
    assert cand.returncode == 0, cand.stderr[-3000:]
    return parse_llama_perplexity(cand.stdout + cand.stderr)


def assert_matches(ours: KLSummary, theirs: dict[str, float]) -> None:
    """Within the tolerances of the oracle test: mean KLD 0.5 %, Same top p 0.1 point; and within
    half the last digit llama-perplexity prints (KLD %.6f, RMS Δp %.3f %), which decides for the
    tiny values of small models."""
    assert ours.kl_mean == pytest.approx(theirs["kl_mean"], rel=0.005, abs=5e-7)
    assert abs(ours.top1 - theirs["top1"]) <= 0.001
    assert ours.ppl == pytest.approx(theirs["ppl"], rel=1e-4)
    assert ours.ppl_base == pytest.approx(theirs["ppl_base"], rel=1e-3)
    assert ours.dp_rms == pytest.approx(theirs["dp_rms"], rel=0.005, abs=5e-6)
    assert ours.kl_p99 == pytest.approx(theirs["kl_p99"], rel=0.01, abs=5e-7)


def assert_same_logits(ours: KLSummary, theirs: dict[str, float]) -> None:
    """Exact mode (full reference logits) in llama-perplexity's geometry: the same logits on both
    sides, so the same top token everywhere and KLD and PPL equal but for how the sums are taken
    (measured on the CPU: -0.001 % KLD, same top and PPL identical to the digits printed)."""
    assert ours.top1 == pytest.approx(theirs["top1"], abs=5e-6)  # printed to 0.001 %
    assert ours.kl_mean == pytest.approx(theirs["kl_mean"], rel=2e-4, abs=5e-7)
    assert ours.ppl == pytest.approx(theirs["ppl"], rel=2e-5)
