"""The `vtr` command in-process: `vtr bench` end to end on a tiny model (a smoke test of the command,
not a timing), the conventions every subcommand shares, and the table of user mistakes: each exits
with status 2 and one error line naming the flag, never a traceback."""
import argparse
import json

import pytest
import torch

import vtr
from vtr.cli import main, parser
from vtr.tools import bench

TINY = "vit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("threads_restored")   # tests/conftest.py


def test_bench_prints_a_row_per_method(capsys):
    assert main(["bench", "--model", TINY, "--img-size", "112", "--batch", "1", "--reps", "1", "--threads", "1",
                 "--methods", "tome,pitome", "--flops", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["none", "tome", "pitome"]
    for row in rows[1:]:
        assert abs(row["flops_fraction"] - 0.5) < 0.01 and row["tokens_out"] < 50
        assert 0 < row["reducer_share"] < 1
    assert rows[0]["flops_fraction"] == 1.0 and rows[0]["tokens_out"] == 50   # 7x7 patches + CLS


def test_bench_table_and_plot(capsys, tmp_path):
    png = tmp_path / "frontier.png"
    assert main(["--model", TINY, "--img-size", "64", "--batch", "1", "--reps", "2", "--threads", "1",
                 "--methods", "tome,random",
                 "--flops", "0.7,0.9", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "tome" in out and out.count("random") == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tome" in vtr.methods()


def test_bench_builds_clip_towers_by_name(capsys):
    assert main(["bench", "--model", "hf:siglip-vit-b16", "--img-size", "64", "--batch", "1", "--reps", "1",
                 "--threads", "1", "--methods", "evit", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["tokens_out"] == 16 and abs(rows[1]["flops_fraction"] - 0.5) < 0.02  # SigLIP: no CLS


# -- user mistakes: (argv, the flag the error line names, what else it must say) -----------------------
# "{tmp}" stands for a folder holding "text.txt", "notes.txt" and "hi.txt", files that are neither an image nor a
# checkpoint (torch's unpickler trips over them with UnpicklingError, IndexError and KeyError), and
# "bert/config.json", the config of a model that is no image model.
MISTAKES = [
    # bench
    (["bench", "--model", "nope_model"], "--model", "unknown timm model 'nope_model'"),
    (["bench", "--model", "vit_tiny_patch16_22"], "--model", "did you mean vit_tiny_patch16_224"),
    (["bench", "--model", "hf:nope"], "--model", "not in the local Hugging Face cache, and vtr downloads nothing"),
    (["bench", "--model", "hf:nobody/no-such-model"], "--model", "not in the local Hugging Face cache"),
    (["bench", "--model", "hf:./no-such-dir"], "--model", "no such directory"),
    (["bench", "--model", "hf:{tmp}"], "--model", "holds no model config.json"),
    (["bench", "--model", "hf:{tmp}/bert"], "--model", "BertModel is not an image model the vtr command runs"),
    (["bench", "--model", "hf:"], "--model", "give a timm name, open_clip:<name> or hf:"),
    (["bench", "--model", "open_clip:ViT-B-3"], "--model", "did you mean ViT-B-32"),
    (["bench", "--model", "resnet18", "--methods", "tome"], "--model", "supported: timm VisionTransformer"),
    (["bench", "--flops", "0"], "--flops", "(0, 1]"),
    (["bench", "--flops", "1.5"], "--flops", "(0, 1]"),
    (["bench", "--flops", "half"], "--flops", "(0, 1]"),
    (["bench", "--flops", "0.5,"], "--flops", "no empty item"),
    (["bench", "--model", TINY, "--methods", "tome", "--flops", "0.05"], "--flops", "allowed range is"),
    (["bench", "--batch", "0"], "--batch", "positive integer"),
    (["bench", "--batch", "-2"], "--batch", "positive integer"),
    (["bench", "--batch", "two"], "--batch", "positive integer"),
    (["bench", "--batch", "0,8"], "--batch", "positive integer (1 or more), got 0"),
    (["bench", "--batch", "x"], "--batch", "positive integer (1 or more), got 'x'"),
    (["bench", "--batch", "1,8,"], "--batch", "no empty item"),
    (["bench", "--device", "tpu"], "--device", "expected cpu or cuda"),
    (["bench", "--out", "rows.png"], "--out", "draw a picture with --plot rows.png"),
    (["bench", "--out", "/nonexistent-dir/rows.json"], "--out", "no such directory"),
    (["bench", "--reps", "0"], "--reps", "positive integer"),
    (["bench", "--threads", "0"], "--threads", "positive integer"),
    (["bench", "--methods", "nope"], "--methods", "choose from atf"),
    (["bench", "--methods", "tome,"], "--methods", "no empty item"),
    (["bench", "--plot", "/nonexistent-dir/f.png"], "--plot", "no such directory"),
    (["--batch", "0"], "--batch", "positive integer"),   # bench is the default command
    (["benchh"], "command", "invalid choice"),
    # profile
    (["profile", "--model", "nope_model"], "--model", "timm.list_models()"),
    (["profile", "--model", "resnet18"], "--model", "supported: timm VisionTransformer"),
    (["profile", "--model", TINY, "--method", "nope"], "--method", "choose from atf"),
    (["profile", "--model", TINY, "--method", "tome", "--flops", "2"], "--flops", "(0, 1]"),
    (["profile", "--model", TINY, "--method", "tome", "--flops", "0.05"], "--flops", "allowed range is"),
    (["profile", "--model", TINY, "--method", "tome", "--keep", "0"], "--keep", "(0, 1]"),
    (["profile", "--model", TINY, "--method", "tome", "--keep", "0.3"], "--keep", "[0.5, 1]"),
    (["profile", "--model", TINY, "--method", "tome", "--r", "-1"], "--r", "non-negative integer"),
    (["profile", "--model", TINY, "--method", "tome", "--flops", "0.5", "--r", "4"], "--r", "not allowed with"),
    (["profile", "--model", TINY, "--method", "tome"], "--method", "needs an amount"),
    (["profile", "--model", TINY, "--flops", "0.5"], "--flops", "needs --method or --preset"),
    (["profile", "--model", TINY, "--method", "tome", "--flops", "0.5", "--option", "foo=1"], "--option",
     "takes no option foo; its options: none"),
    (["profile", "--model", TINY, "--method", "pitome", "--flops", "0.5", "--option", "margin=2"], "--option",
     "margin must be in [0, 1)"),
    (["profile", "--model", TINY, "--method", "pitome", "--flops", "0.5", "--option", "margin=abc"], "--option",
     "pitome: margin must be in [0, 1), got 'abc'"),
    (["profile", "--model", TINY, "--method", "random", "--keep", "0.6", "--option", "seed=a"], "--option",
     "random: seed must be an integer, got 'a'"),
    (["profile", "--model", TINY, "--method", "random", "--keep", "0.6", "--option", "seed=1.5"], "--option",
     "random: seed must be an integer, got 1.5"),
    (["profile", "--model", TINY, "--method", "atf", "--flops", "0.8", "--option", "prior=[1,2]"], "--option",
     "atf: prior has 2 positions but the input has 196 patch tokens"),
    (["profile", "--model", TINY, "--method", "atf", "--flops", "0.8", "--option", "prior=abc"], "--option",
     "atf: prior must be numbers, an importance per patch position"),
    (["profile", "--model", TINY, "--method", "tome", "--flops", "0.5", "--option", "foo"], "--option",
     "KEY=VALUE"),
    (["profile", "--model", TINY, "--option", "seed=1"], "--option", "needs --method or --preset"),
    (["profile", "--model", TINY, "--batch", "0"], "--batch", "positive integer"),
    (["profile", "--model", TINY, "--img-size", "0"], "--img-size", "positive integer"),
    (["profile", "--counter", "nope"], "--counter", "choose from"),
    (["profile", "--model", TINY, "--real", "--device", "gpu"], "--device", "expected cpu or cuda"),
    (["profile", "--preset", "nope"], "--preset", "the model zoo has: "),
    (["profile", "--model", TINY, "--checkpoint", "missing.pt"], "--checkpoint", "no such file"),
    (["profile", "--model", TINY, "--checkpoint", "{tmp}/text.txt"], "--checkpoint", "no state dict"),
    (["profile", "--model", TINY, "--checkpoint", "{tmp}/notes.txt"], "--checkpoint",
     "notes.txt is no state dict torch.load(weights_only=True) can read (IndexError)"),
    (["profile", "--model", TINY, "--checkpoint", "{tmp}/hi.txt"], "--checkpoint",
     "hi.txt is no state dict torch.load(weights_only=True) can read (KeyError)"),
    # visualize
    (["visualize", "--model", TINY, "--image", "nope.png"], "--image", "astronaut, chelsea"),
    (["visualize", "--model", TINY, "--image", "{tmp}/text.txt"], "--image", "cannot identify image"),
    (["visualize", "--model", TINY, "--method", "nope"], "--method", "choose from atf"),
    (["visualize", "--model", TINY, "--out", "/nonexistent-dir/g.png"], "--out", "no such directory"),
    # zoo
    (["zoo", "nope"], "name", "the model zoo has: "),
    # fidelity
    (["fidelity", "--quick", "--targets", "1.5"], "--targets", "(0, 1]"),
    (["fidelity", "--quick", "--targets", "0.7,x"], "--targets", "(0, 1]"),
    (["fidelity", "--quick", "--methods", "nope"], "--methods", "choose from atf"),
    (["fidelity", "--quick", "--batch", "0"], "--batch", "positive integer"),
    (["fidelity", "--quick", "--batch-size", "10"], "--batch-size", "unrecognized arguments"),
    (["fidelity", "--quick", "--test-images", "0"], "--test-images", "positive integer"),
    (["fidelity", "--quick", "--second"], "--second", "not allowed with argument --quick"),
    (["fidelity", "--quick", "--json", "out.json"], "out.json", "unrecognized arguments"),   # a switch now
    (["fidelity", "--quick", "--out", "/nonexistent-dir/r.json"], "--out", "no such directory"),
    (["fidelity", "--quick", "--out", "acc.png"], "--out", "draw a picture with --plot"),
    (["fidelity", "--quick", "--device", "cuda:x"], "--device", "expected cpu or cuda"),
    (["fidelity", "--checkpoint", "missing.pt"], "--checkpoint", "no such file"),
    (["fidelity", "--checkpoint", "{tmp}/text.txt"], "--checkpoint", "needs --model"),
    (["fidelity", "--checkpoint", "{tmp}/text.txt", "--model", "nope_model", "--data", "{tmp}"], "--model",
     "unknown timm model"),
    (["fidelity", "--checkpoint", "{tmp}/text.txt", "--model", TINY, "--data", "{tmp}"], "--checkpoint",
     "no state dict"),
    (["fidelity", "--model", TINY], "--model", "needs --checkpoint"),
    (["fidelity", "--model", "llava-task", "--second"], "--second", "does not apply to --model llava-task"),
    (["fidelity", "--model", "qwen-task", "--stages", "after"], "--stages", "before and/or in"),
    (["fidelity", "--model", "qwen-task", "--budgets", "0.5,1"], "--budgets", "fraction in (0, 1)"),
    (["fidelity", "--data", "/nonexistent-dir"], "--data", "no such directory"),
]


@pytest.mark.parametrize("argv, flag, says", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_user_mistakes_exit_2_with_one_line_naming_the_flag(argv, flag, says, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("not an image, not a checkpoint\n")
    (tmp_path / "notes.txt").write_text("buy milk\n")
    (tmp_path / "hi.txt").write_text("hi\n")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(errors) == 1, captured.err
    assert errors[0].startswith("vtr") and flag in errors[0] and says in errors[0], errors[0]


def test_internal_errors_keep_their_traceback(monkeypatch):
    """Only what validates the user's input becomes exit 2; an error inside the computation (even a
    ValueError) propagates, so Python prints its traceback."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bench, "measure", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["bench", "--model", TINY, "--methods", "tome", "--batch", "1", "--reps", "1"])

    def deep_value_error(*args, **kwargs):
        raise ValueError("raised deep inside a computation")

    monkeypatch.setattr("vtr.cli.profile.profile_model", deep_value_error)
    with pytest.raises(ValueError, match="deep inside"):
        main(["profile", "--model", TINY, "--img-size", "32"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"vtr {vtr.__version__}\n"


def test_profile_fvcore_json_is_valid_json(capsys):
    assert main(["profile", "--model", TINY, "--img-size", "32", "--counter", "fvcore", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counter"] == "fvcore" and data["macs"] > 0
    blocks = [row for row in data["rows"] if row["tokens_in"] is not None]
    assert len(blocks) == 12 and all(isinstance(row["tokens_in"], float) for row in blocks)
    assert blocks[0]["tokens_in"] == 5.0   # 2x2 patches + CLS at 32x32


def test_every_option_has_help():
    """Every flag of every subcommand says what it does (no hidden or undocumented options)."""
    root = parser()
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"bench", "profile", "visualize", "zoo", "fidelity"}
    missing = [f"{name} {action.option_strings or action.dest}" for name, sub in commands.items()
               for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and action.help in (None, "", argparse.SUPPRESS)]
    assert not missing, f"options without help: {missing}"


def test_every_subcommand_takes_json():
    """As the README says: every subcommand takes --json, a switch that prints JSON to stdout."""
    root = parser()
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        switch = next((a for a in sub._actions if "--json" in a.option_strings), None)
        assert isinstance(switch, argparse._StoreTrueAction), f"vtr {name} takes no --json switch"


def test_visualize_json(tmp_path, capsys):
    png = tmp_path / "groups.png"
    assert main(["visualize", "--model", TINY, "--img-size", "32", "--out", str(png), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(png) and printed["tokens"][0] == 5 and png.read_bytes()[:4] == b"\x89PNG"


def test_profile_counts_a_data_dependent_reduction_on_real_inputs(capsys):
    """hired decides shapes from token values (its partitions), which the meta device does not have: vtr profile
    counts it on a real random batch, as --real does, and says so on stderr (no traceback)."""
    argv = ["profile", "--model", TINY, "--img-size", "64", "--method", "hired", "--keep", "0.5", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "counting on real random inputs (as --real)" in captured.err and "Traceback" not in captured.err
    counted = json.loads(captured.out)
    tokens = [row["tokens_in"] for row in counted["rows"] if row["tokens_in"] is not None]
    assert tokens[:4] == [17, 17, 17, 9]   # 4x4 patches + CLS, halved once at block 2 (a sixth of 12)
    assert main([*argv, "--real"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == counted["macs"]


BROKEN_SAVED = {   # how to break the reduction saved beside a model -> what the error line says after the file
    "not JSON": lambda d: (d / "vtr_reduction.json").write_text("{"),
    "arguments an array": lambda d: (d / "vtr_reduction.json").write_text(
        json.dumps(json.loads((d / "vtr_reduction.json").read_text()) | {"arguments": [1]})),
    "no metric": lambda d: (d / "vtr_reduction.json").write_text(
        json.dumps({k: v for k, v in json.loads((d / "vtr_reduction.json").read_text()).items() if k != "metric"})),
    "a corrupt sidecar": lambda d: (d / "vtr_reduction.pt").write_bytes(b"not a torch file\n"),
}
BROKEN_SAYS = {"not JSON": "vtr_reduction.json is not JSON",
               "arguments an array": "vtr_reduction.json: field 'arguments' must be an object",
               "no metric": "vtr_reduction.json: field 'metric' is missing",
               "a corrupt sidecar": "vtr_reduction.pt is no tensor file"}


@pytest.mark.parametrize("broken", sorted(BROKEN_SAVED))
def test_a_broken_saved_reduction_beside_the_model_is_a_usage_error(broken, tmp_path, capsys):
    model = vtr.patch(saved_clip(tmp_path), "atf", keep=0.5, prior=torch.full((16,), 1 / 16))   # 4x4 patches
    vtr.save_reduction(model, tmp_path)
    BROKEN_SAVED[broken](tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--model", f"hf:{tmp_path}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert exit_info.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("vtr profile: error: argument --model: " + str(tmp_path)), errors[0]
    assert BROKEN_SAYS[broken] in errors[0], errors[0]


def test_the_library_refuses_what_the_cli_refuses():
    """The checks the CLI relies on hold for library callers too."""
    from vtr.tools.models import create_model
    from vtr.tools.profile import default_input

    model = create_model(TINY, img_size=32)
    for kwargs in ({"batch": 0}, {"reps": 0}, {"threads": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            bench.run(model, [("tome", {"flops": 0.7})], **kwargs)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        default_input(model, batch=0)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("nope_model")
    with pytest.raises(ValueError, match="its options: none"):
        vtr.make_reducer("tome", args=1)   # nn.Module's *args, **kwargs are no options


# -- hf:<directory> and hf:<Hub id>: loaded, never downloaded ---------------------------------------

def saved_clip(path):
    """A tiny CLIPVisionModel written by save_pretrained (32x32 images, 4x4 patches + CLS = 17 tokens)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    model = CLIPVisionModel(config).eval()
    model.save_pretrained(path)
    return model


def test_profile_a_directory_written_by_save_pretrained(tmp_path, capsys):
    from vtr.tools.models import create_model

    saved = saved_clip(tmp_path / "clip")
    loaded = create_model(f"hf:{tmp_path / 'clip'}")   # the saved weights, not random ones
    assert type(loaded).__name__ == "CLIPVisionModel" and not loaded.training
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert main(["profile", "--model", f"hf:{tmp_path / 'clip'}", "--json"]) == 0
    blocks = [row for row in json.loads(capsys.readouterr().out)["rows"] if row["tokens_in"] is not None]
    assert [row["tokens_in"] for row in blocks] == [17, 17]
    assert main(["profile", "--model", f"hf:{tmp_path / 'clip'}", "--method", "tome", "--r", "4", "--real",
                 "--device", "cpu", "--json"]) == 0
    blocks = [row for row in json.loads(capsys.readouterr().out)["rows"] if row["tokens_in"] is not None]
    assert [row["tokens_in"] for row in blocks] == [17, 13]
    with pytest.raises(SystemExit) as exit_info:   # a loaded model runs at the size it was saved for
        main(["profile", "--model", f"hf:{tmp_path / 'clip'}", "--img-size", "64"])
    assert exit_info.value.code == 2 and "was saved for 32x32 images" in capsys.readouterr().err


def test_a_saved_reduction_beside_the_model_applies(tmp_path, capsys):
    model = vtr.patch(saved_clip(tmp_path), "tome", r=4)
    vtr.save_reduction(model, tmp_path)
    assert main(["profile", "--model", f"hf:{tmp_path}", "--json"]) == 0
    captured = capsys.readouterr()
    blocks = [row for row in json.loads(captured.out)["rows"] if row["tokens_in"] is not None]
    assert [row["tokens_in"] for row in blocks] == [17, 13] and "applied the reduction saved in" in captured.err
    assert main(["profile", "--model", f"hf:{tmp_path}", "--method", "none", "--json"]) == 0   # explicit wins
    blocks = [row for row in json.loads(capsys.readouterr().out)["rows"] if row["tokens_in"] is not None]
    assert [row["tokens_in"] for row in blocks] == [17, 17]
    assert main(["visualize", "--model", f"hf:{tmp_path}", "--out", str(tmp_path / "groups.png")]) == 0
    assert "tokens per block: [17, 13, 9]" in capsys.readouterr().out   # the saved reduction, not tome at 50%


def test_an_image_text_model_gives_its_image_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from vtr.tools.models import create_model

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    saved = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    saved.save_pretrained(tmp_path)
    tower = create_model(f"hf:{tmp_path}")
    assert type(tower).__name__ == "CLIPVisionModel"
    assert all(torch.equal(v, saved.vision_model.state_dict()[k]) for k, v in tower.state_dict().items())


def test_a_hub_id_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    """A Hub id is looked up in the local cache (here a fake one); it is never downloaded."""
    import huggingface_hub.constants

    from vtr.tools.models import create_model

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--clip"
    saved = saved_clip(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = create_model("hf:tiny/clip")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        create_model("hf:tiny/other")


# -- --device -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["bench"], ["profile", "--real"], ["fidelity", "--quick"]])
def test_cuda_without_cuda_is_a_usage_error(argv, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--device", "cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "argument --device: cuda is not available here" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs(tmp_path, capsys):
    assert main(["bench", "--model", TINY, "--img-size", "64", "--batch", "1,2", "--reps", "2", "--threads", "1",
                 "--methods", "tome", "--device", "cuda", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(row["latency_ms"] > 0 for row in rows) and 0 < rows[1]["reducer_share"] < 1
    assert main(["profile", "--model", TINY, "--img-size", "64", "--method", "tome", "--r", "2", "--real",
                 "--device", "cuda", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] > 0
    assert main(["fidelity", "--quick", "--cache", str(tmp_path), "--methods", "tome", "--targets", "0.7",
                 "--device", "cuda", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][1]["top1"] is not None


def test_bench_times_on_torch_benchmarks_synchronising_clock(monkeypatch):
    """Every call is timed by torch.utils.benchmark's clock (it synchronises CUDA): with a clock that
    ticks one second per reading, each call lasts exactly 1000 ms."""
    from torch.utils import benchmark

    ticks = iter(range(10_000))
    monkeypatch.setattr(benchmark, "timer", lambda: float(next(ticks)))
    model = vtr.tools.models.create_model(TINY, img_size=32)
    rows = bench.run(model, [("tome", {"r": 1})], batch=1, reps=3, warmup=0, threads=1)
    assert [row.latency_ms for row in rows] == [1000.0, 1000.0] and [row.iqr_ms for row in rows] == [0.0, 0.0]


# -- --batch sweeps -------------------------------------------------------------------------------

def test_bench_sweeps_batch_sizes(tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "sweep.png"
    assert main(["bench", "--model", TINY, "--img-size", "32", "--batch", "1,3", "--reps", "1", "--threads", "1",
                 "--methods", "tome", "--flops", "0.8", "--json", "--out", str(out), "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["batch"], r["method"]) for r in rows] == [(1, "none"), (1, "tome"), (3, "none"), (3, "tome")]
    assert rows[0]["speedup"] == rows[2]["speedup"] == 1.0   # each batch against its own unreduced run
    assert json.loads(out.read_text()) == rows
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = bench.format_table([bench.Row(**row) for row in rows])
    assert table.splitlines()[0].split()[0] == "batch" and "images/s" in table
    single = bench.format_table([bench.Row(**row) for row in rows[:2]])
    assert single.splitlines()[0].split()[0] == "method"   # one batch: today's table
