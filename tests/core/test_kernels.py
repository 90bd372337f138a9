"""The CuPy merge kernel: its torch-side bookkeeping (CPU), its CUDA source (compiled with nvcc when
present), and, on a machine with CUDA and CuPy, its output against the torch reference."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtr
from vtr import kernels
from vtr._data import data_folder
from vtr.kernels.merge import CUDA_SOURCES
from vtr.core.state import TokenState


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40), st.integers(1, 6))
def test_segments_group_each_output_sources_in_source_order(dest_list, num_out):
    flat_dest = torch.tensor(dest_list).clamp_max(num_out)      # num_out = dropped
    order, offsets = kernels.segments(flat_dest, num_out)
    assert offsets[0] == 0 and offsets.shape == (num_out + 1,)
    for m in range(num_out):
        sources = order[offsets[m]:offsets[m + 1]].tolist()
        assert sources == [i for i, d in enumerate(dest_list) if min(d, num_out) == m]


def test_kernels_stay_off_on_cpu_when_disabled_and_when_autograd_records():
    x = torch.randn(2, 5, 4)
    assert not kernels.use_for(x)
    with kernels.enabled():
        assert not kernels.use_for(x)                       # CPU tensors always take the torch path
        if torch.cuda.is_available():
            y = torch.randn(3, 4, device="cuda", requires_grad=True)
            assert not kernels.use_for(y)                   # training: autograd needs the torch ops


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_merge_kernel_source_compiles_for_every_dtype(tmp_path):
    source = data_folder(CUDA_SOURCES, "kernels").joinpath("merge.cu")
    ptx = tmp_path / "merge.ptx"
    result = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_80", "--ptx", str(source), "-o", str(ptx)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ptx.read_text().count(".entry") == 3              # float, half, bfloat16


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.cupy_available()), reason="needs CUDA and CuPy")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_kernel_equals_the_torch_reference_and_is_deterministic(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 577, 1024, generator=generator).to("cuda", dtype)
    state = TokenState.start(x, num_protected=1)
    dest = torch.randint(-1, 200, (3, 577), generator=generator).cuda()
    dest[:, :200] = torch.arange(200)                        # every output receives at least itself
    reference = state.reduce(dest, 200)
    with kernels.enabled():
        fused, again = state.reduce(dest, 200), state.reduce(dest, 200)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(fused.x.float(), reference.x.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(fused.x, again.x)
    assert torch.equal(fused.size, reference.size) and torch.equal(fused.assignment, reference.assignment)


@gpu
def test_merge_kernel_handles_more_outputs_than_a_grid_dimension_of_65535():
    x = torch.randn(400, 300, 8, device="cuda")
    state = TokenState.start(x)
    dest = torch.arange(300, device="cuda").div(2, rounding_mode="floor").expand(400, -1).contiguous()
    reference = state.reduce(dest, 150)                       # pairs merged: 60000 outputs
    with kernels.enabled():
        torch.testing.assert_close(state.reduce(dest, 150).x, reference.x)
        wide = TokenState.start(torch.randn(400, 200, 8, device="cuda"))
        keep = torch.arange(200, device="cuda").expand(400, -1).contiguous()
        torch.testing.assert_close(wide.reduce(keep, 200).x, wide.x)   # 80000 outputs, each its own token


@gpu
def test_a_patched_vit_gives_the_same_logits_with_kernels():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).cuda().eval()
    images = torch.randn(2, 3, 224, 224, device="cuda")
    vtr.patch(model, "tome", r=8)
    with torch.no_grad():
        reference = model(images)
        with kernels.enabled():
            fused = model(images)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
