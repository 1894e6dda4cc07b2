"""swattn: exact sliding-window attention that is fast and memory-lean on CPU."""

from swattn.integrations.transformers import register_with_transformers
from swattn.models.loading import load
from swattn.ops.api import sliding_window_attention
from swattn.ops.reference import reference_attention
from swattn.window import visible

__all__ = ["sliding_window_attention", "reference_attention", "visible", "load", "register_with_transformers"]
__version__ = "0.1.0"
