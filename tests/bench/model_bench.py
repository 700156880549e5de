"""Forward+backward throughput of the language model: our SDPA attention vs explicit-math attention.

    OMP_NUM_THREADS=2 python tests/bench/model_bench.py                 # seed size, fp32 and bf16 autocast
    python tests/bench/model_bench.py --repeats 3 --seq 256 --dtypes fp32

Both variants run on the same model and weights (only the attention core is swapped), interleaved within
every repeat (alternating which goes first) so machine noise hits both alike. The table gives, per
variant, the median and best step time over the repeats and the speed relative to explicit attention
(> 1 = faster): of the medians, of the best times, and the median of per-repeat paired ratios.
A script, not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from vlm.model.config import MiniMindConfig
from vlm.model.language_model import Attention, MiniMindForCausalLM

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExplicitAttention(Attention):
    """softmax(QK^T / sqrt(d) + mask) V written out, as MiniMind's non-flash path does (softmax in fp32)."""

    def attend(self, q, k, v, attn_mask):
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
        if attn_mask is None and q.shape[2] > 1:
            causal = torch.full(scores.shape[-2:], float("-inf"), device=q.device).triu(1)
            scores = scores + causal
        elif attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        probs = F.dropout(probs, self.dropout, self.training)
        return probs @ v


def use_attention(model: MiniMindForCausalLM, cls: type[Attention]) -> None:
    """Swap the attention core of every layer in place; parameters and buffers stay the same objects."""
    for layer in model.model.layers:
        layer.self_attn.__class__ = cls


def step_seconds(model, ids, autocast_dtype, device) -> tuple[float, float]:
    """One forward+backward; returns (seconds, loss)."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(ids, labels=ids)
        loss = out.loss + out.aux_loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.item()


def run(args) -> list[tuple]:
    device = torch.device(args.device)
    config = MiniMindConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, vocab_size=args.vocab, use_moe=args.moe
    )
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).to(device).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    variants = {"sdpa (ours)": Attention, "explicit": ExplicitAttention}
    times = {(d, v): [] for d in args.dtypes for v in variants}
    losses = {}
    for repeat in range(args.warmup + args.repeats):
        # Alternate which variant goes first, so neither always runs right after a dtype switch.
        order = list(variants.items()) if repeat % 2 == 0 else list(variants.items())[::-1]
        for dtype_name in args.dtypes:
            for name, cls in order:
                use_attention(model, cls)
                seconds, loss = step_seconds(model, ids, DTYPES[dtype_name], device)
                losses[(dtype_name, name)] = loss
                if repeat >= args.warmup:
                    times[(dtype_name, name)].append(seconds)
                if args.verbose:
                    print(f"repeat {repeat} {dtype_name} {name}: {seconds * 1e3:.1f} ms", flush=True)
    use_attention(model, Attention)
    tokens = args.batch * args.seq
    rows = []
    for dtype_name in args.dtypes:
        base = times[(dtype_name, "explicit")]
        for name in variants:
            mine = times[(dtype_name, name)]
            # Ratios > 1: faster than explicit. "paired" compares the two runs of the same repeat, which ran
            # back to back, so it is the least disturbed by other load on a shared machine.
            paired = statistics.median(b / m for b, m in zip(base, mine))
            ratios = (statistics.median(base) / statistics.median(mine), min(base) / min(mine), paired)
            rows.append(
                (
                    dtype_name,
                    name,
                    statistics.median(mine),
                    min(mine),
                    tokens,
                    ratios,
                    losses[(dtype_name, name)],
                )
            )
    return rows


def print_table(rows, args) -> None:
    print(
        f"model: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}, moe {args.moe}; "
        f"batch {args.batch} x seq {args.seq}; device {args.device}, threads {torch.get_num_threads()}; "
        f"{args.repeats} repeats after {args.warmup} warm-up; speed = explicit time / this time"
    )
    header = f"{'dtype':<6} {'attention':<12} {'median ms':>10} {'best ms':>9} {'tok/s med':>10} {'tok/s best':>10}"
    print(header + f" {'speed med':>9} {'best':>6} {'paired':>7} {'loss':>8}")
    for dtype_name, name, median, best, tokens, (r_med, r_best, r_pair), loss in rows:
        print(
            f"{dtype_name:<6} {name:<12} {median * 1e3:>10.1f} {best * 1e3:>9.1f} {tokens / median:>10.0f} "
            f"{tokens / best:>10.0f} {r_med:>8.2f}x {r_best:>5.2f}x {r_pair:>6.2f}x {loss:>8.4f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=640)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--moe", action="store_true", help="use the MoE feed-forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"], help="from fp32,bf16,fp16"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verbose", action="store_true", help="print every timed step")
    args = parser.parse_args(argv)
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    print_table(run(args), args)


if __name__ == "__main__":
    main()
