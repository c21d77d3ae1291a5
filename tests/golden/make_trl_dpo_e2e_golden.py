"""End-to-end golden numbers for task="dpo": TRL 1.16's DPOTrainer evaluating a JSONL file.

Run by hand from the repository root (rewrites tests/golden/dpo_e2e/):

    .venv/bin/python tests/golden/make_trl_dpo_e2e_golden.py

Needs torch, transformers and trl==1.16.0 (CPU; a few seconds). It writes:

- `tokenizer/`: a word-level Hugging Face tokenizer over the words of the pairs (Whitespace
  pre-tokenizer, so "blue." is "blue" "."), `<pad>` 0, `<s>` 1 (added by the post-processor,
  as Llama's is), `</s>` 2, `<unk>` 3, and a chat template (`chat_template.jinja`, where
  transformers 5 saves it) whose role markers are special tokens and whose assistant turns
  end with `<|end|>`. Every piece of a rendered chat meets the next at a special token or
  whitespace, so jtrain's piecewise tokenization equals TRL's whole-text one;
- `policy/` and `reference/`: two tiny random Llama models (seeds 0 and 1, wide init);
- `pairs.jsonl`: pairs in TRL's three formats (explicit text prompt, explicit conversational
  prompt, implicit prompt as text and as messages; one implicit text pair splits mid-word,
  and one text pair's completions end with the EOS text already);
- `trl.json`: for each loss (sigmoid, ipo; beta 0.1) TRL's eval loss and metrics over every
  pair in one batch, and TRL's token ids of each pair (prompt, chosen, rejected).

TRL cannot load one file whose "prompt" is text in some lines and messages in others (one
Arrow column has one type), so each format's pairs are a dataset of their own that DPOTrainer
prepares itself (extract_prompt, EOS after text completions, tokenization). The prepared
pairs are put back in file order and evaluated with `Trainer.evaluate` as one batch of all
pairs (per_device_eval_batch_size = the number of pairs): the loss and the logged means are
exactly those of a single eval batch of the whole file.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo_e2e")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
LOSSES = ("sigmoid", "ipo")
BETA = 0.1


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


PAIRS = [
    # Explicit prompt, text: TRL's completions start with the space that separates them.
    {"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " Green."},
    {"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " A rock, probably."},
    # Explicit prompt, conversational.
    {
        "prompt": [_user("Say hello.")],
        "chosen": [_assistant("Hello there!")],
        "rejected": [_assistant("No.")],
    },
    {"prompt": "How many legs does a cat have?", "chosen": " Four legs.", "rejected": " Two."},
    # Completions that end with EOS already: TRL adds none (and neither may jtrain).
    {"prompt": "Is fire cold?", "chosen": " No.</s>", "rejected": " Yes, very.</s>"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, _user("Is water wet?")],
        "chosen": [_assistant("Yes, it is.")],
        "rejected": [_assistant("Water is a rock, I think.")],
    },
    # Implicit prompt, text: the shared start is the prompt (TRL's extract_prompt).
    {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."},
    # ... which splits mid-word here ("... is f" + "our."): the ids still start at a word.
    {"chosen": "Two plus two is four.", "rejected": "Two plus two is five, maybe."},
    # Implicit prompt, conversational: the shared messages are the prompt.
    {
        "chosen": [_user("Pick a number."), _assistant("Seven.")],
        "rejected": [_user("Pick a number."), _assistant("Banana bread.")],
    },
]


def _format(pair: dict) -> str:
    explicit = "explicit" if "prompt" in pair else "implicit"
    return f"{explicit}_{'text' if isinstance(pair['chosen'], str) else 'messages'}"


def _texts(pair: dict):
    """The pair's texts, special tokens left out."""
    for value in pair.values():
        for text in [value] if isinstance(value, str) else [m["content"] for m in value]:
            yield text.replace("</s>", " ")


def _tokenizer(directory: str):
    """The word-level tokenizer over the pairs' words, saved to `directory` and reloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for p in PAIRS for t in _texts(p) for w, _ in split.pre_tokenize_str(t)})
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _model(seed: int, vocab_size: int):
    """A tiny random Llama; a wide init (0.5) so log-probs differ between tokens and models."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def _prepared_pairs(trainer, tokenizer) -> list[dict]:
    """Every pair as TRL prepares it (its own dataset per format), in file order."""
    from datasets import Dataset

    out = [None] * len(PAIRS)
    for name in sorted({_format(p) for p in PAIRS}):
        index = [i for i, p in enumerate(PAIRS) if _format(p) == name]
        data = Dataset.from_list([PAIRS[i] for i in index])
        prepared = trainer._prepare_dataset(data, tokenizer, trainer.args, name)
        for i, row in zip(index, prepared, strict=True):
            out[i] = {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    return out


def run_trl(loss: str, tokenizer, directory: str, workdir: str) -> tuple[dict, list[dict]]:
    """TRL's eval loss and metrics over all pairs in one batch, and its ids of every pair."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=workdir,
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        loss_type=loss,
        beta=BETA,
        per_device_eval_batch_size=len(PAIRS),
    )
    placeholder = Dataset.from_list([PAIRS[0]])  # DPOTrainer needs a train set to start
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(os.path.join(directory, "policy")),
        ref_model=AutoModelForCausalLM.from_pretrained(os.path.join(directory, "reference")),
        args=args,
        train_dataset=placeholder,
        processing_class=tokenizer,
    )
    pairs = _prepared_pairs(trainer, tokenizer)
    # Trainer.evaluate itself: DPOTrainer.evaluate would prepare the prepared pairs again.
    results = Trainer.evaluate(trainer, eval_dataset=Dataset.from_list(pairs))
    metrics = {
        k.removeprefix("eval_"): v for k, v in results.items() if "/" in k or k == "eval_loss"
    }
    return metrics, pairs


def build_golden(directory: str) -> dict:
    """Writes the tokenizer, the models and the pairs to `directory`; returns TRL's numbers."""
    import datasets
    import transformers
    import trl
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    os.makedirs(directory, exist_ok=True)
    tokenizer = _tokenizer(os.path.join(directory, "tokenizer"))
    for name, seed in (("policy", 0), ("reference", 1)):
        _model(seed, len(tokenizer)).save_pretrained(os.path.join(directory, name))
    with open(os.path.join(directory, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in PAIRS)
    results, ids = {}, None
    # transformers' deprecation notices about TRL's own arguments: nothing to act on here.
    with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for loss in LOSSES:
            results[loss], ids = run_trl(loss, tokenizer, directory, workdir)
    versions = {"trl": trl.__version__, "transformers": transformers.__version__}
    formats = [_format(p) for p in PAIRS]
    return {"versions": versions, "beta": BETA, "formats": formats, "trl": results, "ids": ids}


def main() -> None:
    golden = build_golden(OUT)
    with open(os.path.join(OUT, "trl.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(golden['ids'])} pairs, losses {', '.join(golden['trl'])}")


if __name__ == "__main__":
    main()
