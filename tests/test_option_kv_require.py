"""--kv-require: what would skip (no model, no GPU build) fails instead"""

from __future__ import annotations

import pytest


def test_without_a_model_fixture_tests_skip_and_kv_require_fails_them(kv_project: pytest.Pytester) -> None:
    kv_project.makepyfile(test_user="def test_x(kv_eval):\n    kv_eval('q8_0')\n")
    result = kv_project.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no --kv-model given*"])
    result = kv_project.runpytest("--kv-require")
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*no --kv-model given and --kv-require is set*"])


def test_gpu_tests_skip_without_a_gpu_build_and_fail_under_require(kv_project: pytest.Pytester) -> None:
    from pytest_kvquality.environment import host_backend

    if host_backend().gpu:
        pytest.skip("this host has a GPU build: the skip cannot be shown here")
    kv_project.makepyfile("""
        import pytest

        @pytest.mark.kv_gpu
        def test_on_the_gpu():
            pass
    """)
    skipped = kv_project.runpytest("-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*needs a GPU build of llama-cpp-python*here is a CPU build*"])
    required = kv_project.runpytest("--kv-require")
    required.assert_outcomes(errors=1)  # in setup: the run fails
    assert required.ret == pytest.ExitCode.TESTS_FAILED
