"""PersonaPlex Edge: `export` (the workstation toolchain) and `runtime` (the on-device daemon)."""
