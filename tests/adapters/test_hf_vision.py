"""transformers adapter (CLIP, SigLIP, ViT): exactness, unpatch, hidden states, FLOPs, save/load,
text conditioning and errors, on tiny random-weight models built from configs.

What a patched model is as a PyTorch model (threads, a thread's own query, no autograd state, layer
hooks, pickle / deepcopy): tests/adapters/test_ordinary_model.py."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from transformers import (CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel,
                          CLIPVisionModelWithProjection, SiglipConfig, SiglipForImageClassification, SiglipModel,
                          SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTForImageClassification, ViTModel)
from transformers.utils import logging as hf_logging

import vtr
from vtr.adapters import hf_vision
from vtr.core import run as runs
from vtr.tools.profile import count_macs

from conftest import (assert_kept_top_k_by_projected_cosine, check_text_conditioning, float64_projection, kept_positions,
                      probe, signal_probe, spy_steps)

hf_logging.set_verbosity_error()
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=4)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
BUILDERS = {
    "CLIPVisionModel": lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)),
    "CLIPVisionModelWithProjection": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION,
                                                                                              projection_dim=24)),
    "CLIPModel": lambda: CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=24)),
    "SiglipVisionModel": lambda: SiglipVisionModel(SiglipVisionConfig(**VISION)),
    "SiglipModel": lambda: SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)),
    "ViTModel": lambda: ViTModel(ViTConfig(**VISION)),
    "ViTForImageClassification": lambda: ViTForImageClassification(ViTConfig(**VISION, num_labels=5)),
}


def build(name: str, implementation: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    model.set_attn_implementation(implementation)
    return model


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tower(model):
    """The image tower: ``vision_model`` (CLIP/SigLIP), ``vit`` (ViT classifier) or the model itself."""
    for attribute in ("vision_model", "vit"):
        if isinstance(getattr(model, attribute, None), nn.Module):
            return getattr(model, attribute)
    return model


def tower_output(model, x, **kwargs):
    """The image tower's full output (hidden states included) whatever the model kind."""
    return tower(model)(pixel_values=x, output_hidden_states=True, **kwargs)


def embeddings(model, x):
    return vtr.clip.image_features(model, x) if not hasattr(model, "classifier") else model(pixel_values=x).logits


def text_ids(batch, seed=2):
    return torch.randint(2, 64, (batch, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_exact_at_zero_reduction(name, implementation):
    model = build(name, implementation)
    x = images()
    with torch.no_grad():
        reference, ref_out = embeddings(model, x), tower_output(model, x)
        for metric in ("x", "keys"):           # "keys" switches the tower to the vtr_ attention function
            vtr.patch(model, "none", metric=metric)
            out = tower_output(model, x)
            assert torch.equal(embeddings(model, x), reference)
            assert torch.equal(out.last_hidden_state, ref_out.last_hidden_state)
            assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref_out.hidden_states))
            vtr.unpatch(model)
        assert tower(model).config._attn_implementation == implementation
        assert torch.equal(embeddings(model, x), reference)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel", "ViTModel"])
def test_reduced_hidden_states_and_unpatch(name):
    model = build(name)
    x = images()
    keys = list(model.state_dict())
    with torch.no_grad():
        reference = embeddings(model, x)
        vtr.patch(model, "tome", r=10, metric="keys")
        assert list(model.state_dict()) == keys
        out = tower_output(model, x)
        tokens = vtr.report(model).tokens
        first = 64 + (name != "SiglipVisionModel")
        assert tokens == [first, first - 10, first - 20, first - 30]
        # hidden_states: the embeddings, then each layer's output with its reduced token count
        assert [h.shape[1] for h in out.hidden_states] == tokens
        assert out.last_hidden_state.shape[1] == tokens[-1]
        as_tuple = tower(model)(pixel_values=x, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
        assert not torch.allclose(embeddings(model, x), reference)
        vtr.unpatch(model)
        assert not any(isinstance(m, vtr.adapters.Swapped) for m in model.modules())
        assert not any(k.startswith("_vtr") for m in model.modules() for k in vars(m))
        assert torch.equal(embeddings(model, x), reference)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel", "ViTModel"])
@pytest.mark.parametrize("method,target", [("tome", 0.5), ("pitome", 0.6), ("random", 0.4)])
def test_flops_target(name, method, target):
    model = build(name)
    x = images(1)
    fn = lambda pixels: embeddings(model, pixels)  # noqa: E731
    wrapped = _Call(fn)
    base = count_macs(wrapped, x).per_image
    assert base == pytest.approx(hf_vision.HfVision().cost(model).unreduced(), rel=1e-6)
    vtr.patch(model, method, flops=target)
    counted = count_macs(wrapped, x).per_image
    assert abs(counted / base - target) < 0.02
    assert counted == pytest.approx(vtr.expected_flops(model)[0], rel=1e-6)


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=8), seed=st.integers(0, 2**16),
       implementation=st.sampled_from(["sdpa", "eager"]))
def test_proportional_attention_equals_attention_over_copies(sizes, seed, implementation):
    """A token of size s attends like s copies of itself, in the layers and in SigLIP's pooling head."""
    model = _SIGLIP[implementation]
    h = torch.randn(1, len(sizes), 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    size = torch.tensor([sizes], dtype=torch.float64)
    copies = h.repeat_interleave(size[0].long(), dim=1)
    first = torch.cumsum(size[0].long(), 0) - size[0].long()
    attention = model.encoder.layers[0].self_attn
    with torch.no_grad():
        merged = attention(h, attention_mask=size.log()[:, None, None])[0]
        expanded = attention(copies)[0]
        # eager attention takes its softmax in float32 even for float64 inputs
        assert torch.allclose(merged, expanded[:, first], atol=1e-10 if implementation == "sdpa" else 1e-5)
        head = model.head
        probe_ = head.probe.repeat(1, 1, 1)
        pooled = head.attention(probe_, h, h, key_padding_mask=size.log())[0]
        assert torch.allclose(pooled, head.attention(probe_, copies, copies)[0], atol=1e-10)


_SIGLIP = {impl: build("SiglipVisionModel", impl).double() for impl in ("sdpa", "eager")}


def test_siglip_pooling_head_is_size_weighted():
    """Tokens merged from equal tokens pool to what the unmerged tokens pool to."""
    model = build("SiglipVisionModel")
    vtr.patch(model, "none")
    state = vtr.TokenState.start(torch.randn(1, 2, 32).repeat_interleave(torch.tensor([1, 3]), dim=1), 0)
    merged = state.reduce(torch.tensor([[0, 1, 1, 1]]), 2)
    with torch.no_grad():
        with runs.opened(model._vtr) as run:       # the pass's run, ending with these tokens
            run.begin(merged, 0)
            pooled = model.head(merged.x)
        with runs.opened(model._vtr) as run:
            run.begin(state, 0)
            unmerged = model.head(state.x)
    vtr.unpatch(model)
    assert torch.allclose(pooled, unmerged, atol=1e-6)


def test_save_and_load_a_patched_model(tmp_path):
    model = build("CLIPModel")
    x = images()
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=x).pooler_output
        original = {k: v.clone() for k, v in model.state_dict().items()}
        vtr.patch(model, "tome", flops=0.5, metric="keys")
        reduced = model.get_image_features(pixel_values=x).pooler_output
        model.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        assert config["architectures"] == ["CLIPModel"] and "vtr" not in json.dumps(config)
        loaded = CLIPModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
        assert torch.equal(loaded.get_image_features(pixel_values=x).pooler_output, reference)
        assert torch.equal(model.get_image_features(pixel_values=x).pooler_output, reduced)   # still patched
        vtr.patch(loaded, "tome", flops=0.5, metric="keys")
        assert torch.allclose(loaded.get_image_features(pixel_values=x).pooler_output, reduced, atol=1e-6)


def test_image_text_similarity_with_reduced_tower():
    model = build("CLIPModel")
    x, ids = images(3), text_ids(4)
    with torch.no_grad():
        text_before = model.get_text_features(input_ids=ids).pooler_output
        vtr.patch(model, "pitome", flops=0.6)
        out = model(input_ids=ids, pixel_values=x)
        assert vtr.report(model).tokens[-1] < vtr.report(model).tokens[0]
        assert torch.allclose(out.text_embeds, nn.functional.normalize(text_before, dim=-1), atol=1e-6)
        assert torch.allclose(out.logits_per_image, vtr.clip.zero_shot(model, x, text_before, condition=False),
                              atol=1e-5)


@pytest.mark.parametrize("name,width", [("CLIPModel", 24), ("SiglipModel", 32), ("ViTModel", 32)])
def test_batched_conditioning_with_a_query_per_image(name, width):
    model = build(name)
    x = images(2)
    queries = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(5))   # 3 query tokens per image
    with probe() as reducer, torch.no_grad():
        vtr.patch(model, "query_probe", keep=0.5, layers=[1])
        with vtr.conditioned(model, queries):
            batched = embeddings(model, x)
            assignment = vtr.report(model).assignment
        seen = reducer.seen[-1]
        assert torch.equal(seen.query, queries)
        assert seen.query_projection(torch.randn(2, 5, 32)).shape == (2, 5, width)
        for row in range(2):
            with vtr.conditioned(model, queries[row:row + 1]):
                alone = embeddings(model, x[row:row + 1])
            assert torch.allclose(alone[0], batched[row], atol=1e-5)
            assert torch.equal(vtr.report(model).assignment[0], assignment[row])
        with vtr.conditioned(model, queries.flip(0)):
            embeddings(model, x)
        assert not torch.equal(vtr.report(model).assignment, assignment)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_token_projection_is_the_pooled_embedding(name):
    """query_projection maps a token to the embedding it gives as the pooled token."""
    model = build(name)
    vtr.patch(model, "none")
    visual = tower(model)
    seen = []
    visual.encoder.layers[-1].register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        features = vtr.clip.image_features(model, images())
        final = seen[0]
        projected = visual.project_tokens(final)
    vtr.unpatch(model)
    if name == "CLIPModel":
        assert torch.allclose(projected[:, 0], features, atol=1e-6)
    else:   # SigLIP's head attending to a single token j gives exactly that token's projection
        visual = model.vision_model
        with torch.no_grad():
            one = visual.head(visual.post_layernorm(final[:, 5:6]))
        assert torch.allclose(projected[:, 5], one, atol=1e-6)


def test_zero_shot_with_siglip():
    model = build("SiglipModel")
    with probe() as reducer, torch.no_grad():
        classes = model.get_text_features(input_ids=text_ids(4)).pooler_output
        vtr.patch(model, "query_probe", keep=0.5)
        logits = vtr.clip.zero_shot(model, images(2), classes)
        assert logits.shape == (2, 4)
        assert reducer.seen[0].query.shape == (2, 4, 32)
        assert runs.query_of(model._vtr) is None                         # the condition ends with the call
    vtr.unpatch(model)


def test_bad_inputs_have_clear_errors():
    text = CLIPTextModel(CLIPConfig(text_config=TEXT).text_config)
    with pytest.raises(vtr.UnsupportedModelError, match="text model"):
        vtr.patch(text, "tome", r=2)
    with pytest.raises(vtr.UnsupportedModelError, match="does not support SiglipForImageClassification"):
        vtr.patch(SiglipForImageClassification(SiglipConfig(vision_config=VISION, text_config=TEXT)), "tome", r=2)
    model = build("CLIPModel")
    model.vision_model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(vtr.UnsupportedModelError, match="attn_implementation='flash_attention_2'"):
        vtr.patch(model, "tome", r=2)
    model = build("CLIPModel")
    with probe():
        vtr.patch(model, "query_probe", keep=0.5)
        with pytest.raises(ValueError, match="query width must be 24"):
            with vtr.clip.text_query(model, torch.randn(32)):
                vtr.clip.image_features(model, images())
        vtr.unpatch(model)
    vit = build("ViTModel")
    vtr.patch(vit, "tome", r=2)
    with pytest.raises(ValueError, match="attention_mask"):
        vit(pixel_values=images(), attention_mask=torch.arange(65).expand(2, 65) < 60)


@pytest.mark.parametrize("name", ["CLIPVisionModel", "ViTModel", "SiglipVisionModel"])
def test_cls_attention_is_row_zero_of_the_full_attention(name):
    """Under sdpa the reducer gets the CLS row the eager attention would return (SigLIP: no CLS)."""
    model = build(name, "eager")
    x = images()
    with torch.no_grad():
        full = tower(model)(pixel_values=x, output_attentions=True).attentions[1]   # layer 1, eager
        model.set_attn_implementation("sdpa")
        with signal_probe() as reducer:
            vtr.patch(model, "signal_probe", r=4, layers=[1])
            model(pixel_values=x)
            vtr.unpatch(model)
            seen = reducer.seen[0]
    assert model.config._attn_implementation == "sdpa"
    if name == "SiglipVisionModel":
        assert seen.cls_attention is None
    else:
        assert torch.allclose(seen.cls_attention, full.mean(1)[:, 0], atol=1e-6)
    assert seen.layer == 1 and seen.grid == (8, 8)


# -- the real "query" reducer: tokens reach the text's space through the tower's projection -------

def output_projection(model) -> torch.Tensor:
    """The last linear map from tokens to the embedding: CLIP's visual_projection, SigLIP's head out_proj."""
    return (model.visual_projection if hasattr(model, "visual_projection")
            else model.vision_model.head.attention.out_proj).weight


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_query_reducer_conditions_on_text_through_the_towers_projection(name):
    """CLIP: a 32-wide tower, a 24-wide embedding (as in every real CLIP); SigLIP: its head maps tokens
    (same width, other space). Zero-shot and text_query run the real reducer, whose kept tokens follow
    the text and the tower's projection."""
    model = build(name)
    x = images(2)
    with torch.no_grad():
        classes = model.get_text_features(input_ids=text_ids(5, seed=4)).pooler_output
        texts = model.get_text_features(input_ids=text_ids(2, seed=7)).pooler_output
        if name == "CLIPModel":
            assert model.config.vision_config.hidden_size != classes.shape[-1]
        vtr.patch(model, "query", keep=0.5)
        check_text_conditioning(model, x, classes, texts, classes.shape[-1], output_projection(model))
    vtr.unpatch(model)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_query_reducer_keeps_the_patches_closest_to_the_text(name):
    """(d) Queries made of the projected features of some object patches at the reducing layer: those
    patches are kept, and the kept set is exactly the float64 top-k by projected cosine, with a margin.
    The budget keeps as many patches as the object has, so the k-th boundary is object / background."""
    model = build(name)
    x = images(2)
    protected = 1 if name == "CLIPModel" else 0                               # SigLIP has no CLS token
    patches = [[8, 9, 10, 16, 17, 18, 24, 26], [39, 40, 47, 48, 49, 55, 56, 59]]
    objects = [[protected + p for p in cells] for cells in patches]
    with torch.no_grad():
        vtr.patch(model, "query", keep=8 / 64, layers=[1], relevance_weight=1.0, fuse="drop")
        seen = spy_steps(model)
        vtr.clip.image_features(model, x)                                     # no query: the layer-1 tokens
        tokens = seen[-1][0]
        query = torch.stack([tower(model).project_tokens(tokens[row, cells]) for row, cells in enumerate(objects)])
        with vtr.clip.text_query(model, query, per_image=True):               # [2, 8, D]
            vtr.clip.image_features(model, x)
        kept = kept_positions(model)
        again, signals = seen[-1]
        assert torch.equal(again, tokens) and signals.query_projection is not None
        for row, cells in enumerate(objects):
            assert kept[row] == list(range(protected)) + cells
        assert_kept_top_k_by_projected_cosine(kept, tokens, query, float64_projection(model, tower), protected)
    vtr.unpatch(model)
