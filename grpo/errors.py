"""The errors that several layers raise and the command lines turn into one line and exit status 2.

Each message names what to fix: the config field, the checkpoint file, the reward that masks everything.
"""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


class MaskedRewardsError(RuntimeError):
    """Too many steps in a row on which every sample's reward was masked (the rewards are broken)."""


class RewardInfraError(RuntimeError):
    """A step on which the rewards' infrastructure (a sandbox, checker processes, a scorer) failed on more samples
    than `reward.max_infra_error_frac` allows: the rewards would read as wrong answers, so the run stops."""


class TeacherUnavailableError(RuntimeError):
    """The served distillation teacher (`algorithm.teacher.url`) failed a request after its retries or answered
    without log-probs: a step without its teacher has no advantage, so the run stops; the message names the URL."""
