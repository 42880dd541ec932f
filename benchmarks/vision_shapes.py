"""Does the image path carry the answer? A task only looking can solve, on a tiny random
vision-language model, measured on held-out images.

    python benchmarks/vision_shapes.py --workdir shapes [--arch llava] [--steps 1500] [--stage2-steps 1000]
    python benchmarks/vision_shapes.py --workdir shapes --throughput   # image rows vs text rows

Images of one coloured shape (4 colours x 3 shapes: square, triangle, bar x 4 positions, each drawn
with a random size and offset, so no two images are alike) are drawn with Pillow; each image gets three questions with
one-word answers (its colour, its shape, where it is). Training images and held-out images are
drawn apart (different seeds; a held-out image equal to a training one is redrawn).

A random language model reads nothing (its near-constant outputs give a projector no gradient to
follow), and MiniGPT-4's is a pretrained chat model; so the tiny model's language model first
learns the task from words: ``method=full train_projector=false`` on the same questions with the
answer written in the prompt ("A red circle at the left. What colour is the shape?"), no image.
From that run, each the command a user types (``chattune train`` / ``chattune export``, logs in
--workdir): 1. ``method=freeze`` (only the projector trains: MiniGPT-4's first stage); 2. that run
exported (``chattune export``) and trained further with ``method=lora`` (LoRA on the language model,
the projector trained beside it: MiniGPT-4's second stage); and, for comparison, ``method=lora``
straight from the language model of words (no first stage). Each is asked the held-out questions (greedy) with the real image and
with a blank white image in its place: accuracy with the image must be high, without it near
chance (1/4 colour, 1/3 shape, 1/4 position), so the answer is proven to come through the image.

``--throughput``: tokens/s and peak memory of training steps on rows with images against text-only
rows of the same token length (the image tokens replaced by text), each arm a process of its own,
interleaved (A, B, A, B; best of each).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
SHAPES = ("square", "triangle", "bar")
POSITIONS = ("left", "right", "top", "bottom")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
             "position": "Where is the shape?"}
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}
SIDE = 64


def draw(colour: str, shape: str, position: str, rng: random.Random):
    """One image: a white square canvas with the shape near the middle of one side."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    size = rng.randint(18, 26)
    centre = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}[position]
    cx, cy = centre[0] + rng.randint(-3, 3), centre[1] + rng.randint(-3, 3)
    box = [cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2]
    fill = COLOURS[colour]
    if shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "bar":  # as wide as the square, a third of its height
        pen.rectangle([box[0], cy - size // 6, box[2], cy + size // 6], fill=fill)
    else:
        pen.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def make_images(folder: Path, count: int, seed: int, avoid: set[bytes]) -> list[dict]:
    """``count`` images (cycling through every colour x shape x position), saved in ``folder``,
    none equal to an image in ``avoid`` (whose bytes it extends)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    items = []
    for i in range(count):
        colour, shape, position = kinds[i % len(kinds)]
        while True:
            image = draw(colour, shape, position, rng)
            if image.tobytes() not in avoid:
                break
        avoid.add(image.tobytes())
        path = folder / f"{i}.png"
        image.save(path)
        items.append({"path": str(path), "colour": colour, "shape": shape, "position": position})
    return items


def rows_of(items: list[dict]) -> list[dict]:
    """LLaMA-Factory rows: one question per row, the image in front of it."""
    return [{"messages": [{"role": "user", "content": "<image>" + QUESTIONS[kind]},
                          {"role": "assistant", "content": item[kind]}], "images": [item["path"]]}
            for item in items for kind in QUESTIONS]


def described_rows(items: list[dict]) -> list[dict]:
    """Text-only rows that say what the image would show: the language model learns to answer
    these questions from words before any image (MiniGPT-4's language model is pretrained)."""
    return [{"messages": [{"role": "user", "content": f"A {item['colour']} {item['shape']} at the {item['position']}. "
                                                      + QUESTIONS[kind]},
                          {"role": "assistant", "content": item[kind]}]}
            for item in items for kind in QUESTIONS]


def chattune(*args: str, log: Path) -> None:
    """Run a chattune command (output appended to ``log``); stop on failure."""
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"$ chattune {' '.join(args)}\n")
        handle.flush()
        done = subprocess.run([sys.executable, "-m", "chattune.cli", *args], stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"chattune {args[0]} failed; see {log}")


def accuracy(run_dir: Path, items: list[dict], blank: bool) -> dict[str, float]:
    """Held-out accuracy per question kind (greedy answers, exact word), with each item's image
    or (``blank``) a white image of the same size in its place."""
    from PIL import Image

    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run

    run = load_run(str(run_dir))
    white = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    conversations, truth = [], []
    for item in items:
        for kind, question in QUESTIONS.items():
            conversations.append([{"role": "user", "content": "<image>" + question,
                                   "images": [white if blank else item["path"]]}])
            truth.append((kind, item[kind]))
    answers = []
    for start in range(0, len(conversations), 64):
        answers += generate(run, conversations[start:start + 64], max_new_tokens=8, temperature=0.0)
    right = {kind: 0 for kind in QUESTIONS}
    total = {kind: 0 for kind in QUESTIONS}
    for (kind, expected), got in zip(truth, answers, strict=True):
        total[kind] += 1
        right[kind] += got.strip().lower() == expected
    return {kind: right[kind] / total[kind] for kind in QUESTIONS}


def merged(workdir: Path, run: Path) -> Path:
    """``run`` exported into one model folder (``chattune export``), to start the next stage from."""
    out = workdir / f"merged-{run.name}"
    if not (out / "config.json").is_file():
        chattune("export", str(run), "--out", str(out), log=workdir / f"export-{run.name}.log")
    return out


def train_arm(workdir: Path, model: Path, method: str, steps: int, extra: list[str],
              data: str = "train.json", name: str | None = None) -> tuple[Path, float]:
    name = name or method
    out = workdir / f"run-{name}"
    if not (out / "chattune.json").is_file():
        chattune("train", f"model_name_or_path={model}", f"train_files=[{workdir / data}]",
                           f"method={method}", f"output_dir={out}", f"max_steps={steps}",
                           "per_device_train_batch_size=16", "logging_steps=50", "save_steps=100000",
                           "eval_fraction=0", "lr_scheduler_type=cosine", "warmup_steps=30",
                           *extra, log=workdir / f"train-{name}.log")
    return out, training_seconds(out)


def training_seconds(run: Path) -> float:
    """The run's training time as its metrics.jsonl records it (the Trainer's ``train_runtime``)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return max((row["train_runtime"] for row in rows if "train_runtime" in row), default=0.0)


def shapes(args) -> None:
    from chattune.tiny_vlm import build_tiny_vlm

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / f"tiny-{args.arch}"
    if not (model / "config.json").is_file():
        build_tiny_vlm(model, args.arch, hidden_size=128, num_layers=2, vision_hidden_size=64, seed=args.seed)
    seen: set[bytes] = set()
    train_items = make_images(workdir / "train-images", args.train_images, args.seed, seen)
    held_items = make_images(workdir / "held-out-images", args.held_out_images, args.seed + 1, seen)
    (workdir / "train.json").write_text(json.dumps(rows_of(train_items)), encoding="utf-8")
    (workdir / "described.json").write_text(json.dumps(described_rows(train_items)), encoding="utf-8")
    # the random language model first learns to read the answers from words (no image)
    reader, reader_seconds = train_arm(workdir, model, "full", args.text_steps,
                                       ["learning_rate=2e-3", "train_projector=false"], "described.json", "text")
    stage1, stage1_seconds = train_arm(workdir, reader, "freeze", args.steps, ["learning_rate=3e-3"])
    stage2, stage2_seconds = train_arm(workdir, merged(workdir, stage1), "lora", args.stage2_steps,
                                       ["learning_rate=2e-4", "lora_rank=32"], name="lora-after-freeze")
    alone, alone_seconds = train_arm(workdir, reader, "lora", args.steps, ["learning_rate=5e-4", "lora_rank=32"])
    arms = [("1. freeze", "projector only (MiniGPT-4's first stage)", stage1, stage1_seconds, args.steps),
            ("2. lora, from 1", "LoRA (language model) + projector, from stage 1 exported", stage2, stage2_seconds,
             args.stage2_steps),
            ("lora alone", "LoRA + projector, from the language model of words", alone, alone_seconds, args.steps)]
    lines = [f"tiny {args.arch}: {len(train_items)} training images ({3 * len(train_items)} rows), "
             f"{len(held_items)} held-out images ({3 * len(held_items)} questions), steps of 16 rows; "
             f"the language model first trained {args.text_steps} steps (full, {reader_seconds:.0f} s) on the "
             "same questions with the answer in words",
             "", "| run | trains | steps | train s | question | with the image | blank image | chance |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for name, trains, run, seconds, steps in arms:
        seeing = accuracy(run, held_items, blank=False)
        blind = accuracy(run, held_items, blank=True)
        for kind in QUESTIONS:
            lines.append(f"| {name} | {trains} | {steps} | {seconds:.0f} | {kind} | {seeing[kind]:.1%} | "
                         f"{blind[kind]:.1%} | {CHANCE[kind]:.1%} |")
        mean_seeing = sum(seeing.values()) / 3
        mean_blind = sum(blind.values()) / 3
        lines.append(f"| {name} | | | | **all** | **{mean_seeing:.1%}** | **{mean_blind:.1%}** | "
                     f"{sum(CHANCE.values()) / 3:.1%} |")
    print("\n".join(lines))
    (workdir / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput_arm(args) -> None:
    """One arm in this process (``--throughput-arm images|text``): the tiny model trained as
    ``method=full`` does (vision tower frozen) on 16 rows a step for ``--throughput-steps`` steps
    after 2 warm-up steps; prints ``{"tokens_per_s", "peak_rss_mib"}`` as JSON."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from chattune.data.images import splice_images
    from chattune.training.collate import ImageCollator, PadCollator
    from chattune.vision.processor import load_vision, vision_parts

    torch.manual_seed(0)
    workdir = Path(args.workdir)
    model_dir = workdir / f"tiny-{args.arch}"
    vision = load_vision(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    tower = vision_parts(model).tower
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(tower + "."))
    model.train()
    items = make_images(workdir / "throughput-images", 16, args.seed + 7, set())
    expansion = vision.expansion(Image.open(items[0]["path"]).convert("RGB"))
    text = vision.tokenizer("What colour is the shape? " * 2, add_special_tokens=False)["input_ids"]
    answer = vision.tokenizer(" red", add_special_tokens=False)["input_ids"]
    ids = [vision.image_token_id] + text + answer
    labels = [-100] * (1 + len(text)) + answer
    image_ids, image_labels = splice_images(ids, labels, vision.image_token_id, [expansion])
    filler = vision.tokenizer("the shape " * len(expansion), add_special_tokens=False)["input_ids"][:len(expansion)]
    if args.throughput_arm == "images":
        rows = [{"input_ids": image_ids, "labels": image_labels, "images": [item["path"]]} for item in items]
        collate = ImageCollator(vision.tokenizer.pad_token_id, vision)
    else:  # the same length, the image tokens replaced by text
        rows = [{"input_ids": filler + text + answer, "labels": [-100] * (len(filler) + len(text)) + answer}
                for _ in items]
        collate = PadCollator(vision.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def steps(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            loss = model(**collate(rows)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return count * len(rows) * len(image_ids) / (time.perf_counter() - start)

    steps(2)
    print(json.dumps({"tokens_per_s": steps(args.throughput_steps), "peak_rss_mib": peak_rss_mib(),
                      "tokens_per_row": len(image_ids), "image_tokens": len(expansion), "rows": len(rows)}))


def throughput(args) -> None:
    """Training steps on image rows vs text rows of the same token length: each arm a process of
    its own (its peak RSS its own), interleaved A, B, A, B; the best of each."""
    from chattune.tiny_vlm import build_tiny_vlm

    workdir = Path(args.workdir)
    model_dir = workdir / f"tiny-{args.arch}"
    if not (model_dir / "config.json").is_file():
        build_tiny_vlm(model_dir, args.arch, hidden_size=128, num_layers=2, vision_hidden_size=64, seed=args.seed)
    best: dict[str, dict] = {}
    for _ in range(args.throughput_rounds):
        for arm in ("text", "images"):
            done = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--arch", args.arch,
                                   "--throughput-arm", arm, "--throughput-steps", str(args.throughput_steps)],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if arm not in best or result["tokens_per_s"] > best[arm]["tokens_per_s"]:
                best[arm] = {**result, "peak_rss_mib": max(result["peak_rss_mib"],
                                                           best.get(arm, {}).get("peak_rss_mib", 0))}
    shape = best["images"]
    print(f"tiny {args.arch} (vision tower frozen, the rest trained with AdamW), {shape['rows']} rows of "
          f"{shape['tokens_per_row']} tokens a step ({shape['image_tokens']} of them image tokens in the image "
          f"rows); each arm a process, best of {args.throughput_rounds} interleaved rounds of "
          f"{args.throughput_steps} steps\n")
    print("| rows | tokens/s (with reading the images, pixels and the vision tower) | peak RSS MiB of the process |")
    print("|---|---:|---:|")
    for name in ("text", "images"):
        print(f"| {name} | {best[name]['tokens_per_s']:,.0f} | {best[name]['peak_rss_mib']:,.0f} |")
    print(f"\nimage rows run at {best['images']['tokens_per_s'] / best['text']['tokens_per_s']:.2f}x the tokens/s "
          "of text rows")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="shapes")
    parser.add_argument("--arch", default="llava", choices=["llava", "idefics3"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--text-steps", type=int, default=400)
    parser.add_argument("--stage2-steps", type=int, default=1000)
    parser.add_argument("--train-images", type=int, default=960)
    parser.add_argument("--held-out-images", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--throughput-steps", type=int, default=20)
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--throughput-arm", choices=["images", "text"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.throughput_arm:
        throughput_arm(args)
    elif args.throughput:
        throughput(args)
    else:
        shapes(args)


if __name__ == "__main__":
    main()
