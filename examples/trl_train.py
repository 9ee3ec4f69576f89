"""GRPO with NTHR token advantages in TRL.

    python examples/trl_train.py --model Qwen/Qwen2.5-Math-1.5B      # a real run (GPU, model download)
    python examples/trl_train.py --tiny --steps 2                    # a CPU smoke run, nothing downloaded

The reward must be binary (1.0 correct, 0.0 wrong). The tiny run uses a randomly initialised two-layer Qwen2
with a character-level tokenizer built locally and a parity reward, only to show the moving parts.
"""
from __future__ import annotations

import argparse


def tiny_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (ids: 0 pad, 1 eos, 2 unk, then 23 characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in "abcdefghij +=0123456789":
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(seed: int = 0):
    """A randomly initialised 2-layer Qwen2 over :func:`tiny_tokenizer`'s 26 ids."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=26, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    return Qwen2ForCausalLM(cfg)


def parity_reward(completions, **kwargs):
    """1.0 when the character codes of the completion sum to an odd number (a stand-in for correctness)."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a Hugging Face model id or path")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny random model")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--output-dir", default="nthr_results/trl_train")
    ap.add_argument("--beta", type=float, default=1.0, help="NTHR threshold scale")
    ap.add_argument("--eta", default="2|0.5-p|", help="NTHR eta rule or a constant in [0, 1]")
    a = ap.parse_args(argv)
    if a.tiny == (a.model is not None):
        ap.error("pass exactly one of --model and --tiny")

    from datasets import Dataset
    from trl import GRPOConfig

    from nthr_kernels.integrations.trl import NTHRGRPOTrainer

    eta = a.eta
    try:
        eta = float(eta)
    except ValueError:
        pass
    cfg = dict(output_dir=a.output_dir, max_steps=a.steps, num_generations=4, per_device_train_batch_size=8,
               temperature=1.0, report_to="none", logging_steps=1, save_strategy="no")
    if a.tiny:
        cfg.update(use_cpu=True, max_completion_length=12)
        model, tok = tiny_model(), tiny_tokenizer()
        data = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "ab", "9 9"]})
    else:
        from transformers import AutoTokenizer

        model, tok = a.model, AutoTokenizer.from_pretrained(a.model)
        data = Dataset.from_dict({"prompt": ["What is 17 * 23? Answer with a number."] * 8})
    trainer = NTHRGRPOTrainer(model=model, reward_funcs=parity_reward, args=GRPOConfig(**cfg),
                              train_dataset=data, processing_class=tok, nthr_beta=a.beta, nthr_eta=eta)
    trainer.train()
    res = trainer.nthr_last
    print(f"hidden states from: {trainer.nthr_capture}; last batch: {int(res.selected.sum())} negative tokens "
          f"selected; active groups {res.active.tolist()}; eta {res.eta.tolist()}")


if __name__ == "__main__":
    main()
