"""Default recipe: a small Llama-style byte-level LM on the CPython docs that ship with Python.

Runs out of the box on a laptop CPU in a few minutes; every field can be overridden on the
command line with --config.a.b=value.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds parameter init, dropout and data order
    # The objective: lm (next-token prediction) | sft (the LM loss on chat responses) | dpo |
    # reward | grpo (preferences and RL) | classify | regress (tables and images), or
    # module.path:ClassName for a Task of your own; see jtrain/tasks/.
    c.task = "lm"

    c.model = ml_collections.ConfigDict()
    c.model.kind = "transformer"  # the model family (jtrain/models/); the keys below are its own
    c.model.vocab_size = 384  # >= the tokenizer's 259 ids, padded to a multiple of 128
    c.model.d_model = 128  # width of the residual stream
    c.model.n_layers = 4  # transformer blocks (scanned, so compile time does not grow)
    c.model.n_heads = 4  # query heads
    c.model.n_kv_heads = 2  # key/value heads (grouped-query attention); divides n_heads
    c.model.head_dim = 32  # per-head width
    c.model.d_ff = 384  # SwiGLU hidden width
    c.model.rope_theta = 10_000.0  # rotary embedding base
    c.model.norm_eps = 1e-5  # RMSNorm epsilon
    c.model.tie_embeddings = True  # output projection shares the input embedding
    c.model.dropout = 0.0  # residual/attention-output dropout rate during training
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = "none"  # rematerialise each block: none | full | dots (save matmuls)
    # Attention kernel: xla | cudnn (fused, NVIDIA GPUs, bfloat16) | auto (cuDNN where it can
    # run, else XLA, saying why once); xla stays the default: it runs and is exact everywhere.
    c.model.attention = "xla"
    # The LM head and cross-entropy in chunks of this many positions, so the [tokens, vocab]
    # float32 logits of a whole batch never exist at once (0 = the whole sequence at once).
    c.model.loss_chunk = 0
    # Layout options of other model families; model.init_from="hf:PATH" sets them from the
    # checkpoint's config.json, so they rarely need setting by hand.
    c.model.norm = "rms"  # rms | layer (LayerNorm with bias, GPT-2)
    c.model.positions = "rope"  # rope | learned (a max_seq_len-row table, GPT-2)
    c.model.max_seq_len = 0  # longest sequence the model is for (learned positions' rows)
    c.model.qkv_bias = False  # biases on the query/key/value projections (Qwen2, GPT-2)
    c.model.out_bias = False  # bias on the attention output projection (GPT-2)
    c.model.mlp_gated = True  # SwiGLU-style gate; False = down(act(up(x))) (GPT-2)
    c.model.mlp_activation = "silu"  # silu | gelu | gelu_tanh
    c.model.mlp_bias = False  # biases on the MLP projections (GPT-2)
    c.model.sliding_window = 0  # attend to at most this many tokens, self included (0 = all)
    c.model.rope_scaling = "none"  # none | linear | llama3 (long-context RoPE frequencies)
    c.model.rope_factor = 1.0  # linear, llama3: context extension factor
    c.model.rope_low_freq_factor = 1.0  # llama3 only, as in Hugging Face's rope_scaling
    c.model.rope_high_freq_factor = 4.0  # llama3 only
    c.model.rope_original_max_len = 8192  # llama3 only: the pretraining context length
    # Start from pre-trained parameters (not optimizer or data state): a jtrain workdir or its
    # checkpoints/ dir, or hf:PATH (a Hugging Face directory; model.* then come from it).
    c.model.init_from = ""
    # LoRA: train low-rank adapters on a frozen base (rank 0 = off: every parameter trains).
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0  # adapter rank r; 0 = full fine-tuning
    c.model.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.model.lora.dropout = 0.0  # dropout on an adapter's input, during training only
    # Kernels to adapt, comma-separated names or glob patterns: q,k,v,o (attention),
    # gate,up,down (MLP), attn.*, mlp.*, or "all".
    c.model.lora.targets = "q,k,v,o"
    c.model.lora.base_dtype = "float32"  # frozen base storage: float32 | bfloat16 | int8

    c.data = ml_collections.ConfigDict()
    # pydoc_topics (the embedded CPython docs) | prepared:DIR | files:GLOB (.jsonl/.txt[.gz]),
    # or a weighted mixture of them: "prepared:/data/web=0.7,pydoc_topics=0.3".
    # task=sft: python_docstrings | files:GLOB (.jsonl[.gz] of prompt/response or messages).
    c.data.source = "pydoc_topics"
    c.data.tokenizer = "byte"  # bytes 0-255 plus PAD/BOS/EOS
    c.data.text_field = "text"  # files: sources: the JSONL field that holds a document's text
    c.data.chat_template = "builtin"  # task=sft: builtin | tokenizer (its config's) | a .jinja
    c.data.packing = True  # whole documents per row with segment ids; False = one cut stream
    c.data.workers = 0  # Grain worker processes building batches (0 = in the training process)
    c.data.prefetch = 2  # batches built ahead in a background thread (0 = none)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300  # optimizer updates
    c.train.batch_size = 32  # global batch, in sequences
    c.train.seq_len = 128  # tokens per sequence
    c.train.microbatches = 1  # gradient accumulation: the batch is split into this many parts
    c.train.log_every = 50  # steps between train metric logs
    c.train.on_nonfinite = "halt"  # a NaN/inf loss or gradient: halt | skip (drop that update)
    c.train.epochs = 0  # > 0: train this many passes over the train split (sets train.steps)
    # Stop when a validation metric stops improving, and end on the best evaluation's weights.
    c.train.early_stopping = ml_collections.ConfigDict()
    c.train.early_stopping.metric = ""  # a val metric to watch (loss, accuracy, ...); "" = off
    c.train.early_stopping.mode = "min"  # min: lower is better | max: higher is better
    c.train.early_stopping.patience = 5  # evaluations without improvement before stopping
    c.train.early_stopping.min_delta = 0.0  # the least change that counts as an improvement

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 100  # steps between validation passes (0 = only at the end)
    c.eval.steps = -1  # batches per validation pass (-1 = the whole split)
    c.eval.split = "val"  # what --mode=eval evaluates: val | test
    # Generation metrics (exact match, BLEU, chrF, ROUGE-L) on the first N prompts of the split
    # whose examples have reference answers (task=sft), at every evaluation (0 = off).
    c.eval.generate = ml_collections.ConfigDict()
    c.eval.generate.examples = 0  # prompts completed and scored per evaluation (0 = off)
    c.eval.generate.max_new_tokens = 64  # tokens generated per prompt at most
    c.eval.generate.temperature = 0.0  # 0 = greedy
    c.eval.sample_tokens = 200  # bytes generated from a prompt at the end (0 = none)
    c.eval.sample_prompt = "The for statement"  # prompt for the end-of-run sample
    c.eval.sample_temperature = 0.7  # 0 = greedy; sampling avoids greedy's loops

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # steps between async saves (0 = only at the end)
    c.checkpoint.keep = 3  # most recent checkpoints kept
    c.checkpoint.keep_best = True  # also keep the one with the lowest validation loss
    c.checkpoint.overwrite = False  # True: delete a different run's checkpoints in workdir

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel replicas (-1 = all remaining devices)
    c.mesh.fsdp = 1  # fully-sharded data parallel: params and optimizer state are split
    c.mesh.tensor = 1  # tensor parallel: heads and MLP width are split
    # Multislice TPU: how many slices each axis spans over the data-centre network (DCN); the
    # sizes above are then per slice, and the axis is their product (1 = within one slice).
    c.mesh.dcn_data = 1  # replicas in different slices: only gradients cross the DCN
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_tensor = 1
    # Logical parameter/activation axis -> mesh axes ("" = replicated, "a,b" = both).
    c.mesh.rules = ml_collections.ConfigDict()
    c.mesh.rules.batch = "data,fsdp"
    c.mesh.rules.embed = "fsdp"
    c.mesh.rules.mlp = "tensor"
    c.mesh.rules.heads = "tensor"
    c.mesh.rules.kv_heads = "tensor"
    c.mesh.rules.vocab = "tensor"
    c.mesh.rules.head_dim = ""
    c.mesh.rules.layers = ""

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # adamw | adafactor | lion | sgd
    c.optimizer.lr = 3e-3  # peak learning rate
    c.optimizer.weight_decay = 0.1  # decoupled; skipped for norms and biases
    c.optimizer.b1 = 0.9  # first-moment decay (adamw, lion); momentum for sgd
    c.optimizer.b2 = 0.95  # second-moment decay (adamw, lion)
    c.optimizer.eps = 1e-8  # adamw denominator epsilon
    c.optimizer.clip_norm = 1.0  # global gradient-norm clipping (0 = off)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"  # constant | cosine | linear | wsd (warmup-stable-decay)
    c.schedule.warmup_steps = 50  # linear warmup from 0 to optimizer.lr
    c.schedule.final_lr_ratio = 0.1  # end of decay, as a fraction of optimizer.lr
    c.schedule.decay_fraction = 0.2  # wsd: final fraction of steps spent decaying

    c.metrics = ml_collections.ConfigDict()
    c.metrics.peak_flops_per_device = 0.0  # for MFU; 0 = known table, else measured on CPU
    # Weights & Biases: "" = off; else the project every event is also logged to (process 0
    # only; a resumed run continues the same W&B run). Needs `pip install "jtrain[wandb]"`.
    c.metrics.wandb_project = ""
    c.metrics.wandb_entity = ""  # the W&B team or user ("" = your default)

    # A profiler trace of `steps` steps from `start_step` on, written to tensorboard/ (open its
    # Profile tab); steps = 0 = off. Start after compilation and the first steps' warm-up.
    c.profile = ml_collections.ConfigDict()
    c.profile.start_step = 10
    c.profile.steps = 0

    # At the end of training, the train split's reference profile in drift/ (column and token
    # distributions, the model's predictions), which `python -m jtrain.drift` compares new data
    # against; tasks without a drift profiler skip it.
    c.drift = ml_collections.ConfigDict()
    c.drift.profile = True
    return c
