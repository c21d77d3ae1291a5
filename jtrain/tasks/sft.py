"""Supervised fine-tuning: the language-model loss on the assistant tokens of chat examples.

Records (prompt/response or OpenAI-style messages) are rendered with `data.chat_template`
(`jtrain.tasks.chat`) into token ids with a loss weight of 1 on assistant content and
end-of-turn tokens (`jtrain.tasks.sft_examples`). An example is never cut across rows: it is
packed whole, or alone in its row. The end-of-run sample answers the prompt as a user turn.
"""

from __future__ import annotations

import numpy as np

from jtrain import tasks
from jtrain.data import sources, tokenizers
from jtrain.tasks import chat, sft_examples
from jtrain.tasks.base import GenerationSet
from jtrain.tasks.lm import LMTask


@tasks.register("sft")
class SFTTask(LMTask):
    """Next-token loss on response tokens only; examples stay whole."""

    name = "sft"
    splittable_examples = False

    @classmethod
    def validate(cls, config) -> None:
        sft_examples.validate(config.data.source, config.data.tokenizer, config.data.chat_template)
        super().validate(config)

    def source_specs(self, source: str) -> tuple[sources.SourceSpec, ...]:
        return sft_examples.parse_spec(source)

    def examples(self, spec: sources.SourceSpec, split: str):
        data = self.config.data
        return sft_examples.load_examples(
            spec, split, data.tokenizer, data.chat_template, self.config.train.seq_len
        )

    def generation_set(self, split: str, limit: int) -> GenerationSet | None:
        """Each conversation up to its last assistant turn, that turn's text the reference."""
        data = self.config.data
        template = chat.load(data.chat_template, data.tokenizer)
        tokenizer = tokenizers.get_tokenizer(data.tokenizer)
        prompts, references = [], []
        for spec in self.source_specs(data.source):
            for _, messages in sft_examples.conversations(spec, split):
                if len(prompts) == limit:
                    break
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                pieces = template.prompt_pieces(messages[:last])
                prompts.append(chat.encode([pieces], tokenizer)[0][0].tolist())
                references.append(messages[last]["content"])
        stops = (int(template.stop_id), int(tokenizer.eos_id))
        return GenerationSet(prompts, references, stops, tokenizer.decode)

    def sample_prompt(self, tokenizer, prompt: str) -> tuple[np.ndarray, int, str]:
        """The prompt as a user turn, answered as the template's assistant."""
        template = chat.load(self.config.data.chat_template, self.config.data.tokenizer)
        return chat.prompt_ids(template, tokenizer, prompt), template.stop_id, prompt + "\n-> "
