"""benchmarks/bench_text_pool.py: the parity check runs before any timing, and bad settings are refused."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_text_pool


def test_the_text_pool_benchmark_checks_parity_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "text_pool.json"
    assert bench_text_pool.main(["--reports", "4", "--steps", "1", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference" in printed and "| packed sentences (ours) |" in printed
    result = json.loads(out.read_text())
    assert result["max_abs_diff"] < 1e-4
    assert set(result["median"]) == {"packed sentences (ours)", "whole reports, sentence mask (reference)"}
    assert all(cpu > 0 for cpu, _ in result["median"].values())


@pytest.mark.parametrize("argv, message", [(["--reports", "0"], "--reports 0"),
                                           (["--model", "no_such_model"], "unknown model architecture")])
def test_the_text_pool_benchmark_refuses_bad_settings(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_text_pool.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
