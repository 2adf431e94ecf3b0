"""Client commands of ``deepserve``: ``predict``, ``generate`` and ``models`` (list, index, load, unload), against a
running server.

Only argparse is imported at module level; the SDK (httpx, numpy) and rich load when a command runs.
Output is a readable table by default and JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import DeepserveError

DEFAULT_URL = "http://127.0.0.1:8000"
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "seed")


def add_parser(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument("--url", default=None, help=f"server URL (default: $DEEPSERVE_URL, else {DEFAULT_URL})")
    group.add_argument("--api-key", default=None, help="API key sent as a Bearer token (default: $DEEPSERVE_API_KEY)")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer (default: 60)")
    group.add_argument(
        "--retries", type=int, default=2, help="retries when the server is overloaded or unreachable (default: 2)"
    )
    group.add_argument("--json", action="store_true", dest="as_json", help="print JSON instead of tables")

    p = subparsers.add_parser(
        "predict",
        parents=[common],
        help="classify images with a served classifier",
        description="Classify images with a served image classifier.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--model", "-m", required=True, help="model name")
    p.add_argument("--version", default=None, help="model version (default: the latest)")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default: 5)")
    p.set_defaults(func=predict_command)

    g = subparsers.add_parser(
        "generate",
        parents=[common],
        help="generate text with a served char-LM or seq2seq model",
        description="Generate text. Beam search (--beams) or sampling "
        "(--temperature/--top-p/--top-k/--seed), not both.",
    )
    g.add_argument("prompt", metavar="PROMPT", help="prompt (char-LM) or source text (seq2seq)")
    g.add_argument("--model", "-m", required=True, help="model name")
    g.add_argument("--version", default=None, help="model version (default: the latest)")
    g.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate (default: server's)")
    g.add_argument("--beams", type=int, default=None, help="beam search with this beam width")
    g.add_argument("--n-best", type=int, default=None, help="sequences to return (n-best beams or samples)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.set_defaults(func=generate_command)

    m = subparsers.add_parser(
        "models",
        parents=[common],
        help="list, load and unload the models a server serves",
        description="List the models of a running server (default), or control them: `index` lists every "
        "version in its repository with its state, `load NAME` loads or reloads a model (no downtime: the "
        "new load is warmed beside the old one), `unload NAME` unloads it once its requests finish. Model "
        "control needs the server's admin key (--api-key, or $DEEPSERVE_ADMIN_API_KEY), or loopback when it "
        "has none.",
    )
    m.add_argument("action", nargs="?", choices=("list", "index", "load", "unload"), default="list",
                   help="what to do (default: list)")
    m.add_argument("name", nargs="?", default=None, help="the model to load or unload")
    m.add_argument("--config", default=None, metavar="JSON",
                   help='load: settings replacing the model\'s config.json for this load, e.g. \'{"max_batch_size": 8}\'')
    m.set_defaults(func=models_command)


# ---- helpers --------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from deepserve.cli import CLIError

    from .sync import Client

    url = args.url or os.environ.get("DEEPSERVE_URL") or DEFAULT_URL
    try:
        return Client(
            url,
            api_key=args.api_key or os.environ.get("DEEPSERVE_API_KEY") or None,
            timeout=args.timeout,
            max_retries=args.retries,
            backoff=0.25,
        )
    except ValueError as e:
        flag = {"base_url": "--url", "timeout": "--timeout", "max_retries": "--retries"}
        message = str(e)
        for field_name, name in flag.items():
            if message.startswith(field_name + " "):
                message = name + message[len(field_name) :]
        raise CLIError(message) from None


def _user_error(e: DeepserveError, client: Any) -> Exception:
    """A CLIError whose message says what went wrong and what to do."""
    from deepserve.cli import CLIError

    from .errors import APIConnectionError, DeepserveError, NotFoundError

    if isinstance(e, APIConnectionError):
        return CLIError(f"{e.message}. Is `deepserve serve` running there? Pass --url or set DEEPSERVE_URL.")
    if isinstance(e, NotFoundError):
        try:
            names = [m.name for m in client.models()]
            known = f" (the server has: {', '.join(names) or 'no models'})"
        except DeepserveError:  # the list is only a hint; the server's own message is what matters
            known = ""
        return CLIError(f"{e.message}{known}")
    return CLIError(e.message if e.status_code is None else f"{e.message} (HTTP {e.status_code})")


def _print_json(value: Any) -> None:
    import json

    print(json.dumps(value, indent=2, ensure_ascii=False))


def _cell(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


# ---- commands -------------------------------------------------------------------------------------------


def predict_command(args: argparse.Namespace) -> int:
    from deepserve.cli import CLIError

    from .errors import DeepserveError

    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    for image in args.images:
        if not os.path.isfile(image):
            raise CLIError(f"IMAGE {image!r} is not a file")
    results = []
    with _client(args) as client:
        try:
            for image in args.images:
                predictions = client.classify(image, args.model, version=args.version, top_k=args.top_k)
                results.append({"image": image, "predictions": [vars(p) for p in predictions]})
        except DeepserveError as e:
            raise _user_error(e, client) from None
    if args.as_json:
        _print_json(results)
        return 0
    from rich.table import Table

    table = Table(title=f"{args.model} top-{args.top_k}")
    for column in ("image", "rank", "label", "probability"):
        table.add_column(column, justify="right" if column in ("rank", "probability") else "left")
    for result in results:
        for rank, p in enumerate(result["predictions"], 1):
            table.add_row(
                _cell(result["image"]) if rank == 1 else "", str(rank), _cell(p["label"]), f"{p['probability']:.4f}"
            )
        table.add_section()
    _console().print(table)
    return 0


def _generation_params(args: argparse.Namespace) -> dict[str, Any]:
    from deepserve.cli import CLIError

    sampling = [f"--{name.replace('_', '-')}" for name in SAMPLING_FLAGS if getattr(args, name) is not None]
    if args.beams is not None and sampling:
        raise CLIError(f"--beams cannot be combined with {', '.join(sampling)} (beam search does not sample)")
    from .types import GenerateParams, ParameterError

    params = {ours: getattr(args, dest) for ours, (dest, _) in _FLAGS.items() if getattr(args, dest) is not None}
    try:
        return GenerateParams.from_dict(params).changed()  # the server's bounds, checked before connecting
    except ParameterError as e:
        flag = _FLAGS[e.parameter][1]
        raise CLIError(f"{flag} {e.reason}, got {e.value!r}") from None


_FLAGS = {"max_new_tokens": ("max_tokens", "--max-tokens"), "num_beams": ("beams", "--beams"),
          "num_return_sequences": ("n_best", "--n-best"), "temperature": ("temperature", "--temperature"),
          "top_p": ("top_p", "--top-p"), "top_k": ("top_k", "--top-k"), "seed": ("seed", "--seed"),
          "stop": ("stop", "--stop")}
"""Generation parameter -> (argparse dest, flag)."""


def generate_command(args: argparse.Namespace) -> int:
    from deepserve.cli import CLIError

    from .errors import DeepserveError

    params = _generation_params(args)
    if args.stream and not args.as_json and (args.n_best or 1) > 1:
        raise CLIError("--stream prints one sequence; drop --n-best, or add --json for every sequence's events")
    with _client(args) as client:
        try:
            if args.stream:
                return _stream(client, args, params)
            result = client.generate(args.model, args.prompt, version=args.version, **params)
        except DeepserveError as e:
            raise _user_error(e, client) from None
    if args.as_json:
        import dataclasses

        _print_json(dataclasses.asdict(result))
        return 0
    console = _console()
    if len(result.sequences) > 1:
        from rich.table import Table

        table = Table(title=f"{args.model}: {len(result.sequences)} sequences")
        for column in ("#", "score", "finish", "text"):
            table.add_column(column, justify="right" if column in ("#", "score") else "left")
        for i, seq in enumerate(result.sequences, 1):
            score = "" if seq.score is None else f"{seq.score:.4f}"
            table.add_row(str(i), score, seq.finish_reason or "", _cell(seq.text))
        console.print(table)
    else:
        console.print(result.text, markup=False)
        count = f"{result.num_tokens} tokens, " if result.num_tokens is not None else ""
        console.print(f"[dim]({count}finish: {result.finish_reason or 'unknown'})[/dim]")
    return 0


def _stream(client: Any, args: argparse.Namespace, params: dict[str, Any]) -> int:
    import json
    import sys

    finish = None
    events = client.stream(args.model, args.prompt, version=args.version, **params)
    try:
        for event in events:
            if args.as_json:
                print(json.dumps(event.raw, ensure_ascii=False), flush=True)  # one JSON object per line
            else:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            finish = event.finish_reason or finish
    finally:
        events.close()
    if not args.as_json:
        sys.stdout.write("\n")
        _console().print(f"[dim](finish: {finish or 'unknown'})[/dim]")
    return 0


def _control_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The --config of ``models load`` as a dict; a CLIError naming the flag when it does not fit."""
    import json

    from deepserve.cli import CLIError

    if args.action in ("load", "unload") and not args.name:
        raise CLIError(f"deepserve models {args.action} needs the model's name")
    if args.action not in ("load", "unload") and args.name:
        raise CLIError(f"deepserve models {args.action} takes no model name (got {args.name!r})")
    if args.config is not None and args.action != "load":
        raise CLIError("--config goes with deepserve models load")
    if args.config is None:
        return None
    try:
        config = json.loads(args.config)
    except ValueError as e:
        raise CLIError(f"--config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CLIError(f"--config must be a JSON object of settings, got {args.config!r}")
    return config


def _call(args: argparse.Namespace, fn: Any) -> tuple[str, Any]:
    """``fn(client)`` with a client for ``args``: the server's URL and the answer; SDK errors as CLIErrors."""
    from .errors import DeepserveError

    with _client(args) as client:
        try:
            return client.base_url, fn(client)
        except DeepserveError as e:
            raise _user_error(e, client) from None


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    _console().print(table)


def control_command(args: argparse.Namespace) -> int:
    """``deepserve models index|load|unload``."""
    config = _control_args(args)
    if not args.api_key and os.environ.get("DEEPSERVE_ADMIN_API_KEY"):
        args.api_key = os.environ["DEEPSERVE_ADMIN_API_KEY"]
    actions = {"index": lambda c: c.repository_index(), "load": lambda c: c.load_model(args.name, config=config),
               "unload": lambda c: c.unload_model(args.name)}
    url, rows = _call(args, actions[args.action])
    if args.as_json:
        _print_json([vars(r) for r in rows])
        return 0
    colors = {"READY": "green", "LOADING": "yellow", "UNLOADING": "yellow"}
    _table(f"repository at {url}", ("name", "version", "state", "reason"),
           [[_cell(r.name), r.version, f"[{colors.get(r.state, 'red')}]{r.state}[/]", _cell(r.reason)] for r in rows])
    return 0


def models_command(args: argparse.Namespace) -> int:
    if args.action != "list":
        return control_command(args)
    _control_args(args)
    url, models = _call(args, lambda c: c.models())
    if args.as_json:
        _print_json([vars(m) for m in models])
        return 0
    _table(f"models at {url}", ("name", "task", "versions", "ready", "reason"),
           [[_cell(m.name), m.task or "", ", ".join(m.versions), "[green]yes[/green]" if m.ready else "[red]no[/red]",
             _cell(m.reason or "")] for m in models])
    if not models:
        _console().print("[dim]the server has no models[/dim]")
    return 0
