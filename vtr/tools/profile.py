"""Count what a model really computes, layer by layer, following the token count.

Two counters, both seeing the real runtime shapes (so reduced token counts are counted right):

- ``"torch"``: torch's ``FlopCounterMode`` made complete for ViTs. torch 2.14 has no formula for
  the CPU SDPA kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, counted 0 silently)
  nor for ``nn.MultiheadAttention``'s fused fast path (``aten._native_multi_head_attention``,
  taken in eval + no-grad: open_clip's towers lose a third of their count without it); we register
  both. It counts matrix products and convolutions only (no norms, activations, softmax): timm
  ViT-B/16 at 224 = 17.564 GMACs. It can run on the meta device (no weights, fast).
- ``"fvcore"``: fvcore's jit-trace counter with handles for SDPA and the MHA fast path added. It
  also counts layer norms, as the numbers in papers do: ViT-B/16 = 17.583 GMACs ("17.6 GFLOPs").

Everything is reported in MACs (multiply-accumulates) per image; FLOPs = 2 x MACs (torch's own
"FLOPs" are 2 x MACs; papers' ViT "GFLOPs" are GMACs, so compare papers with ``macs``).
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from ..adapters import family, find_adapter, is_patched, settings, unwrap
from ..core import run as runs
from ..reducers import Signals

COUNTERS = ("torch", "fvcore")


class MetaDeviceError(ValueError):
    """The model cannot be counted on the meta device: its shapes depend on tensor values (a data-dependent
    reducer), which a weightless copy does not have. Count it on real inputs instead."""


# --- formulas torch's counter misses --------------------------------------------------------------

def _mha_macs(query_shape: Sequence[int], key_shape: Sequence[int], embed_dim: int) -> int:
    """MACs of one ``nn.MultiheadAttention`` call: q/k/v projections, scores, values, output."""
    batch = math.prod(query_shape[:-2])
    n_q, n_k = query_shape[-2], key_shape[-2]
    projections = batch * (2 * n_q + 2 * n_k) * embed_dim * embed_dim  # q, out (n_q); k, v (n_k)
    return projections + 2 * batch * n_q * n_k * embed_dim


def _register_formulas() -> None:
    ops = torch.ops.aten
    registry = flop_counter.flop_registry
    forward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is not None and forward not in registry:
        @flop_counter.register_flop_formula(forward)
        def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)

    backward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None and backward not in registry:
        @flop_counter.register_flop_formula(backward)
        def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    mha = getattr(ops, "_native_multi_head_attention", None)
    if mha is not None and mha not in registry:
        @flop_counter.register_flop_formula(mha)
        def _mha_fast_path_flops(query, key, value, embed_dim, *args, out_shape=None, **kwargs) -> int:
            return 2 * _mha_macs(query, key, int(embed_dim))  # torch counts FLOPs = 2 x MACs


_register_formulas()


# --- the plain count (kept for callers of the first version) ---------------------------------------

@dataclass
class MacCount:
    """MACs of one forward pass, for the whole batch and per image."""

    total: float
    batch: int
    by_module: dict

    @property
    def per_image(self) -> float:
        return self.total / self.batch


def count_macs(model: nn.Module, *inputs: torch.Tensor, **kwargs) -> MacCount:
    """Run ``model(*inputs)`` once under FlopCounterMode and return its MACs."""
    with _frozen(model), flop_counter.FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    by_module = {name: sum(ops.values()) / 2 for name, ops in counter.get_flop_counts().items()}
    batch = inputs[0].shape[0] if inputs else 1
    return MacCount(total=counter.get_total_flops() / 2, batch=batch, by_module=by_module)


# --- the per-layer profile ---------------------------------------------------------------------

@dataclass
class LayerRow:
    """One row of a profile: a block (with the tokens it sees) or a module outside the blocks.

    ``macs`` is per image and includes ``reduce_macs``, the reducer's own decision cost in this
    block (similarity matrices; counted per layer by the torch counter only).
    """

    name: str
    macs: float
    tokens_in: Optional[float] = None
    tokens_out: Optional[float] = None
    reduce_macs: float = 0.0


@dataclass
class Profile:
    """MACs per image, per layer and in total. ``flops`` = 2 x ``macs``."""

    rows: list
    macs: float
    counter: str
    images: int                 # images the counts are averaged over
    notes: list = field(default_factory=list)

    @property
    def flops(self) -> float:
        return 2 * self.macs

    @property
    def blocks(self) -> list:
        return [row for row in self.rows if row.tokens_in is not None]

    def to_dict(self) -> dict:
        return {"unit": "MACs per image (FLOPs = 2 x MACs)", "counter": self.counter, "images": self.images,
                "macs": float(self.macs), "flops": float(self.flops), "rows": [_plain(asdict(r)) for r in self.rows],
                "notes": list(self.notes)}

    def table(self) -> str:
        """A fixed-width table: GMACs per image per row, tokens per block, totals in MACs and FLOPs."""
        def tokens(value: Optional[float]) -> str:
            if value is None:
                return ""
            return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"

        unit, scale = ("GMACs", 1e9) if self.macs >= 1e9 else ("MMACs", 1e6)
        header = f"{'layer':<24}{'tokens in':>10}{'tokens out':>11}{unit:>10}{'reduce':>9}{'share':>8}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            share = row.macs / self.macs if self.macs else 0.0
            reduce = f"{row.reduce_macs / scale:.4f}" if row.reduce_macs else ""
            lines.append(f"{row.name:<24}{tokens(row.tokens_in):>10}{tokens(row.tokens_out):>11}"
                         f"{row.macs / scale:>10.4f}{reduce:>9}{share:>8.1%}")
        lines.append("-" * len(header))
        lines.append(f"total: {self.macs / scale:.4f} {unit} = {self.flops / scale:.4f} {unit[0]}FLOPs per image "
                     f"({self.counter} counter, {self.images} image{'s' if self.images != 1 else ''})")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _plain(row: dict) -> dict:
    """A row for JSON: numbers as Python floats (whatever a counter gave: ints, 0-d tensors)."""
    return {k: v if v is None or isinstance(v, str) else float(v) for k, v in row.items()}


def find_blocks(model: nn.Module) -> str:
    """Name of the model's stack of transformer blocks: the adapter's for a family vtr knows, else the
    longest ModuleList/Sequential of modules that all have the same class."""
    if family(model) is not None:
        inner = unwrap(model)   # a wrapper's (DataParallel, peft) names lead to the same module
        stack = find_adapter(inner).blocks(inner)
        for name, module in model.named_modules():
            if module is stack:
                return name
    best, best_len = None, 1
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > best_len:
            if len({type(child) for child in module}) == 1:
                best, best_len = name, len(module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of repeated blocks; pass blocks='name.of.list'")
    return best


def default_input(model: nn.Module, batch: int = 1, device: Union[str, torch.device] = "cpu") -> Tensor:
    """A random image batch of the size the model expects (any model family vtr knows)."""
    if family(model) is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass inputs=")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    model = unwrap(model)
    return find_adapter(model).default_input(model, batch, device)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Gradients off by freezing the parameters rather than under ``torch.no_grad``: the FLOP
    counter's module tracker fails on timm's attention pooling under no_grad (torch 2.14)."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class _MetaPredicates(TorchDispatchMode):
    """On the meta device any read of tensor values (``.item()``, ``bool(t)``) cannot be answered
    without data: say so, and how to profile instead, rather than guess."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            raise MetaDeviceError("this model reads tensor values to decide shapes (a data-dependent reducer); "
                                  "profile it on real inputs: vtr.profile_model(model, inputs=[images, ...])")
        return func(*args, **(kwargs or {}))


@contextmanager
def _block_tokens(blocks: nn.Module, seen: list) -> Iterator[None]:
    """Record the token count entering each block of an unpatched model (dim 1 of [B, N, C])."""
    def hook(index):
        def record(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, Tensor) and x.dim() == 3:
                seen.append((index, int(x.shape[1])))   # under fvcore's jit trace a size is a tensor
        return record

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _reducer_macs(model: nn.Module, counter: flop_counter.FlopCounterMode, per_layer: dict) -> Iterator[None]:
    """Attribute the reducer's own MACs to the layer it runs in (the reducer is no submodule)."""
    if not is_patched(model):
        yield
        return
    start = {}

    def before(module, args):
        start["flops"] = counter.get_total_flops()

    def after(module, args, output):
        layer = next(a.layer for a in args if isinstance(a, Signals))
        per_layer[layer] = per_layer.get(layer, 0) + (counter.get_total_flops() - start["flops"]) / 2

    reducer = settings(model).reducer
    handles = [reducer.register_forward_pre_hook(before), reducer.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _subtotal(module: nn.Module, name: str, counts: dict) -> float:
    """Count of a module; a module never called itself (a patched block whose parts are called
    one by one) is the sum of its children."""
    if name in counts:
        return counts[name]
    return sum(_subtotal(child, f"{name}.{child_name}" if name else child_name, counts)
               for child_name, child in module.named_children())


def _rows(model: nn.Module, counts: dict, blocks_name: str, tokens: list, reduce: dict) -> list:
    """Rows for the modules outside the block stack (in call-tree order) and one per block."""
    rows = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if name == blocks_name:
                for i, (block_name, block) in enumerate(child.named_children()):
                    extra = reduce.get(i, 0.0)
                    n_in, n_out = tokens[i] if i < len(tokens) else (None, None)
                    full = f"{name}.{block_name}"
                    # A block called as a module already counts the reduction step it runs.
                    macs = counts[full] if full in counts else _subtotal(block, full, counts) + extra
                    rows.append(LayerRow(full, macs, n_in, n_out, extra))
            elif blocks_name.startswith(name + "."):
                walk(child, name)
            else:
                macs = _subtotal(child, name, counts)
                if macs:
                    rows.append(LayerRow(name, macs))

    walk(model, "")
    return rows


def _as_batches(inputs) -> list:
    if isinstance(inputs, Tensor):
        return [(inputs,)]
    return [batch if isinstance(batch, (tuple, list)) else (batch,) for batch in inputs]


def _count_torch(model: nn.Module, batch: tuple):
    """(total MACs, per-module MACs with names relative to the model, reducer MACs per layer)."""
    reduce: dict = {}
    with flop_counter.FlopCounterMode(display=False) as counter, _reducer_macs(model, counter, reduce):
        model(*batch)
    root = type(model).__name__  # the module tracker names modules "<RootClass>.child.grandchild"
    counts = {}
    for key, ops in counter.get_flop_counts().items():
        if key == root or key.startswith(root + "."):
            counts[key[len(root) + 1:]] = sum(ops.values()) / 2
    return counter.get_total_flops() / 2, counts, reduce


def _fvcore_handles() -> dict:
    def sizes(value) -> list:
        return value.type().sizes()

    def sdpa(inputs, outputs) -> int:
        q, k, v = (sizes(x) for x in inputs[:3])
        batch = math.prod(q[:-2])
        return batch * q[-2] * k[-2] * (q[-1] + v[-1])

    def mha(inputs, outputs) -> int:
        q, k = sizes(inputs[0]), sizes(inputs[1])
        return _mha_macs(q, k, q[-1])

    return {"aten::scaled_dot_product_attention": sdpa, "aten::_native_multi_head_attention": mha}


def _count_fvcore(model: nn.Module, batch: tuple):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation (at fvcore's import) and tracer warnings
        from fvcore.nn import FlopCountAnalysis  # fvcore counts one MAC as one "flop"

        analysis = FlopCountAnalysis(model, batch).set_op_handle(**_fvcore_handles())
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = float(analysis.total())
    counts = {name: float(v) for name, v in analysis.by_module().items()}
    return total, counts, {}


def profile_model(
    model: nn.Module,
    inputs: Union[Tensor, Sequence, None] = None,
    *,
    counter: str = "torch",
    device: Optional[str] = None,
    blocks: Optional[str] = None,
) -> Profile:
    """MACs per image of ``model``, per block with its tokens in and out, and in total.

    ``inputs``: a batch, or a list of batches to average over (data-dependent reducers: thresholds,
    per-row budgets); default one random image of the model's input size. ``device="meta"`` (the
    default for the torch counter without ``inputs``) counts a weightless copy: fast, exact where
    shapes do not depend on data. ``blocks`` names the block stack (found automatically).
    Counts on a patched model follow its reduced token counts; tokens per block are read from
    ``vtr.report``.
    """
    if counter not in COUNTERS:
        raise ValueError(f"counter must be one of {COUNTERS}, got {counter!r}")
    if device is None:
        device = "meta" if counter == "torch" and inputs is None else None
    on_meta = any(p.is_meta for p in model.parameters())
    if counter != "torch" and (device == "meta" or (device is None and on_meta)):
        raise ValueError("the fvcore counter traces real tensors (a model with weights); use counter='torch' "
                         "on the meta device")
    blocks_name = blocks or find_blocks(model)
    batches = _as_batches(inputs) if inputs is not None else None
    notes = []
    param = next(model.parameters(), None)
    if device is not None:
        if param is None or param.device.type != torch.device(device).type:
            model = copy.deepcopy(model).to(device)   # on "meta": a weightless copy, the reduction kept
        if batches is None:
            batches = [(default_input(model, device=device),)]
        batches = [tuple(x.to(device) if isinstance(x, Tensor) else x for x in b) for b in batches]
    elif batches is None:
        batches = [(default_input(model, device=param.device if param is not None else "cpu"),)]
    if device == "meta":
        notes.append("counted on the meta device (shapes only)")
    count = _count_torch if counter == "torch" else _count_fvcore
    if counter == "torch":
        notes.append("matrix products and convolutions only (norms, activations, softmax not counted)")
    else:
        notes.append("fvcore: matrix products, convolutions and norms (as papers count)")

    stack = model.get_submodule(blocks_name)
    total, images, counts, reduce, tokens = 0.0, 0, {}, {}, []
    for batch in batches:
        seen: list = []
        guard = _MetaPredicates() if device == "meta" else nullcontext()
        try:
            with guard, _frozen(model), _block_tokens(stack, seen):
                macs, batch_counts, batch_reduce = count(model, batch)
        except (RuntimeError, NotImplementedError) as error:
            if device != "meta":
                raise
            raise MetaDeviceError(f"cannot profile on the meta device ({error}); the model's shapes depend on "
                                  "data: pass real inputs, vtr.profile_model(model, inputs=[images, ...])") from error
        total += macs
        images += batch[0].shape[0]
        for name, value in batch_counts.items():
            counts[name] = counts.get(name, 0.0) + value
        for layer, value in batch_reduce.items():
            reduce[layer] = reduce.get(layer, 0.0) + value
        tokens.append(_tokens_per_block(model, len(stack), seen))
    scale = 1.0 / images
    counts = {name: v * scale for name, v in counts.items()}
    reduce = {layer: v * scale for layer, v in reduce.items()}
    mean_tokens = [tuple(_mean([t[i][j] for t in tokens]) for j in range(2)) for i in range(len(stack))]
    rows = _rows(model, counts, blocks_name, mean_tokens, reduce)
    rest = total * scale - sum(row.macs for row in rows)
    if abs(rest) > 1e-6 * max(total * scale, 1.0):
        rows.append(LayerRow("(other)", rest))
        notes.append("(other): ops outside any submodule" + (", reduction decisions included (fvcore cannot "
                                                              "place them per layer)" if counter == "fvcore" else ""))
    return Profile(rows=rows, macs=total * scale, counter=counter, images=images, notes=notes)


def _mean(values: list) -> Optional[float]:
    return None if any(v is None for v in values) else sum(values) / len(values)


def _tokens_per_block(model: nn.Module, num_blocks: int, seen: list) -> list:
    """(tokens in, tokens out) per block: from the report of a patched model's reduced call, else (an unpatched
    model, or a call that ran unreduced: eval mode under ``active="train"``) from the hooks."""
    last = runs.last_call(settings(model)) if is_patched(model) else None
    counts = last.report.tokens if last is not None and last.report is not None else []
    if len(counts) == num_blocks + 1:
        return [(counts[i], counts[i + 1]) for i in range(num_blocks)]
    entering = dict(seen)
    return [(entering.get(i), entering.get(i)) for i in range(num_blocks)]
