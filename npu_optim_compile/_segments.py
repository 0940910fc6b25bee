"""The compiled bucket step, run over tensors where they live (CPU, inductor).

inductor compiles the bucket step (``rmsprop_step`` on one flat buffer per role, see
``_bucket_step.py``) into one C++ loop over the elements of those buffers. The loop is
elementwise: element ``i`` of the new param and state depends only on element ``i`` of
the inputs and on the hyperparameters. So running that loop over a param, its grad and
its state tensors *where each lives* gives, bit for bit, what it gives on flat buffers,
and the params, grads and state stay the user's tensors, at their own addresses, as with
``torch.optim.RMSprop``.

How: the step is compiled with ``cpp.threads=1`` (a serial loop), inductor's output code
is checked to be that one kernel and nothing else, one probe call on scratch buffers
records which kernel argument is which buffer (by data pointer), and the kernel's
source, unchanged but renamed, is compiled with inductor's own toolchain and flags
(``CppCodeCache``) into a small driver. One call of the driver runs the kernel on every
chunk of every *segment* (one param with its grad and state), in parallel over the
chunks with OpenMP, and then advances the step counts. Per step, Python hands the driver
one array of data pointers: nothing per parameter runs in Python.

A structure whose compiled step is not a single elementwise kernel (timm's ``caution``
takes a mean per parameter) is refused here (:class:`NotElementwise`); the engine then
runs it another way.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import re
import threading
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NotElementwise", "SegmentKernel", "SegmentTable", "capture_call", "capture_patches", "driver_source"]

#: Elements per chunk: a chunk of every role fits in L2 (64 KiB of float32 per role).
CHUNK = 1 << 14
#: Below this many elements in a call, one thread (a parallel region costs microseconds).
SERIAL_BELOW = 1 << 15

#: The per-segment roles, in the order of the pointer array handed to the driver.
SEGMENT_ROLES = ("param", "grad", "square_avg", "grad_avg", "momentum_buffer")


class NotElementwise(RuntimeError):
    """The compiled step is not one elementwise kernel over its buffers."""


# -- capturing the kernel -----------------------------------------------------------


class _Recording(threading.local):
    active = False
    calls: list


_recording = _Recording()
_recording.calls = []


class _RecordedKernel:
    """An inductor C++ kernel as the compiled module calls it, remembering its source
    and, while a probe runs, the arguments of each call."""

    def __init__(self, fn: Callable, argtypes: Sequence[str], source: str) -> None:
        self.fn, self.argtypes, self.source = fn, list(argtypes), source

    def __call__(self, *args):
        if _recording.active:
            _recording.calls.append((self, args))
        return self.fn(*args)


def _recording_cpp_pybinding(original: Callable) -> Callable:
    def cpp_pybinding(self, argtypes, source_code):
        return _RecordedKernel(original(self, argtypes, source_code), argtypes, source_code)

    return cpp_pybinding


@contextlib.contextmanager
def capture_patches():
    """inductor settings for a capturable kernel, and the hook that records it: a serial
    loop (``cpp.threads=1``), kernels built in this thread (so ``cpp_pybinding`` returns
    the kernel itself), and every C++ kernel the compiled module loads wrapped in a
    :class:`_RecordedKernel`."""
    from torch._inductor import async_compile, config

    original = async_compile.AsyncCompile.cpp_pybinding
    with config.patch({"cpp.threads": 1, "compile_threads": 1}):
        async_compile.AsyncCompile.cpp_pybinding = _recording_cpp_pybinding(original)
        try:
            yield
        finally:
            async_compile.AsyncCompile.cpp_pybinding = original


#: Statements allowed in the output code's ``call()`` besides the one kernel call.
_ALLOWED_CALLS = {"assert_size_stride", "assert_alignment", "clear", "size", "stride"}


def check_output_code(source_code: str) -> None:
    """``NotElementwise`` unless inductor's output code runs exactly one C++ kernel and
    nothing else: no buffer allocated, no extern kernel, no other call."""
    tree = ast.parse(source_code)
    kernels = {
        node.targets[0].id
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "attr", "") == "cpp_pybinding"
        and isinstance(node.targets[0], ast.Name)
    }
    calls = [
        node
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef) and fn.name == "call"
        for node in ast.walk(fn)
        if isinstance(node, ast.Call)
    ]
    if len(kernels) != 1 or not calls:
        raise NotElementwise(f"expected one C++ kernel, found {len(kernels)}")
    names = [c.func.id if isinstance(c.func, ast.Name) else getattr(c.func, "attr", "?") for c in calls]
    launched = [n for n in names if n in kernels]
    others = sorted({n for n in names if n not in kernels and n not in _ALLOWED_CALLS})
    if len(launched) != 1 or others:
        raise NotElementwise(f"the compiled step calls {others or launched}, not one kernel")


@dataclass(frozen=True)
class KernelArg:
    """What one argument of the kernel is: ``kind`` is a segment role, ``"hyper"``,
    ``"found_inf"`` or ``"numel"``."""

    kind: str
    ctype: str


def map_arguments(kernel: _RecordedKernel, args: Sequence, probe: dict[str, Tensor], numel: int) -> list[KernelArg]:
    """Each kernel argument of a probe call, named by the probe tensor it points at."""
    by_ptr: dict[int, str] = {}
    for name, t in probe.items():
        if t is not None:
            if t.data_ptr() in by_ptr:
                raise NotElementwise("two probe buffers share an address")
            by_ptr[t.data_ptr()] = name
    out = []
    for value, ctype in zip(args, kernel.argtypes, strict=True):
        if isinstance(value, Tensor):
            kind = by_ptr.get(value.data_ptr())
            if kind is None:
                raise NotElementwise(f"a kernel argument ({ctype}) is not one of the step's buffers")
        elif isinstance(value, int) and value == numel and ctype.strip().endswith("int64_t"):
            kind = "numel"
        else:
            raise NotElementwise(f"a kernel argument {value!r} ({ctype}) is neither a buffer nor the size")
        out.append(KernelArg(kind, ctype.replace("const ", "").strip() if kind != "numel" else "int64_t"))
    if not any(a.kind == "numel" for a in out):
        raise NotElementwise("the kernel does not take the buffers' size")
    return out


def capture_call(fn: Callable, args: Sequence, sources: list[str], probe: dict[str, Tensor | None],
                 numel: int) -> tuple[_RecordedKernel, list[KernelArg]]:
    """Call ``fn`` (a bucket step compiled under :func:`capture_patches`, whose output
    code is appended to ``sources``) once on the probe buffers ``args``; return its one
    kernel and what each of its arguments is."""
    _recording.calls = []
    _recording.active = True
    try:
        fn(*args)
    finally:
        _recording.active = False
    calls, _recording.calls = _recording.calls, []
    if not sources:
        raise NotElementwise(
            "inductor produced no output code for the step (did torch._dynamo.config.suppress_errors "
            "let a failed compile run eagerly?)"
        )
    check_output_code(sources[-1])
    if len(calls) != 1:
        raise NotElementwise(f"the compiled step ran {len(calls)} kernels")
    kernel, call_args = calls[0]
    return kernel, map_arguments(kernel, call_args, probe, numel)


# -- the driver ------------------------------------------------------------------------

_KERNEL_DEF = re.compile(r'extern\s+"C"\s+void\s+kernel\s*\(')
# inductor's integer-division error flag is a process-wide pointer set per call: calls
# from several threads would race on it. The step divides no integers (the flag is only
# set by an integer division by zero), so the driver's copy leaves it out.
_DIV_ERROR_LINES = re.compile(
    r"^\s*(std::atomic<int> inductor_cpu_integer_div_error\{0\};"
    r"|inductor_cpu_integer_div_error_flag = [^;]*;"
    r"|inductor_cpu_throw_if_integer_div_error\(inductor_cpu_integer_div_error\);)\s*$",
    re.MULTILINE,
)

_DRIVER = r"""
#include <algorithm>
#include <cstdint>
#include <vector>
#include <omp.h>

extern "C" void drive(int64_t nseg, const int64_t* ptrs, const int64_t* numel, const double* hyper,
                      const float* found_inf, const int64_t* steps, int64_t steps_double,
                      int64_t chunk, int64_t nthreads) {
    // Per-segment hyperparameters: the shared ones, with the segment's own step count
    // (this step included) where the step reads one.
    std::vector<double> rows;
    if (STEP_SLOT >= 0) {
        rows.resize(nseg * NHYPER);
        for (int64_t s = 0; s < nseg; ++s) {
            double t = steps_double ? *reinterpret_cast<const double*>(steps[s])
                                    : *reinterpret_cast<const float*>(steps[s]);
            std::copy(hyper, hyper + NHYPER, rows.data() + s * NHYPER);
            rows[s * NHYPER + STEP_SLOT] = t + 1;
        }
    }
    std::vector<int64_t> first(nseg + 1, 0);
    for (int64_t s = 0; s < nseg; ++s) first[s + 1] = first[s] + (numel[s] + chunk - 1) / chunk;
    const int64_t total = first[nseg];
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t c = 0; c < total; ++c) {
        const int64_t s = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
        const int64_t off = (c - first[s]) * chunk;
        const int64_t len = std::min(chunk, numel[s] - off);
        const double* h = STEP_SLOT >= 0 ? rows.data() + s * NHYPER : hyper;
        (void)h;
        seg_kernel(CALL_ARGS);
    }
    if (steps != nullptr) {  // after the update: the step counts advance, unless skipped
        const float advance = found_inf != nullptr ? 1.0f - *found_inf : 1.0f;
        for (int64_t s = 0; s < nseg; ++s) {
            if (steps_double) *reinterpret_cast<double*>(steps[s]) += advance;
            else *reinterpret_cast<float*>(steps[s]) += advance;
        }
    }
}
"""


def driver_source(kernel_source: str, arguments: Sequence[KernelArg], row_bytes: dict[str, int],
                  n_hyper: int, step_slot: int) -> str:
    """The driver's C++: the kernel renamed, and ``drive`` calling it per chunk."""
    if len(_KERNEL_DEF.findall(kernel_source)) != 1:
        raise NotElementwise("the kernel source does not define one `kernel` function")
    body = _KERNEL_DEF.sub("static inline void seg_kernel(", kernel_source, count=1)
    body = _DIV_ERROR_LINES.sub("", body)
    if "inductor_cpu_integer_div_error" in body.split("seg_kernel(", 1)[1]:
        raise NotElementwise("the kernel's integer-division check has an unexpected form")
    args = []
    for a in arguments:
        if a.kind == "numel":
            args.append("len")
        elif a.kind == "hyper":
            args.append(f"reinterpret_cast<const {a.ctype}>(h)")
        elif a.kind == "found_inf":
            args.append(f"reinterpret_cast<{a.ctype}>(const_cast<float*>(found_inf))")
        else:
            row = SEGMENT_ROLES.index(a.kind)
            args.append(f"reinterpret_cast<{a.ctype}>(ptrs[{row} * nseg + s] + off * {row_bytes[a.kind]})")
    driver = (_DRIVER.replace("CALL_ARGS", ", ".join(args))
              .replace("NHYPER", str(n_hyper)).replace("STEP_SLOT", str(step_slot)))
    return body + driver


_DRIVE_ARGTYPES = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]


class SegmentKernel:
    """The driver of one compiled bucket step: :meth:`run` updates every segment of a
    :class:`SegmentTable` in one call."""

    def __init__(self, source: str, roles: tuple[str, ...]) -> None:
        from torch._inductor.codecache import CppCodeCache

        self.source = source
        #: The segment roles the kernel reads (rows of the table that must be filled).
        self.roles = roles
        lib = CppCodeCache.load(source)
        self._drive = lib.drive
        self._drive.argtypes = _DRIVE_ARGTYPES
        self._drive.restype = None
        self._lib = lib  # keep the library loaded

    def run(self, table: SegmentTable, hyper: Tensor, found_inf: Tensor | None) -> None:
        threads = 1 if table.total < SERIAL_BELOW else torch.get_num_threads()
        self._drive(
            table.nseg,
            table.ptrs.buffer_info()[0],
            table.numel.buffer_info()[0],
            hyper.data_ptr(),
            found_inf.data_ptr() if found_inf is not None else None,
            table.steps.buffer_info()[0],
            table.steps_double,
            CHUNK,
            threads,
        )


class SegmentTable:
    """The data pointers of one bucket's segments: one row per role of
    :data:`SEGMENT_ROLES` (zeros for roles not in use), the element counts and the step
    counts. Only the grads' row changes from step to step in the default loop."""

    def __init__(self, params: Sequence[Tensor], states: Sequence[dict], roles: Sequence[str]) -> None:
        n = len(params)
        self.nseg = n
        self.numel = array("q", map(Tensor.numel, params))
        self.total = sum(self.numel)
        rows = {role: [0] * n for role in SEGMENT_ROLES}
        rows["param"] = list(map(Tensor.data_ptr, params))
        for role in roles:
            rows[role] = [st[role].data_ptr() for st in states]
        self.ptrs = array("q", [ptr for role in SEGMENT_ROLES for ptr in rows[role]])
        self._grad_row = slice(n, 2 * n)
        steps = [st["step"] for st in states]
        self.steps = array("q", map(Tensor.data_ptr, steps))
        self.steps_double = int(bool(steps) and steps[0].dtype == torch.float64)

    def set_grads(self, ptrs: Sequence[int]) -> None:
        self.ptrs[self._grad_row] = array("q", ptrs)
