"""LLaVA-1.5-shaped model (random weights), CPU: vision, prefill and decode time per method and budget.

Widths are LLaVA-1.5-7B's (CLIP ViT-L/14 at 336 px: 576 visual tokens; Llama-7B: hidden 4096,
32 heads, MLP 11008), depth is scaled down to fit this machine (``--vision-layers``, ``--lm-layers``).
Reported separately, per batch of ``--batch`` prompts (each one image + ``--text`` text tokens):

- vision: vision tower + projector + the reducer (before-LLM methods), seconds;
- prefill: the language model on the prompt it really sees, seconds, and its speed-up;
- MACs: analytic language-model prefill MACs (vtr.report), the ratio to the unreduced prompt and, in
  brackets, its inverse, which bounds the prefill speed-up: with V visual tokens, b kept and T text tokens it is about
  (V + T) / (b + T), e.g. 5.9x for 576 -> 64 with 40 text tokens, 7.1x with 20;
- decode: milliseconds per generated token (the KV cache is as short as the kept prompt).

    python benchmarks/bench_llava.py                       # budgets 192,128,64; tome, pitome, random, fastv
    python benchmarks/bench_llava.py --budgets 64 --methods fastv --in-llm-layer 1 --lm-layers 2
    python benchmarks/bench_llava.py --budgets 64 --methods tome --text 20 --batch 4
    python benchmarks/bench_llava.py --next --budgets 640,320 --methods tome   # LLaVA-NeXT: 2928 visual tokens
"""
from __future__ import annotations

import argparse

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration)

import vtr
from vtr.adapters.llava import before_lm

from interleaved import HEADER, interleaved, row, timed

IMAGE_TOKEN = 32000


def llava_shaped(vision_layers: int, lm_layers: int, next_: bool = False):
    """LLaVA-1.5-7B widths (or LLaVA-NeXT-7B's: the same towers plus AnyRes crops of 336 px)."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers,
                       num_attention_heads=32, num_key_value_heads=32, pad_token_id=0)
    common = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    torch.manual_seed(0)
    if next_:
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, image_seq_length=576, **common)
        return LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    config = LlavaConfig(image_seq_length=576, **common)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


@torch.inference_mode()
def measure(model, ids, pixels, decode_tokens: int, vision_kwargs: dict) -> dict:
    """One timing of each part for the model as it is now (patched or not)."""
    mask, batch = torch.ones_like(ids), ids.shape[0]
    patched = vtr.is_patched(model)
    in_llm = patched and vtr.adapters.settings(model).arguments.get("layers") is not None
    if not patched or in_llm:
        vision = timed(lambda: model.model.get_image_features(pixel_values=pixels, return_dict=True, **vision_kwargs))
        image = model.model.get_image_features(pixel_values=pixels, return_dict=True, **vision_kwargs)
        prompt, prompt_mask = ids, mask
    else:  # vision tower + reducer + compaction: what the patched model does before its language model
        vision = timed(lambda: before_lm.prepare(model, ids, mask, pixels, left=True, **vision_kwargs))
        prepared = before_lm.prepare(model, ids, mask, pixels, left=True, **vision_kwargs)
        prompt, prompt_mask, image = prepared.input_ids, prepared.attention_mask, prepared.image_outputs
    inputs = dict(input_ids=prompt, attention_mask=prompt_mask, mm_encoder_outputs={"image": image},
                  logits_to_keep=1, use_cache=True)
    prefill = timed(lambda: model(**inputs))

    # Decode: prefill once, then single-token steps on the cache that prefill left (in-LLM pruning: each
    # step continues the pruning the prefill made on that cache).
    out = model(**inputs)
    cache, token, length = out.cache, out.logits[:, -1].argmax(-1, keepdim=True), prompt.shape[1]
    start = benchmark.timer()
    for step in range(decode_tokens):
        out = model(input_ids=token, cache=cache, attention_mask=torch.ones(batch, length + step + 1, dtype=torch.long),
                    position_ids=torch.full((batch, 1), length + step), use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    result = {"vision": vision, "prefill": prefill, "decode_ms": 1000 * (benchmark.timer() - start) / decode_tokens}
    if patched:
        report = vtr.report(model)
        result.update(macs=float(report.prefill_macs.sum()), macs_unreduced=float(report.prefill_macs_unreduced.sum()),
                      kept=int(report.visual_tokens_after[0]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--methods", default="tome,pitome,random,fastv")
    parser.add_argument("--in-llm-layer", type=int, default=None, help="also run fastv inside the LM at this layer")
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--text", type=int, default=40, help="text tokens around the image")
    parser.add_argument("--batch", type=int, default=1, help="prompts per batch (same prompt, different images)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--next", action="store_true", help="LLaVA-NeXT-shaped: AnyRes 2x2 crops of a 672x672 image")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = llava_shaped(args.vision_layers, args.lm_layers, args.next)
    generator = torch.Generator().manual_seed(0)
    if args.next:   # the base image plus 4 crops; the model says how many tokens that packs into
        pixels = torch.randn(args.batch, 5, 3, 336, 336, generator=generator)
        vision_kwargs = {"image_sizes": torch.tensor([[672, 672]] * args.batch)}
        with torch.inference_mode():
            visual = len(model.model.get_image_features(pixels[:1], vision_kwargs["image_sizes"][:1]).pooler_output[0])
    else:
        pixels, vision_kwargs, visual = torch.randn(args.batch, 3, 336, 336, generator=generator), {}, 576
    half = args.text // 2
    text_after = list(range(100, 100 + args.text - half))
    ids = torch.tensor([[1] + list(range(2, 2 + half)) + [IMAGE_TOKEN] * visual + text_after] * args.batch)

    measure(model, ids, pixels, 1, vision_kwargs)  # warm-up
    print(f"LLaVA-{'NeXT' if args.next else '1.5'}-shaped, vision {args.vision_layers} / LM {args.lm_layers} layers, "
          f"{ids.shape[1]} prompt tokens ({visual} visual) x batch {args.batch}, CPU threads {torch.get_num_threads()}, median of {args.repeats} interleaved rounds")
    print(HEADER)
    runs = [(m, b, None) for b in map(int, args.budgets.split(",")) for m in args.methods.split(",")]
    if args.in_llm_layer is not None:
        runs += [("fastv", b, [args.in_llm_layer]) for b in map(int, args.budgets.split(","))]
    for method, budget, layers in runs:
        patch = {"method": method, "budget": budget} | ({"layers": layers} if layers else {})
        base, r = interleaved(model, lambda m: measure(m, ids, pixels, args.decode_tokens, vision_kwargs),
                              args.repeats, **patch)
        print(row(method, "LM layer " + str(layers[0]) if layers else "before LM", base, r), flush=True)


if __name__ == "__main__":
    main()
