"""Upper bounds on sizes read from files, checked before anything is allocated or looped over.

A manifest, a journal or an output's config.json may be edited or hostile: a world size, a layer count or
an expert count of 3e9 must become one line naming the number, not an hour of looping or an OOM. The
bounds are far above any real model (DeepSeek-V3: 61 layers x 256 experts; the largest deployments: a few
thousand GPUs). A model's own sizes (from a source config.json, or the copy a manifest records) are
bounded where config.json is read, in model_config.py.
"""

from __future__ import annotations

MAX_WORLD_SIZE = 65536  # ranks: tp_size * pp_size
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
MAX_RECORDED_TENSORS = 2**22  # source tensors a manifest may list (a model's config bounds its own in model_config)
MAX_INDEX = 2**63 - 1  # shapes, offsets, byte counts: what safetensors and torch can address
