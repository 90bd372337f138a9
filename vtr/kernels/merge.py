"""The size-weighted merge of :meth:`vtr.TokenState.reduce` as one CuPy kernel (``merge.cu``).

torch does the merge in five memory passes (cast, multiply by weight, scatter-add, divide, cast
back) and its CUDA scatter-add uses atomics, so float sums vary from run to run. The kernel reads x
once and writes the merged tokens once, walking each output's sources in a fixed order: the same
numbers every run. The bookkeeping around it (which sources go where) stays in torch:
:func:`segments` sorts the sources by destination without a host sync.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._data import data_folder

# The CUDA sources live in the repository's top-level kernels/ folder (no Python there, so it never
# shadows the `kernels` distribution transformers depends on); they install as vtr.kernels.cuda.
CUDA_SOURCES = "vtr.kernels.cuda"
_KERNEL = "merge_tokens"
_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
THREADS = 128   # threads per output token (channels are strided over them)


def segments(flat_dest: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
    """Sources grouped by destination: ``order`` (source indices, stable by destination) and
    ``offsets`` ``[num_out + 1]`` (output ``m`` owns ``order[offsets[m]:offsets[m + 1]]``).

    ``flat_dest`` holds each source's output index, or ``num_out`` for a dropped source (those sort
    last and fall outside every segment).
    """
    order = torch.argsort(flat_dest, stable=True)
    counts = torch.bincount(flat_dest, minlength=num_out + 1)[:num_out]
    offsets = torch.zeros(num_out + 1, dtype=torch.long, device=flat_dest.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


@functools.lru_cache(maxsize=None)
def _module():
    import cupy

    source = data_folder(CUDA_SOURCES, "kernels").joinpath("merge.cu").read_text()
    names = [f"{_KERNEL}<{t}>" for t in _TYPES.values()]
    return cupy.RawModule(code=source, options=("-std=c++17",), name_expressions=names)


def merge(x: Tensor, weight: Tensor, flat_dest: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
    """``(merged [num_out, C] in x's dtype, total weight [num_out] float32)`` of the rows of ``x``
    ``[N, C]`` (CUDA) sent to ``flat_dest`` ``[N]`` with weights ``weight`` ``[N]``."""
    import cupy

    x = x.contiguous()
    weight = weight.to(torch.float32).contiguous()
    order, offsets = segments(flat_dest, num_out)
    out = torch.empty(num_out, x.shape[1], dtype=x.dtype, device=x.device)
    total_weight = torch.empty(num_out, dtype=torch.float32, device=x.device)
    if num_out == 0 or x.shape[1] == 0:
        return out, total_weight.zero_()
    kernel = _module().get_function(f"{_KERNEL}<{_TYPES[x.dtype]}>")
    channels = x.shape[1]
    grid = (num_out,)   # one block per output token; its threads stride over the channels
    # Pointers go in as 64-bit integers: no CuPy array (and no CuPy bfloat16 dtype) is needed.
    with cupy.cuda.Device(x.device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream):
        kernel(grid, (THREADS,), (x.data_ptr(), weight.data_ptr(), order.data_ptr(), offsets.data_ptr(),
                                  out.data_ptr(), total_weight.data_ptr(), cupy.int64(num_out), cupy.int64(channels)))
    return out, total_weight
