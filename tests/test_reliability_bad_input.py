"""Bad input is a clear error before training starts, for every detlens callback.

Empty probe sets (a folder without images, a validation set without items), wrong layer
and module names (with the close matches), and methods a model cannot support are each
refused at ``setup`` — no training step has run when the error reaches the user. The
data-level cases (malformed COCO files, odd image modes) are in ``test_data_coco.py``, the
config-level ones in ``test_cli.py``.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
from reliability_utils import every_callback, faster_rcnn, quiet_trainer, scenes
from torch.utils.data import Subset

from detlens.callbacks import AttentionEntropyCallback, AttentionMapCallback, GradCAMCallback

pytestmark = pytest.mark.usefixtures("one_thread")


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.steps += 1


def fit_expecting(error: str, callbacks: list[pl.Callback], dm: pl.LightningDataModule, **model_kw) -> None:
    """Fits; the error must come before the first training batch."""
    counter = StepCounter()
    with pytest.raises(ValueError, match=error), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[counter, *callbacks], limit_val_batches=1).fit(faster_rcnn(dm, **model_kw), dm)
    assert counter.steps == 0, "the error came after training had started"


@pytest.mark.parametrize("index", range(5), ids=lambda i: ["predictions", "gradcam", "attention_maps", "attention", "embeddings"][i])
def test_an_empty_probe_folder_is_refused_at_setup_by_every_callback(index, scenes_root, tmp_path):
    empty = tmp_path / "probe"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    callback = every_callback(every_n_steps=None, probe_dir=str(empty))[index]
    fit_expecting(r"probe_dir .*probe holds no images", [callback], scenes(scenes_root))


def test_an_empty_validation_set_is_refused_at_setup(scenes_root):
    class NoValidationImages(type(scenes(scenes_root))):
        @property
        def val_dataset(self):  # a validation split that came out empty (e.g. a filtered annotation file)
            return Subset(super().val_dataset, [])

    dm = NoValidationImages(root=scenes_root, num_train=8, num_val=4, image_size=64, batch_size=4, horizontal_flip=False)
    fit_expecting("the probe dataset is empty", every_callback(every_n_steps=None)[:1], dm)


def test_wrong_layer_and_module_names_list_the_close_matches_before_training(scenes_root):
    dm = scenes(scenes_root)
    fit_expecting(r"Unknown target layer 'backbone\.body\.layr3'.*Closest: 'backbone\.body\.layer3'",
                  [GradCAMCallback(layer="backbone.body.layr3")], dm)
    fit_expecting(r"module 'backbone\.body\.layer3_atention' not found .* Did you mean",
                  [AttentionEntropyCallback(modules=["backbone.body.layer3_atention"])], dm)


@pytest.mark.parametrize("callback", [AttentionMapCallback, AttentionEntropyCallback])
def test_attention_callbacks_refuse_a_detector_without_attention_before_training(callback, scenes_root):
    fit_expecting(r"(?i)no attention", [callback()], scenes(scenes_root), attention_stage=None)
