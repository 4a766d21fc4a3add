"""--kv-model: a model that cannot be found is a usage error on the command line and a visible skip
from the ini file; models without thresholds are measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import LOAD_PLUGIN


def test_known_model_without_a_file_is_a_usage_error_on_the_command_line(kv_project: pytest.Pytester,
                                                                         tmp_path: Path) -> None:
    shipped = kv_project.path / "published-models.yaml"  # inside the test dir: its ini is the one found
    shipped.write_bytes((Path(__file__).parent.parent / "thresholds" / "published-models.yaml").read_bytes())
    result = kv_project.runpytest("--kv-model", "qwen3.6-35b", "--kv-thresholds", str(shipped))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert ("--kv-model qwen3.6-35b: model qwen3.6-35b-a3b (unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M) is not on this "
            "machine. Looked in:") in err
    home = tmp_path / "home"  # where kv_project points every model cache (conftest.isolate_model_caches)
    for place in (f"Hugging Face hub cache: {home}/.cache/huggingface/hub/models--unsloth--Qwen3.6-35B-A3B-GGUF",
                  f"LM Studio models: {home}/.lmstudio/models/unsloth/Qwen3.6-35B-A3B-GGUF/*.gguf",
                  f"Ollama: {home}/.ollama/models/manifests/hf.co/unsloth/Qwen3.6-35B-A3B-GGUF/Q4_K_M",
                  "Fetch it: pytest --kv-model unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M --kv-download",
                  "qwen3.6-35b-a3b: {path: /path/to/model.gguf}"):
        assert place in err, place


def test_a_model_from_the_ini_that_is_missing_skips_in_plain_sight(kv_project: pytest.Pytester) -> None:
    shipped = kv_project.path / "published-models.yaml"
    shipped.write_bytes((Path(__file__).parent.parent / "thresholds" / "published-models.yaml").read_bytes())
    kv_project.makeini(f"""
        [pytest]
        {LOAD_PLUGIN}
        kv_models = qwen3.6-35b
        kv_thresholds = published-models.yaml
        kv_markdown = summary.md
    """)
    result = kv_project.runpytest("-rs")
    result.assert_outcomes(skipped=6)
    result.stdout.fnmatch_lines(["6 gate(s) skipped: model qwen3.6-35b-a3b not available here (*",
                                 "SKIPPED [[]6[]] *model qwen3.6-35b-a3b (unsloth/*) is not on this machine*"])
    assert "⚠️ 6 gate(s) skipped: model qwen3.6-35b-a3b not available here" in \
        (kv_project.path / "summary.md").read_text()
    result = kv_project.runpytest("--kv-require", "-q")
    result.assert_outcomes(failed=6)
    result.stdout.fnmatch_lines(["*qwen3.6-35b-a3b::q4_0::long_documents::kl_mean*"])
    said = [line for line in result.stdout.lines  # once per item (pytest's summary lines aside)
            if line.startswith("--kv-require is set and model qwen3.6-35b-a3b is not available")]
    assert len(said) == 6


def test_models_without_thresholds_are_measured_and_reported(
    kv_project: pytest.Pytester, fake_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0,q4_0:norot",
                                  "--kv-chunks", "8", "--kv-thresholds", str(kv_project.path),
                                  "--kv-json", str(out), "-v")
    result.stdout.fnmatch_lines(["*tiny::q8_0::measure PASSED*", "*tiny::q4_0:norot::measure PASSED*"])
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 3
    rec = next(r for r in doc["results"] if r["cache"] == "q4_0:norot" and r["category"] == "overall")
    for key in ("model", "type_k", "type_v", "rotation", "flash_attn", "n_ctx", "category", "kl_mean",
                "kl_mean_unc", "kl_median", "kl_p99", "kl_max", "top1", "top1_unc", "dp_rms",
                "ppl_ratio", "n_tokens", "eval_seconds"):
        assert key in rec
    assert (rec["type_k"], rec["type_v"], rec["rotation"], rec["n_ctx"]) == ("q4_0", "q4_0", False, 64)
    assert rec["rotation_applied_k"] is False
    assert doc["environment"]["models"]["tiny"] == rec["model_sha256"]
    assert len(doc["results"]) == 2 * 5


def test_a_typo_in_the_model_name_is_a_usage_error(kv_project: pytest.Pytester) -> None:
    result = kv_project.runpytest("--kv-model", "gemma3-270n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--kv-model gemma3-270n: model 'gemma3-270n' is neither a registered alias" in err
    assert "Looked: the aliases " in err and "(does not exist). Did you mean gemma3-270m or" in err
