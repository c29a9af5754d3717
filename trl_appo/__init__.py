"""trl_appo: APPO (Agentic Procedural Policy Optimization) for Hugging Face TRL.

`from trl_appo import APPOConfig, APPOTrainer` swaps into an existing GRPO script. Heavy imports (TRL,
transformers) happen on first attribute access so `trl_appo.core` and the tools stay light.
"""

__version__ = "0.1.0"

from trl_appo.runtime import quiet_known_noise as _quiet_known_noise

_quiet_known_noise()  # two third-party import-time messages nobody can act on (trl_appo.runtime says which)

_LAZY = {
    "APPOConfig": "trl_appo.config",
    "APPOTrainer": "trl_appo.trainer",
    "RolloutEngine": "trl_appo.rollout",
    "Prefix": "trl_appo.rollout",
    "TagProtocol": "trl_appo.rollout",
    "ChatTemplateProtocol": "trl_appo.rollout",
    "Tool": "trl_appo.tools",
    "tool": "trl_appo.tools",
    "PythonTool": "trl_appo.tools",
    "SearchTool": "trl_appo.tools",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_appo' has no attribute {name!r}")
