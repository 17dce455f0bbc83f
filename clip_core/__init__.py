from clip_core.loss import ClipLoss, SigLipLoss
from clip_core.transforms import (OPENAI_MEAN, OPENAI_STD, ImageDecodeError, decode_image, normalize,
                                  random_resized_crop, resize_center_crop, resize_keep_aspect, to_uint8_chw)
from clip_core.zero_shot import build_zero_shot_classifier, classification_metrics, load_templates, retrieval_metrics
from clip_core.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from clip_core.model import (CLIP, CLIPConfig, create_model, create_model_from_config, list_models,
                             load_openai_state_dict, model_flops_per_sample)
from clip_core.tokenizer import Tokenizer
