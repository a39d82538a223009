"""Conversation → tokens with a response mask, under the chat templates of several families.

The property every test leans on: the supervised tokens decode to exactly the assistant contents
with weight 1, each followed by its end-of-turn marker — or the example is refused with
``MaskError``, never returned with a wrong mask.
"""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chat_templates import (
    DROPS_EARLY_TURNS,
    NO_END_MARKER,
    REWRITES_ASSISTANT,
    STRIPS_EARLIER_THINKING,
    TEMPLATES,
    Template,
)
from training.model import chat
from training.model.chat import (
    IGNORE_INDEX,
    MaskError,
    TruncatedError,
    end_of_turn_ids,
    render_prompt,
    template_hash,
    tokenize_conversation,
    tokenize_preference,
)
from training.model.registry import TINY_MODEL_ID, load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model(TINY_MODEL_ID)


def tokenizer_for(model_dir, template: Template):
    """The built-in (SmolLM2) tokenizer with ``template`` and the family's special tokens."""
    tok = load_tokenizer(model_dir)
    if template.special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(template.special_tokens)})
    if template.name != "chatml-smollm2":
        tok.chat_template = template.template
    return tok


@pytest.fixture(scope="module")
def smol(model_dir):
    return load_tokenizer(model_dir)


def supervised_runs(tok, example) -> list[str]:
    """Decode each maximal run of supervised tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def expected_runs(template: Template, messages) -> list[str]:
    return [m["content"] + template.end_marker for m in messages
            if m["role"] == "assistant" and m.get("weight", 1) == 1]


# --------------------------------------------------------------------------- properties

# Words, numbers, punctuation, accents, CJK and emoji; newlines and spaces inside.
_TEXT = st.lists(
    st.sampled_from(list("abcXYZ 019.,:;!?-_()[]{}#*'\"\n\té中文ü🙂") + ["the", " of", "##", "\n\n"]),
    min_size=1, max_size=30,
).map("".join).map(str.strip).filter(bool)


@st.composite
def conversations(draw, template: Template):
    messages = []
    if template.supports_system and draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_TEXT)})
    turns = draw(st.integers(1, 3))
    weights = draw(st.lists(st.sampled_from([0, 1]), min_size=turns, max_size=turns)
                   .filter(lambda w: 1 in w))
    for w in weights:
        messages.append({"role": "user", "content": draw(_TEXT)})
        if template.supports_tool and draw(st.booleans()):
            # Tool output rides between the user and the assistant turn.
            messages.append({"role": "tool", "content": draw(_TEXT)})
        messages.append({"role": "assistant", "content": draw(_TEXT), "weight": w})
    return messages


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_supervised_tokens_decode_to_responses_and_end_markers(model_dir, template):
    tok = tokenizer_for(model_dir, template)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conversations(template))
    def check(messages):
        example = tokenize_conversation(tok, messages)
        assert supervised_runs(tok, example) == expected_runs(template, messages)
        # Training sees each supervised turn after exactly the prompt serving would send.
        first = next(i for i, m in enumerate(messages)
                     if m["role"] == "assistant" and m.get("weight", 1) == 1)
        prompt = render_prompt(tok, messages[:first])
        assert example.input_ids[: len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])

    check()


def test_chatml_mask_spelled_out(smol):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    example = tokenize_conversation(smol, messages)
    text = smol.decode(example.input_ids)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n")
    supervised = [smol.decode([t]) for t, lab in zip(example.input_ids, example.labels)
                  if lab != IGNORE_INDEX]
    assert supervised == ["Hello", "!", "<|im_end|>"]
    # The newline after <|im_end|> belongs to the template, not to the answer.
    assert example.labels[-1] == IGNORE_INDEX


def test_weight_zero_turn_is_context_only(smol):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "wrong", "weight": 0},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "right"}]
    example = tokenize_conversation(smol, messages)
    assert supervised_runs(smol, example) == ["right<|im_end|>"]
    assert "wrong" in smol.decode(example.input_ids)


def test_all_turns_weight_zero_is_refused(smol):
    with pytest.raises(MaskError, match="no assistant message to train on"):
        tokenize_conversation(smol, [{"role": "user", "content": "a"},
                                     {"role": "assistant", "content": "b", "weight": 0}])


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_end_of_turn_ids(model_dir, template):
    tok = tokenizer_for(model_dir, template)
    ids = end_of_turn_ids(tok)
    assert tok.convert_ids_to_tokens(ids[0]) == template.end_marker
    assert tok.eos_token_id in ids


def test_plain_template_without_chat_template(model_dir):
    tok = load_tokenizer(model_dir)
    tok.chat_template = None
    messages = [{"role": "user", "content": "Sort 3 1 2"}, {"role": "tool", "content": "numbers"},
                {"role": "assistant", "content": "1 2 3"}]
    example = tokenize_conversation(tok, messages)
    assert tok.decode(example.input_ids).startswith(
        "### Instruction:\nSort 3 1 2\n\n### Input:\nnumbers\n\n### Response:\n1 2 3<|im_end|>")
    assert supervised_runs(tok, example) == [f"1 2 3{tok.eos_token}"]
    assert tok.decode(render_prompt(tok, messages[:2])).endswith("### Response:\n")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("template", "match"), [
    (DROPS_EARLY_TURNS, "rewrites or drops earlier turns"),
    (STRIPS_EARLIER_THINKING, "rewrites or drops earlier turns"),
    (REWRITES_ASSISTANT, "does not render the assistant content verbatim"),
    (NO_END_MARKER, "not followed by an end-of-turn marker"),
], ids=["drops-early-turns", "strips-earlier-thinking", "rewrites-assistant", "no-end-marker"])
def test_template_without_derivable_mask_is_reported(smol, template, match):
    tok = smol.__class__.from_pretrained(smol.name_or_path)
    tok.chat_template = template
    messages = [{"role": "user", "content": "q1"},
                {"role": "assistant", "content": "<think>hmm</think>\nanswer one"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "answer two"},
                {"role": "user", "content": "q3"}, {"role": "assistant", "content": "answer three"}]
    with pytest.raises(MaskError, match=match):
        tokenize_conversation(tok, messages)


def test_trimming_template_refuses_padded_content(model_dir):
    llama3 = next(t for t in TEMPLATES if t.name == "llama3")
    tok = tokenizer_for(model_dir, llama3)
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert supervised_runs(tok, tokenize_conversation(tok, ok)) == ["hello<|eot_id|>"]
    padded = [ok[0], {"role": "assistant", "content": "hello\n"}]
    with pytest.raises(MaskError, match="verbatim"):
        tokenize_conversation(tok, padded)


def test_template_that_refuses_the_conversation(model_dir):
    gemma = next(t for t in TEMPLATES if t.name == "gemma")
    tok = tokenizer_for(model_dir, gemma)
    with pytest.raises(MaskError, match="System role not supported"):
        tokenize_conversation(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                    {"role": "assistant", "content": "a"}])


def test_a_wrong_mask_is_caught_not_returned(smol, monkeypatch):
    """The decode check is the last line of defence: an off-by-one mask never gets out."""
    derive = chat._tokens_and_labels

    def off_by_one(tokenizer, full, spans):
        ids, labels = derive(tokenizer, full, spans)
        shifted = [IGNORE_INDEX, *labels[:-1]]
        return ids, [i if s != IGNORE_INDEX else IGNORE_INDEX for i, s in zip(ids, shifted)]

    monkeypatch.setattr(chat, "_tokens_and_labels", off_by_one)
    with pytest.raises(MaskError, match="supervised tokens of response 0 decode to"):
        tokenize_conversation(smol, [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}])


def test_special_token_inside_content_is_refused(smol):
    with pytest.raises(MaskError, match=r"messages\[1\].content contains the special token '<\|im_end\|>'"):
        tokenize_conversation(smol, [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "bye<|im_end|>more"}])


@pytest.mark.parametrize(("message", "match"), [
    ({"role": "robot", "content": "x"}, r"messages\[0\].role must be one of"),
    ({"role": "user", "content": 3}, r"messages\[0\].content must be a string"),
    ({"role": "assistant", "content": "x", "weight": 2}, r"messages\[0\].weight must be 0 or 1"),
])
def test_malformed_messages_name_the_index(smol, message, match):
    with pytest.raises(MaskError, match=match):
        tokenize_conversation(smol, [message, {"role": "assistant", "content": "y"}])


# --------------------------------------------------------------------------- truncation


def test_truncation_that_cuts_a_response_is_reported(smol):
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "one two three four"}]
    full = tokenize_conversation(smol, messages)
    with pytest.raises(TruncatedError, match="would cut a response") as info:
        tokenize_conversation(smol, messages, max_length=len(full) - 3)
    assert (info.value.num_tokens, info.value.max_length) == (len(full), len(full) - 3)
    # Dropping only the template's trailing newline keeps every supervised token.
    cut = tokenize_conversation(smol, messages, max_length=len(full) - 1)
    assert len(cut) == len(full) - 1 and cut.num_supervised == full.num_supervised
    assert tokenize_conversation(smol, messages, max_length=len(full)) == full


# --------------------------------------------------------------------------- preference pairs


def test_preference_pair_shares_the_prompt(smol):
    prompt = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"},
              {"role": "user", "content": "Really?"}]
    pair = tokenize_preference(smol, prompt, chosen="4, sorry.", rejected="Yes, 5.")
    assert supervised_runs(smol, pair.chosen) == ["4, sorry.<|im_end|>"]
    assert supervised_runs(smol, pair.rejected) == ["Yes, 5.<|im_end|>"]
    n = pair.chosen.labels.index(next(x for x in pair.chosen.labels if x != IGNORE_INDEX))
    assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n] == render_prompt(smol, prompt)


# --------------------------------------------------------------------------- hashes and speed


def test_template_hash_changes_with_the_template(model_dir):
    tok = load_tokenizer(model_dir)
    before = template_hash(tok)
    assert before == template_hash(load_tokenizer(model_dir))  # stable across loads
    tok.chat_template = next(t for t in TEMPLATES if t.name == "qwen2").template
    assert template_hash(tok) != before


def test_module_exports():
    assert chat.IGNORE_INDEX == -100
    assert set(chat.ROLES) == {"system", "user", "assistant", "tool"}
