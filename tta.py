"""Test-time augmentation: a model's logits averaged over views of each image.

    none            the image
    flip            the image and its mirror, 1/2 each
    flip_translate  airbench94's six views (arXiv:2404.00498): the mirrored
                    pair (1/2), and the mirrored pairs of the image moved one pixel up-left
                    and one down-right with reflected edges (1/4 each)

``with_tta(model, "flip")`` is a Layer evaluate() takes like the model:
x: [N, 3, H, W] float32 (normalised) -> logits [N, num_classes]
"""
import paddle
import paddle.nn.functional as F

LEVELS = ("none", "flip", "flip_translate")


class TestTimeAugmentation(paddle.nn.Layer):
    __test__ = False  # not a pytest class

    def __init__(self, model, level):
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"test-time augmentation must be one of {', '.join(LEVELS)}, got {level!r}")
        self.model, self.level = model, level

    def mirrored(self, x):
        return 0.5 * self.model(x) + 0.5 * self.model(x.flip([3]))

    def forward(self, x):
        if self.level == "none":
            return self.model(x)
        logits = self.mirrored(x)
        if self.level == "flip":
            return logits
        h, w = x.shape[2], x.shape[3]
        padded = F.pad(x, [1, 1, 1, 1], mode="reflect")
        moved = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]  # up-left, down-right
        return 0.5 * logits + 0.25 * self.mirrored(moved[0]) + 0.25 * self.mirrored(moved[1])


def with_tta(model, level):
    """``model`` evaluated over the views of ``level`` (``model`` itself for "none")."""
    return model if level == "none" else TestTimeAugmentation(model, level)
