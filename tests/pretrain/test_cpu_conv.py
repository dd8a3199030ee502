"""The small-output convolution path gives PyTorch's own results and gradients."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from twinview.pretrain.cpu_conv import SmallOutputConv2d, _SmallOutputConv2d, live_taps, patch_model


def test_live_taps() -> None:
    assert live_taps(size=1, kernel=3, stride=1, pad=1, out=1) == (1, 1)  # centre only
    assert live_taps(size=2, kernel=3, stride=2, pad=1, out=1) == (1, 2)
    assert live_taps(size=2, kernel=3, stride=1, pad=1, out=2) == (0, 2)  # all taps
    assert live_taps(size=4, kernel=3, stride=2, pad=0, out=1) == (0, 2)


@pytest.mark.parametrize(
    "cin,cout,side,k,stride,pad,bias",
    [
        (16, 24, 1, 3, 1, 1, False),  # 1x1 output, the ResNet layer4 case at 32 px
        (16, 24, 2, 3, 1, 1, True),  # 2x2 output
        (8, 16, 2, 3, 2, 1, False),  # strided to 1x1
        (8, 8, 3, 3, 2, 1, True),  # 2x2 output, odd input
        (4, 6, 2, 2, 1, 0, False),  # 1x1 output, no padding
        (4, 6, 4, 3, 2, 0, True),  # 1x1 output that never reads the last row/column (crop)
        (4, 6, 5, 3, 3, 1, False),  # 2x2 output, stride 3
        (6, 4, 1, 5, 1, 2, False),  # 5x5 kernel on a 1x1 input: centre tap only
    ],
)
def test_function_matches_conv2d(cin: int, cout: int, side: int, k: int, stride: int, pad: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(cin + cout + side)
    x = torch.randn(5, cin, side, side, generator=g, requires_grad=True)
    w = torch.randn(cout, cin, k, k, generator=g, requires_grad=True)
    b = torch.randn(cout, generator=g, requires_grad=True) if bias else None
    ref = nn.functional.conv2d(x, w, b, stride, pad)
    out = _SmallOutputConv2d.apply(x, w, b, (stride, stride), (pad, pad))
    torch.testing.assert_close(out, ref)
    grad = torch.randn(ref.shape, generator=g)
    inputs = [x, w] + ([b] if bias else [])
    expected = torch.autograd.grad(ref, inputs, grad)
    got = torch.autograd.grad(out, inputs, grad)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def test_patched_resnet_trains_like_the_original() -> None:
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=0)
    fast = timm.create_model("resnet18", num_classes=0)
    fast.load_state_dict(ref.state_dict())
    assert patch_model(fast) == sum(isinstance(m, nn.Conv2d) for m in ref.modules())
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    used = []
    original = _SmallOutputConv2d.forward
    _SmallOutputConv2d.forward = staticmethod(lambda ctx, *a: used.append(1) or original(ctx, *a))  # type: ignore[method-assign]
    try:
        loss_fast = fast(x).square().mean()
        loss_fast.backward()
    finally:
        _SmallOutputConv2d.forward = staticmethod(original)  # type: ignore[method-assign]
    assert len(used) >= 3  # layer4's 1x1-output convs took the fast path
    loss_ref = ref(x).square().mean()
    loss_ref.backward()
    torch.testing.assert_close(loss_fast, loss_ref)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_large_outputs_and_eval_use_pytorch_kernels() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.__class__ = SmallOutputConv2d
    calls = []
    original = _SmallOutputConv2d.apply
    _SmallOutputConv2d.apply = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    try:
        conv(torch.randn(2, 3, 8, 8))  # 8x8 output: PyTorch's kernel
        with torch.no_grad():
            conv(torch.randn(2, 3, 1, 1))  # no gradient needed: PyTorch's kernel
        assert calls == []
        conv(torch.randn(2, 3, 1, 1))
        assert calls == [1]
    finally:
        _SmallOutputConv2d.apply = original  # type: ignore[method-assign]
