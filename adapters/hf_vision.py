"""Hugging Face adapter: CLIP, SigLIP and ViT image towers of transformers 5.x.

Supported: ``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipModel``,
``SiglipVisionModel``, ``ViTModel`` and ``ViTForImageClassification``, under the ``"sdpa"`` or
``"eager"`` attention implementation.

Patching swaps the class of each encoder layer of the image tower for a subclass whose forward is
the layer's own (same submodules, same order) with the reduction step between its attention and
MLP residuals; the model's own forward, embeddings, pooling, ``output_hidden_states``,
``return_dict``, ``save_pretrained``/``from_pretrained`` and the text tower stay as they are.
The token state flows from layer to layer beside the hidden states. Proportional attention reaches
the attention as its ``attention_mask`` (a ``[B, 1, 1, N]`` float mask, which both implementations
add to the logits). When a reducer needs the attention's q and k (``metric="keys"``, CLS
attention), the tower switches to a registered attention function (``"vtr_sdpa"``/``"vtr_eager"``,
via ``AttentionInterface.register`` and ``set_attn_implementation``) that hands q and k over and
then runs the original implementation; unpatching switches back.

Hidden states returned with ``output_hidden_states=True`` after a reducing layer have fewer tokens
(``vtr.report(model).tokens`` lists how many). SigLIP has no CLS token: its attention-pooling head
adds ``log(size)`` to the keys, so a merged token gets the attention of the tokens it stands for.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip as clip
from transformers.models.siglip import modeling_siglip as siglip
from transformers.models.vit import modeling_vit as vit

from vtr.config import Reduction
from vtr.cost import EncoderCost
from vtr.signals import QKCapture
from vtr.state import TokenState

from . import steps
from .errors import UnsupportedModelError

name = "transformers (CLIP, SigLIP, ViT)"
FAMILIES = (clip, siglip, vit)
SUPPORTED = (clip.CLIPModel, clip.CLIPVisionModel, clip.CLIPVisionModelWithProjection, siglip.SiglipModel,
             siglip.SiglipVisionModel, vit.ViTModel, vit.ViTForImageClassification)
TEXT_MODELS = (clip.CLIPTextModel, clip.CLIPTextModelWithProjection, siglip.SiglipTextModel)
LAYERS = (clip.CLIPEncoderLayer, siglip.SiglipEncoderLayer, vit.ViTLayer)
IMPLEMENTATIONS = ("sdpa", "eager")


# -- the attention function that hands q and k to the reducer ------------------------------------

def _capturing(implementation: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        capture: Optional[QKCapture] = getattr(module, "_vtr_capture", None)
        if capture is not None:
            capture.q, capture.k = query, key
        if implementation == "eager":
            base = sys.modules[type(module).__module__].eager_attention_forward
        else:
            base = ALL_ATTENTION_FUNCTIONS[implementation]
        return base(module, query, key, value, attention_mask, **kwargs)
    attention.__name__ = f"vtr_{implementation}"
    return attention


for _implementation in IMPLEMENTATIONS:
    AttentionInterface.register(f"vtr_{_implementation}", _capturing(_implementation))


# -- what is patched where ------------------------------------------------------------------------

def matches(model: nn.Module) -> bool:
    return isinstance(model, PreTrainedModel) and type(model).__module__ in {f.__name__ for f in FAMILIES}


def tower(model: nn.Module) -> PreTrainedModel:
    """The image tower: the model itself or its ``vision_model`` / ``vit``."""
    for attribute in ("vision_model", "vit"):
        if isinstance(getattr(model, attribute, None), PreTrainedModel):
            return getattr(model, attribute)
    return model


def _layers(visual: PreTrainedModel) -> nn.ModuleList:
    return visual.layers if isinstance(visual, vit.ViTModel) else visual.encoder.layers


def check(model: nn.Module) -> None:
    """Refuse anything whose forward we would not reproduce exactly."""
    kind = type(model).__name__
    if isinstance(model, TEXT_MODELS):
        raise UnsupportedModelError(f"{kind} is a text model; vtr reduces image tokens: pass the vision model "
                                    f"or the whole CLIP/SigLIP model ({', '.join(c.__name__ for c in SUPPORTED)})")
    if not isinstance(model, SUPPORTED):
        raise UnsupportedModelError(f"vtr's transformers adapter does not support {kind}; supported: "
                                    f"{', '.join(c.__name__ for c in SUPPORTED)}")
    visual = tower(model)
    if getattr(visual, "_vtr_run", None) is not None:
        raise UnsupportedModelError(f"the image tower of {kind} is already patched by vtr; unpatch it first")
    implementation = visual.config._attn_implementation
    if implementation not in IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"{kind} runs attn_implementation={implementation!r}; vtr needs an attention that adds a float "
            f"mask (proportional attention): one of {IMPLEMENTATIONS}. Call "
            "model.set_attn_implementation('sdpa') first")
    for i, layer in enumerate(_layers(visual)):
        if type(layer) not in LAYERS:
            raise UnsupportedModelError(f"layer {i} of {kind} is {type(layer).__name__}; supported: "
                                        f"{', '.join(c.__name__ for c in LAYERS)}")


def _attention(layer: nn.Module) -> nn.Module:
    return layer.attention if isinstance(layer, vit.ViTLayer) else layer.self_attn


def _num_prefix(visual: PreTrainedModel) -> int:
    return 0 if isinstance(visual, siglip.SiglipVisionModel) else 1


def _projection(model: nn.Module) -> Optional[nn.Linear]:
    projection = getattr(model, "visual_projection", None)
    return projection if isinstance(projection, nn.Linear) else None


def cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    visual = tower(model)
    config = visual.config
    width, layers = config.hidden_size, _layers(visual)
    grid = config.image_size // config.patch_size
    num_patches = grid * grid
    fixed = float(num_patches * width * config.num_channels * config.patch_size**2)
    per_final_token = 0.0
    head = getattr(visual, "head", None)
    if isinstance(head, siglip.SiglipMultiheadAttentionPoolingHead):
        fixed += 2 * width * width + steps.linear_macs(head.mlp)   # probe q, out proj, MLP on one token
        per_final_token += 2 * width * width + 2 * width           # k, v projections; one query's attention
    for extra in (getattr(visual, "pooler", None), _projection(model), getattr(model, "classifier", None)):
        if isinstance(extra, nn.Module):
            fixed += steps.linear_macs(extra)
    attention = _attention(layers[0])
    attn_linear = sum(steps.linear_macs(getattr(attention, n)) for n in ("q_proj", "k_proj", "v_proj"))
    attn_linear += steps.linear_macs(getattr(attention, "out_proj", None) or attention.o_proj)
    heads = config.num_attention_heads
    return EncoderCost(
        num_tokens=num_patches + _num_prefix(visual),
        num_protected=_num_prefix(visual),
        num_layers=len(layers),
        attn_linear=attn_linear,
        attn_dim=attention.q_proj.out_features,
        mlp_linear=steps.linear_macs(layers[0].mlp),
        fixed=fixed,
        per_final_token=per_final_token,
        metric_dim=attention.q_proj.out_features // heads if metric == "keys" else width,
        grid=(grid, grid),
        has_cls=_num_prefix(visual) == 1,
    )


# -- what each token means in the embedding space (query conditioning) ---------------------------

def _token_embedding(model: nn.Module) -> tuple[Optional[int], Callable[[Tensor], Tensor]]:
    """Width of the image embedding and the map of a token to the embedding it would give if it were
    the pooled token: CLS pooling -> final norm (+ projection); SigLIP's attention pooling -> the head
    attending to that token alone (value and output projections, then the head's MLP residual)."""
    visual = tower(model)
    if isinstance(visual, vit.ViTModel):
        pooler = visual.pooler
        if pooler is None:
            return visual.config.hidden_size, visual.layernorm
        return pooler.dense.out_features, lambda t: pooler.activation(pooler.dense(visual.layernorm(t)))
    if isinstance(visual, siglip.SiglipVisionModel):
        if not visual.use_head:
            return visual.config.hidden_size, visual.post_layernorm
        head = visual.head

        def as_pooled(tokens: Tensor) -> Tensor:
            attention, width = head.attention, visual.config.hidden_size
            value = nn.functional.linear(visual.post_layernorm(tokens), attention.in_proj_weight[2 * width:],
                                         attention.in_proj_bias[2 * width:])
            pooled = attention.out_proj(value)
            return pooled + head.mlp(head.layernorm(pooled))
        return visual.config.hidden_size, as_pooled
    projection = _projection(model)
    if projection is None:
        return visual.config.hidden_size, visual.post_layernorm
    return projection.out_features, lambda t: projection(visual.post_layernorm(t))


# -- the patched layer ----------------------------------------------------------------------------

class _Run:
    """What the layers of one patched tower share: the reduction and the token state of the pass."""

    def __init__(self, model: nn.Module, reduction: Reduction):
        visual = tower(model)
        self.reduction = reduction
        self.num_layers = len(_layers(visual))
        self.num_prefix = _num_prefix(visual)
        grid = visual.config.image_size // visual.config.patch_size
        self.grid_shape = (grid, grid)
        self.where = type(model).__name__
        self.attn_implementation = visual.config._attn_implementation   # restored on unpatch
        self.embedding_width, self.project = _token_embedding(model)
        self.state: Optional[TokenState] = None
        self.tokens: list[int] = []
        self.grid: Optional[tuple] = None
        self.query: Optional[Tensor] = None

    def start(self, hidden_states: Tensor) -> TokenState:
        self.state = TokenState.start(hidden_states, self.num_prefix)
        self.tokens = [self.state.num_tokens]
        self.grid = steps.grid_of(self.grid_shape, self.num_prefix, self.state.num_tokens)
        self.query = steps.batch_query(self.reduction, hidden_states.shape[0], self.embedding_width, self.where)
        return self.state


class ReducingLayer:
    """Mixed in before an encoder layer's own class; see the module docstring."""

    _vtr_run: _Run
    _vtr_index: int

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        run, layer = self._vtr_run, self._vtr_index
        reduction = run.reduction
        if attention_mask is not None:
            raise ValueError("attention_mask: a vtr-patched model reduces tokens, so it cannot take a mask over the "
                             "original tokens; call it without attention_mask")
        if getattr(self, "gradient_checkpointing", False) and self.training:
            raise ValueError("gradient checkpointing recomputes layers out of order; disable it "
                             "(model.gradient_checkpointing_disable()) on a vtr-patched model")
        state = run.start(hidden_states) if layer == 0 else run.state
        if state is None or state.x.shape != hidden_states.shape:
            raise RuntimeError("a vtr-patched tower runs its layers in order, from layer 0, on its own hidden states")
        projection = dict(grid=run.grid, query=run.query, query_projection=run.project if run.query is not None else None)
        state = steps.reduce(reduction, state, hidden_states, layer, run.num_layers, before_attention=True,
                             **projection)
        bias = state.attention_bias(reduction.prop_attn)
        attention = _attention(self)
        x = self._attention_residual(state.x, bias, **kwargs)
        capture: Optional[QKCapture] = getattr(attention, "_vtr_capture", None)
        q, k = (capture.q, capture.k) if capture is not None else (None, None)
        state = steps.reduce(reduction, state, x, layer, run.num_layers, q=q, k=k, bias=bias,
                             scale=getattr(attention, "scale", getattr(attention, "scaling", None)), **projection)
        if capture is not None:
            capture.clear()
        x = self._mlp_residual(state.x)
        run.state = state.with_x(x)
        run.tokens.append(state.num_tokens)
        if layer == run.num_layers - 1:
            steps.record(reduction, run.state, run.tokens, run.grid)
        return x


class ReducingClipLayer(ReducingLayer):
    """``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` forward, split at the reduction step."""

    def _attention_residual(self, x: Tensor, bias: Optional[Tensor], **kwargs) -> Tensor:
        attended, _ = self.self_attn(hidden_states=self.layer_norm1(x), attention_mask=bias, **kwargs)
        return x + attended

    def _mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.layer_norm2(x))


class ReducingViTLayer(ReducingLayer):
    """``ViTLayer`` forward, split at the reduction step."""

    def _attention_residual(self, x: Tensor, bias: Optional[Tensor], **kwargs) -> Tensor:
        attended, _ = self.attention(self.layernorm_before(x), bias, **kwargs)
        return self.dropout(attended) + x

    def _mlp_residual(self, x: Tensor) -> Tensor:
        return self.dropout(self.mlp(self.layernorm_after(x))) + x


class ReducingPoolingHead:
    """SigLIP's attention-pooling head with ``log(size)`` on its keys once tokens are reduced."""

    _vtr_run: _Run

    def forward(self, hidden_state: Tensor) -> Tensor:
        state = self._vtr_run.state
        if state is None or state.x.shape[:2] != hidden_state.shape[:2]:
            raise RuntimeError("a vtr-patched pooling head pools the tokens of its own tower's forward pass")
        if not state.is_reduced and not state.padded:
            return super().forward(hidden_state)
        probe = self.probe.repeat(hidden_state.shape[0], 1, 1)
        bias = steps.key_bias(state.size, hidden_state.dtype)
        hidden_state = self.attention(probe, hidden_state, hidden_state, key_padding_mask=bias)[0]
        residual = hidden_state
        hidden_state = residual + self.mlp(self.layernorm(hidden_state))
        return hidden_state[:, 0]


_PATCHED_CLASSES: dict[type, type] = {}
_ORIGINAL_CLASSES: dict[type, type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if cls not in _PATCHED_CLASSES:
        patched = type(f"Vtr{cls.__name__}", (mixin, cls), {})
        _PATCHED_CLASSES[cls], _ORIGINAL_CLASSES[patched] = patched, cls
    module.__class__ = _PATCHED_CLASSES[cls]


def patch(model: nn.Module, reduction: Reduction) -> None:
    visual = tower(model)
    run = _Run(model, reduction)
    reduction.original_class = type(model)
    if steps.needs_qk(reduction):
        reduction.captures = []
        for layer in _layers(visual):
            capture = QKCapture()
            _attention(layer)._vtr_capture = capture
            reduction.captures.append(capture)
        visual.set_attn_implementation(f"vtr_{run.attn_implementation}")
    for index, layer in enumerate(_layers(visual)):
        layer._vtr_run, layer._vtr_index = run, index
        _swap(layer, ReducingViTLayer if isinstance(layer, vit.ViTLayer) else ReducingClipLayer)
    head = getattr(visual, "head", None)
    if isinstance(head, siglip.SiglipMultiheadAttentionPoolingHead):
        head._vtr_run = run
        _swap(head, ReducingPoolingHead)
    visual._vtr_run = run
    model._vtr = reduction


def unpatch(model: nn.Module) -> None:
    visual = tower(model)
    reduction: Reduction = model._vtr
    for module in [*_layers(visual), getattr(visual, "head", None)]:
        if module is not None and hasattr(module, "_vtr_run"):
            module.__class__ = _ORIGINAL_CLASSES[type(module)]
            del module._vtr_run
            if hasattr(module, "_vtr_index"):
                del module._vtr_index
            attention = _attention(module) if isinstance(module, LAYERS) else None
            if attention is not None and hasattr(attention, "_vtr_capture"):
                del attention._vtr_capture
    if reduction.captures is not None:
        visual.set_attn_implementation(visual._vtr_run.attn_implementation)
    del visual._vtr_run
    del model._vtr
