"""ijepa_viz: a teaching toolkit for I-JEPA (Assran et al., 2023, arXiv 2301.08243)."""
from ijepa_viz.config import Config, ConfigError, get_preset, override, PRESETS

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "get_preset", "override", "PRESETS", "__version__"]
