"""Models: the MLP and reduced ResNet-18 of the CL literature, a byte-level GPT, plus
any timm model or `torch.nn.Module` class path.

Every lab model has timm's feature API with timm's meaning: `forward_features(x)`
gives the unpooled features, `forward_head(f, pre_logits=True)` pools them into
the pre-logit vector and `forward_head(f)` gives the logits; `get_classifier()`
is the final linear layer and `num_features` its input width. So one helper
(`strategies.context.pooled_features`) serves lab and timm models alike.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from cl.models.hf import HFCausalLM  # transformers is imported only when an hf model is built



class MLP(nn.Module):
    """A fully connected ReLU network on flattened inputs; the MNIST model of
    GEM (Lopez-Paz and Ranzato 2017) is `hidden=[100, 100]`, that of avalanche's
    SimpleMLP and our Split-MNIST workload `hidden=[400, 400]`."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, hidden: Sequence[int] = (400, 400),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.num_features = width
        self.head = nn.Linear(width, n_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """The reduced ResNet-18 of GEM (Lopez-Paz and Ranzato 2017), also Mammoth's
    and A-GEM's CIFAR backbone: four stages of two basic blocks with widths
    nf, 2nf, 4nf, 8nf (nf=20 instead of 64, about 1.1M parameters), a 3x3
    stem without max-pooling, global average pooling and one linear head."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, nf: int = 20):
        super().__init__()
        in_channels = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
        blocks, planes = [], nf
        for i, width in enumerate((nf, 2 * nf, 4 * nf, 8 * nf)):
            stride = 1 if i == 0 else 2
            blocks += [_BasicBlock(planes, width, stride), _BasicBlock(width, width, 1)]
            planes = width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = planes
        self.head = nn.Linear(planes, n_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pooled if pre_logits else self.head(pooled)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ByteGPT(nn.Module):
    """A small decoder-only transformer language model over bytes (GPT-2 layout,
    Radford et al. 2019, at the scale of nanoGPT's character models): token and
    learned position embeddings, pre-norm causal self-attention blocks, a final
    LayerNorm and a linear head over the vocabulary. Input (N, L) token ids,
    output (N, L, vocabulary) next-token logits."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, n_layer: int = 2, n_head: int = 4,
                 d_model: int = 128, dropout: float = 0.0):
        super().__init__()
        block_size = input_shape[0]
        self.tok = nn.Embedding(n_classes, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_head, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes, bias=False)
        self.num_features = d_model
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(block_size), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(L, device=x.device))
        return self.norm(self.blocks(h, mask=self.causal[:L, :L], is_causal=True))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)  # one feature vector per position, no pooling

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class MultiHeadClassifier(nn.Module):
    """A shared backbone with one linear head per task, for task-incremental
    learning (the multi-head setting of Li and Hoiem 2016 and of GEM's
    task-aware benchmarks). A sample is classified only among its own task's
    classes: the output has one column per class of the stream, and columns
    outside the sample's task are -inf, so cross-entropy and argmax need no
    special case. Heads exist for every task of the stream from the start;
    a head receives gradient only from its own task's samples."""

    uses_task_labels = True

    def __init__(self, backbone: nn.Module, task_classes: Sequence[Sequence[int]], n_classes: int):
        super().__init__()
        if not all(hasattr(backbone, a) for a in ("forward_features", "forward_head", "num_features")):
            raise ValueError(f"{type(backbone).__name__} has no timm feature API (forward_features, forward_head, "
                             f"num_features) to share across heads")
        self.backbone = backbone
        self.n_classes = n_classes
        # timm calls the width of the pooled pre-logits `head_hidden_size` where it differs.
        self.num_features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.heads = nn.ModuleList(nn.Linear(self.num_features, len(c)) for c in task_classes)
        for j, classes in enumerate(task_classes):
            self.register_buffer(f"classes_{j}", torch.tensor(list(classes)), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, t: torch.Tensor | None = None) -> torch.Tensor:
        features = self.backbone.forward_head(x, pre_logits=True)
        if pre_logits:
            return features
        if t is None:
            raise ValueError("a multi-head model needs each sample's task label to pick its head")
        out = features.new_full((len(features), self.n_classes), float("-inf"))
        for task in torch.unique(t).tolist():
            rows = (t == task).nonzero().squeeze(1)
            cols = getattr(self, f"classes_{task}")
            out[rows.unsqueeze(1), cols.unsqueeze(0)] = self.heads[task](features[rows])
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), t=t)



#: The lab's own models by name; `cl.config.registry.MODELS` starts from these.
MODELS = {"mlp": MLP, "reduced_resnet18": ReducedResNet18, "byte_gpt": ByteGPT, "hf": HFCausalLM}
