"""End-to-end training: the stock SentenceTransformerTrainer vs ``st_fast.SentenceTransformerTrainer``.

Both trainers train the same randomly initialized BERT (``minilm-l6``: hidden 384, 6 layers, 12 heads, intermediate
1536; ``bert-base``: 768, 12, 12, 3072; ``tiny`` for ``--smoke``: 32, 1, 2, 64; vocabulary 30522, mean pooling)
on the same synthetic pairs, with the same seed, loss and ``batch_sampler="no_duplicates"`` batches, ``bf16`` on a
GPU. Nothing comes from the network or a model package: the weights are a seeded random init saved once per
architecture to a temporary folder (so that both trainers load identical weights), the tokenizer is BERT's WordPiece
on a synthetic vocabulary (``[PAD] [UNK] [CLS] [SEP] [MASK]`` and 30517 letter words, each one token), and the
texts are seeded sentences of those words (anchors 4-12 words, positives 10-48, truncated at
``--training-max-seq-length``, 32 by default), with 5 % of the rows repeating a text of another row (an anchor, a
positive, or another row's anchor as positive) so that ``no_duplicates`` has deferrals to make.

Cases, smallest first (models by size; per model CMNRL by batch, then MNRL): CMNRL
(``CachedMultipleNegativesRankingLoss``, ``mini_batch_size`` 128 on a GPU, B/4 elsewhere) at each
``--training-batch-sizes`` and MNRL at the largest of ``--training-mnrl-batch-sizes`` that fits both trainers (tried
in descending order: a candidate whose run runs out of memory, stock or st_fast, is dropped for the next one). Each
run trains ``--training-warmup-steps`` untimed steps (compilation, cuBLAS set-up, st_fast's one-time sampler keys,
the first prefetch) and then ``--training-steps`` timed ones. Under ``--budget-s`` a case (and each MNRL candidate)
is admitted by a cost (:func:`case_cost`: the encoder's token-FLOPs layers·(4h²+2h·i)·B·passes·steps plus a fixed
set-up part) and reported as skipped when predicted not to fit.

Columns (per trainer row; times are means over the timed steps, in ms per step):

* ``step_ms``: from the end of the previous step to the end of this one (``on_step_end`` callbacks): the logging of
  the previous step, the batch (sampler, dataset rows, collation and tokenization, host-to-device copy), forward,
  backward, gradient clipping, optimizer, scheduler and ``zero_grad``. ``samples_per_s`` = batch / ``step_ms``;
  ``speedup_vs_stock`` = stock's ``step_ms`` / this row's.
* ``loss_stage_ms``: MNRL: the loss's ``compute_loss_from_embeddings`` (forward) plus its backward, from the moment
  the loss's gradient enters it to the moment every embedding column has its gradient (an identity
  ``autograd.Function`` on the loss and on each embedding column records these two points). CMNRL: the GradCache
  loss stage ``calculate_loss(..., with_backward=True)``, which includes its own backward to the cached embeddings.
  Both are wrapped on the object the trainer calls (``trainer.loss``: for st_fast the fused view, whose
  ``calculate_loss`` reads a per-instance override through its ``fused_loss_stage`` descriptor).
* ``encoder_ms``: ``trainer.compute_loss`` plus ``trainer.accelerator.backward``, minus ``loss_stage_ms``: every
  encoder forward and backward (for CMNRL the no-grad pass, the replayed pass with gradients, RandContext and the
  mini-batch slicing).
* ``sampler_ms``: time inside the batch sampler's ``next`` (the sampler the trainer's ``get_batch_sampler`` builds,
  timed in place; accelerate fetches one batch ahead, so a step's share is the next batch's). CPU work while the GPU
  is idle (the loss logging at each step end synchronizes).
* ``collate_ms``: time inside the data collator (tokenization of every column).
* ``optimizer_ms``: ``optimizer.step()``, between the ``on_pre_optimizer_step`` and ``on_optimizer_step`` callbacks.
* ``other_ms``: ``step_ms`` minus the parts above (never below 0): logging, dataset row fetch, host-to-device copy,
  gradient clipping, scheduler, ``zero_grad``, callbacks.

On a GPU every point is a CUDA event on the current stream (read after a final synchronize); the sampler and the
collator, CPU work, are timed with ``perf_counter``. On a CPU everything is ``perf_counter``. ``peak_mb`` is
``torch.cuda.max_memory_allocated`` over the run (reset before ``train()``; weights, gradients and optimizer states
included); empty on a CPU. ``max_step_loss_rel_diff`` is the largest ``|st_fast - stock| / |stock|`` over all steps'
logged losses (bf16 autocast on a GPU, so the agreement there is bf16's, not float32's as on a CPU).

Time of ``python -m benchmarks training --gpu`` on one H200 (estimated, not measured yet: FLOP counts at ~350
TFLOP/s for the encoders, ~8 us per eager op, since CMNRL's 128-row mini-batches of ~14-32 tokens keep the GPU
waiting on kernel launches, single-threaded tokenization of ~0.4 s and a stock sampler step of ~0.4 s per 16384
pairs, ~2-3 s set-up per run): imports, CUDA, the data and the model folders ~15 s; MiniLM CMNRL 1024 / 4096 /
16384 ~15 / 7 / 18 s (the first case carries the compilation), MNRL 16384 ~13 s; bert-base CMNRL 1024 / 4096
~14 / 11 s, MNRL ~20 s (16384 and maybe 8192 run out of memory at once, then 8192 or 4096): about 100 s, ~130 s if
everything is 30 % slower. bert-base CMNRL at 16384 (8 steps of ~2-3 s: ~26 s more, ~125 s in all) is therefore
left out of the default grid and added by ``--training-large`` (a skipped row says so). Under ``--budget-s 75`` (the
GPU check's 100 s step) the predicted cases are the MiniLM ones and bert-base CMNRL 1024.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.common import Clock, bench_device, budget_of, cpu_threads, free_memory, is_oom, progress

TITLE = "End-to-end training steps: stock vs st_fast SentenceTransformerTrainer (synthetic pairs, no_duplicates)"

VOCAB_SIZE = 30522
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DUPLICATE_FRACTION = 0.05
ANCHOR_WORDS = (4, 12)  # inclusive ranges of words per text
POSITIVE_WORDS = (10, 48)
HOST_CLOCK = Clock("cpu")  # the sampler and the collator: CPU work, timed on the host whatever the device
BREAKDOWN = ("encoder_ms", "loss_stage_ms", "sampler_ms", "collate_ms", "optimizer_ms", "other_ms")


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int

    @property
    def flops_per_token(self) -> int:
        """Forward multiply-adds ·2 of the encoder layers per token (attention scores left out at 32 tokens)."""
        return 2 * self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)


ARCHS = {
    "tiny": Arch("tiny", 32, 1, 2, 64),
    "minilm-l6": Arch("minilm-l6", 384, 6, 12, 1536),
    "bert-base": Arch("bert-base", 768, 12, 12, 3072),
}
# (model, loss, batch) left out of the default --gpu grid to keep the run near 150 s; --training-large adds them.
LARGE_CASES = {("bert-base", "cmnrl", 16384)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--training-models", nargs="+", default=None, choices=list(ARCHS),
                       help="random-init models (default minilm-l6; smoke tiny; gpu minilm-l6 bert-base)")  # fmt: skip
    group.add_argument("--training-losses", nargs="+", default=["cmnrl", "mnrl"], choices=["cmnrl", "mnrl"])
    group.add_argument("--training-batch-sizes", type=int, nargs="+", default=None,
                       help="CMNRL batches (default 32; smoke 16; gpu 1024 4096 16384)")  # fmt: skip
    group.add_argument("--training-mnrl-batch-sizes", type=int, nargs="+", default=None,
                       help="MNRL candidate batches, the largest that fits both trainers is run "
                            "(default 32; smoke 16; gpu 16384 8192 4096 2048 1024)")  # fmt: skip
    group.add_argument("--training-mini-batch-size", type=int, default=None,
                       help="CMNRL mini_batch_size (default 128 with --gpu, else batch/4)")  # fmt: skip
    group.add_argument("--training-steps", type=int, default=None, help="timed steps per run (default 3; smoke 2)")
    group.add_argument("--training-warmup-steps", type=int, default=1, help="untimed steps before the timed ones")
    group.add_argument("--training-max-seq-length", type=int, default=32)
    group.add_argument("--training-large", action="store_true",
                       help="also run what the default --gpu grid leaves out (bert-base CMNRL at 16384)")  # fmt: skip
    group.add_argument("--training-seed", type=int, default=42)
    group.add_argument("--training-threads", type=int, default=None, help="torch CPU threads for this part")
    group.add_argument("--training-device", default=None, help="torch device (default: cuda with --gpu, else cpu)")


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic tokenizer, model folders and data (no network, no model package)
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_words(count: int = VOCAB_SIZE - len(SPECIAL_TOKENS)) -> list[str]:
    """``count`` distinct lowercase letter words ("baa", "bab", ...): base-26 numbers from 26², so at least 3
    letters; each is a whole WordPiece token of the synthetic vocabulary."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = []
    for index in range(count):
        value, word = index + 26 * 26, ""
        while value:
            value, digit = divmod(value, 26)
            word = letters[digit] + word
        words.append(word)
    return words


def write_vocab(folder: str) -> str:
    """Write the synthetic WordPiece ``vocab.txt`` (special tokens first, then :func:`synthetic_words`)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join([*SPECIAL_TOKENS, *synthetic_words()]) + "\n")
    return path


def write_model_folder(root: str, arch: Arch, seed: int) -> str:
    """A Hugging Face folder under ``root`` with ``arch``'s BertConfig, seeded random weights and the synthetic
    vocabulary (BERT's tokenizer reads ``vocab.txt``). Both trainers load from it, so they start identical."""
    from transformers import BertConfig, BertModel

    folder = os.path.join(root, arch.name)
    config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, intermediate_size=arch.intermediate, max_position_embeddings=512,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(folder)
    write_vocab(folder)
    return folder


def synthetic_pairs(rows: int, *, seed: int, duplicate_fraction: float = DUPLICATE_FRACTION) -> dict[str, list[str]]:
    """``rows`` (anchor, positive) pairs of synthetic words, deterministic in ``seed``.

    Every text is first distinct (anchors and positives together); then ``duplicates = round(rows·duplicate_fraction)``
    rows (the targets) each take one text of another row (its source; sources are distinct and never targets): by
    turns the source's anchor as anchor, its positive as positive, and its anchor as positive (no_duplicates compares
    across columns). So the data holds exactly ``2·rows - duplicates`` distinct texts, and ``2·duplicates`` rows
    share a text with another row."""
    rng = np.random.default_rng(seed)
    words = synthetic_words()
    seen: set[str] = set()

    def sentences(count: int, lengths: tuple[int, int]) -> list[str]:
        out: list[str] = []
        while len(out) < count:
            sizes = rng.integers(lengths[0], lengths[1] + 1, size=count - len(out)).tolist()
            ids = rng.integers(0, len(words), size=sum(sizes)).tolist()
            start = 0
            for size in sizes:
                text = " ".join(map(words.__getitem__, ids[start : start + size]))
                start += size
                if text not in seen:  # a repeat (vanishingly rare) is redrawn
                    seen.add(text)
                    out.append(text)
        return out

    anchors = sentences(rows, ANCHOR_WORDS)
    positives = sentences(rows, POSITIVE_WORDS)
    duplicates = min(round(rows * duplicate_fraction), rows // 2)
    if duplicates:
        order = rng.permutation(rows)
        targets, sources = order[:duplicates], order[duplicates:]
        picks = rng.choice(sources, size=duplicates, replace=False)
        for turn, (target, source) in enumerate(zip(targets.tolist(), picks.tolist(), strict=True)):
            if turn % 3 == 0:
                anchors[target] = anchors[source]
            elif turn % 3 == 1:
                positives[target] = positives[source]
            else:
                positives[target] = anchors[source]
    return {"anchor": anchors, "positive": positives}


def load_model(folder: str, arch: Arch, device: torch.device, max_seq_length: int):
    """The SentenceTransformer (Transformer + mean Pooling) of a :func:`write_model_folder` folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(folder, max_seq_length=max_seq_length)
    return SentenceTransformer(modules=[transformer, Pooling(arch.hidden, pooling_mode="mean")], device=str(device))


# ---------------------------------------------------------------------------------------------------------------------
# Instrumentation: where a step's time goes
# ---------------------------------------------------------------------------------------------------------------------


class _Probe(torch.autograd.Function):
    """Identity whose backward calls ``callback`` when the gradient reaches it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, callback: Callable[[], None]) -> torch.Tensor:
        ctx.callback = callback
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.callback()
        return grad, None


class StepTimer:
    """Collects, per optimizer step, spans between two :class:`Clock` marks and CPU milliseconds, and the logged step
    losses. A step's period runs from the previous ``on_step_end`` (or ``on_train_begin``) to its own."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.begin: Any = None
        self.steps: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.calls: dict[str, int] = defaultdict(int)
        self._current = self._new_step()
        self._optimizer_start: Any = None

    @staticmethod
    def _new_step() -> dict[str, Any]:
        return {"spans": defaultdict(list), "cpu_ms": defaultdict(float), "end": None}

    def span(self, name: str, start: Any, end: Any) -> None:
        self.calls[name] += 1
        self._current["spans"][name].append((start, end))

    def cpu_ms(self, name: str, ms: float) -> None:
        self.calls[name] += 1
        self._current["cpu_ms"][name] += ms

    def timed(self, name: str, function: Callable) -> Callable:
        """``function`` with each call recorded as a span ``name``."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self.clock.mark()
            try:
                return function(*args, **kwargs)
            finally:
                self.span(name, start, self.clock.mark())

        return wrapper

    def callback(self):
        """A TrainerCallback feeding this timer."""
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.begin = timer.clock.mark()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                timer._optimizer_start = timer.clock.mark()

            def on_optimizer_step(self, args, state, control, **kwargs):
                if timer._optimizer_start is not None:
                    timer.span("optimizer", timer._optimizer_start, timer.clock.mark())
                    timer._optimizer_start = None

            def on_step_end(self, args, state, control, **kwargs):
                timer._current["end"] = timer.clock.mark()
                timer.steps.append(timer._current)
                timer._current = timer._new_step()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        return _Callback()

    def step_breakdowns(self, skip: int) -> list[dict[str, float | None]]:
        """Per step after the first ``skip``: ``step_ms`` and :data:`BREAKDOWN` (None for a part whose hook never
        fired). Call after the run has synchronized."""
        rows = []
        for index in range(skip, len(self.steps)):
            step = self.steps[index]
            start = self.steps[index - 1]["end"] if index else self.begin
            spans = {name: sum(self.clock.ms(a, b) for a, b in pairs) for name, pairs in step["spans"].items()}
            part: dict[str, float | None] = {}
            loss_stage = spans.get("loss_stage", 0.0)
            part["loss_stage_ms"] = loss_stage if self.calls["loss_stage"] else None
            if self.calls["compute_loss"] and self.calls["backward"]:
                encoder = spans.get("compute_loss", 0.0) + spans.get("backward", 0.0) - loss_stage
                part["encoder_ms"] = max(encoder, 0.0)
            else:
                part["encoder_ms"] = None
            part["sampler_ms"] = step["cpu_ms"].get("sampler", 0.0) if self.calls["sampler"] else None
            part["collate_ms"] = step["cpu_ms"].get("collate", 0.0) if self.calls["collate"] else None
            part["optimizer_ms"] = spans.get("optimizer", 0.0) if self.calls["optimizer"] else None
            step_ms = self.clock.ms(start, step["end"])
            known = sum(value for value in part.values() if value is not None)
            rows.append(
                {"step_ms": step_ms, **{k: part[k] for k in BREAKDOWN[:-1]}, "other_ms": max(step_ms - known, 0.0)}
            )
        return rows


def _timed_subclass(cls: type, method: str, timer_attribute: str, part: str) -> type:
    """A subclass of ``cls`` whose ``method`` (``__iter__``: each ``next``; ``__call__``: each call) adds its CPU time
    to ``getattr(self, timer_attribute)`` as ``part``. Swapped in as the instance's class, so ``isinstance`` checks and
    attributes are unchanged."""
    if method == "__iter__":

        def __iter__(self):  # noqa: N807
            iterator = cls.__iter__(self)
            timer = getattr(self, timer_attribute)
            while True:
                start = HOST_CLOCK.mark()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                finally:
                    timer.cpu_ms(part, HOST_CLOCK.ms(start, HOST_CLOCK.mark()))
                yield batch

        namespace = {"__iter__": __iter__}
    else:

        def __call__(self, *args, **kwargs):  # noqa: N807
            start = HOST_CLOCK.mark()
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                getattr(self, timer_attribute).cpu_ms(part, HOST_CLOCK.ms(start, HOST_CLOCK.mark()))

        namespace = {"__call__": __call__}
    return type(cls.__name__, (cls,), {**namespace, "__qualname__": cls.__qualname__, "__module__": cls.__module__})


def _time_instance(obj: Any, method: str, timer: StepTimer, part: str) -> None:
    try:
        obj._bench_timer = timer
        obj.__class__ = _timed_subclass(type(obj), method, "_bench_timer", part)
    except (TypeError, AttributeError):  # a class that refuses: the part stays unmeasured (reported empty)
        pass


def instrument(trainer: Any, timer: StepTimer) -> None:
    """Wrap, on this trainer instance only, the points :class:`StepTimer` reads (see the module docstring)."""
    trainer.compute_loss = timer.timed("compute_loss", trainer.compute_loss)
    trainer.accelerator.backward = timer.timed("backward", trainer.accelerator.backward)
    get_batch_sampler = trainer.get_batch_sampler

    def timed_get_batch_sampler(*args: Any, **kwargs: Any) -> Any:
        sampler = get_batch_sampler(*args, **kwargs)
        if sampler is not None:
            _time_instance(sampler, "__iter__", timer, "sampler")
        return sampler

    trainer.get_batch_sampler = timed_get_batch_sampler
    if getattr(trainer, "data_collator", None) is not None:
        _time_instance(trainer.data_collator, "__call__", timer, "collate")

    loss = trainer.loss  # the object compute_loss calls: for st_fast the fused view sharing the stock __dict__
    if hasattr(loss, "calculate_loss"):  # GradCache: the loss stage runs its own backward
        # On the fused class ``calculate_loss`` is a data descriptor that stores this into the shared __dict__ and
        # returns it as it is (it has no ``fn``); it calls the fused bound method fetched here.
        loss.calculate_loss = timer.timed("loss_stage", loss.calculate_loss)
    elif hasattr(loss, "compute_loss_from_embeddings"):
        loss.compute_loss_from_embeddings = _probed_loss_stage(loss.compute_loss_from_embeddings, timer)


def _probed_loss_stage(function: Callable, timer: StepTimer) -> Callable:
    """``compute_loss_from_embeddings`` timed forward (a span) and backward (from the loss's gradient entering to
    the last embedding column's gradient leaving, through :class:`_Probe`)."""

    def compute_loss_from_embeddings(embeddings: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        start = timer.clock.mark()
        backward: dict[str, Any] = {"start": None, "pending": 0}

        def output_reached() -> None:
            backward["start"] = timer.clock.mark()

        def input_reached() -> None:
            backward["pending"] -= 1
            if backward["pending"] == 0 and backward["start"] is not None:
                timer.span("loss_stage", backward["start"], timer.clock.mark())

        probed = []
        for embedding in embeddings:
            if torch.is_grad_enabled() and embedding.requires_grad:
                backward["pending"] += 1
                embedding = _Probe.apply(embedding, input_reached)
            probed.append(embedding)
        result = function(probed, *args, **kwargs)
        if backward["pending"] and result.requires_grad:
            result = _Probe.apply(result, output_reached)
        timer.span("loss_stage", start, timer.clock.mark())
        return result

    return compute_loss_from_embeddings


# ---------------------------------------------------------------------------------------------------------------------
# Runs and cases
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    device: torch.device
    dataset: Any
    folders: dict[str, str]
    max_seq_length: int
    warmup: int
    steps: int
    mini_batch_size: int | None
    seed: int


def train_once(flavour: str, arch: Arch, loss_name: str, batch: int, setup: Setup) -> dict[str, Any]:
    """One training run (``flavour`` "stock" or "st_fast") of warm-up + timed steps; raises on out of memory."""
    from sentence_transformers import SentenceTransformerTrainer as StockTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    from st_fast import SentenceTransformerTrainer as FastTrainer

    device = setup.device
    model = load_model(setup.folders[arch.name], arch, device, setup.max_seq_length)
    if loss_name == "cmnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size(setup, batch))
    else:
        loss = losses.MultipleNegativesRankingLoss(model)
    clock = Clock(device)
    timer = StepTimer(clock)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=output_dir, max_steps=setup.warmup + setup.steps, per_device_train_batch_size=batch,
            learning_rate=5e-5, seed=setup.seed, logging_steps=1, save_strategy="no", report_to="none",
            batch_sampler="no_duplicates", disable_tqdm=True, use_cpu=device.type == "cpu",
            bf16=device.type == "cuda", dataloader_pin_memory=False,
        )  # fmt: skip
        trainer_class = StockTrainer if flavour == "stock" else FastTrainer
        trainer = trainer_class(
            model=model, args=training_args, train_dataset=setup.dataset, loss=loss, callbacks=[timer.callback()]
        )
        instrument(trainer, timer)
        if clock.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        if clock.cuda:
            torch.cuda.synchronize()
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if clock.cuda else None
    return {
        "losses": timer.losses, "steps": timer.step_breakdowns(setup.warmup), "peak_mb": peak_mb,
        "calls": dict(timer.calls), "total_steps": len(timer.steps),
    }  # fmt: skip


def mini_batch_size(setup: Setup, batch: int) -> int:
    return setup.mini_batch_size or max(1, batch // 4)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Means over the timed steps of ``step_ms`` and :data:`BREAKDOWN` (None stays None)."""
    steps = result["steps"]
    out: dict[str, Any] = {"step_ms": sum(s["step_ms"] for s in steps) / len(steps) if steps else None}
    for key in BREAKDOWN:
        values = [s[key] for s in steps]
        out[key] = None if not values or any(v is None for v in values) else sum(values) / len(values)
    return out


def relative_differences(reference: Sequence[float], other: Sequence[float]) -> list[float]:
    return [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference, other, strict=True)]


def compare_rows(arch: Arch, loss_name: str, batch: int, setup: Setup, stock: dict, fast: dict, note: str = ""):
    """The stock and st_fast rows of one case."""
    stock_summary, fast_summary = summarize(stock), summarize(fast)
    differences = relative_differences(stock["losses"], fast["losses"])
    rows = []
    for flavour, result, summary in (("stock", stock, stock_summary), ("st_fast", fast, fast_summary)):
        step_ms = summary["step_ms"]
        rows.append({
            "model": arch.name, "loss": loss_name, "batch": batch,
            "mini_batch": mini_batch_size(setup, batch) if loss_name == "cmnrl" else None,
            "trainer": flavour, "steps": len(result["steps"]),
            "samples_per_s": batch / (step_ms / 1e3) if step_ms else None,
            "speedup_vs_stock": stock_summary["step_ms"] / step_ms if step_ms and stock_summary["step_ms"] else None,
            "step_ms": step_ms, **{key: summary[key] for key in BREAKDOWN}, "peak_mb": result["peak_mb"],
            "max_step_loss_rel_diff": max(differences, default=0.0) if flavour == "st_fast" else None,
            "note": note, "device": setup.device.type,
        })  # fmt: skip
    return rows


def skipped_row(arch: Arch, loss_name: str, batch: int | None, note: str, device: torch.device) -> dict[str, Any]:
    return {"model": arch.name, "loss": loss_name, "batch": batch, "trainer": None, "note": note,
            "device": device.type}  # fmt: skip


def largest_fitting_batch(
    candidates: Iterable[int],
    attempt: Callable[[int], Any],
    *,
    admit: Callable[[int], bool] = lambda batch: True,
    on_oom: Callable[[], None] = lambda: None,
) -> tuple[int | None, Any, list[str]]:
    """Try ``attempt(batch)`` for each candidate, largest first, until one returns without running out of memory.

    A candidate ``admit`` refuses is passed over (noted "over budget"); one whose attempt raises an out-of-memory
    error (``torch.cuda.OutOfMemoryError`` or a RuntimeError saying so) is noted "OOM", ``on_oom()`` is called once
    the exception is released, and the next candidate is tried. Other errors propagate. Returns ``(batch, result,
    notes)``; ``(None, None, notes)`` when none fits."""
    notes: list[str] = []
    for batch in sorted(set(candidates), reverse=True):
        if not admit(batch):
            notes.append(f"{batch}: over budget")
            continue
        out_of_memory = False
        try:
            return batch, attempt(batch), notes
        except Exception as exc:
            if not is_oom(exc):
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block: the traceback's frames (and their tensors) are gone
            notes.append(f"{batch}: OOM")
            on_oom()
    return None, None, notes


def _config(args: argparse.Namespace) -> dict[str, Any]:
    smoke, gpu = args.smoke, args.gpu
    models = args.training_models or (["tiny"] if smoke else ["minilm-l6", "bert-base"] if gpu else ["minilm-l6"])
    batches = args.training_batch_sizes or ([16] if smoke else [1024, 4096, 16384] if gpu else [32])
    mnrl = args.training_mnrl_batch_sizes or ([16] if smoke else [16384, 8192, 4096, 2048, 1024] if gpu else [32])
    return {
        "models": sorted((ARCHS[name] for name in dict.fromkeys(models)), key=lambda a: a.flops_per_token),
        "batches": sorted(set(batches)), "mnrl_batches": sorted(set(mnrl), reverse=True),
        "steps": args.training_steps or (2 if smoke else 3),
        "warmup": max(args.training_warmup_steps, 1),  # a timed step needs the previous step's end
        "mini_batch_size": args.training_mini_batch_size or (128 if gpu else None),
        "large": args.training_large or not gpu or bool(args.training_batch_sizes),
    }  # fmt: skip


def case_cost(arch: Arch, loss_name: str, batch: int, steps: int = 4) -> float:
    """A case's predicted size for ``--budget-s`` (only ratios matter): the encoder's token-FLOPs over the run's
    ``steps`` (passes per step: 4 for CMNRL, no-grad forward + forward + backward; 3 for MNRL) plus a fixed part
    for the two runs' set-up (model load, trainer, first fetch), set to 10 MiniLM CMNRL cases at B 1024: on an H200
    a case's set-up (~4 s) is about ten times that case's encoder work."""
    passes = 4 if loss_name == "cmnrl" else 3
    setup = 10 * ARCHS["minilm-l6"].flops_per_token * 1024 * 4 * 4
    return float(setup + arch.flops_per_token * batch * passes * steps)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    with cpu_threads(args.training_threads):
        return _run(args)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset

    device = bench_device(args, "training_device")
    config = _config(args)
    budget = budget_of(args)
    largest = max([*config["batches"], *config["mnrl_batches"]])
    rows_needed = math.ceil((config["warmup"] + config["steps"] + 2) * largest * 1.1)
    dataset = Dataset.from_dict(synthetic_pairs(rows_needed, seed=args.training_seed))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        setup = Setup(
            device=device, dataset=dataset, folders={}, max_seq_length=args.training_max_seq_length,
            warmup=config["warmup"], steps=config["steps"], mini_batch_size=config["mini_batch_size"],
            seed=args.training_seed,
        )  # fmt: skip

        def both(arch: Arch, loss_name: str, batch: int) -> tuple[dict, dict]:
            if arch.name not in setup.folders:
                setup.folders[arch.name] = write_model_folder(root, arch, args.training_seed)
            stock = train_once("stock", arch, loss_name, batch, setup)
            free_memory(device)
            fast = train_once("st_fast", arch, loss_name, batch, setup)
            free_memory(device)
            return stock, fast

        cases = [(arch, loss_name) for arch in config["models"] for loss_name in ("cmnrl", "mnrl")
                 if loss_name in args.training_losses]  # fmt: skip
        for arch, loss_name in progress(cases, desc="training"):
            if loss_name == "cmnrl":
                for batch in config["batches"]:
                    rows += _cmnrl_case(arch, batch, setup, budget, config, both)
            else:
                rows += _mnrl_case(arch, setup, budget, config, both)
    return rows


def _cmnrl_case(arch: Arch, batch: int, setup: Setup, budget, config: dict, both: Callable) -> list[dict[str, Any]]:
    if (arch.name, "cmnrl", batch) in LARGE_CASES and not config["large"]:
        return [skipped_row(arch, "cmnrl", batch, "skipped: not in the default --gpu grid (--training-large)",
                            setup.device)]  # fmt: skip
    cost = case_cost(arch, "cmnrl", batch, setup.warmup + setup.steps)
    if not budget.admit(cost):
        return [skipped_row(arch, "cmnrl", batch, "skipped: predicted not to fit --budget-s", setup.device)]
    fitted, result, _ = largest_fitting_batch(
        [batch], lambda b: both(arch, "cmnrl", b), on_oom=lambda: free_memory(setup.device)
    )
    if fitted is None:
        return [skipped_row(arch, "cmnrl", batch, "out of memory", setup.device)]
    budget.done(cost)
    return compare_rows(arch, "cmnrl", batch, setup, *result)


def _mnrl_case(arch: Arch, setup: Setup, budget, config: dict, both: Callable) -> list[dict[str, Any]]:
    candidates, steps = config["mnrl_batches"], setup.warmup + setup.steps
    fitted, result, notes = largest_fitting_batch(
        candidates, lambda b: both(arch, "mnrl", b), admit=lambda b: budget.admit(case_cost(arch, "mnrl", b, steps)),
        on_oom=lambda: free_memory(setup.device),
    )  # fmt: skip
    tried = f"largest fitting of {candidates}" + (f" ({'; '.join(notes)})" if notes else "")
    if fitted is None:
        return [skipped_row(arch, "mnrl", None, f"skipped: none of {candidates} fits ({'; '.join(notes)})",
                            setup.device)]  # fmt: skip
    budget.done(case_cost(arch, "mnrl", fitted, steps))
    return compare_rows(arch, "mnrl", fitted, setup, *result, note=tried if len(candidates) > 1 else "")
