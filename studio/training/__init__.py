"""Training: the config, the objectives, checkpoints and the one engine every method trains through.

    from studio.training import train
    result = train(data="photos/", trigger="sks", preset="quick")
"""

from studio.training.engine import (PRESETS, TrainConfig, Trainer, TrainingError, TrainResult, config_with_preset,
                                    train)

__all__ = ["PRESETS", "TrainConfig", "Trainer", "TrainingError", "TrainResult", "config_with_preset", "train"]
