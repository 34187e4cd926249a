"""research/toy/sequences.py: the rows training builds are the layout the LLaVA processor gives."""

import torch

from qapframe.data.synthetic import SyntheticVQA
from qapframe.eval.evaluation import answer_records
from qapframe.toy import load_toy
from research.toy.sequences import prompt_ids, sequence_embeds, vision_tokens


def test_embedding_rows_reproduce_the_processor_path():
    """Greedy answers from `sequence_embeds` rows (what training and token dropping use) equal the answers
    `qapframe run` gets through the processor, when nothing is dropped."""
    torch.set_num_threads(1)
    model, processor = load_toy()
    records = list(SyntheticVQA("test", size=12, seed=0))
    with torch.no_grad():
        vision = vision_tokens(model, processor, [r.image for r in records])  # [B, N, D]
        rows = [(*prompt_ids(processor.tokenizer, r)[:1], tokens, prompt_ids(processor.tokenizer, r)[1])
                for r, tokens in zip(records, vision)]
        embeds, mask = sequence_embeds(model, rows, pad_left=True)
        generated = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False)
    ours = [t.strip() for t in processor.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert ours == answer_records(model, processor, records, batch_size=12, max_new_tokens=6)
