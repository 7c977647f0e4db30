"""The one registry of attention blocks: names, phi integers, aliases, and users' own blocks.

A name becomes a module in exactly one place, `build_attention`. The built-in blocks register in
phi order (`utils.config.PHI_NAMES`); a user's file registers more with `@register_attention("name")`
and is imported with `load_plugin` (train.py / predict.py `--plugin FILE`): no edits to this project.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

from utils.config import PHI_NAMES
from utils.log import get_logger

log = get_logger(__name__)

ATTENTION_BLOCKS: dict[str, type[nn.Module]] = {}
ALIASES: dict[str, str] = {"0": "none", "": "none"}
_loaded_plugins: dict[Path, list[str]] = {}


def register_attention(name: str, *aliases: str):
    """Class decorator: make a block `Block(channels, **options)` available under `name` (and aliases)."""
    key = name.strip().lower()

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if not key or key == "none" or key.isdigit() or ":" in key or "=" in key or "," in key:
            raise ValueError(f"register_attention({name!r}): a block name is a word, not 'none', a number "
                             "or one with ':', '=' or ','")
        if key in ATTENTION_BLOCKS or key in ALIASES:
            raise ValueError(f"register_attention({name!r}): the name is taken by "
                             f"{ATTENTION_BLOCKS.get(key, ATTENTION_BLOCKS.get(ALIASES.get(key, '')))}")
        ATTENTION_BLOCKS[key] = cls
        for alias in aliases:
            ALIASES[alias.strip().lower()] = key
        return cls

    return add


def attention_name(phi_or_name: int | str | None) -> str:
    """Canonical block name for a phi integer, a digit string, a name or an alias."""
    key = "none" if phi_or_name is None else str(phi_or_name).strip().lower()
    key = ALIASES.get(key, key)
    if key.isdigit() and int(key) < len(PHI_NAMES):
        key = PHI_NAMES[int(key)]
    if key != "none" and key not in ATTENTION_BLOCKS:
        choices = ", ".join(f"{i}={n}" for i, n in enumerate(PHI_NAMES))
        own = [n for n in ATTENTION_BLOCKS if n not in PHI_NAMES]
        extra = f"; registered by plugins: {', '.join(own)}" if own else "; your own block: --plugin FILE"
        raise ValueError(f"unknown attention {phi_or_name!r}; choose a phi or name from: {choices}{extra}")
    return key


def attention_phi(phi_or_name: int | str | None) -> int | None:
    """The phi integer (0-11) of a built-in block; None for a block registered by a plugin."""
    name = attention_name(phi_or_name)
    return PHI_NAMES.index(name) if name in PHI_NAMES else None


def build_attention(phi_or_name: int | str | None, channels: int, **options) -> nn.Module:
    """The attention block for `phi_or_name` at `channels`, or nn.Identity() for 0/'none'."""
    name = attention_name(phi_or_name)
    if name == "none":
        return nn.Identity()
    try:
        return ATTENTION_BLOCKS[name](channels, **options)
    except TypeError as exc:     # an option the block does not take
        raise ValueError(f"attention {name!r}: {exc}") from None


def attention_placement(attention: int | str | dict, points: tuple[str, ...]) -> dict[str, dict]:
    """Every point's block spec {"type": name, **options}: one block everywhere, or a dict per point."""
    if not isinstance(attention, dict):
        return {p: {"type": attention} for p in points}
    unknown = sorted(set(attention) - set(points))
    if unknown:
        raise ValueError(f"attention points {', '.join(unknown)} do not exist in this model; its points are "
                         f"{', '.join(points)}")
    return {p: dict(attention.get(p) or {"type": "none"}) for p in points}


def build_point(spec: dict, channels: int) -> nn.Module:
    """The block of one point from its spec {"type": name, **options}."""
    options = {k: v for k, v in spec.items() if k != "type"}
    return build_attention(spec["type"], channels, **options)


def start_near_identity(points: dict[str, nn.Module]) -> dict[str, str]:
    """Start each point's block close to identity where its design allows (for a pretrained detector).

    A block does so through its own `start_near_identity()` (gates set constant near 1); blocks without
    one keep their papers' init. Returns {point: "near identity" | "paper init (<why>)"} for the log.
    """
    done = {}
    for point, block in points.items():
        if isinstance(block, nn.Identity):
            continue
        if hasattr(block, "start_near_identity"):
            block.start_near_identity()
            done[point] = "near identity"
        else:
            done[point] = f"paper init ({type(block).__name__} has no near-identity start)"
    return done


def load_plugin(path: str | Path) -> list[str]:
    """Import a user's Python file of @register_attention blocks (once per process); returns the names it added."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise FileNotFoundError(f"--plugin {path}: no such Python file")
    key = path.resolve()
    if key in _loaded_plugins:
        return _loaded_plugins[key]
    before = set(ATTENTION_BLOCKS)
    module_name = f"attention_plugin_{len(_loaded_plugins)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module      # lets DataLoader workers and pickling find the block classes
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ValueError(f"--plugin {path}: importing it failed: {type(exc).__name__}: {exc}") from None
    added = [n for n in ATTENTION_BLOCKS if n not in before]
    if not added:
        raise ValueError(f"--plugin {path}: it registers no block; decorate a class with "
                         "@register_attention('name') (from nets.attention import register_attention)")
    _loaded_plugins[key] = added
    log.info("plugin %s: registered %s", path, ", ".join(added))
    return added
