"""`TreePOTrainer` and the rooms it delegates to, one per concern (see `treepo_trainer.py` for the hook table):

- `treepo_trainer.py`: the trainer class, GRPOTrainer's overrides only;
- `rollouts.py`: TRL's rows ↔ trees, on every backend, with tool calls (paper §2);
- `advantage_step.py`: rewards → the tree advantages and loss mask that train (paper §3.1, §3.3);
- `packed_forward.py`: the exact packed forward of `tree_packed_training` (beyond the paper);
- `telemetry.py`: `tree/*` metrics, tree pictures, the model card.
"""

from .advantage_step import RewardFunctionError
from .treepo_trainer import TreePOTrainer

__all__ = ["RewardFunctionError", "TreePOTrainer"]
