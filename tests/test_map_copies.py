"""Full-size maps leave the engine without copies a view or an in-place step avoids, and unchanged."""

import cv2
import numpy as np

from hiad_runtime.batch import Input, OutputSettings, score_input
from hiad_runtime.inspector import Inspector
from hiad_runtime.serve.payload import map_png


def test_predicted_map_is_saved_without_a_copy(bundle_dir, test_samples):
    inspector = Inspector.load(bundle_dir)
    image = test_samples[0].image(inspector.tiling.image_size)
    expected = inspector.predict(image).anomaly_map
    seen = []
    predict = inspector.predict
    inspector.predict = lambda x: seen.append(predict(x)) or seen[-1]
    scored = score_input(inspector, Input("x.png", "x"), lambda: image, OutputSettings())
    assert scored.anomaly_map is seen[0].anomaly_map  # the engine's map itself, not an astype copy
    np.testing.assert_array_equal(scored.anomaly_map, expected)


def test_map_png_is_bit_identical_to_the_out_of_place_formula(bundle_dir, test_samples):
    anomaly_map = Inspector.load(bundle_dir).predict(test_samples[1].image((256, 256))).anomaly_map
    before = anomaly_map.copy()
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    expected = np.round((anomaly_map - low) / max(high - low, 1e-12) * 65535).astype(np.uint16)
    png = map_png(anomaly_map)

    decoded = cv2.imdecode(np.frombuffer(png.data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(anomaly_map, before)  # the caller's map is left as it was
    assert png.range == (low, high)
