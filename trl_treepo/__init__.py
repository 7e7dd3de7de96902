"""TreePO (arXiv 2508.17445) for Hugging Face TRL: segment-tree rollouts and tree-based advantages."""

from .config import TreePOConfig
from .trainer import TreePOTrainer
from .advantages import compute_segment_advantages, compute_tree_advantages, whiten
from .sampling import SegmentOutput, SegmentRequest, TreeSamplingParams
from .tree import FinishReason, Leaf, TreeRollout, grow_trees

__version__ = "0.1.0"

__all__ = [
    "TreePOConfig",
    "TreePOTrainer",
    "FinishReason",
    "Leaf",
    "SegmentOutput",
    "SegmentRequest",
    "TreeRollout",
    "TreeSamplingParams",
    "compute_segment_advantages",
    "compute_tree_advantages",
    "grow_trees",
    "whiten",
]
