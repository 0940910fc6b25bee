"""The options of one RMSprop step, in one place.

:class:`RMSpropOptions` has one field per option: its default, its kind and a one-line
doc. Everything else derives from it: the keywords ``NpuFusedRMSprop`` accepts beyond
torch's six, what a param group stores, the validation, the structure key of the
compiled step and the keywords of :func:`~npu_optim_compile.rmsprop_step`.

Adding an option means: one field here, its math in ``rmsprop_step``, a NumPy
reference in ``tests/support/reference_numpy.py`` and a row in the variant tests. If it
is a value the compiled step reads at run time (kind ``VALUE``), also add it to
``HYPER_LAYOUT`` in ``_bucket_step.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch import Tensor

from ._validation import check_hyperparameters, check_option_combination

__all__ = ["RMSpropOptions", "STATE_ROLES", "VALUE", "STRUCTURE", "INITIAL_STATE"]

Scalar = Union[float, int, Tensor]

#: Kinds of option.
VALUE = "value"  # read by the compiled step at run time: changing it never recompiles
STRUCTURE = "structure"  # on/off: part of the compiled step's key (a change compiles once)
INITIAL_STATE = "initial state"  # only used when the state is created

#: State buffers, in the order the step receives them.
STATE_ROLES = ("square_avg", "grad_avg", "momentum_buffer")


def _option(default: Any, kind: str, doc: str, *, torch_key: bool = False) -> Any:
    return field(default=default, metadata={"kind": kind, "doc": doc, "torch_key": torch_key})


@dataclass(frozen=True)
class RMSpropOptions:
    """Every option of one RMSprop step; the defaults are torch.optim.RMSprop's update.

    Build it from keywords (``RMSpropOptions(lr=1e-3, centered=True)``) or from a param
    group (:meth:`from_group`); construction validates, with torch's messages.
    """

    lr: Scalar = _option(1e-2, VALUE, "learning rate (a float or a 1-element tensor)", torch_key=True)
    alpha: Scalar = _option(0.99, VALUE, "smoothing constant of the mean square", torch_key=True)
    eps: Scalar = _option(1e-8, VALUE, "added to the denominator (outside the root by default)", torch_key=True)
    weight_decay: Scalar = _option(0.0, VALUE, "L2 penalty, or the decoupled decay rate", torch_key=True)
    momentum: Scalar = _option(0.0, VALUE, "momentum factor; momentum buffers are kept when > 0", torch_key=True)
    centered: bool = _option(False, STRUCTURE, "normalise by an estimate of the gradient's variance", torch_key=True)
    maximize: bool = _option(False, STRUCTURE, "maximise the objective instead of minimising it", torch_key=True)
    eps_in_sqrt: bool = _option(False, STRUCTURE, "eps inside the square root (TensorFlow, timm, optax)")
    initial_square_avg: float = _option(0.0, INITIAL_STATE, "the mean square's initial value (1 in TensorFlow)")
    lr_in_momentum: bool = _option(False, STRUCTURE, "lr inside the momentum buffer (TensorFlow, timm, optax)")
    decoupled_weight_decay: bool = _option(False, STRUCTURE, "shrink the params instead of adding wd * p to the grad")
    lr_scaled_decay: bool = _option(True, STRUCTURE, "decoupled decay scaled by lr (False: torch_npu's TF variant)")
    nesterov: bool = _option(False, STRUCTURE, "Nesterov momentum, optax's form (needs momentum > 0)")
    bias_correction: bool = _option(False, STRUCTURE, "divide the averages by 1 - alpha^t (optax)")
    loss_scale: Scalar = _option(1.0, VALUE, "the grads are divided by it first (MindSpore's fixed loss scale)")
    caution: bool = _option(False, STRUCTURE, "timm's cautious mask on the momentum step")
    corrected_weight_decay: bool = _option(False, STRUCTURE, "decoupled decay scaled by lr**2 / max_lr (timm)")
    max_lr: Scalar | None = _option(None, VALUE, "max_lr of corrected_weight_decay (default: the constructor's lr)")

    def __post_init__(self) -> None:
        check_hyperparameters(
            lr=self.lr, eps=self.eps, momentum=self.momentum, weight_decay=self.weight_decay, alpha=self.alpha
        )
        check_option_combination(
            momentum_buffers=self.uses_momentum,
            nesterov=self.nesterov,
            loss_scale=self.loss_scale,
            initial_square_avg=self.initial_square_avg,
            corrected_weight_decay=self.corrected_weight_decay,
            max_lr=self.max_lr,
            lr_scaled_decay=self.lr_scaled_decay,
        )

    # -- construction -------------------------------------------------------------

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def doc(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata["doc"]

    @classmethod
    def check_keywords(cls, keywords: Mapping[str, Any], who: str) -> None:
        """``TypeError`` for keywords that are not options, listing the valid ones."""
        unknown = sorted(set(keywords) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"{who} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"the options are {', '.join(cls.names())}"
            )

    @classmethod
    def from_group(cls, group: Mapping[str, Any], aliases: Mapping[str, str] | None = None) -> RMSpropOptions:
        """The options of a param group: its values, defaults where it has none.

        ``aliases`` maps other frameworks' group keys onto ours (torch_npu's
        ``decoupled_decay`` is ``decoupled_weight_decay``); an alias present in the
        group wins.
        """
        values = {name: group[name] for name in cls.names() if name in group}
        for alias, name in (aliases or {}).items():
            if alias in group:
                values[name] = group[alias]
        return cls(**values)

    def group_entries(self) -> dict[str, Any]:
        """What a param group stores: torch.optim.RMSprop's keys always, variants only
        where they differ from the default (a default optimizer's groups are torch's)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["torch_key"] or not _same(value, f.default):
                out[f.name] = value
        return out

    # -- what the step needs --------------------------------------------------------

    @property
    def uses_momentum(self) -> bool:
        return isinstance(self.momentum, Tensor) or self.momentum > 0

    @property
    def roles(self) -> tuple[str, ...]:
        """The state buffers the step keeps, in :data:`STATE_ROLES` order."""
        return ("square_avg",) + (("grad_avg",) if self.centered else ()) + (
            ("momentum_buffer",) if self.uses_momentum else ()
        )

    def structure(self) -> frozenset[str]:
        """What the compiled step specialises on: every STRUCTURE option that is on,
        ``momentum`` when momentum buffers are kept, and ``weight_decay`` /
        ``loss_scale`` when their value is not the neutral 0 / 1 (a tensor counts as
        not neutral). Values never enter it."""
        flags = {
            f.name
            for f in dataclasses.fields(self)
            if f.metadata["kind"] == STRUCTURE and f.default is False and getattr(self, f.name)
        }
        if not self.lr_scaled_decay:
            flags.add("lr_unscaled_decay")
        if self.uses_momentum:
            flags.add("momentum")
        if not _same(self.weight_decay, 0):
            flags.add("weight_decay")
        if not _same(self.loss_scale, 1):
            flags.add("loss_scale")
        return frozenset(flags)

    @classmethod
    def structure_flags(cls) -> frozenset[str]:
        """Every flag :meth:`structure` can yield."""
        switches = {f.name for f in dataclasses.fields(cls) if f.metadata["kind"] == STRUCTURE and f.default is False}
        return frozenset(switches | {"lr_unscaled_decay", "momentum", "weight_decay", "loss_scale"})

    @classmethod
    def static_step_kwargs(cls, flags: frozenset[str]) -> dict[str, bool]:
        """The on/off keywords of ``rmsprop_step`` for a structure (the inverse of
        :meth:`structure` for the STRUCTURE options)."""
        kwargs = {
            f.name: f.name in flags
            for f in dataclasses.fields(cls)
            if f.metadata["kind"] == STRUCTURE and f.default is False
        }
        kwargs["lr_scaled_decay"] = "lr_unscaled_decay" not in flags
        return kwargs

    def step_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`~npu_optim_compile.rmsprop_step` for these options."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["kind"] != INITIAL_STATE}
        kwargs["centered"] = bool(self.centered)
        kwargs["maximize"] = bool(self.maximize)
        return kwargs


def _same(value: Any, default: Any) -> bool:
    """Whether an option's value is its default (a tensor never is)."""
    return not isinstance(value, Tensor) and value == default
