"""transformers adapter (CLIP, SigLIP, ViT): exactness, unpatch, hidden states, FLOPs, save/load,
text conditioning and errors, on tiny random-weight models built from configs; a patched model
pickles, fires layer hooks with the reduced tokens, keeps no autograd state and serves concurrent
threads."""
import copy
import io
import json
import pickle
import threading

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

from conftest import probe, signal_probe

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


# -- what a patched model is: settings only, every call's state in its own run --------------------

def call_state(model: nn.Module) -> list:
    """Paths to what a forward pass could leave behind, reachable from any module's attributes (containers,
    objects, and the cells and defaults of functions such as hooks included): tensors other than parameters
    that require grad or carry a graph, and runs or token states."""
    found, seen = [], set()

    def walk(obj, path):
        if id(obj) in seen or isinstance(obj, (type, nn.Parameter, str, bytes, int, float, bool)) or obj is None:
            return
        seen.add(id(obj))
        if isinstance(obj, (runs.Run, vtr.TokenState)):
            found.append(path)
            return
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad or obj.grad_fn is not None:
                found.append(path)
            return
        if isinstance(obj, dict):
            items = list(obj.items())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = list(enumerate(obj))
        else:
            items = list(getattr(obj, "__dict__", {}).items())
            cells = getattr(obj, "__closure__", None) or ()
            items += [(f"<cell {i}>", cell.cell_contents) for i, cell in enumerate(cells)
                      if cell.cell_contents is not cell]
            for attribute in ("__self__", "__defaults__", "__kwdefaults__"):
                if getattr(obj, attribute, None) is not None:
                    items.append((attribute, getattr(obj, attribute)))
        for key, value in items:
            walk(value, f"{path}.{key}")

    for name, module in model.named_modules():
        walk(vars(module), name or "model")
    return found


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel", "ViTForImageClassification"])
def test_pickle_and_deepcopy_keep_the_model_patched(name):
    model = build(name)
    x = images()
    with torch.no_grad():
        reference = embeddings(model, x)
        vtr.patch(model, "tome", r=10, metric="keys")
        reduced = embeddings(model, x)
        tokens = vtr.report(model).tokens
        buffer = io.BytesIO()
        torch.save(model, buffer)
        copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
                  torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)]
        for twin in copies:
            assert vtr.is_patched(twin) and vtr.family(twin) == "hf_vision" and twin._vtr is tower(twin)._vtr
            if name == "CLIPModel":   # the tower maps tokens with the copy's own projection
                assert tower(twin).__dict__["_vtr_projection"] is twin.visual_projection
            assert torch.equal(embeddings(twin, x), reduced) and vtr.report(twin).tokens == tokens
            vtr.unpatch(twin)
            assert not any(isinstance(m, vtr.adapters.Swapped) for m in twin.modules())
            assert tower(twin).config._attn_implementation == "sdpa"
            assert torch.equal(embeddings(twin, x), reference)
        assert torch.equal(embeddings(model, x), reduced)          # the original is still patched


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel", "ViTModel"])
def test_layer_hooks_fire_once_with_the_reduced_tokens(name):
    model = build(name)
    vtr.patch(model, "tome", r=10, metric="keys")
    layers = tower(model).layers if name == "ViTModel" else tower(model).encoder.layers
    seen = []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda module, args, output, i=i: seen.append((i, args[0].shape[1],
                                                                                    output.shape[1])))
    with torch.no_grad():
        embeddings(model, images())
    tokens = vtr.report(model).tokens
    assert seen == [(i, tokens[i], tokens[i + 1]) for i in range(3)] and tokens[-1] < tokens[0]


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipVisionModel"])
def test_no_autograd_state_stays_on_the_model(name):
    model = build(name).train()
    vtr.patch(model, "tome", r=10, metric="keys")              # keys: q/k pass through the run
    embeddings(model, images()).sum().backward()
    assert vtr.report(model).tokens[-1] < vtr.report(model).tokens[0]
    assert all(p.grad is not None for p in tower(model).encoder.parameters())
    assert call_state(model) == []
    report = vtr.report(model)
    assert not report.size.requires_grad and report.size.grad_fn is None


def _each_alone_then_together(model, calls):
    """Each call's (output, tokens, assignment) alone, then from four threads at once, three times each."""
    def one(call):
        with torch.no_grad():   # grad mode is per thread
            output = call()
        report = vtr.report(model)
        return output, report.tokens, report.assignment

    alone = [one(call) for call in calls]
    barrier = threading.Barrier(len(calls))
    together = [[] for _ in calls]
    errors = []

    def worker(i):
        try:
            barrier.wait()
            for _ in range(3):
                together[i].append(one(calls[i]))
        except Exception as error:   # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for expected, results in zip(alone, together):
        for output, tokens, assignment in results:
            assert torch.equal(output, expected[0]) and tokens == expected[1]
            assert torch.equal(assignment, expected[2])
    return alone


@pytest.fixture
def one_intra_op_thread():
    """Bitwise comparisons across threads: one intra-op thread, so no op's reduction order depends on load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name,method", [("CLIPVisionModel", "evit"), ("SiglipVisionModel", "tome")])
def test_concurrent_threads_each_get_their_own_result(name, method, one_intra_op_thread):
    model = build(name)
    vtr.patch(model, method, keep=0.6, metric="keys")         # CLS attention / keys: q/k from the run
    inputs = [images(1 + i % 2, seed=10 + i) for i in range(4)]   # batches of 1 and 2: shapes differ too

    def call(x):
        return lambda: embeddings(model, x)

    alone = _each_alone_then_together(model, [call(x) for x in inputs])
    assert len({tuple(a[2].flatten().tolist()) for a in alone}) == 4


def test_concurrent_threads_each_get_their_own_query(one_intra_op_thread):
    model = build("CLIPModel")
    x = images(2)
    queries = [torch.randn(1, 3, 24, generator=torch.Generator().manual_seed(20 + i)) for i in range(4)]
    with probe():
        vtr.patch(model, "query_probe", keep=0.5, layers=[1])

        def call(query):
            def conditioned():
                with vtr.conditioned(model, query):
                    return embeddings(model, x)
            return conditioned

        alone = _each_alone_then_together(model, [call(q) for q in queries])
        assert len({tuple(a[2].flatten().tolist()) for a in alone}) > 1   # the queries keep different tokens
        assert runs.query_of(model._vtr) is None
        vtr.unpatch(model)
