"""Upper bounds on sizes read from files, checked before anything is allocated or looped over.

A manifest, a journal or an output's config.json may be edited or hostile: a world size, a layer count or
an expert count of 3e9 must become one line naming the number, not an hour of looping or an OOM. The
bounds are far above any real model (DeepSeek-V3: 61 layers x 256 experts; the largest deployments: a few
thousand GPUs).
"""

from __future__ import annotations

MAX_WORLD_SIZE = 65536  # ranks: tp_size * pp_size
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
MAX_EXPERT_WEIGHTS = 2**20  # layers x experts: how many expert weights a plan enumerates
MAX_INDEX = 2**63 - 1  # shapes, offsets, byte counts: what safetensors and torch can address


def over(value: int, limit: int, what: str) -> str | None:
    """A problem line when `value` exceeds `limit`, else None."""
    if value > limit:
        return f"{what} {value} is over the limit of {limit} (no real model or mapping comes near it)"
    return None
