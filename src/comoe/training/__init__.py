"""Training: settings, the model factory, the loss, batches, the loop, checkpoints, logs, distributed.

Deliberately empty of imports: the command line reads `comoe.training.settings` without loading torch.
Import `comoe.training.loop.train` to train from Python.
"""
