"""What a text-to-image run refuses before anything starts (exit 2, one line naming the field and the fix): flipped
latents, a feature classifier with no classes, a data folder without metadata.jsonl, class names no caption names;
and the warning when the training images are the evaluation's FD reference.
"""

from __future__ import annotations

import pytest
import torch

from pd_core.config import ConfigError, load_config
from pd_core.data.class_captions import write_caption_folder
from tests.sd_models import saved_sd_pipeline

CAPTIONS = ["a photo of a bag", "", "a photo of a coat", "a photo of a bag"]


def _overrides(tmp_path, *more: str) -> list[str]:
    return [f"pipeline.teacher_uri=diffusers:{saved_sd_pipeline()}", "data.name=captions", f"data.url={tmp_path}",
            "data.image_size=8", f"storage.root={tmp_path / 'store'}", *more]


def _write(url, captions=CAPTIONS) -> None:
    images = torch.randint(0, 256, (len(captions), 3, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    write_caption_folder(images, captions, str(url))


@pytest.mark.parametrize("more,field", [
    (["data.random_flip=true", "eval.class_names=[bag]"], "data.random_flip"),
    (["eval.features=classifier"], "eval.features"),
])
def test_flipped_latents_and_a_classifier_without_classes_are_refused_by_the_config(tmp_path, more, field):
    with pytest.raises(ConfigError, match=field) as err:
        load_config(preset="smoke", overrides=_overrides(tmp_path, *more))
    assert "\n" not in str(err.value)
    load_config(preset="smoke", overrides=_overrides(tmp_path, "eval.enabled=false"))  # no evaluation: no classes


def test_a_data_folder_without_metadata_or_with_unnamed_classes_is_refused_before_the_run(tmp_path):
    from pd_core.text_to_image import caption_data_warning, preflight_caption_data

    cfg = load_config(preset="smoke", overrides=_overrides(tmp_path, "eval.class_names=[bag, coat, shoe]"))
    with pytest.raises(ConfigError, match=r"^data\.url: .*metadata\.jsonl does not exist"):
        preflight_caption_data(cfg)
    _write(tmp_path)
    with pytest.raises(ConfigError, match=r"^eval\.class_names: no caption of .* is 'a photo of a shoe' \(1 of 3"):
        preflight_caption_data(cfg)
    named = load_config(preset="smoke", overrides=_overrides(tmp_path, "eval.class_names=[bag, coat]"))
    preflight_caption_data(named)
    assert "the training images are the FD reference" in caption_data_warning(named)
    for split in ("train", "test"):
        _write(tmp_path / "split" / split)
    split = load_config(preset="smoke", overrides=[*_overrides(tmp_path, "eval.class_names=[bag, coat]"),
                                                   f"data.url={tmp_path / 'split'}"])
    preflight_caption_data(split)
    assert caption_data_warning(split) is None
