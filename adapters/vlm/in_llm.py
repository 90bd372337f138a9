"""In-LLM visual token pruning (LLaVA, Qwen-VL): FastV-style at one layer, or progressive over several.

``layers=[K1, ..., Km]`` makes m *stages*. At decoder layer Ki of the prefill, the attention the
last prompt token pays to every token still present is recomputed from the layer's own
``input_layernorm``, ``q_proj``/``k_proj`` and rotary embedding (one query row: O(L d), and it
works whatever kernel the layer uses: SDPA, eager, ...). It is given to the reducer as the
``cls_attention`` signal of each image's tokens (the hidden states are the metric), and the
reducer decides per image which of them stay (stage i keeps ``budgets[i]`` per image; one state
per image carries sizes and provenance through all stages). Layers in ``[Ki, Ki+1)`` (a
*segment*) then see stage i's sequence: hidden states, rotary embeddings and position ids gathered
(original positions kept, a merged token takes the position of the first token it carries; for
M-RoPE models the gathered rotary embeddings are the tokens' own (t, h, w) ones) and a
causal mask rebuilt for it. Every segment therefore has its own, shorter KV cache; at each decode
step the first layer of a segment builds a mask aligned with that cache (rows of a batch may have
kept different numbers of tokens) and the segment's layers share it, while layers < K1 use the
model's own mask and full cache. Static caches work too: masks span the cache's whole width.

Forward pre-hooks on the decoder layers do all of it; the model's forward and ``generate()`` run
unchanged. Needs the whole prompt in one forward on an empty cache, then one token per forward, or
without a cache the prompt and every token since (no chunked prefill, no assisted generation), and
the last column of the prompt to be a real token (left padding, as generate wants). ``labels`` follow
the positions the last layers see (:func:`compact_labels`), so the model's own loss covers them.

What sits on the model is settings only: :class:`Stages` (each stage's layer and budget) and the
hooks (:class:`StageHook`, a plain class). What a call decides (which tokens each stage keeps, the
images' states, the segment masks) is a :class:`Pruning`, made by the call's first forward and held
by the call's run (``vtr.adapters.vlm.run.VlmRun``): one ``generate()`` shares it between its prefill and decode
steps. A forward on its own makes one too; a later forward on the same KV cache (a decode loop
written by hand) continues it, since the cache holds what that prefill kept: the pruning is found
from the cache object, held weakly, and goes with the cache.

The decision is made once, from the prompt. ``generate(use_cache=False)`` sends the prompt and every
token generated so far in each forward of its run; such a forward (same run, the prefill's prompt
followed by new tokens, no cache) replays the prefill's decision instead of ranking again by the
newest token: each stage keeps the prompt columns the prefill kept, plus every new token, and the
visual tokens it leaves are the ones the prefill computed (a function of the prompt alone, as causal
attention makes them; the cached run holds exactly these in its KV cache). So ``use_cache=False``
generates what the cached run generates. A forward in a new run (a plain ``model(...)`` call) decides
from its own input.

What a family's prompt looks like comes from its :class:`Visuals` (settings, on :class:`Stages`):
which tokens are visual, and each image's (or video's) token count, placeholders and patch grid
(``vtr.adapters.llava.in_llm``, ``vtr.adapters.qwen_vl.in_llm``). Images of different sizes
(LLaVA-NeXT, Qwen-VL): ``budget=B`` means B visual tokens kept per image after the last stage: an
image with at most B keeps all; progressive stages decay from the image's own count
(:func:`image_budgets`); a list budget's counts are each capped at the image's count. Images of one
count and grid are reduced together, so every image takes exactly the reducer steps it would take
alone (a padded group would change a multi-step reducer's steps: ToMe would merge the padding first).
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from vtr.budget.visual import image_budgets, reduction_steps, stage_budgets, stage_layers, step_counts
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.signals import Signals, cls_attention
from vtr.core.state import TokenState


from ..base import remove_hooks
from .language import language_cost, prefill_macs
from .prompt import kept_columns
from .reduce import carried, padded
from .video import tokens_per_frame
from .report import VlmReport, text_only_report
from .run import VlmRun

# generate() options that send the prompt in pieces or verify several candidate tokens per forward.
_MULTI_TOKEN_OPTIONS = {
    "assistant_model": "assisted generation",
    "prompt_lookup_num_tokens": "prompt lookup decoding (assisted generation)",
    "assistant_early_exit": "self-speculative decoding (assisted generation)",
    "use_mtp": "multi-token prediction (assisted generation)",
    "prefill_chunk_size": "chunked prefill",
}
_WHY = ("in-LLM pruning decides which visual tokens stay from the last prompt token in one forward of the whole "
        "prompt on an empty cache, then needs one new token per forward")


# -- what a family's prompt looks like ------------------------------------------------------------------

@dataclass
class Item:
    """One image (or video) of a prompt: its placeholders and, if its tokens form one, its patch grid."""

    row: int
    columns: Tensor                 # [n] prompt column of each of its placeholders, in order
    grid: Optional[tuple] = None    # (rows, cols) while the tokens are its untouched patches in raster order
    kind: str = "image"             # or "video"
    video_grid: Optional[tuple] = None   # a video's (frames, rows, cols): its tokens frame after frame, then any newline


class Visuals:
    """What in-LLM pruning needs to know of a family's prompts; a family subclasses it (settings only: a
    plain object, so a patched model pickles). ``report_kind`` is the family's report class."""

    report_kind: type = VlmReport
    where_suffix: str = ""

    def tokens(self, model: nn.Module) -> tuple[int, int]:
        """(most visual tokens one image can have, protected leading tokens per image)."""
        raise NotImplementedError

    def placeholder(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """``[B, L]`` True at the prompt's visual tokens."""
        raise NotImplementedError

    def items(self, model: nn.Module, input_ids: Tensor, arguments: dict, run: VlmRun) -> list[Item]:
        """The prompt's images and videos, in the order transformers fills their placeholders (``arguments``:
        the forward's; ``run``: the call's, which may hold what ``generate()`` was given)."""
        raise NotImplementedError

    def check_generate(self, model: nn.Module, kwargs: dict) -> None:
        """Refuse a generate() call's inputs before anything runs."""

    def report_fields(self, items: list[Item]) -> dict:
        """The family's own fields of the report."""
        return {}


def split_placeholders(placeholder: Tensor, counts: list[int], grids: Optional[list] = None,
                       kind: str = "image", video_grids: Optional[list] = None) -> list[Item]:
    """Items of ``counts`` tokens each, filling ``placeholder`` in row-major order, item after item
    (``video_grids``: each video's (frames, rows, cols), for the report's grids and tokens per frame)."""
    rows, columns = placeholder.nonzero(as_tuple=True)
    if sum(counts) != rows.numel():
        raise ValueError(f"the prompt has {rows.numel()} {kind} tokens but its {len(counts)} {kind}s give "
                         f"{sum(counts)} features")
    grids = grids or [None] * len(counts)
    video_grids = video_grids or [None] * len(counts)
    return [Item(int(r[0]), c, grid, kind, v)
            for r, c, grid, v in zip(rows.split(counts), columns.split(counts), grids, video_grids)]


# -- settings: what patching decides --------------------------------------------------------------------

@dataclass(frozen=True)
class Stages:
    """Where and how much in-LLM pruning prunes (settings, fixed at patch time; on the model as ``_vtr_stages``).

    layers: the decoder layer of each stage. budgets: visual tokens an image of the largest count
    keeps after each stage. budget: what each image's own counts follow (:func:`image_budgets`): the
    count after the last stage, or the user's list of counts.
    """

    layers: tuple
    budgets: tuple
    budget: Union[int, tuple]
    visuals: Visuals

    @property
    def where(self) -> str:
        return f"in the language model at layer{'s' if len(self.layers) > 1 else ''} {', '.join(map(str, self.layers))}"


def make_stages(model: nn.Module, reduction: Reduction, visuals: Visuals) -> Stages:
    layers = stage_layers(reduction.visual.layers, len(model.model.language_model.layers))
    num_tokens, protected = visuals.tokens(model)
    budget = reduction.visual.budget
    # Stage budgets of the largest image, or of one the size of the budget where images have no largest (Qwen-VL).
    largest = max([num_tokens, *(budget if isinstance(budget, (list, tuple)) else [budget or 0])])
    budgets = stage_budgets(num_tokens if budget is None else budget, largest, protected, len(layers))
    budget = tuple(budget) if isinstance(budget, (list, tuple)) else budgets[-1]  # an int, or all of the largest
    return Stages(tuple(layers), tuple(budgets), budget, visuals)


def stages_of(model: nn.Module) -> Optional[Stages]:
    """The in-LLM settings of a patched model; None when it reduces before the language model."""
    return getattr(model, "_vtr_stages", None)


class StageHook:
    """Forward pre-hook on each decoder layer from the first stage on: hands the layer to the call's
    :class:`Pruning` (stage: the index of the stage this layer starts, or None). Outside a call of the
    patched model it does nothing. A plain class, so a patched model pickles and deep-copies."""

    def __init__(self, reduction: Reduction, stage: Optional[int]):
        self.reduction, self.stage = reduction, stage

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        run = runs.active(self.reduction)
        pruning = run.pruning if isinstance(run, VlmRun) else None
        if pruning is None:
            return None
        return pruning.layer(self.stage, module, args, kwargs)


def install(model: nn.Module, reduction: Reduction, visuals: Visuals) -> None:
    """Settings and hooks of in-LLM pruning on ``model`` (patch time)."""
    stages = make_stages(model, reduction, visuals)
    decoder = model.model.language_model.layers
    starts = {layer: index for index, layer in enumerate(stages.layers)}
    for i in range(stages.layers[0], len(decoder)):
        decoder[i].register_forward_pre_hook(StageHook(reduction, starts.get(i)), with_kwargs=True)
    model._vtr_stages = stages


def uninstall(model: nn.Module) -> None:
    remove_hooks(model.model.language_model, StageHook)
    model.__dict__.pop("_vtr_stages", None)


def check_generate(model: nn.Module, kwargs: dict) -> None:
    """Refuse generate() modes that feed the prompt in pieces or several tokens per forward (and what the
    family's :class:`Visuals` refuses), before they run."""
    config = kwargs.get("generation_config") or model.generation_config
    for option, what in _MULTI_TOKEN_OPTIONS.items():
        if kwargs.get(option, getattr(config, option, None)) not in (None, False):
            raise ValueError(f"{what} ({option}=) is not supported with in-LLM pruning (layers=): {_WHY}. "
                             "Leave it out, or reduce before the language model (no layers=), which supports it")
    stages_of(model).visuals.check_generate(model, kwargs)


def expected_flops(model: nn.Module, reduction: Reduction, stages: Stages) -> tuple[float, float]:
    """(reduced, unreduced) prefill MACs of the largest image's visual tokens followed by one text token (the
    shortest prompt in-LLM pruning takes: its last token scores the visual tokens and predicts): each segment on
    its stage's count, plus every stage's scoring and the reducer's decisions."""
    num_tokens, protected = stages.visuals.tokens(model)
    reducer, image_cost = reduction.reducer, language_cost(model, num_tokens, protected)
    counts, decisions = [num_tokens], 0.0
    for layer, budget in zip(stages.layers, stages.budgets):
        decisions += _scoring_macs(model, layer, torch.tensor([counts[-1] + 1]))
        steps = reduction_steps(counts[-1], budget, reducer, protected) if reduction.reduces else []
        step_tokens = step_counts(counts[-1], steps)
        for n, m in zip(step_tokens[:-1], step_tokens[1:]):
            decisions += reducer.extra_macs(n, image_cost, m)
        counts.append(counts[-1] - sum(steps))
    kept = [torch.tensor([n + 1]) for n in counts[1:]]
    reduced = prefill_macs(model, torch.tensor([num_tokens + 1]), kept, list(stages.layers))
    return float(reduced) + decisions, float(prefill_macs(model, torch.tensor([num_tokens + 1])))


# -- one call: what the prefill decides and the decode steps follow --------------------------------------

_BY_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # KV cache -> the Pruning that filled it


def forward(model: nn.Module, run: VlmRun, original_forward: Callable, arguments: dict):
    """The model's forward with the call's pruning observing it (the hooks do the pruning).

    ``labels`` follow the positions the last layers saw (:func:`compact_labels`), so the loss is the
    model's own loss over the pruned sequence its logits cover.
    """
    cache = arguments.get("cache", arguments.get("past_key_values"))
    labels, as_tuple = arguments.pop("labels", None), False
    if labels is not None:
        if arguments.get("shift_labels") is not None:
            raise ValueError("shift_labels cannot be combined with in-LLM pruning (layers=): pass labels, which vtr "
                             "compacts to the positions the pruned layers keep")
        as_tuple = not arguments.get("return_dict", model.config.return_dict)
        arguments["return_dict"] = True
    if run.pruning is None:     # the first forward of the call: a new prompt, or one more step on a cache
        run.pruning = _of_cache(cache, model) or Pruning(model)
    pruning = run.pruning
    pruning.observe(arguments.get("input_ids"), arguments.get("attention_mask"), cache, arguments, run)
    try:
        output = original_forward(model, **arguments)
    finally:
        pruning.shared = {}     # what this forward's layers shared (positions, masks) ends with it
    for held in {id(c): c for c in (cache, getattr(output, "cache", None)) if c is not None}.values():
        try:                    # the cache passed in, or the one the forward made: later forwards on it continue
            _BY_CACHE[held] = pruning
        except TypeError:       # a cache that cannot be referenced weakly: forwards on it start afresh
            pass
    if labels is not None:
        options = {k: arguments[k] for k in ("num_items_in_batch", "ignore_index") if k in arguments}
        compact = compact_labels(labels, pruning.positions, arguments.get("ignore_index", -100))
        loss = model.loss_function(logits=output.logits, labels=compact,
                                   vocab_size=model.config.text_config.vocab_size, **options)
        output = type(output)(**{**output, "loss": loss})     # loss first, as the model's own output has it
        return output.to_tuple() if as_tuple else output
    return output


def compact_labels(labels: Tensor, positions: Optional[Tensor], ignore_index: int = -100) -> Tensor:
    """``labels`` ``[B, L]`` of the caller's sequence at ``positions`` ``[B, L']`` (the columns the pruned
    layers kept, -1 padding), ``ignore_index`` at padding: the labels of pruned positions go as their
    hidden states went. ``positions`` None: the forward pruned nothing, labels as given."""
    if positions is None:
        return labels
    positions = positions.to(labels.device)
    return labels.gather(1, positions.clamp_min(0)).masked_fill(positions < 0, ignore_index)


def _of_cache(cache, model: nn.Module) -> Optional["Pruning"]:
    """The pruning an earlier forward of ``model`` left for the prompt in ``cache``, if any."""
    try:
        pruning = _BY_CACHE.get(cache) if cache is not None else None
    except TypeError:
        return None
    return pruning if pruning is not None and pruning.reduction is model._vtr else None


@dataclass
class ImageGroup:
    """Images with the same visual token count and grid, reduced together at every stage."""

    images: list[int]        # index of each image in transformers' (row-major) order
    rows: Tensor             # [G, 1] prompt row of each image
    columns: Tensor          # [G, n] prompt column of each of its placeholders
    budgets: list[int]       # visual tokens each keeps after each stage
    grid: Optional[tuple] = None         # (rows, cols) of their patches, if their tokens form one
    state: Optional[TokenState] = None   # its tokens after the latest stage
    tokens: Optional[list] = None        # tokens per image entering each reducer step, then kept
    stage_tokens: Optional[list] = None  # tokens per image entering the first stage, then after each
    outputs: list = field(default_factory=list)  # per stage: ([G, n] prompt column, [G, n, D] feature) of each token


class Pruning:
    """What in-LLM pruning decides in one call, shared by the layers' hooks and the call's decode steps.

    Made per call (see the module docstring), never stored on the model; the report it records is
    detached from it.
    """

    def __init__(self, model: nn.Module):
        self.model, self.reduction, self.stages = model, model._vtr, stages_of(model)
        self.protected = self.stages.visuals.tokens(model)[1]
        self.placeholder: Optional[Tensor] = None   # [B, L] visual tokens of the prompt being prefilled
        self.columns: Optional[Tensor] = None       # [B, L'] prompt column of each slot the current layer sees
        self.stage_columns: list = [None] * len(self.stages.layers)   # per stage: [B, L_i] what its segment sees
        self.groups: list[ImageGroup] = []          # the images, by token count and grid, with their latest state
        self.items: list[Item] = []                 # the images (and videos) of the prompt being prefilled
        self.shared: dict = {}                      # what the current segment's layers get in this forward
        self.real_counts: list[Tensor] = []         # [B] real tokens per row entering each stage, then kept
        self.reducer_macs = 0.0
        self.prompt: Optional[tuple[Tensor, Tensor]] = None   # the prefill's input_ids and [B, L] padding mask
        self.length = 0                             # columns of the current forward's input
        self.replaying = False                      # the current forward continues the prefill's prompt, no cache
        self.positions: Optional[Tensor] = None     # [B, L'] columns the last layers saw in the current forward

    def observe(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], cache, arguments: dict,
                run: VlmRun) -> None:
        """Called by the patched forward (``arguments``: its own): a prompt with visual tokens starts a new
        pruning; its images come from the family's :class:`Visuals`."""
        if input_ids is None:
            raise ValueError("in-LLM pruning on a vtr-patched model needs input_ids (to find the image tokens)")
        self.shared, self.replaying, self.positions = {}, False, None
        prefilled = self.placeholder is not None and self.stage_columns[-1] is not None
        past = int(cache.get_seq_length()) if cache is not None else 0
        if prefilled and not past and self._continues(input_ids, attention_mask):
            self._start_replay(input_ids, attention_mask)
            return
        visuals = self.stages.visuals
        placeholder = visuals.placeholder(self.model, input_ids)
        if past and input_ids.shape[1] > 1 and (prefilled or bool(placeholder.any())):
            raise ValueError(f"a forward of {input_ids.shape[1]} tokens on a cache that already holds {past} "
                             f"(chunked prefill, assisted generation) is not supported with in-LLM pruning "
                             f"(layers=): {_WHY}")
        if input_ids.shape[1] == 1 and prefilled and past:
            return                                   # a decode step of the current prompt
        self.placeholder = placeholder if bool(placeholder.any()) else None
        self.items = visuals.items(self.model, input_ids, arguments, run) if self.placeholder is not None else []
        mask2d = _padding_mask(input_ids, attention_mask)
        if self.placeholder is None:
            runs.record(self.reduction, text_only_report(self.model, input_ids, mask2d, self.stages.where,
                                                         visuals.report_kind))
            return
        if not bool(mask2d[:, -1].all()):
            raise ValueError("in-LLM pruning needs the last column of the prompt to be a real token in every row "
                             "(pad on the left, as generate() expects)")
        if bool(self.placeholder[:, -1].any()):
            # The last prompt token scores the visual tokens and predicts the first new token: pruning it would
            # make another position predict, and keeping it would break the image's exact budget.
            rows = self.placeholder[:, -1].nonzero().flatten().tolist()
            raise ValueError(f"in-LLM pruning needs the prompt to end with a text token, but row(s) {rows} end with a "
                             "visual token: the last prompt token chooses the visual tokens and predicts the first new "
                             "token, so it must stay; put the question (or any text) after the image")
        real = mask2d.bool()
        self.columns = _real_columns(real)
        self.length, self.prompt = input_ids.shape[1], (input_ids, real)
        self.groups, self.reducer_macs = [], 0.0
        self.real_counts = [real.sum(1)]
        self.stage_columns = [None] * len(self.stages.layers)

    def _continues(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> bool:
        """``input_ids`` is the prefill's prompt followed by new (real) tokens: a forward of
        ``generate(use_cache=False)`` after its first."""
        ids, real = self.prompt
        length = ids.shape[1]
        if input_ids.shape[0] != ids.shape[0] or input_ids.shape[1] <= length:
            return False
        mask = _padding_mask(input_ids, attention_mask).bool()
        return (torch.equal(input_ids[:, :length], ids) and torch.equal(mask[:, :length], real)
                and bool(mask[:, length:].all()))

    def _start_replay(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> None:
        self.replaying, self.length = True, input_ids.shape[1]
        self.columns = _real_columns(_padding_mask(input_ids, attention_mask).bool())

    def layer(self, stage: Optional[int], module: nn.Module, args: tuple, kwargs: dict):
        """The pre-hook of a decoder layer from the first stage on (``stage``: the stage it starts, if any)."""
        if self.placeholder is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs.update(self.shared)                 # the previous stage's sequence (if any)
        if stage is not None:
            if self.stage_columns[stage] is None:
                hidden = self._prune(stage, module, hidden, kwargs)
            elif self.replaying:
                hidden = self._replay(stage, hidden, kwargs)
            elif hidden.shape[1] > 1:
                raise ValueError(f"in-LLM pruning supports one prefill then one token per forward: {_WHY}")
            else:
                valid = self.stage_columns[stage] >= 0
                self.shared = {"attention_mask": _segment_mask(valid, kwargs.get("cache"), self.stages.layers[stage],
                                                               1, hidden.dtype)}
            kwargs.update(self.shared)
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _prune(self, stage: int, layer: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        """Reduce each image's tokens at this stage and return the stage's sequence (shared kwargs set)."""
        length = self.length
        cos, sin = kwargs["position_embeddings"]
        scores = last_token_attention(layer, hidden, cos, sin, self.columns >= 0)    # [B, L_prev]
        slot = _slot_of_column(self.columns, length)

        if not self.groups:
            self.groups = self._image_groups()
        hidden = hidden.clone()
        keep = (slot >= 0) & ~self.placeholder
        for group in self.groups:
            rows = group.rows
            if group.state is None:
                group.state = TokenState.start(hidden[rows, group.columns], self.protected)
                group.tokens, group.stage_tokens = [group.state.num_tokens], [group.state.num_tokens]
            current = slot[rows, group.state.first_carried(group.columns, length)]   # [G, n] slot of each token
            group.state = self._reduce(group, group.state.with_x(hidden[rows, current]), scores[rows, current],
                                       group.budgets[stage])
            group.stage_tokens.append(group.state.num_tokens)
            # Each output token sits at the first prompt column it carries; text stays, padding goes.
            first = group.state.first_carried(group.columns, length)
            out_rows = rows.expand_as(first)
            hidden[out_rows, slot[out_rows, first]] = group.state.x.to(hidden.dtype)
            keep[out_rows, first] = True
            group.outputs.append((first, group.state.x))
        columns = self.stage_columns[stage] = kept_columns(keep, left=True)
        self.real_counts.append(keep.sum(1))
        hidden = self._enter(stage, hidden, kwargs, slot, columns)
        if stage == len(self.stages.layers) - 1:
            self._record(keep)
        return hidden

    def _replay(self, stage: int, hidden: Tensor, kwargs: dict) -> Tensor:
        """The prefill's decision at this stage, on its prompt followed by new tokens (no cache): the
        prompt columns it kept, with the visual tokens it computed there, then every new token."""
        slot = _slot_of_column(self.columns, self.length)
        hidden = hidden.clone()
        for group in self.groups:
            first, x = group.outputs[stage]
            out_rows = group.rows.expand_as(first)
            hidden[out_rows, slot[out_rows, first]] = x.to(hidden.dtype)
        prompt = self.stage_columns[stage]
        new = torch.arange(self.prompt[0].shape[1], self.length, device=prompt.device).expand(prompt.shape[0], -1)
        return self._enter(stage, hidden, kwargs, slot, torch.cat([prompt, new], dim=1))

    def _enter(self, stage: int, hidden: Tensor, kwargs: dict, slot: Tensor, columns: Tensor) -> Tensor:
        """The sequence of ``columns`` ``[B, L_i]`` (prompt columns, -1 padding) that the layers from
        ``stage`` on see, gathered from ``hidden`` (``slot``: where each column is in it); their
        positions, rotary embeddings and causal mask go to ``shared``."""
        index = slot.gather(1, columns.clamp_min(0)).clamp_min(0)   # [B, L_i] source slot of each new slot
        cos, sin = kwargs["position_embeddings"]
        self.columns = self.positions = columns
        self.shared = {   # position_ids: the 1-D ones some attention kernels read (None for M-RoPE outside generate)
            "position_ids": None if kwargs.get("position_ids") is None else _gather(kwargs["position_ids"], index),
            "position_embeddings": (_gather(cos, index), _gather(sin, index)),
            "attention_mask": _segment_mask(columns >= 0, kwargs.get("cache"), self.stages.layers[stage],
                                            columns.shape[1], hidden.dtype),
        }
        return _gather(hidden, index)

    def _image_groups(self) -> list[ImageGroup]:
        """The prompt's images, grouped by token count and grid (first-seen order)."""
        keys = [(len(item.columns), item.grid) for item in self.items]
        groups = []
        for key in dict.fromkeys(keys):
            images = [i for i, k in enumerate(keys) if k == key]
            device = self.placeholder.device
            groups.append(ImageGroup(
                images, torch.tensor([[self.items[i].row] for i in images], device=device),
                torch.stack([self.items[i].columns for i in images]),
                image_budgets(self.stages.budget, key[0], self.protected, len(self.stages.layers)), key[1]))
        return groups

    def _reduce(self, group: ImageGroup, state: TokenState, scores: Tensor, budget: int) -> TokenState:
        """The reducer's steps from the state's tokens down to ``budget`` (scores: attention to each token)."""
        reducer, protected = self.reduction.reducer, state.num_protected
        steps = reduction_steps(state.num_tokens, budget, reducer, protected) if not reducer.identity else []
        # Spatial grid only while the tokens are the image's untouched patches (the first stage).
        grid = group.grid if not state.is_reduced else None
        image_cost = language_cost(self.model, *self.stages.visuals.tokens(self.model))
        # Steps run on the stage's tokens as if they were original (sizes kept), then compose.
        reduced = state.restarted()
        for step, remove in enumerate(steps):
            signals = Signals(metric=reduced.x, layer=step, num_layers=len(steps),
                              cls_attention=carried(scores, reduced), grid=None if reduced.is_reduced else grid)
            self.reducer_macs += state.x.shape[0] * reducer.extra_macs(reduced.num_tokens, image_cost,
                                                                          reduced.num_tokens - remove)
            reduced = reducer(reduced, reduced.num_tokens - remove, signals)
            group.tokens.append(reduced.num_tokens)
        return state.then(reduced)

    def _record(self, keep: Tensor) -> None:
        """The call's report, detached, for ``vtr.report`` in this thread."""
        before, kept = self.real_counts[0], self.real_counts[1:]
        layers = list(self.stages.layers)
        scoring = sum(_scoring_macs(self.model, layer, count) for layer, count in zip(layers, self.real_counts))
        # Each image's group and its row in that group's state, in image order.
        where = {image: (group, g) for group in self.groups for g, image in enumerate(group.images)}
        order = [where[image] for image in sorted(where)]
        states = [(group.state, g) for group, g in order]
        # Visual tokens per image entering the first stage, then after each stage (the most any image had).
        stage_tokens = [max(counts) for counts in zip(*(group.stage_tokens for group in self.groups))]
        runs.record(self.reduction, self.stages.visuals.report_kind(
            tokens=list(self.groups[0].tokens) if len(self.groups) == 1 else list(stage_tokens),
            assignment=padded([state.assignment[g].detach() for state, g in states], -1),
            size=padded([state.size[g].detach() for state, g in states], 0.0),
            num_protected=self.protected, grid=None, where=self.stages.where,
            image_rows=torch.cat([group.rows[g] for group, g in order]),
            visual_tokens_before=self.placeholder.sum(1), visual_tokens_after=(keep & self.placeholder).sum(1),
            kept_positions=self.columns, stage_layers=layers, stage_tokens=stage_tokens,
            stage_positions=list(self.stage_columns),
            prefill_macs=prefill_macs(self.model, before, kept, layers),
            prefill_macs_unreduced=prefill_macs(self.model, before),
            reducer_macs=self.reducer_macs + scoring,
            image_tokens_before=torch.tensor([state.num_original for state, _ in states]),
            image_tokens_after=torch.tensor([state.num_tokens for state, _ in states]),
            frame_tokens=[frame_counts(state, g, item) for (state, g), item in zip(states, self.items)],
            **self.stages.visuals.report_fields(self.items),
        ))


def frame_counts(state: TokenState, row: int, item: Item) -> list[int]:
    """Tokens ``item`` (row ``row`` of its group's ``state``) kept from each of its frames; an image: one count."""
    if item.video_grid is None:
        return [state.num_tokens]
    frames, rows, cols = item.video_grid
    return tokens_per_frame(state.first_carried()[row], frames, rows * cols)


def _real_columns(real: Tensor) -> Tensor:
    """``[B, L]`` column of each position, -1 where ``real`` is False (padding)."""
    return torch.arange(real.shape[1], device=real.device).expand(real.shape).masked_fill(~real, -1)


def _slot_of_column(columns: Tensor, length: int) -> Tensor:
    """``[B, length]`` slot of each prompt column in a sequence whose slots hold ``columns``
    (``[B, L']``, -1 padding); -1 for columns the sequence no longer holds."""
    valid = columns >= 0
    slot = torch.full((columns.shape[0], length), -1, dtype=torch.long, device=columns.device)
    slots = torch.arange(columns.shape[1], device=columns.device).expand_as(columns)
    rows = torch.arange(columns.shape[0], device=columns.device)[:, None].expand_as(columns)
    slot[rows[valid], columns[valid]] = slots[valid]
    return slot


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values`` ``[B or 1, L, ...]`` at ``index`` ``[B, L']`` along dim 1."""
    values = values.expand(index.shape[0], *values.shape[1:])
    return values.gather(1, index.view(*index.shape, *[1] * (values.dim() - 2)).expand(-1, -1, *values.shape[2:]))


def _padding_mask(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """``[B, L]`` real tokens of a prompt sent on an empty cache. generate() with a static cache
    passes a ready 4-D mask ``[B, 1, L, W]`` (Qwen-VL: in a dict by attention type): a real token is one
    that may attend to itself."""
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask["full_attention"]
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.dim() == 4:
        diagonal = attention_mask[:, 0, :, :input_ids.shape[1]].diagonal(dim1=-2, dim2=-1)
        return (diagonal if diagonal.dtype == torch.bool else diagonal == 0).long()
    return attention_mask


def last_token_attention(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, real: Tensor) -> Tensor:
    """Head-mean attention of the last position to every position ``[B, L]``, from the layer's own
    norm, q/k projections and rotary embedding (what its attention computes, one query row only)."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    batch, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[:, -1:]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    q = rotate(q, q, cos[:, -1:], sin[:, -1:])[0]
    k = rotate(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return cls_attention(q, k, _additive(real[:, None, None, :], torch.float32), scale=attn.scaling)


def _segment_mask(valid: Tensor, cache, layer: int, query_length: int, dtype: torch.dtype) -> Tensor:
    """Mask ``[B, 1, Q, W]`` of Q new tokens over a segment's own cache at ``layer``: its prompt slots
    (``valid`` ``[B, L_i]``), then the tokens generated since, causal; W is the width the cache
    returns (a static cache's slots past its length are masked)."""
    past = int(cache.get_seq_length(layer)) if cache is not None else 0
    width = int(cache.get_mask_sizes(query_length, layer)[0]) if cache is not None else past + query_length
    keys = torch.arange(width, device=valid.device)
    queries = past + torch.arange(query_length, device=valid.device)
    slots = torch.ones(valid.shape[0], width, dtype=torch.bool, device=valid.device)
    slots[:, :valid.shape[1]] = valid
    return _additive(slots[:, None, :] & (keys[None, :] <= queries[:, None])[None], dtype)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean ``[B, Q, K]`` (or ``[B, 1, 1, K]``) allowed-mask as an additive float mask ``[B, 1, Q, K]``."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask if mask.dim() == 4 else mask[:, None]


def _scoring_macs(model: nn.Module, layer: int, num_tokens: Tensor) -> float:
    attn = model.model.language_model.layers[layer].self_attn
    per_row = attn.k_proj.in_features * (attn.k_proj.out_features * num_tokens.double() + attn.q_proj.out_features)
    return float(per_row.sum())
