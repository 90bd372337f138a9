"""CuPy kernels for the hot reduction ops (used when CUDA and CuPy are present; torch is the reference).

Nothing here yet: every op runs in plain torch (see vtr.state.TokenState.reduce).
"""
