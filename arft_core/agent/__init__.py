"""The agent loop: a per-item tool environment (`env`), model back-ends that generate for many items at once
(`generation`), and the batched multi-turn driver (`rollout`) used by evaluation and online training."""

from arft_core.agent.env import AgentEnv, EnvItem, Observation, StepResult, Tools
from arft_core.agent.rollout import Prompt, run_episodes

__all__ = ["AgentEnv", "EnvItem", "Observation", "Prompt", "StepResult", "Tools", "run_episodes"]
