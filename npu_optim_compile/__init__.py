"""npu_optim_compile: graph-mode fused RMSprop."""
