"""The agent: a per-item tool environment (`env`), the transcript renderer (`transcript`), model engines that
generate for many items at once (`generation`), the one batched multi-turn loop (`rollout`) that evaluation,
serving, online training and the teacher's step rows all run, and the assembled agent with its tools (`runner`)."""

from arft_core.agent.env import AgentEnv, EnvItem, Observation, StepResult, Tools
from arft_core.agent.rollout import Episode, run_episodes
from arft_core.agent.transcript import Transcript

__all__ = ["AgentEnv", "EnvItem", "Episode", "Observation", "StepResult", "Tools", "Transcript", "run_episodes"]
