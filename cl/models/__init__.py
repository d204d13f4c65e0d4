"""The lab's models (`networks`) and their weights files (`weights`).

Every lab model has timm's feature API (`forward_features`, `forward_head`,
`get_classifier`, `num_features`); `cl.config.models.build_model` builds any of
them, a timm model or a `module:Class` path from an experiment file's name.
"""
from cl.models.hf import HFCausalLM, export_hf
from cl.models.networks import MLP, MODELS, ByteGPT, MultiHeadClassifier, ReducedResNet18
from cl.models.weights import (DEFAULT_WEIGHTS_DIR, classifier_keys, load_backbone_weights, read_weights,
                               resolve_weights, weights_root)

__all__ = ["MLP", "MODELS", "ByteGPT", "DEFAULT_WEIGHTS_DIR", "HFCausalLM", "export_hf", "MultiHeadClassifier", "ReducedResNet18",
           "classifier_keys", "load_backbone_weights", "read_weights", "resolve_weights", "weights_root"]
