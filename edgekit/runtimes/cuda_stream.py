"""cuda-python glue for native TensorRT sessions: device memory and one CUDA stream, every call checked.

Imported only where a GPU session opens (``edgekit.runtimes.tensorrt_session.TrtExecutor``): the
vendor-free rest of the session, tested on CPU, never needs it. Works with cuda-python >= 12.6
(``cuda.bindings.runtime``) and the older ``cuda.cudart`` of JetPack 6 (cuda-python < 13).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.errors import EdgekitError, MissingDependencyError


class TensorrtRunError(EdgekitError):
    """A CUDA or TensorRT call failed while loading or stepping an engine."""


class CudaStream:
    """Device memory and one stream through cuda-python's runtime bindings; every call checked."""

    def __init__(self):
        self.rt = _cudart()
        self._allocations: list[int] = []
        self._sizes: list[int] = []
        self.stream = self._check(self.rt.cudaStreamCreate(), "creating a CUDA stream")
        self.handle = int(self.stream)

    def _check(self, result: tuple, what: str) -> Any:
        """Raise TensorrtRunError unless the cudaError_t in ``result[0]`` is success; the rest is the value."""
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise cuda_error(self.rt, err, what)
        return rest[0] if len(rest) == 1 else rest

    def allocate(self, nbytes: int) -> int:
        pointer = self._check(self.rt.cudaMalloc(max(nbytes, 1)), f"allocating {nbytes / 2**20:.2f} MiB on the GPU "
                              f"(after {sum(self._sizes) / 2**20:.2f} MiB for this session)")
        self._sizes.append(nbytes)
        self._allocations.append(pointer)
        return pointer

    def upload(self, buffer: int, array: np.ndarray) -> None:
        # From pageable memory, cudaMemcpyAsync returns once the bytes are staged: the caller may reuse them.
        array = np.ascontiguousarray(array)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(buffer, array.ctypes.data, array.nbytes, kind, self.stream),
                    "copying to the GPU")

    def zero(self, buffer: int, nbytes: int) -> None:
        self._check(self.rt.cudaMemsetAsync(buffer, 0, nbytes, self.stream), "clearing a GPU buffer")

    def download(self, buffer: int, offset: int, out: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(out.ctypes.data, buffer + offset, out.nbytes, kind, self.stream),
                    "copying from the GPU")
        # Also where a failed kernel of an earlier enqueue surfaces (errors are sticky and asynchronous).
        self._check(self.rt.cudaStreamSynchronize(self.stream), "running the engine")

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of the current GPU."""
        return self._check(self.rt.cudaMemGetInfo(), "reading GPU memory")

    def device_name(self) -> str:
        device = self._check(self.rt.cudaGetDevice(), "finding the current GPU")
        props = self._check(self.rt.cudaGetDeviceProperties(device), "reading the GPU's properties")
        name = props.name
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")

    def close(self) -> None:
        if self.stream is not None:  # nothing queued may still use a buffer about to be freed
            self.rt.cudaStreamSynchronize(self.stream)
        while self._allocations:
            self.rt.cudaFree(self._allocations.pop())  # best effort: nothing to do about a failed free
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


CUDA_HINTS = {
    "cudaErrorMemoryAllocation": "free GPU memory (see nvidia-smi), or rebuild with smaller [shapes] prompt and "
                                 "context maxima",
    "cudaErrorNoDevice": "no CUDA GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES",
    "cudaErrorInsufficientDriver": "the NVIDIA driver is older than cuda-python's CUDA: install a cuda-python matching "
                                   "the driver's CUDA major (on JetPack 6: pip install 'cuda-python<13')",
}


def cuda_error(rt: Any, err: Any, what: str) -> TensorrtRunError:
    """A cudaError_t as an edgekit error, with a hint for the common ones."""
    name = getattr(err, "name", str(err))
    text = rt.cudaGetErrorString(err)[1]
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    hint = CUDA_HINTS.get(name, "rerun with CUDA_LAUNCH_BLOCKING=1 to find the failing call; if it persists, "
                                "report it with the engine's edgekit.json")
    return TensorrtRunError(f"CUDA failed {what}: {name} ({text})", hint)


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python, as on JetPack 6
        return cudart
    except ImportError as exc:
        raise MissingDependencyError(
            f"native TensorRT sessions need cuda-python, which is not installed ({exc})",
            "pip install 'edgekit-llm[tensorrt]' (on JetPack 6: pip install 'cuda-python<13')",
        ) from None
