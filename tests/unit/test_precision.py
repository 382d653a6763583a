"""amp_bf16 with a teacher stored in another half type (SDXL's recipes: float16 teacher, bfloat16 autocast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from senseflow.teachers.base import storage_autocast


def test_a_float16_network_under_bfloat16_autocast_computes_in_float16():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).half()
    x = torch.randn(2, 4).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the reported crash: a float16 input meets a bfloat16 activation in autocast's promoting cat
        with pytest.raises(RuntimeError, match="prioritize"):
            torch.cat([x, lin(x)], dim=-1)
        with storage_autocast(lin):
            y = torch.cat([x, lin(x)], dim=-1)
    assert y.dtype == torch.float16
    expected = torch.cat([x, (x.float() @ lin.weight.float().T + lin.bias.float()).half()], dim=-1)
    assert torch.allclose(y.float(), expected.float(), atol=2e-3)


def test_fp32_and_same_dtype_networks_keep_the_outer_autocast():
    lin32 = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with storage_autocast(lin32):
            assert lin32(x).dtype == torch.bfloat16       # master weights: bf16 compute, as amp_bf16 promises
        lin_bf = nn.Linear(4, 4).to(torch.bfloat16)
        with storage_autocast(lin_bf):
            assert lin_bf(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with storage_autocast(nn.Linear(4, 4).half()):  # outside autocast: nothing changes
        assert not torch.is_autocast_enabled("cpu")
