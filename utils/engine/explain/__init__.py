"""Pictures of what a detector looks at: objectness, class-activation maps at a named layer, attention gates.

Nothing here changes a model: maps are read through forward hooks registered for one forward pass and
removed after it, and attention blocks compute their gates on demand (`block.explain(x)`), so training,
CUDA graphs and ONNX export never carry extra state.
"""
from utils.engine.explain.attention import attention_picture, check_has_attention
from utils.engine.explain.cam import CAM_METHODS, cam_picture, default_layer
from utils.engine.explain.capture import resolve_layer, torch_model
from utils.engine.explain.objectness import objectness_map, objectness_picture

__all__ = ["CAM_METHODS", "attention_picture", "cam_picture", "check_has_attention", "default_layer",
           "objectness_map", "objectness_picture", "resolve_layer", "torch_model"]
