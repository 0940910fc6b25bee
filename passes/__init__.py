"""FX passes that fuse foreach ops horizontally (installed as npu_optim_compile.passes)."""
