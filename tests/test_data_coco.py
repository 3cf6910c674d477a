"""A user points CocoDetectionDataset at the COCO files they already have."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detlens.data import CocoDetectionDataset, DatasetError, collate_detection


def write_coco(folder: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None) -> Path:
    path = folder / "instances_val.json"
    categories = categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 12, "name": "bird"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def save_png(folder: Path, name: str, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array, mode=mode).save(folder / name)


@pytest.fixture
def rgb_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Two RGB images: one with three annotations (one crowd), one with none."""
    save_png(tmp_path, "a.png", np.full((40, 60, 3), 200, np.uint8))
    save_png(tmp_path, "b.png", np.zeros((30, 20, 3), np.uint8))
    ann = write_coco(
        tmp_path,
        images=[
            {"id": 5, "file_name": "a.png", "width": 60, "height": 40},
            {"id": 9, "file_name": "b.png", "width": 20, "height": 30},
        ],
        annotations=[
            {"id": 1, "image_id": 5, "category_id": 3, "bbox": [10, 5, 20, 15], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 12, "bbox": [0.5, 1.5, 59.5, 38.5]},
            {"id": 3, "image_id": 5, "category_id": 7, "bbox": [0, 0, 60, 40], "iscrowd": 1},
        ],
    )
    return tmp_path, ann


def test_items_follow_the_contract_with_boxes_in_xyxy_pixels(rgb_dataset: tuple[Path, Path]) -> None:
    images_dir, ann = rgb_dataset
    dataset = CocoDetectionDataset(images_dir, ann)

    assert len(dataset) == 2
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 60)
    assert torch.allclose(image, torch.full_like(image, 200 / 255))
    # COCO [x, y, w, h] -> [x1, y1, x2, y2]; the crowd annotation is skipped.
    assert torch.equal(target["boxes"], torch.tensor([[10.0, 5.0, 30.0, 20.0], [0.5, 1.5, 60.0, 40.0]]))
    assert target["boxes"].dtype == torch.float32
    assert target["image_id"] == 5 and target["file_name"] == "a.png"


def test_category_ids_map_to_contiguous_labels_in_sorted_id_order(rgb_dataset: tuple[Path, Path]) -> None:
    dataset = CocoDetectionDataset(*rgb_dataset)

    # ids 3, 7, 12 -> labels 1, 2, 3
    assert dataset.num_classes == 3
    assert dataset.class_names == {1: "dog", 2: "cat", 3: "bird"}
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 12}
    _, target = dataset[0]
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [1, 3]


def test_image_without_annotations_has_empty_boxes(rgb_dataset: tuple[Path, Path]) -> None:
    image, target = CocoDetectionDataset(*rgb_dataset)[1]

    assert image.shape == (3, 30, 20)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


@pytest.mark.parametrize(
    ("array", "mode", "expected_rgb"),
    [
        (np.full((9, 13), 51, np.uint8), "L", (0.2, 0.2, 0.2)),
        (np.full((9, 13, 4), (255, 0, 102, 0), np.uint8), "RGBA", (1.0, 0.0, 0.4)),
        (np.full((9, 13), 65535 // 5, np.uint16), "I;16", (0.2, 0.2, 0.2)),
        (np.full((9, 13, 2), (102, 255), np.uint8), "LA", (0.4, 0.4, 0.4)),
    ],
    ids=["grayscale", "rgba", "16-bit", "grayscale+alpha"],
)
def test_non_rgb_files_are_converted_to_rgb_in_unit_range(
    tmp_path: Path, array: np.ndarray, mode: str, expected_rgb: tuple[float, float, float]
) -> None:
    save_png(tmp_path, "odd.png", array, mode)
    ann = write_coco(tmp_path, [{"id": 1, "file_name": "odd.png", "width": 13, "height": 9}], [])

    image, _ = CocoDetectionDataset(tmp_path, ann)[0]

    assert image.shape == (3, 9, 13) and image.dtype == torch.float32
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor(expected_rgb), atol=1e-3)


def test_16_bit_rgb_png_is_scaled_to_unit_range(tmp_path: Path) -> None:
    bgr = np.zeros((5, 7, 3), np.uint16)
    bgr[..., 2], bgr[..., 1] = 65535, 13107  # red 1.0, green 0.2 (OpenCV writes BGR)
    cv2.imwrite(str(tmp_path / "deep.png"), bgr)
    ann = write_coco(tmp_path, [{"id": 1, "file_name": "deep.png", "width": 7, "height": 5}], [])

    image, _ = CocoDetectionDataset(tmp_path, ann)[0]

    assert torch.allclose(image[:, 2, 3], torch.tensor([1.0, 0.2, 0.0]), atol=1 / 255)


def test_palette_image_is_converted_through_its_palette(tmp_path: Path) -> None:
    palette_image = Image.new("P", (7, 5))
    palette_image.putpalette([0, 0, 0, 255, 128, 0] + [0] * 762)
    palette_image.paste(1, (0, 0, 7, 5))
    palette_image.save(tmp_path / "p.png")
    ann = write_coco(tmp_path, [{"id": 1, "file_name": "p.png", "width": 7, "height": 5}], [])

    image, _ = CocoDetectionDataset(tmp_path, ann)[0]

    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))


def test_transforms_receive_image_and_target(rgb_dataset: tuple[Path, Path]) -> None:
    def drop_boxes(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return image * 0, {**target, "boxes": target["boxes"][:0]}

    image, target = CocoDetectionDataset(*rgb_dataset, transforms=drop_boxes)[0]

    assert image.abs().sum() == 0 and len(target["boxes"]) == 0


def test_collate_keeps_images_and_targets_as_lists(rgb_dataset: tuple[Path, Path]) -> None:
    dataset = CocoDetectionDataset(*rgb_dataset)

    images, targets = collate_detection([dataset[0], dataset[1]])

    assert [tuple(i.shape) for i in images] == [(3, 40, 60), (3, 30, 20)]
    assert [t["image_id"] for t in targets] == [5, 9]


# -- bad input: every message names the annotation file and the record --------------------


def one_box(tmp_path: Path, bbox: list[float], category_id: int = 3) -> Path:
    save_png(tmp_path, "img_0003.png", np.zeros((20, 30, 3), np.uint8))
    return write_coco(
        tmp_path,
        [{"id": 3, "file_name": "img_0003.png", "width": 30, "height": 20}],
        [{"id": 17, "image_id": 3, "category_id": category_id, "bbox": bbox}],
    )


def test_zero_area_box_is_rejected_naming_file_annotation_and_image(tmp_path: Path) -> None:
    ann = one_box(tmp_path, [10, 10, 0, 5])

    with pytest.raises(DatasetError) as err:
        CocoDetectionDataset(tmp_path, ann)

    message = str(err.value)
    assert "instances_val.json: annotation 17 (image 3 'img_0003.png'): box [10, 10, 0, 5] has zero area" in message


def test_negative_size_box_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"annotation 17 \(image 3 'img_0003.png'\).*negative area"):
        CocoDetectionDataset(tmp_path, one_box(tmp_path, [10, 10, -4, 5]))


def test_box_outside_the_image_is_rejected_but_subpixel_overshoot_is_clipped(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        CocoDetectionDataset(tmp_path, one_box(tmp_path, [20, 5, 15, 10]))  # x2 = 35 > 30
    assert "instances_val.json: annotation 17 (image 3 'img_0003.png')" in str(err.value)
    assert "outside the 30x20 image" in str(err.value)

    _, target = CocoDetectionDataset(tmp_path, one_box(tmp_path, [-0.4, 5, 30.8, 10]))[0]
    assert target["boxes"].tolist() == [[0.0, 5.0, 30.0, 15.0]]


def test_unknown_category_id_is_rejected_listing_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        CocoDetectionDataset(tmp_path, one_box(tmp_path, [1, 1, 5, 5], category_id=99))

    message = str(err.value)
    assert "instances_val.json: annotation 17 (image 3 'img_0003.png')" in message
    assert "unknown category id 99" in message and "3, 7, 12" in message


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    ann = tmp_path / "instances_val.json"
    ann.write_text('{\n  "images": [],\n  "annotations": [}\n')

    with pytest.raises(DatasetError, match=r"instances_val\.json: malformed JSON at line 3, column 19"):
        CocoDetectionDataset(tmp_path, ann)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("categories"), "'categories' must be a non-empty list"),
        (lambda d: d["images"][0].pop("width"), "image #0: missing required key(s) 'width'"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotation #0: missing required key(s) 'bbox'"),
        (lambda d: d["annotations"][0].update(image_id=4), "annotation 17: image id 4 is not in 'images'"),
        (lambda d: d["categories"].append({"id": 3, "name": "x"}), "category id 3 is listed twice"),
    ],
    ids=["no-categories", "image-without-width", "annotation-without-bbox", "unknown-image", "duplicate-category"],
)
def test_structural_errors_are_caught_at_construction(tmp_path: Path, mutate: Any, expected: str) -> None:
    ann = one_box(tmp_path, [1, 1, 5, 5])
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))

    with pytest.raises(DatasetError) as err:
        CocoDetectionDataset(tmp_path, ann)
    assert str(err.value).startswith(str(ann)) and expected in str(err.value)


def test_missing_image_file_fails_on_load_naming_the_record(tmp_path: Path) -> None:
    ann = one_box(tmp_path, [1, 1, 5, 5])
    (tmp_path / "img_0003.png").unlink()
    dataset = CocoDetectionDataset(tmp_path, ann)  # cheap checks only: no file access yet

    with pytest.raises(DatasetError) as err:
        dataset[0]
    assert "instances_val.json: image 3 'img_0003.png': image file not found" in str(err.value)


def test_unreadable_image_file_fails_on_load(tmp_path: Path) -> None:
    ann = one_box(tmp_path, [1, 1, 5, 5])
    (tmp_path / "img_0003.png").write_bytes(b"not a png")

    with pytest.raises(DatasetError, match=r"image 3 'img_0003.png': cannot read image file"):
        CocoDetectionDataset(tmp_path, ann)[0]


def test_image_size_differing_from_the_json_fails_on_load(tmp_path: Path) -> None:
    ann = one_box(tmp_path, [1, 1, 5, 5])
    save_png(tmp_path, "img_0003.png", np.zeros((20, 31, 3), np.uint8))

    with pytest.raises(DatasetError) as err:
        CocoDetectionDataset(tmp_path, ann)[0]
    assert "image 3 'img_0003.png': image file is 31x20 pixels but the annotation file says 30x20" in str(err.value)


def test_missing_annotation_file_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDetectionDataset(tmp_path, tmp_path / "nope.json")


def test_dataset_errors_are_value_errors() -> None:
    assert issubclass(DatasetError, ValueError)


def many_images(folder: Path, count: int, missing: set[int]) -> Path:
    """A COCO-sized annotation file (``count`` images, no boxes) whose files exist but for ``missing``
    (empty files: only their names are checked)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(count)]
    for i in range(count):
        if i not in missing:
            os.close(os.open(folder / f"{i:012d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    return write_coco(folder, images, [])


def test_every_missing_image_file_is_reported_at_once_on_a_coco_sized_file(tmp_path: Path) -> None:
    missing = {17, 40_000, 117_999}
    ann = many_images(tmp_path / "val2017", 118_000, missing)
    dataset = CocoDetectionDataset(tmp_path / "val2017", ann)

    start = time.perf_counter()
    found = dataset.missing_files()
    seconds = time.perf_counter() - start

    assert found == [f"{i:012d}.jpg" for i in sorted(missing)]
    print(f"\nmissing-file check of 118,000 images: {seconds:.3f} s (one folder listing)")
    with pytest.raises(DatasetError) as err:
        dataset.check_files()
    assert "3 of 118000 image files not found" in str(err.value)
    assert "'000000000017.jpg', '000000040000.jpg', '000000117999.jpg'" in str(err.value)


def test_missing_files_in_subfolders_and_a_missing_folder_are_found(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    save_png(tmp_path / "a", "x.png", np.zeros((4, 4, 3), np.uint8))
    images = [{"id": i, "file_name": name, "width": 4, "height": 4} for i, name in enumerate(["a/x.png", "a/y.png", "b/z.png"])]
    dataset = CocoDetectionDataset(tmp_path, write_coco(tmp_path, images, []))
    assert dataset.missing_files() == ["a/y.png", "b/z.png"]


def test_an_undecodable_image_is_skipped_with_one_warning_or_raised(tmp_path: Path) -> None:
    for i in range(3):
        save_png(tmp_path, f"{i}.png", np.full((8, 8, 3), 50 * (i + 1), np.uint8))
    (tmp_path / "1.png").write_bytes(b"not a png")
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(3)]
    ann = write_coco(tmp_path, images, [])

    with pytest.raises(DatasetError, match=r"image 1 '1.png': cannot read image file"):
        CocoDetectionDataset(tmp_path, ann, on_bad_image="raise")[1]

    dataset = CocoDetectionDataset(tmp_path, ann, on_bad_image="skip")
    with pytest.warns(UserWarning, match=r"skipped an unreadable image \(1 so far.*'1.png'"):
        image, target = dataset[1]
    assert target["file_name"] == "2.png" and torch.allclose(image, torch.full_like(image, 150 / 255))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per file, not one per load
        dataset[1]
    assert list(dataset.skipped) == ["1.png"]
    with pytest.raises(ValueError, match="on_bad_image"):
        CocoDetectionDataset(tmp_path, ann, on_bad_image="ignore")  # type: ignore[arg-type]


def test_a_library_wrapping_pil_open_still_gets_a_dataset_error_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """Ultralytics wraps PIL.Image.open and, for a file PIL cannot identify, may raise ImportError
    (its on-demand HEIF plugin): detlens still reports the file, as for PIL's own errors."""
    import PIL.Image

    ann = one_box(tmp_path, [1, 1, 5, 5])
    (tmp_path / "img_0003.png").write_bytes(b"not a png")
    pil_open = PIL.Image.open

    def wrapped(path, *args, **kwargs):
        try:
            return pil_open(path, *args, **kwargs)
        except PIL.Image.UnidentifiedImageError:
            raise ModuleNotFoundError("No module named 'pi_heif'") from None

    monkeypatch.setattr(PIL.Image, "open", wrapped)
    with pytest.raises(DatasetError, match=r"image 3 'img_0003.png': cannot read image file .*ModuleNotFoundError"):
        CocoDetectionDataset(tmp_path, ann)[0]
