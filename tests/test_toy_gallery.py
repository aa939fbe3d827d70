"""StyleGallery's regions on the toy base model (issue 14's check): the recipe, run on the shipped
base, finds the colour regions of flat three-colour designs, IoU >= 0.8 for every colour."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 64


def _bands():
    labels = np.zeros((SIDE, SIDE), int)
    labels[:, 21:43], labels[:, 43:] = 1, 2
    return labels


def _disc_in_ring():
    yy, xx = np.mgrid[:SIDE, :SIDE]
    r = np.hypot(yy - 31.5, xx - 31.5)
    labels = np.zeros((SIDE, SIDE), int)
    labels[r < 24], labels[r < 12] = 1, 2
    return labels


def best_iou_per_label(found: np.ndarray, truth: np.ndarray) -> list[float]:
    """For each true label, the best IoU of any found region with it."""
    return [max(float(((found == j) & (truth == k)).sum() / ((found == j) | (truth == k)).sum())
                for j in np.unique(found)) for k in np.unique(truth)]


def test_best_iou_per_label_on_hand_made_labels():
    truth = np.array([[0, 0, 1, 1]])
    assert best_iou_per_label(truth * 3, truth) == [1.0, 1.0]
    assert best_iou_per_label(np.array([[0, 0, 0, 1]]), truth) == [2 / 3, 0.5]


@pytest.mark.parametrize("layout", [_bands, _disc_in_ring], ids=["bands", "disc_in_ring"])
def test_regions_of_a_flat_three_colour_design_are_its_colours(layout):
    from toyworld.gallery import regions
    from toyworld.generator import FABRICS, PALETTE
    from toyworld.model import load_toy_model

    unet, encoder = load_toy_model()
    truth = layout()
    colours = np.asarray([FABRICS["linen"], PALETTE["red"], PALETTE["blue"]], np.float32)
    found = regions(unet, encoder, torch.from_numpy(colours[truth])[None]).numpy()
    scale = SIDE // found.shape[0]
    ious = best_iou_per_label(np.kron(found, np.ones((scale, scale), int)), truth)
    assert min(ious) >= 0.8, ious
