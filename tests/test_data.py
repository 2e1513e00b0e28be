"""Class weights and the decode size chosen from the manifest."""

from __future__ import annotations

import numpy as np

from fer_ray.data import class_weights, resolve_data_size


def test_class_weights_inverse_frequency_mean_one() -> None:
    w = class_weights([100, 50, 25, 0])
    present = np.array(w[:3])
    assert np.isclose(present.mean(), 1.0)
    assert np.isclose(w[1] / w[0], 2.0) and np.isclose(w[2] / w[0], 4.0)
    assert w[3] == 0.0


def test_class_weights_balanced_data_are_all_one() -> None:
    assert np.allclose(class_weights([10, 10, 10]), 1.0)


def test_data_size_never_exceeds_images_or_model_input() -> None:
    manifest = {"image": {"median_side": 48}}
    assert resolve_data_size(224, manifest, None) == 48  # FER: decode small, resize on device
    assert resolve_data_size(32, manifest, None) == 32
    assert resolve_data_size(224, {"image": {"median_side": 600}}, None) == 224
    assert resolve_data_size(224, manifest, 96) == 96  # explicit --data-size wins
