"""The step-time benchmark's bookkeeping (benchmarks/step_time.py), on the CPU host workload: what its result
files hold and how the ratios are formed. Nothing here times anything against a threshold."""

from __future__ import annotations

import json

import pytest

from benchmarks.step_time import main


def test_interleaved_rounds_time_every_variant_again_and_form_their_own_ratios(tmp_path):
    out = tmp_path / "host.json"
    assert main(["--workload", "host", "--threads", "1", "--steps", "2", "--warmup", "1", "--rounds", "2",
                 "--inference", "--variants", "base", "lora", "doran", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = results["workloads"]["host"]
    for variant in ("base", "lora", "doran"):
        inter = rows[variant]["interleaved"]
        assert inter["rounds"] == 2 and inter["steps_per_round"] == 5
        assert 0 < inter["step_ms_min"] <= inter["step_ms_median"] <= inter["step_ms_max"]
        assert "gpu_busy_ms" not in inter  # no GPU: wall time only
    lora, doran = rows["lora"]["interleaved"], rows["doran"]["interleaved"]
    assert lora["step_ms_median_vs_lora"] == 1.0
    assert doran["step_ms_median_vs_lora"] == pytest.approx(doran["step_ms_median"] / lora["step_ms_median"])
    # the sequential ratios stay as they were, from the first timing
    assert rows["doran"]["step_ms_median_vs_lora"] == pytest.approx(
        rows["doran"]["step_ms_median"] / rows["lora"]["step_ms_median"])
    # merged for its inference timing, then unmerged: still the adapted model in the rounds
    assert rows["doran"]["merged_infer_ms"] > 0 and rows["base"]["infer_ms"] > 0
    assert "Interleaved rounds" in results["table"] and "| host | doran |" in results["table"]


def test_a_negative_number_of_rounds_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(["--workload", "host", "--rounds", "-1"])
    assert "--rounds must be 0" in capsys.readouterr().err
