"""The memory budget of persistent `python` interpreters: a run whose episodes could hold more than
`env.sessions_memory_mb` is refused before training, naming the fields and the numbers, and at run time an
interpreter past the budget is refused with an error reply instead of started."""

from __future__ import annotations

import pytest

from grpo.envs.python import SESSIONS_MEMORY, available_memory_mb, python_tool
from grpo.errors import ConfigError
from grpo.training.run import check_sessions_memory
from tests.conftest import compose
from tests.unit.test_rewards_code import SANDBOXES, needs_sandbox, runner_processes

PERSISTENT = ["env=python", "env.kwargs.persistent=true", "train.prompts_per_step=4", "algorithm.group_size=4"]


@pytest.fixture(autouse=True)
def restore_budget():
    limit, held = SESSIONS_MEMORY.limit_mb, SESSIONS_MEMORY.held_mb
    yield
    SESSIONS_MEMORY.limit_mb, SESSIONS_MEMORY.held_mb = limit, held


def test_a_run_whose_interpreters_cannot_fit_is_refused_with_its_numbers():
    # 4 prompts x 4 = 16 episodes a step on 1 rank; 10 held-out rows x 1 = 10 an evaluation; 16 x 100 MB = 1600 MB
    check_sessions_memory(compose([*PERSISTENT, "env.kwargs.memory_mb=100", "env.sessions_memory_mb=1600"]), 1, 10)
    assert SESSIONS_MEMORY.limit_mb == 1600
    with pytest.raises(ConfigError, match=r"16 persistent python interpreters .* train.prompts_per_step=4 / 1 ranks "
                                          r"x algorithm.group_size=4 = 16.* 10 held-out rows .*memory_mb=100 MB: "
                                          r"1600 MB, more than the 1599 MB budget \(env.sessions_memory_mb\)"):
        check_sessions_memory(compose([*PERSISTENT, "env.kwargs.memory_mb=100", "env.sessions_memory_mb=1599"]), 1, 10)
    # An evaluation of 40 rows x pass@2 = 80 interpreters is the larger; with asynchronous rollout it adds to
    # a step's: 2 ranks, 4 / 2 x 4 = 8 + 20 x 2 = 40 -> 48 x 10 MB = 480 MB.
    with pytest.raises(ConfigError, match=r"80 persistent .* 800 MB, more than the 799 MB"):
        check_sessions_memory(compose([*PERSISTENT, "env.kwargs.memory_mb=10", "env.sessions_memory_mb=799",
                                       "train.eval_pass_k=2"]), 1, 40)
    with pytest.raises(ConfigError, match=r"48 persistent .* 480 MB, more than the 479 MB"):
        check_sessions_memory(compose([*PERSISTENT, "env.kwargs.memory_mb=10", "env.sessions_memory_mb=479",
                                       "train.eval_pass_k=2", "rollout.max_staleness=1", "algorithm.tis_cap=2"]), 2, 40)
    # The default budget is half of MemAvailable; the tool's default memory_mb (512) counts.
    check_sessions_memory(compose(["env=python", "train.prompts_per_step=2", "algorithm.group_size=2"]), 1, 1)
    assert abs(SESSIONS_MEMORY.limit_mb - available_memory_mb() // 2) <= 256  # the machine's memory moves a little
    with pytest.raises(ConfigError, match="half of it"):
        check_sessions_memory(compose([*PERSISTENT, f"env.kwargs.memory_mb={available_memory_mb()}"]), 1, 1)
    with pytest.raises(ConfigError, match="env.sessions_memory_mb"):
        compose(["env.sessions_memory_mb=-1"])


@needs_sandbox
@pytest.mark.timeout(120)
def test_an_interpreter_past_the_budget_is_refused_with_an_error_reply_not_started():
    # Room for two interpreters of 64 MB (150 MB): the third is refused until one of the first two ends.
    SESSIONS_MEMORY.limit_mb, SESSIONS_MEMORY.held_mb = 150, 0
    tools = [python_tool(sandbox=SANDBOXES[0], persistent=True, memory_mb=64, timeout_s=20) for _ in range(3)]
    try:
        assert [tools[i]("x = 6 * 7\nprint(x)") for i in range(2)] == ["42\n", "42\n"]
        reply = tools[2]("print('ran')")
        assert reply.startswith("refused: no memory left to start an interpreter") and "128 MB of the 150 MB" in reply
        assert tools[2].session.proc is None and SESSIONS_MEMORY.held_mb == 128
        tools[0].close()
        assert SESSIONS_MEMORY.held_mb == 64
        assert tools[2]("print('ran')") == "ran\n" and tools[1]("print(x)") == "42\n"
    finally:
        for tool in tools:
            tool.close()
    assert SESSIONS_MEMORY.held_mb == 0 and runner_processes(settle_s=3) == []
