"""What in-LLM pruning decides in one call (:class:`Pruning`): made by the call's first forward, it ranks and
reduces each image's tokens at every stage's layer, hands the later layers their shorter sequence, replays the
decision for ``generate(use_cache=False)`` and records the report (see ``vtr.adapters.vlm.in_llm``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from vtr.budget.visual import image_budgets, reduction_steps
from vtr.core import run as runs
from vtr.core.signals import Instruction, Need, Signals
from vtr.core.state import TokenState

from .language import decoder, language_cost, prefill_macs
from .prompt import kept_columns
from .reduce import carried, padded
from .report import text_only_report
from .run import VlmRun
from .sequence import (gather_slots, last_token_attention, layer_keys, padding_mask, real_columns, rows_attention,
                       scoring_macs, segment_mask, slot_of_column)
from .stages import WHY, stages_of
from .video import tokens_per_frame
from .visuals import Item


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
        self.embedded: Optional[Tensor] = None      # [B, L, D] the language model's input of the prompt being prefilled
        self.given_query: Optional[Tensor] = None   # the call's query from vtr.conditioned, one row per prompt

    def observe(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], cache, arguments: dict,
                run: VlmRun) -> None:
        """Called by the patched forward (``arguments``: its own): a prompt with visual tokens starts a new
        pruning; its images come from the family's :class:`Visuals`."""
        if input_ids is None:
            raise ValueError("in-LLM pruning on a vtr-patched model needs input_ids (to find the image tokens)")
        self.shared, self.replaying, self.positions, self.embedded = {}, False, None, None
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
                             f"(layers=): {WHY}")
        if input_ids.shape[1] == 1 and prefilled and past:
            return                                   # a decode step of the current prompt
        self.placeholder = placeholder if bool(placeholder.any()) else None
        self.items = visuals.items(self.model, input_ids, arguments, run) if self.placeholder is not None else []
        mask2d = padding_mask(input_ids, attention_mask)
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
        if run.query is not None and run.query.shape[0] != input_ids.shape[0]:
            raise ValueError(f"vtr.conditioned: query must have one row per prompt ({input_ids.shape[0]}), got "
                             f"{tuple(run.query.shape)}")
        self.given_query = run.query
        real = mask2d.bool()
        self.columns = real_columns(real)
        self.length, self.prompt = input_ids.shape[1], (input_ids, real)
        self.groups, self.reducer_macs = [], 0.0
        self.real_counts = [real.sum(1)]
        self.stage_columns = [None] * len(self.stages.layers)

    def record_input(self, hidden: Tensor) -> None:
        """The language model's input during the prefill (``InputHook``), for reducers that read the prompt's text
        as it entered the language model."""
        if self.placeholder is not None and self.stage_columns[0] is None and hidden.shape[1] == self.length:
            self.embedded = hidden

    def _continues(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> bool:
        """``input_ids`` is the prefill's prompt followed by new (real) tokens: a forward of
        ``generate(use_cache=False)`` after its first."""
        ids, real = self.prompt
        length = ids.shape[1]
        if input_ids.shape[0] != ids.shape[0] or input_ids.shape[1] <= length:
            return False
        mask = padding_mask(input_ids, attention_mask).bool()
        return (torch.equal(input_ids[:, :length], ids) and torch.equal(mask[:, :length], real)
                and bool(mask[:, length:].all()))

    def _start_replay(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> None:
        self.replaying, self.length = True, input_ids.shape[1]
        self.columns = real_columns(padding_mask(input_ids, attention_mask).bool())

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
                raise ValueError(f"in-LLM pruning supports one prefill then one token per forward: {WHY}")
            else:
                valid = self.stage_columns[stage] >= 0
                self.shared = {"attention_mask": segment_mask(valid, kwargs.get("cache"), self.stages.layers[stage],
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
        needs = self.reduction.reducer.needs
        if Need.UNROTATED_ATTENTION in needs:   # FEATHER: no rotary embedding, a softmax over the visual tokens only
            visual = self.placeholder.gather(1, self.columns.clamp_min(0)) & (self.columns >= 0)
            scores = last_token_attention(layer, hidden, torch.ones_like(cos), torch.zeros_like(sin), visual,
                                          self._window(layer))   # [B, L_prev]
        else:
            scores = last_token_attention(layer, hidden, cos, sin, self.columns >= 0, self._window(layer))
        slot = slot_of_column(self.columns, length)

        if not self.groups:
            self.groups = self._image_groups()
        keys = layer_keys(layer, hidden, cos, sin) if {Need.KEYS, Need.INSTRUCTION} & needs else None
        reads_question = Need.QUERY in needs and self.given_query is None   # the text after the image as its query
        entering = hidden
        hidden = hidden.clone()
        keep = (slot >= 0) & ~self.placeholder
        for group in self.groups:
            rows = group.rows
            if group.state is None:
                group.state = TokenState.start(hidden[rows, group.columns], self.protected)
                group.tokens, group.stage_tokens = [group.state.num_tokens], [group.state.num_tokens]
            current = slot[rows, group.state.first_carried(group.columns, length)]   # [G, n] slot of each token
            instruction = self._instruction(group, layer, entering, keys, slot, current, cos, sin,
                                            Need.TEXT_ATTENTION in needs) \
                if {Need.INSTRUCTION, Need.TEXT_ATTENTION} & needs or reads_question else None
            group.state = self._reduce(group, group.state.with_x(hidden[rows, current]), scores[rows, current],
                                       group.budgets[stage], None if keys is None else keys[rows, current],
                                       instruction, self._query(group, instruction) if Need.QUERY in needs else None)
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

    def _window(self, layer: nn.Module) -> Optional[int]:
        """The sliding window of ``layer``'s attention over its sequence's slots, if it has one (Gemma 3's local
        layers: ``vtr.adapters.gemma3.in_llm``); the layers of the other families see every earlier token."""
        return None

    def _replay(self, stage: int, hidden: Tensor, kwargs: dict) -> Tensor:
        """The prefill's decision at this stage, on its prompt followed by new tokens (no cache): the
        prompt columns it kept, with the visual tokens it computed there, then every new token."""
        slot = slot_of_column(self.columns, self.length)
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
            "position_ids": None if kwargs.get("position_ids") is None else gather_slots(kwargs["position_ids"], index),
            "position_embeddings": (gather_slots(cos, index), gather_slots(sin, index)),
            "attention_mask": segment_mask(columns >= 0, kwargs.get("cache"), self.stages.layers[stage],
                                            columns.shape[1], hidden.dtype),
        }
        return gather_slots(hidden, index)

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
                image_budgets(self.stages.budget, key[0], self.protected, len(self.stages.layers),
                              self.reduction.reducer), key[1]))
        return groups

    def _instruction(self, group: ImageGroup, layer: nn.Module, hidden: Tensor, keys: Optional[Tensor], slot: Tensor,
                     current: Tensor, cos: Tensor, sin: Tensor, with_attention: bool) -> Instruction:
        """Each image's :class:`Instruction`: the real text tokens after its last placeholder, in prompt order, as
        the current layer holds them (text is never pruned, so every one is still there), and ``with_attention``
        the attention each pays to the image's current tokens (``current``: their slots)."""
        rows = group.rows[:, 0]
        columns = torch.arange(self.length, device=slot.device)
        after = (columns[None] > group.columns.amax(dim=1, keepdim=True)) & ~self.placeholder[rows] & (slot[rows] >= 0)
        count = int(after.sum(dim=1).max()) if after.numel() else 0
        order = after.byte().argsort(dim=1, descending=True, stable=True)[:, :count]   # text columns first, in order
        valid = after.gather(1, order)
        where = slot[rows].gather(1, order).clamp_min(0)
        pick = lambda values: values[rows[:, None], where]   # noqa: E731
        attention = None
        if with_attention:
            real = self.columns[rows] >= 0
            attention = rows_attention(layer, hidden[rows], cos.expand(hidden.shape[0], *cos.shape[1:])[rows],
                                       sin.expand(hidden.shape[0], *sin.shape[1:])[rows], real, where,
                                       self._window(layer))   # [G, T, L']
            attention = attention.gather(2, current[:, None, :].expand(-1, attention.shape[1], -1))
        embedded = self.embedded
        return Instruction(hidden=pick(hidden), valid=valid, keys=None if keys is None else pick(keys),
                           norm=decoder(self.model).norm, attention=attention,
                           input_text=None if embedded is None else embedded[rows[:, None], order],   # by column
                           input_image=None if embedded is None else embedded[group.rows, group.columns])

    def _query(self, group: ImageGroup, instruction: Instruction) -> Tensor:
        """Each image's query for a query-conditioned reducer: its row's ``vtr.conditioned`` query if the call has
        one, else the question as the layer holds it: ``[G, T, D]`` the text after the image (the reducer takes the
        best match over the T; a row's padding repeats its first text token, so it never wins)."""
        if self.given_query is not None:
            return self.given_query[group.rows[:, 0].to(self.given_query.device)]
        text = instruction.hidden
        return text.where(instruction.valid[..., None], text[:, :1])

    def _reduce(self, group: ImageGroup, state: TokenState, scores: Tensor, budget: int,
                keys: Optional[Tensor] = None, instruction: Optional[Instruction] = None,
                query: Optional[Tensor] = None) -> TokenState:
        """The reducer's steps from the state's tokens down to ``budget`` (scores: attention to each token; keys:
        each token's attention keys and the text after the image, for the reducers that read them; query: each
        image's, for the reducers that read one)."""
        reducer, protected = self.reduction.reducer, state.num_protected
        steps = reduction_steps(state.num_tokens, budget, reducer, protected) if not reducer.identity else []
        # Spatial grid only while the tokens are the image's untouched patches (the first stage).
        grid = group.grid if not state.is_reduced else None
        image_cost = language_cost(self.model, *self.stages.visuals.tokens(self.model))
        # Steps run on the stage's tokens as if they were original (sizes kept), then compose.
        reduced = state.restarted()
        for step, remove in enumerate(steps):
            signals = Signals(metric=reduced.x, layer=step, num_layers=len(steps),
                              cls_attention=carried(scores, reduced), grid=None if reduced.is_reduced else grid,
                              keys=None if keys is None else first_of(keys, reduced), instruction=instruction,
                              query=query)
            self.reducer_macs += state.x.shape[0] * reducer.extra_macs(reduced.num_tokens, image_cost,
                                                                          reduced.num_tokens - remove)
            reduced = reducer(reduced, reduced.num_tokens - remove, signals)
            group.tokens.append(reduced.num_tokens)
        return state.then(reduced)

    def _record(self, keep: Tensor) -> None:
        """The call's report, detached, for ``vtr.report`` in this thread."""
        before, kept = self.real_counts[0], self.real_counts[1:]
        layers = list(self.stages.layers)
        scoring = sum(scoring_macs(self.model, layer, count) for layer, count in zip(layers, self.real_counts))
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


def first_of(values: Tensor, state: TokenState) -> Tensor:
    """``values`` ``[G, n, ...]`` of a stage's tokens, for each current token of ``state`` (restarted at the
    stage): the value of the first token it carries (a kept token carries itself)."""
    first = state.first_carried().clamp_min(0)
    return values.gather(1, first.view(*first.shape, *[1] * (values.dim() - 2)).expand(-1, -1, *values.shape[2:]))
