"""Chat templates of common model families, as strings to set on the built-in tokenizer.

Copied from the models' tokenizer_config.json (whitespace as published). Each entry names the
special tokens the family's vocabulary has and SmolLM2's lacks; tests add them before use.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Template:
    name: str
    template: str | None
    """None: no chat template, the plain ### Instruction / ### Response template applies."""
    special_tokens: tuple[str, ...] = ()
    end_marker: str = "<|im_end|>"
    """The token that ends an assistant turn under this template (SmolLM2's EOS is <|im_end|>)."""
    supports_system: bool = True
    supports_tool: bool = True
    trims_content: bool = False
    """The template strips whitespace around contents (Llama-3, Gemma)."""
    notes: str = field(default="", compare=False)


# HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with a default system prompt).
CHATML = None  # the built-in tokenizer's own template, read at run time

# Qwen/Qwen2-7B-Instruct
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.1
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# google/gemma-2-2b-it
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

TEMPLATES = [
    Template("chatml-smollm2", CHATML),
    Template("qwen2", QWEN2),
    Template("llama3", LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
             end_marker="<|eot_id|>", trims_content=True),
    Template("mistral", MISTRAL, supports_system=False, supports_tool=False),
    Template("gemma", GEMMA, ("<start_of_turn>", "<end_of_turn>"), end_marker="<end_of_turn>",
             supports_system=False, supports_tool=False, trims_content=True),
    Template("plain", None),
]

# ---- templates under which a correct mask cannot be derived -------------------------------

# Keeps only the last four messages (a context-window trick): earlier prefixes render other turns.
DROPS_EARLY_TURNS = (
    "{% for message in messages[-4:] %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Rewrites what the assistant said.
REWRITES_ASSISTANT = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] | upper }}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Reasoning models (Qwen3-style) strip the thinking from earlier assistant turns only, so a turn
# renders differently once a later turn follows it.
STRIPS_EARLIER_THINKING = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Ends assistant turns with plain text, no special token: the model could never learn to stop.
NO_END_MARKER = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
