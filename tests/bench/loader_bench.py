"""Loader benchmark: samples/s of `vlm.data.pipeline.TrainLoader` against a naive MiniMind-V-style loader.

    OMP_NUM_THREADS=2 python tests/bench/loader_bench.py [--records 512] [--repeats 3] [--batch-size 16]

Both read the same synthetic pretrain corpus (`data_tools.synth`, pictures 64-320 px), at CLIP ViT-B/16
geometry (224 px, 196 image tokens, max_seq_len 640): ours from shards made by `data_tools.shard`, the
naive one from the JSONL and image folder, opening each image with PIL, running `CLIPImageProcessor` (its
PIL backend, `CLIPImageProcessorPil`, what transformers uses without torchvision), rendering the chat
template with `apply_chat_template`, tokenizing, and padding every row to max_seq_len, as MiniMind-V's
VLMDataset does. Ours ships uint8 pixels and the trainer normalises them on its device; here that
`PixelNormalizer` runs in the main process on the CPU (one torch thread) and is timed with ours, so both
sides end with the same float32 pixels. Configurations run interleaved, `--repeats` times each; the table shows medians of whole
passes over the corpus (worker start-up included), as wall-clock samples/s and as samples per CPU-second
(this process plus its workers; robust to other load on a shared machine). Then the share of non-padding tokens per batch for
naive padding (to max_seq_len), dynamic padding and packing, measured on the batches our loader makes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPImageProcessorPil

from data_tools import shard, synth
from vlm.data.image import ImagePreprocessConfig, PixelNormalizer
from vlm.data.pipeline import LoaderSettings, TrainLoader
from vlm.data.stages import SampleFormat
from vlm.formats.constants import CLIP_MEAN, CLIP_STD
from vlm.tokenizer import DEFAULT_PLACEHOLDER, image_placeholder_id, load_tokenizer

IMAGE_TOKEN_LEN = 196  # ViT-B/16 at 224 px: 14 x 14 patches
MAX_SEQ_LEN = 640


def write_clip_config(folder: Path) -> Path:
    """A preprocessor_config.json as openai/clip-vit-base-patch16 ships it (224 px, CLIP mean/std)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
              "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
              "image_std": list(CLIP_STD), "image_processor_type": "CLIPImageProcessor", "resample": 3,
              "rescale_factor": 1 / 255, "size": {"shortest_edge": 224}}
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return folder


class NaiveDataset(Dataset):
    """MiniMind-V's VLMDataset in outline: everything from the JSONL and the image folder, per sample."""

    def __init__(self, jsonl: Path, images: Path, tokenizer, processor, max_length: int):
        self.records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        self.images, self.tokenizer, self.processor, self.max_length = images, tokenizer, processor, max_length
        self.placeholder = DEFAULT_PLACEHOLDER * IMAGE_TOKEN_LEN
        self.assistant = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self.im_end = tokenizer("<|im_end|>", add_special_tokens=False).input_ids

    def __len__(self) -> int:
        return len(self.records)

    def loss_mask(self, ids: list[int]) -> list[int]:
        """1 from each assistant header to its <|im_end|> (a scan over the ids, as MiniMind does)."""
        mask, i, a = [0] * len(ids), 0, len(self.assistant)
        while i < len(ids):
            if ids[i : i + a] == self.assistant:
                start = end = i + a
                while end < len(ids) and ids[end : end + len(self.im_end)] != self.im_end:
                    end += 1
                for j in range(start, min(end + len(self.im_end), len(ids))):
                    mask[j] = 1
                i = end
            i += 1
        return mask

    def __getitem__(self, index: int):
        record = self.records[index]
        messages = [{"role": m["role"], "content": m["content"].replace("<image>", self.placeholder)}
                    for m in record["conversations"]]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False)
        ids = self.tokenizer(prompt).input_ids[: self.max_length]
        ids += [self.tokenizer.pad_token_id] * (self.max_length - len(ids))
        mask = self.loss_mask(ids)
        pixels = []
        for name in record["image"].split(","):
            image = Image.open(self.images / name.strip())
            if image.mode in ("RGBA", "LA", "P", "L"):
                image = image.convert("RGB")
            pixels.append(self.processor(images=image, return_tensors="pt")["pixel_values"][0])
        return torch.tensor(ids[:-1]), torch.tensor(ids[1:]), torch.tensor(mask[1:]), torch.stack(pixels)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_pass(make_batches, normalize: PixelNormalizer | None = None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, samples) of one full pass, DataLoader start-up and worker exit included.

    `normalize`, for our loader's uint8 pixels, runs on each batch as the trainer would, here on the CPU with
    one torch thread: split over two threads on a busy 2-core machine the same (16, 1, 3, 224, 224) batch was
    measured at 24 ms of CPU instead of 0.45 ms (threads spinning on each other), which is no cost of the
    loader and which a GPU trainer never pays.
    """
    wall, cpu, samples = time.perf_counter(), cpu_seconds(), 0
    for batch in make_batches():
        if normalize is not None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            normalize(batch["pixel_values"])
            torch.set_num_threads(threads)
        samples += int(batch["num_samples"]) if isinstance(batch, dict) else batch[0].shape[0]
    return time.perf_counter() - wall, cpu_seconds() - cpu, samples


def token_shares(shards: Path, tokenizer, image_config, image_token_id: int, batch_size: int) -> dict[str, float]:
    """Mean share of non-padding tokens per batch, for each batching mode of our loader."""
    shares = {}
    for mode in ("max_len", "dynamic", "pack"):
        fmt = SampleFormat(tokenizer, image_config, image_token_id, IMAGE_TOKEN_LEN, MAX_SEQ_LEN, batching=mode)
        loader = TrainLoader([str(shards)], fmt, LoaderSettings(batch_size=batch_size, num_workers=2))
        per_batch = [int(b["num_tokens"]) / b["input_ids"].numel() for b in loader]
        shares[mode] = statistics.mean(per_batch)
    return shares


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/bench/loader_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=512, help="synthetic pretrain records")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (medians reported)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as folder:
        run(Path(folder), args)
    return 0


def run(tmp: Path, args: argparse.Namespace) -> None:
    """Build the corpus and shards in `tmp`, then time and print."""
    with contextlib.redirect_stdout(io.StringIO()):
        synth.write_corpus(tmp / "corpus", pretrain=args.records, sft=0, eval=0, progress=False)
        shard.main(["--jsonl", str(tmp / "corpus/pretrain_data.jsonl"), "--images", str(tmp / "corpus/pretrain_images"),
                    "--out", str(tmp / "shards"), "--prefix", "pretrain", "--samples-per-shard", "128"])
    clip = write_clip_config(tmp / "clip")
    tokenizer = load_tokenizer()
    image_token_id = image_placeholder_id(tokenizer)
    image_config = ImagePreprocessConfig.from_folder(clip)
    naive = NaiveDataset(tmp / "corpus/pretrain_data.jsonl", tmp / "corpus/pretrain_images", tokenizer,
                         CLIPImageProcessorPil.from_pretrained(str(clip)), MAX_SEQ_LEN)

    def ours(workers):
        fmt = SampleFormat(tokenizer, image_config, image_token_id, IMAGE_TOKEN_LEN, MAX_SEQ_LEN)
        return lambda: TrainLoader([str(tmp / "shards")], fmt,
                                   LoaderSettings(batch_size=args.batch_size, num_workers=workers))

    def baseline(workers):
        return lambda: DataLoader(naive, batch_size=args.batch_size, shuffle=True, num_workers=workers)

    configs = {(name, w): make(w) for w in (0, 2) for name, make in (("naive", baseline), ("ours", ours))}
    rates: dict[tuple[str, int], list[float]] = {key: [] for key in configs}
    per_cpu: dict[tuple[str, int], list[float]] = {key: [] for key in configs}
    normalize = PixelNormalizer(image_config)
    for _ in range(args.repeats):
        for key, make in configs.items():
            wall, cpu, samples = timed_pass(make, normalize if key[0] == "ours" else None)
            rates[key].append(samples / wall)
            per_cpu[key].append(samples / cpu)
    print(f"{args.records} pretrain records, batch {args.batch_size}, 224 px, max_seq_len {MAX_SEQ_LEN}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print("samples/s is wall-clock throughput; samples/CPU-s divides by the CPU time of the process and its "
          "workers, which other load on a shared machine does not distort")
    print(f"{'workers':>8} {'naive samples/s':>16} {'ours samples/s':>15} {'speed-up':>9}"
          f" {'naive samples/CPU-s':>20} {'ours samples/CPU-s':>19} {'ratio':>6}")
    for w in (0, 2):
        slow, fast = statistics.median(rates[("naive", w)]), statistics.median(rates[("ours", w)])
        slow_cpu, fast_cpu = statistics.median(per_cpu[("naive", w)]), statistics.median(per_cpu[("ours", w)])
        print(f"{w:>8} {slow:>16.1f} {fast:>15.1f} {fast / slow:>8.2f}x"
              f" {slow_cpu:>20.1f} {fast_cpu:>19.1f} {fast_cpu / slow_cpu:>5.2f}x")
    shares = token_shares(tmp / "shards", tokenizer, image_config, image_token_id, args.batch_size)
    print("non-padding share of tokens per batch (mean over batches):")
    for mode, label in (("max_len", "naive (pad to max_seq_len)"), ("dynamic", "dynamic (longest, x8)"),
                        ("pack", "packed (rows of max_seq_len)")):
        print(f"  {label:<30} {shares[mode]:.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
