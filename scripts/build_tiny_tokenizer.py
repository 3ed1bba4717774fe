"""Build the tiny preset's tokenizer shipped in src/steadyvla/assets/tiny-tokenizer/.

A byte-level BPE trained on robot-instruction text (so any instruction is encodable), laid out like
OpenVLA's Llama-2 tokenizer: <unk>=0, <s>=1, </s>=2, then BPE pieces, then 256 reserved pieces
that are never produced from text (the action bins take the LAST 256 ids before <PAD>), then
<PAD> appended as an added token. Run once; the output is committed so token ids never drift.

    python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parents[1] / "src" / "steadyvla" / "assets" / "tiny-tokenizer"
BPE_VOCAB = 512
N_RESERVED = 256

CORPUS = [
    "In: What action should the robot take to {}?\nOut: ",
    "reach the red goal position", "push the puck to the goal", "pick up the puck and place it at the goal",
    "press the button from the top", "open the drawer", "close the drawer", "open the window",
    "close the window", "turn the faucet on", "put the bowl on the plate", "pick up the black bowl",
    "put both the alphabet soup and the tomato sauce in the basket", "turn on the stove",
    "put the cream cheese in the bowl", "open the top drawer and put the bowl inside",
    "push the plate to the front of the stove", "stack the blocks", "move the cup to the left",
    "place the mug on the right side of the table", "slide the block forward", "lift the lid",
]


def main() -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    base = len(vocab)
    for i in range(N_RESERVED):
        vocab[f"<reserved_{i:03d}>"] = base + i
    tok = Tokenizer.from_str(json.dumps(state))
    # Like Llama-2: BOS prepended, no EOS (the prompt builder appends </s> after the actions).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    )
    fast.add_special_tokens({"pad_token": "<PAD>"})
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"wrote {OUT}: vocab_size={fast.vocab_size} pad={fast.pad_token_id} len={len(fast)}")


if __name__ == "__main__":
    main()
