"""edgekit custom ops: torch.library ops that tracing keeps whole, lowered per target."""

from __future__ import annotations

from edgekit.export.ops import attention, linear_attention, moe, rms_norm
from edgekit.export.ops._base import DOMAIN, OPS, LoweringContext

TRANSLATIONS = {**attention.TRANSLATIONS, **rms_norm.TRANSLATIONS, **linear_attention.TRANSLATIONS,
                **moe.TRANSLATIONS}

__all__ = ["DOMAIN", "OPS", "TRANSLATIONS", "LoweringContext", "attention", "linear_attention", "moe", "rms_norm"]
