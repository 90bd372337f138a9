"""CLIP ViT-B/16 image tower (open_clip, random weights), batch 8, 224x224, CPU: every method at 50% FLOPs.

    python benchmarks/bench_clip.py                       # open_clip:ViT-B-16
    python benchmarks/bench_clip.py --model hf:clip-vit-b16   # the transformers tower

Same table as `vtr bench`; figures are recorded in benchmarks/RESULTS.md.
"""
import sys

from vtr.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    defaults = {"--model": "open_clip:ViT-B-16", "--methods": "all", "--flops": "0.5"}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    raise SystemExit(main(["bench", *args]))
