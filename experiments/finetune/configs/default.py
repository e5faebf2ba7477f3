"""Defaults shared by every config: the fields ``train_and_evaluate`` reads.

Each task config starts from ``get_config()`` here and overrides what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # "lora", "rslora", "sds" (SDS-LoRA), "riemannian" (Riemannian-preconditioned LoRA) or
  # "full" (full fine-tuning). The head always trains fully (PEFT's modules_to_save).
  c.method = "sds"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "minilm"
  c.model.num_layers = 0  # 0: all pretrained layers; n: the first n (smaller, for tests)
  c.model.dropout_rate = 0.1
  # The frozen base's storage: "none" (float), "int8", "int4" or "nf4" (QLoRA: kernels
  # quantized with qwix, dequantized block by block inside their matmuls; adapter methods).
  c.model.quantization = "none"
  c.model.quantization_tile = 64  # 4-bit types: one scale per this many input rows

  c.data = ml_collections.ConfigDict()
  c.data.source = "rotten_tomatoes"  # rotten_tomatoes | fashion_mnist | csv | tfds
  c.data.name = ""  # TFDS dataset name, for source "tfds"
  c.data.data_dir = ""  # TFDS data_dir; "" = $SDSLORA_DATA_DIR or ./data/tfds
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.test_split = "test"  # "" for none
  c.data.train_file = ""  # source "csv": a CSV (with header) or JSONL file
  c.data.validation_file = ""  # optional; else validation_fraction of train is held out
  c.data.test_file = ""
  c.data.validation_fraction = 0.1
  c.data.split_seed = 0
  c.data.text_key = "text"
  c.data.label_key = "label"
  c.data.image_key = "image"
  c.data.classes = ()  # class names in id order; () = inferred
  # Accept inferred classes that look like a mistake (a class seen once in 20+ records,
  # integer ids that skip values, one class, more than 1,000 classes): refused by default.
  c.data.accept_odd_labels = False
  c.data.max_len = 64  # tokens, [CLS] and [SEP] included
  c.data.image_size = 64

  c.adapter = ml_collections.ConfigDict()
  c.adapter.rank = 8
  c.adapter.alpha = 16.0
  # SDS-LoRA's start: "lora" (LoRA init, a plain-LoRA warm-up of optim.sds_warmup_steps,
  # then the switch) or "zero" (zero factors with random orthonormal bases: an exactly
  # zero update that trains as SDS-LoRA from the first step; use sds_warmup_steps = 0).
  c.adapter.sds_init = "lora"
  c.adapter.sqrt_rank_scaling = False  # scale alpha / sqrt(r) (rsLoRA's) instead of alpha / r
  # Regexes (re.fullmatch on "/"-joined parameter paths) of the adapted kernels.
  c.adapter.targets = (
    r".*attention/(query|key|value|output)/kernel",
    r".*(intermediate|output)/kernel",
  )

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 10  # linear learning-rate warm-up, then cosine decay to 0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0  # global-norm clipping; 0 for none
  c.optim.sds_warmup_steps = 10  # plain-LoRA updates before SDS-LoRA's switch
  c.optim.sds_refresh = "every_step"  # every_step | an int k | phases
  c.optim.sds_switch_state = "reset"  # reset | keep: Adam's moments of the switched factors
  c.optim.sds_rewarmup_steps = 10  # linear re-warm-up of the factor updates after the switch
  c.optim.sds_refresh_rule = "orth"  # orth | retract: what a refresh does (sds_lora's refresh_rule)
  c.optim.sds_step_scale = 6.0**-0.5  # multiplies the factor updates after the switch (sds_lora)
  c.optim.riemannian_damping = 1e-6

  c.batch_size = 32  # global, over all processes
  c.accum_steps = 1  # gradient accumulation: micro-batches of batch_size / accum_steps
  c.num_steps = 300
  c.compute_dtype = "float32"  # or "bfloat16": the frozen base and activations
  c.eval_every = 100
  c.eval_batch_size = 128
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.export = True  # adapters-only export (library format, and PEFT for MiniLM) at the end
  c.progress = True
  # Gradient-geometry diagnostics (sdslora_jax.diagnostics), logged as split "diagnostics"
  # every `every` steps on that step's batch (0: off; adapter methods only). `alignment`
  # also differentiates the frozen base (a full fine-tuning gradient: kernel-sized memory)
  # for the cosine between it and the kernel update each adapter induces.
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.every = 0
  c.diagnostics.alignment = False
  # What each update does to the adapters (sdslora_jax.diagnostics.tree_step_metrics: factor
  # norms and steps, subspace rotation, the change of each layer's update from the step and
  # from SDS-LoRA's basis refresh), logged as split "step_metrics" after every update up to
  # this step (0: off): around the switch, e.g. 3 x optim.sds_warmup_steps.
  c.diagnostics.step_metrics_until = 0

  # Device mesh: sizes of the ("data", "fsdp", "tensor") axes; -1 takes the devices left.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # Multi-process runs: jax.distributed.initialize(...) when enabled. On a TPU pod or a
  # SLURM / Open MPI cluster leave the fields empty: JAX finds them.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.local_device_ids = ()
  return c


def apply_smoke_loop(c: ml_collections.ConfigDict, num_steps: int) -> None:
  """The loop settings of every ``:smoke`` variant: small batches, rank 4, a few steps."""
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_steps = num_steps
  c.eval_every = c.checkpoint_every = num_steps // 2
  c.log_every = 1
  c.optim.warmup_steps = num_steps // 3
  c.optim.sds_warmup_steps = 2
  c.adapter.rank = 4
  c.adapter.alpha = 8.0
  c.progress = False
