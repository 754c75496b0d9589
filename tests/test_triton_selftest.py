"""First-use self-test of the Triton kernels for backend='auto' on CUDA (zoengine/kernels/triton_selftest.py).

On CPU: the real self-test runs under TRITON_INTERPRET=1 (test_triton_ops' ``tops`` fixture
puts the interpreted triton_ops in sys.modules); corrupted or raising ops make it fail; and the
auto branch of ``resolve_backend`` is driven with stand-in tensors whose ``.device`` is CUDA
(the dispatch only reads ``.device``), the self-test itself monkeypatched.
"""

import types
import warnings

import pytest
import torch
from test_triton_ops import tops  # noqa: F401  (module-scoped fixture: the interpreted module)

from zoengine.kernels import dispatch
from zoengine.kernels import triton_selftest as S

pytestmark = pytest.mark.interpreter
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_cache():
    S.clear_cache()
    yield
    S.clear_cache()


def _fake_cuda(n=2, index=0):
    """Objects that look like CUDA tensors to dispatch (it reads only ``.device``)."""
    return [types.SimpleNamespace(device=torch.device("cuda", index)) for _ in range(n)]


def test_self_test_passes_under_the_interpreter(tops):  # noqa: F811
    ok, why = S.triton_verified(CPU)
    assert ok, why
    assert "matched the reference" in why
    assert S.triton_verified("cpu") == (ok, why)  # cached: same outcome, not re-run


def _corrupting(orig):
    def op(params, *args, **kw):
        orig(params, *args, **kw)
        params[-1].view(-1)[5] += 1  # one element of one tensor (bf16, 3 x 37)

    return op


@pytest.mark.parametrize("op", ["perturb_", "restore_update_"])
def test_a_wrong_element_fails_the_self_test(tops, monkeypatch, op):  # noqa: F811
    T = tops[0]
    monkeypatch.setattr(T, op, _corrupting(getattr(T, op)))
    ok, why = S.triton_verified(CPU)
    assert not ok
    assert op in why and "1 of 111 elements" in why and "torch.bfloat16" in why


def test_an_exception_fails_the_self_test_and_is_reported(tops, monkeypatch):  # noqa: F811
    def boom(*args, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tops[0], "restore_update_", boom)
    ok, why = S.triton_verified(CPU)
    assert (ok, why) == (False, "RuntimeError: CUDA error: an illegal memory access was "
                                "encountered")
    assert S.triton_verified(CPU) == (ok, why)  # the failure is cached too


def test_env_var_skips_the_test(monkeypatch):
    calls = []
    monkeypatch.setattr(S, "_self_test", lambda d: calls.append(d) or (False, "never"))
    monkeypatch.setenv("ZOENGINE_TRITON_SELFTEST", "0")
    assert S.triton_verified(CPU)[0] is True
    assert calls == []


def test_auto_on_cuda_falls_back_to_reference_with_a_warning(monkeypatch):
    seen = []
    monkeypatch.setattr(S, "triton_verified", lambda d: seen.append(d) or (False, "boom"))
    monkeypatch.setattr(dispatch, "_triton_problem", lambda ts: None)  # triton "can run"
    with pytest.warns(S.TritonSelfTestWarning, match="boom.*uses the 'reference' backend"):
        assert dispatch.resolve_backend(None, _fake_cuda()) == "reference"
    assert seen == ["cuda:0"]
    with warnings.catch_warnings():  # once per device and process: the next step is quiet
        warnings.simplefilter("error")
        assert dispatch.resolve_backend("auto", _fake_cuda()) == "reference"


def test_auto_on_cuda_picks_triton_when_verified(monkeypatch):
    monkeypatch.setattr(S, "triton_verified", lambda d: (True, "ok"))
    monkeypatch.setattr(dispatch, "_triton_problem", lambda ts: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend(None, _fake_cuda()) == "triton"


def test_each_cuda_device_is_tested(monkeypatch):
    monkeypatch.setattr(S, "triton_verified", lambda d: (d != "cuda:1", f"bad {d}"))
    ts = _fake_cuda(1, 0) + _fake_cuda(1, 1)
    with pytest.warns(S.TritonSelfTestWarning, match="bad cuda:1"):
        assert S.auto_cuda_choice(ts) == "reference"
    assert S.auto_cuda_choice(_fake_cuda(1, 0)) == "triton"


def test_explicit_triton_is_not_self_tested(monkeypatch):
    monkeypatch.setattr(S, "triton_verified", lambda d: pytest.fail("self-test ran"))
    monkeypatch.setattr(dispatch, "_triton_problem", lambda ts: None)
    assert dispatch.resolve_backend("triton", _fake_cuda()) == "triton"
    monkeypatch.setenv("ZOENGINE_BACKEND", "triton")
    assert dispatch.resolve_backend(None, _fake_cuda()) == "triton"


def test_warning_can_be_made_fatal(monkeypatch):
    monkeypatch.setattr(S, "triton_verified", lambda d: (False, "boom"))
    monkeypatch.setattr(dispatch, "_triton_problem", lambda ts: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.TritonSelfTestWarning)
        with pytest.raises(S.TritonSelfTestWarning):
            dispatch.resolve_backend(None, _fake_cuda())
