"""Task data: the embedded VADER default, batching for tokenized backbones."""

from pyrolora.data.base import ClassificationSplit, TokenizedLoader, split_indices
from pyrolora.data.vader import load_vader, vader_splits

__all__ = ["ClassificationSplit", "TokenizedLoader", "load_vader", "split_indices", "vader_splits"]
