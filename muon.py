"""Muon on the convolution filters, Nesterov SGD on the rest: airbench94_muon's optimizer
(Keller Jordan's Muon, as KellerJordan/cifar10-airbench's airbench94_muon.py runs it), as
a Paddle optimizer.

A parameter group marked ``orthogonalize=True`` takes Muon's step; every other group is
paddle.optimizer.Momentum's, unchanged. Muon's step for a filter W [out, in, k, k] with
gradient g, momentum mu and learning rate lr:

    v = mu v + g;  u = g + mu v (Nesterov) or v
    W = W x sqrt(out) / |W|          (the filters' norm held fixed: no weight decay)
    W = W - lr x orthogonalize(u as [out, in k k])

``orthogonalize`` is airbench's 3-step quintic Newton-Schulz iteration: it maps the update
to a matrix with the same singular vectors and singular values near 1. airbench runs it in
bf16 on the GPU; here it runs in float32: the step of fast_plain's filters takes 72-90 ms
on 2 AMD cores (Momentum's 2 ms), about 2% of a training step at batch 2000.

The velocity is Momentum's own accumulator, so the state dict, checkpoints and an exact
resume are Momentum's too. Weights stay float32 (AMP O1, or our CPU kernels' bf16):
AMP O2's low-precision weights are refused (config.check_limits).

    opt = Muon(learning_rate=sched, momentum=0.85, use_nesterov=True, parameters=[
        dict(params=filters, learning_rate=0.24 / lr, momentum=0.6, weight_decay=0.0, orthogonalize=True),
        dict(params=others)])
"""
import math

import paddle

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # airbench's quintic coefficients: steep at zero


def orthogonalize(g, steps=3, eps=1e-7):
    """About U V^T for g = U S V^T (2-D): singular values pushed toward 1 (to roughly 0.5-1.5
    in 3 steps), singular vectors kept."""
    a, b, c = NEWTON_SCHULZ
    x = g / (paddle.linalg.norm(g) + eps)  # every singular value <= 1
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the short side: x x^T is the smaller product
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(paddle.optimizer.Momentum):
    """paddle.optimizer.Momentum whose groups marked ``orthogonalize=True`` take Muon's
    step (see the module's docstring). A group's ``momentum``, ``use_nesterov`` and
    ``learning_rate`` (a multiplier of the schedule's) apply to both kinds."""

    def _append_optimize_op(self, block, param_and_grad):
        if not (isinstance(param_and_grad, dict) and param_and_grad.get("orthogonalize")):
            return super()._append_optimize_op(block, param_and_grad)
        param, grad = self._update_param_group(param_and_grad)  # this group's momentum and Nesterov
        if self._multi_precision and self._is_dtype_fp16_or_bf16(param.dtype):
            raise ValueError("Muon keeps float32 weights: AMP O2's low-precision weights are not supported")
        velocity = self._get_accumulator_master(self._velocity_acc_str, param)
        lr = self._create_param_lr((param, grad))
        velocity.set_value(self._momentum * velocity + grad)
        step = grad + self._momentum * velocity if self._use_nesterov else velocity
        out = param.shape[0]
        param.set_value(param * (math.sqrt(out) / paddle.linalg.norm(param)))
        update = orthogonalize(step.reshape([out, -1])).reshape(param.shape)
        param.set_value(param - lr * update)
