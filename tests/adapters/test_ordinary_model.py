"""A patched model is still an ordinary PyTorch model.

Regression tests for what users do with any ``nn.Module`` and expect to keep working after
``vtr.patch``: share it between threads, train it without leaking the autograd graph, deepcopy it
(EMA), pickle / ``torch.save`` it, hook its blocks, change its dtype and mode, and call
``forward_features`` / ``forward_head`` by hand.

Only the public API is used (``vtr.patch``, ``vtr.unpatch``, ``vtr.report``, ``vtr.is_patched``).
Models are tiny, random-weight, built from configs (no downloads). Every comparison of outputs is
between two runs of the same computation (same input, same model), so no float near-tie can flip it.
"""
from __future__ import annotations

import copy
import functools
import io
import pickle
import sys
import threading
import time
import types
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pytest
import timm
import torch
from open_clip import CLIP
from open_clip.transformer import VisionTransformer as OpenClipTower
from timm.utils import ModelEmaV3
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
from transformers.utils import logging as hf_logging

import vtr

hf_logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Tiny models: one intra-op thread is fastest on a shared machine and makes every run alike."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def open_clip_model() -> nn.Module:
    """A whole open_clip CLIP (image and text towers); its image path is ``encode_image``."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=4, width=32, head_width=8, layers=3, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=2)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=32, patch_size=4)


def hf_model(model_class, config_class) -> nn.Module:
    torch.manual_seed(0)
    model = model_class(config_class(**HF_VISION)).eval()
    model.set_attn_implementation("sdpa")
    return model


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]   # the model's image output as one tensor
    blocks: Callable[[nn.Module], list]                      # the transformer blocks, in order
    image_size: int


FAMILIES = {
    "timm": Family(timm_vit, lambda m, x: m(x), lambda m: list(m.blocks), 64),
    "timm_avg": Family(functools.partial(timm_vit, "avg"), lambda m, x: m(x), lambda m: list(m.blocks), 64),
    "open_clip": Family(open_clip_tower, lambda m, x: m(x), lambda m: list(m.transformer.resblocks), 32),
    "open_clip_custom": Family(functools.partial(open_clip_tower, qk_norm=True), lambda m, x: m(x),
                               lambda m: list(m.transformer.resblocks), 32),
    "open_clip_model": Family(open_clip_model, lambda m, x: m.encode_image(x),
                              lambda m: list(m.visual.transformer.resblocks), 32),
    "hf_clip": Family(functools.partial(hf_model, CLIPVisionModel, CLIPVisionConfig),
                      lambda m, x: m(pixel_values=x).pooler_output,
                      lambda m: list(m.encoder.layers), 32),
    "hf_siglip": Family(functools.partial(hf_model, SiglipVisionModel, SiglipVisionConfig),
                        lambda m, x: m(pixel_values=x).pooler_output,
                        lambda m: list(m.encoder.layers), 32),
}

# name -> (method, patch keywords); amounts are small enough for 64 patches over 3 blocks.
METHODS = {
    "none": ("none", {}),
    "tome": ("tome", {"r": 4}),
    "tome_keys": ("tome", {"r": 4, "metric": "keys"}),
    "pitome": ("pitome", {"r": 4}),
    "evit": ("evit", {"keep": 0.75}),
    "fastv": ("fastv", {"keep": 0.75}),
    "hired": ("hired", {"keep": 0.75}),
}


def patched(family: str, method: str) -> nn.Module:
    name, amount = METHODS[method]
    return vtr.patch(FAMILIES[family].build(), name, **amount)


def pixels(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = FAMILIES[family].image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def snapshot(report) -> tuple:
    """What a report says about one call, copied so later calls cannot change it."""
    return list(report.tokens), report.size.clone(), report.assignment.clone()


def same_report(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].shape == b[1].shape and torch.equal(a[1], b[1]) \
        and a[2].shape == b[2].shape and torch.equal(a[2], b[2])


# -- 1. threads -----------------------------------------------------------------------------------

THREADS, CALLS = 4, 12


def _thread_inputs(family: str) -> dict[int, list[torch.Tensor]]:
    """Distinct inputs for every call of every thread; at each call index the threads use batch
    sizes 1-4, one each, so a call that reads another's per-call state sees a different batch."""
    return {t: [pixels(family, batch=1 + (t + c) % THREADS, seed=1000 * t + c) for c in range(CALLS)]
            for t in range(THREADS)}


def _run_in_threads(work: Callable[[int], list]) -> list:
    """``work(thread)`` in THREADS threads at once; the first real error of any thread is raised."""
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(work, t) for t in range(THREADS)]
        errors, results = [], []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as error:   # noqa: BLE001 - re-raised below
                errors.append(error)
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results


def _yield(module, args, output) -> None:
    time.sleep(0)


def check_thread_safe(family: str, model: nn.Module, with_report: bool = True) -> None:
    """THREADS threads share ``model``, each making CALLS calls on its own inputs (under
    ``inference_mode``, one intra-op thread); every output and report must equal the lone call's."""
    run = FAMILIES[family].run
    inputs = _thread_inputs(family)
    previous, interval = torch.get_num_threads(), sys.getswitchinterval()
    # Every module hands the GIL on when it finishes, so overlapping calls interleave layer by layer
    # (the hooks return nothing: the lone calls below compute exactly what the threads compute).
    handles = [module.register_forward_hook(_yield) for module in model.modules()]
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():   # the single-threaded reference, call by call
            expected = {t: [(run(model, x).clone(), snapshot(vtr.report(model)) if with_report else None)
                            for x in xs] for t, xs in inputs.items()}
        barrier = threading.Barrier(THREADS)

        def work(thread: int) -> list:
            torch.set_num_threads(1)
            got = []
            try:
                with torch.inference_mode():
                    for x in inputs[thread]:
                        barrier.wait(timeout=60)          # every call overlaps the other threads' calls
                        out = run(model, x)
                        got.append((out, snapshot(vtr.report(model)) if with_report else None))
            except BaseException:
                barrier.abort()
                raise
            return got

        sys.setswitchinterval(1e-5)
        results = _run_in_threads(work)
    finally:
        sys.setswitchinterval(interval)
        torch.set_num_threads(previous)
        for handle in handles:
            handle.remove()
    for thread, got in enumerate(results):
        for call, ((out, report), (want, want_report)) in enumerate(zip(got, expected[thread])):
            where = f"thread {thread}, call {call} (batch {want.shape[0]})"
            assert out.shape == want.shape and torch.equal(out, want), f"{where}: output differs from a lone call"
            if with_report:
                assert same_report(report, want_report), f"{where}: vtr.report does not describe this call"


THREAD_CASES = [
    ("timm", "none"), ("timm", "tome"), ("timm", "tome_keys"), ("timm", "fastv"), ("timm", "hired"),
    ("timm_avg", "evit"),
    ("open_clip", "tome"), ("open_clip_custom", "evit"),
    ("hf_clip", "tome"), ("hf_siglip", "evit"),
]


@pytest.mark.parametrize("family,method", THREAD_CASES, ids=[f"{f}-{m}" for f, m in THREAD_CASES])
def test_threads_share_one_patched_model(family, method):
    """Concurrent calls on one patched model give each caller the output and the report of its own
    input, exactly as a lone call does (no per-call state shared between threads)."""
    check_thread_safe(family, patched(family, method))


# -- 2. no autograd graph kept --------------------------------------------------------------------

_ATOMIC = (type, types.ModuleType, str, bytes, int, float, complex, bool, type(None), torch.dtype,
           torch.device, torch.Size, types.BuiltinFunctionType)


def graph_tensors(model: nn.Module) -> list[str]:
    """Paths of every tensor reachable from ``model`` that requires grad or has a grad_fn, other than
    its parameters and buffers. Walks module ``__dict__``s (hooks, non-module attributes such as
    vtr's own objects), containers, dataclasses and plain objects, bound methods, partials and
    closures; never a function's globals."""
    own = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    found, seen, stack = [], set(), [(model, "model")]
    while stack:
        obj, path = stack.pop()
        if id(obj) in seen or isinstance(obj, _ATOMIC):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, nn.Parameter) and id(obj) not in own and (obj.requires_grad or obj.grad_fn):
                found.append(f"{path}: {tuple(obj.shape)} grad_fn={type(obj.grad_fn).__name__}")
            continue
        children: list = []
        if isinstance(obj, dict):
            children = [(v, f"{path}[{k!r}]") for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        elif isinstance(obj, types.MethodType):
            children = [(obj.__self__, f"{path}.__self__")]
        elif isinstance(obj, functools.partial):
            children = [(obj.func, f"{path}.func"), (obj.args, f"{path}.args"), (obj.keywords, f"{path}.keywords")]
        elif isinstance(obj, types.FunctionType):
            children = [(c.cell_contents, f"{path}.__closure__[{i}]")
                        for i, c in enumerate(obj.__closure__ or ()) if _filled(c)]
            children += [(obj.__defaults__, f"{path}.__defaults__"), (obj.__kwdefaults__, f"{path}.__kwdefaults__")]
        elif isinstance(obj, weakref.ref):
            children = [(obj(), f"{path}()")]
        else:
            attributes = getattr(obj, "__dict__", None)
            if isinstance(attributes, dict):
                children = [(v, f"{path}.{k}") for k, v in attributes.items()]
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                        children.append((getattr(obj, slot), f"{path}.{slot}"))
        stack.extend(children)
    return found


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


GRAPH_CASES = [
    ("timm", "tome"), ("timm", "evit"), ("timm_avg", "tome_keys"),
    ("open_clip", "tome"), ("open_clip_custom", "tome_keys"),
    ("hf_clip", "tome"), ("hf_siglip", "evit"),
]


@pytest.mark.parametrize("family,method", GRAPH_CASES, ids=[f"{f}-{m}" for f, m in GRAPH_CASES])
def test_training_step_leaves_no_graph_on_the_model(family, method):
    """After a grad-enabled forward (and its backward) in train mode, the model holds no tensor of
    that pass's autograd graph: activations are freed when the caller drops its output."""
    model = patched(family, method).train()
    out = FAMILIES[family].run(model, pixels(family))
    kept = graph_tensors(model)
    assert not kept, f"after forward the model holds graph tensors: {kept}"
    out.float().square().sum().backward()
    kept = graph_tensors(model)
    assert not kept, f"after backward the model holds graph tensors: {kept}"


def test_harness_controls_on_unpatched_models():
    """Control, passes by design: an unpatched model passes the thread harness (so CPU results do not
    depend on which thread computes them) and the graph walker finds nothing on it (no false
    positives). If this fails, the harness is broken, not vtr."""
    for family in ("timm_avg", "open_clip", "hf_clip"):
        check_thread_safe(family, FAMILIES[family].build(), with_report=False)
        model = FAMILIES[family].build().train()
        out = FAMILIES[family].run(model, pixels(family))
        assert graph_tensors(model) == []
        out.square().sum().backward()
        assert graph_tensors(model) == []


# -- 3. deepcopy and EMA --------------------------------------------------------------------------

COPY_CASES = [("timm", "tome"), ("timm_avg", "evit"), ("open_clip", "tome"), ("open_clip_custom", "tome_keys"),
              ("hf_clip", "tome"), ("hf_siglip", "tome")]


@pytest.mark.parametrize("family,method", COPY_CASES, ids=[f"{f}-{m}" for f, m in COPY_CASES])
def test_deepcopy_after_a_training_step(family, method):
    """``copy.deepcopy`` of a model that just trained works and gives an independent patched model:
    same eval output, its own report, and unpatching it leaves the original patched."""
    run = FAMILIES[family].run
    model = patched(family, method).train()
    x = pixels(family)
    run(model, x).float().square().sum().backward()
    clone = copy.deepcopy(model)
    assert vtr.is_patched(clone)
    model.eval(), clone.eval()
    with torch.no_grad():
        expected = run(model, x)
        tokens = vtr.report(model).tokens
        assert torch.equal(run(clone, x), expected)
        assert vtr.report(clone).tokens == tokens
        run(clone, pixels(family, batch=3, seed=1))
    assert vtr.report(clone).size.shape[0] == 3 and vtr.report(model).size.shape[0] == 2
    vtr.unpatch(clone)
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


# -- 4. pickling ----------------------------------------------------------------------------------

def _torch_roundtrip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("family", ["timm", "open_clip_model", "hf_clip"])
def test_pickle_roundtrip_keeps_the_patch(family, how):
    """A patched model survives pickle / torch.save: the loaded model is patched (same output) and
    ``vtr.unpatch`` on it restores the unpatched output."""
    run = FAMILIES[family].run
    model = FAMILIES[family].build()
    x = pixels(family)
    with torch.no_grad():
        reference = run(model, x)
        vtr.patch(model, "tome", r=4)
        reduced = run(model, x)
    assert not torch.equal(reduced, reference)
    loaded = pickle.loads(pickle.dumps(model)) if how == "pickle" else _torch_roundtrip(model)
    assert vtr.is_patched(loaded)
    with torch.no_grad():
        assert torch.equal(run(loaded, x), reduced)
    assert vtr.report(loaded).tokens == vtr.report(model).tokens
    vtr.unpatch(loaded)
    assert not vtr.is_patched(loaded) and vtr.is_patched(model)
    with torch.no_grad():
        assert torch.equal(run(loaded, x), reference)


# -- 5. block hooks -------------------------------------------------------------------------------

def _tokens_of(args: tuple, kwargs: dict, output=None) -> tuple:
    """(batch, tokens) of the hidden states a block received (or returned)."""
    value = output if output is not None else (args[0] if args else kwargs.get("hidden_states"))
    if isinstance(value, (tuple, list)):
        value = value[0]
    assert isinstance(value, torch.Tensor) and value.dim() == 3, type(value)
    return tuple(value.shape[:2])


HOOK_FAMILIES = ["timm", "open_clip", "open_clip_custom", "hf_clip", "hf_siglip"]


@pytest.mark.parametrize("method", ["none", "tome"])
@pytest.mark.parametrize("family", HOOK_FAMILIES)
def test_block_hooks_fire_once_with_the_blocks_own_tokens(family, method):
    """Forward pre-hooks and hooks on every transformer block fire exactly once per call; the block
    receives ``report.tokens[i]`` tokens and returns the count after its own reduction."""
    model = patched(family, method)
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
    if method == "tome":
        assert tokens[-1] < tokens[0]


# -- 6. dtype, device and mode changes ------------------------------------------------------------

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


# -- 7. forward_features + forward_head -----------------------------------------------------------

@pytest.mark.parametrize("family,method", [("timm", "tome"), ("timm_avg", "evit"), ("timm_avg", "tome")])
def test_timm_forward_features_then_forward_head(family, method):
    """Calling the two halves of a timm forward by hand gives ``model(x)``."""
    model = patched(family, method)
    x = pixels(family)
    with torch.no_grad():
        whole = model(x)
        split = model.forward_head(model.forward_features(x))
    assert torch.equal(split, whole)
