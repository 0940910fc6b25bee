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
                    centered=False, decoupled_decay=False, lr_in_momentum=True, caution=False,
                    corrected_weight_decay=False, max_lr=None):
    """timm 1.0.31, ``timm/optim/rmsprop_tf.py``, ``_single_tensor_rmsprop_tf`` (lines
    227-295), read from the ``timm-1.0.31-py3-none-any.whl`` wheel:

    - state (lines 141-147): ``square_avg`` ones, ``momentum_buffer`` and ``grad_avg``
      zeros; ``step`` += 1 (line 258, unused by the math);
    - weight decay (lines 260-265): decoupled ``p *= 1 - wd_scale * wd`` with
      ``wd_scale = lr if max_lr is None else lr ** 2 / max_lr`` (line 262), else coupled
      ``grad = grad + wd * p``. ``max_lr`` is the group's ``max_lr_snapshot`` when
      ``corrected_weight_decay`` is on, None otherwise (``RMSpropTF.step``, line 173);
      the snapshot is ``float(lr)`` of the constructor's lr (lines 90, and
      ``timm/optim/_helpers.py`` ``_max_lr_snapshot``, lines 79-89);
    - TF op order ``v += (1 - alpha) * (g**2 - v)`` (line 268); centered ``ga += (1 -
      alpha) * (g - ga)``, ``avg = sqrt(v - ga*ga + eps)`` (lines 271-275), else
      ``avg = sqrt(v + eps)`` (line 277);
    - momentum (lines 279-293): ``buf = momentum * buf + lr * g / avg`` then ``p -=
      buf`` (lr_in_momentum), or ``buf = momentum * buf + g / avg`` then ``p -= lr *
      buf``; with ``caution`` the *applied* update is ``_apply_caution(buf, grad)``
      (lines 248-252): ``mask = (buf * grad > 0)``, ``mask /= max(mask.mean(), 1e-3)``
      with the mean over the whole parameter tensor, ``buf * mask``. It only rebinds the
      local name ``buf``: the stored momentum buffer is never masked. ``grad`` there is
      the gradient after coupled weight decay (line 265). Caution exists only in the
      momentum branch: with ``momentum == 0`` it does nothing (line 295);
    - no momentum: ``p -= lr * g / avg`` (line 295).

    The foreach path (lines 298-379, ``_foreach_apply_caution`` lines 298-305) computes
    the same numbers. Op order as timm's (which decides fp32 rounding): its
    ``addcdiv_(grad, avg, value=lr)`` is ``buf + (lr * grad) / avg`` (torch's CPU
    kernel), ``add_(x, alpha=a)`` is ``+ a * x``. On float32 arrays this is timm's fp32
    arithmetic, except that torch's vectorised CPU kernels fuse ``add_`` with ``alpha``
    and ``addcmul`` into one fused multiply-add (one rounding) with AVX2 and AVX-512
    (not with ``ATEN_CPU_CAPABILITY=default``).
    """
    if not s:
        s.update(v=np.ones_like(p), ga=np.zeros_like(p), b=np.zeros_like(p), step=0)
    s["step"] = s.get("step", 0) + 1
    if corrected_weight_decay and max_lr is None:
        raise ValueError("corrected_weight_decay needs max_lr (timm's group['max_lr_snapshot'])")
    max_lr = max_lr if corrected_weight_decay else None
    one_minus_alpha = 1.0 - alpha
    if weight_decay != 0:
        if decoupled_decay:
            wd_scale = lr if max_lr is None else lr**2 / max_lr
            p = p * (1.0 - wd_scale * weight_decay)
        else:
            g = g + weight_decay * p
    s["v"] = s["v"] + one_minus_alpha * (g**2 - s["v"])
    if centered:
        s["ga"] = s["ga"] + one_minus_alpha * (g - s["ga"])
        avg = np.sqrt(s["v"] - s["ga"] * s["ga"] + eps)
    else:
        avg = np.sqrt(s["v"] + eps)

    def apply_caution(m, grad):
        mask = (m * grad > 0).astype(grad.dtype)
        mask = mask / max(mask.mean(), 1e-3)
        return m * mask

    if momentum > 0:
        s["b"] = s["b"] * momentum
        if lr_in_momentum:
            s["b"] = s["b"] + (lr * g) / avg
            buf = apply_caution(s["b"], g) if caution else s["b"]
            return p - buf
        s["b"] = s["b"] + g / avg
        buf = apply_caution(s["b"], g) if caution else s["b"]
        return p + (-lr) * buf
    return p + ((-lr) * g) / avg


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
                      centered=False, loss_scale=1.0, weight_decay=0.0, name=None, grouped=False,
                      group_weight_decay=None):
    """MindSpore 2.10.0 ``nn.RMSProp``, read from ``mindspore-2.10.0-cp311-cp311-
    manylinux1_x86_64.whl`` (``mindspore/nn/optim/rmsprop.py``,
    ``mindspore/nn/optim/optimizer.py``) and, for the kernel, ``mindspore-ai/mindspore:
    mindspore/ccsrc/plugin/device/cpu/kernel/rmsprop_cpu_kernel.cc`` @07f9793a.

    One step of one parameter. ``name`` is the Parameter's name (None: a name with
    neither 'beta' nor 'gamma'); ``grouped=True`` means the optimizer was built from
    param-group dicts, and ``group_weight_decay`` is this param's group's
    ``'weight_decay'`` (None: the group dict has no such key).

    - ``RMSProp.__init__`` (rmsprop.py 218-242): ``mean_square`` starts at ones (239),
      ``moment`` at zeros and is always used (240), ``mean_grad`` zeros (234).
    - ``RMSProp.construct`` (rmsprop.py 244-270): ``decay_weight``, then
      ``gradients_centralization`` (groups only; not modelled), then ``scale_grad``,
      then ``ApplyRMSProp`` / ``ApplyCenteredRMSProp`` per param.
    - The stored decay is ``weight_decay * loss_scale``: ``_preprocess_weight_decay``
      (optimizer.py 491-503, the multiplication on line 496), called for the
      optimizer's ``weight_decay`` (238) and, with groups, for each group's own
      ``'weight_decay'`` or else the optimizer's (626-629).
    - Which params decay: ungrouped, those whose name contains neither 'beta' nor
      'gamma' (267-270), if the stored decay is > 0 (272); grouped, every param of a
      group whose stored decay is > 0, with no name filter (251-257).
    - ``decay_weight`` (397-418) with ``_tensor_apply_decay`` (862-867):
      ``g = p * stored_decay + g``, on the still loss-scaled gradient.
    - ``scale_grad`` (439-456) with ``_grad_scale`` (915-918), when ``loss_scale !=
      1.0`` (283): ``g = g * (1 / loss_scale)`` (``reciprocal_scale``, 282).
      So the decay acting on the unscaled gradient is ``weight_decay``, not
      ``weight_decay / loss_scale``.
    - Kernel (rmsprop_cpu_kernel.cc, scalar loops, lines 63-66 and 87-92):
      ``ms += (g*g - ms) * (1 - decay)``; ``moment = moment * momentum + (g * lr) /
      sqrt(ms + eps)``; ``w -= moment``. Centered: also ``mg += (g - mg) * (1 - decay)``,
      ``denom = (ms - mg*mg) + eps`` and the moment and weight are only updated where
      ``denom > 0`` (always true for eps > 0 with ms starting at 1 and mg at 0).

    MindSpore keeps the stored decay and ``1 / loss_scale`` as float32 tensors (273,
    259, 282); this float64 reference does not round them.
    """
    if not s:
        s.update(ms=np.ones_like(p), mg=np.zeros_like(p), mom=np.zeros_like(p))
    if grouped:
        wd = weight_decay if group_weight_decay is None else group_weight_decay
        stored = float(wd) * loss_scale
        apply_decay = stored > 0
    else:
        stored = float(weight_decay) * loss_scale
        apply_decay = stored > 0 and (name is None or ("beta" not in name and "gamma" not in name))
    if apply_decay:
        g = p * stored + g
    if loss_scale != 1.0:
        g = g * (1.0 / loss_scale)
    s["ms"] = s["ms"] + (g * g - s["ms"]) * (1.0 - decay)
    if centered:
        s["mg"] = s["mg"] + (g - s["mg"]) * (1.0 - decay)
        denom = (s["ms"] - s["mg"] * s["mg"]) + epsilon
        ok = denom > 0
        new_mom = s["mom"] * momentum + (g * learning_rate) / np.sqrt(np.where(ok, denom, 1.0))
        s["mom"] = np.where(ok, new_mom, s["mom"])
        return np.where(ok, p - s["mom"], p)
    s["mom"] = s["mom"] * momentum + (g * learning_rate) / np.sqrt(s["ms"] + epsilon)
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
