"""Environments of other libraries as ours (`grpo.envs.Environment`): `env.name=grpo.envs.adapters.<lib>:<Class>`,
`env.kwargs` naming the library's environment. Each adapter's library is an optional extra (`pip install -e
".[envs]"`), imported only when its adapter is chosen."""
