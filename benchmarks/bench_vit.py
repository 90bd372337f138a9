"""timm ViT-B/16 (random weights), batch 8, 224x224, CPU, inference mode: every method at equal FLOPs.

    python benchmarks/bench_vit.py            # 50% and 35% FLOPs, all registered methods
    python benchmarks/bench_vit.py --flops 0.5 --methods tome,pitome

Same as `vtr bench`, with every method by default; figures are recorded in benchmarks/RESULTS.md.
"""
import sys

from vtr.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--methods" not in args:
        args += ["--methods", "all"]
    if "--flops" not in args:
        args += ["--flops", "0.5,0.35"]
    raise SystemExit(main(["bench", *args]))
