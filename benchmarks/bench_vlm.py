"""Qwen2.5-VL-shaped model (random weights), CPU: LM prefill speed-up and analytic MACs at 25% and 10% of the
visual tokens, for an image and for a 32-frame video, each beside its analytic bound.

Widths are Qwen2.5-VL-7B's (vision: hidden 1280, 16 heads, windows of 112 px, merger to 3584; language
model: hidden 3584, 28 heads, 4 KV heads, MLP 18944, M-RoPE), depth scaled down to fit this machine
(``--vision-layers``, ``--lm-layers``) and the vocabulary trimmed to 32000 (only the last position's head
runs at prefill). The measurement is ``vtr.tools.bench_vlm`` (also `vtr bench --model qwen-vl:2.5-7b`); per
batch of ``--batch`` prompts (each one image or video + ``--text`` text tokens):

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

from vtr.tools import bench_vlm


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

    model = bench_vlm.build("qwen-vl:2.5-7b", args.vision_layers, args.lm_layers)
    fractions = [float(f) for f in args.fractions.split(",")]
    for kind in args.inputs.split(","):
        video = kind == "video"
        load = bench_vlm.workload(model, text=args.text, batch=args.batch, frames=args.frames,
                                  image_size=args.frame_size if video else args.image_size,
                                  video_frames=args.video_frames if video else 0)
        print(f"\nQwen2.5-VL-7B-shaped, vision {args.vision_layers} / LM {args.lm_layers} layers, {load.description}: "
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
