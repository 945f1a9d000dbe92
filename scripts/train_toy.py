"""Train the ``toy-ioi`` built-in model and write it to ``src/atpstar/zoo_data/toy-ioi``.

The model: GPT-NeoX family (parallel residual, rotary on a quarter of each head as in Pythia),
2 layers, d_model 128, 4 heads, d_mlp 512, float32, with a word-level tokenizer whose tokens carry
their leading space (``encode(" Mary")`` is one id, as in BPE tokenizers), so ``atpstar.tasks.ioi``
builds the same prompts for it as for SmolLM2.

The data: IOI sentences from ``atpstar.tasks.ioi`` (its templates, places, objects and names, ABBA
and BABA orders, each sentence ending with the indirect object). Each batch uses one template, so
no padding is needed. Loss: next-token cross-entropy at every position plus, with weight 1, the
cross-entropy of the final (indirect object) token, the only one the task measures.

Held-out check: accuracy (IO logit > subject logit) and mean logit difference on
``atpstar.tasks.ioi(tokenizer, 1000, seed=12345)`` and per template, with seed-disjoint prompts.

Run (about 2 min on one CPU core; seeded and single-threaded, so the result is reproducible on one
machine; more threads change float summation order slightly):

    PYTHONPATH=src python scripts/train_toy.py [--steps 1200] [--threads 1] [--out src/atpstar/zoo_data/toy-ioi]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from atpstar.tasks.ioi import NAMES, OBJECTS, PLACES, TEMPLATES, ioi

if TYPE_CHECKING:
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
# A word with its leading space, or one punctuation mark: the same pieces a BPE tokenizer makes here.
PIECE = r" ?[A-Za-z]+|[^\sA-Za-z]"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "atpstar" / "zoo_data" / "toy-ioi"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every piece the IOI templates, names, places and objects can produce."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces: set[str] = set()
    for text in TEMPLATES:
        pieces.update(re.findall(PIECE, re.sub(r"\{\w+\}", "", text)))
    for word in NAMES + PLACES + OBJECTS:
        pieces.update({" " + word, word})
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(pieces))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    backend.decoder = decoders.Fuse()  # pieces carry their own spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> GPTNeoXForCausalLM:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
        use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPTNeoXForCausalLM(config)


def sample_batch(tokenizer, rng: random.Random, batch: int) -> torch.Tensor:
    """[batch, T] token ids of full IOI sentences (prompt + indirect object) sharing one template."""
    template = rng.choice(TEMPLATES)
    rows = []
    for _ in range(batch):
        io, subject = rng.sample(NAMES, 2)
        first, second = (io, subject) if rng.random() < 0.5 else (subject, io)
        text = template.format(A=first, B=second, S2=subject, PLACE=rng.choice(PLACES), OBJECT=rng.choice(OBJECTS))
        rows.append(tokenizer.encode(text + " " + io, add_special_tokens=False))
    return torch.tensor(rows)


def train(steps: int, batch: int, seed: int) -> tuple[GPTNeoXForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.time()
    for step in range(steps):
        tokens = sample_batch(tokenizer, rng, batch)
        logits = model(tokens).logits[:, :-1]  # [B, T-1, V]
        targets = tokens[:, 1:]
        lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        io_loss = torch.nn.functional.cross_entropy(logits[:, -1], targets[:, -1])
        loss = lm_loss + io_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d}  lm {lm_loss.item():.3f}  io {io_loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    return model.eval(), tokenizer


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, n: int = 1000, seed: int = 12345) -> dict[str, float]:
    """Held-out accuracy (IO logit above subject logit) and mean logit difference, overall and per template."""
    report: dict[str, float] = {}
    for name, template in [("mixed", None)] + [(f"template_{i}", i) for i in range(len(TEMPLATES))]:
        pairs = ioi(tokenizer, n if template is None else n // 4, seed=seed, template=template)
        logits = model(pairs.clean).logits[:, -1]
        diff = pairs.evaluate_metric(logits, torch.arange(pairs.n_pairs))
        report[f"{name}_accuracy"] = round((diff > 0).float().mean().item(), 4)
        report[f"{name}_logit_diff"] = round(diff.mean().item(), 3)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = train(args.steps, args.batch, args.seed)
    report = evaluate(model, tokenizer)
    print(json.dumps(report, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    meta = {"steps": args.steps, "batch": args.batch, "seed": args.seed, "threads": args.threads, "held_out": report}
    (args.out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
