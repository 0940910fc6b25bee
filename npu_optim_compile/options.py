"""The options of one RMSprop step, in one place.

:class:`RMSpropOptions` has one field per option: its default, its kind, its neutral
value and a one-line doc. Everything else derives from it: the keywords
``NpuFusedRMSprop`` accepts beyond torch's six, what a param group stores, the
validation, the structure key of the compiled step (:meth:`RMSpropOptions.structure`),
the hyperparameter tensor the compiled step reads (``_hyper.HYPER_LAYOUT``, the
VALUE options in field order) and the keywords of
:func:`~npu_optim_compile.rmsprop_step` on both paths (per tensor:
:meth:`~RMSpropOptions.step_kwargs`; per bucket: :meth:`~RMSpropOptions.static_step_kwargs`
and :meth:`~RMSpropOptions.fixed_values` of a structure).

Adding an option means: one field here, its math in ``rmsprop_step``, a NumPy reference
in ``tests/support/reference_numpy.py`` and a row in the variant tests
(``tests/math/test_registry.py`` checks that every field reaches both paths).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch import Tensor

from ._validation import check_choice, check_hyperparameters, check_option_combination

__all__ = [
    "INITIAL_STATE",
    "NO_NEUTRAL",
    "RMSpropOptions",
    "STATE_ROLES",
    "STRUCTURE",
    "Scalar",
    "TORCH_FIXED",
    "TORCH_GROUP_KEYS",
    "VALUE",
]

#: A hyperparameter: a Python number or a 0-d tensor (a tensor never causes a recompile).
Scalar = Union[float, int, Tensor]

#: Kinds of option.
VALUE = "value"  # read by the compiled step at run time: changing it never recompiles
STRUCTURE = "structure"  # a switch or a choice: part of the compiled step's key (a change compiles once)
INITIAL_STATE = "initial state"  # only used when the state is created

#: State buffers, in the order the step receives them.
STATE_ROLES = ("square_avg", "grad_avg", "momentum_buffer")

#: torch.optim.RMSprop's group keys that this library keeps fixed (its state_dicts carry
#: them, so ours do too): ``capturable`` and ``differentiable`` True raise (see
#: :meth:`RMSpropOptions.from_group`); any ``foreach`` runs the fused step.
TORCH_FIXED = {"capturable": False, "foreach": None, "differentiable": False}

#: torch.optim.RMSprop's group keys in the order its step reads them for a param without
#: state (torch 2.13 ``torch/optim/rmsprop.py``: ``_init_group``, then the ``rmsprop(...)``
#: call): a group that lacks some raises ``KeyError`` for the first of them, as torch.
TORCH_GROUP_KEYS = (
    "capturable", "momentum", "centered", "lr", "alpha", "eps", "weight_decay", "foreach", "maximize",
    "differentiable",
)


class _NoNeutral:
    def __repr__(self) -> str:
        return "NO_NEUTRAL"


#: The ``neutral`` of a VALUE option that no value switches off (lr, alpha, eps,
#: max_lr): the compiled step reads it at every step.
NO_NEUTRAL: Any = _NoNeutral()


def _option(
    default: Any,
    kind: str,
    doc: str,
    *,
    neutral: Any,
    torch_key: bool = False,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A field of :class:`RMSpropOptions`.

    ``neutral``: the value at which the option has no effect (torch's update). A VALUE
    option at its neutral value is left out of the compiled step (its ops are not in
    the graph; :data:`NO_NEUTRAL`: always read); a STRUCTURE option off its neutral
    value puts a flag into :meth:`RMSpropOptions.structure`. ``flag``: a switch's flag
    name (default: the option's name); ``choices``: the values of a STRUCTURE option
    that is not a switch (its flags are ``<name>_<choice>``).
    """
    metadata = dict(kind=kind, doc=doc, neutral=neutral, torch_key=torch_key, flag=flag, choices=choices)
    return field(default=default, metadata=metadata)


def _flag_values(f: dataclasses.Field) -> dict[str, Any]:
    """A STRUCTURE option's flags and the value each stands for (every value but the
    neutral one); a VALUE option with a neutral value: its name, for "not neutral"."""
    m = f.metadata
    if m["kind"] == VALUE:
        return {} if m["neutral"] is NO_NEUTRAL else {f.name: None}
    if m["kind"] != STRUCTURE:
        return {}
    if m["choices"] is None:  # a switch
        return {m["flag"] or f.name: not m["neutral"]}
    return {f"{f.name}_{c}": c for c in m["choices"] if c != m["neutral"]}


def _structure_value(f: dataclasses.Field, value: Any) -> Any:
    """A STRUCTURE option's value as the step sees it (a switch is a bool)."""
    return bool(value) if f.metadata["choices"] is None else value


@dataclass(frozen=True)
class RMSpropOptions:
    """Every option of one RMSprop step; the defaults are torch.optim.RMSprop's update.

    Build it from keywords (``RMSpropOptions(lr=1e-3, centered=True)``) or from a param
    group (:meth:`from_group`); construction validates, with torch's messages.
    """

    lr: Scalar = _option(1e-2, VALUE, "learning rate (a float or a 1-element tensor)", neutral=NO_NEUTRAL,
                         torch_key=True)
    alpha: Scalar = _option(0.99, VALUE, "smoothing constant of the mean square", neutral=NO_NEUTRAL,
                            torch_key=True)
    eps: Scalar = _option(1e-8, VALUE, "added to the denominator (outside the root by default)",
                          neutral=NO_NEUTRAL, torch_key=True)
    weight_decay: Scalar = _option(0.0, VALUE, "L2 penalty, or the decoupled decay rate", neutral=0.0,
                                   torch_key=True)
    momentum: Scalar = _option(0.0, VALUE, "momentum factor; momentum buffers are kept when > 0", neutral=0.0,
                               torch_key=True)
    centered: bool = _option(False, STRUCTURE, "normalise by an estimate of the gradient's variance",
                             neutral=False, torch_key=True)
    maximize: bool = _option(False, STRUCTURE, "maximise the objective instead of minimising it", neutral=False,
                             torch_key=True)
    eps_in_sqrt: bool = _option(False, STRUCTURE, "eps inside the square root (TensorFlow, timm, optax)",
                                neutral=False)
    initial_square_avg: float = _option(0.0, INITIAL_STATE, "the mean square's initial value (1 in TensorFlow)",
                                        neutral=0.0)
    lr_in_momentum: bool = _option(False, STRUCTURE, "lr inside the momentum buffer (TensorFlow, timm, optax)",
                                   neutral=False)
    decoupled_weight_decay: bool = _option(False, STRUCTURE,
                                           "shrink the params instead of adding wd * p to the grad", neutral=False)
    lr_scaled_decay: bool = _option(True, STRUCTURE, "decoupled decay scaled by lr (False: torch_npu's TF variant)",
                                    neutral=True, flag="lr_unscaled_decay")
    nesterov: bool = _option(False, STRUCTURE, "Nesterov momentum, optax's form (needs momentum > 0)", neutral=False)
    bias_correction: bool = _option(False, STRUCTURE, "divide the averages by 1 - alpha^t (optax)", neutral=False)
    loss_scale: Scalar = _option(1.0, VALUE, "the grads are divided by it first (MindSpore's fixed loss scale)",
                                 neutral=1.0)
    caution: bool = _option(False, STRUCTURE, "timm's cautious mask on the momentum step", neutral=False)
    corrected_weight_decay: bool = _option(False, STRUCTURE, "decoupled decay scaled by lr**2 / max_lr (timm)",
                                           neutral=False)
    max_lr: Scalar | None = _option(None, VALUE, "max_lr of corrected_weight_decay (default: the constructor's lr)",
                                    neutral=NO_NEUTRAL)
    op_order: str = _option("torch", STRUCTURE, "whose op order the averages (and lr in momentum) follow, so fp32 "
                            "rounds as theirs: 'torch', 'tf' (TensorFlow, timm, torch_npu, MindSpore) or 'optax'",
                            neutral="torch", choices=("torch", "tf", "optax"))

    def __post_init__(self) -> None:
        check_hyperparameters(
            lr=self.lr, eps=self.eps, momentum=self.momentum, weight_decay=self.weight_decay, alpha=self.alpha,
            loss_scale=self.loss_scale,
        )
        for f in dataclasses.fields(self):
            if f.metadata["choices"] is not None:
                check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        check_option_combination(
            momentum_buffers=self.uses_momentum,
            nesterov=self.nesterov,
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
    def neutrals(cls) -> dict[str, Any]:
        """Each option's neutral value (:data:`NO_NEUTRAL` where none switches it off)."""
        return {f.name: f.metadata["neutral"] for f in dataclasses.fields(cls)}

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
    def group_keys(cls) -> tuple[str, ...]:
        """Every group key :meth:`from_group` reads (the options and torch's fixed keys)."""
        return cls.names() + tuple(k for k in TORCH_FIXED if k not in cls.names())

    @classmethod
    def from_group(
        cls,
        group: Mapping[str, Any],
        aliases: Mapping[str, str] | None = None,
        required: Iterable[str] = (),
    ) -> RMSpropOptions:
        """The options of a param group: its values, defaults where it has none.

        ``aliases`` maps other frameworks' group keys onto ours (torch_npu's
        ``decoupled_decay`` is ``decoupled_weight_decay``); an alias present in the
        group wins. ``required``: keys the group must have, ``KeyError`` naming the
        first missing one otherwise (torch's keys in the order torch reads them,
        :data:`TORCH_GROUP_KEYS`, then the others in the given order). The optimizer
        requires every key of its ``defaults``: torch's always, a variant's where the
        optimizer was built with it on, so a group appended to ``param_groups`` by hand
        or with a key deleted fails as torch's does instead of running a default.

        torch's fixed keys: ``capturable=True`` and ``differentiable=True`` raise
        ``ValueError`` (not supported, see the messages); ``foreach`` may be anything
        (the step is fused either way; torch's foreach and for-loop give the same
        numbers), and a ``fused`` key is ignored, as torch.optim.RMSprop ignores it.
        """
        aliases = aliases or {}
        required = set(required)
        spelled = {name: [name, *(a for a, n in aliases.items() if n == name)] for name in required}
        order = [k for k in TORCH_GROUP_KEYS if k in required] + [k for k in spelled if k not in TORCH_GROUP_KEYS]
        for key in order:
            if not any(k in group for k in spelled[key]):
                raise KeyError(key)
        _check_torch_fixed(group)
        values = {name: group[name] for name in cls.names() if name in group}
        for alias, name in aliases.items():
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

    @staticmethod
    def keeps_momentum(momentum: Scalar) -> bool:
        """Whether a step with this ``momentum`` keeps momentum buffers (torch's rule: a
        tensor, or a number > 0); traceable, for the pure API under ``torch.compile``."""
        return isinstance(momentum, Tensor) or momentum > 0

    @property
    def uses_momentum(self) -> bool:
        return self.keeps_momentum(self.momentum)

    @property
    def roles(self) -> tuple[str, ...]:
        """The state buffers the step keeps, in :data:`STATE_ROLES` order."""
        return ("square_avg",) + (("grad_avg",) if self.centered else ()) + (
            ("momentum_buffer",) if self.uses_momentum else ()
        )

    def structure(self) -> frozenset[str]:
        """What the compiled step specialises on: the flag of every STRUCTURE option off
        its neutral value, and the name of every VALUE option with a neutral value that
        it is not at (``weight_decay`` not 0, ``momentum`` > 0, ``loss_scale`` not 1; a
        tensor is never neutral). Values never enter it."""
        flags = set()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for flag, meaning in _flag_values(f).items():
                if f.metadata["kind"] == VALUE:
                    if not _same(value, f.metadata["neutral"]):
                        flags.add(flag)
                elif _structure_value(f, value) == meaning:
                    flags.add(flag)
        return frozenset(flags)

    @classmethod
    def structure_flags(cls) -> frozenset[str]:
        """Every flag :meth:`structure` can yield."""
        return frozenset(flag for f in dataclasses.fields(cls) for flag in _flag_values(f))

    @classmethod
    def static_step_kwargs(cls, flags: frozenset[str]) -> dict[str, Any]:
        """The STRUCTURE keywords of ``rmsprop_step`` for a structure (the inverse of
        :meth:`structure`): each option's value for its flag in ``flags``, its neutral
        value where it has none there (the first of a choice's flags wins)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.metadata["kind"] == STRUCTURE:
                present = [meaning for flag, meaning in _flag_values(f).items() if flag in flags]
                kwargs[f.name] = present[0] if present else f.metadata["neutral"]
        return kwargs

    @classmethod
    def value_names(cls) -> tuple[str, ...]:
        """The VALUE options, in field order (what a compiled step reads at run time)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["kind"] == VALUE)

    @classmethod
    def fixed_values(cls, flags: frozenset[str]) -> dict[str, Any]:
        """The VALUE options a structure fixes: those with a neutral value whose flag is
        not in ``flags``, at that value (``rmsprop_step`` then leaves their ops out)."""
        return {
            f.name: f.metadata["neutral"]
            for f in dataclasses.fields(cls)
            if f.metadata["kind"] == VALUE and f.metadata["neutral"] is not NO_NEUTRAL and f.name not in flags
        }

    def step_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`~npu_optim_compile.rmsprop_step` for these options."""
        kwargs = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["kind"] == STRUCTURE:
                kwargs[f.name] = _structure_value(f, value)
            elif f.metadata["kind"] == VALUE:
                kwargs[f.name] = value
        return kwargs


def _check_torch_fixed(group: Mapping[str, Any]) -> None:
    """``ValueError`` for torch's keys whose True this library cannot honour."""
    if group.get("capturable"):
        raise ValueError(
            "capturable=True is not supported: the fused step refreshes its hyperparameter tensor "
            "from the param groups' values on the host before each step, which a CUDA-graph capture "
            "would freeze; set the group's 'capturable' to False (torch.optim.RMSprop(capturable=True) "
            "is the capturable alternative)"
        )
    if group.get("differentiable"):
        raise ValueError(
            "differentiable=True is not supported: the fused step updates flat buffers in place "
            "under torch.no_grad(), so autograd cannot differentiate through it; set the group's "
            "'differentiable' to False (torch.optim.RMSprop(differentiable=True) differentiates)"
        )


def _same(value: Any, default: Any) -> bool:
    """Whether an option's value is its default (a tensor never is)."""
    return not isinstance(value, Tensor) and value == default
