"""A family is one rules file: every file is complete and consistent, and no code branches on a family."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from moe_convert.architectures import all_rules, supported_architectures
from moe_convert.model_config import FLAG_NAMES, SIZE_NAMES, evaluate, read_sizes
from moe_convert.plan import SPLITS

PACKAGE = Path(__file__).resolve().parents[1] / "moe_convert"
RULES = {r["name"]: r for r in all_rules()}
SCOPES = {"first_stage", "layer", "last_stage"}


def test_the_three_families_are_supported() -> None:
    assert sorted(RULES) == ["mixtral", "qwen2_moe", "qwen3_moe"]
    assert supported_architectures() == ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]


def _entry_keys(entry: Any) -> list[str]:
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, list):
        return entry
    return list(entry["keys"]) if isinstance(entry, dict) else []


@pytest.mark.parametrize("name", sorted(RULES))
def test_rules_file_is_complete_and_consistent(name: str) -> None:
    rules = RULES[name]
    config = rules["config"]
    assert list(config["sizes"]) == list(SIZE_NAMES), "every size of the vocabulary, in its order"
    assert sorted(config["flags"]) == sorted(FLAG_NAMES)
    assert all(set(r) == {"key", "allowed", "why"} for r in config["refuse"])
    for setting in config["settings"].values():
        assert set(setting) <= {"attribute", "default", "values"} and "attribute" in setting
    # the example builds a spec through the rules, so every default expression evaluates
    example = {**rules["example"], "architectures": rules["hf_architectures"], "model_type": rules["model_types"][0]}
    spec = read_sizes(example, f"{name} example")
    dims = spec.dims()
    entries = {**rules["sources"]}
    layouts = rules["expert_layouts"]
    assert "classic" in layouts and "fused" in layouts
    for layout in layouts.values():
        assert "router" in layout
        for key, entry in layout.items():
            assert key not in rules["sources"], f"{key} is both a common source and an expert source"
            entries[key] = entry
    for key, entry in entries.items():
        assert set(entry) <= {"name", "shape", "when", "tied_to", "expert_dim", "rows"}, key
        assert all(evaluate(x, dims) >= 1 for x in entry["shape"]), key
        assert entry.get("when", "qkv_bias") in FLAG_NAMES
        assert entry.get("tied_to", "embed") in rules["sources"]
    names = set(entries)
    for w in rules["weights"]:
        assert set(w) <= {"target", "scope", "sources", "split", "dtype", "when", "why", "weight_only"}, w
        if w.get("weight_only"):  # a linear weight whose pieces are whole rows, in the model dtype
            assert w["weight_only"] is True and w["target"].endswith(".weight") and "dtype" not in w, w
            assert w["split"] in ("qkv_heads", "tp_columns", "tp_rows", "expert_rows", "expert_columns"), w
        assert w["split"] in SPLITS and w["scope"] in SCOPES, w
        assert set(w["sources"]) <= names, w
        assert w.get("when", "qkv_bias") in FLAG_NAMES
        assert ("{local_layer}" in w["target"]) == (w["scope"] == "layer"), w
        for key in w["sources"]:  # a source's flag gates the weights made of it
            assert entries[key].get("when") in (None, w.get("when")), (w["target"], key)
    targets = [w["target"] for w in rules["weights"]]
    assert len(targets) == len(set(targets))
    # every `$name` of the config.json template is a size, flag or setting of the family
    known = {*SIZE_NAMES, *FLAG_NAMES, *config["settings"]}
    refs = re.findall(r'"\$(\w+)"', json.dumps(rules["trtllm_config"]))
    assert set(refs) <= known, set(refs) - known
    assert set(rules["trtllm_config"]) == {
        "architecture",
        "hidden_act",
        "position_embedding_type",
        "logits_dtype",
        "extra",
        "moe",
    } | ({"why"} if "why" in rules["trtllm_config"] else set())
    assert rules["trtllm_config"]["architecture"] in rules["hf_architectures"]
    for entry in [*config["sizes"].values(), *config["flags"].values()]:
        assert all(isinstance(k, str) for k in _entry_keys(entry))


def _family_words() -> set[str]:
    words = set()
    for r in all_rules():
        words |= {r["name"], *r["hf_architectures"], *r["model_types"], r["trtllm_config"]["architecture"]}
    return words


def test_no_code_branches_on_a_family() -> None:
    """No `if family == ...`: no comparison or membership test against a family's name in the package."""
    words = _family_words()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                if any(isinstance(v, str) and v in words for v in constants):
                    found.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Match):
                found.append(f"{path.name}:{node.lineno} (match)")
    assert not found, f"family-specific branches: {found}"


def test_the_branch_detector_works() -> None:
    """Positive control for the test above."""
    tree = ast.parse('if arch == "Qwen3MoeForCausalLM":\n    pass\n')
    compare = next(n for n in ast.walk(tree) if isinstance(n, ast.Compare))
    assert any(isinstance(c, ast.Constant) and c.value in _family_words() for c in ast.walk(compare))
