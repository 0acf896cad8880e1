"""A Stable Diffusion-style pipeline folder before any tensor is read: components, configs, files, hashes.

A text-to-image pipeline folder is what ``StableDiffusionPipeline.save_pretrained`` writes:
``model_index.json`` naming the pipeline class and, per component, ``[library, class]``, and one
subfolder per component:

    unet/          UNet2DConditionModel  config.json + diffusion_pytorch_model.safetensors
    vae/           AutoencoderKL         config.json + diffusion_pytorch_model.safetensors
    text_encoder/  CLIPTextModel         config.json + model.safetensors
    tokenizer/     CLIPTokenizer         tokenizer.json, or vocab.json + merges.txt (+ tokenizer_config.json,
                                         special_tokens_map.json when present)
    scheduler/     a DDPM-family scheduler config (scheduler_config.json)

Other components (``safety_checker``, ``feature_extractor``, ...) are never read. Every component
is checked before anything heavy loads: weights are safetensors only (a pickle is refused and never
opened), every file read lies inside the folder (a symlink out of it is refused), every read is
bounded in size, and the configs must fit together (the UNet's ``cross_attention_dim`` is the text
encoder's ``hidden_size``, its ``in_channels`` the VAE's ``latent_channels``). Errors are one
:class:`DiffusersImportError` line naming the component, the file and the field.

Lineage: every file a load reads is hashed (sha256, streamed); a component's hash is the sha256 of
its ``name sha256`` lines, and :func:`source_sha256` of all components is what an imported teacher
records as its parent, so a changed UNet, VAE, text encoder, tokenizer or scheduler is never reused.
No torch and no diffusers here, so a run checks a folder before anything heavy loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from pd_core.config import Config, ConfigError
from pd_core.interop.diffusers_folder import (
    MAX_JSON_BYTES,
    PICKLE_NAME,
    PREDICTION_TYPES,
    WEIGHTS_NAME,
    DiffusersImportError,
    _Folder,
    _public,
    check_timesteps,
    diffusers_location,
    is_diffusers_uri,
    scheduler_parameterization,
    scheduler_timesteps,
)
from pd_core.kinds import check_combination

PIPELINE_CLASSES = ("StableDiffusionPipeline",)
INDEX_NAME = "model_index.json"
TEXT_WEIGHTS_NAME = "model.safetensors"  # transformers' file name
TEXT_PICKLE_NAME = "pytorch_model.bin"
MAX_WEIGHTS_BYTES = 8 << 30  # any published SD UNet is under 4 GiB in fp32
MAX_TOKENIZER_BYTES = 16 << 20  # CLIP's vocab.json is about 1 MB, its tokenizer.json about 3.5 MB
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ComponentRule:
    """What a required component must be: its library and classes, its config file, its weights and pickles."""

    library: str
    classes: tuple[str, ...]
    config: str | None
    weights: str | None = None
    pickles: tuple[str, ...] = ()


RULES = {
    "unet": ComponentRule("diffusers", ("UNet2DConditionModel",), "config.json", WEIGHTS_NAME, (PICKLE_NAME,)),
    "vae": ComponentRule("diffusers", ("AutoencoderKL",), "config.json", WEIGHTS_NAME, (PICKLE_NAME,)),
    "text_encoder": ComponentRule("transformers", ("CLIPTextModel",), "config.json", TEXT_WEIGHTS_NAME,
                                  (TEXT_PICKLE_NAME,)),
    "tokenizer": ComponentRule("transformers", ("CLIPTokenizer", "CLIPTokenizerFast"), None),
    "scheduler": ComponentRule("diffusers", (), "scheduler_config.json"),
}


@dataclass(frozen=True)
class TextToImageFolder:
    """The checked configs of a Stable Diffusion-style folder and the files a load reads, per component."""

    folder: _Folder
    pipeline_class: str
    configs: dict  # component -> its config (diffusers' private keys removed); the tokenizer's is {}
    files: dict  # component -> tuple of file names (inside the component's subfolder) a load reads

    @property
    def location(self) -> str:
        return self.folder.location

    @property
    def scheduler_config(self) -> dict:
        return self.configs["scheduler"]

    @property
    def parameterization(self) -> str:
        """eps / v / x from the scheduler's prediction_type."""
        return scheduler_parameterization(self.scheduler_config)

    @property
    def num_train_timesteps(self) -> int:
        return scheduler_timesteps(self.scheduler_config)

    @property
    def latent_size(self) -> int:
        return int(self.configs["unet"]["sample_size"])

    @property
    def vae_scale_factor(self) -> int:
        """Image size / latent size, as StableDiffusionPipeline computes it (2 ** (VAE levels - 1))."""
        return 2 ** (len(self.configs["vae"].get("block_out_channels", (64,))) - 1)

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_scale_factor

    def url(self, component: str, name: str) -> str:
        return self.folder.url(component, name)


def _fail(component: str, message: str) -> DiffusersImportError:
    return DiffusersImportError(f"{component}: {message}")


def _is_local(folder: _Folder) -> bool:
    protocol = folder.fs.protocol
    return bool({"file", "local"} & set(protocol if isinstance(protocol, tuple) else (protocol,)))


def _check_inside(folder: _Folder, component: str, *names: str) -> None:
    """Refuse a file (or folder) that resolves outside the pipeline folder: a symlink out of it."""
    if not _is_local(folder):
        return  # object stores have no links
    root = os.path.realpath(folder.root)
    target = os.path.realpath(folder.path(*names))
    if os.path.commonpath([root, target]) != root:
        raise _fail(component, f"{folder.url(*names)} links to {target}, outside the pipeline folder; copy the "
                               f"file into the folder instead of linking to it")


def _read_index(folder: _Folder) -> dict:
    _check_inside(folder, "model_index", INDEX_NAME)
    if not folder.is_file(INDEX_NAME):
        raise DiffusersImportError(f"{folder.url(INDEX_NAME)} does not exist; point diffusers: at the folder "
                                   f"StableDiffusionPipeline.save_pretrained wrote")
    index = folder.json(INDEX_NAME)
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise DiffusersImportError(f"{folder.url(INDEX_NAME)}: _class_name {name!r} is not a text-to-image pipeline "
                                   f"this import reads ({', '.join(PIPELINE_CLASSES)})")
    return index


def _check_entry(index: dict, folder: _Folder, component: str, rule: ComponentRule) -> None:
    entry = index.get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
        raise _fail(component, f"{folder.url(INDEX_NAME)} names no {component} component ([library, class], got "
                               f"{entry!r}); save the whole pipeline with save_pretrained")
    library, cls = entry
    if library != rule.library or (rule.classes and cls not in rule.classes):
        want = " or ".join(rule.classes) if rule.classes else "a scheduler"
        raise _fail(component, f"{folder.url(INDEX_NAME)} names [{library!r}, {cls!r}], not {rule.library}'s {want}")


def _weights_file(folder: _Folder, component: str, rule: ComponentRule) -> str:
    """The component's safetensors file name; a pickle is refused here and never opened."""
    if folder.is_file(component, rule.weights):
        _check_inside(folder, component, component, rule.weights)
        size = int(folder.fs.size(folder.path(component, rule.weights)))
        if size > MAX_WEIGHTS_BYTES:
            raise _fail(component, f"{folder.url(component, rule.weights)} is {size} bytes, more than the "
                                   f"{MAX_WEIGHTS_BYTES} allowed; is it the right file?")
        return rule.weights
    for pickle in rule.pickles:
        if folder.is_file(component, pickle):
            raise _fail(component, f"{folder.url(component, pickle)} is a pickle, which can run code when loaded and "
                                   f"is never opened here: re-save the pipeline with save_pretrained(folder, "
                                   f"safe_serialization=True) to get {component}/{rule.weights}")
    if folder.is_file(component, f"{rule.weights}.index.json"):
        raise _fail(component, f"{folder.url(component, rule.weights)} is sharded; re-save the pipeline with "
                               f"save_pretrained(folder, max_shard_size='8GB') to get one file")
    raise _fail(component, f"{folder.url(component, rule.weights)} does not exist; save the pipeline with "
                           f"save_pretrained(folder)")


def _config(folder: _Folder, component: str, name: str) -> dict:
    _check_inside(folder, component, component)
    _check_inside(folder, component, component, name)
    try:
        return folder.json(component, name)
    except DiffusersImportError as err:
        raise _fail(component, str(err)) from None


def _tokenizer_files(folder: _Folder) -> tuple[str, ...]:
    _check_inside(folder, "tokenizer", "tokenizer")
    if folder.is_file("tokenizer", "tokenizer.json"):
        core: tuple[str, ...] = ("tokenizer.json",)
    elif folder.is_file("tokenizer", "vocab.json") and folder.is_file("tokenizer", "merges.txt"):
        core = ("vocab.json", "merges.txt")
    else:
        raise _fail("tokenizer", f"{folder.url('tokenizer')} holds neither tokenizer.json nor vocab.json + "
                                 f"merges.txt; save the tokenizer with save_pretrained")
    names = core + tuple(n for n in TOKENIZER_EXTRAS if folder.is_file("tokenizer", n))
    for name in names:
        _check_inside(folder, "tokenizer", "tokenizer", name)
        size = int(folder.fs.size(folder.path("tokenizer", name)))
        if size > MAX_TOKENIZER_BYTES:
            raise _fail("tokenizer", f"{folder.url('tokenizer', name)} is {size} bytes, more than the "
                                     f"{MAX_TOKENIZER_BYTES} allowed; is it the right file?")
    return names


def _positive_int(component: str, source: str, config: dict, field: str) -> int:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(component, f"{source}: {field} must be a positive integer, got {value!r}")
    return value


def _check_unet(config: dict, *, source: str) -> None:
    for field in ("sample_size", "in_channels", "out_channels", "cross_attention_dim"):
        _positive_int("unet", source, config, field)
    if config.get("time_embedding_type", "positional") != "positional":
        raise _fail("unet", f"{source}: time_embedding_type {config.get('time_embedding_type')!r} is not supported "
                            f"(the network must take fractional timesteps: positional)")
    for field in ("addition_embed_type", "class_embed_type", "encoder_hid_dim", "num_class_embeds"):
        if config.get(field) is not None:
            raise _fail("unet", f"{source}: {field} is {config[field]!r}; a Stable Diffusion-style UNet is conditioned "
                                f"on the prompt embedding only (set {field} to null)")
    if config["out_channels"] != config["in_channels"]:
        raise _fail("unet", f"{source}: out_channels {config['out_channels']} must equal in_channels "
                            f"{config['in_channels']} (one prediction per latent channel)")


def _check_fit(configs: dict, *, tti: _Folder) -> None:
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    latent = _positive_int("vae", tti.url("vae", "config.json"), vae, "latent_channels")
    if unet["in_channels"] != latent:
        raise _fail("unet", f"{tti.url('unet', 'config.json')}: in_channels {unet['in_channels']} must equal the "
                            f"VAE's latent_channels {latent}")
    scale = vae.get("scaling_factor", 0.18215)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise _fail("vae", f"{tti.url('vae', 'config.json')}: scaling_factor must be a positive number, got {scale!r}")
    hidden = _positive_int("text_encoder", tti.url("text_encoder", "config.json"), text, "hidden_size")
    if unet["cross_attention_dim"] != hidden:
        raise _fail("unet", f"{tti.url('unet', 'config.json')}: cross_attention_dim {unet['cross_attention_dim']} "
                            f"must equal the text encoder's hidden_size {hidden}")
    _positive_int("text_encoder", tti.url("text_encoder", "config.json"), text, "max_position_embeddings")


def _check_scheduler(config: dict, *, source: str) -> None:
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise _fail("scheduler", f"{source}: prediction_type {prediction!r} is not one of "
                                 f"{', '.join(PREDICTION_TYPES)}")
    if config.get("rescale_betas_zero_snr"):
        raise _fail("scheduler", f"{source}: rescale_betas_zero_snr makes alpha_bar 0 at the last timestep "
                                 f"(log-SNR -inf), which DDIM from pure noise cannot represent")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise _fail("scheduler", f"{source}: num_train_timesteps must be an integer >= 2, got {steps!r}")
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise _fail("scheduler", f"{source}: beta_schedule {config.get('beta_schedule')!r} is not one of "
                                 f"{', '.join(BETA_SCHEDULES)}")


def read_text_to_image(uri: str, *, storage_options: dict | None = None) -> TextToImageFolder:
    """Check a Stable Diffusion-style folder (``diffusers:<folder>`` or the bare location); reads JSON only."""
    location = diffusers_location(uri) if is_diffusers_uri(uri) else uri.rstrip("/")
    folder = _Folder(location, storage_options=storage_options)
    index = _read_index(folder)
    configs: dict = {}
    files: dict = {}
    for component, rule in RULES.items():
        _check_entry(index, folder, component, rule)
        if component == "tokenizer":
            configs[component], files[component] = {}, _tokenizer_files(folder)
            continue
        raw = _config(folder, component, rule.config)
        configs[component] = _public(raw) if rule.library == "diffusers" else raw
        names = (rule.config,) if rule.weights is None else (rule.config, _weights_file(folder, component, rule))
        files[component] = names
        if component != "scheduler" and rule.library == "diffusers" and raw.get("_class_name") not in rule.classes:
            raise _fail(component, f"{folder.url(component, rule.config)}: _class_name {raw.get('_class_name')!r} "
                                   f"is not {' or '.join(rule.classes)}")
    text_arch = configs["text_encoder"].get("architectures") or []
    if "CLIPTextModel" not in text_arch and configs["text_encoder"].get("model_type") != "clip_text_model":
        raise _fail("text_encoder", f"{folder.url('text_encoder', 'config.json')}: architectures {text_arch!r} "
                                    f"is not CLIPTextModel")
    _check_unet(configs["unet"], source=folder.url("unet", "config.json"))
    _check_scheduler(configs["scheduler"], source=folder.url("scheduler", "scheduler_config.json"))
    _check_fit(configs, tti=folder)
    return TextToImageFolder(folder=folder, pipeline_class=index["_class_name"], configs=configs, files=files)


def is_text_to_image_folder(uri: str, *, storage_options: dict | None = None) -> bool:
    """Whether ``uri`` is a folder whose model_index.json names a text-to-image pipeline this import reads."""
    try:
        location = diffusers_location(uri) if is_diffusers_uri(uri) else uri.rstrip("/")
        folder = _Folder(location, storage_options=storage_options)
        if not folder.is_file(INDEX_NAME):
            return False
        return folder.json(INDEX_NAME).get("_class_name") in PIPELINE_CLASSES
    except DiffusersImportError:
        return False


def read_file(tti: TextToImageFolder, component: str, name: str) -> bytes:
    """One file of a component, bounded by its kind (config, tokenizer file, weights)."""
    limit = MAX_WEIGHTS_BYTES if name.endswith(".safetensors") else (
        MAX_TOKENIZER_BYTES if component == "tokenizer" else MAX_JSON_BYTES)
    _check_inside(tti.folder, component, component, name)
    try:
        return tti.folder.read(component, name, limit=limit)
    except DiffusersImportError as err:
        raise _fail(component, str(err)) from None


def file_sha256(tti: TextToImageFolder, component: str, name: str, *, chunk: int = 1 << 22) -> str:
    """sha256 of one file of a component, streamed in ``chunk``-byte reads (bounded as :func:`read_file`)."""
    if name.endswith(".safetensors"):
        h, path = hashlib.sha256(), tti.folder.path(component, name)
        _check_inside(tti.folder, component, component, name)
        try:
            with tti.folder.fs.open(path, "rb") as f:
                total = 0
                while block := f.read(chunk):
                    total += len(block)
                    if total > MAX_WEIGHTS_BYTES:
                        raise _fail(component, f"{tti.url(component, name)} is more than {MAX_WEIGHTS_BYTES} bytes")
                    h.update(block)
        except OSError as err:
            raise _fail(component, f"{tti.url(component, name)} could not be read: {err}") from None
        return h.hexdigest()
    return hashlib.sha256(read_file(tti, component, name)).hexdigest()


def component_hashes(tti: TextToImageFolder) -> dict[str, dict[str, str]]:
    """component -> file name -> sha256 of every file a load of the pipeline reads."""
    return {component: {name: file_sha256(tti, component, name) for name in names}
            for component, names in tti.files.items()}


def folder_fingerprint(tti: TextToImageFolder) -> str:
    """A cheap change detector of a checked folder: its configs and each file a load reads with its size and
    modification stamps (fsspec ``info``: mtime, LastModified, ETag, created); a file rewritten in place changes it.
    What caches of the folder's read model are keyed on (the lineage hash is :func:`source_sha256`)."""
    parts = [json.dumps(tti.configs, sort_keys=True, default=str)]
    for component, names in sorted(tti.files.items()):
        for name in names:
            try:
                info = tti.folder.fs.info(tti.folder.path(component, name))
            except OSError as err:
                raise _fail(component, f"{tti.folder.url(component, name)} could not be read: {err}") from None
            stamps = [info.get(k) for k in ("size", "mtime", "LastModified", "ETag", "created")]
            parts.append(f"{component}/{name} {json.dumps(stamps, default=str)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def component_sha256(files: dict[str, str]) -> str:
    """sha256 of one component: of its sorted ``name sha256`` lines."""
    return hashlib.sha256("".join(f"{n} {s}\n" for n, s in sorted(files.items())).encode()).hexdigest()


def source_sha256(hashes: dict[str, dict[str, str]]) -> str:
    """sha256 of the whole pipeline: of its sorted ``component component_sha256`` lines (an import's parent)."""
    lines = "".join(f"{c} {component_sha256(f)}\n" for c, f in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def preflight_text_to_image(cfg: Config) -> TextToImageFolder:
    """Check ``pipeline.teacher_uri`` (a text-to-image folder) against the config before a run starts.

    ConfigError (one line naming the component and field) when the folder cannot be imported,
    ``distill.start_steps`` is finer than its scheduler's timesteps, or the data is not image-caption
    pairs (``data.name`` captions) at the pipeline's image size (the data itself:
    :func:`pd_core.text_to_image.preflight_caption_data`).
    """
    uri = cfg.pipeline.teacher_uri or ""
    try:
        tti = read_text_to_image(uri, storage_options=dict(cfg.storage.storage_options))
        check_timesteps(steps=cfg.distill.start_steps, num_train_timesteps=tti.num_train_timesteps, source=uri)
    except DiffusersImportError as err:
        raise ConfigError(f"pipeline.teacher_uri: {err}") from None
    if cfg.data.name != "captions":
        raise ConfigError(f"data.name must be 'captions' (an image-caption folder, data.url) for the text-to-image "
                          f"teacher {uri}, got {cfg.data.name!r}")
    if cfg.guidance.enabled:  # stage 1's student reads its output as the teacher does, so it starts as the teacher
        try:
            check_combination(parameterization=tti.parameterization, weighting=cfg.diffusion.weighting)
        except ValueError as err:
            raise ConfigError(f"diffusion.weighting: stage 1's student has the teacher's parameterization "
                              f"{tti.parameterization!r}: {err}") from None
    if cfg.data.image_size != tti.image_size:
        raise ConfigError(f"data.image_size must be the pipeline's image size {tti.image_size} (UNet sample_size "
                          f"{tti.latent_size} x VAE factor {tti.vae_scale_factor}), got {cfg.data.image_size}")
    return tti
