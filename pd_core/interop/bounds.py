"""Size bounds of a diffusers folder, checked from its configs and the weights' header before anything is built.

Every size a folder declares is bounded before it costs memory or time: the scheduler's T
(``num_train_timesteps`` <= ``MAX_TRAIN_TIMESTEPS``; ``trained_betas`` must hold exactly T finite
betas in (0, 1)), the UNet2DModel config's sizes (channels, levels, layers per level, classes) and
the parameter count they imply, computed from the config alone:

    conv(i, o, k) = i*o*k^2 + o                     resnet(i, o) = 2i + conv(i, o, 3) + (E*o + o)
    attn(c) = 2c + 4(c^2 + c)                                      + 2o + conv(o, o, 3) + [i != o] conv(i, o, 1)
    down level l (channels c_{l-1} -> c_l, L layers): sum_j resnet(j ? c_l : c_{l-1}, c_l) [+ attn(c_l)]
                                                      + conv(c_l, c_l, 3) unless l is the last level
    up level (L + 1 layers, skips from the mirrored down path), mid = 2 resnet(c, c) + attn(c),
    time MLP conv0 -> E -> E with E = 4 c_0, class table n*E, conv_in, norm_out, conv_out.

This is exact for the DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D family (checked
against diffusers' own model built on the meta device) and counts only the resnets of other block
types, a lower bound, so a refusal never hits a model within ``MAX_PARAMETERS``. JSON documents
are bounded in nesting depth; a safetensors header is read and checked against the file's size
before its tensors are (a sparse or truncated file is refused after reading 8 bytes and the header).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

MAX_TRAIN_TIMESTEPS = 100_000  # published models use 1000 (a few 4000); the alpha_bar table is O(T)
MAX_JSON_DEPTH = 32  # a diffusers config nests 2 levels deep
MAX_PARAMETERS = 1 << 31  # 8 GiB of float32, the weights file's own bound
MAX_LEVELS = 8  # block_out_channels / down_block_types / up_block_types
MAX_LAYERS_PER_BLOCK = 32
MAX_CHANNELS = 8192
MAX_IMAGE_CHANNELS = 64  # in_channels / out_channels
MAX_SAMPLE_SIZE = 4096
MAX_CLASSES = 1_000_000
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
ATTENTION_TYPES = ("AttnDownBlock2D", "AttnUpBlock2D")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class DiffusersImportError(ValueError):
    """A diffusers folder that cannot be imported; the message is one line naming the file and the fix."""


BoundsError = DiffusersImportError  # a declared size out of bounds is one such refusal


def parse_json(raw: bytes, *, source: str) -> Any:
    """``json.loads`` refusing a document nested deeper than ``MAX_JSON_DEPTH`` (one line naming ``source``).

    The depth is counted over the bytes first (brackets outside strings), so no parser recursion runs.
    """
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise BoundsError(f"{source} nests more than {MAX_JSON_DEPTH} levels deep (a diffusers config "
                                  f"has 2); is it the right file?")
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return json.loads(raw)


def _int_field(config: dict, key: str, *, source: str, low: int, high: int, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BoundsError(f"{source}: {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _int_list(config: dict, key: str, *, source: str, high: int) -> list[int]:
    value = config.get(key)
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LEVELS:
        raise BoundsError(f"{source}: {key} must be a list of 1 to {MAX_LEVELS} channel counts, got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= high:
            raise BoundsError(f"{source}: every {key} entry must be an integer in [1, {high}], got {item!r}")
    return list(value)


def _conv(i: int, o: int, k: int) -> int:
    return i * o * k * k + o


def _resnet(i: int, o: int, temb: int) -> int:
    return 2 * i + _conv(i, o, 3) + temb * o + o + 2 * o + _conv(o, o, 3) + (_conv(i, o, 1) if i != o else 0)


def _attention(c: int) -> int:
    return 2 * c + 4 * (c * c + c)


def unet_parameter_count(config: dict) -> int:
    """Parameters of ``UNet2DModel(**config)`` from its config (exact for the plain/Attn 2D block family)."""
    channels = list(config.get("block_out_channels", (224, 448, 672, 896)))
    layers = int(config.get("layers_per_block", 2))
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    c0, last = channels[0], len(channels) - 1
    temb = int(config.get("time_embedding_dim") or 4 * c0)
    total = _conv(int(config.get("in_channels", 3)), c0, 3) + (c0 * temb + temb) + (temb * temb + temb)
    total += int(config.get("num_class_embeds") or 0) * temb
    out = c0
    for level, kind in enumerate(down):
        inp, out = out, channels[level]
        for j in range(layers):
            total += _resnet(inp if j == 0 else out, out, temb) + (_attention(out) if kind in ATTENTION_TYPES else 0)
        total += _conv(out, out, 3) if level != last else 0
    if config.get("mid_block_type", "UNetMidBlock2D") is not None:
        c = channels[-1]
        total += 2 * _resnet(c, c, temb) + (_attention(c) if config.get("add_attention", True) else 0)
    mirrored = channels[::-1]
    out = mirrored[0]
    for level, kind in enumerate(up):
        prev, out = out, mirrored[level]
        skip_last = mirrored[min(level + 1, last)]
        for j in range(layers + 1):
            res_in = prev if j == 0 else out
            skip = skip_last if j == layers else out
            total += _resnet(res_in + skip, out, temb) + (_attention(out) if kind in ATTENTION_TYPES else 0)
        total += _conv(out, out, 3) if level != last else 0
    total += 2 * c0 + _conv(c0, int(config.get("out_channels", 3)), 3)
    return total


def check_unet_config(config: dict, *, source: str) -> None:
    """BoundsError (one line naming the field) unless every size in a UNet2DModel config is a bounded
    integer and the parameter count it implies is at most ``MAX_PARAMETERS``; nothing is built."""
    _int_field(config, "sample_size", source=source, low=1, high=MAX_SAMPLE_SIZE)
    for key in ("in_channels", "out_channels"):
        _int_field(config, key, source=source, low=1, high=MAX_IMAGE_CHANNELS, default=3)
    channels = _int_list(config, "block_out_channels", source=source, high=MAX_CHANNELS)
    _int_field(config, "layers_per_block", source=source, low=1, high=MAX_LAYERS_PER_BLOCK, default=2)
    for key in ("down_block_types", "up_block_types"):
        kinds = config.get(key)
        if (not isinstance(kinds, (list, tuple)) or len(kinds) != len(channels)
                or not all(isinstance(k, str) for k in kinds)):
            raise BoundsError(f"{source}: {key} must be a list of {len(channels)} block names (one per "
                              f"block_out_channels entry), got {kinds!r}")
    groups = _int_field(config, "norm_num_groups", source=source, low=1, high=MAX_CHANNELS, default=32)
    if any(c % groups for c in channels):
        raise BoundsError(f"{source}: every block_out_channels entry must be a multiple of norm_num_groups "
                          f"{groups}, got {channels}")
    for key, high in (("num_class_embeds", MAX_CLASSES), ("attention_head_dim", MAX_CHANNELS),
                      ("time_embedding_dim", 4 * MAX_CHANNELS)):
        if config.get(key) is not None:
            _int_field(config, key, source=source, low=1, high=high)
    count = unet_parameter_count(config)
    if count > MAX_PARAMETERS:
        raise BoundsError(f"{source}: this config implies {count:,} parameters, more than the {MAX_PARAMETERS:,} "
                          f"allowed (8 GiB of float32); is it the right config?")


def check_scheduler_config(config: dict, *, source: str) -> int:
    """T of a scheduler config after its bounds: 2 <= T <= ``MAX_TRAIN_TIMESTEPS``; ``trained_betas`` (when
    given) exactly T finite numbers in (0, 1). BoundsError naming the field otherwise."""
    steps = _int_field(config, "num_train_timesteps", source=source, low=2, high=MAX_TRAIN_TIMESTEPS, default=1000)
    betas = config.get("trained_betas")
    if betas is None:
        return steps
    if not isinstance(betas, (list, tuple)) or len(betas) != steps:
        size = len(betas) if isinstance(betas, (list, tuple)) else type(betas).__name__
        raise BoundsError(f"{source}: trained_betas must hold exactly num_train_timesteps = {steps} values, got "
                          f"{size}; save the scheduler the model was trained with")
    for beta in betas:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 < beta < 1):
            raise BoundsError(f"{source}: every trained_betas value must be a finite number in (0, 1), got {beta!r}")
    return steps


def read_safetensors_header(handle, *, size: int, source: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from the header at the start of an open safetensors file of ``size`` bytes.

    Reads 8 bytes and the header only; BoundsError unless the header is JSON within ``MAX_HEADER_BYTES`` and
    the tensors it declares (dtype bytes x shape product) fill the rest of the file exactly, back to back.
    """
    head = handle.read(8)
    if len(head) < 8:
        raise BoundsError(f"{source} is {size} bytes, too short for a safetensors file")
    (length,) = struct.unpack("<Q", head)
    if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
        raise BoundsError(f"{source} is not a safetensors file (its first 8 bytes declare a {length}-byte header "
                          f"in a {size}-byte file); re-save the model with save_pretrained")
    try:
        header = parse_json(handle.read(length), source=source)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BoundsError(f"{source} is not a safetensors file (its header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise BoundsError(f"{source} is not a safetensors file (its header is not a JSON object)")
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            want = DTYPE_BYTES[dtype] * math.prod(shape)
        except (TypeError, KeyError, ValueError):
            raise BoundsError(f"{source}: the header entry of {name!r} is malformed") from None
        if any(d < 0 for d in shape) or not (isinstance(begin, int) and isinstance(end, int)) or end - begin != want:
            raise BoundsError(f"{source}: {name} declares {want} bytes but spans {info['data_offsets']}")
        tensors[name] = (dtype, shape)
        spans.append((begin, end))
    expected = 0
    for begin, end in sorted(spans):
        if begin != expected:
            raise BoundsError(f"{source}: the tensors of its header overlap or leave gaps at byte {begin}")
        expected = end
    if 8 + length + expected != size:
        raise BoundsError(f"{source} is {size} bytes but its header declares {8 + length + expected} (tensors "
                          f"{expected} bytes): truncated, padded or not a safetensors file; re-save the model")
    return tensors


def weights_header(fs, path: str, *, source: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """:func:`read_safetensors_header` of the file at ``path`` of fsspec filesystem ``fs``."""
    try:
        size = int(fs.size(path))
        with fs.open(path, "rb") as handle:
            return read_safetensors_header(handle, size=size, source=source)
    except FileNotFoundError:
        raise DiffusersImportError(f"{source} does not exist") from None
    except OSError as err:
        raise DiffusersImportError(f"{source} could not be read: {err}") from None


def guidance_problem(*, guidance_enabled: bool, guidance_weights: tuple[float, ...] | list[float]) -> str | None:
    """Why a config cannot guide an imported UNet2DModel (its class embedding has no null class), else None."""
    if guidance_enabled:
        return ("guidance.enabled: an imported diffusers UNet2DModel has no null class (classifier-free guidance "
                "needs one); set guidance.enabled=false, or import a teacher trained here with "
                "teacher.label_dropout > 0")
    guided = [w for w in guidance_weights if w > 0]
    if guided:
        return (f"eval.guidance_weights: w = {guided[0]:g} needs a null class, which an imported diffusers "
                f"UNet2DModel does not have; use eval.guidance_weights=[0]")
    return None
