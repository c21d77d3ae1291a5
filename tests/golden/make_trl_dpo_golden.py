"""Golden numbers for jtrain.tasks.dpo_losses, produced by TRL 1.16's own trainers.

Run by hand from the repository root (rewrites tests/golden/trl_dpo.json):

    .venv/bin/python tests/golden/make_trl_dpo_golden.py

Needs torch, transformers and trl==1.16.0 (CPU is enough; it takes a few seconds). Every case
builds a real trainer instance (DPOTrainer, or the experimental CPOTrainer / ORPOTrainer) on a
4-pair in-memory dataset, with an in-memory word-level tokenizer and tiny random Llama models
(policy: seed 0, reference: seed 1), then calls the trainer's own `compute_loss` on one
collated batch. The per-pair log-probability sums the trainer used are captured as they pass
(a forward hook for DPO, a wrapper of `get_batch_logps` for CPO/ORPO), so the recorded inputs
are exactly TRL's; the recorded outputs are its loss and its logged metrics (batch means).

Two batches: "varied" (prompts and completions of different lengths) and "equal_chosen"
(one-token prompts, every chosen completion 4 tokens). The SFT/NLL terms are compared on the
latter only: TRL averages them over all chosen tokens of the batch, jtrain per pair, and the two
agree when chosen lengths are equal; ORPO's NLL also counts prompt tokens, and a one-token
prompt has none that are scored. The `orpo_varied` case is marked `loss_without_nll`: only
its odds-ratio part and metrics are comparable.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trl_dpo.json")
WORDS = [f"w{i}" for i in range(61)]
VOCAB = ["<pad>", "<eos>", "<unk>", *WORDS]  # 64 ids

# (prompt, chosen, rejected): completions start with the space that separates them.
BATCHES = {
    "varied": [
        ("w1 w2 w3", " w4 w5", " w6"),
        ("w7 w8", " w9", " w10 w11 w12"),
        ("w13 w14 w15 w16", " w17 w18 w19 w20", " w21 w22"),
        ("w23", " w24 w25 w26", " w27 w28 w29 w30"),
    ],
    "equal_chosen": [
        ("w31", " w32 w33 w34", " w35"),
        ("w36", " w37 w38 w39", " w40 w41 w42 w43"),
        ("w44", " w45 w46 w47", " w48 w49"),
        ("w50", " w51 w52 w53", " w54 w55 w56"),
    ],
}

# name, trainer, batch, options. DPO options are DPOConfig fields; "sft" is RPO's weight.
CASES = [
    ("sigmoid_b0.1", "dpo", "varied", dict(loss_type="sigmoid", beta=0.1)),
    ("sigmoid_b0.5", "dpo", "varied", dict(loss_type="sigmoid", beta=0.5)),
    ("hinge_b0.1", "dpo", "varied", dict(loss_type="hinge", beta=0.1)),
    ("hinge_b0.3", "dpo", "varied", dict(loss_type="hinge", beta=0.3)),
    ("ipo_b0.1", "dpo", "varied", dict(loss_type="ipo", beta=0.1)),
    ("ipo_b1.0", "dpo", "varied", dict(loss_type="ipo", beta=1.0)),
    ("robust_b0.1_ls0.1", "dpo", "varied", dict(loss_type="robust", beta=0.1, label_smoothing=0.1)),
    ("robust_b0.5_ls0.3", "dpo", "varied", dict(loss_type="robust", beta=0.5, label_smoothing=0.3)),
    ("sigmoid_sft0.5", "dpo", "equal_chosen", dict(loss_type="sigmoid", beta=0.1, sft=0.5)),
    ("ipo_sft1.0", "dpo", "equal_chosen", dict(loss_type="ipo", beta=0.5, sft=1.0)),
    ("simpo_b2_g0.5", "cpo", "varied", dict(beta=2.0, simpo_gamma=0.5)),
    ("simpo_ls0.1", "cpo", "varied", dict(beta=2.5, simpo_gamma=1.2, label_smoothing=0.1)),
    ("simpo_sft0.5", "cpo", "equal_chosen", dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.5)),
    ("orpo_b0.1", "orpo", "equal_chosen", dict(beta=0.1)),
    ("orpo_b0.5", "orpo", "equal_chosen", dict(beta=0.5)),
    ("orpo_varied", "orpo", "varied", dict(beta=0.2)),
]

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def _tokenizer():
    """A word-level tokenizer over VOCAB; <eos> is a special token, so "w4<eos>" splits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _model(seed: int):
    """A tiny random Llama; a wide init (0.5) so log-probs differ between tokens and models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def _dataset(batch: str):
    from datasets import Dataset

    rows = BATCHES[batch]
    return Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in rows],
            "chosen": [c for _, c, _ in rows],
            "rejected": [r for _, _, r in rows],
        }
    )


def _common_args(workdir: str) -> dict:
    return dict(
        output_dir=workdir,
        report_to="none",
        bf16=False,
        per_device_train_batch_size=4,
        use_cpu=True,
        seed=0,
    )


def _one_batch(trainer):
    """The trainer's collated batch of the whole 4-pair dataset, in order."""
    data = trainer.train_dataset
    return trainer.data_collator([data[i] for i in range(len(data))])


def _pairs(values: torch.Tensor) -> tuple[list[float], list[float]]:
    """A [2B] tensor (chosen rows first, then rejected) as two lists of Python floats."""
    chosen, rejected = values.detach().float().chunk(2, dim=0)
    return chosen.tolist(), rejected.tolist()


def run_dpo(batch: str, options: dict, workdir: str) -> tuple[dict, dict]:
    """TRL DPOTrainer on one batch: (inputs, TRL loss and metrics)."""
    from trl import DPOConfig, DPOTrainer

    options = dict(options)
    sft = options.pop("sft", 0.0)
    if sft:
        options.update(loss_type=[options["loss_type"], "sft"], loss_weights=[1.0, sft])
    args = DPOConfig(**_common_args(workdir), **options)
    policy, reference = _model(0), _model(1)
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=_dataset(batch),
        processing_class=_tokenizer(),
    )
    inputs = _one_batch(trainer)
    seen = {}

    def capture(name):
        # The trainer sums `log_probs` over positions, which are zero outside the completion.
        return lambda module, args, kwargs, output: seen.__setitem__(name, output.log_probs.sum(1))

    hooks = [
        trainer.model.register_forward_hook(capture("policy"), with_kwargs=True),
        trainer.ref_model.register_forward_hook(capture("ref"), with_kwargs=True),
    ]
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    for hook in hooks:
        hook.remove()
    chosen, rejected = _pairs(seen["policy"])
    ref_chosen, ref_rejected = _pairs(seen["ref"])
    chosen_tokens, rejected_tokens = _pairs(inputs["completion_mask"].sum(1))
    logged = {k: trainer._metrics["train"][k][-1] for k in METRICS}
    record = dict(
        chosen=chosen,
        rejected=rejected,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    return record, {"loss": float(loss), **logged}


def run_reference_free(kind: str, batch: str, options: dict, workdir: str) -> tuple[dict, dict]:
    """TRL's experimental CPOTrainer (SimPO) or ORPOTrainer on one batch: (inputs, outputs)."""
    if kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        options = {"loss_type": "simpo", "cpo_alpha": 0.0, **options}
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    args = Config(**_common_args(workdir), max_length=64, remove_unused_columns=False, **options)
    trainer = Trainer(
        model=_model(0), args=args, train_dataset=_dataset(batch), processing_class=_tokenizer()
    )
    inputs = _one_batch(trainer)
    seen = {}

    def get_batch_logps(logits, labels, average_log_prob=False, is_encoder_decoder=False):
        # The trainer asks for averages; the sums and token counts are what jtrain is given.
        sums = Trainer.get_batch_logps(logits, labels, False, is_encoder_decoder)
        seen.update(sums=sums, tokens=(labels[:, 1:] != -100).sum(-1))
        return Trainer.get_batch_logps(logits, labels, average_log_prob, is_encoder_decoder)

    trainer.get_batch_logps = get_batch_logps
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    chosen, rejected = _pairs(seen["sums"])
    chosen_tokens, rejected_tokens = _pairs(seen["tokens"])
    stored = trainer._stored_metrics["train"]
    logged = {k: stored[k][-1] for k in METRICS}
    outputs = {"loss": float(loss), **logged, "nll_loss": stored["nll_loss"][-1]}
    record = dict(chosen=chosen, rejected=rejected)
    record.update(chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    return record, outputs


_JTRAIN_KIND = {"dpo": None, "cpo": "simpo", "orpo": "orpo"}


def build_golden() -> dict:
    """The versions, and every case: jtrain's loss name and options, TRL's inputs and outputs."""
    import datasets
    import transformers
    import trl
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    cases = []
    # transformers' deprecation notices about TRL's own arguments: nothing to act on here.
    with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for name, trainer, batch, options in CASES:
            if trainer == "dpo":
                inputs, outputs = run_dpo(batch, options, workdir)
                kind = options["loss_type"]
            else:
                inputs, outputs = run_reference_free(trainer, batch, options, workdir)
                kind = _JTRAIN_KIND[trainer]
            cases.append(
                dict(
                    name=name,
                    kind=kind,
                    beta=options["beta"],
                    label_smoothing=options.get("label_smoothing", 0.0),
                    gamma=options.get("simpo_gamma", 0.0),
                    sft_weight=options.get("sft", options.get("cpo_alpha", 0.0)),
                    loss_without_nll=(name == "orpo_varied"),
                    inputs=inputs,
                    trl=outputs,
                )
            )
    versions = {"trl": trl.__version__, "transformers": transformers.__version__}
    return {"versions": versions, "cases": cases}


def main() -> None:
    golden = build_golden()
    with open(OUT, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"wrote {len(golden['cases'])} cases to {OUT}")


if __name__ == "__main__":
    main()
