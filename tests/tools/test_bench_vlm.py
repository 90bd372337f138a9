"""`vtr bench --model llava:<shape> | qwen-vl:<shape> | onevision:<shape> | hf:<VLM directory>`: the VLM prefill
benchmark end to end on tiny shapes (a smoke test of the command and of ``vtr.tools.bench_vlm``, not a timing)."""
import json

import pytest

from vtr.cli import main
from vtr.tools import bench_vlm

FAST = ["--reps", "1", "--threads", "1", "--decode-tokens", "1"]


pytestmark = pytest.mark.usefixtures("threads_restored")   # tests/conftest.py


def test_llava_table_has_the_macs_ratio_beside_the_speedup(capsys):
    assert main(["bench", "--model", "llava:tiny", "--methods", "tome,fastv", "--keep", "0.25", *FAST]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == bench_vlm.HEADER.splitlines()[0]
    rows = [line.split(" | ") for line in lines[2:]]
    assert [r[0] for r in rows] == ["| tome (25%)", "| fastv (25%)"]
    for row in rows:
        assert row[1] == "before LM" and row[2] == "4"    # 16 visual tokens, a quarter kept
        ratio, bound = row[3].split()
        assert 0 < float(ratio) < 1 and bound == f"({1 / float(ratio):.2f}x)"
        assert row[5].endswith("x") and float(row[5][:-1]) > 0
    assert "llava:tiny" in captured.err and "(16 visual)" in captured.err


def test_qwen_vl_json_rows(capsys):
    assert main(["bench", "--model", "qwen-vl:tiny", "--methods", "tome", "--budget", "8,4", "--batch", "2",
                 "--json", *FAST]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["kept"], r["visual"], r["batch"]) for r in rows] == [("tome", 8, 16, 2), ("tome", 4, 16, 2)]
    assert 0 < rows[1]["macs_ratio"] < rows[0]["macs_ratio"] < 1
    assert all(r["speedup"] > 0 and r["prefill_s"] > 0 and r["decode_ms"] > 0 for r in rows)


def test_qwen_vl_video(capsys):
    assert main(["bench", "--model", "qwen-vl:tiny", "--methods", "tome", "--video-frames", "4", "--img-size", "56",
                 "--keep", "0.5", "--json", *FAST]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["visual"] == 8 and row["kept"] == 4   # 2 temporal patches x 2 x 2 merged tokens


@pytest.mark.parametrize("video, visual", [(0, 16), (4, 8)])
def test_qwen3_vl_image_and_timestamped_video(video, visual, capsys):
    """Qwen3-VL: a 128 px image (8 x 8 patches of 16: 16 tokens); a 4-frame video of 64 px (2 temporal patches of
    2 x 2 tokens, each between its own timestamp), reduced before the LM and inside it (after DeepStack's layers)."""
    assert main(["bench", "--model", "qwen-vl:3-tiny", "--methods", "tome", "--keep", "0.5", "--json",
                 *(["--video-frames", str(video), "--img-size", "64"] if video else []), *FAST]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["visual"], row["kept"]) == (visual, visual // 2) and 0 < row["macs_ratio"] < 1
    model = bench_vlm.build("qwen-vl:3-tiny", 2, 3)
    load = bench_vlm.workload(model, video_frames=video, image_size=64 if video else 128)
    (row,) = bench_vlm.run(model, load, [("fastv", {"method": "fastv", "budget": 2, "layers": [2]})], rounds=1,
                           decode_tokens=1)
    assert (row.where, row.visual, row.kept) == ("LM layer 2", visual, 2)


@pytest.mark.parametrize("video, visual", [(0, 36), (4, 17)])
def test_onevision_image_and_video(video, visual, capsys):
    """An image: the base view (4 x 4) and one crop (4 x 4 and a newline per row); a video: 4 frames pooled to
    2 x 2 and one newline."""
    assert main(["bench", "--model", "onevision:tiny", "--methods", "tome,fastv", "--keep", "0.5", "--json",
                 *(["--video-frames", str(video)] if video else []), *FAST]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["visual"], r["kept"]) for r in rows] == [(m, visual, round(visual / 2))
                                                                      for m in ("tome (50%)", "fastv (50%)")]
    assert all(0 < r["macs_ratio"] < 1 and r["speedup"] > 0 for r in rows)


def test_a_smaller_onevision_tower_takes_smaller_frames():
    model = bench_vlm.build("onevision:tiny", 1, 1, tower_size=112)
    load = bench_vlm.workload(model, video_frames=2, frames="novelty")
    assert load.visual == 2 * 4 * 4 + 1 and load.inputs["pixel_values_videos"].shape == (1, 2, 3, 112, 112)
    assert load.patch == {"frames": "novelty"}
    (row,) = bench_vlm.run(model, load, [("tome", {"method": "tome", "budget": 9})], rounds=1, decode_tokens=1)
    assert row.kept == 9


def test_onevision_in_llm_pruning():
    model = bench_vlm.build("onevision:tiny", 1, 2)
    load = bench_vlm.workload(model, video_frames=4)
    (row,) = bench_vlm.run(model, load, [("fastv", {"method": "fastv", "budget": 6, "layers": [1]})], rounds=1,
                           decode_tokens=2)
    assert (row.where, row.visual, row.kept) == ("LM layer 1", 17, 6)
    assert 0 < row.macs_ratio < 1 and row.decode_ms > 0


def test_gemma3_image(capsys):
    assert main(["bench", "--model", "gemma3:tiny", "--methods", "tome,fastv", "--budget", "4", "--json", *FAST]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["visual"], r["kept"]) for r in rows] == [("tome", 16, 4), ("fastv", 16, 4)]
    assert all(0 < r["macs_ratio"] < 1 and r["speedup"] > 0 for r in rows)


@pytest.mark.parametrize("family", ["smolvlm", "internvl"])
def test_tiled_models_budgets_count_per_tile(family, capsys):
    """An image of 2 x 2 tiles and its global view / thumbnail (5 tiles of 16 tokens): --keep 0.25 keeps 4 tokens
    of each tile, before the LM and inside it; a budget past a tile's count is refused."""
    assert main(["bench", "--model", f"{family}:tiny", "--methods", "tome", "--keep", "0.25", "--json", *FAST]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["visual"], row["kept"]) == (80, 20) and 0 < row["macs_ratio"] < 1
    model = bench_vlm.build(f"{family}:tiny", 1, 2)
    (row,) = bench_vlm.run(model, bench_vlm.workload(model), [("fastv", {"method": "fastv", "budget": 4,
                                                                          "layers": [1]})], rounds=1, decode_tokens=1)
    assert (row.where, row.visual, row.kept) == ("LM layer 1", 80, 20)
    with pytest.raises(SystemExit):
        main(["bench", "--model", f"{family}:tiny", "--methods", "tome", "--budget", "17", *FAST])
    assert "17 is more than the 16 visual tokens of a tile" in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["llava:tiny", "qwen-vl:tiny", "qwen-vl:3-tiny", "onevision:tiny", "gemma3:tiny",
                                   "smolvlm:tiny", "internvl:tiny"])
def test_a_saved_vlm_directory_runs_the_vlm_benchmark(shape, tmp_path, capsys):
    bench_vlm.build(shape).save_pretrained(tmp_path)
    assert main(["bench", "--model", f"hf:{tmp_path}", "--methods", "fastv", "--budget", "8", "--json",
                 *(["--img-size", "128"] if shape.startswith("qwen-vl:3") else ["--img-size", "112"]
                   if shape.startswith("qwen") else []), *FAST]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    tiled = shape.startswith(("smolvlm", "internvl"))
    assert row["kept"] == (40 if tiled else 8)   # SmolVLM, InternVL: 8 per tile, 5 tiles
    assert row["visual"] == (80 if tiled else 36 if shape.startswith("onevision") else 16)   # OneVision: crops


MISTAKES = [
    (["--model", "llava:13b"], "--model", "unknown VLM shape 'llava:13b'; the built-in shapes are llava:1.5-7b, "
                                          "llava:next-7b, llava:tiny"),
    (["--model", "qwen-vl:nope"], "--model", "qwen-vl:2.5-7b, qwen-vl:tiny, qwen-vl:3-8b, qwen-vl:3-tiny"),
    (["--model", "llava:tiny", "--flops", "0.5"], "--flops", "--keep fractions or --budget"),
    (["--model", "llava:tiny", "--plot", "f.png"], "--plot", "image-model benchmarks only"),
    (["--model", "llava:tiny", "--batch", "1,2"], "--batch", "one batch size"),
    (["--model", "llava:tiny", "--budget", "17"], "--budget", "more than the 16 visual tokens"),
    (["--model", "llava:tiny", "--keep", "0.5", "--budget", "4"], "--budget", "not allowed with argument --keep"),
    (["--model", "llava:tiny", "--img-size", "112"], "--img-size", "takes 56x56 images"),
    (["--model", "llava:tiny", "--video-frames", "4"], "--video-frames", "videos are benchmarked on Qwen-VL"),
    (["--model", "qwen-vl:tiny", "--img-size", "100"], "--img-size", "multiple of 28"),
    (["--model", "onevision:7", "--video-frames", "4"], "--model", "onevision:7b, onevision:tiny"),
    (["--model", "onevision:tiny", "--video-frames", "4", "--img-size", "112"], "--video-frames",
     "takes 56x56 frames"),
    (["--model", "vit_tiny_patch16_224", "--keep", "0.5"], "--keep", "is for the VLM prefill benchmark"),
    (["--model", "vit_tiny_patch16_224", "--lm-layers", "1"], "--lm-layers", "is for the VLM prefill benchmark"),
    (["--model", "qwen-vl:tiny", "--tower-layer", "5"], "--tower-layer", "tower_layer must be an int in [0, 1]"),
    (["--model", "vit_tiny_patch16_224", "--tower-layer", "0"], "--tower-layer", "is for the VLM prefill benchmark"),
]


@pytest.mark.parametrize("argv, flag, says", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_mistakes_exit_2_with_one_line(argv, flag, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and flag in errors[0] and says in errors[0], captured.err


def test_where_names_an_in_lm_methods_own_layer():
    model = bench_vlm.build("llava:tiny", 2, 2)
    assert bench_vlm.where_of(model, {"method": "dart", "budget": 4}) == "LM layer 1"   # DART's K = 2, capped
    assert bench_vlm.where_of(model, {"method": "fastv", "budget": 4}) == "before LM"
    assert bench_vlm.where_of(model, {"method": "fastv", "budget": 4, "layers": [1]}) == "LM layer 1"


def test_all_keeps_the_methods_that_act_where_the_benchmark_runs_them():
    from vtr.cli.usage import method_list_or_all, runnable
    every = method_list_or_all("all")
    tower, vlm = runnable(every, ("tower",)), runnable(every, ("before_lm", "in_lm"))
    assert "tome" in tower and "dynamicvit" in tower and "dart" not in tower
    assert {"dart", "pyramiddrop", "sparsevlm", "cdpruner", "tome"} <= set(vlm) and "sit" not in vlm
    assert runnable(["dart"], ("tower",)) == ["dart"]   # named: patching it says why it cannot run there


def test_qwen_vl_inside_the_tower_reports_the_towers_macs_beside_the_vision_speedup(capsys):
    """--tower-layer K: each variant reduces inside the tower after block K; the row says where, and gives the
    tower's MACs ratio (its bound) beside the vision part's speed-up, apart from the prefill's."""
    assert main(["bench", "--model", "qwen-vl:tiny", "--methods", "fastv", "--keep", "0.25", "--tower-layer", "0",
                 "--json", *FAST]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["where"], row["visual"], row["kept"]) == ("tower block 0", 16, 4)
    assert 0 < row["tower_macs_ratio"] < 1 and row["vision_speedup"] > 0 and 0 < row["macs_ratio"] < 1
    table = bench_vlm.format_row(bench_vlm.Row(**row))
    assert table.endswith(f"| {row['tower_macs_ratio']:.3f} ({1 / row['tower_macs_ratio']:.2f}x) | "
                          f"{row['vision_speedup']:.2f}x |")
    assert "| - |" in bench_vlm.format_row(bench_vlm.Row(**dict(row, tower_macs_ratio=None)))

