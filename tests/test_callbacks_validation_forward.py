"""Callbacks that read the probe images from the validation loop's own forward.

The prediction overlays, the probe-set attention entropy (where reading cannot change the
validation outputs) and, on two-stage detectors, the box embeddings, the Grad-CAM
maps (gradient methods on the per-detection FPN level) and the attention maps of
attention-probe blocks take the probe images the
validation loop ran from its forward instead of running the detector again:
the results must be those the callback's own forward gives, the images the validation
loop did not run must still be explained, and the observer must leave the model as it was.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from test_callbacks_attention import faster_rcnn, no_hooks_left, tiny_detr  # the attention tests' helpers (64 px)
from torch.utils.data import DataLoader

from detlens.adapters import adapter_for
from detlens.adapters.observe import ForwardObserver
from detlens.callbacks import (
    AttentionEntropyCallback,
    AttentionMapCallback,
    BoxEmbeddingCallback,
    GradCAMCallback,
    PredictionOverlayCallback,
)
from detlens.data import SyntheticDataModule, collate_detection
from detlens.explainers.api import explain, gradcam_explanations
from detlens.lightning_modules import TorchvisionDetector

SIZE = 64
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "synthetic"
    SyntheticDataModule(root=str(root), num_train=8, num_val=4, image_size=SIZE, batch_size=4)
    return str(root)


def scenes(root: str, batch_size: int = 4) -> SyntheticDataModule:
    return SyntheticDataModule(
        root=root, num_train=8, num_val=4, image_size=SIZE, batch_size=batch_size, horizontal_flip=False
    )


def detector(dm: SyntheticDataModule) -> TorchvisionDetector:
    return TorchvisionDetector(
        "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names, min_size=SIZE,
        max_size=SIZE, fpn_channels=16, representation_size=32, rpn_proposals_train=50, rpn_proposals_test=20,
        box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128], score_thresh=0.0, warmup_steps=1,
    )


def fit(dm: SyntheticDataModule, callbacks: list[pl.Callback], make_model: Any = detector, **overrides: Any) -> Any:
    pl.seed_everything(0)
    model = make_model(dm)
    kwargs = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(overrides)
    pl.Trainer(callbacks=callbacks, **kwargs).fit(model, dm)
    return model


def recording(cls: type) -> type:
    """``cls`` that keeps what it hands to ``log_results`` and the shards it explains itself."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.explained: list[list[int]] = []
            self.logged: list[Any] = []

        def explain_shard(self, pl_module, images, targets, indices):  # noqa: ANN001, ANN201
            self.explained.append(list(indices))
            return super().explain_shard(pl_module, images, targets, indices)

        def log_results(self, trainer, pl_module, results):  # noqa: ANN001, ANN201
            self.logged.append(results)
            super().log_results(trainer, pl_module, results)

    return Recording


def own_forward(callback: Any, model: TorchvisionDetector, dm: SyntheticDataModule, indices: list[int]) -> list[Any]:
    """What the callback's own forward gives for ``indices`` with the model's present weights."""
    items = [dm.val_dataset[i] for i in indices]
    model.eval()
    return callback.explain_shard(model, [im for im, _ in items], [t for _, t in items], indices)


def test_embeddings_read_from_the_validation_forward_equal_the_callbacks_own_forward(scenes_root):
    dm = scenes(scenes_root)
    callback = recording(BoxEmbeddingCallback)(score_threshold=0.0, max_detections=6, num_probe_images=3, thumbnail_size=0)

    model = fit(dm, [callback])

    assert callback.explained == []  # every probe image was in the validation batch: no forward of its own
    (results,) = callback.logged
    assert [r.index for r in results] == callback.probe_indices
    again = own_forward(callback, model, dm, callback.probe_indices)  # the event was after the last step
    for read, ref in zip((r.value for r in results), again):
        assert len(read) == len(ref) > 0
        torch.testing.assert_close(read.features, ref.features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(read.boxes, ref.boxes)
        assert torch.equal(read.labels, ref.labels) and torch.equal(read.origin, ref.origin)
        assert read.outcome == ref.outcome and read.level == ref.level and read.image_id == ref.image_id


def test_overlays_read_from_the_validation_forward_equal_the_callbacks_own_forward(scenes_root):
    dm = scenes(scenes_root)
    callback = recording(PredictionOverlayCallback)(score_threshold=0.0, max_detections=5, num_probe_images=4)

    model = fit(dm, [callback])

    assert callback.explained == []
    (results,) = callback.logged
    again = own_forward(callback, model, dm, callback.probe_indices)
    for read, ref in zip((r.value for r in results), again):
        assert len(read.scores) == 5
        np_close = torch.testing.assert_close
        np_close(torch.from_numpy(read.boxes), torch.from_numpy(ref.boxes))
        np_close(torch.from_numpy(read.scores), torch.from_numpy(ref.scores))
        assert (read.labels == ref.labels).all()


def test_attention_entropy_read_from_the_validation_forward_equals_the_callbacks_own_forward(scenes_root):
    dm = scenes(scenes_root)
    callback = recording(AttentionEntropyCallback)(every_n_train_steps=None, num_probe_images=3)

    model = fit(dm, [callback], make_model=faster_rcnn)

    assert callback.explained == []  # per-image sums of the validation batch (4 images of one size)
    (results,) = callback.logged
    assert [r.index for r in results] == callback.probe_indices
    again = own_forward(callback, model, dm, callback.probe_indices)  # each image alone
    for read, ref in zip((r.value for r in results), again):
        assert list(read) == list(ref) == ["model.backbone.body.layer3_attention"]
        for name, (entropy_sum, rows) in ref.items():
            torch.testing.assert_close(read[name][0], entropy_sum, rtol=1e-5, atol=1e-5)
            assert read[name][1].item() == rows.item() > 0
    assert no_hooks_left(model)  # nor a probe flag or stored weights


@pytest.mark.parametrize("reference_points", ["detections", "grid"])
def test_attention_maps_read_from_the_validation_forward_equal_the_callbacks_own_forward(scenes_root, reference_points):
    dm = scenes(scenes_root)
    maps = recording(AttentionMapCallback)(reference_points=reference_points, grid_size=2, heads="all", top_k=2,
                                           num_probe_images=3)
    entropy = recording(AttentionEntropyCallback)(every_n_train_steps=None, num_probe_images=3)  # the same block

    model = fit(dm, [maps, entropy], make_model=faster_rcnn)

    assert maps.explained == [] and entropy.explained == []  # both read the validation batch's attention
    (results,) = maps.logged
    assert [r.index for r in results] == maps.probe_indices
    again = own_forward(maps, model, dm, maps.probe_indices)
    name = "spatial/backbone.body.layer3_attention"
    for read, ref in zip((r.value for r in results), again):
        assert len(read.boxes) == 2
        torch.testing.assert_close(read.boxes, ref.boxes)
        torch.testing.assert_close(read.scores, ref.scores)
        assert torch.equal(read.labels, ref.labels) and torch.equal(read.points, ref.points)
        found = read.point_maps if reference_points == "grid" else read.detection_maps
        expected = ref.point_maps if reference_points == "grid" else ref.detection_maps
        assert sorted(found) == sorted(expected) == [name, f"{name}/head0", f"{name}/head1"]
        for key, value in expected.items():
            torch.testing.assert_close(found[key], value, rtol=1e-4, atol=1e-5)
    assert no_hooks_left(model)


def test_attention_maps_of_a_detr_run_their_own_forward(scenes_root):
    dm = scenes(scenes_root)
    maps = recording(AttentionMapCallback)(maps=["decoder", "encoder"], num_probe_images=2)
    overlays = recording(PredictionOverlayCallback)(score_threshold=0.0, num_probe_images=2)

    model = fit(dm, [maps, overlays], make_model=tiny_detr)

    assert maps.explained == [maps.probe_indices] and overlays.explained == []
    again = own_forward(overlays, model, dm, overlays.probe_indices)
    (results,) = overlays.logged
    for read, ref in zip((r.value for r in results), again):  # the validation outputs, as unobserved
        assert (read.boxes == ref.boxes).all() and (read.scores == ref.scores).all()


def test_attention_entropy_of_encoder_layers_runs_its_own_forward_so_validation_outputs_do_not_change(scenes_root):
    # Hooks on an nn.TransformerEncoderLayer's self-attention turn its fused inference
    # kernel off, which moves the outputs by ~1e-5: the validation forward is not read.
    dm = scenes(scenes_root)
    callback = recording(AttentionEntropyCallback)(every_n_train_steps=None, num_probe_images=2)
    overlays = recording(PredictionOverlayCallback)(score_threshold=0.0, num_probe_images=2)

    model = fit(dm, [callback, overlays], make_model=tiny_detr)

    assert callback.explained == [callback.probe_indices]
    assert overlays.explained == []  # the validation outputs, as the model gave them unobserved
    again = own_forward(overlays, model, dm, overlays.probe_indices)
    (results,) = overlays.logged
    for read, ref in zip((r.value for r in results), again):
        assert (read.boxes == ref.boxes).all() and (read.scores == ref.scores).all()


@pytest.mark.parametrize("method, target", [("gradcam", "class"), ("elementwise", "both")])
def test_gradcam_read_from_the_validation_forward_equals_the_callbacks_own_forward(scenes_root, method, target):
    dm = scenes(scenes_root)
    callback = recording(GradCAMCallback)(method=method, target=target, top_k=3, score_threshold=0.0, num_probe_images=3)

    model = fit(dm, [callback])

    assert callback.explained == []  # the RoI fast path ran on the validation forward's feature maps
    (results,) = callback.logged
    assert [r.index for r in results] == callback.probe_indices
    again = own_forward(callback, model, dm, callback.probe_indices)
    for read, ref in zip((r.value for r in results), again):
        assert len(read.scores) == len(ref.scores) == 3
        torch.testing.assert_close(read.boxes, ref.boxes)
        torch.testing.assert_close(read.scores, ref.scores)
        assert torch.equal(read.labels, ref.labels)
        assert read.raw.shape == ref.raw.shape == (3, SIZE, SIZE) and read.raw.amax() > 0
        torch.testing.assert_close(read.raw, ref.raw, rtol=1e-4, atol=1e-6 * float(ref.raw.amax()))
        assert read.focus is not None and ref.focus is not None
        torch.testing.assert_close(read.focus["energy_in_box"], ref.focus["energy_in_box"], equal_nan=True)
        assert torch.equal(read.focus["is_tp"], ref.focus["is_tp"])


def test_the_roi_replay_of_a_padded_batch_equals_the_adapters_run_of_that_batch(scenes_root):
    """Images of different sizes: the replay must use the padded batch's geometry and level scales."""
    dm = scenes(scenes_root)
    pl.seed_everything(0)
    model = detector(dm).eval()
    adapter = adapter_for(model)
    images = [dm.val_dataset[0][0], dm.val_dataset[1][0][:, : SIZE - 16, :]]  # 64 x 64 and 48 x 64: padded to 64 x 64

    with ForwardObserver(adapter.model, adapter=adapter) as observer, torch.no_grad():
        model(images)
    call = observer.find(images)
    reference = explain(model, images, method="gradcam", layer="features", top_k=4, score_threshold=0.0)

    assert call is not None and call.replay is not None and call.replay.batch_hw == (SIZE, SIZE)
    for position, ref in enumerate(reference):
        output = call.replay.output(position, call.detections[position], 4, 0.0)
        (read,) = gradcam_explanations(output, "features")
        assert len(read) == len(ref) == 4 and read.raw.shape[1:] == tuple(images[position].shape[1:])
        torch.testing.assert_close(read.boxes, ref.boxes)
        torch.testing.assert_close(read.raw, ref.raw, rtol=1e-4, atol=1e-6 * float(ref.raw.amax()))


def test_gradcam_reads_the_validation_forward_under_bf16_autocast(scenes_root):
    dm = scenes(scenes_root)
    callback = recording(GradCAMCallback)(top_k=3, score_threshold=0.0, num_probe_images=3)

    model = fit(dm, [callback], precision="bf16-mixed")  # bf16 feature maps; RoIAlign has no CPU bf16 kernel

    assert callback.explained == []
    (results,) = callback.logged
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the callback's own forward, as it runs under bf16-mixed
        again = own_forward(callback, model, dm, callback.probe_indices)
    for read, ref in zip((r.value for r in results), again):
        assert read.raw.dtype == torch.float32 and torch.isfinite(read.raw).all() and read.raw.amax() > 0
        torch.testing.assert_close(read.boxes, ref.boxes, rtol=0.0, atol=0.5)
        assert torch.equal(read.labels, ref.labels)
        cosine = torch.nn.functional.cosine_similarity(read.raw.flatten(1), ref.raw.flatten(1))
        assert (cosine > 0.9).all(), cosine


def test_gradcam_methods_without_the_roi_path_run_their_own_forward(scenes_root):
    dm = scenes(scenes_root)
    eigencam = recording(GradCAMCallback)(method="eigencam", top_k=2, score_threshold=0.0, num_probe_images=2)
    one_level = recording(GradCAMCallback)(layer="features/0", top_k=2, score_threshold=0.0, num_probe_images=2,
                                           log_key="gradcam_p2")

    fit(dm, [eigencam, one_level])

    assert eigencam.explained == [eigencam.probe_indices] and len(eigencam.logged) == 1
    assert one_level.explained == [one_level.probe_indices] and len(one_level.logged) == 1


def test_probe_images_the_validation_loop_did_not_run_get_the_callbacks_own_forward(scenes_root):
    dm = scenes(scenes_root, batch_size=2)
    callback = recording(BoxEmbeddingCallback)(score_threshold=0.0, max_detections=4, num_probe_images=4, thumbnail_size=0)

    fit(dm, [callback], limit_val_batches=1)  # validation runs images 0 and 1 only

    assert callback.explained == [[2, 3]]
    (results,) = callback.logged
    assert [r.index for r in results] == [0, 1, 2, 3]


def test_nothing_is_read_when_the_event_is_not_due_or_images_differ(scenes_root):
    dm = scenes(scenes_root)
    not_due = recording(PredictionOverlayCallback)(every_n_epochs=2, num_probe_images=2)
    fit(dm, [not_due], max_epochs=3)  # events after epochs 2 (validation of epoch index 1) only
    assert not_due.explained == [] and len(not_due.logged) == 1

    # Validation images that differ from the probe dataset's (e.g. a random validation
    # transform) are not taken for the probe images, even with the same image_id.
    class Jittered(SyntheticDataModule):
        def val_dataloader(self):  # noqa: ANN201
            def darker(items):  # noqa: ANN001, ANN202
                images, targets = collate_detection(items)
                return [im * 0.5 for im in images], targets

            return DataLoader(self.val_dataset, batch_size=4, collate_fn=darker)

    dm = Jittered(root=scenes_root, num_train=8, num_val=4, image_size=SIZE, batch_size=4, horizontal_flip=False)
    differs = recording(PredictionOverlayCallback)(num_probe_images=2)
    fit(dm, [differs])
    assert differs.explained == [differs.probe_indices]


def test_the_observer_reads_only_eval_calls_and_leaves_no_hook_behind(scenes_root):
    dm = scenes(scenes_root)
    model = detector(dm)
    images = [dm.val_dataset[i][0] for i in range(2)]
    targets = [dm.val_dataset[i][1] for i in range(2)]
    adapter = adapter_for(model)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with ForwardObserver(adapter.model, adapter=adapter) as observer:
        model.model.train()
        model.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])  # losses: ignored
        model.eval()
        with torch.no_grad():
            outputs = model(images)
    call = observer.find(images)

    assert len(observer.observed) == 1 and call is not None and call.family == "two_stage"
    for out, det in zip(outputs, call.detections):
        torch.testing.assert_close(out["boxes"], det.boxes)  # the detections are the model's own
        torch.testing.assert_close(out["scores"], det.scores)
        assert torch.equal(out["labels"], det.labels) and det.features.shape == (len(det), 32)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import pytorch_lightning as pl
    import torch

    from detlens.callbacks import AttentionEntropyCallback, PredictionOverlayCallback
    from detlens.data import SyntheticDataModule
    from detlens.lightning_modules import TorchvisionDetector


    class Recording(PredictionOverlayCallback):
        def explain_shard(self, pl_module, images, targets, indices):
            print(f"rank {pl_module.global_rank} explained {list(indices)}", flush=True)
            return super().explain_shard(pl_module, images, targets, indices)

        def log_results(self, trainer, pl_module, results):
            print(f"logged {[r.index for r in results]} {[len(r.value.scores) for r in results]}", flush=True)


    class RecordingEntropy(AttentionEntropyCallback):
        def explain_shard(self, pl_module, images, targets, indices):
            print(f"entropy rank {pl_module.global_rank} explained {list(indices)}", flush=True)
            return super().explain_shard(pl_module, images, targets, indices)

        def log_results(self, trainer, pl_module, results):
            # rank 0: every image's sums, read on either rank, against a forward of it alone here
            items = [trainer.datamodule.val_dataset[r.index] for r in results]
            alone = super().explain_shard(pl_module, [im for im, _ in items], [t for _, t in items], [])
            same = all(
                torch.allclose(r.value[k][0], ref[k][0], atol=1e-5) and r.value[k][1] == ref[k][1] > 0
                for r, ref in zip(results, alone) for k in ref
            )
            print(f"entropy logged {[r.index for r in results]} equal to each image alone: {same}", flush=True)


    if __name__ == "__main__":
        dm = SyntheticDataModule(root=sys.argv[1], num_train=8, num_val=4, image_size=64, batch_size=1,
                                 horizontal_flip=False)
        model = TorchvisionDetector(
            "fasterrcnn_resnet18_fpn", num_classes=dm.num_classes, class_names=dm.class_names,
            min_size=64, max_size=64, fpn_channels=16, representation_size=32, rpn_proposals_train=50,
            rpn_proposals_test=20, box_batch_size_per_image=16, anchor_sizes=[8, 16, 32, 64, 128],
            score_thresh=0.0, warmup_steps=1, attention_stage="layer3", attention_heads=2,
        )
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, limit_val_batches=1,
            callbacks=[Recording(score_threshold=0.0, max_detections=3, num_probe_images=4),
                       RecordingEntropy(every_n_train_steps=None, num_probe_images=4)],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(model, dm)
    """
)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_explain_only_the_probe_images_no_rank_validated(tmp_path, scenes_root):
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "WANDB_MODE": "disabled"}

    # One validation batch of one image per rank: rank 0 runs image 0, rank 1 image 1.
    done = subprocess.run([sys.executable, str(script), scenes_root], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    # Both ranks print to one pipe: their lines can interleave, so read the statements, not lines.
    explained = sorted(re.findall(r"(?<!entropy )rank \d explained \[[\d, ]*\]", done.stdout))
    assert explained == ["rank 0 explained [2]", "rank 1 explained [3]"], done.stdout
    assert "logged [0, 1, 2, 3] [3, 3, 3, 3]" in done.stdout
    # The probe-set attention entropy the same way: images 0 and 1 read on the rank that validated them.
    entropy = sorted(re.findall(r"entropy rank \d explained \[[\d, ]*\]", done.stdout))
    assert entropy == ["entropy rank 0 explained [2]", "entropy rank 1 explained [3]"], done.stdout
    assert "entropy logged [0, 1, 2, 3] equal to each image alone: True" in done.stdout
