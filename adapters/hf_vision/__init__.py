"""Hugging Face adapter: CLIP, SigLIP and ViT image towers of transformers 5.x.

Supported: ``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipModel``,
``SiglipVisionModel``, ``ViTModel`` and ``ViTForImageClassification``, under the ``"sdpa"`` or
``"eager"`` attention implementation.

Patching swaps the class of the image tower (``CLIPVisionModel``, ``SiglipVisionModel``,
``ViTModel``: the module whose forward runs embeddings, encoder and head, reached by every entry
point such as ``get_image_features``) for a subclass whose forward opens the call's run, and the
class of each encoder layer for a subclass whose forward is the layer's own (same submodules, same
order) with the reduction step between its attention and MLP residuals. The first layer starts the
token state from its hidden states, the last one records the report. The model's own forward,
embeddings, pooling, ``output_hidden_states``, ``return_dict``, ``save_pretrained``/
``from_pretrained`` and the text tower stay as they are; a layer called outside a patched forward
pass computes exactly what the original does.

Proportional attention reaches the attention as its ``attention_mask`` (a ``[B, 1, 1, N]`` float
mask, which both implementations add to the logits). When a reducer needs the attention's q and k
(``metric="keys"``, CLS attention), the tower switches to a registered attention function
(``"vtr_sdpa"``/``"vtr_eager"``, via ``AttentionInterface.register`` and
``set_attn_implementation``) that hands q and k to the run in progress and then runs the original
implementation; unpatching switches back.

Hidden states returned with ``output_hidden_states=True`` after a reducing layer have fewer tokens
(``vtr.report(model).tokens`` lists how many). SigLIP has no CLS token: its attention-pooling head
adds ``log(size)`` to the keys, so a merged token gets the attention of the tokens it stands for.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip as clip
from transformers.models.siglip import modeling_siglip as siglip
from transformers.models.vit import modeling_vit as vit

from vtr.budget.cost import EncoderCost
from vtr.core import run as runs
from vtr.core.plan import Reduction
from vtr.core.state import TokenState

from .. import steps
from ..base import Adapter, Swapped, is_patched, restore_class, swap_class
from ..errors import UnsupportedModelError

FAMILIES = (clip, siglip, vit)
SUPPORTED = (clip.CLIPModel, clip.CLIPVisionModel, clip.CLIPVisionModelWithProjection, siglip.SiglipModel,
             siglip.SiglipVisionModel, vit.ViTModel, vit.ViTForImageClassification)
TEXT_MODELS = (clip.CLIPTextModel, clip.CLIPTextModelWithProjection, siglip.SiglipTextModel)
LAYERS = (clip.CLIPEncoderLayer, siglip.SiglipEncoderLayer, vit.ViTLayer)
IMPLEMENTATIONS = ("sdpa", "eager")


# -- the attention function that hands q and k to the run ----------------------------------------

def _capturing(implementation: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "_vtr_layer", None)
        run = runs.active() if layer is not None else None
        if run is not None:
            run.captured[(layer, "q")], run.captured[(layer, "k")] = query, key
        if implementation == "eager":
            base = sys.modules[type(module).__module__].eager_attention_forward
        else:
            base = ALL_ATTENTION_FUNCTIONS[implementation]
        return base(module, query, key, value, attention_mask, **kwargs)
    attention.__name__ = f"vtr_{implementation}"
    return attention


for _implementation in IMPLEMENTATIONS:   # a global registry of functions, nothing on the model
    AttentionInterface.register(f"vtr_{_implementation}", _capturing(_implementation))


# -- what is patched where ------------------------------------------------------------------------

def _original(cls: type) -> type:
    return getattr(cls, "_vtr_original", cls) if issubclass(cls, Swapped) else cls


def _tower(model: nn.Module) -> PreTrainedModel:
    """The image tower: the model itself or its ``vision_model`` / ``vit``."""
    for attribute in ("vision_model", "vit"):
        if isinstance(getattr(model, attribute, None), PreTrainedModel):
            return getattr(model, attribute)
    return model


def _layers(visual: PreTrainedModel) -> nn.ModuleList:
    return visual.layers if isinstance(visual, vit.ViTModel) else visual.encoder.layers


def _attention(layer: nn.Module) -> nn.Module:
    return layer.attention if isinstance(layer, vit.ViTLayer) else layer.self_attn


def _num_prefix(visual: PreTrainedModel) -> int:
    return 0 if isinstance(visual, siglip.SiglipVisionModel) else 1


def _patch_conv(visual: PreTrainedModel) -> nn.Conv2d:
    """The convolution that cuts the image into patch tokens."""
    embeddings = visual.embeddings
    return embeddings.patch_embeddings.projection if isinstance(visual, vit.ViTModel) else embeddings.patch_embedding


def _projection(model: nn.Module) -> Optional[nn.Linear]:
    projection = getattr(model, "visual_projection", None)
    return projection if isinstance(projection, nn.Linear) else None


def _check(model: nn.Module) -> None:
    """Refuse anything whose forward we would not reproduce exactly."""
    kind = type(model).__name__
    if isinstance(model, TEXT_MODELS):
        raise UnsupportedModelError(f"{kind} is a text model; vtr reduces image tokens: pass the vision model "
                                    f"or the whole CLIP/SigLIP model ({', '.join(c.__name__ for c in SUPPORTED)})")
    if not isinstance(model, SUPPORTED):
        raise UnsupportedModelError(f"vtr's transformers adapter does not support {kind}; supported: "
                                    f"{', '.join(c.__name__ for c in SUPPORTED)}")
    visual = _tower(model)
    if is_patched(visual) or isinstance(visual, Swapped):
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


def _cost(model: nn.Module, metric: str = "x") -> EncoderCost:
    visual = _tower(model)
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
        width=width,
    )


# -- the patched tower: opens the run; maps tokens into the embedding space -----------------------

class ReducingTower(Swapped):
    """Mixed in before the image tower's own class: its forward, inside the call's run.

    The swapped class keeps the original's name and module: transformers keys per-class tables by
    them (the ``_can_record_outputs`` registry behind ``output_hidden_states``, ``architectures``
    in ``save_pretrained``, ``set_attn_implementation``'s source check).
    """

    _vtr: Reduction

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        original = cls.__dict__.get("_vtr_original")
        if original is not None:
            cls.__name__, cls.__qualname__, cls.__module__ = (original.__name__, original.__qualname__,
                                                              original.__module__)

    def forward(self, pixel_values: Optional[Tensor] = None, *args, **kwargs):
        with runs.opened(self._vtr, self.training) as run:   # None: runs unreduced (vtr.disabled, active="train")
            if run is not None and pixel_values is not None:
                steps.condition(run, pixel_values.shape[0], self.embedding_width(), type(self).__name__,
                                self.project_tokens)
                # This call's patch grid, from its pixels (interpolate_pos_encoding takes any size): layer 0
                # begins the token state with it.
                run.grid = steps.conv_grid(_patch_conv(self), *pixel_values.shape[-2:])
            return super().forward(pixel_values, *args, **kwargs)

    def _vtr_outer_projection(self) -> Optional[nn.Linear]:
        # The parent's visual_projection (CLIPModel, CLIPVisionModelWithProjection): a plain reference,
        # not a submodule, so state_dict and module traversal are those of the unpatched model.
        return self.__dict__.get("_vtr_projection")

    def embedding_width(self) -> int:
        """Width of the image embedding a token maps to (:meth:`project_tokens`)."""
        if isinstance(self, vit.ViTModel) and self.pooler is not None:
            return self.pooler.dense.out_features
        projection = self._vtr_outer_projection()
        return projection.out_features if projection is not None else self.config.hidden_size

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """Each token as the embedding it would give if it were the pooled token: CLS pooling -> final norm
        (+ pooler or projection); SigLIP's attention pooling -> the head attending to that token alone
        (value and output projections, then the head's MLP residual)."""
        if isinstance(self, vit.ViTModel):
            tokens = self.layernorm(tokens)
            return tokens if self.pooler is None else self.pooler.activation(self.pooler.dense(tokens))
        tokens = self.post_layernorm(tokens)
        if isinstance(self, siglip.SiglipVisionModel):
            if not self.use_head:
                return tokens
            head, width = self.head, self.config.hidden_size
            attention = head.attention
            value = nn.functional.linear(tokens, attention.in_proj_weight[2 * width:],
                                         attention.in_proj_bias[2 * width:])
            pooled = attention.out_proj(value)
            return pooled + head.mlp(head.layernorm(pooled))
        projection = self._vtr_outer_projection()
        return tokens if projection is None else projection(tokens)


# -- the patched layer ----------------------------------------------------------------------------

class ReducingLayer(Swapped):
    """Mixed in before an encoder layer's own class; see the module docstring."""

    _vtr_layer: int
    _vtr_num_layers: int
    _vtr_num_prefix: int

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        run = runs.active()
        if run is None:   # called on its own: the original layer
            return super().forward(hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError("attention_mask: a vtr-patched model reduces tokens, so it cannot take a mask over the "
                             "original tokens; call it without attention_mask")
        if getattr(self, "gradient_checkpointing", False) and self.training:
            raise ValueError("gradient checkpointing recomputes layers out of order; disable it "
                             "(model.gradient_checkpointing_disable()) on a vtr-patched model")
        layer, reduction = self._vtr_layer, run.reduction
        if layer == 0:   # every pass through the encoder starts here: begin the token state
            state = TokenState.start(hidden_states, self._vtr_num_prefix)
            run.begin(state, self._vtr_num_layers, steps.grid_of(run.grid, self._vtr_num_prefix, state.num_original))
        state = steps.entering(run, hidden_states)
        if state is None:
            raise RuntimeError("a vtr-patched tower runs its layers in order, from layer 0, on its own hidden states")
        state = steps.reduce(run, state, hidden_states, layer, before_attention=True)
        bias = state.attention_bias(reduction.prop_attn)
        attention = _attention(self)
        x = self._attention_residual(state.x, bias, **kwargs)
        q, k = run.take_qk(layer)   # always: it also forgets them
        state = steps.reduce(run, state, x, layer, q=q, k=k, bias=bias,
                             scale=getattr(attention, "scale", getattr(attention, "scaling", None)))
        x = self._mlp_residual(state.x)
        run.advance(state.with_x(x))
        if layer == self._vtr_num_layers - 1:
            run.finish()
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


class ReducingPoolingHead(Swapped):
    """SigLIP's attention-pooling head with ``log(size)`` on its keys once tokens are reduced."""

    def forward(self, hidden_state: Tensor) -> Tensor:
        run = runs.active()
        size = None if run is None else runs.final_sizes(run.reduction, hidden_state, self.training)
        if size is None:
            return super().forward(hidden_state)
        probe = self.probe.repeat(hidden_state.shape[0], 1, 1)
        bias = steps.key_bias(size, hidden_state.dtype)
        hidden_state = self.attention(probe, hidden_state, hidden_state, key_padding_mask=bias)[0]
        residual = hidden_state
        hidden_state = residual + self.mlp(self.layernorm(hidden_state))
        return hidden_state[:, 0]


class HfVision(Adapter):
    """transformers CLIP, SigLIP and ViT image towers (see the module docstring)."""

    name = "hf_vision"
    vision_tower_of_vlms = True   # LLaVA-family models hold a CLIP or SigLIP tower

    def matches(self, model: nn.Module) -> bool:
        return (isinstance(model, PreTrainedModel)
                and _original(type(model)).__module__ in {f.__name__ for f in FAMILIES})

    def check(self, model: nn.Module) -> None:
        _check(model)

    def cost(self, model: nn.Module, metric: str = "x") -> EncoderCost:
        return _cost(model, metric)

    def blocks(self, model: nn.Module) -> nn.Module:
        return _layers(_tower(model))

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        config = _tower(model).config
        return (config.num_channels, config.image_size, config.image_size)

    def patch(self, model: nn.Module, reduction: Reduction) -> None:
        visual = _tower(model)
        config = visual.config
        layers = _layers(visual)
        if reduction.needs_qk:   # the attention hands q and k to the run; restored on unpatch
            visual._vtr_attn_implementation = config._attn_implementation
            visual.set_attn_implementation(f"vtr_{config._attn_implementation}")
        for index, layer in enumerate(layers):
            layer._vtr_layer, layer._vtr_num_layers = index, len(layers)
            layer._vtr_num_prefix = _num_prefix(visual)
            _attention(layer)._vtr_layer = index
            swap_class(layer, ReducingViTLayer if isinstance(layer, vit.ViTLayer) else ReducingClipLayer)
        head = getattr(visual, "head", None)
        if isinstance(head, siglip.SiglipMultiheadAttentionPoolingHead):
            swap_class(head, ReducingPoolingHead)
        projection = _projection(model)
        if projection is not None and visual is not model:
            visual.__dict__["_vtr_projection"] = projection   # not a submodule: see ReducingTower
        visual._vtr = reduction
        model._vtr = reduction    # the same object: the api reads the model's, the tower opens runs with its own
        swap_class(visual, ReducingTower)

    def unpatch(self, model: nn.Module) -> None:
        visual = _tower(model)
        restore_class(visual)
        for layer in _layers(visual):
            restore_class(layer)
            del layer._vtr_layer, layer._vtr_num_layers, layer._vtr_num_prefix
            del _attention(layer)._vtr_layer
        restore_class(getattr(visual, "head", None))
        visual.__dict__.pop("_vtr_projection", None)
        implementation = visual.__dict__.pop("_vtr_attn_implementation", None)
        if implementation is not None:
            visual.set_attn_implementation(implementation)
        del visual._vtr
        if visual is not model:
            del model._vtr
