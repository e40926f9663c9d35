"""Dataset readers, the synthetic dataset, step selection, training / evaluation views and loaders.

    from benchmark.data import open_dataset, step_indices, TrainView, TrainLoader, EvalView, eval_loader

Importing this package reads nothing from disk; datasets are opened explicitly.
"""

from .cache import cache_root
from .instance import CocoFormatDataset
from .loader import LoaderConfig, TrainLoader, collate, eval_loader, single_pass
from .registry import DATASETS, open_dataset
from .selection import select_images, step_indices
from .semantic import SemanticDataset
from .synth import SynthSpec, ensure_synth
from .transforms import AugConfig
from .views import EvalView, SampleKey, TrainSample, TrainView

__all__ = [
    "AugConfig", "CocoFormatDataset", "DATASETS", "EvalView", "LoaderConfig", "SampleKey", "SemanticDataset",
    "SynthSpec", "TrainLoader", "TrainSample", "TrainView", "cache_root", "collate", "ensure_synth",
    "eval_loader", "open_dataset", "select_images", "single_pass", "step_indices",
]
