"""marl_sd.envs: scenario, latency profiles, channel layer, batched simulator and env views.

Submodules load lazily, so light consumers (the live controller imports only the
observation builder) do not pay for torch, gymnasium or PettingZoo.
"""

from importlib import import_module

_EXPORTS = {
    "BatchedSimulator": "core",
    "MECSpecDecEnv": "pettingzoo_env",
    "make_env": "pettingzoo_env",
    "MultiAgentVecEnv": "vec_env",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"marl_sd.envs.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'marl_sd.envs' has no attribute {name!r}")
