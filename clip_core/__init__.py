"""clip_core: CLIP (Radford et al., 2021) in plain PyTorch.

Models with OpenAI's weight layout, the BPE tokenizer, the distributed contrastive losses, image
transforms, zero-shot evaluation and checkpoint I/O. It imports no Ray, MLflow or Kubernetes code,
so any trainer can use it; ``workflows`` is the only package that knows about those.
"""

from clip_core.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from clip_core.loss import ClipLoss, SigLipLoss
from clip_core.model import (CLIP, CLIPConfig, create_model, create_model_from_config, list_models,
                             load_openai_state_dict, model_flops_per_sample)
from clip_core.pretrained import load_pretrained
from clip_core.tokenizer import Tokenizer
from clip_core.transforms import (OPENAI_MEAN, OPENAI_STD, ImageDecodeError, decode_image, normalize,
                                  random_resized_crop, random_resized_crop_box, resize_center_crop,
                                  resize_keep_aspect, resized_crops, to_uint8_chw)
from clip_core.zero_shot import build_zero_shot_classifier, classification_metrics, load_templates, retrieval_metrics

__all__ = [
    "CLIP", "CLIPConfig", "Checkpoint", "CheckpointError", "ClipLoss", "ImageDecodeError", "OPENAI_MEAN",
    "OPENAI_STD", "SigLipLoss", "Tokenizer", "build_zero_shot_classifier", "classification_metrics",
    "create_model", "create_model_from_config", "decode_image", "list_models", "load_checkpoint",
    "load_openai_state_dict", "load_pretrained", "load_templates", "model_flops_per_sample", "normalize",
    "random_resized_crop", "random_resized_crop_box", "resize_center_crop", "resize_keep_aspect", "resized_crops",
    "retrieval_metrics", "save_checkpoint", "to_uint8_chw",
]
