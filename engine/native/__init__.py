"""Native (C++) CPU kernels, compiled on first use with torch's JIT extension loader.

``load()`` returns the compiled module (functions listed in ``csrc/*.cpp``'s PYBIND11_MODULE)
or None when it cannot be built or ``SPLITSERVE_NATIVE=0``; callers keep a pure-torch path.
"""

from engine.native.build import load

__all__ = ["load"]
