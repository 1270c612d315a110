"""The ``squint`` command: packs, servers, the local stack, and asking it questions."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

DEFAULT_STATE_DIR = Path(".squint/stack")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- packs


def cmd_pack_tiny(args: argparse.Namespace) -> int:
    from squint.app.tiny_pack import shape_from_name, write_tiny_pack

    pack = write_tiny_pack(Path(args.dir), seed=args.seed, shape=shape_from_name(args.shape))
    print(f"wrote tiny pack {pack.id} to {pack.root}")
    return 0


def cmd_pack_world(args: argparse.Namespace) -> int:
    from training.world_pack import WorldRecipe, build_world_pack

    recipe = WorldRecipe(seed=args.seed, train_pictures=args.train_pictures)
    summary = build_world_pack(Path(args.dir), recipe, world=Path(args.world) if args.world else None)
    print(f"wrote the world pack to {args.dir} in {summary['seconds']} s (recipe.json has every stage's summary)")
    return 0


def cmd_pack_import(args: argparse.Namespace) -> int:
    from llm_worker.language_model import export_language_model
    from squint.packs import write_manifest

    root, llava = Path(args.dir).resolve(), Path(args.llava).resolve()
    if args.language_model:
        language_model = Path(args.language_model).resolve()
    else:
        language_model = export_language_model(llava, root / "language_model")
    pack = write_manifest(
        root,
        clip=Path(args.clip).resolve(),
        llava=llava,
        name=args.name,
        pack_id=args.id,
        created_by="squint pack import",
        language_model=language_model,
    )
    print(f"wrote manifest of pack {pack.id} to {pack.manifest_path}")
    return 0


def cmd_pack_language_model(args: argparse.Namespace) -> int:
    from llm_worker.language_model import export_language_model
    from squint.packs import load_pack, update_manifest

    pack = load_pack(Path(args.dir))
    export_language_model(pack.llava_dir, pack.root / "language_model")
    pack = update_manifest(pack.root, pack_id=pack.id, language_model="language_model")
    print(f"wrote {pack.language_model_dir}, the language model the vLLM engine loads")
    return 0


# --------------------------------------------------------------------------- servers


def _server_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings every ``squint serve`` command takes from its flags."""
    return {
        "pack_dir": Path(args.pack) if args.pack else None,
        "grpc.host": args.host,
        "grpc.port": args.port,
        "metrics.host": args.host,
        "metrics.port": args.metrics_port,
    }


def _run_server(serve, settings, args: argparse.Namespace) -> int:
    port_file = Path(args.port_file) if args.port_file else None
    metrics_port_file = Path(args.metrics_port_file) if args.metrics_port_file else None
    asyncio.run(serve(settings, port_file, metrics_port_file))
    return 0


def cmd_serve_vision(args: argparse.Namespace) -> int:
    from vision_worker.server import serve
    from vision_worker.settings import vision_settings

    overrides = {**_server_overrides(args), "device": args.device, "cache.redis_url": args.redis_url}
    return _run_server(serve, vision_settings(overrides=overrides), args)


def cmd_serve_orchestrator(args: argparse.Namespace) -> int:
    from orchestrator.server import serve
    from orchestrator.settings import orchestrator_settings

    workers = tuple(args.vision_workers.split(",")) if args.vision_workers else None
    llm_workers = tuple(args.llm_workers.split(",")) if args.llm_workers else None
    overrides = {
        **_server_overrides(args),
        "discovery.static_workers": workers,
        "triton_url": args.triton_url,
        "llm_discovery.static_workers": llm_workers,
    }
    if args.http_port is not None:
        overrides.update({"http.enabled": True, "http.port": args.http_port, "http.host": args.host})
    settings = orchestrator_settings(overrides=overrides)
    port_file = Path(args.port_file) if args.port_file else None
    metrics_port_file = Path(args.metrics_port_file) if args.metrics_port_file else None
    http_port_file = Path(args.http_port_file) if args.http_port_file else None
    asyncio.run(serve(settings, port_file, metrics_port_file, http_port_file))
    return 0


# --------------------------------------------------------------------------- stack


# StackSettings field -> the `squint up` flag that sets it
STACK_PORT_FLAGS = {
    "orchestrator_port": "port",
    "orchestrator_http_port": "http_port",
    "vision_port": "vision_port",
    "triton_grpc_port": "triton_port",
    "triton_http_port": "triton_http_port",
    "triton_metrics_port": "triton_metrics_port",
    "orchestrator_metrics_port": "metrics_port",
    "vision_metrics_port": "vision_metrics_port",
}


def _stack_settings(args: argparse.Namespace):
    from squint.app.stack import StackSettings

    ports = {field: getattr(args, flag) for field, flag in STACK_PORT_FLAGS.items()}
    return StackSettings(
        pack_dir=Path(args.pack),
        state_dir=Path(args.state_dir),
        redis_url="" if args.redis_url in ("", "none") else args.redis_url,
        device=args.device,
        vision_workers=args.vision_workers,
        llm_workers=args.llm_workers,
        engine=args.engine,
        **ports,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from squint.app.stack import Stack, StackError, read_state

    try:
        settings = _stack_settings(args)
    except ValueError as exc:
        print(f"squint up: {exc}", file=sys.stderr)
        return 2
    if read_state(settings.state_dir) is not None:
        print(f"a stack is already recorded in {settings.state_dir}; run `squint down` first", file=sys.stderr)
        return 1
    stack = Stack(settings)
    print(f"starting the stack on pack {settings.pack_dir} (logs in {stack.logs_dir}) ...", file=sys.stderr)
    started = time.monotonic()
    try:
        stack.start(detach=args.detach)
    except StackError as exc:
        print(f"squint up failed: {exc}", file=sys.stderr)
        return 1
    print(f"stack ready in {time.monotonic() - started:.1f}s")
    for name, value in stack.endpoints().items():
        print(f"  {name:15} {value}")
    if "in-process" in stack.cache_note:
        print(f"  note: the encoding cache is {stack.cache_note}")
    if args.detach:
        print(f"running in the background; `squint down --state-dir {settings.state_dir}` stops it")
        return 0
    print("press Ctrl-C to stop")
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    failed = None
    while not stopping and failed is None:
        time.sleep(0.5)
        failed = stack.poll_failed()
    if failed:
        print(f"{failed} exited; stopping the stack (logs in {stack.logs_dir})", file=sys.stderr)
    print("stopping ...", file=sys.stderr)
    stack.stop()
    return 1 if failed else 0


def cmd_down(args: argparse.Namespace) -> int:
    from squint.app.stack import stop_detached

    stopped = stop_detached(Path(args.state_dir))
    print("stopped " + ", ".join(stopped) if stopped else f"no stack recorded in {args.state_dir}")
    return 0


# --------------------------------------------------------------------------- ask


def _orchestrator_address(args: argparse.Namespace) -> str:
    if args.address:
        return args.address
    from squint.app.stack import read_state

    state = read_state(Path(args.state_dir))
    if state is None:
        return "127.0.0.1:50051"
    return state["endpoints"]["orchestrator"]


def _parse_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_ask(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from squint.app.client import build_request, usage_lines
    from squint.generate.v1 import generate_pb2_grpc

    request = build_request(
        question=args.question,
        images=[Path(p).read_bytes() for p in args.image],
        compressor=args.compressor,
        params=dict(args.param),
        budget=args.budget,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    request.return_coverage = args.coverage
    address = _orchestrator_address(args)
    from squint.rpc import channel_options

    options = channel_options(256 * 1024 * 1024)
    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
            private_key=Path(args.tls_key).read_bytes() if args.tls_cert else None,
            certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        )
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    token = args.token or os.environ.get("SQUINT_TOKEN", "")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with channel:
        stub = generate_pb2_grpc.GenerationServiceStub(channel)
        try:
            reply = stub.Generate(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    print(reply.text)
    print()
    for line in usage_lines(reply):
        print(line)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from squint.packs import load_pack
    from vision_worker.explain import explain
    from vision_worker.settings import vision_settings

    result = explain(
        load_pack(args.pack),
        Path(args.image).read_bytes(),
        args.compressor,
        dict(args.param),
        args.question,
        plugins=vision_settings().plugins,
    )
    Path(args.out).write_bytes(result.png)
    print(f"{result.compressor}: {result.tokens_before} -> {result.tokens_after} visual tokens; wrote {args.out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from compressor_plugins.protocol import Calibrates, capabilities_of, resolve_calibration_params
    from compressor_plugins.registry import load_compressors
    from squint.app.calibrate import calibrate_pack, image_files, options_parser
    from squint.errors import SquintError
    from squint.packs import load_pack
    from vision_worker.settings import vision_settings

    registry = load_compressors(vision_settings().plugins)
    calibrated = [e.cls.name for e in registry if Calibrates in {c.protocol for c in capabilities_of(e.cls)}]
    try:
        entry = registry.get(args.compressor)
        if entry.cls.name not in calibrated:
            print(
                f"squint calibrate: compressor {entry.cls.name!r} has nothing to calibrate (no Calibrates "
                f"capability); compressors that do: {', '.join(calibrated) or 'none'}",
                file=sys.stderr,
            )
            return 1
        options = options_parser(entry).parse_args(args.options)
        pack = load_pack(options.pack)
        if not Path(options.images).is_dir():
            print(f"squint calibrate: --images {options.images} is not a folder of images", file=sys.stderr)
            return 2
        files = image_files(Path(options.images))
        if not files:
            print(f"no images (.png, .jpg, .webp, .bmp) in {options.images}", file=sys.stderr)
            return 1
        raw = {spec.name: getattr(options, spec.name) for spec in entry.cls.calibration_params}
        run = calibrate_pack(pack, entry, files, resolve_calibration_params(entry.cls, raw))
    except SquintError as exc:  # an unknown name, options the compressor refuses
        print(f"squint calibrate: {exc.message}", file=sys.stderr)
        return 1
    summary = f": {run.calibration.summary}" if run.calibration.summary else ""
    print(f"calibrated {entry.cls.name} on {run.images} images{summary}")
    for line in run.calibration.details:
        print(line)
    print(f"wrote {run.path}; pack id is now {run.pack.id}")
    return 0


def cmd_plugins_list(args: argparse.Namespace) -> int:
    from compressor_plugins.protocol import CAPABILITIES
    from compressor_plugins.registry import describe, load_compressors
    from vision_worker.settings import vision_settings

    described = describe(load_compressors(vision_settings().plugins))
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for info in described:
        print(f"{info['name']}  ({info['distribution']} {info['version']}, plugin {info['plugin']})")
        print(f"    {info['summary']}")
        capabilities = [f"output in {info['output_space']} space", "needs " + ", ".join(info["needs"])]
        labels = {capability.name: capability.label for capability in CAPABILITIES}
        capabilities += [labels[c] for c in info["capabilities"]]
        print(f"    {'; '.join(capabilities)}")
        for p in info["params"]:
            print(f"    --param {p['name']}={_param_line(p)}")
        for p in info["calibration_params"]:
            print(f"    squint calibrate {info['name']} --{p['name'].replace('_', '-')}={_param_line(p)}")
    return 0


def _param_line(p: dict) -> str:
    limits = []
    if p["minimum"] is not None:
        limits.append(f">= {p['minimum']:g}")
    if p["maximum"] is not None:
        limits.append(f"<= {p['maximum']:g}")
    if p["choices"]:
        limits.append("one of " + "|".join(p["choices"]))
    default = "auto" if p["default"] is None else json.dumps(p["default"])
    detail = f"{p['type']}, {', '.join(limits)}" if limits else p["type"]
    return f"{default}  ({detail})  {p['description']}"


# --------------------------------------------------------------------------- data


def cmd_data_world(args: argparse.Namespace) -> int:
    from bench.progress import Progress
    from evaluation.world import WorldSettings, total_items, write_world

    try:
        settings = WorldSettings(
            seed=args.seed,
            size=args.size,
            train=args.train,
            val=args.val,
            test=args.test,
            train_videos=args.train_videos,
            val_videos=args.val_videos,
            test_videos=args.test_videos,
        )
    except ValueError as exc:
        print(f"squint data world: {exc}", file=sys.stderr)
        return 2
    progress = Progress(total_items(settings))
    description = write_world(Path(args.dir), settings, progress=progress)
    progress.close()
    for split, counts in description["counts"].items():
        print(f"{split}: {counts['pictures']} pictures, {counts['videos']} videos, {counts['questions']} questions")
    print(f"wrote the shapes world (seed {settings.seed}, {settings.size} px) to {args.dir}")
    return 0


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.datasets import DatasetError, read_dataset
    from evaluation.run import EvalSettings, evaluate, parse_compressor

    if not args.pack and not args.address:
        print("squint eval: give --pack PACK (a stack is started on it) or --address HOST:PORT", file=sys.stderr)
        return 2
    if args.baseline and not args.pack:
        print("squint eval: --baseline needs --pack (it runs the pack's LLaVA in this process)", file=sys.stderr)
        return 2
    try:
        for text in args.compressor or ["none"]:
            parse_compressor(text)
        dataset = read_dataset(Path(args.dataset), strict=args.strict, limit=args.limit)
    except (DatasetError, ValueError) as exc:
        print(f"squint eval: {exc}", file=sys.stderr)
        return 2
    for problem in dataset.problems[:20]:
        print(f"squint eval: skipped {problem.source}: {problem.message}", file=sys.stderr)
    if len(dataset.problems) > 20:
        print(f"squint eval: ... and {len(dataset.problems) - 20} more skipped (eval.json lists all)", file=sys.stderr)
    settings = EvalSettings(
        dataset=Path(args.dataset),
        out_dir=Path(args.out),
        compressors=tuple(args.compressor or ["none"]),
        budgets=tuple(args.budget or ()),
        baseline=args.baseline,
        pack=Path(args.pack) if args.pack else None,
        address=args.address or "",
        engine=args.engine,
        redis_url=args.redis_url,
        device=args.device,
        limit=args.limit,
        strict=args.strict,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
    )
    report = evaluate(settings, dataset)
    print((Path(args.out) / "table.txt").read_text(), end="")
    print(f"wrote eval.json, answers.jsonl, table.txt and pareto.png to {args.out} ({report.settings['duration_s']} s)")
    return 0


# --------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from training.data import TrainingDataError
    from training.run import TrainSettings, train

    try:
        settings = TrainSettings(
            mode=args.mode,
            pack=Path(args.pack),
            data=Path(args.data),
            out=Path(args.out) if args.out else None,
            run_name=args.run_name,
            image_folder=Path(args.image_folder) if args.image_folder else None,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            gradient_accumulation=args.gradient_accumulation,
            learning_rate=args.learning_rate,
            seed=args.seed,
            bf16=args.bf16,
            gradient_checkpointing=args.gradient_checkpointing,
            save_steps=args.save_steps,
            resume=args.resume,
            limit=args.limit,
            logging_steps=args.logging_steps,
            device=args.device,
            deepspeed=args.deepspeed,
            dfmr=args.dfmr or "",
            llavolta=args.llavolta or "",
            stf=args.stf,
            frame_times=not args.no_frame_times,
            **({"video_frames": args.video_frames} if args.video_frames else {}),
        )
        summary = train(settings)
    except (TrainingDataError, ValueError) as exc:
        print(f"squint train: {exc}", file=sys.stderr)
        return 2
    print(
        f"{summary['mode']}: {summary['steps']} steps in {summary['seconds']} s, loss {summary['first_loss']} -> "
        f"{summary['final_loss']}; wrote pack {summary['pack_id']} to {summary['out']}"
    )
    return 0


# --------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.suite import main as bench_main

    return bench_main(args.pack, args.out, args.quick, args.device, args.redis_url)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="squint", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    pack = commands.add_parser("pack", help="write model packs").add_subparsers(dest="pack_command", required=True)
    tiny = pack.add_parser("tiny", help="write a tiny seeded pack (real formats, random weights)")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shape", default="default", help="default (24x24 grid) or alt (16x16, GQA)")
    tiny.set_defaults(func=cmd_pack_tiny)
    medium = pack.add_parser("medium", help="a seeded benchmark-sized pack (CLIP 12 x 768 at 336 px, LLM 12 x 768)")
    medium.add_argument("dir")
    medium.add_argument("--seed", type=int, default=0)
    medium.set_defaults(func=cmd_pack_tiny, shape="medium")
    world_pack = pack.add_parser(
        "world",
        help="train a small pack on the shapes world: world data, then clip, dense, text, align and finetune "
        "(docs/training.md)",
    )
    world_pack.add_argument("dir")
    world_pack.add_argument("--seed", type=int, default=0)
    world_pack.add_argument("--world", help="an existing shapes world (default: written into DIR/world)")
    world_pack.add_argument("--train-pictures", type=int, default=4000, help="train pictures the world gets")
    world_pack.set_defaults(func=cmd_pack_world)
    imp = pack.add_parser("import", help="write a manifest pointing at existing CLIP and LLaVA checkpoints")
    imp.add_argument("dir")
    imp.add_argument("--clip", required=True, help="CLIP checkpoint folder, e.g. clip-vit-large-patch14-336")
    imp.add_argument("--llava", required=True, help="LLaVA checkpoint folder, e.g. llava-1.5-7b-hf")
    imp.add_argument("--name", default="pack")
    imp.add_argument("--id", default=None, help="pack id; default: a hash of every checkpoint file (slow for 7B)")
    imp.add_argument(
        "--language-model",
        default=None,
        help="the LLaVA's language model as a causal-LM checkpoint (vLLM loads it); "
        "default: written from --llava into DIR/language_model",
    )
    imp.set_defaults(func=cmd_pack_import)
    lm = pack.add_parser(
        "language-model", help="write a pack's language model as its own checkpoint (the folder vLLM loads)"
    )
    lm.add_argument("dir")
    lm.set_defaults(func=cmd_pack_language_model)

    serve = commands.add_parser("serve", help="run one server in the foreground").add_subparsers(
        dest="serve_command", required=True
    )
    for name, func in (("vision", cmd_serve_vision), ("orchestrator", cmd_serve_orchestrator)):
        sub = serve.add_parser(name, help=f"the {name} server (settings also from SQUINT_{name.upper()}_* env)")
        sub.add_argument("--pack", default=None)
        sub.add_argument("--host", default=None)
        sub.add_argument("--port", type=int, default=None, help="0 picks a free port")
        sub.add_argument("--port-file", default=None, help="write the bound port here once listening")
        sub.add_argument("--metrics-port", type=int, default=None, help="/metrics HTTP port; 0 picks a free one")
        sub.add_argument("--metrics-port-file", default=None, help="write the bound metrics port here")
        sub.set_defaults(func=func)
        if name == "vision":
            sub.add_argument("--device", default=None)
            sub.add_argument("--redis-url", default=None, help="empty: an in-process cache")
        else:
            sub.add_argument("--vision-workers", default=None, help="comma-separated host:port list")
            sub.add_argument("--triton-url", default=None, help="the one LLM worker (Triton gRPC host:port)")
            sub.add_argument(
                "--llm-workers",
                default=None,
                help="comma-separated host:port list of LLM workers (Triton gRPC); requests go to the least busy",
            )
            sub.add_argument(
                "--http-port", type=int, default=None, help="serve the OpenAI-compatible HTTP API here (0: a free port)"
            )
            sub.add_argument("--http-port-file", default=None, help="write the bound HTTP port here")

    up = commands.add_parser("up", help="start the whole stack on loopback")
    up.add_argument("--pack", default=".squint/packs/tiny")
    up.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    up.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="'none': an in-process cache")
    up.add_argument("--device", default="cpu", help="cpu, or cuda to run Triton with KIND_GPU")
    up.add_argument(
        "--engine",
        choices=("vllm", "staged"),
        default="vllm",
        help="vllm: vLLM serves every request but in-LLM pooling (the staged engine's); "
        "staged: the staged engine alone, no vLLM loaded",
    )
    up.add_argument("--port", type=int, default=50051, help="orchestrator port")
    up.add_argument(
        "--http-port", type=int, default=8080, help="the OpenAI-compatible HTTP API (0: a free port; -1: off)"
    )
    up.add_argument("--vision-port", type=int, default=50061, help="the first vision worker's; replicas take the next")
    up.add_argument("--vision-workers", type=int, default=1, help="vision worker replicas")
    up.add_argument(
        "--llm-workers",
        type=int,
        default=1,
        help="LLM worker replicas: one tritonserver each (the first on --triton-port and friends, "
        "the others on free ports), all behind the orchestrator",
    )
    up.add_argument("--triton-port", type=int, default=8001)
    up.add_argument("--triton-http-port", type=int, default=8000)
    up.add_argument("--triton-metrics-port", type=int, default=8002)
    up.add_argument("--metrics-port", type=int, default=9464, help="the orchestrator's /metrics port")
    up.add_argument("--vision-metrics-port", type=int, default=9465, help="the first vision worker's /metrics port")
    up.add_argument("-d", "--detach", action="store_true", help="leave it running; stop with `squint down`")
    up.set_defaults(func=cmd_up)

    down = commands.add_parser("down", help="stop a stack started with --detach")
    down.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    down.set_defaults(func=cmd_down)

    ask = commands.add_parser("ask", help="ask the running stack a question about images")
    ask.add_argument("question")
    ask.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    ask.add_argument("--compressor", default="", help="e.g. none, avgpool")
    ask.add_argument("--param", action="append", default=[], type=_parse_param, help="compressor parameter NAME=VALUE")
    ask.add_argument("--budget", type=int, default=0, help="visual token budget")
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    ask.add_argument("--coverage", action="store_true", help="include which patches each visual token covers")
    ask.add_argument("--address", default=None, help="orchestrator host:port; default: the recorded stack")
    ask.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    ask.add_argument("--timeout", type=float, default=300.0)
    ask.add_argument("--token", default="", help="bearer token for the API (default: $SQUINT_TOKEN)")
    ask.add_argument("--tls-ca", default="", help="PEM CA bundle: connect with TLS, trusting it")
    ask.add_argument("--tls-cert", default="", help="PEM client certificate (mutual TLS)")
    ask.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    ask.set_defaults(func=cmd_ask)

    exp = commands.add_parser("explain", help="draw which patches each compressed token covers")
    exp.add_argument("--image", required=True)
    exp.add_argument("--compressor", required=True)
    exp.add_argument("--param", action="append", default=[], type=_parse_param, help="compressor parameter NAME=VALUE")
    exp.add_argument("--question", default="", help="for text-guided compressors")
    exp.add_argument("--out", required=True, help="the PNG to write")
    exp.add_argument("--pack", default=".squint/packs/tiny")
    exp.set_defaults(func=cmd_explain)

    cal = commands.add_parser(
        "calibrate",
        help="calibrate a compressor on your images (one with the calibrates capability, e.g. dfmr)",
        description="Fit a compressor to a folder of images and store the result in the pack. "
        "Its options come from the compressor: squint calibrate NAME --help.",
    )
    cal.add_argument("compressor", help="a compressor with the calibrates capability (squint plugins list)")
    cal.add_argument(
        "options", nargs=argparse.REMAINDER, help="--images FOLDER [--pack PACK] and the compressor's own options"
    )
    cal.set_defaults(func=cmd_calibrate)

    data = commands.add_parser("data", help="evaluation and training data").add_subparsers(
        dest="data_command", required=True
    )
    world = data.add_parser(
        "world",
        help="write the shapes world: seeded pictures, videos, captions and questions (LLaVA JSON, eval JSONL)",
        description="Write a seeded visual-question world in which compression visibly matters: flat shapes (some "
        "about one patch wide), boxed digits, moving and blinking shapes in short videos; questions with one-word "
        "answers in five families (and two for video); train.json and captions.json in LLaVA's conversation format, "
        "val.jsonl and test.jsonl for squint eval. See docs/quality.md.",
    )
    world.add_argument("dir")
    world.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    world.add_argument("--size", type=int, default=336, help="picture side in pixels: the pack's (default 336)")
    for split, pictures, videos in (("train", 4000, 400), ("val", 200, 20), ("test", 400, 60)):
        world.add_argument(f"--{split}", type=int, default=pictures, help=f"{split} pictures (default {pictures})")
        world.add_argument(f"--{split}-videos", type=int, default=videos, help=f"{split} videos (default {videos})")
    world.set_defaults(func=cmd_data_world)

    ev = commands.add_parser(
        "eval",
        help="answer accuracy against visual tokens and latency, for every compressor and budget",
        description="Run a dataset (Squint's evaluation JSONL, a shapes world, or a folder of lmms-eval's POPE, "
        "GQA, TextVQA or ScienceQA-IMG parquet) through the real stack for every --compressor x --budget, greedy; "
        "score the answers as lmms-eval does; write eval.json, answers.jsonl, table.txt and pareto.png. "
        "See docs/quality.md.",
    )
    ev.add_argument("dataset", help="an evaluation JSONL, or a folder holding one or an lmms-eval parquet layout")
    ev.add_argument("--pack", help="start a stack on this pack (and load the baseline from it)")
    ev.add_argument("--address", help="a running stack's orchestrator, HOST:PORT (instead of starting one)")
    ev.add_argument(
        "--compressor",
        action="append",
        metavar="NAME[:k=v,...]",
        help="a configuration's compressor and parameters; repeatable (default: none)",
    )
    ev.add_argument(
        "--budget", action="append", type=int, metavar="N", help="a visual-token budget; repeatable (none: unbudgeted)"
    )
    ev.add_argument("--baseline", action="store_true", help="add HF LlavaForConditionalGeneration, in process")
    ev.add_argument("--limit", type=int, help="only the first N questions (a quick look)")
    ev.add_argument("--strict", action="store_true", help="refuse the dataset at its first bad entry (default: skip)")
    ev.add_argument("--concurrency", type=int, default=4, help="requests in flight to the stack (default 4)")
    ev.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap (default 16)")
    ev.add_argument("--out", default=".squint/eval", help="where the outputs go (default .squint/eval)")
    ev.add_argument("--engine", default="vllm", choices=["vllm", "staged"], help="the started stack's LLM engine")
    ev.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="the started stack's cache")
    ev.add_argument("--device", default="cpu", help="cpu, or cuda")
    ev.set_defaults(func=cmd_eval)

    tr = commands.add_parser(
        "train",
        help="LLaVA-1.5's training stages on transformers' Trainer: clip, dense, pretrain, align, finetune",
        description="Train a pack on LLaVA conversation JSON and write a pack squint up serves unchanged: clip "
        "(contrastive, image and text towers, on captions), dense (the vision tower, on segment maps), pretrain "
        "(the projector alone), align (the projector onto the LLM's word embeddings, on segment maps), finetune "
        "(projector and LLM; only answers are targets). Checkpoints and summary.json go to OUT/train/MODE.",
    )
    tr.add_argument("mode", choices=["clip", "dense", "pretrain", "align", "finetune"])
    tr.add_argument("--pack", required=True, help="the pack to start from")
    tr.add_argument(
        "--data",
        required=True,
        help="LLaVA conversation JSON (captions.json for clip and pretrain); segments.json for dense and align",
    )
    tr.add_argument("--out", help="the pack to write (default: the input pack, in place)")
    tr.add_argument("--run-name", default="", help="the run's folder under OUT/train (default: the mode)")
    tr.add_argument("--image-folder", help="where the JSON's image paths start (default: the JSON's folder)")
    tr.add_argument("--epochs", type=float, default=1.0)
    tr.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    tr.add_argument("--batch-size", type=int, default=8, help="per device")
    tr.add_argument("--gradient-accumulation", type=int, default=1)
    tr.add_argument(
        "--learning-rate",
        type=float,
        help="default: clip and dense 5e-4, pretrain and align 1e-3, finetune 2e-5 (LLaVA-1.5)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--bf16", action="store_true")
    tr.add_argument("--gradient-checkpointing", action="store_true")
    tr.add_argument("--save-steps", type=int, default=500)
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/train/MODE")
    tr.add_argument("--limit", type=int, help="only the first N conversations")
    tr.add_argument("--logging-steps", type=int, default=10)
    tr.add_argument("--device", default="cpu", help="cpu, or cuda (accelerate picks the GPUs)")
    tr.add_argument("--deepspeed", help="a DeepSpeed config file, passed to TrainingArguments")
    tr.add_argument(
        "--dfmr",
        choices=["random", "dynamic"],
        help="LLaVA-Zip: pool each picture with the dfmr compressor, its factor drawn (random) or chosen by sigma_bar",
    )
    tr.add_argument(
        "--llavolta",
        metavar="SCHEDULE",
        help="LLaVolta's staged training: K:S:SHARE stages, pooling at decoder layer K (-1: before the LLM) with "
        "stride S for SHARE of the steps, the last uncompressed, e.g. 2:8:0.25,2:2:0.25,16:2:0.25,none:0.25 "
        "(a schedule that starts with -1 takes an equals sign: --llavolta=-1:4:0.5,none:0.5)",
    )
    tr.add_argument(
        "--stf",
        action="store_true",
        help="LLaVA-STF: train the pack's stf fusion module (multi-block and 2x2 spatial fusion, its projector) in "
        "place of LLaVA's projector, written back where the stf compressor loads it",
    )
    tr.add_argument(
        "--video-frames",
        type=int,
        help="frames sampled evenly from each video (default: the orchestrator's frames.frames, 8)",
    )
    tr.add_argument(
        "--no-frame-times",
        action="store_true",
        help="leave the frame times out of video prompts (serve with frame_timestamps off to match)",
    )
    tr.set_defaults(func=cmd_train)

    bench = commands.add_parser(
        "bench",
        help="the Hugging Face baseline and the stack with every compressor, side by side in one run",
        description="Measure the in-process Hugging Face baseline and the real stack (every built-in compressor, "
        "cold and warm cache, vision micro-batching, several images and a video under a budget) on one pack; "
        "print a table and write bench.json, ttft.png and table.txt. See docs/benchmarks.md.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="fewer repeats and shorter answers (under 10 minutes on 2 CPUs)"
    )
    bench.add_argument(
        "--pack",
        default=None,
        help="the pack to measure (default: the medium pack, written once into .squint/packs/medium)",
    )
    bench.add_argument(
        "--out", default=None, help="where the JSON, PNG, table and server logs go (default: .squint/bench)"
    )
    bench.add_argument(
        "--device", default="cpu", help="cpu, or cuda: the baseline, the vision worker and Triton (KIND_GPU) on the GPU"
    )
    bench.add_argument(
        "--redis-url", default=None, help="the cache's Redis (default: a private redis-server on a free port)"
    )
    bench.set_defaults(func=cmd_bench)

    plugins = commands.add_parser("plugins", help="compressor plugins").add_subparsers(
        dest="plugins_command", required=True
    )
    plist = plugins.add_parser("list", help="every compressor with its distribution, parameters and capabilities")
    plist.add_argument("--json", action="store_true")
    plist.set_defaults(func=cmd_plugins_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    from compressor_plugins.registry import PluginLoadError
    from squint.config import SettingsError
    from squint.errors import StartupError
    from squint.packs import PackError

    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (PluginLoadError, PackError, SettingsError, StartupError) as exc:
        # Start-up problems an operator fixes: the message, not a traceback.
        print(f"squint {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
