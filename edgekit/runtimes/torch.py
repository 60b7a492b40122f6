"""PyTorch eager (transformers) as the reference and the baseline."""

from __future__ import annotations

from typing import Any

import numpy as np


def load_reference(model: str, dtype: str = "fp32") -> Any:
    """The Hugging Face model for ``model`` (folder, preset or hub id), eager attention, eval mode."""
    from edgekit.errors import require

    require("torch", "export")
    from edgekit.export import resolve
    from edgekit.export.archs import arch_for

    folder = resolve.resolve_model(model)
    config = resolve.load_config(folder)
    arch = arch_for(config, folder / "config.json")  # same refusal as export for unsupported families
    return resolve.load_model(folder, config, dtype, arch.auto_class)


class TorchSession:
    """The generation contract (reset / forward) over transformers with its DynamicCache."""

    def __init__(self, model: Any):
        import inspect

        self.model = model
        # transformers renamed `past_key_values` to `cache` during 5.x; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.reset()

    def reset(self, capacity: int = 0) -> None:
        self._past = None

    def forward(self, token_ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            kwargs = {self._cache_arg: self._past, "use_cache": True}
            out = self.model(torch.tensor([list(token_ids)]), **kwargs)
        self._past = out[self._cache_arg] if self._cache_arg in out else out.past_key_values
        return out.logits[0].float().numpy()
