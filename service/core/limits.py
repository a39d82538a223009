"""The limits a job and a chat request meet, in one table.

Read by the API's request validation (``service/api/schemas.py``), the training spec's checks
(``training/spec.py``) and the serving check (``serving/adapters.py``), so that whatever a job
accepts trains, and whatever trains is served. Bounds are inclusive unless a name says otherwise.
"""

from __future__ import annotations

# -- the adapter ------------------------------------------------------------------------------

MAX_LORA_RANK = 64
"""Largest LoRA rank a job accepts and a chat replica serves (smallest: 1). The engine applies
any rank, but every adapted token pays for it: an r=64 adapter of SmolLM2-135M has 20M
parameters (80 MB in fp32, held per cached adapter and replica), and its matmuls grow with r:
at r=256 they add more than half of the base model's own work to every token."""
MAX_LORA_LAYERS = 1024
"""``lora.layers``: adapt at most the last this many decoder layers (more means all)."""

# -- the run ----------------------------------------------------------------------------------

MAX_EPOCHS = 50
MAX_BATCH_SIZE = 256
"""Examples per optimizer step, over all workers."""
MAX_LEARNING_RATE_MULTIPLIER = 100.0
"""The multiplier is > 0 and at most this."""
MAX_WORKERS = 64
"""Ray Train workers of one run."""
MIN_CONTEXT_LENGTH = 16
MAX_CONTEXT_LENGTH = 131072
"""Tokens per training example (``max_length``) and per packed row (``pack_length``)."""
MAX_TRAINING_FILES = 16
"""Extra ``training_files`` mixed with ``training_file``."""
MAX_FILE_WEIGHT = 1000.0
MAX_CHECKPOINT_EVERY_STEPS = 1_000_000
"""``checkpoint_every_steps``: 1..this (0, epoch ends only, is the operator's)."""
MIN_CHECKPOINT_EVERY_SECONDS = 10
"""``checkpoint_every_seconds`` a request may ask for: this at least (more often would spend the
run on uploads), ``MAX_CHECKPOINT_EVERY_SECONDS`` at most."""
MAX_CHECKPOINT_EVERY_SECONDS = 86400

# -- DPO --------------------------------------------------------------------------------------

MAX_BETA = 2.0
"""DPO's beta is > 0 and at most this."""
MAX_RPO_ALPHA = 10.0

# -- reinforcement fine-tuning (GRPO) ---------------------------------------------------------

MAX_RFT_GROUP_SIZE = 64
"""Completions sampled per prompt at most (a group is one batch of rollouts)."""
RFT_GROUP_SIZE = 4
"""Completions per prompt at compute_multiplier 1 (the group size scales with it)."""

# -- serving (defaults of settings that can raise or lower them) ------------------------------

ADAPTERS_PER_REPLICA = 8
"""Adapters a chat replica keeps loaded per base model (``TUNESERVE_MAX_ADAPTERS_PER_REPLICA``)."""
FULL_MODELS_PER_REPLICA = 2
"""Full fine-tunes a chat replica keeps loaded per base model, each a whole model in memory
(``TUNESERVE_MAX_FULL_MODELS_PER_REPLICA``; they count among its adapters, too)."""
MAX_TOKENS = 2048
"""Completion tokens per chat request (``TUNESERVE_MAX_TOKENS_CAP``)."""
MAX_CHOICES = 16
"""``n``: choices per chat request; each is a row of the replica's batch."""
MAX_CHOICE_TOKENS = 16384
"""``n`` × ``max_tokens`` (the cap when unset) of one chat request: what one request may ask
the batch for at most."""
MAX_TOP_LOGPROBS = 20
"""``top_logprobs``, as OpenAI's."""

# -- evals ------------------------------------------------------------------------------------

MAX_EVAL_ITEMS = 100_000
"""Items of one eval run's data source (each one chat request plus its grades)."""
MAX_TESTING_CRITERIA = 32
"""Graders of one eval."""

# -- data generation (Self-Instruct) ------------------------------------------------------------

MAX_DATAGEN_COUNT = 5_000
"""Examples one data-generation job may ask for (each costs a few chat requests)."""
MAX_SEED_TASKS = 10_000
"""Seed tasks read from one seed file (the paper starts from 175)."""
MAX_DATAGEN_PROMPTS_PER_ROUND = 64
"""Instruction prompts sent together per round (the chat engine batches them)."""
