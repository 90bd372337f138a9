"""Qwen2.5-VL-shaped model (random weights), CPU: LM prefill speed-up and analytic MACs at 25% and 10% of the
visual tokens, for an image and for a 32-frame video, each beside its analytic bound.

Widths are Qwen2.5-VL-7B's (vision: hidden 1280, 16 heads, windows of 112 px, merger to 3584; language
model: hidden 3584, 28 heads, 4 KV heads, MLP 18944, M-RoPE), depth scaled down to fit this machine
(``--vision-layers``, ``--lm-layers``) and the vocabulary trimmed to 32000 (only the last position's head
runs at prefill). Per batch of ``--batch`` prompts (each one image or video + ``--text`` text tokens):

- vision: vision tower + merger, plus (reduced) the reducer, prompt compaction and M-RoPE positions, seconds;
- LM prefill MACs: the reduced/unreduced ratio of vtr's analytic count and, in brackets, its inverse: the
  most the prefill can speed up (with V visual tokens, b kept and T text tokens, about (V + T) / (b + T));
- prefill: the language model on the prompt it really sees, seconds, and its speed-up;
- decode: milliseconds per generated token (the KV cache is as short as the kept prompt).

    python benchmarks/bench_vlm.py                          # image 448x448 (256 tokens) and 32-frame video
    python benchmarks/bench_vlm.py --inputs video --methods tome --frames novelty
    python benchmarks/bench_vlm.py --inputs image --fractions 0.25 --methods fastv --in-llm-layer 1
"""
from __future__ import annotations

import argparse

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import vtr
from vtr.adapters.qwen_vl import before_lm

from interleaved import HEADER, interleaved, row, timed

IMAGE, VIDEO, START, END = 31990, 31991, 31992, 31993
PATCH, MERGE, TEMPORAL = 14, 2, 2


def qwen_shaped(vision_layers: int, lm_layers: int) -> Qwen2_5_VLForConditionalGeneration:
    vision = dict(depth=vision_layers, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=112,
                  fullatt_block_indexes=[vision_layers - 1])
    text = dict(vocab_size=32000, hidden_size=3584, intermediate_size=18944, num_hidden_layers=lm_layers,
                num_attention_heads=28, num_key_value_heads=4, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                              vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def prompt(kind: str, grid: tuple, text: int, batch: int) -> dict:
    """``batch`` copies of one prompt: text, the image or video, text; with random pixels of ``grid`` (t, h, w)."""
    t, h, w = grid
    visual = t * (h // MERGE) * (w // MERGE)
    half = text // 2
    row = ([1] + list(range(2, 2 + half)) + [START] + [IMAGE if kind == "image" else VIDEO] * visual + [END]
           + list(range(100, 100 + text - half - 3)))
    ids = torch.tensor([row] * batch)
    pixels = torch.randn(batch * t * h * w, 3 * TEMPORAL * PATCH * PATCH, generator=torch.Generator().manual_seed(0))
    key = "pixel_values" if kind == "image" else "pixel_values_videos"
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long(),
            key: pixels, f"{kind}_grid_thw": torch.tensor([grid] * batch)}


@torch.inference_mode()
def measure(model, inputs: dict, decode_tokens: int) -> dict:
    """One timing of each part for the model as it is now (patched or not)."""
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    vision_inputs = {k: v for k, v in inputs.items() if k.startswith(("pixel", "image_grid", "video_grid"))}
    patched = vtr.is_patched(model)
    if not patched or vtr.adapters.settings(model).arguments.get("layers") is not None:
        def encode() -> dict:
            outputs = {}
            if "pixel_values" in vision_inputs:
                outputs["image"] = model.model.get_image_features(vision_inputs["pixel_values"],
                                                                  vision_inputs["image_grid_thw"], return_dict=True)
            if "pixel_values_videos" in vision_inputs:
                outputs["video"] = model.model.get_video_features(vision_inputs["pixel_values_videos"],
                                                                  vision_inputs["video_grid_thw"], return_dict=True)
            return outputs
        vision, outputs = timed(encode), encode()
        positions, _ = model.model.get_rope_index(ids, types, image_grid_thw=inputs.get("image_grid_thw"),
                                                  video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)
        text = torch.arange(ids.shape[1]).expand_as(ids)
        prompt_ids, prompt_mask, position_ids = ids, mask, torch.cat([text[None], positions])
    else:   # vision tower + reducer + compaction + positions: what the patched model does before its language model
        prepare = lambda: before_lm.prepare(model, ids, mask, types, None, left=True, **vision_inputs)  # noqa: E731
        vision, prepared = timed(prepare), prepare()
        prompt_ids, prompt_mask, position_ids = prepared.input_ids, prepared.attention_mask, prepared.position_ids
        outputs, types = prepared.encoder_outputs, prepared.mm_token_type_ids
    model_inputs = dict(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids,
                        mm_token_type_ids=types, mm_encoder_outputs=outputs, logits_to_keep=1, use_cache=True)
    prefill = timed(lambda: model(**model_inputs))

    # Decode: prefill once, then single-token steps on its cache, each one past the prompt's last position.
    out = model(**model_inputs)
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    batch, length, last = prompt_ids.shape[0], prompt_ids.shape[1], position_ids.amax(dim=(0, 2))
    timings = []
    for step in range(decode_tokens):
        step_positions = (last + 1 + step).view(1, batch, 1).expand(4, -1, -1)
        timings.append(timed(lambda: model(input_ids=token, cache=cache, use_cache=True, position_ids=step_positions,
                                           attention_mask=torch.ones(batch, length + step + 1, dtype=torch.long))))
    result = {"vision": vision, "prefill": prefill, "decode_ms": 1000 * sum(timings) / max(decode_tokens, 1)}
    if patched:
        report = vtr.report(model)
        result.update(macs=float(report.prefill_macs.sum()), macs_unreduced=float(report.prefill_macs_unreduced.sum()),
                      kept=int(report.image_tokens_after[0]) if report.image_tokens_after is not None else 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", default="image,video", help="image, video or both")
    parser.add_argument("--fractions", default="0.25,0.1", help="fractions of the visual tokens kept")
    parser.add_argument("--methods", default="tome,fastv")
    parser.add_argument("--frames", default="uniform", help="a video's budget split: uniform, novelty, relevance")
    parser.add_argument("--in-llm-layer", type=int, default=None, help="also run fastv inside the LM at this layer")
    parser.add_argument("--image-size", type=int, default=448, help="square image side, a multiple of 28")
    parser.add_argument("--video-frames", type=int, default=32)
    parser.add_argument("--frame-size", type=int, default=224, help="square frame side, a multiple of 28")
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--text", type=int, default=40, help="text tokens around the image or video")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = qwen_shaped(args.vision_layers, args.lm_layers)
    cases = {"image": (1, args.image_size // PATCH, args.image_size // PATCH),
             "video": (args.video_frames // TEMPORAL, args.frame_size // PATCH, args.frame_size // PATCH)}
    for kind in args.inputs.split(","):
        grid = cases[kind]
        inputs = prompt(kind, grid, args.text, args.batch)
        visual = grid[0] * (grid[1] // MERGE) * (grid[2] // MERGE)
        measure(model, inputs, 1)   # warm-up
        what = (f"a {args.image_size}x{args.image_size} image" if kind == "image" else
                f"a {args.video_frames}-frame video of {args.frame_size}x{args.frame_size} ({grid[0]} temporal patches)")
        print(f"\nQwen2.5-VL-7B-shaped, vision {args.vision_layers} / LM {args.lm_layers} layers, {what}: "
              f"{inputs['input_ids'].shape[1]} prompt tokens ({visual} visual) x batch {args.batch}, "
              f"CPU threads {torch.get_num_threads()}, median of {args.repeats} interleaved rounds")
        print(HEADER)
        runs = [(m, round(f * visual), f, None) for f in map(float, args.fractions.split(","))
                for m in args.methods.split(",")]
        if args.in_llm_layer is not None:
            runs += [("fastv", round(f * visual), f, [args.in_llm_layer]) for f in map(float, args.fractions.split(","))]
        for method, budget, fraction, layers in runs:
            patch = {"method": method, "budget": budget}
            if layers:
                patch["layers"] = layers
            elif kind == "video":
                patch["frames"] = args.frames
            base, r = interleaved(model, lambda m: measure(m, inputs, args.decode_tokens), args.repeats, **patch)
            where = f"LM layer {layers[0]}" if layers else "before LM"
            print(row(f"{method} ({fraction:.0%})", where, base, r), flush=True)


if __name__ == "__main__":
    main()
