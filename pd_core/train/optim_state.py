"""An optimizer's state dict as tensors (for safetensors) plus a JSON structure: saved and restored without pickle."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

OPTIMIZER_FORMAT = "pd-optimizer/1"
_TENSOR_REF, _TUPLE_REF, _DICT_REF = "__tensor__", "__tuple__", "__dict__"


def _encode_structure(value: Any, path: tuple[str, ...], tensors: dict[str, Tensor]) -> Any:
    """JSON-able copy of ``value`` with each tensor replaced by ``{"__tensor__": name}``."""
    where = "/".join(path) or "<root>"
    if isinstance(value, Tensor):
        name = where
        while name in tensors:  # keys containing "/" could collide; keep every tensor
            name += "~"
        tensors[name] = value.detach()
        return {_TENSOR_REF: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE_REF: [_encode_structure(v, (*path, str(i)), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode_structure(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode_structure(v, (*path, k), tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():  # int keys (param ids) must come back as ints: keep them in a list
            if k is not None and not isinstance(k, (bool, int, float, str)):
                raise TypeError(f"optimizer state key at {where} has type {type(k).__name__}; only "
                                f"str/int/float/bool keys can be stored without pickle")
            items.append([k, _encode_structure(v, (*path, str(k)), tensors)])
        return {_DICT_REF: items}
    raise TypeError(f"optimizer state value at {where} has type {type(value).__name__}, which cannot be stored "
                    f"without pickle")


def _decode_structure(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`_encode_structure`."""
    if isinstance(value, list):
        return [_decode_structure(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR_REF}:
        name = value[_TENSOR_REF]
        if name not in tensors:
            raise ValueError(f"optimizer state refers to tensor {name!r}, which is not among the given tensors "
                             f"(pass the tensors returned by optimizer_state_to_tensors, names unchanged)")
        return tensors[name]
    if set(value) == {_TUPLE_REF}:
        return tuple(_decode_structure(v, tensors) for v in value[_TUPLE_REF])
    if set(value) == {_DICT_REF}:
        return {k: _decode_structure(v, tensors) for k, v in value[_DICT_REF]}
    return {k: _decode_structure(v, tensors) for k, v in value.items()}


def optimizer_state_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-able structure.

    Tensors are named by their path, e.g. ``state/0/exp_avg``; int keys and tuples (``betas``)
    are kept exactly, so :func:`tensors_to_optimizer_state` rebuilds an equal state dict.
    """
    tensors: dict[str, Tensor] = {}
    structure = _encode_structure(dict(state_dict), (), tensors)
    return tensors, {"format": OPTIMIZER_FORMAT, "structure": structure}


def tensors_to_optimizer_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild the state dict saved by :func:`optimizer_state_to_tensors` (for ``optimizer.load_state_dict``)."""
    if meta.get("format") != OPTIMIZER_FORMAT or "structure" not in meta:
        raise ValueError(f"optimizer meta must come from optimizer_state_to_tensors (format {OPTIMIZER_FORMAT!r}), "
                         f"got format {meta.get('format')!r}")
    return _decode_structure(meta["structure"], tensors)

