"""fft.train: TrainState, optimizers, losses, the train step, the Recipe contract, the Trainer."""

from fft.train.state import TrainState, split_model, trainable_filter_from_config
from fft.train.step import LossFn, make_eval_step, make_train_step

__all__ = [
    "LossFn",
    "TrainState",
    "make_eval_step",
    "make_train_step",
    "split_model",
    "trainable_filter_from_config",
]
