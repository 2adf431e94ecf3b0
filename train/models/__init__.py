"""Model registry: ``type -> (ArgsDataclass, ModuleClass)``. Each model module defines both."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch.nn as nn

# type -> (module, args class name, model class name); imported lazily.
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "mlp": ("deepserve.train.models.mlp", "MLPArgs", "MLP"),
    "cnn": ("deepserve.train.models.cnn", "CNNArgs", "CNN"),
    "resnet": ("deepserve.train.models.resnet", "ResNetArgs", "ResNet"),
    "lstm": ("deepserve.train.models.charlm", "CharRNNArgs", "CharRNN"),
    "gru": ("deepserve.train.models.charlm", "CharRNNArgs", "CharRNN"),
    "transformer": ("deepserve.train.models.seq2seq", "Seq2SeqArgs", "Seq2SeqTransformer"),
}

MODEL_TYPES = tuple(_REGISTRY)


def model_classes(model_type: str) -> tuple[type, type[nn.Module]]:
    if model_type not in _REGISTRY:
        raise KeyError(f"unknown model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    module_name, args_name, model_name = _REGISTRY[model_type]
    module = importlib.import_module(module_name)
    return getattr(module, args_name), getattr(module, model_name)


def build_model(model_type: str, args: dict[str, Any]) -> nn.Module:
    args_cls, model_cls = model_classes(model_type)
    return model_cls(args_cls(**args))


def args_dict(args: Any) -> dict[str, Any]:
    return dataclasses.asdict(args)
