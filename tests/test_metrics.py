"""The TensorBoard expert-usage heatmap: one figure redrawn per call must give what a fresh figure gives."""
import numpy as np

from btx_jax.metrics import UsageHeatmap


def test_a_redrawn_heatmap_equals_a_fresh_one_and_follows_the_data():
    rng = np.random.default_rng(0)
    first, second = rng.dirichlet(np.ones(4), size=2), rng.dirichlet(np.ones(4), size=2)
    reused = UsageHeatmap()
    image_first = reused(first)
    image_second = reused(second)  # the same figure, new data and colour range
    assert image_first.dtype == np.uint8 and image_first.ndim == 3 and image_first.shape[-1] == 3
    np.testing.assert_array_equal(image_second, UsageHeatmap()(second))
    np.testing.assert_array_equal(reused(first), image_first)
    assert np.abs(image_first.astype(int) - image_second.astype(int)).max() > 50  # the cells changed colour
    more = rng.dirichlet(np.ones(8), size=3)
    wider = reused(more)  # another shape: a new figure of its own size
    np.testing.assert_array_equal(wider, UsageHeatmap()(more))
    assert wider.shape[1] > image_first.shape[1] and wider.shape[0] > image_first.shape[0]
