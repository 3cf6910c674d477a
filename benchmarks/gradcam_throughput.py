"""Per-detection Grad-CAM cost: detlens' fast paths vs one backward per detection vs pytorch-grad-cam.

Measured, not asserted. For each model and K (detections explained on one image), in one
process, on the same model, layer and target (the class score), it times:

* ``detlens``: one forward + one backward for all K maps (two-stage RoI path on Faster
  R-CNN; vectorised backward on DETR, transformers' DETR and Deformable DETR, and the dense heads);
* ``loop``: the same forward, then one backward per detection (``gradcam(..., fast=False)``);
* ``pytorch-grad-cam``: ``GradCAM`` with a ``FasterRCNNBoxScoreTarget`` per detection, i.e.
  one forward and one backward per detection, as its detection tutorial does.

and prints milliseconds per detection and the speed-up, one line per model and K::

    .venv/bin/python benchmarks/gradcam_throughput.py            # 1 CPU thread, best of 3
    .venv/bin/python benchmarks/gradcam_throughput.py --threads 4 --repeats 5 --ks 1 10 50
    .venv/bin/python benchmarks/gradcam_throughput.py --models damo_yolo_t yolov8n --quick   # smoke run

``hf_*`` rows need the ``detlens[hf]`` extra (transformers' models at their published sizes,
random weights; pytorch-grad-cam reads their detections as torchvision's dicts, one per query);
``damo_yolo_t`` needs the ``detlens[damo]`` extra; ``yolov8n`` needs the Ultralytics plugin (``plugins/detlens-ultralytics``, AGPL-3.0, imported
only when that row is asked for); pytorch-grad-cam then scores the detection's box with its
``FasterRCNNBoxScoreTarget`` on the head's pre-NMS boxes of every anchor.

Models are randomly initialised (score threshold 0 so that K detections exist); cost does
not depend on the weights.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from detlens.adapters import adapter_for
from detlens.explainers.gradcam import gradcam
from detlens.lightning_modules import DETR, TorchvisionDetector


def build(name: str, size: int) -> tuple[torch.nn.Module, str, str]:
    """``(network, detlens layer, the same layer as a module name for pytorch-grad-cam)``."""
    torch.manual_seed(0)
    if name == "fasterrcnn_mobilenet_v3_fpn":
        module = TorchvisionDetector(
            "fasterrcnn_mobilenet_v3_large_fpn", num_classes=20, min_size=size, max_size=size,
            rpn_proposals_test=300, score_thresh=0.0, detections_per_image=100,
        )
        # FPN level "0" is exactly the output of layer_blocks[0]
        return module.model.eval(), "features/0", "backbone.fpn.layer_blocks.0"
    if name in ("hf_detr_r50", "hf_deformable_detr_r50"):
        # transformers' models at their published sizes (ResNet-50 trunk, 6 + 6 layers, 256 wide),
        # random weights: the class-default configs with the trunk built from its config.
        from detlens.lightning_modules.hf_detector import build_hf_detector

        base = dict(d_model=256, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                    encoder_ffn_dim=1024, decoder_ffn_dim=1024, num_queries=100)
        from transformers import ResNetConfig

        trunk = ResNetConfig(out_features=["stage4"] if name == "hf_detr_r50" else ["stage2", "stage3", "stage4"])
        net = build_hf_detector("detr" if name == "hf_detr_r50" else "deformable_detr", 21, dict(base, backbone_config=trunk))
        for parameter in net.parameters():  # as HFDetector trains it (transformers freezes a pretrained trunk):
            parameter.requires_grad_(True)  # pytorch-grad-cam needs the target layer's output to require grad
        layer = "model.backbone.model.encoder.stages.3"
        return net.eval(), layer, layer
    if name == "yolov8n":
        from detlens_ultralytics import UltralyticsDetector  # the AGPL plugin: only for this row

        module = UltralyticsDetector(num_classes=20, model_yaml="yolov8n.yaml")
        for branch in module.model.model[-1].cv3:  # scores spread around 0.1, so K detections exist
            branch[-1].bias.data.fill_(-2.0)
        return module.model.eval(), "model.15", "model.15"  # the P3 neck output the head reads
    if name == "damo_yolo_t":
        from detlens.lightning_modules import DamoYolo  # the detlens[damo] extra

        module = DamoYolo(num_classes=20, score_thresh=0.0)
        return module.model.eval(), "neck.merge_5", "neck.merge_5"  # the P3 neck output ZeroHead reads
    module = DETR(num_classes=20, backbone="resnet50", image_size=size, num_queries=100, score_thresh=0.0)
    return module.model.eval(), "backbone.layer4", "backbone.layer4"


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["fasterrcnn_mobilenet_v3_fpn", "detr_r50", "hf_detr_r50", "hf_deformable_detr_r50",
                                 "damo_yolo_t", "yolov8n"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-pytorch-grad-cam", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: K = 1, 3 at 128 px, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.size, args.repeats = [1, 3], 128, 1
    torch.set_num_threads(args.threads)
    image = torch.rand(3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.size} px, best of {args.repeats}")
    print(f"{'model':30s} {'K':>3s} {'detlens ms/det':>15s} {'loop ms/det':>12s} {'pgc ms/det':>11s} "
          f"{'vs loop':>8s} {'vs pgc':>8s}")
    for name in args.models:
        net, layer, module_name = build(name, args.size)
        adapter = adapter_for(net)
        for k in args.ks:
            def ours(fast: bool) -> list[torch.Tensor]:
                out = adapter.run([image], [layer], top_k=k)
                return gradcam(out, layer, fast=fast)

            maps = ours(True)  # warm-up, and the detections pytorch-grad-cam will explain
            got = int(maps[0].shape[0])
            t_fast = best_of(args.repeats, lambda: ours(True))
            t_loop = best_of(args.repeats, lambda: ours(False))
            t_pgc = float("nan")
            if not args.no_pytorch_grad_cam:
                t_pgc = time_pytorch_grad_cam(net, adapter, image, layer, module_name, k, args.repeats)
            print(
                f"{name:30s} {got:3d} {1e3 * t_fast / got:15.1f} {1e3 * t_loop / got:12.1f} {1e3 * t_pgc / got:11.1f} "
                f"{t_loop / t_fast:7.1f}x {t_pgc / t_fast:7.1f}x",
                flush=True,
            )


def time_pytorch_grad_cam(net, adapter, image, layer, module_name, k, repeats) -> float:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    dets = adapter.run([image], [layer], top_k=k, with_grad=False).detections[0]
    target_layer = dict(net.named_modules())[module_name]
    batch = image[None]
    from detlens.adapters.dense_head import DenseHeadAdapter

    # pytorch-grad-cam calls model(batch_tensor) and reads torchvision-style detection dicts; detectors take a list
    if adapter.family == "hf_detr":
        net = _DetectionDicts(adapter)
    elif isinstance(adapter, DenseHeadAdapter):
        net = _DenseBoxes(adapter)
    else:
        net = _ListInput(net)

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with GradCAM(model=net, target_layers=[target_layer]) as cam:
                for d in range(len(dets)):  # one forward + backward per detection
                    target = FasterRCNNBoxScoreTarget(labels=[dets.labels[d]], bounding_boxes=dets.boxes[d : d + 1])
                    cam(input_tensor=batch, targets=[target])

    run()
    return best_of(repeats, run)


class _ListInput(torch.nn.Module):
    """``model(batch)`` -> ``net(list(batch))`` (DETRNet refuses a bare tensor)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: torch.Tensor):
        return self.net(list(batch))


class _DetectionDicts(torch.nn.Module):
    """``model(batch)`` -> torchvision's ``[{boxes, scores, labels}]`` with differentiable scores, for a
    transformers detector (the same scores detlens explains, one detection per query)."""

    def __init__(self, adapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.net = adapter.model

    def forward(self, batch: torch.Tensor):
        images = list(batch)
        pixel_values, pixel_mask, padded = self.adapter._pixels(images)
        out = self.adapter._call(pixel_values, pixel_mask)
        dets, _ = self.adapter._detections(out, images, padded, None, 0.0)
        return [{"boxes": d.box_graph, "scores": d.score_graph, "labels": d.labels} for d in dets]


class _DenseBoxes(torch.nn.Module):
    """A dense head as pytorch-grad-cam's detection targets read a model: per image, the boxes,
    best-class scores and labels of every anchor (before NMS, differentiable)."""

    def __init__(self, adapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.net = adapter.model

    def forward(self, batch: torch.Tensor):
        from detlens.adapters.dense_head import decode_distances

        ad = self.adapter
        levels = ad.dense_forward(ad.preprocess(list(batch)))
        out = []
        for i in range(batch.shape[0]):
            logits = torch.cat([x[i].flatten(1) for x in levels.cls_logits], 1).T
            reg = torch.cat([x[i].flatten(1) for x in levels.box_regression], 1).T
            pts, strides = [], []
            for x, s in zip(levels.cls_logits, levels.strides):
                h, w = x.shape[-2:]
                ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                pts.append((torch.stack([xs.flatten(), ys.flatten()], 1).float() + ad.grid_offset) * s)
                strides.append(torch.full((h * w,), float(s)))
            anchors, stride = torch.cat(pts), torch.cat(strides)
            dist = decode_distances(reg, reg.shape[1] // 4) * stride[:, None]
            boxes = torch.cat([anchors - dist[:, :2], anchors + dist[:, 2:]], 1)
            boxes = torch.stack([boxes[:, 0].clamp(0, batch.shape[-1]), boxes[:, 1].clamp(0, batch.shape[-2]),
                                 boxes[:, 2].clamp(0, batch.shape[-1]), boxes[:, 3].clamp(0, batch.shape[-2])], 1)
            scores, labels = ad._scores(logits).max(1)
            out.append({"boxes": boxes, "scores": scores, "labels": labels + ad.label_offset()})
        return out


if __name__ == "__main__":
    main()
