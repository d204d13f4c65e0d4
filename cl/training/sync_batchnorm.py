"""BatchNorm over every process's rows (`training.sync_batchnorm: true`, Lightning's name).

On several processes each rank sees only its share of a batch, so a plain BatchNorm
normalises with that share's statistics: not the computation one process makes. With
`sync_batchnorm` the batch statistics are those of the whole batch: torch's
`nn.SyncBatchNorm` on GPUs; on the CPU, where torch's refuses to run, `GlooSyncBatchNorm`
below, which reduces the statistics with (differentiable) all-reduces over gloo.

Both keep BatchNorm's parameter and buffer names, so checkpoints load either way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over the process group; its gradient is the sum of the gradients
    (each process's loss depends on every process's contribution)."""

    @staticmethod
    def forward(fctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(fctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _SumOverProcesses.apply(x)


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (Ioffe & Szegedy 2015) whose training statistics are the whole batch's,
    summed over the process group: the mean first, then the biased variance around it (two
    all-reduces, as accurate as one process's). The all-reduces are differentiable
    (`_SumOverProcesses`), so each rank's gradient also carries what its rows did to the
    other ranks' normalisation, and the DDP-averaged gradient is one process's. Running
    statistics are updated with the unbiased variance of the whole batch, as BatchNorm does.
    In eval mode, or on one process, it is BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        syncing = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not syncing:
            return super().forward(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        x32 = x.float()  # autocast runs BatchNorm in float32: so do the statistics here
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32, device=x.device)
        sums = all_reduce(torch.cat([x32.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x32 - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / (n - 1)).clamp(min=0) if n > 1 else var.detach()
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """The model with every BatchNorm replaced by a synchronised one (torch's on GPUs, the
    gloo one on the CPU), and how many were replaced. Parameters and buffers are the
    same tensors, under the same names."""
    if device.type == "cuda":
        before = _count_batchnorms(model)
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), before
    replaced = 0

    def convert(module: nn.Module) -> nn.Module:
        nonlocal replaced
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
            synced = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats)
            if module.affine:
                synced.weight, synced.bias = module.weight, module.bias
            if module.track_running_stats:
                synced.running_mean, synced.running_var = module.running_mean, module.running_var
                synced.num_batches_tracked = module.num_batches_tracked
            synced.train(module.training)
            replaced += 1
            return synced
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model), replaced


def _count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_batchnorm(model: nn.Module) -> bool:
    return _count_batchnorms(model) > 0
