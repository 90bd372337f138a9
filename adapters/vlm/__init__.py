"""What every vision-language family shares (LLaVA, Qwen2-VL / Qwen2.5-VL): the per-call run, the
language model's cost, reduction steps on a set of visual tokens, prompt compaction and the report.

Imports no family package: ``vtr.adapters.llava`` and ``vtr.adapters.qwen_vl`` build on it.
"""
