"""Independent NumPy references for RMSprop as each framework publishes it.

Each function is written from that framework's own source or documentation (cited),
not from npu_optim_compile: one step for one array, float64, state in a dict. They
share nothing with the library's code on purpose.
"""

from __future__ import annotations

import numpy as np


def torch_rmsprop(p, g, s, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                  centered=False, maximize=False):
    """torch/optim/rmsprop.py (_single_tensor_rmsprop), torch 2.13."""
    if not s:
        s.update(v=np.zeros_like(p), ga=np.zeros_like(p), b=np.zeros_like(p))
    g = -g if maximize else g
    if weight_decay:
        g = g + weight_decay * p
    s["v"] = alpha * s["v"] + (1 - alpha) * g * g
    if centered:
        s["ga"] = s["ga"] + (1 - alpha) * (g - s["ga"])
        avg = np.sqrt(s["v"] - s["ga"] ** 2) + eps
    else:
        avg = np.sqrt(s["v"]) + eps
    if momentum > 0:
        s["b"] = momentum * s["b"] + g / avg
        return p - lr * s["b"]
    return p - lr * g / avg


def timm_rmsprop_tf(p, g, s, *, lr, alpha=0.9, eps=1e-10, weight_decay=0.0, momentum=0.0,
                    centered=False, decoupled_decay=False, lr_in_momentum=True):
    """timm/optim/rmsprop_tf.py (RMSpropTF): TF op order, square_avg starts at 1, eps in
    the root, decoupled decay p *= 1 - lr*wd."""
    if not s:
        s.update(v=np.ones_like(p), ga=np.zeros_like(p), b=np.zeros_like(p))
    if weight_decay:
        if decoupled_decay:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    s["v"] = s["v"] + (1 - alpha) * (g**2 - s["v"])
    if centered:
        s["ga"] = s["ga"] + (1 - alpha) * (g - s["ga"])
        avg = np.sqrt(s["v"] - s["ga"] ** 2 + eps)
    else:
        avg = np.sqrt(s["v"] + eps)
    if momentum > 0:
        if lr_in_momentum:
            s["b"] = momentum * s["b"] + lr * g / avg
            return p - s["b"]
        s["b"] = momentum * s["b"] + g / avg
        return p - lr * s["b"]
    return p - lr * g / avg


def torch_npu_rmsprop_tf(p, g, s, *, lr, alpha=0.9, eps=1e-10, weight_decay=0.0, momentum=0.0,
                         centered=False, decoupled_decay=False, lr_in_momentum=True):
    """torch_npu/optim/npu_fused_rmsprop_tf.py: timm's algorithm, but decoupled decay is
    p.add_(-wd, p), i.e. p *= 1 - wd, without the lr factor."""
    if weight_decay and decoupled_decay:
        p = p - weight_decay * p
        weight_decay = 0.0
    return timm_rmsprop_tf(p, g, s, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                           momentum=momentum, centered=centered, lr_in_momentum=lr_in_momentum)


def mindspore_rmsprop(p, g, s, *, learning_rate, decay=0.9, momentum=0.0, epsilon=1e-10,
                      centered=False, loss_scale=1.0, weight_decay=0.0):
    """mindspore/nn/optim/rmsprop.py: decay_weight, then scale_grad (divide by the loss
    scale), then ApplyRMSProp / ApplyCenteredRMSProp; mean_square starts at ones, moment
    always used."""
    if not s:
        s.update(ms=np.ones_like(p), mg=np.zeros_like(p), mom=np.zeros_like(p))
    g = g + weight_decay * p
    g = g / loss_scale
    s["ms"] = decay * s["ms"] + (1 - decay) * g * g
    if centered:
        s["mg"] = decay * s["mg"] + (1 - decay) * g
        denom = np.sqrt(s["ms"] - s["mg"] ** 2 + epsilon)
    else:
        denom = np.sqrt(s["ms"] + epsilon)
    s["mom"] = momentum * s["mom"] + learning_rate * g / denom
    return p - s["mom"]


def keras_rmsprop(p, g, s, *, learning_rate, rho=0.9, momentum=0.0, epsilon=1e-7,
                  centered=False, weight_decay=0.0):
    """keras/src/optimizers/rmsprop.py (Keras 3) with base_optimizer's decoupled,
    lr-scaled weight decay applied before the update; velocity starts at 0."""
    if not s:
        s.update(vel=np.zeros_like(p), ag=np.zeros_like(p), m=np.zeros_like(p))
    if weight_decay:
        p = p - p * weight_decay * learning_rate
    s["vel"] = rho * s["vel"] + (1 - rho) * g**2
    if centered:
        s["ag"] = rho * s["ag"] + (1 - rho) * g
        denominator = s["vel"] - s["ag"] ** 2 + epsilon
    else:
        denominator = s["vel"] + epsilon
    increment = learning_rate * g / np.sqrt(denominator)
    if momentum > 0:
        s["m"] = momentum * s["m"] + increment
        return p - s["m"]
    return p - increment


def optax_rmsprop(p, g, s, *, learning_rate, decay=0.9, eps=1e-8, initial_scale=0.0,
                  eps_in_sqrt=True, centered=False, momentum=None, nesterov=False,
                  bias_correction=False):
    """optax/_src/alias.py (rmsprop) = chain(scale_by_rms | scale_by_stddev,
    scale_by_learning_rate, trace(momentum, nesterov)); transform.py, _accumulation.py."""
    if not s:
        s.update(nu=np.full_like(p, initial_scale), mu=np.zeros_like(p), trace=np.zeros_like(p), count=0)
    s["nu"] = (1 - decay) * g**2 + decay * s["nu"]
    nu_hat, mu_hat = s["nu"], None
    if centered:
        s["mu"] = (1 - decay) * g + decay * s["mu"]
        mu_hat = s["mu"]
    if bias_correction:
        s["count"] += 1
        nu_hat = s["nu"] / (1 - decay ** s["count"])
        if centered:
            mu_hat = s["mu"] / (1 - decay ** s["count"])
    var = nu_hat - mu_hat**2 if centered else nu_hat
    scaling = 1 / np.sqrt(var + eps) if eps_in_sqrt else 1 / (np.sqrt(var) + eps)
    updates = -learning_rate * (scaling * g)
    if momentum is not None:
        new_trace = updates + momentum * s["trace"]
        s["trace"] = new_trace
        updates = updates + momentum * new_trace if nesterov else new_trace
    return p + updates
