"""Task data: the embedded VADER default, batching for tokenized backbones."""

from pyrolora.data.base import ClassificationSplit, split_indices
from pyrolora.data.glue import GLUE_TASKS, TsvSpec, load_tsv
from pyrolora.data.loader import TokenizedLoader
from pyrolora.data.mcqa import MultipleChoiceLoader, MultipleChoiceSplit, load_mcqa_jsonl
from pyrolora.data.tasks import TASKS, is_multiple_choice, load_splits
from pyrolora.data.vader import load_vader, vader_splits

__all__ = ["ClassificationSplit", "TokenizedLoader", "load_vader", "split_indices", "vader_splits"]
__all__ += [
    "GLUE_TASKS",
    "TASKS",
    "MultipleChoiceLoader",
    "MultipleChoiceSplit",
    "TsvSpec",
    "is_multiple_choice",
    "load_mcqa_jsonl",
    "load_splits",
    "load_tsv",
]
