"""LLaVA-1.5-shaped model (random weights), CPU: vision, prefill and decode time per method and budget.

Widths are LLaVA-1.5-7B's (CLIP ViT-L/14 at 336 px: 576 visual tokens; Llama-7B: hidden 4096,
32 heads, MLP 11008), depth is scaled down to fit this machine (``--vision-layers``, ``--lm-layers``).
The measurement is ``vtr.tools.bench_vlm`` (also `vtr bench --model llava:1.5-7b`); reported separately, per
batch of ``--batch`` prompts (each one image + ``--text`` text tokens):

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

from vtr.tools import bench_vlm


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

    model = bench_vlm.build("llava:next-7b" if args.next else "llava:1.5-7b", args.vision_layers, args.lm_layers)
    load = bench_vlm.workload(model, text=args.text, batch=args.batch)
    print(f"LLaVA-{'NeXT' if args.next else '1.5'}-shaped, vision {args.vision_layers} / LM {args.lm_layers} layers, "
          f"{load.inputs['input_ids'].shape[1]} prompt tokens ({load.visual} visual) x batch {args.batch}, "
          f"CPU threads {torch.get_num_threads()}, median of {args.repeats} interleaved rounds")
    print(bench_vlm.HEADER)
    budgets = [int(b) for b in args.budgets.split(",")]
    variants = [(m, {"method": m, "budget": b}) for b in budgets for m in args.methods.split(",")]
    if args.in_llm_layer is not None:
        variants += [("fastv", {"method": "fastv", "budget": b, "layers": [args.in_llm_layer]}) for b in budgets]
    bench_vlm.run(model, load, variants, rounds=args.repeats, decode_tokens=args.decode_tokens,
                  on_row=lambda row: print(bench_vlm.format_row(row), flush=True))


if __name__ == "__main__":
    main()
