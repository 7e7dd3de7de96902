"""Every rank in step: the choices a rank would make from its own data, agreed across ranks first.

Under FSDP or ZeRO-3 every forward of the policy is a collective (each layer gathers its shards), and so is every
`generate` step (transformers syncs them with `synced_gpus`). Every rank must therefore run the same sequence of
forwards and `generate` calls, whatever its data. Three of TreePO's choices depend on a rank's own data, and are
agreed here with a small all-reduce before they act:

- the number of tree levels of a transformers-backend rollout, and whether a level prefills (`backends.transformers`:
  a rank whose trees are done keeps joining levels with a one-token stand-in until every rank's are);
- the number of packed sequences a micro-batch is cut into (`packed_forward.py`: a rank with fewer runs one-token
  stand-in forwards, joined to the loss with weight 0 so that their backward runs too);
- the verdict of packing's first-use self-check (one rank's failure turns packing off on all).

With one process these are no-ops. A vLLM rollout needs none of them, per tree or level by level: its engine calls
are not collectives of the policy, and however many steps or waits a rank's trees take, the forwards that follow
(packed or not) are agreed here as above.
"""

from __future__ import annotations

import torch


class Lockstep:
    """All-reduces over the processes of `accelerator` (no-ops with one process)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    @property
    def active(self) -> bool:
        return self.accelerator.num_processes > 1

    def agree_max(self, values: list[int]) -> list[int]:
        """Each value's maximum over the ranks."""
        return self._all_reduce(values, torch.distributed.ReduceOp.MAX)

    def total(self, values: list[int]) -> list[int]:
        """Each value's sum over the ranks."""
        return self._all_reduce(values, torch.distributed.ReduceOp.SUM)

    def _all_reduce(self, values: list[int], op) -> list[int]:
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.long, device=self.accelerator.device)
        torch.distributed.all_reduce(tensor, op=op)
        return tensor.tolist()

    def agree_all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        return not self.agree_max([int(not flag)])[0]
