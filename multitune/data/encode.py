"""Examples -> token ids, with the loss mask on the target only.

The prompt is wrapped in the tokenizer's chat template when it has one (the model was tuned to
answer in that format), and the target ends with the end-of-turn token so that generation
learns to stop. Rows longer than `max_length` lose tokens from the start of the prompt text,
never from the chat wrapper or the target: for QA and summarisation the question and the
instruction usually sit at the end of the prompt, and the target is what is being learned.
Unlabelled text loses nothing: a long document becomes several windows of `max_length` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from multitune.data.sources import Example
from multitune.errors import MultituneError

IGNORE = -100
_SENTINEL = "\x00MULTITUNE_PROMPT\x00"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens
    task_id: int
    truncated: bool


class Encoder:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        task_ids: dict[str, int],
        max_length: int,
        chat_template: str = "auto",
    ):
        self.tok = tokenizer
        self.task_ids = task_ids
        self.max_length = max_length
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "on" and not has_template:
            raise MultituneError("chat_template: on, but the tokenizer has no chat template")
        self.use_chat = has_template and chat_template != "off"
        self.head, self.tail = self._wrapper_ids()
        eos = tokenizer.eos_token_id
        if eos is None:
            raise MultituneError("the tokenizer has no end-of-sequence token")
        self.eos = eos

    def _wrapper_ids(self) -> tuple[list[int], list[int]]:
        """Token ids the chat template puts before and after the user's text."""
        if not self.use_chat:
            bos = self.tok.bos_token_id
            add_bos = bos is not None and self.tok("a", add_special_tokens=True).input_ids[:1] == [bos]
            return ([bos] if add_bos else []), []
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(_SENTINEL)
        return (
            self.tok(before, add_special_tokens=False).input_ids,
            self.tok(after, add_special_tokens=False).input_ids,
        )

    def target_ids(self, target: str) -> list[int]:
        return self.tok(target, add_special_tokens=False).input_ids + [self.eos]

    def prompt_ids(self, prompt: str, reserve: int = 0) -> tuple[list[int], bool]:
        """Prompt ids fitting in max_length - reserve tokens; True when text had to be cut."""
        body = self.tok(prompt, add_special_tokens=False).input_ids
        room = self.max_length - reserve - len(self.head) - len(self.tail)
        if room < 1:
            raise MultituneError(
                f"max_length {self.max_length} leaves no room for the prompt "
                f"(template {len(self.head) + len(self.tail)} tokens, target {reserve})"
            )
        cut = len(body) > room
        if cut:
            body = body[len(body) - room :]
        return self.head + body + self.tail, cut

    def encode(self, ex: Example) -> Encoded:
        """One labelled example; unlabelled text goes through `windows`."""
        if ex.target is None:
            raise ValueError("Encoder.encode needs a target: unlabelled text is encoded by Encoder.windows")
        task_id = self.task_ids[ex.task]
        target = self.target_ids(ex.target)
        cut_target = len(target) > self.max_length // 2
        if cut_target:  # a target longer than half the window: keep its start, say so
            target = target[: self.max_length // 2]
        prompt, cut = self.prompt_ids(ex.prompt, reserve=len(target))
        return Encoded(prompt + target, [IGNORE] * len(prompt) + target, task_id, cut or cut_target)

    def windows(self, ex: Example) -> list[Encoded]:
        """Unlabelled text as rows of at most max_length tokens, every token a target.

        Consecutive windows share one token (a window's first token has nothing before it to be
        predicted from), so each token after the document's first is predicted exactly once: no
        text is lost to truncation, and the perplexity over a document's windows is that of the
        whole document with a context of at most max_length tokens.
        """
        ids = self.tok(ex.prompt, add_special_tokens=False).input_ids + [self.eos]
        bos = self.tok.bos_token_id
        if bos is not None and not self.use_chat:
            ids = [bos] + ids
        task_id = self.task_ids[ex.task]
        stride = self.max_length - 1
        out = []
        for start in range(0, max(len(ids) - 1, 1), stride):
            window = ids[start : start + self.max_length]
            out.append(Encoded(window, [IGNORE] + window[1:], task_id, False))  # nothing predicts token 0
        return out
