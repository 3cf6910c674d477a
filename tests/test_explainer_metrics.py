"""Honest-map metrics: a user checks that detection maps sit on the objects and depend on the model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from detlens.explainers.metrics import (
    box_area_fraction,
    deletion_insertion,
    detect_with,
    energy_in_box,
    perturbation_curve,
    pointing_game,
    randomisation_check,
    spearman_per_map,
    summarise,
)

# --------------------------------------------------------------------------- energy in box


def test_energy_in_box_is_one_when_all_mass_is_inside_the_box() -> None:
    maps = torch.zeros(2, 20, 30)
    maps[0, 5:10, 4:12] = torch.rand(5, 8) + 0.1  # anywhere inside [4, 5, 12, 10]
    maps[1, 0, 0] = 3.0  # one corner pixel, box covering exactly that pixel
    boxes = torch.tensor([[4.0, 5.0, 12.0, 10.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(energy_in_box(maps, boxes), torch.ones(2))


def test_energy_of_a_uniform_map_equals_the_box_area_chance_level() -> None:
    h, w = 20, 30
    boxes = torch.tensor(
        [
            [4.0, 5.0, 12.0, 10.0],  # whole pixels: 8 x 5 = 40 of 600
            [2.5, 1.25, 7.75, 3.0],  # fractional edges: 5.25 x 1.75
            [-10.0, 15.0, 5.0, 40.0],  # sticks out of the image: clipped to 5 x 5
            [30.0, 0.0, 40.0, 20.0],  # entirely outside: 0
        ]
    )
    expected = torch.tensor([40.0, 5.25 * 1.75, 25.0, 0.0]) / (h * w)
    chance = box_area_fraction(boxes, h, w)
    torch.testing.assert_close(chance, expected, rtol=0, atol=1e-7)
    for value in (1.0, 0.37):
        energy = energy_in_box(torch.full((4, h, w), value), boxes)
        torch.testing.assert_close(energy, expected, rtol=0, atol=1e-6)


def test_energy_in_box_counts_partial_pixels_and_zero_maps_give_zero() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 1.0  # pixel [1, 2) x [1, 2)
    maps[0, 1, 2] = 1.0  # pixel [2, 3) x [1, 2)
    maps[1, 2, 2] = 5.0
    boxes = torch.tensor([[1.0, 1.0, 2.5, 2.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    # map 0: first pixel fully inside, the second half-covered -> (1 + 0.5) / 2
    torch.testing.assert_close(energy_in_box(maps, boxes), torch.tensor([0.75, 0.0, 0.0]))
    assert energy_in_box(torch.zeros(0, 8, 8), torch.zeros(0, 4)).shape == (0,)


def test_energy_in_box_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        energy_in_box(-torch.ones(1, 4, 4), torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match="one box per map"):
        energy_in_box(torch.ones(2, 4, 4), torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        energy_in_box(torch.ones(4, 4), torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN"):
        energy_in_box(torch.full((1, 4, 4), float("nan")), torch.tensor([[0.0, 0.0, 2.0, 2.0]]))


# --------------------------------------------------------------------------- pointing game


def test_pointing_game_hits_inside_the_box_and_within_the_tolerance() -> None:
    h, w = 40, 60
    box = torch.tensor([10.0, 10.0, 20.0, 20.0])
    maps = torch.zeros(4, h, w)
    maps[0, 15, 15] = 1.0  # inside
    maps[1, 15, 29] = 1.0  # centre x = 29.5: 9.5 px right of the box
    maps[2, 33, 35] = 1.0  # centre (35.5, 33.5): dx = 15.5, dy = 13.5 -> 20.56 px away
    maps[3] += 0.0  # zero map: points nowhere
    boxes = box.expand(4, 4)
    assert pointing_game(maps, boxes, tolerance=0).tolist() == [True, False, False, False]
    assert pointing_game(maps, boxes, tolerance=9).tolist() == [True, False, False, False]
    assert pointing_game(maps, boxes, tolerance=10).tolist() == [True, True, False, False]
    assert pointing_game(maps, boxes, tolerance=20).tolist() == [True, True, False, False]
    assert math.hypot(15.5, 13.5) < 21
    assert pointing_game(maps, boxes, tolerance=21).tolist() == [True, True, True, False]
    # default tolerance is Zhang et al.'s 15 px
    assert pointing_game(maps, boxes).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, boxes, tolerance=-1)


# --------------------------------------------------------------------------- deletion / insertion

SIZE = 32
OBJECT = (8, 8, 16, 16)  # x1, y1, x2, y2: 64 of 1024 pixels


def object_scene() -> tuple[Tensor, Tensor, Tensor]:
    """A bright square on black, the map that covers it, and the map that avoids it."""
    x1, y1, x2, y2 = OBJECT
    image = torch.zeros(3, SIZE, SIZE)
    image[:, y1:y2, x1:x2] = 1.0
    on_object = torch.zeros(SIZE, SIZE)
    on_object[y1:y2, x1:x2] = 1.0
    return image, on_object, 1.0 - on_object


class SquareDetector:
    """A deterministic detector whose confidence is the brightness left on the object.

    It also reports two decoys the metric must ignore: a more confident detection of
    another class on the same box, and a more confident detection of the same class
    elsewhere (IoU 0 with the object).
    """

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        self.batch_sizes.append(len(images))
        x1, y1, x2, y2 = OBJECT
        out = []
        for image in images:
            assert image.shape == (3, SIZE, SIZE)
            score = float(image[0, y1:y2, x1:x2].mean().clamp(0, 1))
            out.append(
                {
                    "boxes": torch.tensor([OBJECT, OBJECT, (20, 20, 30, 30)], dtype=torch.float32),
                    "scores": torch.tensor([score, 0.99, 0.95]),
                    "labels": torch.tensor([1, 2, 1]),
                }
            )
        return out


def test_deletion_and_insertion_curves_are_exact_on_a_detector_that_reads_the_object() -> None:
    image, on_object, off_object = object_scene()
    box = torch.tensor(OBJECT, dtype=torch.float32)
    detect = SquareDetector()
    steps = 16  # every step moves 64 pixels = the object's area
    good_del, good_ins = deletion_insertion(detect, image, on_object, box, 1, steps=steps, baseline="zero")
    bad_del, bad_ins = deletion_insertion(detect, image, off_object, box, 1, steps=steps, baseline="zero")

    torch.testing.assert_close(good_del.fractions, torch.linspace(0, 1, steps + 1))
    # The map on the object deletes the whole object in the first step ...
    assert good_del.scores.tolist() == [1.0] + [0.0] * steps
    # ... the inverted map only in the last one (decoys ignored: never 0.99 or 0.95).
    assert bad_del.scores.tolist() == [1.0] * steps + [0.0]
    assert good_ins.scores.tolist() == [0.0] + [1.0] * steps
    assert bad_ins.scores.tolist() == [0.0] * steps + [1.0]
    step = 1.0 / steps
    assert good_del.auc == pytest.approx(step / 2)
    assert bad_del.auc == pytest.approx(1 - step / 2)
    assert good_ins.auc == pytest.approx(1 - step / 2)
    assert bad_ins.auc == pytest.approx(step / 2)
    assert (good_del.mode, good_ins.mode) == ("deletion", "insertion")


@pytest.mark.parametrize("baseline", ["blur", "mean"])
def test_a_map_on_the_object_has_lower_deletion_and_higher_insertion_auc(baseline: str) -> None:
    image, on_object, off_object = object_scene()
    # a graded map inside the object, and noise: the order, not just the support, is used
    noise = torch.rand(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    on_object = on_object * torch.linspace(1, 2, SIZE)[None, :] + 0.01 * noise
    box = torch.tensor(OBJECT, dtype=torch.float32)
    good_del, good_ins = deletion_insertion(SquareDetector(), image, on_object, box, 1, steps=8, baseline=baseline)
    bad_del, bad_ins = deletion_insertion(SquareDetector(), image, off_object, box, 1, steps=8, baseline=baseline)
    assert good_del.auc < bad_del.auc - 0.3
    assert good_ins.auc > bad_ins.auc + 0.3
    assert good_del.scores[0] == 1.0 and good_ins.scores[-1] == 1.0


def test_perturbed_images_go_to_the_detector_in_bounded_batches() -> None:
    image, on_object, _ = object_scene()
    detect = SquareDetector()
    box = torch.tensor(OBJECT)
    curve = perturbation_curve(detect, image, on_object, box, 1, "deletion", steps=16, batch_size=5)
    assert detect.batch_sizes == [5, 5, 5, 2]  # 17 images, never one call per step
    assert curve.scores.shape == (17,)


def test_a_map_at_feature_resolution_is_resized_and_a_lost_detection_scores_zero() -> None:
    image, on_object, _ = object_scene()
    coarse = on_object[::4, ::4]  # [8, 8] map
    box = torch.tensor(OBJECT)
    curve = perturbation_curve(SquareDetector(), image, coarse, box, 1, "deletion", steps=4, baseline="zero")
    assert curve.scores[-1] == 0.0 and curve.scores[0] == 1.0
    # a box of a class the detector never reports is never found
    other = perturbation_curve(SquareDetector(), image, on_object, box, 3, "deletion", steps=2)
    assert other.scores.tolist() == [0.0, 0.0, 0.0] and other.auc == 0.0
    with pytest.raises(ValueError, match="baseline"):
        perturbation_curve(SquareDetector(), image, on_object, box, 1, baseline="noise")  # type: ignore[arg-type]


def test_deletion_insertion_runs_a_torchvision_detector_without_changing_it() -> None:
    torch.set_num_threads(1)
    from detlens.lightning_modules.torchvision_detector import TorchvisionDetector

    torch.manual_seed(0)
    module = TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=2, min_size=64, max_size=64, fpn_channels=8,
        representation_size=16, rpn_proposals_test=20, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0,
    )
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    detect = detect_with(module)
    first = detect([image])[0]
    assert module.training and all(m.training for m in module.modules())
    assert len(first["scores"]) > 0
    box, label, score = first["boxes"][0], int(first["labels"][0]), float(first["scores"][0])
    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    saliency = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 200.0)

    rng = torch.get_rng_state()
    deletion, insertion = deletion_insertion(detect, image, saliency, box, label, steps=4, batch_size=3)
    assert torch.equal(torch.get_rng_state(), rng)
    for curve in (deletion, insertion):
        assert curve.scores.shape == (5,) and bool(((curve.scores >= 0) & (curve.scores <= 1)).all())
        assert 0.0 <= curve.auc <= 1.0
    # the unperturbed image, batched with perturbed ones, finds the same top detection
    assert float(deletion.scores[0]) == pytest.approx(score, abs=1e-4)
    assert float(insertion.scores[-1]) == pytest.approx(score, abs=1e-4)
    assert module.training
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- randomisation


class TinyNet(nn.Module):
    """Edge-detecting stem (hand-set, zero-mean kernels) and a 1x1 head: a 'trained' model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        with torch.no_grad():
            self.stem.weight.copy_(torch.stack([sobel, sobel.T, -sobel, -sobel.T])[:, None])
            self.stem.bias.zero_()
            self.head.weight.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]).reshape(1, 4, 1, 1))
            self.head.bias.fill_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.stem(x)))


IMAGES = torch.rand(3, 1, 24, 24, generator=torch.Generator().manual_seed(3))


def activation_maps(model: nn.Module) -> Tensor:
    """[3, 24, 24]: the model's output map per image, a map that depends on the weights."""
    with torch.no_grad():
        return torch.relu(model(IMAGES))[:, 0]


def image_maps(model: nn.Module) -> Tensor:
    """A 'saliency' that ignores the model: image gradient magnitude (edge detector)."""
    gy, gx = torch.gradient(IMAGES[:, 0], dim=(1, 2))
    return torch.hypot(gx, gy)


def test_a_map_that_ignores_the_model_fails_the_randomisation_check() -> None:
    result = randomisation_check(TinyNet(), image_maps)
    assert result.stages == ("all",)
    torch.testing.assert_close(result.correlations, torch.ones(1, 3))
    assert float(result.mean_abs[0]) == pytest.approx(1.0)
    assert result.scalars() == {"randomisation/spearman/all": pytest.approx(1.0)}


def test_a_map_that_depends_on_the_weights_passes_and_the_callers_model_is_untouched() -> None:
    model = TinyNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()

    full = randomisation_check(model, activation_maps, seed=0)
    cascading = randomisation_check(model, activation_maps, mode="cascading", seed=0)
    print(f"Spearman after full randomisation: {full.correlations.tolist()}; cascading {cascading.mean.tolist()}")

    assert torch.equal(torch.get_rng_state(), rng)  # global RNG not consumed
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert full.correlations.shape == (1, 3)
    assert float(full.mean_abs[0]) < 0.3  # the maps change when the weights do
    assert cascading.stages == ("head", "stem")  # output side first, cumulative
    assert cascading.correlations.shape == (2, 3)
    assert float(cascading.mean_abs[0]) < 0.9  # randomising the head alone already moves the maps
    assert float(cascading.mean_abs[-1]) < 0.3
    # reproducible: the same seed gives the same random weights and figures
    again = randomisation_check(model, activation_maps, seed=0)
    torch.testing.assert_close(again.correlations, full.correlations)


def test_spearman_handles_ties_constant_maps_and_lists_of_images() -> None:
    a = torch.tensor([[[0.0, 0.0], [1.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 0.0], [5.0, 9.0]], [[0.0, 1.0], [2.0, 3.0]]])
    rho = spearman_per_map([a[:1], a[1:]], [b[:1], b[1:]])
    assert float(rho[0]) == pytest.approx(1.0)  # monotone, ties at 0 ranked alike
    assert math.isnan(float(rho[1]))  # constant map: undefined, not 0 or 1
    torch.testing.assert_close(spearman_per_map(a[:1], -a[:1]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="2 maps"):
        spearman_per_map(a, a[:1])


def test_randomisation_check_names_the_closest_module_for_a_typo() -> None:
    with pytest.raises(ValueError, match="'head'"):
        randomisation_check(TinyNet(), activation_maps, mode="cascading", stages=["haed"])


# --------------------------------------------------------------------------- summaries


def test_summarise_gives_overall_and_per_class_means() -> None:
    labels = torch.tensor([1, 2, 1, 2, 2])
    summary = summarise(
        {
            "energy_in_box": torch.tensor([0.5, 0.2, 1.0, float("nan"), 0.4]),
            "pointing_game": torch.tensor([True, False, True, True, False]),
        },
        labels,
        class_names={1: "circle"},
    )
    assert summary == pytest.approx(
        {
            "energy_in_box": 0.525,
            "energy_in_box/circle": 0.75,
            "energy_in_box/2": 0.3,
            "pointing_game": 0.6,
            "pointing_game/circle": 1.0,
            "pointing_game/2": 1 / 3,
        }
    )
    assert summarise({"energy_in_box": torch.zeros(0)}, torch.zeros(0, dtype=torch.long)) == {}
