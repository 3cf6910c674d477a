"""The focus record: what is written is what is read back, the format is versioned, and a run
killed mid-write still reads back up to its last complete logging point."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from detlens.focus.record import (
    FILENAME,
    FORMAT,
    MAP_SIZE,
    VERSION,
    EmbeddingPoint,
    EntropyPoint,
    FocusImage,
    FocusRecordError,
    FocusRecordWriter,
    MapPoint,
    downsample_maps,
    read_focus_record,
)


def map_point(step: int, seed: int = 0, size: int = 64) -> MapPoint:
    g = torch.Generator().manual_seed(seed)
    images = []
    for index in (0, 3):
        raw = torch.rand(2, size, size, generator=g) * 1e-6  # raw Grad-CAM scales can be tiny
        boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [20.0, 10.0, 60.0, 50.0]])
        focus = {"is_tp": torch.tensor([True, False]), "energy_in_box": torch.tensor([0.7, float("nan")]),
                 "chance": torch.tensor([0.16, float("nan")]), "pointing_game": torch.tensor([1.0, float("nan")])}
        target = {"boxes": torch.tensor([[5.0, 5.0, 31.0, 29.0]]), "labels": torch.tensor([2]), "image_id": torch.tensor(10 + index)}
        images.append(FocusImage.from_tensors(index, boxes, torch.tensor([2, 1]), torch.tensor([0.9, 0.4]), raw, focus, target))
    return MapPoint("gradcam", step, step // 4, "gradcam", "features", images, {1: "circle", 2: "square"})


def assert_same_maps(a: MapPoint, b: MapPoint) -> None:
    assert (a.log_key, a.step, a.epoch, a.method, a.layer, a.class_names) == (b.log_key, b.step, b.epoch, b.method, b.layer, b.class_names)
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images):
        assert (x.probe_index, x.image_id, x.height, x.width) == (y.probe_index, y.image_id, y.height, y.width)
        for name in FocusImage._ARRAYS:
            vx, vy = getattr(x, name), getattr(y, name)
            assert vx.dtype == vy.dtype and vx.shape == vy.shape, name
            np.testing.assert_array_equal(vx, vy, err_msg=name)  # NaNs compare equal here


def test_a_record_written_closed_and_read_back_is_unchanged(tmp_path):
    points = [map_point(4, seed=1), map_point(8, seed=2)]
    entropy = EntropyPoint("attention", 8, 1, "probe", {"backbone.attn": np.array([0.8, 0.6], np.float32)})
    embedding = EmbeddingPoint("embeddings", 8, 1, "tsne", np.array([[0.0, 1.0], [2.0, 3.0]], np.float32),
                               np.array([1, 2]), ["tp", "background"], np.array([0, 3]), 0.93, None, {1: "circle"})
    thumb = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    writer = FocusRecordWriter(tmp_path / "detlens_focus", run_id="abc123")
    writer.write_probe_image("gradcam", 0, thumb)
    writer.write_probe_image("gradcam", 0, np.zeros((64, 64, 3), np.uint8))  # once per probe image: ignored
    for p in points:
        writer.write(p)
    writer.write(entropy)
    writer.write(embedding)
    del writer

    record = read_focus_record(tmp_path / "detlens_focus")
    assert record.header["format"] == FORMAT and record.header["version"] == VERSION and record.header["run_id"] == "abc123"
    assert not record.truncated and record.skipped == 0
    for written, read in zip(points, record.map_points("gradcam")):
        assert_same_maps(written, read)
    np.testing.assert_array_equal(record.probe_images[("gradcam", 0)], thumb)
    assert record.entropy_points()[0].flat() == pytest.approx({"backbone.attn/head0": 0.8, "backbone.attn/head1": 0.6})
    (emb,) = record.embeddings
    np.testing.assert_array_equal(emb.coords, embedding.coords)
    assert emb.outcomes == ["tp", "background"] and emb.trustworthiness == pytest.approx(0.93) and emb.silhouette is None
    assert record.class_names() == {1: "circle", 2: "square"}


def test_stored_maps_are_compact_normalised_and_keep_the_scale():
    raw = torch.zeros(1, 96, 64)
    raw[0, :48, :32] = 3e-7  # top-left quarter
    maps, peaks = downsample_maps(raw)
    assert maps.shape == (1, MAP_SIZE, MAP_SIZE) and float(maps.max()) == 1.0
    assert float(maps[0, :16, :16].min()) == 1.0 and float(maps[0, 16:, 16:].max()) == 0.0
    assert float(peaks[0]) == pytest.approx(3e-7)
    image = FocusImage.from_tensors(5, torch.zeros(1, 4), torch.tensor([1]), torch.tensor([0.5]), raw)
    assert image.maps.dtype == np.float16 and (image.height, image.width) == (96, 64)
    assert math.isnan(float(image.energy_in_box[0])) and not image.is_tp[0] and len(image.gt_boxes) == 0


def test_a_run_killed_mid_write_reads_back_to_its_last_complete_point(tmp_path):
    writer = FocusRecordWriter(tmp_path)
    writer.write(map_point(4, seed=1))
    writer.write(map_point(8, seed=2))
    path = tmp_path / FILENAME
    complete = path.read_bytes()
    writer.write(map_point(12, seed=3))
    data = path.read_bytes()
    path.write_bytes(data[: len(complete) + (len(data) - len(complete)) // 2])  # the third line torn in half

    record = read_focus_record(path)
    assert record.truncated and [p.step for p in record.maps] == [4, 8]
    assert_same_maps(record.maps[1], map_point(8, seed=2))

    # A resumed run appends to the same record: the torn line is closed off and skipped.
    FocusRecordWriter(tmp_path).write(map_point(16, seed=4))
    record = read_focus_record(tmp_path)
    assert [p.step for p in record.maps] == [4, 8, 16] and record.skipped == 1 and not record.truncated


def test_newer_versions_and_foreign_files_are_refused_unknown_entries_skipped(tmp_path):
    path = tmp_path / FILENAME
    header = {"format": FORMAT, "version": VERSION, "kind": "header"}
    future = {"kind": "something_new", "log_key": "x", "step": 1, "epoch": 0}
    path.write_text(json.dumps(header) + "\n" + json.dumps(future) + "\n")
    assert read_focus_record(path).maps == []  # forward compatible within a version

    path.write_text(json.dumps({**header, "version": VERSION + 1}) + "\n")
    with pytest.raises(FocusRecordError, match=f"version {VERSION + 1}"):
        read_focus_record(path)
    path.write_text('{"hello": 1}\n')
    with pytest.raises(FocusRecordError, match="header"):
        read_focus_record(path)
    with pytest.raises(FocusRecordError, match="header"):
        FocusRecordWriter(tmp_path)  # never appends to a file that is not a focus record
    with pytest.raises(FocusRecordError, match="no focus record"):
        read_focus_record(tmp_path / "nowhere")


def test_a_wandb_run_folder_is_found_by_its_run_dir(tmp_path):
    run_dir = tmp_path / "wandb" / "offline-run-20250101_000000-abc"
    writer = FocusRecordWriter(run_dir / "files" / "detlens_focus")
    writer.write(map_point(4))
    for path in (run_dir, run_dir / "files", tmp_path / "wandb"):
        record = read_focus_record(path)
        assert record.name == "offline-run-20250101_000000-abc" and len(record.maps) == 1
