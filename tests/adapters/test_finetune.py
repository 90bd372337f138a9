"""Fine-tuning a patched model (issue 12): learned reducers are part of the model, the unreduced teacher
runs the same weights (``vtr.disabled``), training-time reduction (``active="train"``), what trains
(``vtr.trainable``), the losses, and a CLIP contrastive step on reduced image tokens.

Models are tiny with random weights. Comparisons that must be exact compare two runs of one computation
(the patched model switched off against the unpatched model), so no float near-tie can decide them.
"""
from __future__ import annotations

import copy
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip import CLIP
from open_clip.transformer import VisionTransformer as OpenClipTower
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as hf_logging

import vtr
from vtr.tools.profile import count_macs

from conftest import call_state

hf_logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

LEARNED = ["dynamicvit", "sit"]
HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                 patch_size=4)


def timm_vit() -> nn.Module:
    """8x8 patches + CLS (65 tokens), 4 blocks of width 64."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, embed_dim=64, num_heads=4,
                             num_classes=10).eval()


def open_clip_tower() -> nn.Module:
    torch.manual_seed(0)
    return OpenClipTower(image_size=32, patch_size=4, width=32, layers=4, heads=4, mlp_ratio=2.0, output_dim=16).eval()


def hf_tower() -> nn.Module:
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**HF_VISION)).eval()
    model.set_attn_implementation("sdpa")
    return model


def open_clip_model() -> nn.Module:
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=4, width=32, head_width=8, layers=4, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=2)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def hf_clip_model() -> nn.Module:
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(vision_config=HF_VISION, text_config=text, projection_dim=16)).eval()
    model.set_attn_implementation("sdpa")
    return model


FAMILIES = {   # name -> (build, image size, the model's image output as one tensor)
    "timm": (timm_vit, 64, lambda m, x: m(x)),
    "open_clip": (open_clip_tower, 32, lambda m, x: m(x)),
    "hf_clip": (hf_tower, 32, lambda m, x: m(pixel_values=x).pooler_output),
    "open_clip_model": (open_clip_model, 32, lambda m, x: m.encode_image(x)),
    "hf_clip_model": (hf_clip_model, 32, lambda m, x: m.get_image_features(pixel_values=x).pooler_output),
}


def images(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = FAMILIES[family][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def output(family: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return FAMILIES[family][2](model, x)


def train_step(family: str, model: nn.Module, x: torch.Tensor, lr: float = 0.05) -> None:
    """One SGD step on a loss that every learned reducer's modules influence (keep-ratio for dynamicvit)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    with vtr.decisions(model) as kept:
        loss = output(family, model.train(), x).float().square().mean()
    if kept:
        loss = loss + vtr.losses.keep_ratio(kept)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()


# -- learned reducers are part of the model ---------------------------------------------------------

@pytest.mark.parametrize("method", LEARNED)
def test_learned_reducer_is_a_submodule_and_unpatch_removes_it(method):
    model = timm_vit()
    keys = list(model.state_dict())
    vtr.patch(model, method, keep=0.5)
    added = [k for k in model.state_dict() if k not in keys]
    assert added and all(k.startswith("_vtr_reducer.") for k in added)
    assert list(model.state_dict())[:len(keys)] == keys          # the model's own keys are untouched
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in model._vtr.reducer.parameters())
    model.double()                                                # .to() reaches the reducer
    assert all(p.dtype == torch.float64 for p in model._vtr_reducer.parameters())
    vtr.unpatch(model)
    assert list(model.state_dict()) == keys and not hasattr(model, "_vtr_reducer")


@pytest.mark.parametrize("method", LEARNED)
@pytest.mark.parametrize("family", ["timm", "open_clip_model", "hf_clip_model"])
def test_state_dict_round_trip_loads_strict_into_a_fresh_model_patched_the_same_way(family, method):
    build = FAMILIES[family][0]
    model = vtr.patch(build(), method, keep=0.5)
    train_step(family, model, images(family))                     # weights unlike any fresh model's
    x = images(family, seed=1)
    with torch.no_grad():
        expected = output(family, model, x)
    fresh = vtr.patch(build(), method, keep=0.5)
    with torch.no_grad():
        assert not torch.equal(output(family, fresh, x), expected)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(output(family, fresh, x), expected)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"_vtr_reducer\."):
        build().load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("family", ["timm", "open_clip", "hf_clip"])
@pytest.mark.parametrize("method,options", [("dynamicvit", {"init": "random"}), ("dynamicvit", {}), ("sit", {})],
                         ids=["dynamicvit-random", "dynamicvit-cls", "sit"])
def test_gradients_reach_every_learned_parameter(family, method, options):
    """In training mode, a loss on the output reaches every parameter of every learned module. From EViT's
    start (dynamicvit's default), whose output layer is zero, the layers before it get gradient from the
    second step on. Blocks 1 and 2 of 4: a step in the last block cannot change a CLS-pooled output
    (it reduces between that block's attention and its MLP)."""
    model = vtr.patch(FAMILIES[family][0](), method, keep=0.5, layers=[1, 2], **options)
    x = images(family)
    if method == "dynamicvit" and "init" not in options:
        train_step(family, model, x)
    model.zero_grad()
    with vtr.decisions(model) as kept:
        loss = output(family, model.train(), x).float().square().mean()
    assert call_state(model) == []                                  # the decisions live in `kept`, not on the model
    if method == "dynamicvit":
        assert len(kept) == len(model._vtr_reducer.predictors) == 2
        loss = loss + vtr.losses.keep_ratio(kept)
    loss.backward()
    missing = [name for name, p in model._vtr_reducer.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
    assert call_state(model) == []                                  # no graph left on the model


@pytest.mark.parametrize("method", LEARNED)
@pytest.mark.parametrize("depth,amount", [(3, {"flops": 0.7}), (4, {"flops": 0.7}), (4, {"flops": 0.5}),
                                          (4, {"keep": 0.5}), (6, {"flops": 0.5}), (12, {"flops": 0.5})])
def test_every_parameter_a_patch_adds_learns_at_the_default_layers(method, depth, amount):
    """Regression (issue 19): at its default layers, ``vit_tiny depth=4, flops=0.5`` put a dynamicvit
    stage in the last block, whose decisions reach nothing after it: its parameters never got a gradient.
    Now every parameter a patch adds gets a finite one, and every stage's module a non-zero one."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=depth, num_classes=5)   # the model at depth 4
    model = vtr.patch(model, method, **amount)
    modules = model._vtr_reducer.predictors if method == "dynamicvit" else model._vtr_reducer.slimmers
    assert modules and max(int(layer) for layer in modules) < depth - 1
    with vtr.decisions(model) as kept:
        loss = model.train()(torch.randn(2, 3, 224, 224)).logsumexp(-1).mean()
    (loss + (vtr.losses.keep_ratio(kept) if kept else 0)).backward()
    for name, p in model._vtr_reducer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer, module in modules.items():
        assert any(p.grad.abs().sum() > 0 for p in module.parameters()), f"block {layer}'s module learns nothing"


@pytest.mark.parametrize("method", LEARNED)
def test_a_learned_step_in_the_last_block_is_refused(method):
    with pytest.raises(ValueError, match=r"reduces at block 3, the model's last.*never learn"):
        vtr.patch(timm_vit(), method, keep=0.5, layers=[1, 3])
    with pytest.raises(ValueError, match=r"block 3, the model's last"):
        vtr.patch(timm_vit(), method, r=[0, 4, 0, 4])


@pytest.mark.parametrize("method", LEARNED)
@pytest.mark.parametrize("family", ["timm", "hf_clip"])
@pytest.mark.parametrize("target", [0.6, 0.5])
def test_eval_flops_land_within_2_percent_by_torch_flop_counter(family, method, target):
    """The schedule is solved on the analytic cost model with the learned modules' MACs; an independent count
    (torch's FlopCounterMode over a real eval pass, prediction modules included) lands within 2%."""
    build, _, _ = FAMILIES[family]
    x = images(family, batch=1)
    base = count_macs(build(), x).total
    model = vtr.patch(build(), method, flops=target)
    counted = count_macs(model, x).total
    assert counted / base == pytest.approx(target, rel=0.02)
    assert counted == pytest.approx(vtr.expected_flops(model)[0], rel=1e-6)


def test_reducer_only_training_leaves_the_backbone_and_unpatch_is_exact():
    model, pristine = timm_vit(), timm_vit()
    vtr.trainable(vtr.patch(model, "dynamicvit", keep=0.5), "reducer")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"_vtr_reducer.{n}" for n, _ in model._vtr_reducer.named_parameters()}
    before = copy.deepcopy(model._vtr_reducer.state_dict())
    for seed in range(2):
        train_step("timm", model, images("timm", seed=seed))
    assert any(not torch.equal(before[k], v) for k, v in model._vtr_reducer.state_dict().items())
    vtr.unpatch(model)
    x = images("timm", seed=5)
    with torch.no_grad():
        assert torch.equal(model(x), pristine(x))
    assert model.state_dict().keys() == pristine.state_dict().keys()


def test_trainable_all_and_bad_input():
    model = vtr.patch(timm_vit(), "sit", keep=0.5)
    vtr.trainable(model, "reducer")
    assert not model.cls_token.requires_grad
    assert vtr.trainable(model, "all") is model and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"which must be one of \('reducer', 'all'\).*got 'backbone'"):
        vtr.trainable(model, "backbone")
    with pytest.raises(ValueError, match="method 'tome' has no parameters to train"):
        vtr.trainable(vtr.patch(timm_vit(), "tome", r=4), "reducer")
    with pytest.raises(ValueError, match="model is not patched by vtr"):
        vtr.trainable(timm_vit(), "all")


# -- vtr.disabled: the unreduced teacher with the same weights ---------------------------------------

@pytest.mark.parametrize("method,amount", [("dynamicvit", {"keep": 0.5}), ("sit", {"keep": 0.5}),
                                           ("tome", {"r": 4}), ("evit", {"keep": 0.5, "metric": "keys"})])
@pytest.mark.parametrize("family", ["timm", "open_clip_model", "hf_clip_model"])
def test_disabled_equals_the_unpatched_model_bit_for_bit(family, method, amount):
    build = FAMILIES[family][0]
    x = images(family)
    reference = {}
    for mode in ("eval", "train"):
        with torch.no_grad():
            reference[mode] = output(family, getattr(build(), mode)(), x)
    model = vtr.patch(build(), method, **amount)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with vtr.disabled(model), torch.no_grad():
            assert torch.equal(output(family, model, x), reference[mode]), mode
        with torch.no_grad():
            assert not torch.equal(output(family, model, x), reference[mode]), mode   # outside: reduced again


def test_disabled_holds_for_the_calling_thread_only():
    model = vtr.patch(timm_vit(), "dynamicvit", keep=0.5)
    x = images("timm")
    seen = {}

    def other():
        with torch.no_grad():
            model(x)
        seen["tokens"] = vtr.report(model).tokens

    with vtr.disabled(model), torch.no_grad():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert torch.equal(model(x), timm_vit()(x))
    assert seen["tokens"][-1] < seen["tokens"][0]


@pytest.mark.parametrize("family", ["timm", "open_clip_model", "hf_clip_model"])
def test_report_after_a_disabled_call_says_it_ran_unreduced(family):
    """``vtr.report`` describes the last call (issue 26: after a call inside ``vtr.disabled`` it still gave
    the reduced call before it, as if it were the last): after an unreduced call it is an error saying
    so, and the next reduced call is reported again."""
    model = vtr.patch(FAMILIES[family][0](), "tome", r=6)
    x = images(family)
    with torch.no_grad():
        output(family, model, x)
        tokens = vtr.report(model).tokens
        assert tokens[-1] < tokens[0]
        with vtr.disabled(model):
            output(family, model, images(family, batch=3, seed=1))
            with pytest.raises(ValueError, match=r"ran unreduced \(inside vtr.disabled"):
                vtr.report(model)
        with pytest.raises(ValueError, match="ran unreduced"):
            vtr.report(model)
        output(family, model, x)
    assert vtr.report(model).tokens == tokens


# -- training-time reduction -------------------------------------------------------------------------

@pytest.mark.parametrize("method,amount", [("evit", {"keep": 0.5, "layers": [1]}), ("tome", {"r": 6}),
                                           ("sit", {"keep": 0.5})])
@pytest.mark.parametrize("family", ["timm", "open_clip_model", "hf_clip_model"])
def test_active_train_reduces_in_training_mode_only(family, method, amount):
    build = FAMILIES[family][0]
    x = images(family)
    with torch.no_grad():
        reference = output(family, build(), x)
    model = vtr.patch(build(), method, active="train", **amount)
    assert "active='train'" in model._vtr.describe()
    with torch.no_grad():
        assert torch.equal(output(family, model, x), reference)          # eval: the unreduced model
        output(family, model.train(), x)
    tokens = vtr.report(model).tokens
    assert tokens[-1] < tokens[0]                                        # train: reduced
    with torch.no_grad():
        assert torch.equal(output(family, model.eval(), x), reference)
    with pytest.raises(ValueError, match="ran unreduced"):              # the last call, not the one before
        vtr.report(model)


def test_active_must_be_a_known_mode():
    with pytest.raises(ValueError, match=r"active must be one of \('always', 'train'\).*got 'eval'"):
        vtr.patch(timm_vit(), "tome", r=4, active="eval")


@pytest.mark.parametrize("family", ["open_clip_model", "hf_clip_model"])
def test_clip_contrastive_step_runs_on_reduced_image_tokens(family):
    """A CLIP training step with attentive masking in training only (Attentive Mask CLIP): half the image
    tokens go at block 1, where the CLS attention has looked at the image; eval runs unreduced."""
    model = vtr.patch(FAMILIES[family][0](), "evit", keep=0.5, layers=[1], fuse="drop", active="train").train()
    x, text = images(family, batch=4), torch.randint(2, 60, (4, 8), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if family == "open_clip_model":
        image_features, text_features = model.encode_image(x), model.encode_text(text)
    else:
        image_features = model.get_image_features(pixel_values=x).pooler_output
        text_features = model.get_text_features(input_ids=text).pooler_output
    loss = vtr.losses.clip_contrastive(image_features, text_features, model.logit_scale)
    optimizer.zero_grad()
    loss.backward()
    assert torch.isfinite(loss) and model.logit_scale.grad is not None
    assert vtr.report(model).tokens == [65, 65, 33, 33, 33]
    optimizer.step()
    assert call_state(model) == []


# -- learned reducers where they are not supported ---------------------------------------------------

def test_learned_reducers_are_refused_on_llava_with_a_clear_error():
    from llava_models import tiny_llava
    with pytest.raises(ValueError, match=r"method 'sit' is a learned reducer, and the llava adapter does not take "
                                         r"learned reducers yet"):
        vtr.patch(tiny_llava(), "sit", budget=4)


# -- the losses, on known answers --------------------------------------------------------------------

def test_logit_distillation_is_zero_at_the_teacher_and_kl_otherwise():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    assert vtr.losses.logit_distillation(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.zeros(1, 3)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - torch.full((3,), 1 / 3).log())).sum()
    assert vtr.losses.logit_distillation(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    assert vtr.losses.logit_distillation(student, teacher, temperature=2.0).item() == pytest.approx(
        4 * F.kl_div((student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1), reduction="batchmean",
                     log_target=True).item(), rel=1e-5)
    with pytest.raises(ValueError, match="student and teacher logits must have one shape"):
        vtr.losses.logit_distillation(torch.zeros(1, 3), torch.zeros(1, 4))


def test_keep_ratio_is_the_mean_squared_gap_to_the_schedule():
    kept = [vtr.core.run.Decision(1, torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]), 0.5),
            vtr.core.run.Decision(2, torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), 0.25)]
    # step 1: rows keep 0.5 and 0.25 -> (0 + 0.0625) / 2; step 2: 0.25 and 0 -> (0 + 0.0625) / 2
    assert vtr.losses.keep_ratio(kept).item() == pytest.approx(0.03125)
    with pytest.raises(ValueError, match="decisions is empty"):
        vtr.losses.keep_ratio([])


def test_token_distillation_compares_each_token_with_the_mean_of_what_it_carries():
    teacher = torch.arange(5.0)[None, :, None].expand(1, 5, 2)          # token i has features (i, i)
    report = vtr.Report(tokens=[5, 3], assignment=torch.tensor([[0, 1, 1, 2, -1]]), size=torch.ones(1, 3),
                        num_protected=1)
    target = torch.tensor([[[0.0, 0.0], [1.5, 1.5], [3.0, 3.0]]])          # token 4 was dropped
    assert vtr.losses.token_distillation(target, teacher, report).item() == 0.0
    moved = target + torch.tensor([0.0, 0.0, 1.0])[None, :, None]          # the last token off by 1 per channel
    assert vtr.losses.token_distillation(moved, teacher, report).item() == pytest.approx(1 / 3)
    masked = vtr.Report(tokens=[5, 5], assignment=torch.arange(5)[None], size=torch.ones(1, 5), num_protected=1,
                        mask=torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]]))
    off = teacher + torch.tensor([0.0, 0.0, 5.0, 5.0, 0.0])[None, :, None]  # only masked tokens are off
    assert vtr.losses.token_distillation(off, teacher, masked).item() == 0.0


def test_clip_contrastive_is_symmetric_cross_entropy_of_scaled_cosines():
    image, text = torch.eye(3), torch.eye(3)
    scale = torch.tensor(0.0)                                             # exp(0) = 1
    logits = torch.eye(3)
    expected = F.cross_entropy(logits, torch.arange(3))
    assert vtr.losses.clip_contrastive(image, text, scale).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match=r"image and text must both be \[B, D\] embeddings"):
        vtr.losses.clip_contrastive(torch.zeros(2, 3), torch.zeros(3, 3), scale)


def test_disabled_and_active_train_on_llava_run_the_unpatched_model():
    from llava_models import generate, mixed_batch, tiny_llava
    ids, mask, pixels = mixed_batch()
    expected = generate(tiny_llava(), ids, mask, pixel_values=pixels)
    model = vtr.patch(tiny_llava(), "tome", budget=4)
    generate(model, ids, mask, pixel_values=pixels)
    with vtr.disabled(model):
        assert torch.equal(generate(model, ids, mask, pixel_values=pixels).sequences, expected.sequences)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        assert logits.shape[1] == ids.shape[1]                       # the whole prompt: nothing compacted
    with pytest.raises(ValueError, match="ran unreduced"):           # the report is of the last call
        vtr.report(model)
    generate(model, ids, mask, pixel_values=pixels)
    assert vtr.report(model).visual_tokens_after.tolist() == [8, 4, 0]
    trained = vtr.patch(tiny_llava(), "tome", budget=4, active="train")
    assert torch.equal(generate(trained, ids, mask, pixel_values=pixels).sequences, expected.sequences)
