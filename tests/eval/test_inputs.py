"""Model inputs built from records: the prompt format and the padding side generation needs."""

from __future__ import annotations

from transformers import AutoProcessor

from qapframe.data.synthetic import SyntheticVQA
from qapframe.eval.inputs import model_inputs


def test_batches_are_left_padded_whatever_the_tokenizer_says_and_its_setting_is_restored(tiny_llava_dir):
    """Greedy generation of a batch needs left padding; many tokenizers pad right by default."""
    from transformers import LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    processor.tokenizer.padding_side = "right"
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    records = list(SyntheticVQA("test", size=6, seed=0))
    mask = model_inputs(processor, records, model)["attention_mask"]
    assert bool((mask[:, 0] == 0).any()) and bool((mask[:, -1] == 1).all())  # padded on the left only
    assert processor.tokenizer.padding_side == "right"
