"""Last-layer adapters on cached features: the fast setting of notebooks 02 and 03.

MiniLM's embeddings and its first layers are frozen and untouched by adapters that sit only in the top layers, so
their output can be computed once per example. :class:`TopLayers` is then the backbone: the top ``layers`` BERT
layers, the pooler and the classifier of the *same* pretrained model, fed with the cached hidden states. It is a
plain ``nn.Module`` (``BayesianLoraModel`` accepts any backbone), and its outputs equal the full model's for the
same adapter values, so every guide and prior can be compared at a fraction of the cost, and NUTS (a full pass over
the data per gradient) becomes affordable.
"""

from __future__ import annotations

import torch
from torch import nn


class TopLayers(nn.Module):
    """The top ``layers`` encoder layers + pooler + classifier of a BERT sequence classifier.

    ``forward(hidden (B, T, H), mask (B, T)) -> logits (B, C)``.
    """

    def __init__(self, classifier_model: nn.Module, layers: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(classifier_model.bert.encoder.layer[-layers:])
        self.pooler = classifier_model.bert.pooler
        self.dropout = classifier_model.dropout
        self.classifier = classifier_model.classifier

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t = mask.shape
        attn = mask.bool()[:, None, None, :].expand(b, 1, t, t)  # (B, 1, T, T): keys that are not padding
        for layer in self.layers:
            out = layer(hidden, attn)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.classifier(self.dropout(self.pooler(hidden)))


@torch.no_grad()
def cache_features(classifier_model: nn.Module, loader, layers: int = 1) -> list:
    """Batches ``({"hidden": (B, T, H), "mask": (B, T)}, targets)``: the input of the top ``layers`` layers."""
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = classifier_model.bert.encoder.layer[-layers].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        batches = []
        for inputs, targets in loader:
            classifier_model(**inputs)
            batches.append(({"hidden": seen["hidden"].clone(), "mask": inputs["attention_mask"].clone()}, targets))
    finally:
        handle.remove()
    return batches


class Shuffled:
    """Re-iterable over cached batches in a new order every pass (a seeded generator), with a length."""

    def __init__(self, batches: list, seed: int = 0) -> None:
        self.batches = batches
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i in torch.randperm(len(self.batches), generator=self.generator).tolist():
            yield self.batches[i]
