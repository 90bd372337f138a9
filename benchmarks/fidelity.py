"""Fidelity benchmark: top-1, agreement with the unreduced model and output cosine vs measured FLOPs
for every registered method at 70/50/35% FLOPs. Figures are recorded in RESULTS-fidelity.md.

    python benchmarks/fidelity.py                       # procedural task; trains its ViT once (cached)
    python benchmarks/fidelity.py --quick               # smoke test, seconds
    python benchmarks/fidelity.py --checkpoint vit.pt --model vit_small_patch16_224 --data imagenet/val
"""
import sys

from vtr.cli import main

if __name__ == "__main__":
    sys.exit(main(["fidelity", *sys.argv[1:]]))
