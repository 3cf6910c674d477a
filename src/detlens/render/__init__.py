"""detlens.render: pure functions from explanations to pixels and logger payloads.

No model and no logger here: arrays in, arrays or plain dicts out.
"""

from detlens.render.boxes import class_color, class_labels_for, draw_boxes, wandb_box_data, wandb_boxes

__all__ = ["class_color", "class_labels_for", "draw_boxes", "wandb_box_data", "wandb_boxes"]
