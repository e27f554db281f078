"""Rendering an episode's conversation with the chat template, one turn's new text at a time.

The model's turns are never re-tokenised: after each turn only the environment's new text is rendered
and tokenised, as the difference between two renderings of the conversation (`environment_text`).
A tokenizer without a chat template (the built-in tiny model's) gets `MINIMAL_TEMPLATE`.
`check_chat_template` tries the template on a short conversation once, before a run starts, so a template
that cannot run episodes is a config error, not every episode's.
"""

from __future__ import annotations

from grpo.errors import ConfigError

# `<role>content<eos>` per message, the tools' names first; no newlines (the tiny model's character
# vocabulary has none). The model's turn ends with EOS, as Qwen2.5's ends with <|im_end|>.
MINIMAL_TEMPLATE = (
    "{%- if tools %}<tools>{% for t in tools %}{{ t.function.name }}{% if not loop.last %},{% endif %}"
    "{% endfor %}</tools>{% endif %}"
    "{%- for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    "{%- if add_generation_prompt %}<assistant>{% endif %}"
)


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The conversation as text, ending with the header of the assistant's next turn."""
    template = None if getattr(tokenizer, "chat_template", None) else MINIMAL_TEMPLATE
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template,
                                         add_generation_prompt=True, tokenize=False)


def environment_text(context: str, assistant_text: str, rendered: str, *, ended_with: str = "") -> str:
    """The text that follows the model's turn: the end of its turn (less what the model already wrote,
    `ended_with`, e.g. its EOS), the new messages, and the next assistant header.

    `context` is the rendering the turn was sampled after; `rendered` the rendering with the turn and
    the new messages. The template must render the turn's text verbatim and keep earlier turns as they
    were (Qwen2.5's does); otherwise a ValueError says which.
    """
    if not rendered.startswith(context):
        raise ValueError("chat template: rendering a longer conversation changed its beginning; multi-turn "
                         "episodes need a template that renders earlier turns the same way every time")
    rest = rendered[len(context):]
    if not rest.startswith(assistant_text):
        raise ValueError(f"chat template: the model's turn {assistant_text[:40]!r} is not rendered verbatim")
    rest = rest[len(assistant_text):]
    return rest[len(ended_with):] if ended_with and rest.startswith(ended_with) else rest


PROBE_TURN = "6 * 7 = 42, so the answer is 42."


def check_chat_template(tokenizer, model: str) -> None:
    """Render a user message, an assistant turn and a reply, as an episode does; ConfigError naming `model`
    (and the template) if the turn is not rendered verbatim or the conversation's beginning changes."""
    opening = [{"role": "user", "content": "1+1="}]
    try:
        context = render(tokenizer, opening)
        rendered = render(tokenizer, [*opening, {"role": "assistant", "content": PROBE_TURN},
                                      {"role": "user", "content": "go on"}])
        environment_text(context, PROBE_TURN, rendered)
    except Exception as e:  # a template error of any kind: the run cannot use it
        which = "its chat template" if getattr(tokenizer, "chat_template", None) else "the built-in minimal template"
        raise ConfigError(f"model.path: {model}: {which} cannot run multi-turn episodes (env.name): "
                          f"{type(e).__name__}: {e}") from e
