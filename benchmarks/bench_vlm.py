"""Qwen2.5-VL- and LLaVA-OneVision-shaped models (random weights), CPU: LM prefill speed-up and analytic MACs at
25% and 10% of the visual tokens, for an image and for a 32-frame video, each beside its analytic bound.

Widths are the 7B models' (``--model``), depth scaled down to fit this machine (``--vision-layers``,
``--lm-layers``) and the vocabulary trimmed to 32000 (only the last position's head runs at prefill):

- ``qwen-vl:2.5-7b`` (default): Qwen2.5-VL-7B; vision hidden 1280, 16 heads, windows of 112 px, merger to 3584;
  language model hidden 3584, 28 heads, 4 KV heads, MLP 18944, M-RoPE. An image of 448x448 is 256 tokens, a
  32-frame video of 224x224 is 16 temporal patches of 64 tokens.
- ``onevision:7b``: LLaVA-OneVision-Qwen2-7B; SigLIP-so400m at 384 px (hidden 1152, 16 heads, 27x27 patches)
  and Qwen2-7B (the same language-model widths). An image of 384x384 is the base view and one crop (1485
  tokens with the crop's newlines); a video frame is pooled to 14x14 = 196 tokens (32 frames: 6272, and one
  newline). Frames are the tower's size: ``--frame-size 196`` builds a tower for 196 px frames (14x14 patches,
  pooled to 7x7 = 49 tokens), a quarter of the cost, to fit a CPU.

The measurement is ``vtr.tools.bench_vlm`` (also `vtr bench --model <shape>`); per batch of ``--batch`` prompts
(each one image or video + ``--text`` text tokens):

- vision: vision tower + merger/projector, plus (reduced) the reducer, prompt compaction and positions, seconds;
- LM prefill MACs: the reduced/unreduced ratio of vtr's analytic count and, in brackets, its inverse: the
  most the prefill can speed up (with V visual tokens, b kept and T text tokens, about (V + T) / (b + T));
- prefill: the language model on the prompt it really sees, seconds, and its speed-up;
- decode: milliseconds per generated token (the KV cache is as short as the kept prompt).

    python benchmarks/bench_vlm.py                          # Qwen: image 448x448 (256 tokens) and 32-frame video
    python benchmarks/bench_vlm.py --model onevision:7b     # OneVision: image 384x384 and 32-frame video
    python benchmarks/bench_vlm.py --inputs video --methods tome --frames novelty
    python benchmarks/bench_vlm.py --inputs image --fractions 0.25 --methods fastv --in-llm-layer 1
"""
from __future__ import annotations

import argparse

import torch

from vtr.tools import bench_vlm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-vl:2.5-7b", choices=["qwen-vl:2.5-7b", "onevision:7b"])
    parser.add_argument("--inputs", default="image,video", help="image, video or both")
    parser.add_argument("--fractions", default="0.25,0.1", help="fractions of the visual tokens kept")
    parser.add_argument("--methods", default="tome,fastv")
    parser.add_argument("--frames", default="uniform", help="a video's budget split: uniform, novelty, relevance")
    parser.add_argument("--in-llm-layer", type=int, default=None, help="also run fastv inside the LM at this layer")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square image side (default: Qwen 448, a multiple of 28; OneVision 384)")
    parser.add_argument("--video-frames", type=int, default=32)
    parser.add_argument("--frame-size", type=int, default=None,
                        help="square frame side (default: Qwen 224, a multiple of 28; OneVision 384, its tower's "
                             "size: another side builds the tower for it)")
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

    name = bench_vlm.SHAPES[args.model].description.split(" (")[0]
    fractions = [float(f) for f in args.fractions.split(",")]
    for kind in args.inputs.split(","):
        video = kind == "video"
        size = args.frame_size if video else args.image_size
        tower = size if video and args.model.startswith("onevision") else None   # OneVision frames: the tower's size
        model = bench_vlm.build(args.model, args.vision_layers, args.lm_layers, tower_size=tower)
        load = bench_vlm.workload(model, text=args.text, batch=args.batch, frames=args.frames, image_size=size,
                                  video_frames=args.video_frames if video else 0)
        print(f"\n{name}, vision {args.vision_layers} / LM {args.lm_layers} layers, {load.description}: "
              f"{load.inputs['input_ids'].shape[1]} prompt tokens ({load.visual} visual) x batch {args.batch}, "
              f"CPU threads {torch.get_num_threads()}, median of {args.repeats} interleaved rounds")
        print(bench_vlm.HEADER)
        variants = [(f"{m} ({f:.0%})", {"method": m, "budget": round(f * load.visual)})
                    for f in fractions for m in args.methods.split(",")]
        if args.in_llm_layer is not None:
            variants += [(f"fastv ({f:.0%})", {"method": "fastv", "budget": round(f * load.visual),
                                               "layers": [args.in_llm_layer]}) for f in fractions]
        bench_vlm.run(model, load, variants, rounds=args.repeats, decode_tokens=args.decode_tokens,
                      on_row=lambda row: print(bench_vlm.format_row(row), flush=True))


if __name__ == "__main__":
    main()
