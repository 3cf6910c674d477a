"""detlens.render: pure functions from explanations to pixels and logger payloads.

No model and no logger here: arrays in, arrays or plain dicts out.
"""

from detlens.render.boxes import class_color, class_labels_for, draw_boxes, wandb_box_data, wandb_boxes
from detlens.render.heatmap import colorize, merge_maps, overlay_heatmap
from detlens.render.scatter import box_thumbnail, render_scatter

__all__ = [
    "box_thumbnail",
    "render_scatter",
    "class_color",
    "class_labels_for",
    "colorize",
    "draw_boxes",
    "merge_maps",
    "overlay_heatmap",
    "wandb_box_data",
    "wandb_boxes",
]
