"""``squint eval``: a dataset through the real stack for a grid of compressors and budgets.

Each configuration (a compressor with its parameters, under a visual-token budget or none) asks
every question of the dataset through the public ``GenerateStream`` API of a running stack,
greedy (temperature 0), up to ``concurrency`` requests at a time; ``--baseline`` adds Hugging
Face's ``LlavaForConditionalGeneration`` in this process with all its visual tokens, one
question at a time. Configurations run one after another, so each row's timings are taken under
the same load; the stack's caches warm as the run goes (a picture's CLIP features are shared by
every compressor), so the times are those of a serving stack, not of cold requests — ``squint
bench`` measures those.

``none`` is the uncompressed reference: it runs once, without a budget (it has no smaller
setting). Every other compressor runs once per ``--budget`` (or once without one when none is
given). ``retained`` is a row's accuracy over the ``none`` row's (the baseline's without one).

A request that fails (a budget the compressor cannot meet, a picture the server refuses) is
recorded with its error, scores 0 and is counted in the row's ``errors``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.datasets import Dataset
from evaluation.questions import Question, read_media
from evaluation.scoring import score, summarize

FORMAT = "squint-eval/1"
NONE = "none"
BASELINE = "baseline"


@dataclass(frozen=True)
class Configuration:
    """One row of the grid: a compressor with its parameters under a budget (0: none)."""

    compressor: str
    params: Mapping[str, Any] = field(default_factory=dict)
    budget: int = 0

    @property
    def label(self) -> str:
        if self.compressor == BASELINE:
            return "baseline (HF)"
        params = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        name = f"{self.compressor}:{params}" if params else self.compressor
        return f"{name} @{self.budget}" if self.budget else name


def parse_compressor(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:k=v,...]``: values are JSON where they parse as JSON (numbers, booleans), else text."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"--compressor takes NAME[:k=v,...], got {text!r}")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--compressor {text!r}: parameter {item!r} is not k=v")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return name, params


def grid(compressors: Sequence[str], budgets: Sequence[int], baseline: bool) -> list[Configuration]:
    """The configurations in run order: the baseline, ``none`` once, the rest once per budget."""
    configurations = [Configuration(BASELINE)] if baseline else []
    for text in compressors:
        name, params = parse_compressor(text)
        for budget in [0] if name == NONE or not budgets else budgets:
            configuration = Configuration(name, params, budget)
            if configuration not in configurations:
                configurations.append(configuration)
    return configurations


@dataclass(frozen=True)
class Answer:
    """One question answered under one configuration."""

    configuration: str
    id: str
    answer: str
    score: float
    visual_tokens: int = 0
    tokens_before: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class Row:
    """A configuration's results: what eval.json's ``rows`` hold."""

    label: str
    compressor: str
    params: dict[str, Any]
    budget: int
    n: int
    accuracy: float
    accuracy_by_type: dict[str, float]
    accuracy_by_category: dict[str, float]
    pope: dict[str, float] | None
    retained: float | None
    visual_tokens_mean: float
    ttft_ms_median: float
    e2e_ms_median: float
    errors: int
    first_error: str = ""


# --------------------------------------------------------------------------- answerers


def _media_request(question: Question, configuration: Configuration, max_new_tokens: int):
    from squint.generate.v1 import generate_pb2 as pb
    from squint.wire import compressor_spec

    chunks = [pb.Chunk(image=pb.Image(data=read_media(image))) for image in question.images]
    if question.video is not None:
        chunks.append(pb.Chunk(video=pb.Video(data=read_media(question.video))))
    chunks.append(pb.Chunk(text=question.question))
    return pb.GenerateRequest(
        chunks=chunks,
        visual_token_budget=configuration.budget,
        compressor=compressor_spec(configuration.compressor, dict(configuration.params)),
        sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
        request_id=f"eval-{question.id}",
    )


class StackAnswerer:
    """Asks one running orchestrator, streaming (so TTFT is the first token's arrival)."""

    def __init__(self, address: str, max_new_tokens: int, timeout_s: float = 600.0) -> None:
        import grpc

        from squint.generate.v1 import generate_pb2_grpc
        from squint.rpc import channel_options

        self._grpc = grpc
        self._channel = grpc.insecure_channel(address, options=channel_options(256 * 1024 * 1024))
        self._stub = generate_pb2_grpc.GenerationServiceStub(self._channel)
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        self._grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def __call__(self, question: Question, configuration: Configuration) -> Answer:
        request = _media_request(question, configuration, self.max_new_tokens)
        started = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        usage = None
        try:
            for message in self._stub.GenerateStream(request, timeout=self.timeout_s):
                if message.token_ids and first is None:
                    first = time.perf_counter()
                text.append(message.text)
                if message.HasField("usage"):
                    usage = message.usage
        except self._grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            return Answer(configuration.label, question.id, "", 0.0, error=error)
        finished = time.perf_counter()
        answer = "".join(text).strip()
        return Answer(
            configuration.label,
            question.id,
            answer,
            score(question, answer),
            visual_tokens=usage.visual_tokens if usage else 0,
            tokens_before=sum(m.tokens_before for m in usage.media) if usage else 0,
            ttft_ms=((first or finished) - started) * 1000,
            e2e_ms=(finished - started) * 1000,
        )

    def close(self) -> None:
        self._channel.close()


class BaselineAnswerer:
    """``LlavaForConditionalGeneration`` in this process, every visual token; a video becomes its
    frames sampled as the orchestrator samples them by default (8, evenly)."""

    def __init__(self, llava_dir: Path, max_new_tokens: int, device: str = "cpu") -> None:
        from bench.baseline import Baseline

        self._model = Baseline(llava_dir, device, "", max_new_tokens)

    def __call__(self, question: Question, configuration: Configuration) -> Answer:
        from PIL import Image

        pictures = [Image.open(io.BytesIO(read_media(image))) for image in question.images]
        if question.video is not None:
            from orchestrator.video import FrameSampling, VideoLimits, sample_frames

            frames = sample_frames(read_media(question.video), VideoLimits(), FrameSampling(), "video")
            pictures += [frame.image for frame in frames]
        try:
            token_ids, sample = self._model.answer(pictures, question.question)
        except (ValueError, RuntimeError) as exc:  # a picture the processor refuses
            return Answer(configuration.label, question.id, "", 0.0, error=f"{type(exc).__name__}: {exc}")
        answer = self._model.text(token_ids).strip()
        return Answer(
            configuration.label,
            question.id,
            answer,
            score(question, answer),
            visual_tokens=sample.visual_tokens,
            tokens_before=sample.tokens_before,
            ttft_ms=sample.ttft_s * 1000,
            e2e_ms=sample.e2e_s * 1000,
        )

    def close(self) -> None:
        self._model.close()


# --------------------------------------------------------------------------- the run

Answerer = Callable[[Question, Configuration], Answer]


def answer_all(
    questions: Sequence[Question],
    configuration: Configuration,
    answerer: Answerer,
    concurrency: int,
    on_answer: Callable[[Answer], None] = lambda answer: None,
) -> list[Answer]:
    """Every question under one configuration, ``concurrency`` at a time; answers in question order."""
    if concurrency <= 1:
        answers = []
        for question in questions:
            answers.append(answerer(question, configuration))
            on_answer(answers[-1])
        return answers
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(answerer, question, configuration) for question in questions]
        answers = []
        for future in futures:
            answers.append(future.result())
            on_answer(answers[-1])
        return answers


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize_row(configuration: Configuration, questions: Sequence[Question], answers: Sequence[Answer]) -> Row:
    summary = summarize([(q, a.answer, a.score) for q, a in zip(questions, answers)])
    served = [a for a in answers if not a.error]
    errors = [a.error for a in answers if a.error]
    return Row(
        label=configuration.label,
        compressor=configuration.compressor,
        params=dict(configuration.params),
        budget=configuration.budget,
        n=summary["n"],
        accuracy=summary["accuracy"],
        accuracy_by_type=summary["accuracy_by_type"],
        accuracy_by_category=summary["accuracy_by_category"],
        pope=summary.get("pope"),
        retained=None,
        visual_tokens_mean=statistics.fmean(a.visual_tokens for a in served) if served else 0.0,
        ttft_ms_median=_median([a.ttft_ms for a in served]),
        e2e_ms_median=_median([a.e2e_ms for a in served]),
        errors=len(errors),
        first_error=errors[0] if errors else "",
    )


def with_retained(rows: Sequence[Row]) -> list[Row]:
    """``retained`` = accuracy over the uncompressed row's (``none``, else the baseline)."""
    reference = next((r for r in rows if r.compressor == NONE), None) or next(
        (r for r in rows if r.compressor == BASELINE), None
    )
    if reference is None or reference.accuracy <= 0:
        return list(rows)
    return [dataclasses.replace(r, retained=r.accuracy / reference.accuracy) for r in rows]


@dataclass
class Report:
    settings: dict[str, Any]
    dataset: dict[str, Any]
    rows: list[Row]
    answers: list[Answer]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "settings": self.settings,
            "dataset": self.dataset,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }


def run_eval(
    dataset: Dataset,
    configurations: Sequence[Configuration],
    answerers: Mapping[str, Answerer],
    *,
    concurrency: int,
    settings: Mapping[str, Any],
    progress=None,
) -> Report:
    """Every configuration over the dataset; ``answerers`` maps "stack" and "baseline" to their answerer."""
    questions = dataset.questions
    rows, answers = [], []
    started = time.perf_counter()
    for configuration in configurations:
        is_baseline = configuration.compressor == BASELINE
        answerer = answerers[BASELINE if is_baseline else "stack"]
        label = configuration.label

        def step(answer: Answer, label: str = label) -> None:
            if progress is not None:
                progress.step(label)

        if progress is not None:
            progress.show(label)
        row_answers = answer_all(questions, configuration, answerer, 1 if is_baseline else concurrency, step)
        rows.append(summarize_row(configuration, questions, row_answers))
        answers += row_answers
    duration = time.perf_counter() - started
    return Report(
        settings={**settings, "concurrency": concurrency, "duration_s": round(duration, 1)},
        dataset={
            "name": dataset.name,
            "n": len(questions),
            "problems": [{"source": p.source, "message": p.message} for p in dataset.problems],
        },
        rows=with_retained(rows),
        answers=answers,
    )


# --------------------------------------------------------------------------- outputs


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _aligned(lines: list[list[str]]) -> list[str]:
    """Fixed-width columns (the first left-aligned, the rest right), a rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def table(report: Report) -> str:
    """The rows as a fixed-width table, accuracy by type beside the headline figures, then by
    category when the dataset has categories (lmms-eval prints its per-category scores too)."""
    types = sorted({t for r in report.rows for t in r.accuracy_by_type})
    header = ["configuration", "n", "acc %", "retained %", "visual", "TTFT ms", "e2e ms", "errors"]
    header += [f"{t} %" for t in types]
    lines = [header]
    for r in report.rows:
        line = [
            r.label,
            str(r.n),
            _percent(r.accuracy),
            _percent(r.retained),
            f"{r.visual_tokens_mean:.0f}",
            f"{r.ttft_ms_median:.0f}",
            f"{r.e2e_ms_median:.0f}",
            str(r.errors),
        ]
        lines.append(line + [_percent(r.accuracy_by_type.get(t)) for t in types])
    out = _aligned(lines)
    categories = sorted({c for r in report.rows for c in r.accuracy_by_category})
    if categories:
        by_category = [["by category", *(f"{c} %" for c in categories)]]
        by_category += [[r.label, *(_percent(r.accuracy_by_category.get(c)) for c in categories)] for r in report.rows]
        out += ["", *_aligned(by_category)]
    for r in report.rows:
        if r.first_error:
            out.append(f"{r.label}: {r.errors} failed, first: {r.first_error}")
    if report.dataset["problems"]:
        out.append(f"dataset: {len(report.dataset['problems'])} entries skipped (see eval.json)")
    return "\n".join(out) + "\n"


def write_outputs(report: Report, out_dir: Path) -> dict[str, Path]:
    """eval.json, answers.jsonl, table.txt and pareto.png in ``out_dir``."""
    from evaluation.plot import draw_pareto

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("eval.json", "answers.jsonl", "table.txt", "pareto.png")}
    paths["eval.json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    with paths["answers.jsonl"].open("w") as f:
        for answer in report.answers:
            f.write(json.dumps(dataclasses.asdict(answer)) + "\n")
    paths["table.txt"].write_text(table(report))
    draw_pareto(report.rows, paths["pareto.png"], title=f"{report.dataset['name']}: {report.dataset['n']} questions")
    return paths


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class EvalSettings:
    """What ``squint eval`` was asked: the dataset, the grid and where the answers come from."""

    dataset: Path
    out_dir: Path
    compressors: tuple[str, ...] = (NONE,)
    budgets: tuple[int, ...] = ()
    baseline: bool = False
    pack: Path | None = None
    address: str = ""
    engine: str = "vllm"
    redis_url: str = "redis://127.0.0.1:6379/0"
    device: str = "cpu"
    limit: int | None = None
    strict: bool = False
    concurrency: int = 4
    max_new_tokens: int = 16


def evaluate(settings: EvalSettings, dataset: Dataset, progress_stream=None) -> Report:
    """Start what is needed (a stack on ``pack`` unless ``address`` names one; the baseline's
    model), run the grid, write the outputs and stop what was started."""
    from bench.progress import Progress

    configurations = grid(settings.compressors, settings.budgets, settings.baseline)
    progress = Progress(len(configurations) * len(dataset.questions), stream=progress_stream)
    answerers: dict[str, Answerer] = {}
    closers: list[Callable[[], None]] = []
    stack = None
    try:
        if any(c.compressor != BASELINE for c in configurations):
            address = settings.address
            if not address:
                from squint.app.stack import Stack, StackSettings

                progress.show("starting the stack (tritonserver, vision worker, orchestrator)")
                stack = Stack(
                    StackSettings.on_free_ports(
                        pack_dir=settings.pack,
                        state_dir=settings.out_dir / "stack",
                        redis_url=settings.redis_url,
                        device=settings.device,
                        engine=settings.engine,
                    )
                )
                closers.append(stack.stop)
                stack.start()
                address = stack.orchestrator_address
            stack_answerer = StackAnswerer(address, settings.max_new_tokens)
            closers.append(stack_answerer.close)
            stack_answerer.wait_ready()
            answerers["stack"] = stack_answerer
        if settings.baseline:
            from squint.packs import load_pack

            progress.show("baseline: loading LlavaForConditionalGeneration")
            baseline = BaselineAnswerer(load_pack(settings.pack).llava_dir, settings.max_new_tokens, settings.device)
            closers.append(baseline.close)
            answerers[BASELINE] = baseline
        report = run_eval(
            dataset,
            configurations,
            answerers,
            concurrency=settings.concurrency,
            settings={
                "dataset": str(settings.dataset),
                "pack": str(settings.pack) if settings.pack else None,
                "address": settings.address or "a stack started on the pack",
                "engine": settings.engine if not settings.address else "the running stack's",
                "device": settings.device,
                "limit": settings.limit,
                "strict": settings.strict,
                "max_new_tokens": settings.max_new_tokens,
                "temperature": 0.0,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            progress=progress,
        )
    finally:
        progress.close()
        for close in reversed(closers):
            close()
    write_outputs(report, settings.out_dir)
    return report
