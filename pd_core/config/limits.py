"""What a config's sizes imply, bounded at config time: the U-Net's parameters and one update's activations.

Both are lower bounds computed from the config alone (no torch), by walking the U-Net's levels as
:class:`pd_core.unet.UNet` builds them (channels c_l = ch * ch_mult[l], resolution H_l = H / 2^l):

    params >= sum over res blocks (in -> out, emb width E)  9 in out + 9 out^2 + 2 E out
              (+ 9 c^2 per plain-conv resampler)
    activation bytes of one update >= 4 * batch * sum over res blocks (in + out) H_l^2

(each res block keeps at least its two convolutions' inputs for the backward pass). A config whose
network exceeds ``MAX_PARAMETERS`` or whose update needs more than ``MAX_UPDATE_BYTES`` of
activations is refused with one line naming the field, before anything is allocated.
"""

from __future__ import annotations

MAX_PARAMETERS = 1 << 31  # 8 GiB of float32 weights
MAX_UPDATE_BYTES = 1 << 40  # 1 TiB of activations for one update: no machine holds more
MAX_CHANNELS = 4096  # model.ch, head_dim, norm_groups
MAX_BATCH = 1 << 20  # examples per update or per sampling batch
MAX_UPDATES = 1_000_000_000  # updates of one stage (and cadences)
MAX_STEPS = 1 << 16  # distill.start_steps (the paper starts at 1024 or 8192)
MAX_IMAGE_SIZE = 4096
MAX_LEVELS = 8  # len(model.ch_mult)
MAX_MULT = 64  # each model.ch_mult entry
MAX_RES_BLOCKS = 64


def _res_blocks(*, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, image_size: int,
                resblock_resample: bool) -> list[tuple[int, int, int]]:
    """(in channels, out channels, resolution) of every res block, in build order (resamplers included)."""
    blocks, skips = [], [ch]
    c, res = ch, image_size
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            blocks.append((c, ch * mult, res))
            c = ch * mult
            skips.append(c)
        if level != len(ch_mult) - 1:
            if resblock_resample:
                blocks.append((c, c, res))
            skips.append(c)
            res //= 2
    blocks += [(c, c, res), (c, c, res)]  # the middle block
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            blocks.append((c + skips.pop(), ch * mult, res))
            c = ch * mult
        if level != 0:
            if resblock_resample:
                blocks.append((c, c, res))
            res *= 2
    return blocks


def parameters_at_least(*, ch: int, emb_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, image_size: int,
                        resblock_resample: bool) -> int:
    """A lower bound on the U-Net's parameter count (its res blocks' convolutions and embedding projections)."""
    blocks = _res_blocks(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, image_size=image_size,
                         resblock_resample=resblock_resample)
    total = sum(9 * i * o + 9 * o * o + 2 * emb_ch * o for i, o, _ in blocks)
    if not resblock_resample:
        total += sum(9 * (ch * m) ** 2 for m in ch_mult[:-1]) * 2  # one conv down and one up per inner level
    return total


def activation_bytes_at_least(*, batch: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                              image_size: int, resblock_resample: bool) -> int:
    """A lower bound on the float32 activations one training update of ``batch`` examples keeps for backward."""
    blocks = _res_blocks(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, image_size=image_size,
                         resblock_resample=resblock_resample)
    return 4 * batch * sum((i + o) * res * res for i, o, res in blocks)


def size_problem(*, model, image_size: int, batches: dict[str, int]) -> tuple[str, str] | None:
    """(field, message) of the first size a config implies beyond its bound, else None."""
    shape = dict(ch=model.ch, ch_mult=tuple(model.ch_mult), num_res_blocks=model.num_res_blocks,
                 image_size=image_size, resblock_resample=model.resblock_resample)
    params = parameters_at_least(emb_ch=model.resolved_emb_ch, **shape)
    if params > MAX_PARAMETERS:
        return "model.ch", (f"implies at least {params:,} parameters (model.ch {model.ch}, ch_mult "
                            f"{list(model.ch_mult)}, num_res_blocks {model.num_res_blocks}), more than the "
                            f"{MAX_PARAMETERS:,} allowed; use a smaller model")
    for field, batch in batches.items():
        need = activation_bytes_at_least(batch=batch, **shape)
        if need > MAX_UPDATE_BYTES:
            return field, (f"{batch} examples of {image_size}x{image_size} need at least {need / 2**40:,.1f} TiB of "
                           f"activations per update (more than the {MAX_UPDATE_BYTES >> 40} TiB allowed); "
                           f"lower {field}")
    return None
