"""Weight averaging as airbench94 does it (its "Lookahead", arXiv:2404.00498):
every ``every`` steps the average moves toward the weights, avg += (1 - d) (w - avg), and
the weights are set to it; d = decay**every x (iteration / total)**3, so the average
follows the weights closely early on and holds on to more of its past as the learning
rate falls. After the last step the weights are the average. It covers the whole state
(weights and BatchNorm statistics), in float32 whatever the weights' dtype.

    averaging = Lookahead(model, decay=0.95, total=iterations)
    ... optimizer.step(); averaging.step(iteration)       # iteration: steps taken so far

Its state goes into every checkpoint, so a resumed run averages as one that never stopped.
"""
import numpy as np
import paddle


class Lookahead:
    def __init__(self, model, decay, total, every=5):
        self.model, self.decay, self.total, self.every = model, decay, total, every
        self.average = {name: t.astype("float32").clone() for name, t in self.tensors().items()}

    def tensors(self):
        """The model's floating-point state by name (parameters and buffers)."""
        return {name: t for name, t in self.model.state_dict().items() if t.dtype in (
            paddle.float32, paddle.float16, paddle.bfloat16, paddle.float64)}

    @paddle.no_grad()
    def step(self, iteration):
        """After optimizer step number ``iteration`` (1-based): every ``every`` steps move the
        average and set the weights to it; at the last step set them to it."""
        if iteration % self.every and iteration < self.total:
            return
        d = self.decay ** self.every * min(iteration / self.total, 1.0) ** 3
        for name, t in self.tensors().items():
            average = self.average[name]
            if iteration % self.every == 0:  # the last step, off the beat, only takes the average
                average.set_value(average + (1 - d) * (t.astype("float32") - average))
            t.set_value(average.astype(t.dtype))

    def state_dict(self):
        return {name: t.numpy() for name, t in self.average.items()}

    def set_state_dict(self, state):
        for name, t in self.average.items():
            t.set_value(np.asarray(state[name], dtype=np.float32))
