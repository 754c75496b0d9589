"""float64 tensors on the Triton backend: the kernels compute in fp32, so fp64 tensors are
served by the reference ops (fp64 arithmetic) in the same call; the result must equal the
reference backend exactly, next to fp32 tensors that still go through the kernel."""

import pytest
import torch
from test_triton_ops import tops  # noqa: F401  (module-scoped fixture: the interpreted module)

from zoengine.kernels import reference as R

pytestmark = pytest.mark.interpreter


def test_float64_tensors_match_the_reference_exactly(tops):  # noqa: F811
    T = tops[0]
    g = torch.Generator().manual_seed(3)
    a64 = torch.randn(37, generator=g, dtype=torch.float64)
    a32 = torch.randn(11, generator=g)
    b64, b32 = a64.clone(), a32.clone()
    kw = dict(seed=5, step=2)
    T.perturb_([a64, a32], [1, 2], sample=0, scale=1e-3, **kw)
    R.perturb_([b64, b32], [1, 2], sample=0, scale=1e-3, **kw)
    assert torch.equal(a64, b64)  # same code path: bit-identical
    torch.testing.assert_close(a32, b32, atol=2e-6 * 1e-3, rtol=0)  # fp32 kernel, normal z
    T.restore_update_([a64, a32], [1, 2], eps=1e-3, lr=1e-9, grads=[0.5], **kw)
    R.restore_update_([b64, b32], [1, 2], eps=1e-3, lr=1e-9, grads=[0.5], **kw)
    assert torch.equal(a64, b64)
    # an fp64 update of 1e-9 survives: θ − lr·g·z equals its float64 recomputation
    x0 = a64.clone()
    z = torch.zeros_like(x0)
    R.perturb_([z], [1], sample=0, scale=1.0, **kw)  # z itself, in fp64
    T.restore_update_([a64], [1], eps=0.0, lr=1e-9, grads=[1.0], **kw)
    assert (a64 - x0).abs().max() > 0
    torch.testing.assert_close(a64, x0 - 1e-9 * z, atol=1e-15, rtol=0)
