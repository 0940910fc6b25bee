"""Without a working C++ compiler (a slim container, CXX unset or wrong): a clear error
that says what to install and which backend needs no compiler, and torch's own fallback
switch, ``torch._dynamo.config.suppress_errors``, honoured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, warnings, torch
    from npu_optim_compile import NpuFusedRMSprop

    def run(**kw):
        p = [torch.nn.Parameter(torch.randn(10, generator=torch.Generator().manual_seed(0)))]
        q = [torch.nn.Parameter(p[0].detach().clone())]
        ours, ref = NpuFusedRMSprop(p, **kw), torch.optim.RMSprop(q)
        for i in range(3):
            g = torch.randn(10, generator=torch.Generator().manual_seed(i))
            p[0].grad, q[0].grad = g.clone(), g.clone()
            ours.step()
            ref.step()
        return bool(torch.allclose(p[0], q[0], rtol=1e-6, atol=1e-7))

    out = {}
    try:
        run()
    except RuntimeError as e:
        out["error"] = str(e)
    out["eager_ok"] = run(backend="eager")
    torch._dynamo.config.suppress_errors = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["suppressed_ok"] = run()
    out["warnings"] = [str(w.message) for w in caught if "npu_optim_compile" in str(w.message)]
    print(json.dumps(out))
    """
)


def test_no_cxx_compiler_gives_a_clear_error_and_honours_suppress_errors(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    error = out["error"]
    assert "could not compile its step with backend='inductor'" in error
    assert "InvalidCxxCompiler" in error
    assert "apt-get install g++" in error and "backend='eager'" in error and "suppress_errors" in error
    assert out["eager_ok"]
    assert out["suppressed_ok"]
    assert len(out["warnings"]) == 1 and "runs eagerly" in out["warnings"][0]
