"""What every vision-language family shares (LLaVA, LLaVA-NeXT, LLaVA-OneVision / NeXT-Video, Qwen2-VL /
Qwen2.5-VL), one job per module:

- ``run``: the per-call run (``VlmRun``) a ``forward`` or a whole ``generate()`` opens;
- ``front``: the class mixed into the model (``ReducingVlm``), whose ``forward``/``generate`` open it;
- ``calls``: ``generate()``/``forward()`` on a prompt compacted before the language model;
- ``language``: the language model's cost and a prompt's analytic prefill MACs;
- ``prompt``: placeholders, prompt compaction, each row's text as a query;
- ``reduce``: reducing a set of visual tokens to a budget in the reducer's steps;
- ``items``: a call's images and videos, each reduced to its own budget, and what the report says of them;
- ``video``: a video's budget, merged across frames and split across them;
- ``in_llm``: pruning inside the language model (``layers=``), told a family's prompt by its ``Visuals``;
- ``report``: the detached report (``VlmReport``).

Imports no family package: ``vtr.adapters.llava`` and ``vtr.adapters.qwen_vl`` build on it.
"""
