"""Small local stand-ins for smoke tests: a random tiny Llama with its own tokenizer, a generated text and tiny
lm-eval tasks over local jsonl files. Nothing here touches a hub; everything is built in milliseconds to seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the of and to in he that shall his unto for i they be is him not them it with all thou was which my me said "
    "but ye their have will thee from as are when this out were by upon man king god lord house land people "
    "children came went day son hand before hath made israel against also even so then there into"
).split()


def standin_text(n_words: int = 20000, seed: int = 0) -> str:
    """Generated English-like text (sentences of common words), the tests' stand-in for the real corpus."""
    rng = random.Random(seed)
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) > rng.randint(6, 18):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    return " ".join(out)


def make_tokenizer(directory: Path, text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``text``, saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(directory)
    return fast


def make_tiny_model(directory: str | Path, seed: int = 0, layers: int = 4) -> Path:
    """Save a random tiny LlamaForCausalLM (fp32, sdpa) and its tokenizer to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory, standin_text())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def write_tiny_tasks(directory: str | Path, text: str | None = None, n: int = 4) -> Path:
    """Tiny local lm-eval tasks (``tiny_gen``: generate_until, ``tiny_mc``: multiple choice, ``tiny_ppl``:
    loglikelihood_rolling) over jsonl files, each context about 100-150 words; returns the include dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = (text or standin_text()).split()
    rng = random.Random(1)
    gen, mc, ppl = [], [], []
    for i in range(n):
        start = rng.randrange(0, len(words) - 400)
        ctx = " ".join(words[start : start + 100 + 10 * i])
        gen.append({"context": ctx, "answer": words[start + 100 + 10 * i]})
        mc.append({"context": ctx, "choices": [" " + words[start + 101 + 10 * i], " zebra"], "label": 0})
        ppl.append({"text": " ".join(words[start : start + 300])})
    for name, rows in (("gen", gen), ("mc", mc), ("ppl", ppl)):
        with open(directory / f"tiny_{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def data(name: str) -> str:
        return (
            "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {directory / f'tiny_{name}.jsonl'}\ntest_split: test\n"
        )

    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data("gen") + 'output_type: generate_until\ndoc_to_text: "{{context}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data("mc") + 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )
    (directory / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + data("ppl") + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n'
        "  - metric: bits_per_byte\n"
    )
    return directory
