"""A tiny Stable Diffusion-style pipeline, randomly initialised and saved with save_pretrained (no hub access).

UNet2DConditionModel (cross-attention, 4x4 latents), AutoencoderKL (8x8 RGB images, latents 2x smaller),
a two-layer CLIPTextModel and a CLIPTokenizer built from a vocab.json and merges.txt written here
(single characters, a few merges, so a prompt tokenizes into real BPE tokens). The UNet's weights are
perturbed after diffusers' init so its output depends visibly on the latents, the timestep and the
prompt embedding; what the tests check is that two implementations agree on the same networks.
"""

from __future__ import annotations

import functools
import json
import string
import tempfile
from pathlib import Path

import torch

diffusers = __import__("pytest").importorskip("diffusers")
transformers = __import__("pytest").importorskip("transformers")

MAX_LENGTH = 12  # tokenizer.model_max_length: the prompt embedding is (B, 12, 32)
HIDDEN = 32  # the text encoder's width = the UNet's cross_attention_dim
LATENT_SIZE = 4
IMAGE_SIZE = 8
MERGES = ("p h", "o t", "ot o</w>", "ph oto</w>")  # "photo" merges into one token, other words stay letters


def write_tokenizer_files(folder: Path) -> Path:
    """vocab.json and merges.txt of a tiny byte-level BPE (lowercase letters, digits, punctuation)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    tokens += ["".join(m.split()) for m in MERGES]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return folder


def tiny_tokenizer(tmp: Path):
    """A CLIPTokenizer loaded from the files :func:`write_tokenizer_files` writes."""
    files = write_tokenizer_files(tmp / "tokenizer-files")
    return transformers.CLIPTokenizer.from_pretrained(str(files), model_max_length=MAX_LENGTH)


def tiny_text_encoder(*, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1, projection_dim=HIDDEN)
    return transformers.CLIPTextModel(config).eval()


def tiny_cond_unet(*, seed: int = 0, scale: float = 0.05, time_cond_proj_dim: int | None = None):
    """A two-level UNet2DConditionModel (8 and 16 channels, cross-attention at the lower level), perturbed."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=HIDDEN, attention_head_dim=2,
        time_cond_proj_dim=time_cond_proj_dim)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return unet.eval()


def tiny_vae(*, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                   norm_num_groups=4, sample_size=IMAGE_SIZE).eval()


def ddim_scheduler(*, prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear"):
    """The DDIM our sampler is today: trailing spacing, set_alpha_to_one, no clipping (steps_offset 1, which
    StableDiffusionPipeline insists on, changes only "leading" spacing)."""
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False,
                                   set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1)


def tiny_pipeline(tmp: Path, *, prediction_type: str = "epsilon", seed: int = 0):
    """A StableDiffusionPipeline of the tiny components (no safety checker), DDIM as :func:`ddim_scheduler`."""
    tokenizer = tiny_tokenizer(tmp)
    return diffusers.StableDiffusionPipeline(
        unet=tiny_cond_unet(seed=seed), vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(vocab_size=len(tokenizer), seed=seed), tokenizer=tokenizer,
        scheduler=ddim_scheduler(prediction_type=prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def save_sd_pipeline(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save the tiny pipeline under ``folder`` (safetensors everywhere); returns ``folder``."""
    tiny_pipeline(folder.parent / f".{folder.name}-build", prediction_type=prediction_type,
                  seed=seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def load_sd_pipeline(folder: Path):
    """Stock diffusers' StableDiffusionPipeline.from_pretrained of a saved folder (eval mode, no progress bar)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def saved_sd_pipeline(prediction_type: str = "epsilon") -> Path:
    """One saved tiny pipeline per prediction type for the whole test session (copy it before changing it)."""
    root = Path(tempfile.mkdtemp(prefix="pd-sd-pipeline-"))
    return save_sd_pipeline(root / "pipe", prediction_type=prediction_type)


def one_thread():
    """Generator for a module fixture: torch on one thread while the tiny models run, restored after
    (their operators are too small to share; a second thread only waits on a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
