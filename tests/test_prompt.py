import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import LLAMA_TOKENIZER_DIR
from steadyvla.model.presets import tiny_tokenizer_dir
from steadyvla.model.prompt import IGNORE_INDEX, PromptBuilder, format_prompt


@pytest.fixture(scope="module")
def tiny_tok():
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))


def test_prompt_text_matches_openvla():
    assert format_prompt("Open the drawer.") == "In: What action should the robot take to open the drawer?\nOut: "


def test_labels_cover_only_actions_and_eos(tiny_tok):
    builder = PromptBuilder(tiny_tok)
    actions = np.array([700, 650, 449, 704])
    sample = builder.build("open the drawer", actions)
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    assert ids[0] == tiny_tok.bos_token_id and ids[-1] == tiny_tok.eos_token_id
    assert ids[-5:-1] == actions.tolist()
    n_prompt = len(ids) - 5
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]


def test_instruction_span_decodes_to_instruction(tiny_tok):
    builder = PromptBuilder(tiny_tok)
    start, end = builder.instruction_span("Put the bowl on the plate")
    ids = builder.prompt_ids("Put the bowl on the plate")
    assert tiny_tok.decode(ids[start:end]).strip() == "put the bowl on the plate"


def test_tiny_tokenizer_reserves_last_256_ids_for_actions(tiny_tok):
    vocab_end = tiny_tok.vocab_size
    assert tiny_tok.pad_token_id == vocab_end
    text_ids = tiny_tok("In: What action should the robot take to stack 12 blocks?\nOut: ").input_ids
    assert max(text_ids) < vocab_end - 256


@pytest.mark.skipif(not (LLAMA_TOKENIZER_DIR / "tokenizer.model").exists(),
                    reason="Llama-2 tokenizer.model not present in ../shared/reference/llama2-tokenizer")
def test_llama2_prompt_ids_match_openvla():
    tok = AutoTokenizer.from_pretrained(str(LLAMA_TOKENIZER_DIR))
    assert tok.vocab_size == 32000
    builder = PromptBuilder(tok)
    ids = builder.prompt_ids("open the drawer")
    assert ids[:3] == [1, 512, 29901]  # <s> "In" ":"
    assert ids[-3:] == [3744, 29901, 29871]  # "Out" ":" "▁" (OpenVLA appends 29871 before actions)
    sample = builder.build("open the drawer", np.array([31744, 31999]))
    assert sample.input_ids.tolist()[-3:] == [31744, 31999, 2]
