"""The chat template applied here, for a model that writes the user's turn (Magpie).

Magpie (Xu et al., 2024) draws instructions from an aligned model with no seed at all: the
prompt is the chat template rendered up to the start of a user turn, and what the model writes
next is a user's message. ``apply_chat_template`` cannot render an open turn directly (its
``continue_final_message`` finds the final message by its text, which is empty here), so the
conversation is rendered with a marker as the user's message and cut at the marker. The same
rendering tells where a user turn ends in this template (``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``, ``[/INST]``): a stop for the reply.
"""

from __future__ import annotations

from ..errors import FactoryError
from .base import Conversation

# Letters only: templates that trim, escape or title-case content leave it as it is.
_MARK = "QzxFactoryOpenTurnMarkQzx"


def _rendered(tokenizer, head: Conversation) -> tuple[str, int]:
    """The template over ``head`` and a user message that is the marker, and where the marker is."""
    messages = [{"role": m["role"], "content": m.get("content", "")} for m in head]
    text = tokenizer.apply_chat_template(messages + [{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=False)
    at = text.rfind(_MARK)
    if at < 0:
        raise FactoryError("the model's chat template does not show the user's message as it is, so the model "
                           "cannot be asked to write one (magpie); use a model whose template does, or set "
                           "llm.chat_template")
    return text, at


def render_user_turn(tokenizer, conversation: Conversation) -> str:
    """The prompt that has the model write the open user turn that ends ``conversation``: the
    template up to the start of that turn, then the turn's prefix (usually empty)."""
    text, at = _rendered(tokenizer, conversation[:-1])
    return text[:at] + conversation[-1].get("content", "")


def end_of_user_turn(tokenizer) -> str | None:
    """The text that ends a user's turn in the template (its first piece after the message), or None."""
    text, at = _rendered(tokenizer, [])
    after = text[at + len(_MARK):].strip()
    return after.split()[0] if after else None
