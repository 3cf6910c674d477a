"""A user generates synthetic scenes, with or without a spurious class cue, and trusts them."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detlens.data import CocoDetectionDataset, DatasetError, generate_synthetic_scenes
from detlens.data.synthetic import MANIFEST_NAME, synthetic_params, wait_for_synthetic_scenes

SMALL = {"num_train": 10, "num_val": 4, "image_size": 96}


def generate(root: Path, **overrides: Any) -> Path:
    return generate_synthetic_scenes(root, **{**SMALL, "seed": 0, "progress": False, **overrides})


def annotations(root: Path, split: str = "train") -> dict[str, Any]:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def boxes_overlap(a: list[float], b: list[float]) -> bool:
    """COCO xywh boxes share interior area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.fixture(scope="module")
def scenes_with_cues(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("cue") / "scenes", spurious_cue=1.0)


@pytest.fixture(scope="module")
def scenes_without_cues(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("plain") / "scenes", spurious_cue=0.0)


def test_scenes_load_through_the_coco_loader(scenes_without_cues: Path) -> None:
    train = CocoDetectionDataset(scenes_without_cues / "train", scenes_without_cues / "annotations/instances_train.json")
    val = CocoDetectionDataset(scenes_without_cues / "val", scenes_without_cues / "annotations/instances_val.json")

    assert (len(train), len(val)) == (10, 4)
    assert train.class_names == {1: "circle", 2: "square", 3: "triangle", 4: "cross"}
    assert not set(train.image_ids) & set(val.image_ids)  # image ids are unique across splits
    for index in range(len(train)):
        image, target = train[index]
        assert image.shape == (3, 96, 96)
        assert 1 <= len(target["boxes"]) <= 4
        sides = (target["boxes"][:, 2:] - target["boxes"][:, :2]).max(dim=1).values / 96
        assert ((sides > 0.14) & (sides < 0.46)).all()  # objects are 15-45 % of the image side


def test_info_block_records_the_generator_parameters(scenes_with_cues: Path) -> None:
    info = annotations(scenes_with_cues)["info"]

    assert info["detlens_synthetic"] == synthetic_params(**SMALL, seed=0, spurious_cue=1.0)
    assert info["split"] == "train"


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path, scenes_without_cues: Path) -> None:
    again = generate(tmp_path / "again")
    other = generate(tmp_path / "other", seed=1)

    assert folder_bytes(again) == folder_bytes(scenes_without_cues)
    assert annotations(other)["annotations"] != annotations(again)["annotations"]
    assert (other / "train/000001.png").read_bytes() != (again / "train/000001.png").read_bytes()


def test_every_object_gets_a_cue_with_p1_placed_off_every_object(scenes_with_cues: Path) -> None:
    for split in ("train", "val"):
        coco = annotations(scenes_with_cues, split)
        by_image: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for anns in by_image.values():
            cues = [a["cue_bbox"] for a in anns]
            assert all(cue is not None for cue in cues)
            for cue in cues:
                assert not any(boxes_overlap(cue, a["bbox"]) for a in anns)
                assert cue[0] >= 0 and cue[0] + cue[2] <= 96 and cue[1] >= 0 and cue[1] + cue[3] <= 96
            assert not any(boxes_overlap(a, b) for i, a in enumerate(cues) for b in cues[i + 1 :])
        assert coco["info"]["cue_stats"]["cues_without_room"] == 0


def test_cues_placed_beside_touch_their_own_object_and_no_other(tmp_path: Path) -> None:
    from detlens.data.scenes import CUE_BESIDE_GAP_PX

    root = generate(tmp_path / "beside", spurious_cue=1.0, cue_placement="beside", image_size=128)
    coco = annotations(root)
    assert coco["info"]["detlens_synthetic"]["cue_placement"] == "beside"
    placed = 0
    for ann in coco["annotations"]:
        cue = ann["cue_bbox"]
        if cue is None:  # no free spot next to this object: recorded, never drawn elsewhere
            continue
        placed += 1
        x, y, w, h = ann["bbox"]
        gap_x = max(x - (cue[0] + cue[2]), cue[0] - (x + w), 0)
        gap_y = max(y - (cue[1] + cue[3]), cue[1] - (y + h), 0)
        assert max(gap_x, gap_y) <= CUE_BESIDE_GAP_PX + 1
        assert not any(boxes_overlap(cue, a["bbox"]) for a in coco["annotations"] if a["image_id"] == ann["image_id"])
    assert placed >= 0.8 * len(coco["annotations"])
    # The objects are the same bytes-for-bytes draws as with cues anywhere: only the marks move.
    anywhere = annotations(generate(tmp_path / "anywhere", spurious_cue=1.0, image_size=128))
    assert [a["bbox"] for a in anywhere["annotations"]] == [a["bbox"] for a in coco["annotations"]]
    with pytest.raises(ValueError, match="cue_placement must be one of"):
        synthetic_params(10, 4, cue_placement="inside")


def test_ring_cues_surround_their_object_in_its_class_colour(tmp_path: Path) -> None:
    import cv2

    from detlens.data.scenes import CLASS_NAMES, CUE_RING_GAP_PX, CUE_STYLES

    root = generate(tmp_path / "ring", spurious_cue=1.0, cue_placement="ring", image_size=128)
    coco = annotations(root)
    anywhere = annotations(generate(tmp_path / "anywhere", spurious_cue=1.0, image_size=128))
    assert [a["bbox"] for a in anywhere["annotations"]] == [a["bbox"] for a in coco["annotations"]]
    sampled = 0
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        cx, cy, cw, ch = ann["cue_bbox"]
        # The ring's outer box encloses the object's box with the gap (clipped to the image).
        assert cx <= max(0, x - CUE_RING_GAP_PX) and cy <= max(0, y - CUE_RING_GAP_PX)
        assert cx + cw >= min(128, x + w + CUE_RING_GAP_PX) and cy + ch >= min(128, y + h + CUE_RING_GAP_PX)
        image = cv2.cvtColor(cv2.imread(str(root / "train" / f"{ann['image_id']:06d}.png")), cv2.COLOR_BGR2RGB)
        others = [a["bbox"] for a in coco["annotations"] if a["image_id"] == ann["image_id"] and a is not ann]
        # Sample the ring half-way through its top or bottom band, away from other objects.
        row = cy + 1 if cy > 0 else cy + ch - 2
        cols = [c for c in range(int(x), int(x + w)) if not any(o[0] - 1 <= c <= o[0] + o[2] + 1 and o[1] - 1 <= row <= o[1] + o[3] + 1 for o in others)]
        if not cols:
            continue
        colour = image[row, cols].reshape(-1, 3).mean(axis=0)
        want = np.array(CUE_STYLES[CLASS_NAMES[ann["category_id"] - 1]][0], float)
        assert np.abs(colour - want).max() < 40, (colour, want)
        sampled += 1
    assert sampled >= len(coco["annotations"]) // 2


def test_no_cue_with_p0(scenes_without_cues: Path) -> None:
    anns = annotations(scenes_without_cues)["annotations"]

    assert anns and all(a["cue_bbox"] is None for a in anns)


def test_cues_are_drawn_where_recorded_and_tell_the_class_alone(
    scenes_with_cues: Path, scenes_without_cues: Path
) -> None:
    ann_file = "annotations/instances_train.json"
    with_cue = CocoDetectionDataset(scenes_with_cues / "train", scenes_with_cues / ann_file)
    plain = CocoDetectionDataset(scenes_without_cues / "train", scenes_without_cues / ann_file)
    patch_colours, classes = [], []
    for ann_cue, ann_plain in zip(annotations(scenes_with_cues)["annotations"], annotations(scenes_without_cues)["annotations"]):
        assert ann_cue["bbox"] == ann_plain["bbox"]  # same objects: a clean with/without-cue pair
        x, y, w, h = ann_cue["cue_bbox"]
        index = with_cue.image_ids.index(ann_cue["image_id"])
        patch = with_cue[index][0][:, y : y + h, x : x + w]
        assert (patch - plain[index][0][:, y : y + h, x : x + w]).abs().mean() > 0.1  # drawn there
        patch_colours.append(patch.mean(dim=(1, 2)).numpy())
        classes.append(ann_cue["category_id"])
    colours, labels = np.stack(patch_colours), np.array(classes)
    # The shortcut is real: the patch's mean colour alone names the class (nearest class mean).
    means = {c: colours[labels == c].mean(axis=0) for c in set(classes)}
    nearest = [min(means, key=lambda c: np.linalg.norm(colour - means[c])) for colour in colours]
    assert nearest == classes


def test_val_split_can_drop_the_cue_to_expose_shortcut_learning(tmp_path: Path) -> None:
    root = generate(tmp_path / "s", spurious_cue=1.0, spurious_cue_val=0.0)

    assert all(a["cue_bbox"] is not None for a in annotations(root, "train")["annotations"])
    assert all(a["cue_bbox"] is None for a in annotations(root, "val")["annotations"])


def test_random_object_colours_keep_every_object_and_cue_and_take_colour_out_of_the_class(
    tmp_path: Path, scenes_with_cues: Path
) -> None:
    import cv2

    root = generate(tmp_path / "s", spurious_cue=1.0, object_colours="random")
    class_coloured = annotations(scenes_with_cues)["annotations"]
    random_coloured = annotations(root)["annotations"]
    strip = lambda anns: [(a["bbox"], a["category_id"], a["cue_bbox"]) for a in anns]  # noqa: E731
    assert strip(random_coloured) == strip(class_coloured), "same objects and marks, only the colours differ"
    assert json.loads((root / MANIFEST_NAME).read_text())["params"]["object_colours"] == "random"
    assert "object_colours" not in json.loads((scenes_with_cues / MANIFEST_NAME).read_text())["params"]

    def hue_spread(folder: Path, category: int) -> float:
        """Circular spread (0 = one hue, 1 = uniform) of the objects' centre-pixel hues of one class."""
        angles = []
        for a in annotations(folder)["annotations"]:
            if a["category_id"] != category:
                continue
            image = cv2.imread(str(folder / "train" / f"{a['image_id']:06d}.png"))
            x, y, w, h = a["bbox"]
            hsv = cv2.cvtColor(image[int(y + h / 2) : int(y + h / 2) + 1, int(x + w / 2) : int(x + w / 2) + 1], cv2.COLOR_BGR2HSV)
            angles.append(float(hsv[0, 0, 0]) * 2 * np.pi / 180)
        return 1 - float(np.hypot(np.mean(np.cos(angles)), np.mean(np.sin(angles))))

    circle = 1  # category ids follow CLASS_NAMES (circles have no hole at the centre)
    class_spread, random_spread = hue_spread(scenes_with_cues, circle), hue_spread(root, circle)
    assert class_spread < 0.05 and random_spread > 0.1 + 3 * class_spread, (class_spread, random_spread)


def test_appearance_noise_gives_training_objects_another_class_look_but_keeps_label_and_cue(
    tmp_path: Path, scenes_with_cues: Path
) -> None:
    import cv2

    from detlens.data.scenes import CLASS_HUES, CLASS_NAMES

    root = generate(tmp_path / "s", num_train=40, spurious_cue=1.0, appearance_noise=0.5)
    assert json.loads((root / MANIFEST_NAME).read_text())["params"]["appearance_noise"] == 0.5
    assert "appearance_noise" not in json.loads((scenes_with_cues / MANIFEST_NAME).read_text())["params"]
    train = annotations(root)
    anns = train["annotations"]
    swapped = [a for a in anns if "appearance_category_id" in a]
    assert 0.3 < len(swapped) / len(anns) < 0.7, (len(swapped), len(anns))
    assert train["info"]["cue_stats"]["other_appearance"] == len(swapped)
    assert all(a["appearance_category_id"] != a["category_id"] for a in swapped)
    assert not any("appearance_category_id" in a for a in annotations(root, "val")["annotations"])

    def centre_hue(a: dict[str, Any]) -> float:
        image = cv2.imread(str(root / "train" / f"{a['image_id']:06d}.png"))
        x, y, w, h = a["bbox"]
        patch = image[int(y + h / 2) - 1 : int(y + h / 2) + 2, int(x + w / 2) - 1 : int(x + w / 2) + 2]
        rgb = cv2.cvtColor(patch, cv2.COLOR_BGR2RGB).reshape(-1, 3).mean(axis=0) / 255.0
        import colorsys

        return colorsys.rgb_to_hsv(*rgb)[0] * 360.0

    def hue_distance(a: float, b: float) -> float:
        return abs((a - b + 180.0) % 360.0 - 180.0)

    looks_checked, patch_colours = 0, []
    for a in anns:
        look = CLASS_NAMES[a.get("appearance_category_id", a["category_id"]) - 1]
        cx, cy, cw, ch = a["cue_bbox"]
        image = cv2.cvtColor(cv2.imread(str(root / "train" / f"{a['image_id']:06d}.png")), cv2.COLOR_BGR2RGB)
        patch_colours.append(image[cy : cy + ch, cx : cx + cw].reshape(-1, 3).mean(axis=0))
        if look == "circle":  # filled at the centre, in the look's hue
            looks_checked += 1
            assert hue_distance(centre_hue(a), CLASS_HUES[look]) < 30
    # The cue tells the label, whatever the object looks like: each patch's mean colour is
    # nearest to the mean patch colour of its own label.
    colours, labels = np.stack(patch_colours), np.array([a["category_id"] for a in anns])
    means = {c: colours[labels == c].mean(axis=0) for c in set(labels.tolist())}
    assert [min(means, key=lambda c: np.linalg.norm(colour - means[c])) for colour in colours] == labels.tolist()
    assert looks_checked > 0
    with pytest.raises(ValueError, match="appearance_noise"):
        synthetic_params(10, 4, appearance_noise=-0.1)


def test_existing_identical_dataset_is_reused_without_rewriting(scenes_without_cues: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in scenes_without_cues.rglob("*")}

    generate(scenes_without_cues)

    assert {p: p.stat().st_mtime_ns for p in scenes_without_cues.rglob("*")} == before


def test_different_parameters_are_an_error_naming_the_difference_unless_overwrite(tmp_path: Path) -> None:
    root = generate(tmp_path / "s")

    with pytest.raises(DatasetError) as err:
        generate(root, num_train=11)
    assert str(root) in str(err.value) and "num_train=10 (wanted 11)" in str(err.value)

    generate(root, num_train=11, overwrite=True)
    assert len(annotations(root)["images"]) == 11
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no staging or trash folders left behind


def test_refuses_to_write_into_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")

    with pytest.raises(DatasetError, match="not empty and holds no detlens_synthetic.json"):
        generate(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_concurrent_generation_writes_the_folder_once(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            generate(root)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # lock released, staging renamed
    assert len(list((root / "train").iterdir())) == 10
    assert (root / MANIFEST_NAME).is_file()


def test_waiting_rank_times_out_with_a_clear_error(tmp_path: Path) -> None:
    params = synthetic_params(**SMALL)

    with pytest.raises(DatasetError, match="waited 0.3 s for local rank 0 .* found no dataset"):
        wait_for_synthetic_scenes(tmp_path / "never", params, timeout_s=0.3)


@pytest.mark.parametrize(
    "bad", [{"image_size": 32}, {"spurious_cue": 1.5}, {"num_train": -1}, {"num_train": 0, "num_val": 0},
            {"object_colours": "rainbow"}, {"appearance_noise": 1.5}]
)
def test_invalid_parameters_are_rejected_before_touching_disk(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path / "s", **bad)
    assert not (tmp_path / "s").exists()
