"""The rank-mapping manifest: which rank file holds which layer, expert, FFN slice and source bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import __version__
from .errors import VerifyError
from .execute import RankResult
from .plan import Plan
from .writer import layout_rank_file

FORMAT = "moe-convert-manifest"
VERSION = 1
MANIFEST_FILE = "manifest.json"


def build_manifest(plan: Plan, source: dict[str, Any], results: list[RankResult] | None = None) -> dict[str, Any]:
    """The manifest of a plan; `results` (file sizes and sha256) come from a finished conversion.

    A dry run gets the same document with `sha256` null, so tools read both the same way.
    """
    sha = {r.file: r.sha256 for r in results or []}
    ranks = []
    for r in plan.ranks:
        layout = layout_rank_file(r)
        ranks.append(
            {
                "rank": r.coords.rank,
                "tp_rank": r.coords.tp_rank,
                "pp_rank": r.coords.pp_rank,
                "moe_tp_rank": r.coords.moe_tp_rank,
                "moe_ep_rank": r.coords.moe_ep_rank,
                "file": r.file,
                "bytes": layout.size,
                "sha256": sha.get(r.file),
                "layers": list(r.layers),
                "experts": list(r.experts),
                "ffn_slice": list(r.ffn_slice),
                "tensors": {
                    t.name: {
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "data_offsets": [
                            layout.offsets[t.name] - layout.data_start,
                            layout.offsets[t.name] - layout.data_start + t.nbytes,
                        ],
                        "pieces": [
                            {
                                "source": p.source,
                                "slice": [list(b) for b in p.box],
                                "dst_offset": p.dst_offset,
                            }
                            for p in t.pieces
                        ],
                    }
                    for t in r.tensors
                },
            }
        )
    experts: dict[int, list[dict[str, Any]]] = {}
    for r in plan.ranks:
        for e in r.experts:
            experts.setdefault(e, []).append(
                {"rank": r.coords.rank, "layers": list(r.layers), "ffn_slice": list(r.ffn_slice)}
            )
    return {
        "format": FORMAT,
        "version": VERSION,
        "tool": {"name": "moe-convert", "version": __version__},
        "source": source,
        "architecture": plan.spec.architecture,
        "expert_layout": plan.expert_layout,
        "dtype": plan.dtype,
        "options": plan.options.as_dict(),
        "mapping": plan.mapping.as_dict(),
        "total_bytes": sum(r["bytes"] for r in ranks),
        "ranks": ranks,
        "experts": [{"expert": e, "holders": holders} for e, holders in sorted(experts.items())],
    }


def read_manifest(output_dir: Path) -> dict[str, Any]:
    path = output_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise VerifyError(f"{path}: not found; is {output_dir} a moe-convert output?") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerifyError(f"{path}: unreadable: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise VerifyError(f"{path}: not a moe-convert manifest (format is not {FORMAT!r})")
    if data.get("version") != VERSION:
        raise VerifyError(f"{path}: manifest version {data.get('version')!r}; this tool reads {VERSION}")
    return data
