"""Tiny random LLaVA models and prompts for the LLaVA adapter tests (CPU, well under a second each)."""
from __future__ import annotations

import torch

import vtr
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from conftest import reachable

IMAGE_TOKEN = 99
PAD = 0
IMAGE_TOKENS = 16   # (56 / 14)^2


def tiny_llava(attn: str = "sdpa", strategy: str = "default", seed: int = 0) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
    text = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=IMAGE_TOKENS + (strategy == "full"), vision_feature_layer=-2,
                         vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn)
    return model.eval()


def prompt_row(text_before: list[int], images: int, text_after: list[int], per_image: int = IMAGE_TOKENS) -> list[int]:
    return text_before + [IMAGE_TOKEN] * (per_image * images) + text_after


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def mixed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with two images, one image (longer text) and no image: kept counts differ per row."""
    rows = [
        prompt_row([1, 5], 2, [7, 8]),
        prompt_row([1, 5, 6, 9, 10, 11], 1, [7, 12, 13]),
        [1, 20, 21, 22, 23],
    ]
    ids, mask = left_padded(rows)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    return ids, mask, pixels


def text_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels on every text token but each row's first (padding, image tokens: -100), so the tokens right
    after an image are predicted from whatever visual token the reduced sequence holds before them."""
    first = mask.long().argmax(1, keepdim=True)
    ignored = (mask == 0) | (ids == IMAGE_TOKEN) | (torch.arange(ids.shape[1]) == first)
    return ids.masked_fill(ignored, -100)


def check_loss_on_kept_positions(model, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor,
                                 labels: torch.Tensor, trained: tuple):
    """The patched model's loss is the cross-entropy of its logits against the labels at the positions it
    kept (``vtr.report(model).kept_positions``), and it trains ``trained`` weights. Returns the output."""
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    kept = vtr.report(model).kept_positions
    assert out.logits.shape[:2] == kept.shape and kept.shape[1] < ids.shape[1]
    compact = labels.gather(1, kept.clamp_min(0)).masked_fill(kept < 0, -100)
    by_hand = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), compact[:, 1:].flatten())
    torch.testing.assert_close(out.loss, by_hand, atol=1e-6, rtol=0)
    out.loss.backward()
    for weights in trained(model):
        assert weights.grad is not None and bool(weights.grad.abs().sum() > 0)
    return out


# --- generation helpers shared by the LLaVA tests ------------------------------------------------

GENERATE = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, ids, mask, **kwargs):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, **GENERATE, **kwargs)


def logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)   # [B, steps, vocab]; step 0 is the prefill's last position


def assert_each_row_equals_it_alone(model, ids, mask, pixels, batched, images_per_row, sequences=True,
                                    image_sizes=None) -> None:
    """Every row of a left-padded batch gives what it gives alone (unpadded, with its own images): the
    logits of the prefill and of every decode step, and (``sequences``) the generated tokens.
    ``image_sizes``: LLaVA-NeXT's, one per image."""
    first = 0
    for row, count in enumerate(images_per_row):
        real = mask[row].bool()
        kwargs = {"pixel_values": pixels[first:first + count]} if count else {}
        if count and image_sizes is not None:
            kwargs["image_sizes"] = image_sizes[first:first + count]
        alone = generate(model, ids[row, real][None], mask[row, real][None], **kwargs)
        torch.testing.assert_close(logits(batched)[row], logits(alone)[0], atol=1e-5, rtol=0)
        if sequences:
            assert torch.equal(batched.sequences[row, ids.shape[1]:], alone.sequences[0, real.sum():])
        first += count


def causal(n: int) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)


def segment_reference(model, ids, pixels, stages, generated, **vision):
    """The unpatched layers, no cache, one unpadded row: each stage's layer onwards runs on that
    stage's kept prompt columns plus the generated tokens, each at its original position
    (``stages``: decoder layer -> kept prompt columns; ``vision``: e.g. LLaVA-NeXT's image_sizes)."""
    inner, language = model.model, model.model.language_model
    with torch.inference_mode():
        sequence = torch.cat([ids, generated[None]], dim=1)
        hidden = language.embed_tokens(sequence)
        features = inner.get_image_features(pixel_values=pixels, **vision).pooler_output
        hidden[sequence == IMAGE_TOKEN] = torch.cat(list(features))
        new = torch.arange(ids.shape[1], sequence.shape[1])
        present = torch.arange(sequence.shape[1])          # prompt column of each row of `hidden`
        for index, decoder in enumerate(language.layers):
            if index in stages:
                wanted = torch.cat([stages[index], new])
                hidden, present = hidden[:, torch.searchsorted(present, wanted)], wanted
            hidden = decoder(hidden, attention_mask=causal(hidden.shape[1]), position_ids=present[None],
                             position_embeddings=language.rotary_emb(hidden, present[None]))
        return model.lm_head(language.norm(hidden[:, -1]))


class FeatureCapture:
    """Records the image features the language model really receives (mm_encoder_outputs) and the prefill's
    position ids (None: numbered by generate() from the mask)."""

    def __init__(self, model):
        self.features = self.position_ids = None
        self.handle = model.model.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs):
        outputs = kwargs.get("mm_encoder_outputs") or {}
        if outputs.get("image") is not None and self.features is None:
            self.features = [f.clone() for f in outputs["image"].pooler_output]
            position_ids = kwargs.get("position_ids")
            self.position_ids = None if position_ids is None else position_ids.clone()

    def alone(self, row: int, columns):
        """generate() keywords that give row ``row`` alone (its real ``columns``) the positions it had in the batch."""
        if self.position_ids is None:
            return {}
        return {"position_ids": self.position_ids[row, columns >= 0][None]}

    def remove(self):
        self.handle.remove()


def pooled(features):
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    return BaseModelOutputWithPooling(pooler_output=list(features))


# --- what a model holds ----------------------------------------------------------------------------

def held_tensors(model) -> dict:
    """The tensors ``model`` keeps alive, by id (parameters, buffers and any other; walker: conftest.reachable)."""
    return {id(obj): obj for obj, _ in reachable(model) if isinstance(obj, torch.Tensor)}
