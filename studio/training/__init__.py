"""Training: the config, the objectives, checkpoints and the one engine every trained artefact runs through.

    from studio.training import train
    result = train(data="photos/", trigger="sks", preset="quick")
"""

from studio.training.config import PRESETS, LoopSettings, TrainConfig, TrainingError, config_with_preset
from studio.training.engine import Engine, TrainResult, Trainer, run_recipe, step_generator, train
from studio.training.recipe import AdapterOutput, Recipe, Share, Trainables

__all__ = ["PRESETS", "AdapterOutput", "Engine", "LoopSettings", "Recipe", "Share", "TrainConfig", "TrainResult",
           "Trainables", "Trainer", "TrainingError", "config_with_preset", "run_recipe", "step_generator", "train"]
