"""marl_sd.envs: scenario, latency profiles, channel layer, batched simulator and env views."""
from marl_sd.envs.core import BatchedSimulator
from marl_sd.envs.pettingzoo_env import MECSpecDecEnv, make_env
from marl_sd.envs.vec_env import MultiAgentVecEnv

__all__ = ["BatchedSimulator", "MECSpecDecEnv", "MultiAgentVecEnv", "make_env"]
