"""`vtr bench` end to end on a tiny model (a smoke test of the command, not a timing)."""
import json

import pytest

import vtr
from vtr.cli import main


def test_bench_prints_a_row_per_method(capsys):
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--batch", "1", "--reps", "1",
                 "--methods", "tome,pitome", "--flops", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["none", "tome", "pitome"]
    for row in rows[1:]:
        assert abs(row["flops_fraction"] - 0.5) < 0.01 and row["tokens_out"] < 197
        assert 0 < row["reducer_share"] < 1
    assert rows[0]["flops_fraction"] == 1.0 and rows[0]["tokens_out"] == 197


def test_bench_table_plot_and_unknown_method(capsys, tmp_path):
    png = tmp_path / "frontier.png"
    assert main(["--model", "vit_tiny_patch16_224", "--batch", "1", "--reps", "2", "--methods", "tome,random",
                 "--flops", "0.5,0.7", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "tome" in out and out.count("random") == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        main(["bench", "--methods", "nope"])
    assert "tome" in vtr.methods()


def test_bench_builds_clip_towers_by_name(capsys):
    assert main(["bench", "--model", "hf:siglip-vit-b16", "--batch", "1", "--reps", "1", "--methods", "evit",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["tokens_out"] == 196 and abs(rows[1]["flops_fraction"] - 0.5) < 0.01  # SigLIP: no CLS
    with pytest.raises(ValueError, match="hf:<name> with a name in"):
        main(["bench", "--model", "hf:nope"])
