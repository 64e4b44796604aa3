"""What ``dap_pretrain.engine.train_one_epoch`` needs beside a model and a loader, for tests that call it directly."""


class RecordingSampler:
    """The sampler side: records which indices got a loss."""

    def __init__(self):
        self.indices = []

    def record(self, indices, losses):
        self.indices += indices.tolist()


class FixedLR:
    """An LR schedule that always says 0.1."""

    def step(self, progress: float) -> float:
        return 0.1
