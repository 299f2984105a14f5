"""The columns a projection's roles write: `column_gather` (where each role's delta goes in the projection's output)
and `combine_deltas` (the roles' deltas put together in the projection's column order, zeros where no role writes).

Legend: O out features of the projection, O_role a role's columns.
"""

from __future__ import annotations

import torch
from torch import Tensor


def column_gather(columns: tuple[tuple[int, ...], ...], out_features: int,
                  device: torch.device | str | None) -> tuple[Tensor | None, int]:
    """The roles' output columns (in role order) -> (gather [O] with full[:, j] = cat(deltas, zeros)[:, gather[j]],
    or None when the roles write columns 0..O-1 in order; how many columns no role writes)."""
    order = [c for cols in columns for c in cols]
    n_rest = out_features - len(order)
    if order == list(range(out_features)):
        return None, n_rest
    rest = sorted(set(range(out_features)) - set(order))
    pos = {c: i for i, c in enumerate(order + rest)}
    return torch.tensor([pos[j] for j in range(out_features)], device=device), n_rest


def combine_deltas(deltas: list[Tensor], gather: Tensor | None, n_rest: int) -> Tensor:
    """Role deltas [..., O_role] -> one [..., O] delta in the layer's column order (zeros for unadapted columns)."""
    if n_rest:
        deltas = deltas + [deltas[0].new_zeros(*deltas[0].shape[:-1], n_rest)]
    full = torch.cat(deltas, dim=-1) if len(deltas) > 1 else deltas[0]
    return full if gather is None else full.index_select(-1, gather)
