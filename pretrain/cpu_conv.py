"""Faster CPU gradients for convolutions whose output is a single pixel.

Why this exists: on AVX2 CPUs, oneDNN (PyTorch's CPU convolution backend) computes the weight
gradient of a 3x3 convolution with a tiny output through a slow ``gemm:jit`` path (~12 GFLOP/s).
For a ResNet-18 at 32x32 px, whose layer4 runs at 1x1, ``ONEDNN_VERBOSE`` showed that kernel taking
~850 ms of a ~1.9 s SimCLR step at batch 2x256 on the 2-core CI machine. Computing the gradients
over only the kernel taps that touch real input (one ``unfold`` + matmul for the weights, oneDNN
on the live sub-kernel for the input) is 3.7-11x faster for those convs. It was slower (0.6x) for
2x2 outputs, so only 1-pixel outputs take this path (bench/cpu_conv.py, docs/BENCHMARKS.md). The
forward pass, larger outputs, eval and GPUs keep PyTorch's own kernels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_OUTPUT_PIXELS = 1  # bench/cpu_conv.py: 3.5-12x faster at 1x1 output, 0.6x at 2x2 (with input grads)


def live_taps(size: int, kernel: int, stride: int, pad: int, out: int) -> tuple[int, int]:
    """First and last kernel tap (along one axis) that touches the input at some output position.

    Tap ``i`` reads input rows ``o * stride + i - pad`` for ``o`` in ``[0, out)``; taps that only ever
    read padding contribute nothing (a 3x3 conv on a 1x1 input uses its centre tap alone).
    """
    return max(0, pad - (out - 1) * stride), min(kernel - 1, size + pad - 1)


class _SmallOutputConv2d(torch.autograd.Function):
    """``F.conv2d`` whose gradients use only the live kernel taps (groups=1, no dilation).

    With ``[i0, i1] x [j0, j1]`` the live taps, the input is padded (or cropped) so that the
    sub-kernel ``w[:, :, i0:i1+1, j0:j1+1]`` with no padding yields the same output. The weight
    gradient of the sub-kernel is one unfold + matmul; the other taps' gradients are exactly zero.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:  # noqa: E501
        out = F.conv2d(x, weight, bias, stride, padding)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.stride, ctx.padding, ctx.out_size = stride, padding, out.shape[2:]
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        (sh, sw), (ph, pw), (oh, ow) = ctx.stride, ctx.padding, ctx.out_size
        kh, kw = weight.shape[2:]
        i0, i1 = live_taps(x.shape[2], kh, sh, ph, oh)
        j0, j1 = live_taps(x.shape[3], kw, sw, pw, ow)
        ki, kj = i1 - i0 + 1, j1 - j0 + 1
        top, left = ph - i0, pw - j0  # >= 0: tap `pad` always reads row/column 0
        bottom = (oh - 1) * sh + ki - x.shape[2] - top  # negative = crop rows no live tap reads
        right = (ow - 1) * sw + kj - x.shape[3] - left
        pads = (left, right, top, bottom)
        w_live = weight[:, :, i0 : i1 + 1, j0 : j1 + 1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            x_shape = (x.shape[0], x.shape[1], x.shape[2] + top + bottom, x.shape[3] + left + right)
            grad_xp = torch.nn.grad.conv2d_input(x_shape, w_live, grad_out, ctx.stride)
            grad_x = F.pad(grad_xp, tuple(-p for p in pads))  # undo the pad/crop
        if ctx.needs_input_grad[1]:
            cols = F.unfold(F.pad(x, pads), (ki, kj), stride=ctx.stride)  # (N, C*ki*kj, L)
            n, ckk, length = cols.shape
            g = grad_out.reshape(n, -1, length).permute(1, 0, 2).reshape(-1, n * length)  # (O, N*L)
            live = (g @ cols.permute(0, 2, 1).reshape(n * length, ckk)).view(w_live.shape)  # (O, C, ki, kj)
            grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
            grad_w[:, :, i0 : i1 + 1, j0 : j1 + 1] = live
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class SmallOutputConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that routes CPU float32 training with tiny outputs through the fast path.

    Same parameters and state-dict keys as ``nn.Conv2d``; instances are made by :func:`patch_model`
    by swapping the class of existing convolutions.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and weight.requires_grad
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and self.padding_mode == "zeros"
            and self.groups == 1
            and self.dilation == (1, 1)
            and isinstance(self.padding, tuple)
        ):
            out_h = (x.shape[2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
            out_w = (x.shape[3] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
            if out_h * out_w <= MAX_OUTPUT_PIXELS and self.kernel_size != (1, 1):
                return _SmallOutputConv2d.apply(x, weight, bias, self.stride, self.padding)
        return super()._conv_forward(x, weight, bias)


def patch_model(model: nn.Module) -> int:
    """Switches every plain ``nn.Conv2d`` in ``model`` to :class:`SmallOutputConv2d`, in place.

    Weights, keys and results are unchanged; only CPU training of small-output convolutions takes
    the faster weight-gradient path.

    Args:
        model: Any module.

    Returns:
        The number of convolutions switched.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = SmallOutputConv2d
            count += 1
    return count
