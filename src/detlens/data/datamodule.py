"""LightningDataModules over COCO-format folders and over generated synthetic scenes.

Both read the category list in ``__init__`` so that ``num_classes`` and ``class_names``
exist before the Trainer starts: LightningCLI links ``data.num_classes ->
model.num_classes`` when it instantiates the classes.

No loader draws from the global torch RNG: shuffling and the training flip use
generators owned by the data module (saved in its ``state_dict``, so a resumed run
replays the same order), which keeps a training run with detlens callbacks
bit-identical to one without.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from detlens.data.coco import CocoCategory, CocoDetectionDataset, collate_detection
from detlens.data.errors import DatasetError
from detlens.data.synthetic import (
    TRAIN_ANN,
    VAL_ANN,
    generate_synthetic_scenes,
    manifest_matches,
    synthetic_params,
    wait_for_synthetic_scenes,
)
from detlens.data.transforms import RandomHorizontalFlip

_SPLITS = ("train", "val", "test")


class CocoDataModule(pl.LightningDataModule):
    """Train/val/test loaders over COCO-format annotation files.

    Args:
        root: dataset folder; the other paths are relative to it (absolute paths also work).
        train_ann / val_ann / test_ann: COCO annotation files; ``test_ann=None`` -> no test split.
        train_images / val_images / test_images: image folders; ``test_images=None`` -> ``"test"``.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 loads in the training process).
        horizontal_flip: random left-right flip (p=0.5) of training images and their boxes.
        seed: seed of the data module's own generators (shuffle order and flips).
        on_bad_image: an image file that exists but cannot be decoded mid-run: ``"skip"``
            (one warning naming it, replaced by the next readable image; the default, so a
            long cluster run does not lose an epoch to one corrupt file) or ``"raise"``.
            Missing files are always an error, raised by ``setup`` before the first step.

    Batches are ``(list[FloatTensor[3, H, W]], list[dict])`` (see :func:`collate_detection`).
    """

    def __init__(
        self,
        root: str,
        train_ann: str = TRAIN_ANN,
        val_ann: str = VAL_ANN,
        test_ann: str | None = None,
        train_images: str = "train",
        val_images: str = "val",
        test_images: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        horizontal_flip: bool = True,
        seed: int = 0,
        on_bad_image: Literal["raise", "skip"] = "skip",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._configure(
            root, train_ann, val_ann, test_ann, train_images, val_images, test_images,
            batch_size, num_workers, horizontal_flip, seed, on_bad_image,
        )

    def _configure(
        self,
        root: str,
        train_ann: str,
        val_ann: str,
        test_ann: str | None,
        train_images: str,
        val_images: str,
        test_images: str | None,
        batch_size: int,
        num_workers: int,
        horizontal_flip: bool,
        seed: int,
        on_bad_image: Literal["raise", "skip"] = "skip",
    ) -> None:
        """Everything ``__init__`` does apart from recording hyperparameters (shared with subclasses)."""
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._annotation_files: dict[str, Path | None] = {
            "train": self.root / train_ann,
            "val": self.root / val_ann,
            "test": self.root / test_ann if test_ann is not None else None,
        }
        self._image_dirs: dict[str, Path] = {
            "train": self.root / train_images,
            "val": self.root / val_images,
            "test": self.root / (test_images if test_images is not None else "test"),
        }
        self._flip = RandomHorizontalFlip(p=0.5, seed=seed) if horizontal_flip else None
        # Separate generators so that how often one loader is iterated never changes another's order.
        self._loader_generators = {split: torch.Generator().manual_seed(seed + i) for i, split in enumerate(_SPLITS)}
        self._datasets: dict[str, CocoDetectionDataset] = {}
        self._checked: set[str] = set()
        self._categories = self._load_categories()

    # -- what LightningCLI and the callbacks read ----------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of object categories ``C`` (background excluded)."""
        return len(self._categories)

    @property
    def class_names(self) -> dict[int, str]:
        """Contiguous label (``1..C``) -> category name."""
        return {c.label: c.name for c in self._categories}

    @property
    def train_dataset(self) -> CocoDetectionDataset:
        """Training items, with the random flip if ``horizontal_flip``.

        Indexing it outside the loader draws from the flip generator; read probe images from
        ``val_dataset`` (untransformed) so training batches stay exactly as without probes.
        """
        return self._dataset("train")

    @property
    def val_dataset(self) -> CocoDetectionDataset:
        """Validation items, never transformed."""
        return self._dataset("val")

    @property
    def test_dataset(self) -> CocoDetectionDataset | None:
        """Test items, or ``None`` if no ``test_ann`` was given."""
        return self._dataset("test") if self._annotation_files["test"] is not None else None

    # -- LightningDataModule hooks --------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Builds and validates the datasets the stage needs, their image files included
        (every missing file of a split in one :class:`DatasetError`, before the first step)."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("val",)}
        for split in splits.get(stage, ()):
            if split == "test" and self._annotation_files["test"] is None:
                raise DatasetError(
                    f"{type(self).__name__}: no test split; set test_ann (and test_images) to run test"
                )
            if split not in self._checked:
                self._dataset(split).check_files()
                self._checked.add(split)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """Generator states, so a resumed run continues the same shuffle and flip sequence."""
        state: dict[str, Any] = {f"{split}_loader_generator": g.get_state() for split, g in self._loader_generators.items()}
        if self._flip is not None:
            state["flip"] = self._flip.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for split, generator in self._loader_generators.items():
            key = f"{split}_loader_generator"
            if key in state_dict:
                generator.set_state(state_dict[key])
        if self._flip is not None and "flip" in state_dict:
            self._flip.load_state_dict(state_dict["flip"])

    # -- helpers --------------------------------------------------------------------------

    def _load_categories(self) -> list[CocoCategory]:
        """Categories of the first split whose annotation file exists (that dataset is kept)."""
        for split in _SPLITS:
            path = self._annotation_files[split]
            if path is not None and path.is_file():
                return self._dataset(split).categories
        tried = ", ".join(str(p) for p in self._annotation_files.values() if p is not None)
        raise DatasetError(f"{type(self).__name__}: none of the annotation files exists: {tried}")

    def _dataset(self, split: str) -> CocoDetectionDataset:
        if split not in self._datasets:
            annotation_file = self._annotation_files[split]
            assert annotation_file is not None
            dataset = CocoDetectionDataset(
                self._image_dirs[split],
                annotation_file,
                transforms=self._flip if split == "train" else None,
                on_bad_image=self.on_bad_image,
            )
            reference = getattr(self, "_categories", None)
            if reference is not None and dataset.categories != reference:
                raise DatasetError(
                    f"{annotation_file}: categories differ from the other split's "
                    f"({_describe(dataset.categories)} vs {_describe(reference)}); every split must "
                    "list the same category ids and names so labels mean the same thing"
                )
            self._datasets[split] = dataset
        return self._datasets[split]

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        dataset = self._dataset(split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            generator=self._loader_generators[split],
            persistent_workers=self.num_workers > 0,
        )


def _describe(categories: list[CocoCategory]) -> str:
    return "[" + ", ".join(f"{c.category_id}:{c.name}" for c in categories) + "]"


class SyntheticDataModule(CocoDataModule):
    """:class:`CocoDataModule` over synthetic scenes it generates (see
    :func:`detlens.data.generate_synthetic_scenes`) into ``root`` if not already there.

    Args:
        root: dataset folder; reused when it holds scenes with identical parameters.
        num_train / num_val: images per split. image_size: image side in pixels.
        seed: seed of the scenes, and of the shuffle order and flips.
        spurious_cue: probability that a training object's class is also shown by a cue patch.
        spurious_cue_val: the same for validation; ``None`` -> ``spurious_cue``.
        object_colours: ``"class"`` (a hue per class) or ``"random"`` (colour says nothing
            about the class; only the shape, or a spurious cue, does).
        cue_placement: ``"anywhere"`` (a cue patch at a random free spot), ``"beside"``
            (touching its own object's box) or ``"ring"`` (a ring around its box); see
            :func:`generate_synthetic_scenes`.
        appearance_noise: probability that a training object has another class's shape and
            hue (label and cue unchanged); see :func:`generate_synthetic_scenes`.
        batch_size, num_workers, horizontal_flip: as for :class:`CocoDataModule`.
        overwrite: replace a dataset in ``root`` that was generated with other parameters.

    Generation runs in ``__init__`` (``num_classes`` is needed at once) and in
    ``prepare_data``. Under DDP only local rank 0 writes (under a lock, into a temporary
    folder renamed into place); other ranks wait for it.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        num_train: int = 400,
        num_val: int = 100,
        image_size: int = 160,
        seed: int = 0,
        spurious_cue: float = 0.0,
        spurious_cue_val: float | None = None,
        object_colours: Literal["class", "random"] = "class",
        cue_placement: Literal["anywhere", "beside", "ring"] = "anywhere",
        appearance_noise: float = 0.0,
        batch_size: int = 8,
        num_workers: int = 0,
        horizontal_flip: bool = True,
        overwrite: bool = False,
    ) -> None:
        self._synthetic_params = synthetic_params(
            num_train, num_val, image_size, seed, spurious_cue, spurious_cue_val, object_colours, cue_placement,
            appearance_noise,
        )
        self._overwrite = overwrite
        self._ensure_generated(Path(root))
        # CocoDataModule.__init__ is bypassed so that hparams hold this class's arguments only
        # (the merged record would list train_ann etc., which this class does not accept).
        pl.LightningDataModule.__init__(self)
        self.save_hyperparameters(
            {
                "root": root, "num_train": num_train, "num_val": num_val, "image_size": image_size,
                "seed": seed, "spurious_cue": spurious_cue, "spurious_cue_val": spurious_cue_val,
                "object_colours": object_colours, "cue_placement": cue_placement,
                "appearance_noise": appearance_noise, "batch_size": batch_size, "num_workers": num_workers,
                "horizontal_flip": horizontal_flip, "overwrite": overwrite,
            }
        )
        self._configure(
            root, TRAIN_ANN, VAL_ANN, None, "train", "val", None,
            batch_size, num_workers, horizontal_flip, seed,
        )

    def prepare_data(self) -> None:
        """Lightning calls this on local rank 0 only; a no-op when the scenes are in place."""
        self._ensure_generated(self.root)

    def _ensure_generated(self, root: Path) -> None:
        p = self._synthetic_params
        if manifest_matches(root, p):
            return
        if _local_rank() == 0:
            generate_synthetic_scenes(
                root,
                p["num_train"],
                p["num_val"],
                p["image_size"],
                p["seed"],
                p["spurious_cue"],
                p["spurious_cue_val"],
                p.get("object_colours", "class"),
                p.get("cue_placement", "anywhere"),
                p.get("appearance_noise", 0.0),
                overwrite=self._overwrite,
            )
        else:
            wait_for_synthetic_scenes(root, p)


def _local_rank() -> int:
    """This process's rank on its node, from the launcher's environment (0 outside DDP).

    Read from the environment because ``__init__`` runs before the Trainer sets up the
    process group; Lightning's own launcher, torchrun and SLURM set these variables.
    """
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK"):
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0
