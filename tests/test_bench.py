"""`python -m clse_exp.bench` on a small random model: rows, table and plot are written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from clse_exp.bench import validate
from clse_exp.config import CONF_DIR
from clse_exp.errors import ConfigError


def test_bench_writes_rows_table_and_plot(tmp_path):
    args = [sys.executable, "-m", "clse_exp.bench", f"hydra.run.dir={tmp_path}", "model.hidden_size=64",
            "model.intermediate_size=128", "model.num_heads=4", "model.num_kv_heads=2", "visual_tokens=64",
            "repeats=1", "warmup=0", "decode_tokens=2", "methods=[clse,fastv]", "keeps=[0.1,0.33]"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {(r["method"], r["keep"]): r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows[("none", 1.0)]["prefill_time_ratio"] == 1.0
    assert "0.166667" in rows[("fastv", 0.1)]["skipped"]  # K=2 of 12 layers cannot average 0.1
    for key in (("clse", 0.1), ("clse", 0.33), ("fastv", 0.33)):
        row = rows[key]
        assert abs(row["retention_average"] - key[1]) < 0.02
        assert 0 < row["flops_ratio"] < 1 and 0 < row["kv_ratio"] < 1 and row["overhead_frac"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "| clse | 0.1 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize(("override", "fragment"), [
    ("repeats=0", "repeats=0"), ("warmup=-1", "warmup=-1"), ("batch_size=0", "batch_size=0"),
    ("methods=[foo]", "'foo'"), ("keeps=[1.5]", "keep=1.5"), ("protocol=paper", "'paper'"),
])
def test_bad_bench_settings_are_one_line_before_a_model_is_built(override, fragment):
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "bench.yaml"), OmegaConf.from_dotlist([override]))
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        validate(cfg)
