"""A patched model is still an ordinary PyTorch model.

Regression tests for what users do with any ``nn.Module`` and expect to keep working after
``vtr.patch``: share it between threads (each thread with its own input, or its own query),
train it without leaking the autograd graph (activation checkpointing included), deepcopy it (EMA),
pickle / ``torch.save`` it, hook its blocks, change its dtype and mode, call
``forward_features`` / ``forward_head`` by hand, and hand vtr its DataParallel or DistributedDataParallel
wrapper. This is the one home of these checks for every family (timm, open_clip, transformers, and the
VLMs Qwen-VL, LLaVA-OneVision and LLaVA-NeXT-Video; LLaVA's own are in test_llava.py); the harnesses
(``check_threads``, ``call_state``, ``reachable``) live in ``tests/conftest.py``.

Calls go through the public API (``vtr.patch``, ``vtr.unpatch``, ``vtr.report``, ``vtr.is_patched``,
``vtr.conditioned``); checks look inside only where that is their point: how many settings objects
(``Reduction``) a copy holds, this thread's query after a conditioned block, the walker's own control.
Models are tiny, random-weight, built from configs (no downloads). Every comparison of outputs is
between two runs of the same computation (same input, same model), so no float near-tie can flip it.
"""
from __future__ import annotations

import copy
import functools
import io
import pickle
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import pytest
import timm
import torch
from open_clip import CLIP
from open_clip.transformer import VisionTransformer as OpenClipTower
from timm.utils import ModelEmaV3
from torch import nn
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig,
                          SiglipVisionModel, ViTConfig, ViTForImageClassification)
from transformers.utils import logging as hf_logging

import vtr
from vtr.core import run as runs
from vtr.core.plan import Reduction

from conftest import THREADS, call_state, check_threads, probe, reachable
from llava_video_models import ROWS as VIDEO_MODEL_ROWS, inputs as video_model_inputs, tiny_next_video, tiny_onevision
from qwen_vl_models import batch as qwen_batch, generate as qwen_generate, logits as qwen_logits, tiny_qwen
from qwen3_vl_models import mixed_batch as qwen3_batch, tiny_qwen3
from gemma3_models import inputs as gemma3_inputs, tiny_gemma3
from smolvlm_models import inputs as smolvlm_inputs, tiny_smolvlm
from internvl_models import inputs as internvl_inputs, tiny_internvl
from vtr.adapters.vlm.language import decoder

hf_logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# -- tiny models of every family ------------------------------------------------------------------

def timm_vit(global_pool: str = "token") -> nn.Module:
    """timm ViT, 8x8 patches + CLS (65 tokens), 3 blocks."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=3, embed_dim=64,
                             num_heads=4, num_classes=10, global_pool=global_pool).eval()


def open_clip_tower(**overrides) -> nn.Module:
    """open_clip image tower, 8x8 patches + CLS; ``qk_norm=True`` builds CustomResidualAttentionBlock."""
    torch.manual_seed(0)
    return OpenClipTower(image_size=32, patch_size=4, width=32, layers=3, heads=4, mlp_ratio=2.0,
                         output_dim=16, **overrides).eval()


def open_clip_model(**vision_overrides) -> nn.Module:
    """A whole open_clip CLIP (image and text towers, 16-wide embeddings); its image path is
    ``encode_image``; ``qk_norm=True`` builds the custom block."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=4, width=32, head_width=8, layers=3, mlp_ratio=2.0) | vision_overrides
    text = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=2)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=32, patch_size=4)
HF_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
               max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def hf_model(model_class, config_class, **config) -> nn.Module:
    torch.manual_seed(0)
    model = model_class(config_class(**config)).eval()
    model.set_attn_implementation("sdpa")
    return model


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]   # the model's image output as one tensor
    blocks: Callable[[nn.Module], list]                      # the transformer blocks, in order
    image_size: int


def _timm(global_pool="token"):
    return Family(functools.partial(timm_vit, global_pool), lambda m, x: m(x), lambda m: list(m.blocks), 64)


def _open_clip_tower(**overrides):
    return Family(functools.partial(open_clip_tower, **overrides), lambda m, x: m(x),
                  lambda m: list(m.transformer.resblocks), 32)


def _open_clip_model(**overrides):
    return Family(functools.partial(open_clip_model, **overrides), lambda m, x: m.encode_image(x),
                  lambda m: list(m.visual.transformer.resblocks), 32)


def _hf(model_class, config_class, run=lambda m, x: m(pixel_values=x).pooler_output,
        blocks=lambda m: list(m.encoder.layers), **config):
    return Family(functools.partial(hf_model, model_class, config_class, **config), run, blocks, 32)


FAMILIES = {
    "timm": _timm(),
    "timm_avg": _timm("avg"),
    "open_clip": _open_clip_tower(),
    "open_clip_custom": _open_clip_tower(qk_norm=True),
    "open_clip_model": _open_clip_model(),
    "open_clip_model_custom": _open_clip_model(qk_norm=True),
    "hf_clip": _hf(CLIPVisionModel, CLIPVisionConfig, **HF_VISION),
    "hf_siglip": _hf(SiglipVisionModel, SiglipVisionConfig, **HF_VISION),
    "hf_clip_model": _hf(CLIPModel, CLIPConfig, vision_config=HF_VISION, text_config=HF_TEXT, projection_dim=24,
                         run=lambda m, x: m.get_image_features(pixel_values=x).pooler_output,
                         blocks=lambda m: list(m.vision_model.encoder.layers)),
    "hf_vit": _hf(ViTForImageClassification, ViTConfig, **HF_VISION, num_labels=5,
                  run=lambda m, x: m(pixel_values=x).logits, blocks=lambda m: list(m.vit.layers)),
}

# name -> (method, patch keywords); amounts are small enough for 64 patches over 3 blocks.
METHODS = {
    "none": ("none", {}),
    "tome": ("tome", {"r": 4}),
    "tome_keys": ("tome", {"r": 4, "metric": "keys"}),
    "pitome": ("pitome", {"r": 4}),
    "evit": ("evit", {"keep": 0.75}),
    "evit_keys": ("evit", {"keep": 0.75, "metric": "keys"}),
    "fastv": ("fastv", {"keep": 0.75}),
    "hired": ("hired", {"keep": 0.75}),
    "dynamicvit": ("dynamicvit", {"keep": 0.75}),   # learned reducers: modules of the model (issue 12)
    "sit": ("sit", {"keep": 0.75}),
}


def patched(family: str, method: str, checkpointing: bool = False) -> nn.Module:
    name, amount = METHODS[method]
    model = FAMILIES[family].build()
    if checkpointing:
        model.set_grad_checkpointing(True)
    return vtr.patch(model, name, **amount)


def pixels(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = FAMILIES[family].image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ids(cases) -> list[str]:
    return ["-".join(str(part) if not isinstance(part, bool) else ("checkpointing" if part else "plain")
                     for part in case) for case in cases]


# -- 1. threads -----------------------------------------------------------------------------------

CALLS = 8


def thread_inputs(family: str) -> list[list[torch.Tensor]]:
    """Distinct inputs for every call of every thread; at each call index the threads use batch
    sizes 1-4, one each, so a call that reads another's per-call state sees a different batch."""
    return [[pixels(family, batch=1 + (t + c) % THREADS, seed=1000 * t + c) for c in range(CALLS)]
            for t in range(THREADS)]


def thread_calls(family: str, model: nn.Module) -> list[list[Callable]]:
    return [[functools.partial(FAMILIES[family].run, model, x) for x in xs] for xs in thread_inputs(family)]


THREAD_CASES = [
    ("timm", "none"), ("timm", "tome"), ("timm", "tome_keys"), ("timm", "fastv"), ("timm", "hired"),
    ("timm_avg", "evit"),
    ("open_clip", "tome"), ("open_clip", "evit"), ("open_clip_custom", "evit"),
    ("hf_clip", "tome"), ("hf_clip", "evit_keys"), ("hf_siglip", "evit"), ("hf_siglip", "tome_keys"),
    ("timm", "dynamicvit"), ("open_clip_custom", "dynamicvit"), ("hf_clip", "sit"),
]


@pytest.mark.parametrize("family,method", THREAD_CASES, ids=ids(THREAD_CASES))
def test_threads_share_one_patched_model(family, method):
    """Concurrent calls on one patched model give each caller the output and the report of its own
    input, exactly as a lone call does (no per-call state shared between threads: token states,
    the q/k or CLS attention a reducer reads, reports)."""
    model = patched(family, method)
    check_threads(model, thread_calls(family, model))


@pytest.mark.parametrize("family,width", [("open_clip_model", 16), ("hf_clip_model", 24)])
def test_threads_each_get_their_own_query(family, width):
    """Each thread conditions the shared model on its own query (``vtr.conditioned``, a query-driven
    reducer): every call keeps the tokens its own thread's query picks, exactly as a lone call does,
    and no query outlives its block."""
    run = FAMILIES[family].run
    queries = [torch.randn(1, 3, width, generator=torch.Generator().manual_seed(20 + t)) for t in range(THREADS)]
    with probe():
        model = vtr.patch(FAMILIES[family].build(), "query_probe", keep=0.5, layers=[1])
        x, kept = pixels(family), set()
        with torch.no_grad():
            for query in queries:   # control: the queries keep different tokens, so one crossing threads shows
                with vtr.conditioned(model, query):
                    run(model, x)
                kept.add(tuple(vtr.report(model).assignment.flatten().tolist()))
        assert len(kept) > 1

        def conditioned(query, x):
            with vtr.conditioned(model, query):
                return run(model, x)

        check_threads(model, [[functools.partial(conditioned, query, x) for x in xs]
                              for query, xs in zip(queries, thread_inputs(family))])
        assert runs.query_of(model._vtr) is None


# -- 2. no autograd graph kept --------------------------------------------------------------------

GRAPH_CASES = [
    ("timm", "tome", False), ("timm", "evit", False), ("timm_avg", "tome_keys", False), ("timm", "tome_keys", True),
    ("open_clip", "tome", False), ("open_clip", "evit", False), ("open_clip", "evit", True),
    ("open_clip_custom", "tome_keys", False), ("open_clip_custom", "evit", False),
    ("hf_clip", "tome", False), ("hf_clip_model", "tome_keys", False),
    ("hf_siglip", "evit", False), ("hf_siglip", "tome_keys", False),
    ("timm", "sit", False), ("timm", "sit", True), ("open_clip", "sit", False), ("hf_siglip", "sit", False),
]


@pytest.mark.parametrize("family,method,checkpointing", GRAPH_CASES, ids=ids(GRAPH_CASES))
def test_training_step_leaves_no_graph_on_the_model(family, method, checkpointing):
    """After a grad-enabled forward (and its backward) in train mode, with or without activation
    checkpointing, the model holds no tensor of that pass's autograd graph and no run, token state
    or report (activations are freed when the caller drops its output); the gradient reaches every
    block, and the report is detached."""
    model = patched(family, method, checkpointing).train()
    out = FAMILIES[family].run(model, pixels(family))
    kept = call_state(model)
    assert not kept, f"after forward the model holds: {kept}"
    out.float().square().sum().backward()
    kept = call_state(model)
    assert not kept, f"after backward the model holds: {kept}"
    assert all(p.grad is not None for block in FAMILIES[family].blocks(model) for p in block.parameters())
    report = vtr.report(model)
    assert report.tokens[-1] < report.tokens[0]
    assert call_state(report, "report") == []


def test_harness_controls_on_unpatched_models():
    """Control, passes by design: an unpatched model passes the thread harness (so CPU results do not
    depend on which thread computes them) and the graph walker finds nothing on it (no false
    positives). If this fails, the harness is broken, not vtr."""
    for family in ("timm_avg", "open_clip", "hf_clip"):
        model = FAMILIES[family].build()
        check_threads(model, thread_calls(family, model), with_report=False)
        model = FAMILIES[family].build().train()
        out = FAMILIES[family].run(model, pixels(family))
        assert call_state(model) == []
        out.square().sum().backward()
        assert call_state(model) == []


class Holder:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def hook(self, *args) -> None:
        """A hook that does nothing: what the walker must find is held by its ``__self__``."""


@dataclass(eq=False)
class Box:
    value: object


def _with_attribute(value) -> torch.Tensor:
    tensor = torch.zeros(1)
    tensor.note = value
    return tensor


ROUTES = {   # how a forward pass could hang ``value`` on a module; ``alive`` keeps weakly held things alive
    "hook closure": lambda module, value, alive: module.register_forward_hook(lambda *args: value),
    "hook default": lambda module, value, alive: module.register_forward_hook(lambda *args, kept=value: None),
    "bound method, slot": lambda module, value, alive: module.register_forward_pre_hook(Holder(value).hook),
    "partial": lambda module, value, alive: module.register_forward_hook(functools.partial(print, value)),
    "dataclass": lambda module, value, alive: setattr(module, "box", Box(value)),
    "dict key": lambda module, value, alive: setattr(module, "table", {Holder(value): 1}),
    "weak reference": lambda module, value, alive: setattr(module, "ref", weakref.ref(alive.setdefault(0, Box(value)))),
    "tensor attribute": lambda module, value, alive: setattr(module, "extra", _with_attribute(value)),
}


def test_walker_finds_what_a_call_could_leave_by_every_route():
    """Control for the walker (``call_state``): a graph tensor, a run or a token state hung on a
    submodule by any route a forward pass could use (a hook's closure, default or bound method, a
    partial, a slot, a dataclass, a dict key, a weak reference, a tensor's attribute) is found. If this
    fails, the harness is broken, not vtr."""
    leftovers = {"graph tensor": torch.ones(2, requires_grad=True) * 2, "run": runs.Run(None),
                 "token state": vtr.TokenState.start(torch.zeros(1, 3, 4), 1)}
    for route, hang in ROUTES.items():
        for kind, value in leftovers.items():
            model, alive = nn.Sequential(nn.Linear(4, 4)), {}
            hang(model[0], value, alive)
            assert call_state(model), f"a {kind} held by {route} is not found"


# -- 3. copies: deepcopy, EMA, pickle, torch.save -------------------------------------------------

def check_one_patched_model(model: nn.Module) -> None:
    """``model`` (a copy) is one patched model of its own: a single settings object, shared by every
    part that reads it (a CLIP model and its image tower), and every module or parameter vtr points to
    is one of its own (a CLIP tower maps tokens with the copy's own projection, not the original's)."""
    found = list(reachable(model))
    settings = [obj for obj, _ in found if isinstance(obj, Reduction)]
    assert len(settings) == 1, f"{len(settings)} settings objects"
    owners = (model, settings[0].reducer)   # a reducer is a module of the settings
    own = {id(t) for owner in owners for t in (*owner.modules(), *owner.parameters())}
    strays = [path for obj, path in found if isinstance(obj, (nn.Module, nn.Parameter)) and id(obj) not in own]
    assert not strays, f"modules of another model: {strays}"


def layout(model: nn.Module) -> list:
    """What a model is, module by module: its class, how many forward hooks and pre-hooks it has, its
    attention implementation (transformers) and any ``_vtr`` attribute."""
    return [(name, type(m), len(m._forward_hooks), len(m._forward_pre_hooks),
             getattr(getattr(m, "config", None), "_attn_implementation", None),
             [k for k in vars(m) if k.startswith("_vtr")]) for name, m in model.named_modules()]


COPY_CASES = [("timm", "tome"), ("timm_avg", "evit"), ("open_clip", "tome"), ("open_clip_custom", "tome_keys"),
              ("hf_clip", "tome"), ("hf_siglip", "tome"), ("hf_clip_model", "tome_keys"),
               ("timm", "dynamicvit"), ("hf_clip_model", "sit")]


@pytest.mark.parametrize("family,method", COPY_CASES, ids=ids(COPY_CASES))
def test_deepcopy_after_a_training_step(family, method):
    """``copy.deepcopy`` of a model that just trained works and gives an independent patched model:
    one of its own (nothing shared with the original), same eval output, its own report, and
    unpatching it restores it cleanly and leaves the original patched."""
    run = FAMILIES[family].run
    model = patched(family, method).train()
    x = pixels(family)
    run(model, x).float().square().sum().backward()
    clone = copy.deepcopy(model)
    assert vtr.is_patched(clone)
    check_one_patched_model(clone)
    model.eval(), clone.eval()
    with torch.no_grad():
        expected = run(model, x)
        tokens = vtr.report(model).tokens
        assert torch.equal(run(clone, x), expected)
        assert vtr.report(clone).tokens == tokens
        run(clone, pixels(family, batch=3, seed=1))
    assert vtr.report(clone).size.shape[0] == 3 and vtr.report(model).size.shape[0] == 2
    vtr.unpatch(clone)
    assert layout(clone) == layout(FAMILIES[family].build())
    assert vtr.is_patched(model)
    with torch.no_grad():
        assert torch.equal(run(model, x), expected)


def test_timm_model_ema_created_mid_training():
    """``timm.utils.ModelEmaV3`` (a deepcopy) can wrap a patched model after a training step, update,
    and its EMA copy runs patched."""
    model = patched("timm", "tome").train()
    x = pixels("timm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    optimizer.step()
    ema = ModelEmaV3(model, decay=0.5)
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()
    ema.update(model, step=1)
    assert vtr.is_patched(ema.module)
    with torch.no_grad():
        out = ema.module.eval()(x)
    assert out.shape == (2, 10)
    assert vtr.report(ema.module).tokens == [65, 61, 57, 53]


def _torch_roundtrip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": lambda model: pickle.loads(pickle.dumps(model)), "torch.save": _torch_roundtrip}
PICKLE_CASES = [("timm", "tome_keys"), ("open_clip", "tome_keys"), ("open_clip_custom", "tome_keys"),
                ("open_clip_model", "tome"), ("open_clip_model_custom", "tome_keys"), ("hf_clip", "tome_keys"),
                ("hf_clip_model", "tome_keys"), ("hf_siglip", "tome_keys"), ("hf_vit", "tome_keys"),
                ("timm", "sit"), ("open_clip_model", "dynamicvit"), ("hf_clip_model", "dynamicvit")]


@pytest.mark.parametrize("family,method", PICKLE_CASES, ids=ids(PICKLE_CASES))
def test_pickle_roundtrip_keeps_the_patch(family, method):
    """A patched model survives pickle and torch.save (hooks vtr adds for keys included): the loaded
    model is one patched model of its own (a whole CLIP and its tower still share one settings object),
    gives the same output and report, and ``vtr.unpatch`` on it restores the unpatched model (classes,
    hooks, attention implementation) and its output; the original stays patched."""
    run = FAMILIES[family].run
    model = FAMILIES[family].build()
    x = pixels(family)
    with torch.no_grad():
        reference = run(model, x)
        unpatched = layout(model)
        vtr.patch(model, METHODS[method][0], **METHODS[method][1])
        reduced = run(model, x)
    assert not torch.equal(reduced, reference)
    for how, round_trip in ROUND_TRIPS.items():
        loaded = round_trip(model)
        assert vtr.is_patched(loaded) and vtr.family(loaded) == vtr.family(model), how
        check_one_patched_model(loaded)
        with torch.no_grad():
            assert torch.equal(run(loaded, x), reduced), how
        assert vtr.report(loaded).tokens == vtr.report(model).tokens
        vtr.unpatch(loaded)
        assert not vtr.is_patched(loaded) and layout(loaded) == unpatched, how
        with torch.no_grad():
            assert torch.equal(run(loaded, x), reference), how
    assert vtr.is_patched(model)
    with torch.no_grad():
        assert torch.equal(run(model, x), reduced)


# -- 4. block hooks -------------------------------------------------------------------------------

def _tokens_of(args: tuple, kwargs: dict, output=None) -> tuple:
    """(batch, tokens) of the hidden states a block received (or returned)."""
    value = output if output is not None else (args[0] if args else kwargs.get("hidden_states"))
    if isinstance(value, (tuple, list)):
        value = value[0]
    assert isinstance(value, torch.Tensor) and value.dim() == 3, type(value)
    return tuple(value.shape[:2])


HOOK_CASES = [(family, method, False) for family in ("timm", "open_clip", "open_clip_custom", "hf_clip", "hf_siglip",
                                                     "hf_vit") for method in ("none", "tome", "tome_keys")]
HOOK_CASES += [("hf_clip_model", "tome_keys", False),
               ("timm", "tome_keys", True), ("open_clip", "tome_keys", True), ("open_clip_custom", "tome_keys", True)]


@pytest.mark.parametrize("family,method,checkpointing", HOOK_CASES, ids=ids(HOOK_CASES))
def test_block_hooks_fire_once_with_the_blocks_own_tokens(family, method, checkpointing):
    """Forward pre-hooks and hooks on every transformer block fire exactly once per call; the block
    receives ``report.tokens[i]`` tokens and returns the count after its own reduction. Under
    activation checkpointing the same holds for the forward of a grad-enabled call (backward may
    recompute a block: with the same tokens), and backward leaves the report as it was."""
    model = patched(family, method, checkpointing)
    blocks = FAMILIES[family].blocks(model)
    seen = {"pre": [[] for _ in blocks], "post": [[] for _ in blocks]}
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen["pre"][i].append(_tokens_of(args, kwargs)), with_kwargs=True)
        block.register_forward_hook(
            lambda module, args, kwargs, output, i=i: seen["post"][i].append(_tokens_of(args, kwargs, output)),
            with_kwargs=True)
    for calls, batch in enumerate((2, 3), start=1):
        with torch.no_grad():
            FAMILIES[family].run(model, pixels(family, batch=batch, seed=batch))
        tokens = vtr.report(model).tokens
        for i in range(len(blocks)):
            assert len(seen["pre"][i]) == len(seen["post"][i]) == calls, f"block {i} hook count"
            assert seen["pre"][i][-1] == (batch, tokens[i]), f"block {i} input"
            assert seen["post"][i][-1] == (batch, tokens[i + 1]), f"block {i} output"
    if method != "none":
        assert tokens[-1] < tokens[0]
    if checkpointing:   # under grad the blocks run checkpointed
        for hooks in (*seen["pre"], *seen["post"]):
            hooks.clear()
        FAMILIES[family].run(model, pixels(family)).float().sum().backward()
        for i in range(len(blocks)):
            assert seen["pre"][i] and set(seen["pre"][i]) == {(2, tokens[i])}, f"block {i} input"
            assert seen["post"][i] and set(seen["post"][i]) == {(2, tokens[i + 1])}, f"block {i} output"
        assert vtr.report(model).tokens == tokens



def _first_norm(block: nn.Module) -> nn.Module:
    """The block's first LayerNorm (timm ``norm1``, open_clip ``ln_1``, transformers ``layer_norm1`` /
    ``layernorm_before``): the first module to read the block's input."""
    return next(m for m in block.modules() if isinstance(m, nn.LayerNorm))


RETURNING_CASES = [(family, method, False) for family in ("timm", "open_clip", "open_clip_custom", "hf_clip", "hf_vit")
                   for method in ("none", "tome")]
RETURNING_CASES += [("timm", "tome", True), ("open_clip", "tome", True)]


@pytest.mark.parametrize("family,method,checkpointing", RETURNING_CASES, ids=ids(RETURNING_CASES))
def test_block_hooks_that_return_a_value_replace_the_blocks_input_or_output(family, method, checkpointing):
    """As on any module, a forward pre-hook that returns a value replaces the block's input and a forward
    hook that returns a value replaces its output (issue 26: the timm and open_clip adapters dropped what a
    block returned and ran on with their own tokens). Block 1 reads exactly the tensor its pre-hook
    returned, block 2 gets exactly the tensor block 1's hook returned; with nothing to reduce the output
    is the unpatched model's with the same hooks, bit for bit. A hook that changes the number of tokens
    is an error (the token sizes are the block's)."""
    def hooked(model: nn.Module) -> dict:
        blocks, seen = FAMILIES[family].blocks(model), {}

        def replace_input(module, args):
            seen["input"] = args[0] * 0.5
            return (seen["input"], *args[1:])

        def replace_output(module, args, output):
            seen["output"] = output.flip(-1)   # the same tokens, other values
            return seen["output"]

        blocks[1].register_forward_pre_hook(replace_input)
        _first_norm(blocks[1]).register_forward_pre_hook(lambda module, args: seen.update(read=args[0]))
        blocks[1].register_forward_hook(replace_output)
        blocks[2].register_forward_pre_hook(lambda module, args: seen.update(next=args[0]))
        return seen

    model = patched(family, method, checkpointing)
    seen, x = hooked(model), pixels(family)
    with torch.set_grad_enabled(checkpointing):   # checkpointing runs the blocks only under grad
        out = FAMILIES[family].run(model, x)
    assert seen["read"] is seen["input"], "block 1 did not read what its pre-hook returned"
    assert seen["next"] is seen["output"], "block 2 did not get what block 1's hook returned"
    if method == "none":
        reference = FAMILIES[family].build()
        hooked(reference)
        with torch.set_grad_enabled(checkpointing):
            assert torch.equal(out, FAMILIES[family].run(reference, x))
    else:
        assert vtr.report(model).tokens[-1] < vtr.report(model).tokens[0]
    FAMILIES[family].blocks(model)[1].register_forward_hook(lambda module, args, output: output[:, :-1])
    with pytest.raises(RuntimeError, match="tokens"), torch.no_grad():
        FAMILIES[family].run(model, x)

# -- 5. dtype, device and mode changes ------------------------------------------------------------

@pytest.mark.parametrize("family", ["timm", "open_clip", "hf_clip"])
def test_double_precision_and_mode_toggles_keep_the_patch(family):
    """``.double()`` / ``.to(float64)`` and ``.train()`` / ``.eval()`` keep the model patched: 'none'
    stays exactly the unpatched float64 model, a reducing method runs in float64 and reports."""
    run = FAMILIES[family].run
    x = pixels(family).double()
    with torch.no_grad():
        reference = run(FAMILIES[family].build().double(), x)
        model = patched(family, "none").double()
        assert vtr.is_patched(model)
        assert torch.equal(run(model, x), reference)
        reducing = patched(family, "tome").to(torch.float64).train().eval().train().eval()
        assert vtr.is_patched(reducing)
        out = run(reducing, x)
        assert out.dtype == torch.float64
        assert vtr.report(reducing).tokens[-1] < vtr.report(reducing).tokens[0]
        assert torch.equal(run(reducing.train().eval(), x), out)


# -- 6. forward_features + forward_head -----------------------------------------------------------

@pytest.mark.parametrize("family,method", [("timm", "tome"), ("timm_avg", "evit"), ("timm_avg", "tome")])
def test_timm_forward_features_then_forward_head(family, method):
    """Calling the two halves of a timm forward by hand gives ``model(x)``."""
    model = patched(family, method)
    x = pixels(family)
    with torch.no_grad():
        whole = model(x)
        split = model.forward_head(model.forward_features(x))
    assert torch.equal(split, whole)


def _in_another_thread(call: Callable) -> BaseException:
    """What ``call`` raises in a thread of its own (None if nothing)."""
    raised = []

    def run():
        try:
            call()
        except BaseException as error:   # noqa: BLE001 - handed back to the test
            raised.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return raised[0] if raised else None


@pytest.mark.parametrize("family,method", [("timm_avg", "tome"), ("timm_avg", "evit")])
def test_timm_forward_head_pools_the_features_of_the_last_call_only(family, method):
    """``forward_head`` on its own pools reduced tokens by the sizes of the call that produced them (issue 26:
    after a second ``forward_features`` it pooled the first call's features with the second call's sizes,
    checking only their shape). This thread's last features, or a detached alias of them, give
    ``model(x)``; those of an earlier call, a copy, or another thread's call are refused with an error that
    says what to do; features of an unreduced call (``vtr.disabled``) pool as the unpatched model does."""
    model = patched(family, method)
    x1, x2 = pixels(family, seed=1), pixels(family, seed=2)
    refused = "call the model as a whole"
    with torch.no_grad():
        whole = model(x1)
        first = model.forward_features(x1)
        assert torch.equal(model.forward_head(first), whole)
        assert torch.equal(model.forward_head(first.detach()), whole)
        second = model.forward_features(x2)
        assert second.shape == first.shape     # the shape cannot tell them apart
        with pytest.raises(RuntimeError, match=refused):
            model.forward_head(first)
        with pytest.raises(RuntimeError, match=refused):
            model.forward_head(second.clone())
        error = _in_another_thread(lambda: (model.forward_features(x1), model.forward_head(second)))
        assert isinstance(error, RuntimeError) and refused in str(error)
        assert torch.equal(model.forward_head(second), model(x2))
        with vtr.disabled(model):
            unreduced = model.forward_features(x1)
        assert torch.equal(model.forward_head(unreduced), FAMILIES[family].build()(x1))


def test_timm_forward_head_of_a_cls_token_takes_any_calls_features():
    """A class-token head reads the CLS token alone, whatever the other tokens stand for: the features of
    an earlier call give that call's output."""
    model = patched("timm", "tome")
    x1, x2 = pixels("timm", seed=1), pixels("timm", seed=2)
    with torch.no_grad():
        first, whole = model.forward_features(x1), model(x1)
        model.forward_features(x2)
        assert torch.equal(model.forward_head(first), whole)


def test_timm_forward_features_then_forward_head_in_eval_under_active_train():
    """Eval mode under ``active="train"`` runs the unpatched model, split into its halves too."""
    model = vtr.patch(FAMILIES["timm_avg"].build(), "tome", r=4, active="train")
    x = pixels("timm_avg")
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), FAMILIES["timm_avg"].build()(x))


# -- 7. DataParallel and DistributedDataParallel: vtr sees through them ----------------------------

@pytest.fixture
def one_process_group(tmp_path):
    """A process group of one CPU process (gloo), which DistributedDataParallel needs."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


PARALLEL = {"data_parallel": nn.DataParallel, "distributed_data_parallel": nn.parallel.DistributedDataParallel}


@pytest.mark.parametrize("wrapper", sorted(PARALLEL))
def test_parallel_wrappers_are_seen_through(wrapper, request):
    """A training script holds the wrapper, not the model: ``vtr.patch``, ``vtr.report``, ``vtr.disabled``,
    ``vtr.expected_tokens``, ``vtr.is_patched`` and ``vtr.unpatch`` given a DataParallel (on the CPU it calls its
    module) or a DistributedDataParallel act on its ``.module``, as on peft's base model (they said "not
    patched")."""
    if wrapper == "distributed_data_parallel":
        request.getfixturevalue("one_process_group")
    model = FAMILIES["timm"].build()
    wrapped = PARALLEL[wrapper](model)
    if len(getattr(wrapped, "device_ids", None) or []) > 1:
        pytest.skip("DataParallel over several GPUs runs in threads of its own (see the test after this one)")
    x = pixels("timm").to(next(model.parameters()).device)
    with torch.no_grad():
        reference = wrapped(x)
        assert vtr.patch(wrapped, "tome", r=4) is wrapped and vtr.is_patched(model) and vtr.is_patched(wrapped)
        reduced = wrapped(x)
        assert vtr.report(wrapped) is vtr.report(model)
        assert vtr.report(wrapped).tokens == vtr.expected_tokens(wrapped) and reduced.shape == reference.shape
        with vtr.disabled(wrapped):
            assert torch.equal(wrapped(x), reference)
        assert vtr.unpatch(wrapped) is wrapped and not vtr.is_patched(model)
        assert torch.equal(wrapped(x), reference)


def test_data_parallel_over_several_devices_is_refused_where_vtr_works_per_thread():
    """DataParallel over several GPUs runs its replicas in threads of its own, which vtr.disabled (per thread)
    never reaches: a teacher would silently run reduced. Patching through it is fine; the per-thread
    functions say what works instead. (The device list is set by hand: no GPU is needed to check this.)"""
    wrapped = nn.DataParallel(patched("timm", "tome"))
    wrapped.device_ids = [0, 1]
    for per_thread in (lambda: vtr.report(wrapped), lambda: vtr.disabled(wrapped).__enter__(),
                       lambda: vtr.decisions(wrapped).__enter__(),
                       lambda: vtr.conditioned(wrapped, torch.zeros(2, 8)).__enter__()):
        with pytest.raises(ValueError, match="DataParallel over 2 devices runs the model in threads of its own.*"
                                             "use DistributedDataParallel"):
            per_thread()
    assert vtr.is_patched(wrapped) and vtr.unpatch(wrapped) is wrapped and not vtr.is_patched(wrapped.module)


# -- 8. vision-language models: Qwen-VL, Qwen3-VL, Gemma 3, SmolVLM, InternVL, LLaVA-OneVision, LLaVA-NeXT-Video
# (LLaVA's are in test_llava.py) ---------------------------------------------------------------------------------

def _qwen_inputs(model: nn.Module, thread: int) -> dict:
    """Each thread its own prompts, image sizes and pixels."""
    rows = [[[1, 5, ("image", 0), 6, ("image", 1), 7], [1, 9, ("image", 2), 8], [1, 20, 21]],
            [[1, 5, 6, ("image", 0), 7, 8, 9]],
            [[1, ("image", 0), 4, 4, 4], [1, 2, 3, 30, ("image", 1), 9]],
            [[1, 40, 41], [1, 50, ("image", 0), 51, 52]]][thread]
    grids = [[(1, 8, 8), (1, 4, 6), (1, 6, 6)], [(1, 6, 8)], [(1, 4, 4), (1, 8, 6)], [(1, 2, 4)]][thread]
    return qwen_batch(rows, image_grids=grids, seed=10 + thread).inputs()


def _video_inputs(model: nn.Module, thread: int) -> dict:
    """Each thread its own prompts (videos, images of different sizes, text only) and pixels."""
    rows = [VIDEO_MODEL_ROWS,
            [[1, 5, "video", 6, 7]],
            [[1, ("image", (56, 100)), 4, 4, 4], [1, 2, 3, 30, "video", 9]],
            [[1, 40, 41], [1, 50, ("image", (112, 56)), 51, 52]]][thread]
    return video_model_inputs(model, rows, seed=10 + thread)


THREAD_ROWS = [None, [0], [1, 2], [1]]   # the newer families: each thread its own rows of the family's batch


def _qwen3_inputs(model: nn.Module, thread: int) -> dict:
    return qwen3_batch(seed=10 + thread).inputs(THREAD_ROWS[thread])


def _tiled_inputs(make: Callable) -> Callable[[nn.Module, int], dict]:
    """Gemma 3, SmolVLM, InternVL: thread t's rows of the family's batch, with its own pixels."""
    return lambda model, thread: make(only=THREAD_ROWS[thread], seed=10 + thread)


@dataclass(frozen=True)
class Vlm:
    build: Callable[[], nn.Module]
    inputs: Callable[[nn.Module, int], dict]   # thread t's own generate()/forward() keywords
    tower: Callable[[nn.Module], nn.Module]
    own_state: tuple = ()   # attributes the unpatched model's own forward leaves on ``model.model``


VLMS = {
    "qwen_vl": Vlm(tiny_qwen, _qwen_inputs, lambda m: m.model.visual, ("rope_deltas",)),
    "onevision": Vlm(tiny_onevision, _video_inputs, lambda m: m.model.vision_tower),
    "next_video": Vlm(tiny_next_video, _video_inputs, lambda m: m.model.vision_tower),
    "qwen3_vl": Vlm(tiny_qwen3, _qwen3_inputs, lambda m: m.model.visual, ("rope_deltas",)),
    "gemma3": Vlm(tiny_gemma3, _tiled_inputs(gemma3_inputs), lambda m: m.model.vision_tower),
    "smolvlm": Vlm(tiny_smolvlm, _tiled_inputs(smolvlm_inputs), lambda m: m.model.vision_model),
    "internvl": Vlm(tiny_internvl, _tiled_inputs(internvl_inputs), lambda m: m.model.vision_tower),
}
VLM_CASES = [("qwen_vl", "tome", {"budget": 5}), ("qwen_vl", "pool", {"factor": 2}),
             ("onevision", "tome", {"budget": 5, "frames": "novelty"}), ("onevision", "query", {"budget": 5}),
             ("onevision", "fastv", {"budget": 5, "layers": [1]}),
             ("next_video", "tome", {"budget": 5, "temporal": 0.5}), ("next_video", "fastv", {"budget": 5}),
             ("next_video", "tome", {"budget": 5, "layers": [0, 1]}),
             ("qwen3_vl", "tome", {"budget": 5}), ("qwen3_vl", "fastv", {"budget": 5, "layers": [2]}),
             ("gemma3", "tome", {"budget": 5}), ("smolvlm", "tome", {"budget": 5}),
             ("internvl", "pitome", {"budget": 5}), ("internvl", "fastv", {"budget": 5, "layers": [1]}),
             ("qwen_vl", "feather", {"budget": 5, "layers": [1]})]
VLM_IDS = [f"{vlm}-{method}" + ("-in-llm" if "layers" in amount else "") for vlm, method, amount in VLM_CASES]
FIRST_VLM_CASES = [next(case for case in VLM_CASES if case[0] == vlm) for vlm in VLMS]
IN_LLM_VLM_CASES = [case for case in VLM_CASES if "layers" in case[2]]


def _vlm_call(model, inputs: dict) -> tuple:
    out = qwen_generate(model, inputs)
    return out.sequences, qwen_logits(out)


@pytest.mark.parametrize("vlm, method, amount", VLM_CASES, ids=VLM_IDS)
def test_vlm_threads_share_one_patched_model(vlm, method, amount):
    """Threads sharing one patched VLM, each generating from its own prompts, images and videos, get the tokens,
    logits and report of their own call, bitwise what the call gives alone."""
    model = vtr.patch(VLMS[vlm].build(), method, **amount)
    calls = [functools.partial(_vlm_call, model, VLMS[vlm].inputs(model, thread)) for thread in range(THREADS)]
    check_threads(model, [[call] * 3 for call in calls])


@pytest.mark.parametrize("vlm, method, amount", VLM_CASES, ids=VLM_IDS)
def test_vlm_pickle_and_deepcopy_stay_patched(vlm, method, amount):
    """pickle (before the first call: transformers then adds output-capturing closures no model pickles with)
    and deepcopy give a patched model of its own: same outputs, its own reports, and unpatching it gives the
    unpatched model's outputs; the original stays patched."""
    build = VLMS[vlm].build
    inputs = VLMS[vlm].inputs(build(), 0)
    unpatched = _vlm_call(build(), inputs)
    model = vtr.patch(build(), method, **amount)
    pickled = pickle.loads(pickle.dumps(model))
    expected = _vlm_call(model, inputs)
    assert not torch.equal(expected[1], unpatched[1])
    for clone in (pickled, copy.deepcopy(model)):
        assert vtr.is_patched(clone) and type(clone) is type(model) and clone._vtr is not model._vtr
        with pytest.raises(ValueError, match="no forward pass"):
            vtr.report(clone)
        assert all(torch.equal(a, b) for a, b in zip(_vlm_call(clone, inputs), expected))
        assert torch.equal(vtr.report(clone).kept_positions, vtr.report(model).kept_positions)
        vtr.unpatch(clone)
        assert type(clone) is type(build())
        assert all(torch.equal(a, b) for a, b in zip(_vlm_call(clone, inputs), unpatched))
    assert vtr.is_patched(model)
    assert all(torch.equal(a, b) for a, b in zip(_vlm_call(model, inputs), expected))


@pytest.mark.parametrize("vlm, method, amount", FIRST_VLM_CASES + IN_LLM_VLM_CASES,
                         ids=list(VLMS) + [f"{case[0]}-in-llm" for case in IN_LLM_VLM_CASES])
def test_vlm_holds_no_tensor_of_a_call(vlm, method, amount):
    """Nothing a call computes stays on a patched VLM (generate, conditioned generate, a grad-enabled forward
    and its backward), except what the unpatched model's own forward keeps too (Qwen-VL:
    ``model.model.rope_deltas``)."""
    reference = VLMS[vlm].build()
    inputs = VLMS[vlm].inputs(reference, 0)
    with torch.no_grad():
        reference(**inputs)
    assert all(isinstance(getattr(reference.model, name), torch.Tensor) for name in VLMS[vlm].own_state)
    model = vtr.patch(VLMS[vlm].build(), method, **amount)
    before = {id(t) for t, _ in reachable(model) if isinstance(t, torch.Tensor)}
    qwen_generate(model, inputs)
    with vtr.conditioned(model, torch.randn(inputs["input_ids"].shape[0], 64)):
        qwen_generate(model, inputs)
    model(**inputs).logits.sum().backward()
    model.zero_grad(set_to_none=True)
    after = {id(t): path for t, path in reachable(model) if isinstance(t, torch.Tensor)}
    kept = [path for key, path in after.items()
            if key not in before and not path.endswith(tuple("." + name for name in VLMS[vlm].own_state))]
    assert not kept, kept
    assert call_state(model) == []


@pytest.mark.parametrize("vlm, method, amount", FIRST_VLM_CASES, ids=list(VLMS))
def test_vlm_hooks_fire_as_on_the_unpatched_model(vlm, method, amount):
    """Forward hooks on the vision tower, the language model and each decoder layer fire as often as on the
    unpatched model (once per forward; the tower once per images and once per videos); the decoder layers see
    the compacted prompt (``report.kept_positions``), the unpatched ones the caller's."""
    def hooked(model) -> dict:
        seen = {"tower": [], "language": [], "layers": [[] for _ in decoder(model).layers]}
        VLMS[vlm].tower(model).register_forward_hook(lambda *args: seen["tower"].append(1))
        decoder(model).register_forward_hook(lambda *args: seen["language"].append(1))
        for i, layer in enumerate(decoder(model).layers):
            layer.register_forward_hook(
                lambda module, args, kwargs, output, i=i: seen["layers"][i].append(_tokens_of(args, kwargs, output)),
                with_kwargs=True)
        return seen

    unpatched = VLMS[vlm].build()
    model = vtr.patch(VLMS[vlm].build(), method, **amount)
    inputs = VLMS[vlm].inputs(model, 0)
    expected, seen = hooked(unpatched), hooked(model)
    with torch.no_grad():
        for _ in range(2):
            unpatched(**inputs), model(**inputs)
    compacted = tuple(vtr.report(model).kept_positions.shape)
    assert len(seen["tower"]) == len(expected["tower"]) > 0 and len(seen["language"]) == len(expected["language"]) == 2
    assert seen["layers"] == [[compacted] * 2] * len(seen["layers"])
    assert expected["layers"] == [[tuple(inputs["input_ids"].shape)] * 2] * len(seen["layers"])
    assert compacted[1] < inputs["input_ids"].shape[1]
