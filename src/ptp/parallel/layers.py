"""The one layer that needs to know it is sharded: the vocabulary-parallel embedding."""
import torch
import torch.nn.functional as F
from torch import nn

from ptp.parallel.comm import all_reduce


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + rows) of the embedding. Other ids give zeros here and their
    vectors arrive from the rank that holds them through the all-reduce."""

    def __init__(self, weight: torch.Tensor, start: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return all_reduce(out.masked_fill(~inside.unsqueeze(-1), 0))
