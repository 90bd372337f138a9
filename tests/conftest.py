"""Shared model builders and harnesses for the tests (random weights, built from configs: no downloads).

Test modules import what they need from here (``from conftest import tiny_vit``); tests/ is on the path
because this file sits at its root. Tests are grouped by layer: core/, budget/, reducers/, adapters/, tools/.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import sys
import threading
import time
import types
import weakref
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator, Optional

import pytest
import timm
import torch
from torch import Tensor, nn

import vtr
from vtr.core import run as runs
from vtr.core.state import TokenState
from vtr.reducers import REDUCERS, Reducer, check_budget, dest_from_choice
from vtr.reducers.base import unit


@pytest.fixture
def unpatched(model):
    """Unpatches the module's shared ``model`` fixture after each test (used by the VLM family tests, whose tiny model
    is built once per module)."""
    yield
    if vtr.is_patched(model):
        vtr.unpatch(model)


@pytest.fixture
def one_intra_op_thread():
    """One intra-op thread: no op's reduction order depends on load (bitwise comparisons), and tiny models
    run fastest that way on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- what a model holds: the one walker behind every "a call leaves nothing on the model" check ----

_LEAVES = (type, types.ModuleType, str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device,
           torch.Size, torch.layout, torch.memory_format)


def reachable(root, name: str = "model") -> Iterator[tuple[object, str]]:
    """Every object ``root`` keeps alive (``root`` first), each with a path to it.

    Follows instances' ``__dict__`` and slots (so every module's attributes: submodules, hooks, whatever
    vtr hangs on it), containers (dict keys too), dataclasses and plain objects, bound methods (builtin
    ones too), partials, functions' closures, defaults and attributes, and weak references (to a live
    object); never into classes, Python modules or a function's globals. A tensor is a leaf but for its
    own ``__dict__``."""
    seen: dict[int, object] = {}          # keeps what it saw alive, so no id is reused during the walk
    stack = [(root, name)]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen[id(obj)] = obj
        yield obj, path
        try:
            stack.extend(_children(obj, path))
        except ReferenceError:            # a weakref.proxy whose object is gone
            pass


def _children(obj, path: str) -> list:
    if isinstance(obj, torch.Tensor):
        return [(v, f"{path}.{k}") for k, v in getattr(obj, "__dict__", {}).items()]
    if isinstance(obj, dict):
        return [(k, f"{path}<key {_label(k)}>") for k in obj] + [(v, f"{path}[{_label(k)}]") for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, weakref.ref):
        return [(obj(), f"{path}()")]
    if isinstance(obj, (types.MethodType, types.BuiltinMethodType, types.MethodWrapperType)):
        return [(obj.__self__, f"{path}.__self__"), (getattr(obj, "__func__", None), f"{path}.__func__")]
    children = []
    if isinstance(obj, functools.partial):
        children += [(obj.func, f"{path}.func"), (obj.args, f"{path}.args"), (obj.keywords, f"{path}.keywords")]
    elif isinstance(obj, types.FunctionType):
        children += [(cell.cell_contents, f"{path}.__closure__[{i}]")
                     for i, cell in enumerate(obj.__closure__ or ()) if _filled(cell)]
        children += [(obj.__defaults__, f"{path}.__defaults__"), (obj.__kwdefaults__, f"{path}.__kwdefaults__")]
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        children += [(v, f"{path}.{k}") for k, v in attributes.items()]
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            mangled = slot.startswith("__") and not slot.endswith("__")
            stored = f"_{cls.__name__.lstrip('_')}{slot}" if mangled else slot
            if hasattr(obj, stored):
                children.append((getattr(obj, stored), f"{path}.{slot}"))
    return children


def _label(key) -> str:
    return repr(key) if isinstance(key, (str, int, float, bool, type(None))) else type(key).__name__


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def call_state(root, name: str = "model") -> list[str]:
    """Paths to what a forward pass could leave behind on ``root``: tensors that require grad or carry a
    graph (other than ``root``'s parameters and buffers), and any vtr ``Run``, ``TokenState`` or
    ``Report`` other than ``root`` itself. A patched model holds settings only; a report is detached."""
    own = {id(t) for t in root.buffers()} if isinstance(root, nn.Module) else set()
    found = []
    for obj, path in reachable(root, name):
        if isinstance(obj, (runs.Run, TokenState, runs.Report)) and obj is not root:
            found.append(f"{path}: {type(obj).__name__}")
        elif isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter) and id(obj) not in own \
                and (obj.requires_grad or obj.grad_fn is not None):
            found.append(f"{path}: {tuple(obj.shape)} grad_fn={type(obj.grad_fn).__name__}")
    return found


# -- the one thread harness: calls that overlap for certain, each checked against a lone call -------

THREADS = 4   # how many threads the thread tests share a model between


def check_threads(model: nn.Module, calls: list[list[Callable[[], object]]], with_report: bool = True) -> list:
    """Thread ``t`` makes the calls ``calls[t]`` (zero-argument functions returning what to compare) on
    ``model``, every thread at once; each call's output and ``vtr.report(model)`` after it must equal,
    bitwise, what the same call gives made alone in this thread beforehand.

    Overlap is certain: a barrier starts each call in every thread together, and every module of the
    model hands the GIL on when it starts and when it finishes (forward pre-hooks and hooks doing
    ``time.sleep(0)``, with ``sys.setswitchinterval(1e-5)``), so the calls interleave layer by layer,
    from before the model's own forward begins (where a call's query is read); the hooks return
    nothing, so the lone calls compute what the threads compute. Every thread (this one too) runs one intra-op
    thread under ``inference_mode``. With ``with_report``, a new thread must find no report of the
    model (reports are per thread) and this thread's report must be untouched by the others. The first
    error of any thread is raised here. Returns the lone calls' ``(output, report)``, per thread.
    """
    assert len({len(c) for c in calls}) == 1, "every thread makes as many calls (one barrier per call)"
    previous, interval = torch.get_num_threads(), sys.getswitchinterval()
    handles = [register(_hand_on_the_gil) for module in model.modules()
               for register in (module.register_forward_pre_hook, module.register_forward_hook)]
    torch.set_num_threads(1)
    try:
        lone = {}
        with torch.inference_mode():   # the lone calls, one by one (once per distinct call)
            for call in (call for thread in calls for call in thread if id(call) not in lone):
                lone[id(call)] = _one_call(model, call, with_report)
        reference = vtr.report(model) if with_report else None
        barrier, results, errors = threading.Barrier(len(calls)), [[] for _ in calls], []

        def work(thread: int) -> None:
            torch.set_num_threads(1)   # per thread
            try:
                if with_report:
                    with pytest.raises(ValueError, match="no forward pass"):
                        vtr.report(model)
                with torch.inference_mode():
                    for call in calls[thread]:
                        barrier.wait(timeout=60)
                        results[thread].append(_one_call(model, call, with_report))
            except BaseException as error:   # noqa: BLE001 - raised in the caller's thread below
                errors.append(error)
                barrier.abort()

        sys.setswitchinterval(1e-5)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        torch.set_num_threads(previous)
        for handle in handles:
            handle.remove()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    for t, thread_calls in enumerate(calls):
        for c, (call, (out, report)) in enumerate(zip(thread_calls, results[t])):
            want, want_report = lone[id(call)]
            where = f"thread {t}, call {c}"
            assert (diff := _difference(out, want, "output")) is None, f"{where}: differs from a lone call: {diff}"
            assert (diff := _difference(report, want_report, "report")) is None, \
                f"{where}: vtr.report does not describe this call: {diff}"
    if with_report:
        assert vtr.report(model) is reference, "this thread's report changed while other threads ran the model"
    return [[lone[id(call)] for call in thread] for thread in calls]


def _hand_on_the_gil(module, args, output=None) -> None:
    time.sleep(0)


def _one_call(model, call, with_report: bool) -> tuple:
    out = _frozen(call())
    if not with_report:
        return out, None
    report = vtr.report(model)
    return out, {"type": type(report).__name__} | {f.name: _frozen(getattr(report, f.name))
                                                   for f in dataclasses.fields(report)}


def _frozen(value):
    """``value`` copied so that later calls cannot change it (dataclasses as dicts of their fields)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_frozen(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _frozen(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return copy.deepcopy(value)


def _difference(got, want, path: str) -> Optional[str]:
    """Where ``got`` differs from ``want`` (bitwise for tensors), or None."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return f"{path}: {_kind(got)} != {_kind(want)}"
        return None if torch.equal(got, want) else f"{path}: values differ"
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            return f"{path}: keys differ"
        return next(filter(None, (_difference(got[k], want[k], f"{path}.{k}") for k in want)), None)
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{path}: {_kind(got)} != {len(want)} items"
        return next(filter(None, (_difference(g, w, f"{path}[{i}]") for i, (g, w) in enumerate(zip(got, want)))),
                    None)
    return None if got == want else f"{path}: {got!r} != {want!r}"


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    return f"{len(value)} items" if isinstance(value, list) else type(value).__name__


# -- timm ViTs covering every feature the adapter must honour --------------------------------------

def _randomize_layerscale(model):
    # LayerScale's default init (1e-5) would hide an adapter that skips it; make it matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.normal_(1.0, 0.5)
    return model


def build_timm(kind: str, depth: int = None) -> torch.nn.Module:
    """A small model of the given kind; ``depth`` overrides the (short) default depth."""
    torch.manual_seed(0)
    if kind == "vit_b16":
        model = timm.create_model("vit_base_patch16_224")
    elif kind == "tiny":
        model = timm.create_model("vit_tiny_patch16_224", depth=depth or 4)
    elif kind == "layerscale":
        model = _randomize_layerscale(timm.create_model("deit3_small_patch16_224", depth=depth or 4))
    elif kind == "qk_norm":
        model = timm.create_model("vit_small_patch16_224", depth=depth or 4, qk_norm=True)
    elif kind == "registers_avg":
        model = timm.create_model("vit_base_patch16_reg4_gap_256", depth=depth or 3, embed_dim=192, num_heads=3)
    elif kind == "dinov2_registers":
        model = _randomize_layerscale(timm.create_model("vit_small_patch14_reg4_dinov2", img_size=224, depth=depth or 3))
    elif kind == "distilled":
        model = timm.create_model("deit_small_distilled_patch16_224", depth=depth or 4)
    elif kind == "map_head":
        model = timm.create_model("vit_base_patch16_siglip_224", depth=depth or 3, embed_dim=192, num_heads=3)
    else:
        raise KeyError(kind)
    return model.eval()


def timm_images(model, batch=2, seed=0):
    size = (3, *model.patch_embed.img_size)
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


FEATURE_MODELS = ["tiny", "layerscale", "qk_norm", "registers_avg", "dinov2_registers", "distilled", "map_head"]


# -- a tiny ViT and token states for the reducer tests ---------------------------------------------

def make_state(batch=2, tokens=17, channels=8, protected=1, padding=0, seed=0, requires_grad=False):
    """A random state; the last ``padding`` tokens of every row are padding (size 0)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator).requires_grad_(requires_grad)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    if padding:
        mask[:, tokens - padding:] = False
    return TokenState.start(x, protected, padding_mask=mask)


def tiny_vit(**overrides):
    """A 4-block ViT on 96x96 inputs (6x6 patch grid + CLS), random weights; a fresh copy each call."""
    return copy.deepcopy(_tiny_vit(tuple(sorted(overrides.items()))))


@lru_cache(maxsize=None)
def _tiny_vit(overrides: tuple):
    torch.manual_seed(0)
    kwargs = dict(depth=4, img_size=96, pretrained=False) | dict(overrides)
    return timm.create_model("vit_tiny_patch16_224", **kwargs).eval()


def vit_images(batch=2, seed=0, size=96):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- a test-only query-conditioned reducer (the adapters' conditioning plumbing) -------------------

class QueryProbe(Reducer):
    name = "query_probe"
    description = "test-only: keep the tokens closest to the query"
    needs = frozenset({"query"})
    seen: list = []

    def forward(self, state, num_kept, signals):
        check_budget(self, state, num_kept)
        QueryProbe.seen.append(signals)
        if num_kept == state.num_tokens:
            return state
        protected = state.num_protected
        tokens = signals.query_projection(state.x) if signals.query_projection is not None else state.x
        query = signals.query if signals.query.dim() == 3 else signals.query[:, None]
        score = (unit(tokens[:, protected:]) @ unit(query).transpose(1, 2)).amax(dim=-1)
        kept = score.topk(num_kept - protected, dim=1).indices.sort(dim=1).values
        return state.reduce(dest_from_choice(state, kept), num_kept)


def probe():
    """``with probe() as reducer:`` the ``query_probe`` method exists inside the block (``reducer.seen``:
    the signals of each step)."""
    return _registered(QueryProbe)


class SignalProbe(Reducer):
    """Test-only: asks for CLS attention, logs the signals (in its class's ``seen``), keeps the first
    ``num_kept`` tokens."""

    name = "signal_probe"
    description = "test-only: log signals, keep the leading tokens"
    needs = frozenset({"cls_attention", "metric"})
    seen: list = []

    def forward(self, state, num_kept, signals):
        check_budget(self, state, num_kept)
        type(self).seen.append(signals)
        kept = torch.arange(num_kept - state.num_protected, device=state.x.device).expand(state.x.shape[0], -1)
        return state.reduce(dest_from_choice(state, kept), num_kept)


def signal_probe():
    """``with signal_probe() as reducer:`` the ``signal_probe`` method exists inside the block."""
    return _registered(SignalProbe)


@contextmanager
def _registered(cls: type):
    REDUCERS[cls.name] = cls
    cls.seen = []
    try:
        yield cls
    finally:
        del REDUCERS[cls.name]
        cls.seen = []


@pytest.fixture
def recording():
    """``recording(name, needs)`` registers, for this test, a method ``name`` whose reducer asks for the
    signals ``needs``, logs them in its ``seen`` and keeps the leading tokens (a SignalProbe)."""
    registered = []

    def register(name: str, needs) -> type:
        cls = type(name, (SignalProbe,), {"name": name, "needs": frozenset(needs), "seen": []})
        REDUCERS[name] = cls
        registered.append(name)
        return cls

    yield register
    for name in registered:
        REDUCERS.pop(name, None)


# -- the real ``query`` reducer on CLIP-style models (tests/adapters) ------------------------------


def check_text_conditioning(model: nn.Module, x: Tensor, classes: Tensor, texts: Tensor, embed_width: int,
                            projection_weight: Tensor) -> None:
    """The real ``query`` reducer on a CLIP-style model (patched with it): zero-shot and text_query run,
    (b) two texts keep different tokens, (c) perturbing the tower's projection changes them too."""
    logits = vtr.clip.zero_shot(model, x, classes)
    assert logits.shape == (x.shape[0], classes.shape[0]) and bool(logits.isfinite().all())
    assert vtr.report(model).tokens[-1] < vtr.report(model).tokens[0]
    kept = []
    for text in texts:
        with vtr.clip.text_query(model, text):
            features = vtr.clip.image_features(model, x)
        assert features.shape == (x.shape[0], embed_width) and bool(features.isfinite().all())
        kept.append(vtr.report(model).assignment.clone())
    assert not torch.equal(kept[0], kept[1])                                  # (b) the text decides
    with vtr.clip.text_query(model, texts[0]):
        projection_weight.add_(torch.randn(projection_weight.shape, generator=torch.Generator().manual_seed(9)))
        vtr.clip.image_features(model, x)
    assert not torch.equal(vtr.report(model).assignment, kept[0])             # (c) so does the projection

def spy_steps(model: nn.Module) -> list:
    """``(tokens, signals)`` of each step the patched model's reducer takes, recorded by wrapping its
    ``step`` on the instance: the decision is still the reducer's own. A new ``vtr.patch`` drops it."""
    reducer, seen = model._vtr.reducer, []
    step = type(reducer).step

    def spy(state, num_kept, signals):
        seen.append((state.x.detach().clone(), signals))
        return step(reducer, state, num_kept, signals)

    reducer.step = spy
    return seen


def kept_positions(model: nn.Module) -> list[list[int]]:
    """Per image, the original token positions the last call kept (a single pruning step)."""
    assignment = vtr.report(model).assignment
    return [(row >= 0).nonzero().flatten().tolist() for row in assignment]


def float64_projection(model: nn.Module, tower: Callable[[nn.Module], nn.Module]) -> Callable[[Tensor], Tensor]:
    """The adapter's token projection (``tower(model).project_tokens``) on a float64 copy of the model."""
    double = copy.deepcopy(model).double()
    return lambda tokens: tower(double).project_tokens(tokens.double())


def assert_kept_top_k_by_projected_cosine(kept: list[list[int]], tokens: Tensor, query: Tensor,
                                          project64: Callable[[Tensor], Tensor], protected: int = 1,
                                          margin: float = 1e-3) -> None:
    """``kept`` (per image, positions) are the protected tokens plus exactly the top-k unprotected tokens
    by cosine between the projected token and the best of the queries, recomputed in float64 from the
    hidden states ``tokens`` the reducer saw. The k-th and (k+1)-th scores must differ by ``margin``,
    so the check cannot hinge on float rounding."""
    projected = project64(tokens)[:, protected:]
    query = query.double()
    query = (query[:, None] if query.dim() == 2 else query).expand(projected.shape[0], -1, -1)
    cosine = (nn.functional.normalize(projected, dim=-1)
              @ nn.functional.normalize(query, dim=-1).transpose(1, 2)).amax(dim=-1)
    for row, positions in enumerate(kept):
        assert positions[:protected] == list(range(protected))
        k = len(positions) - protected
        scores = cosine[row].sort(descending=True)
        gap = float(scores.values[k - 1] - scores.values[k])
        assert gap > margin, f"row {row}: a near-tie at the k-th score (gap {gap:.2e}); pick another seed"
        assert sorted(positions[protected:]) == sorted((scores.indices[:k] + protected).tolist())


@pytest.fixture
def threads_restored():
    """`vtr bench --threads` sets torch's thread count for the process; put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
